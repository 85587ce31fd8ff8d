"""The engine: owns the devices, the weights, the compiled steps, batching and pipelining.

One engine drives every visible device. Weights are replicated; each device is one nonce group
(nonces.py). A step is one jitted `shard_map` over a 1-D mesh: inputs (or their generator states)
and permutations in, one float32 distance per nonce out. While the devices run step k, a producer
thread draws and transfers step k+1; the host waits on the devices only to collect finished
distances.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import batch_choice, device_draws, draws, gated_ffn, weights as weights_mod
from .distance import distances as distances_on_device, split_target
from .fields import FieldError
from .job import GroupResult, SearchJob, StepResult
from .memory import GiB, MemoryNeed, device_free_bytes
from .model import FFN_IMPLEMENTATIONS, Block, forward_fn, rope_tables
from .nonces import NonceSchedule, device_major
from .params import Params
from .weights import WeightLayout

log = logging.getLogger("jaxbench.engine")

AXIS = "d"
DEFAULT_CACHE_DIR = Path(os.environ.get("JAXBENCH_CACHE_DIR", Path.home() / ".cache" / "jaxbench" / "xla"))
MAX_BATCH = 256
CPU_BATCH = 8  # the CPU backend gains nothing from larger steps
MAX_COMPILED_STEPS = 16  # executables kept; the least recently used goes first (each parameter set has its own)


def enable_compile_cache(directory: str | os.PathLike | None = DEFAULT_CACHE_DIR) -> None:
    """Persist compiled executables across processes (a restarted server does not recompile)."""
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


@dataclasses.dataclass
class LoadedModel:
    params: Params
    block_hash: str
    dtype: str
    weights: dict
    target: jax.Array
    build_seconds: float


@dataclasses.dataclass
class _Prepared:
    step: int
    flat_start: int
    per_group: list[list[int]]
    inputs: jax.Array
    permutations: jax.Array
    draw_seconds: float


class Engine:
    def __init__(
        self,
        devices: Sequence[jax.Device] | int | None = None,
        draws_mode: str = "auto",
        compile_cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        host_threads: int | None = None,
        attention: str | None = None,
        ffn: str | None = None,
        group_size: int | None = None,
        device_memory: int | None = None,
    ):
        all_devices = jax.devices()
        if devices is None:
            devices = all_devices
        elif isinstance(devices, int):
            if not 1 <= devices <= len(all_devices):
                raise ValueError(f"devices must be in [1, {len(all_devices)}], got {devices}")
            devices = all_devices[:devices]
        self.devices = list(devices)
        self.group_size = group_size or 1  # devices holding one replica of the weights
        self.device_memory = device_memory  # bytes each device may use; None: what it reports
        self.mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P(AXIS))
        if draws_mode == "auto":
            draws_mode = "device" if self.platform == "gpu" else "host"
        if draws_mode not in ("host", "device"):
            raise ValueError(f"draws must be 'host', 'device' or 'auto', got {draws_mode!r}")
        self.draws_mode = draws_mode
        # The fused cuDNN attention on GPUs; the reference's step-by-step rounding elsewhere.
        self.attention = attention or os.environ.get("JAXBENCH_ATTENTION") or (
            "cudnn" if self.platform == "gpu" else "xla")
        # The gated FFN as one Pallas kernel on Hopper (its weights interleaved); XLA's products elsewhere.
        ffn = ffn or os.environ.get("JAXBENCH_FFN") or ("pallas" if gated_ffn.on_hopper(self.devices[0]) else "xla")
        if ffn not in FFN_IMPLEMENTATIONS:
            raise ValueError(f"ffn must be one of {', '.join(FFN_IMPLEMENTATIONS)}, got {ffn!r}")
        if ffn == "pallas" and not gated_ffn.on_hopper(self.devices[0]):
            raise ValueError(f"the pallas FFN kernel needs a Hopper GPU, not {self.devices[0].device_kind}")
        self.ffn = ffn
        self.layout = WeightLayout(gate_up_block=gated_ffn.DEFAULT_CONFIG.block if ffn == "pallas" else None)
        enable_compile_cache(compile_cache_dir)
        self.batch_record = batch_choice.BatchRecord(
            Path(compile_cache_dir).parent / batch_choice.RECORD_NAME if compile_cache_dir else None)
        self._sweep_lock = threading.Lock()
        self.drawer = draws.HostDrawer(host_threads)
        self._model: LoadedModel | None = None
        self._steps: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()  # least recent first
        self._compile_seconds: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()  # one compilation at a time
        self._steps_lock = threading.Lock()  # held only to read or change the dict of steps
        self.steps_completed = 0  # grows with every collected step; lets callers see the engine move

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def n_groups(self) -> int:
        return len(self.devices)

    def describe(self) -> list[dict]:
        return [{"id": d.id, "kind": d.device_kind, "platform": d.platform} for d in self.devices]

    def compiled_keys(self) -> list[dict]:
        with self._steps_lock:
            keys = list(self._steps)
        return [
            {"params": k[0].to_dict(), "dtype": k[1], "batch": k[2], "devices": k[3], "draws": k[4], "attention": k[5],
             "ffn": k[6]}
            for k in keys
        ]

    # Weights ---------------------------------------------------------------------------------

    def load(self, params: Params, block_hash: str, dtype: str) -> LoadedModel:
        """Weights and target on every device, kept while the block hash, params and dtype stay."""
        with self._lock:
            m = self._model
            if m and (m.params, m.block_hash, m.dtype) == (params, block_hash, dtype):
                return m
            self.check_fits(params, dtype)
            self._model = None  # free the old weights before building new ones
            t0 = time.perf_counter()
            pool = weights_mod.pool_on_device(block_hash, params, dtype, self.replicated,
                                              drawn_on_device=self.draws_mode == "device")
            built = weights_mod.build_weights(pool, params, block_hash, self.layout)
            del pool
            built = jax.block_until_ready(built)
            target = jax.device_put(split_target(draws.draw_target(block_hash, params.vocab_size)), self.replicated)
            self._model = LoadedModel(params, block_hash, dtype, built, target, time.perf_counter() - t0)
            log.info("built weights for %s… (%s, %s) in %.2f s", block_hash[:16], dtype,
                     _short(params), self._model.build_seconds)
            return self._model

    # Compiled steps --------------------------------------------------------------------------

    def attention_for(self, dtype: str) -> str:
        return "xla" if dtype == "float32" else self.attention

    def _build_step(self, params: Params, dtype: str) -> Callable:
        forward = forward_fn(params, dtype, self.attention_for(dtype), self.layout, self.ffn)
        if self.draws_mode == "device":
            make_inputs = device_draws.make_input_drawer(params.seq_len, params.dim, dtype)
        else:
            make_inputs = lambda x: x

        def per_device(w, inputs, permutations, target):
            return distances_on_device(forward(w, make_inputs(inputs)), permutations, target)

        return jax.jit(
            jax.shard_map(
                per_device, mesh=self.mesh,
                in_specs=(P(), P(AXIS), P(AXIS), P()), out_specs=P(AXIS), check_vma=False,
            )
        )

    def _step_key(self, params: Params, dtype: str, batch: int) -> tuple:
        return (params, dtype, batch, len(self.devices), self.draws_mode, self.attention_for(dtype), self.ffn,
                self.layout)

    def _abstract_arguments(self, params: Params, dtype: str, batch: int) -> tuple:
        """Shapes, dtypes and shardings of a step's arguments: enough to compile before any weights exist."""
        g = self.n_groups
        pool = jax.ShapeDtypeStruct((params.pool_size,), weights_mod.JNP_DTYPES[dtype])
        weights = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated),
            jax.eval_shape(lambda p: weights_mod.build_weights(p, params, "shape", self.layout), pool),
        )
        if self.draws_mode == "device":
            inputs = jax.ShapeDtypeStruct((g * batch, *device_draws.STATE_SHAPE), jnp.uint32, sharding=self.split)
        else:
            inputs = jax.ShapeDtypeStruct(
                (g * batch, params.seq_len, params.dim), weights_mod.JNP_DTYPES[dtype], sharding=self.split
            )
        perms = jax.ShapeDtypeStruct((g * batch, params.vocab_size), jnp.int32, sharding=self.split)
        target = jax.ShapeDtypeStruct((2, params.vocab_size), jnp.float32, sharding=self.replicated)
        return weights, inputs, perms, target

    def compiled_step(self, params: Params, dtype: str, batch: int) -> Callable:
        """The step for (params, dtype, batch) on these devices, compiled once and kept."""
        key = self._step_key(params, dtype, batch)
        with self._compile_lock:
            with self._steps_lock:
                if key in self._steps:
                    self._steps.move_to_end(key)
                    return self._steps[key]
            self.check_fits(params, dtype, batch)
            t0 = time.perf_counter()
            compiled = self._build_step(params, dtype).lower(*self._abstract_arguments(params, dtype, batch)).compile()
            self._compile_seconds[key] = time.perf_counter() - t0
            log.info("compiled step (batch %d × %d devices, %s, %s draws, %s attention, %s ffn) in %.2f s", batch,
                     self.n_groups, dtype, self.draws_mode, self.attention_for(dtype), self.ffn,
                     self._compile_seconds[key])
            with self._steps_lock:
                self._steps[key] = compiled
                while len(self._steps) > MAX_COMPILED_STEPS:
                    evicted, _ = self._steps.popitem(last=False)
                    self._compile_seconds.pop(evicted, None)
            return compiled

    def compile_seconds(self, params: Params, dtype: str, batch: int) -> float:
        return self._compile_seconds.get(self._step_key(params, dtype, batch), 0.0)

    # Memory and batch size -------------------------------------------------------------------

    def available_bytes(self) -> int | None:
        """What each device could give a parameter set: its free memory plus the weights now loaded,
        which go before any other set's are built. None where the device does not say."""
        free = [device_free_bytes(d) for d in self.devices]
        if self.device_memory is not None:
            free = [self.device_memory if f is None else min(f, self.device_memory) for f in free]
        if any(f is None for f in free):
            return None
        m = self._model
        held = MemoryNeed.of(m.params, m.dtype).weights if m is not None else 0
        return min(free) + held

    def check_fits(self, params: Params, dtype: str, batch: int = 1) -> None:
        """Refuse (FieldError on `params`) a set whose weights and `batch` nonces of one step cannot fit."""
        need = MemoryNeed.of(params, dtype)
        available = self.available_bytes()
        if available is not None and need.total(batch) > available:
            raise FieldError("params", f"needs {need.describe(batch)}; each {self.platform} device has "
                                       f"{available / GiB:.2f} GiB available")

    def max_batch(self, params: Params, dtype: str) -> int | None:
        """The largest per-device batch whose activations fit beside the weights (None: unknown)."""
        available = self.available_bytes()
        if available is None:
            return None
        need = MemoryNeed.of(params, dtype)
        return max(1, int((available - need.weights) // need.per_nonce))

    def memory_batch(self, params: Params, dtype: str) -> int:
        """The largest batch worth considering: 80 % of what fits in memory, at most MAX_BATCH
        (CPU_BATCH on the CPU)."""
        fits = self.max_batch(params, dtype)
        if self.platform == "cpu":
            return min(CPU_BATCH, fits or CPU_BATCH)
        if fits is None:
            return 32
        batch = int(0.8 * fits)
        if batch >= 16:
            batch -= batch % 8
        return int(max(1, min(MAX_BATCH, batch)))

    def default_batch(self, params: Params, dtype: str) -> int:
        """The per-device batch: on GPUs the fastest measured (batch_choice.py: a short sweep the first
        time this configuration is seen, then the record on disk); on the CPU `memory_batch`."""
        limit = self.memory_batch(params, dtype)
        if self.platform == "cpu":
            return limit
        entry = self.batch_choice(params, dtype, sweep=True)
        return min(entry["batch"], limit) if entry else limit

    def batch_choice(self, params: Params, dtype: str, sweep: bool = False) -> dict | None:
        """The recorded choice for this configuration, swept first if asked and none is recorded."""
        key = self._batch_key(params, dtype)
        entry = self.batch_record.get(key)
        if entry is not None or not sweep:
            return entry
        with self._sweep_lock:
            entry = self.batch_record.get(key)
            if entry is None:
                entry = self.sweep_batch(params, dtype)
                self.batch_record.put(key, entry)
        return entry

    def _batch_key(self, params: Params, dtype: str) -> str:
        return batch_choice.configuration_key(
            params, dtype, self.devices[0].device_kind, self.n_groups, draws=self.draws_mode,
            attention=self.attention_for(dtype), ffn=self.ffn, layout=self.layout)

    def sweep_batch(self, params: Params, dtype: str, candidates: Sequence[int] | None = None) -> dict:
        """Time one block at each candidate batch up to `memory_batch`; the entry batch_choice records."""
        limit = self.memory_batch(params, dtype)
        candidates = [b for b in (candidates or batch_choice.CANDIDATES) if b <= limit] or [limit]
        abstract_weights = self._abstract_arguments(params, dtype, 1)[0]
        cos, sin = rope_tables(params, weights_mod.JNP_DTYPES[dtype])
        attention = self.attention_for(dtype)

        def one_block(w, x):
            return Block(w, params, attention, self.layout, self.ffn)(x, cos, sin)

        timer = batch_choice.block_timer(one_block, abstract_weights["layers"], params,
                                         weights_mod.JNP_DTYPES[dtype], self.devices[0])
        entry = batch_choice.sweep(timer, candidates)
        log.info("batch %d chosen for %s (%s) by a %.1f s sweep: %s", entry["batch"], _short(params), dtype,
                 entry["sweep_seconds"], entry["block_nonces_per_s"])
        return entry

    def fit_batch(self, job: SearchJob, batch: int) -> int:
        """`batch` bounded by the work the job asks for and by memory, saying so when it shrinks."""
        bounded = batch
        if job.schedule.count is not None:
            bounded = min(bounded, max(1, -(-job.schedule.count // self.n_groups)))
        fits = self.max_batch(job.params, job.dtype)
        if fits is not None:
            bounded = min(bounded, fits)
        if bounded < batch:
            log.info("batch %d lowered to %d (the job's %s nonces, memory for %s a device)", batch, bounded,
                     job.schedule.count, fits)
        return bounded

    # Work ------------------------------------------------------------------------------------

    def prepare_step(self, job: SearchJob, step: int, flat_start: int, batch: int) -> _Prepared | None:
        nonces = job.schedule.take(flat_start, batch * self.n_groups)
        if not nonces:
            return None
        t0 = time.perf_counter()
        rows, per_group = device_major(nonces, self.n_groups, batch)
        if self.draws_mode == "device":
            host_inputs = device_draws.initial_states(job.block_hash, job.public_key, rows)
        else:
            host_inputs = self.drawer.inputs(job.block_hash, job.public_key, rows, job.params, job.dtype)
        perms = self.drawer.permutations(job.block_hash, job.public_key, rows, job.params.vocab_size)
        inputs = jax.device_put(host_inputs, self.split)
        permutations = jax.device_put(perms, self.split)
        return _Prepared(step, flat_start, per_group, inputs, permutations, time.perf_counter() - t0)

    def search(
        self, job: SearchJob, stop: threading.Event | None = None, batch: int | None = None,
        on_ready: Callable[[LoadedModel, int, float], None] | None = None,
    ) -> Iterator[StepResult]:
        """Run the schedule step by step, yielding each step's distances as soon as it finishes.

        Stops at the end of the schedule, after `duration_s`, or within one step of `stop` being
        set; every step already dispatched is still collected and yielded. An out-of-memory at a
        batch size retreats to half the size and redoes the lost steps.
        """
        stop = stop or threading.Event()
        if stop.is_set():
            return
        model = self.load(job.params, job.block_hash, job.dtype)
        batch = self.fit_batch(job, batch or self.default_batch(job.params, job.dtype))
        if stop.is_set():  # stopped while the weights were built: no compilation for nothing
            return
        deadline = None if job.duration_s is None else time.monotonic() + job.duration_s
        flat_next = 0  # first flat index not yet yielded
        step_no = 0
        while True:
            try:
                step_fn = self.compiled_step(job.params, job.dtype, batch)
                if on_ready:  # weights built, step compiled: (model, batch, compile seconds)
                    on_ready(model, batch, self.compile_seconds(job.params, job.dtype, batch))
                    on_ready = None
                for result, flat_done in self._pipeline(job, model, step_fn, batch, flat_next, step_no, stop, deadline):
                    flat_next = flat_done
                    step_no = result.step + 1
                    yield result
                return
            except Exception as e:  # noqa: BLE001 — only out-of-memory is retried
                if not is_out_of_memory(e) or batch == 1:
                    raise
                log.warning("out of memory at batch %d; retrying at %d", batch, batch // 2)
                with self._steps_lock:
                    self._steps.pop(self._step_key(job.params, job.dtype, batch), None)
                batch //= 2

    def _pipeline(self, job, model, step_fn, batch, flat_start, step_no, stop, deadline):
        prepared: queue.Queue = queue.Queue(maxsize=2)
        producer_stop = threading.Event()
        per_step = batch * self.n_groups

        def offer(item) -> None:
            while not producer_stop.is_set():
                try:
                    prepared.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce():
            flat, k = flat_start, step_no
            try:
                while not producer_stop.is_set():
                    item = self.prepare_step(job, k, flat, batch)
                    offer(item)
                    if item is None:
                        return
                    flat, k = flat + per_step, k + 1
            except BaseException as e:  # noqa: BLE001 — handed to the consumer
                offer(e)

        producer = threading.Thread(target=produce, name="jaxbench-draw", daemon=True)
        producer.start()
        in_flight: list[tuple[_Prepared, jax.Array, float, float]] = []
        failure: BaseException | None = None  # a draw failure: raised once the steps in flight are out
        try:
            while True:
                finished = failure is not None or stop.is_set() or (
                    deadline is not None and time.monotonic() >= deadline)
                waited = time.perf_counter()
                item = None if finished else prepared.get()
                waited = time.perf_counter() - waited
                if isinstance(item, BaseException):
                    failure, item = item, None
                if item is not None:
                    t0 = time.perf_counter()
                    dist = step_fn(model.weights, item.inputs, item.permutations, model.target)
                    in_flight.append((item, dist, t0, waited))
                if in_flight and (item is None or len(in_flight) > 1):
                    done, dist, t0, waited = in_flight.pop(0)
                    host_dist = np.asarray(dist)
                    self.steps_completed += 1
                    groups = [
                        GroupResult(g, nonces, host_dist[g * batch : g * batch + len(nonces)])
                        for g, nonces in enumerate(done.per_group)
                    ]
                    result = StepResult(done.step, done.flat_start, batch, groups, done.draw_seconds, waited,
                                        time.perf_counter() - t0)
                    yield result, done.flat_start + result.computed
                if item is None and not in_flight:
                    if failure is not None:
                        raise failure
                    return
        finally:
            producer_stop.set()
            producer.join(timeout=30)

    def distances(
        self, params: Params, block_hash: str, public_key: str, nonces: Sequence[int], dtype: str = "float16",
        batch: int | None = None, on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Distances of the given nonces, in the order given; `on_step(n)` after each step of n."""
        job = SearchJob(params, block_hash, public_key, r_target=0.0, schedule=NonceSchedule.of(nonces), dtype=dtype)
        out = np.empty(len(nonces), dtype=np.float32)
        offset = 0
        for result in self.search(job, batch=batch):
            # Group g of a step holds flat offsets g, g + G, …: put them back in flat order.
            n = result.computed
            for g in result.groups:
                out[offset + g.group : offset + n : self.n_groups] = g.dist
            offset += n
            if on_step:
                on_step(n)
        return out

    def close(self):
        self.drawer.close()


def _short(params: Params) -> str:
    return f"dim {params.dim}, {params.n_layers} layers, seq {params.seq_len}, vocab {params.vocab_size}"
