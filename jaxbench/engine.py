"""The engine: runs searches on the local devices, step by step.

It owns the devices, the loaded weights, the compiled steps and the host/device overlap, and asks the
others where things go and how big they are: placement.py where each parameter set's weights and
steps live (groups of devices, each group one replica split into stages), steps.py for the compiled
step, batch_choice.py for the batch, feeder.py for each step's inputs drawn ahead on the host.

A search yields one StepResult a step. While the devices run the steps in flight (one per stage,
and one more), the feeder draws the next; the host waits on the devices only to collect the oldest
step's distances.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from . import batch_choice, draws, weights as weights_mod
from .distance import split_target
from .engine_config import DEFAULT_CACHE_DIR, EngineConfig, enable_compile_cache
from .feeder import StepFeeder
from .fields import FieldError
from .job import GroupResult, SearchJob, StepResult
from .nonces import NonceSchedule
from .params import Params
from .placement import Placement, Planner, Stage
from .sizes import format_size
from .steps import TARGET_AXES, CompiledSteps, PipelinedStep, StepKey

log = logging.getLogger("jaxbench.engine")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


@dataclasses.dataclass
class LoadedModel:
    params: Params
    block_hash: str
    dtype: str
    placement: Placement
    stages: list[Stage]
    weights: list[dict]  # each stage's, on that stage's devices
    target: jax.Array  # on the last stage's devices
    build_seconds: float
    screen_weights: list[dict] | None = None  # each stage's weights for the "fp8" products, made when first asked


class Engine:
    def __init__(self, devices: Sequence[jax.Device] | int | None = None, draws_mode: str = "auto",
                 compile_cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, host_threads: int | None = None,
                 attention: str | None = None, ffn: str | None = None, group_size: int | None = None,
                 device_memory: int | None = None):
        all_devices = jax.devices()
        if isinstance(devices, int):
            if not 1 <= devices <= len(all_devices):
                raise ValueError(f"devices must be in [1, {len(all_devices)}], got {devices}")
            devices = all_devices[:devices]
        self.devices = list(devices or all_devices)
        self.config = EngineConfig.resolve(self.devices, draws_mode, attention, ffn, group_size, device_memory)
        enable_compile_cache(compile_cache_dir)
        self.batches = batch_choice.BatchPolicy(self, batch_choice.BatchRecord(
            Path(compile_cache_dir).parent / batch_choice.RECORD_NAME if compile_cache_dir else None))
        self.drawer = draws.HostDrawer(host_threads)
        self.steps = CompiledSteps()
        self.planner = Planner(self.devices, self.config.group_size, self.config.device_memory)
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()
        self.steps_completed = 0  # grows with every collected step; lets callers see the engine move

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def draws_mode(self) -> str:
        return self.config.draws

    def attention_for(self, dtype: str) -> str:
        return self.config.attention_for(dtype)

    def describe(self) -> list[dict]:
        return [{"id": d.id, "kind": d.device_kind, "platform": d.platform} for d in self.devices]

    def groups(self) -> dict:
        """The loaded parameter set's groups and group size (before any: the setting's)."""
        return self.planner.describe(self._model.placement if self._model else None)

    def placement(self, params: Params, dtype: str) -> Placement:
        return self.planner.placement(params, dtype)

    def check_fits(self, params: Params, dtype: str, batch: int = 1) -> None:
        self.planner.check_fits(params, dtype, batch)

    # Weights ---------------------------------------------------------------------------------

    def load(self, params: Params, block_hash: str, dtype: str) -> LoadedModel:
        """Weights and target on every group's devices, kept while the block hash, params and dtype stay."""
        with self._lock:
            m = self._model
            if m and (m.params, m.block_hash, m.dtype) == (params, block_hash, dtype):
                return m
            self.check_fits(params, dtype)
            placement = self.placement(params, dtype)
            self._model = None  # free the old weights before building new ones
            self.planner.hold(params, dtype, None)
            t0 = time.perf_counter()
            stages = placement.stages(params)
            pool = weights_mod.pool_on_device(block_hash, params, dtype, self.devices[0],
                                              drawn_on_device=self.draws_mode == "device")
            built = []
            for stage in stages:
                built.append(jax.block_until_ready(weights_mod.build_weights(
                    jax.device_put(pool, stage.sharding(())), params, block_hash, self.config.layout, stage.layers)))
            del pool
            target = jax.device_put(split_target(draws.draw_target(block_hash, params.vocab_size)),
                                    stages[-1].sharding(TARGET_AXES))
            self._model = LoadedModel(params, block_hash, dtype, placement, stages, built, target,
                                      time.perf_counter() - t0)
            self.planner.hold(params, dtype, stages)
            log.info("built weights for %s… (%s, %s) on %d group(s) of %d device(s) in %.2f s", block_hash[:16],
                     dtype, params.describe(), placement.n_groups, placement.group_size, self._model.build_seconds)
            return self._model

    def screen_weights(self, model: LoadedModel) -> list[dict]:
        """The loaded weights with the layers' matrices in e4m3, for a screen's step: made once and kept
        beside the model's own (the norms and the head shared) while the model stays. FieldError on
        `screen` where the devices cannot hold them too."""
        with self._lock:
            if model.screen_weights is None:
                key = self.step_key(model.params, model.dtype, 1, "fp8")
                specs = [key.weight_specs(stage.layers) for stage in model.stages]
                need = max(weights_mod.spec_bytes(weights_mod.quantized_part(s)) for s in specs)
                available = self.planner.available_bytes()
                held = self.planner.stage_need(model.params, model.dtype).total(1)
                if available is not None and held + need > available:
                    raise FieldError("screen", f"its e4m3 weights need {format_size(need)} more on each device "
                                               f"beside the {format_size(held)} the search holds; "
                                               f"{format_size(available)} available")
                t0 = time.perf_counter()
                made = []
                for stage, weights, spec in zip(model.stages, model.weights, specs):
                    shardings = jax.tree.map(lambda t, stage=stage: stage.sharding(t.axes),
                                             weights_mod.quantized_part(spec))
                    products = jax.block_until_ready(weights_mod.quantized_products(weights, shardings))
                    made.append(weights_mod.with_products(weights, products))
                model.screen_weights = made
                log.info("quantized the weights to e4m3 for the screen in %.2f s (%s a device)",
                         time.perf_counter() - t0, format_size(need))
            return model.screen_weights

    # Compiled steps --------------------------------------------------------------------------

    def step_key(self, params: Params, dtype: str, batch: int, products: str = "exact") -> StepKey:
        placement = self.placement(params, dtype)
        c = self.config
        return StepKey(params, dtype, batch, placement.n_groups, placement.group_size, c.draws,
                       c.attention_for(dtype), c.ffn, c.layout, products)

    def compiled_step(self, params: Params, dtype: str, batch: int, products: str = "exact") -> PipelinedStep:
        """The step for (params, dtype, batch) on these devices, compiled once and kept; with `products`
        "fp8", a screen's step, which takes screen_weights."""
        key = self.step_key(params, dtype, batch, products)
        step = self.steps.get(key)
        if step is None:
            self.check_fits(params, dtype, batch)
            step, compiled = self.steps.get_or_compile(key, self.placement(params, dtype))
            if compiled:
                log.info("compiled step (batch %d × %d group(s) of %d device(s), %s, %s draws, %s attention, %s ffn,"
                         " %s products) in %.2f s", batch, key.groups, key.group_size, dtype, key.draws, key.attention,
                         key.ffn, products, step.compile_seconds)
        return step

    def is_compiled(self, params: Params, dtype: str, batch: int) -> bool:
        try:
            return self.steps.get(self.step_key(params, dtype, batch)) is not None
        except FieldError:  # a set that cannot fit has no step
            return False

    def compiled_keys(self) -> list[dict]:
        return [key.describe() for key in self.steps.keys()]

    # Work ------------------------------------------------------------------------------------

    def search(self, job: SearchJob, stop: threading.Event | None = None, batch: int | None = None,
               on_ready: Callable[[LoadedModel, int, float], None] | None = None, products: str = "exact",
               fit_batch: bool = True) -> Iterator[StepResult]:
        """Run the schedule step by step, yielding each step's distances as soon as it finishes.

        Stops at the end of the schedule, after `duration_s`, or within one step of `stop` being
        set; every step already dispatched is still collected and yielded. An out-of-memory at a
        batch size retreats to half the size and redoes the lost steps. Any other failure ends the
        search with that exception, once every step it had collected has been yielded. With
        `products` "fp8" the distances are a screen's (screen.py), never to be reported. Without
        `fit_batch`, `batch` is run as given (one that a search ran), however few the job's nonces.
        """
        stop = stop or threading.Event()
        if stop.is_set():
            return
        model = self.load(job.params, job.block_hash, job.dtype)
        weights = self.screen_weights(model) if products == "fp8" else model.weights
        batch = batch or self.batches.default(job.params, job.dtype)
        if fit_batch:
            batch = self.batches.fit(job, batch, model.placement.n_groups)
        if stop.is_set():  # stopped while the weights were built: no compilation for nothing
            return
        deadline = None if job.duration_s is None else time.monotonic() + job.duration_s
        flat_next, step_no = 0, 0  # the first flat index and step not yet yielded
        while True:
            try:
                step_fn = self.compiled_step(job.params, job.dtype, batch, products)
                if on_ready:  # weights built, step compiled: (model, batch, compile seconds)
                    on_ready(model, batch, step_fn.compile_seconds)
                    on_ready = None
                for result in self._run_steps(job, model, weights, step_fn, batch, flat_next, step_no, stop, deadline):
                    flat_next, step_no = result.flat_start + result.computed, result.step + 1
                    yield result
                return
            except Exception as e:  # noqa: BLE001 — only out-of-memory is retried
                if not is_out_of_memory(e) or batch == 1:
                    raise
                log.warning("out of memory at batch %d; retrying at %d", batch, batch // 2)
                self.steps.discard(self.step_key(job.params, job.dtype, batch, products))
                batch //= 2

    def _run_steps(self, job, model: LoadedModel, weights: list[dict], step_fn: PipelinedStep, batch: int,
                   flat_start: int, step_no: int, stop: threading.Event, deadline: float | None
                   ) -> Iterator[StepResult]:
        """Dispatch prepared steps while up to one per stage and one more are in flight; collect the oldest."""
        feeder = StepFeeder(self.drawer, self.draws_mode, model.stages, job, batch, flat_start, step_no)
        prepared = iter(feeder)
        depth = len(model.stages) + 1
        in_flight: collections.deque = collections.deque()
        failure: BaseException | None = None  # a draw's failure: raised once the steps in flight are out
        drained = False  # the schedule has no step left
        try:
            while True:
                item = None
                if not (drained or failure or stop.is_set() or deadline is not None and time.monotonic() >= deadline):
                    try:
                        item, waited = next(prepared)
                    except StopIteration:
                        drained = True
                    except Exception as e:  # noqa: BLE001
                        failure = e
                if item is not None:
                    t0 = time.perf_counter()
                    dist = step_fn(weights, item.inputs, item.permutations, model.target)
                    in_flight.append((item, dist, t0, waited))
                if in_flight and (item is None or len(in_flight) >= depth):
                    done, dist, t0, waited = in_flight.popleft()
                    host_dist = np.asarray(dist)
                    self.steps_completed += 1
                    groups = [GroupResult(g, nonces, host_dist[g * batch: g * batch + len(nonces)])
                              for g, nonces in enumerate(done.per_group)]
                    yield StepResult(done.step, done.flat_start, batch, groups, done.draw_seconds, waited,
                                     time.perf_counter() - t0)
                if item is None and not in_flight:
                    if failure is not None:
                        raise failure
                    return
        finally:
            feeder.close()

    def distances(self, params: Params, block_hash: str, public_key: str, nonces: Sequence[int],
                  dtype: str = "float16", batch: int | None = None, on_step: Callable[[int], None] | None = None,
                  fit_batch: bool = True) -> np.ndarray:
        """Distances of the given nonces, in the order given; `on_step(n)` after each step of n. Without
        `fit_batch`, in steps of `batch` however few the nonces: the step a search of that batch runs,
        so the distances are bit for bit that search's."""
        job = SearchJob(params, block_hash, public_key, r_target=0.0, schedule=NonceSchedule.of(nonces), dtype=dtype)
        out = np.empty(len(nonces), dtype=np.float32)
        offset = 0
        for result in self.search(job, batch=batch, fit_batch=fit_batch):
            # Group g of a step holds flat offsets g, g + G, …: put them back in flat order.
            n, n_groups = result.computed, len(result.groups)
            for g in result.groups:
                out[offset + g.group: offset + n: n_groups] = g.dist
            offset += n
            if on_step:
                on_step(n)
        return out

    def close(self):
        self.drawer.close()
