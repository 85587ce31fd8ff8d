"""The batch of a step (nonces per group), chosen by measurement and remembered on disk beside the
compile cache, within what memory and the job allow.

The fastest batch is not the largest that fits: the matrix units' efficiency moves with the shapes
of the products, which the batch sets. The first time a configuration is seen (parameters, dtype,
device kind and count, draws, attention, FFN path, weight layout, JAX version), a short sweep times
one transformer block — random weights of the model's scale, the step's own attention and FFN
paths — at each candidate batch that fits in memory, and keeps the one with the most nonces per
second (the smaller one when two are within 1 %). A block is where nearly all of a step's time goes,
and it compiles in seconds where the whole step takes longer, so the sweep stays short. The choice
goes into a JSON record that every later engine reads (the CLI, the model server, the notebooks).

`BatchPolicy` is the engine's whole rule: the largest batch memory allows beside the weights of a
device's stage (on the CPU at most CPU_BATCH), the measured choice under it on GPUs, and the bound
of the work a job asks for.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from .job import SearchJob
from .memory import MemoryNeed
from .params import Params

log = logging.getLogger("jaxbench.batch")

CANDIDATES = (32, 64, 128, 256)  # MAX_BATCH bounds them
MAX_BATCH = 256
CPU_BATCH = 8  # the CPU backend gains nothing from larger steps
RECORD_NAME = "batch-choices.json"
WITHIN = 0.01  # a smaller batch within 1 % of the fastest wins


class BatchRecord:
    """A JSON file of {configuration key: choice}; None keeps the choices in memory only."""

    def __init__(self, path: Path | None):
        self.path = path
        self._memory: dict[str, dict] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict]:
        if self.path is None:
            return self._memory
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._read().get(key)
        return entry if isinstance(entry, dict) and isinstance(entry.get("batch"), int) else None

    def put(self, key: str, entry: dict) -> None:
        with self._lock:
            data = self._read()
            data[key] = entry
            if self.path is None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(f.name, self.path)
            except OSError as e:
                log.warning("could not save the batch choice to %s: %s", self.path, e)


def configuration_key(params: Params, dtype: str, device_kind: str, devices: int, **shape_of_step) -> str:
    return json.dumps({"params": params.to_dict(), "dtype": dtype, "device_kind": device_kind, "devices": devices,
                       "jax": jax.__version__, **{k: str(v) for k, v in shape_of_step.items()}}, sort_keys=True)


def sweep(seconds_per_nonce: Callable[[int], float], candidates: list[int]) -> dict:
    """Time each candidate; the entry to record: the chosen batch and what each candidate gave."""
    t0 = time.perf_counter()
    rates: dict[int, float] = {}
    for batch in candidates:
        rates[batch] = 1.0 / seconds_per_nonce(batch)
        log.info("batch sweep: %d → %.1f nonces/s in one block", batch, rates[batch])
    best = max(rates.values())
    chosen = min(b for b, r in rates.items() if r >= (1 - WITHIN) * best)
    return {
        "batch": chosen,
        "block_nonces_per_s": {str(b): round(r, 2) for b, r in rates.items()},
        "sweep_seconds": round(time.perf_counter() - t0, 2),
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def block_timer(block_fn: Callable, layer_shapes: dict, params: Params, dtype, device: jax.Device,
                min_seconds: float = 0.2) -> Callable[[int], float]:
    """seconds_per_nonce(batch) for `block_fn(weights, x)`, one layer's weights drawn at random."""
    keys = jax.random.split(jax.random.key(0), len(layer_shapes) + 1)
    weights = {
        name: jax.device_put((0.02 * jax.random.normal(k, shape.shape[1:], jnp.float32)).astype(dtype), device)
        for k, (name, shape) in zip(keys, sorted(layer_shapes.items()))
    }
    run = jax.jit(block_fn)

    def seconds_per_nonce(batch: int) -> float:
        x = jax.device_put(jax.random.normal(keys[-1], (batch, params.seq_len, params.dim), jnp.float32)
                           .astype(dtype), device)
        run(weights, x).block_until_ready()
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < min_seconds:
            run(weights, x).block_until_ready()
            reps += 1
        return (time.perf_counter() - t0) / (reps * batch)

    return seconds_per_nonce


class BatchPolicy:
    """The batch rule of one engine, which it asks for memory (its planner), its configuration (the
    record's key, the sweep's block) and its first device (where the sweep runs)."""

    def __init__(self, engine, record: BatchRecord):
        self.engine = engine
        self.record = record
        self._sweep_lock = threading.Lock()

    def max_batch(self, params: Params, dtype: str) -> int | None:
        """The largest batch whose activations fit beside a device's weights (None: unknown)."""
        available = self.engine.planner.available_bytes()
        if available is None:
            return None
        need: MemoryNeed = self.engine.planner.stage_need(params, dtype)
        return max(1, int((available - need.weights) // need.per_nonce))

    def memory_batch(self, params: Params, dtype: str) -> int:
        """The largest batch worth considering: 80 % of what fits in memory, at most MAX_BATCH
        (CPU_BATCH on the CPU)."""
        fits = self.max_batch(params, dtype)
        if self.engine.platform == "cpu":
            return min(CPU_BATCH, fits or CPU_BATCH)
        if fits is None:
            return 32
        batch = int(0.8 * fits)
        if batch >= 16:
            batch -= batch % 8
        return int(max(1, min(MAX_BATCH, batch)))

    def default(self, params: Params, dtype: str) -> int:
        """On GPUs the fastest measured (a short sweep the first time this configuration is seen, then
        the record on disk); on the CPU `memory_batch`."""
        limit = self.memory_batch(params, dtype)
        if self.engine.platform == "cpu":
            return limit
        entry = self.choice(params, dtype, sweep=True)
        return min(entry["batch"], limit) if entry else limit

    def choice(self, params: Params, dtype: str, sweep: bool = False) -> dict | None:
        """The recorded choice for this configuration, swept first if asked and none is recorded."""
        key = self.key(params, dtype)
        entry = self.record.get(key)
        if entry is not None or not sweep:
            return entry
        with self._sweep_lock:
            entry = self.record.get(key)
            if entry is None:
                entry = self.sweep(params, dtype)
                self.record.put(key, entry)
        return entry

    def sweep(self, params: Params, dtype: str, candidates: list[int] | None = None) -> dict:
        """Time one block at each candidate batch up to `memory_batch`; the entry `choice` records."""
        limit = self.memory_batch(params, dtype)
        candidates = [b for b in (candidates or CANDIDATES) if b <= limit] or [limit]
        entry = sweep(self.block_timer(params, dtype), candidates)
        log.info("batch %d chosen for %s (%s) by a %.1f s sweep: %s", entry["batch"], params.describe(), dtype,
                 entry["sweep_seconds"], entry["block_nonces_per_s"])
        return entry

    def key(self, params: Params, dtype: str) -> str:
        """The configuration a choice is recorded under."""
        placement, c = self.engine.placement(params, dtype), self.engine.config
        return configuration_key(params, dtype, self.engine.devices[0].device_kind, placement.n_groups,
                                 group_size=placement.group_size, draws=c.draws, attention=c.attention_for(dtype),
                                 ffn=c.ffn, layout=c.layout)

    def block_timer(self, params: Params, dtype: str) -> Callable[[int], float]:
        """Seconds a nonce of one full-sequence block takes at a batch, on the first device."""
        from .model import Block, ModelConfig, rope_tables
        from .weights import weight_specs

        c = self.engine.config
        config = ModelConfig(params, dtype, c.attention_for(dtype), c.ffn, c.layout)
        cos, sin = rope_tables(params, config.jnp_dtype)
        return block_timer(lambda w, x: Block(w, config)(x, cos, sin), weight_specs(params, dtype, c.layout)["blocks"],
                           params, config.jnp_dtype, self.engine.devices[0])

    def fit(self, job: SearchJob, batch: int, n_groups: int) -> int:
        """`batch` bounded by the work the job asks for and by memory, saying so when it shrinks."""
        bounded = batch
        if job.schedule.count is not None:
            bounded = min(bounded, max(1, -(-job.schedule.count // n_groups)))
        fits = self.max_batch(job.params, job.dtype)
        if fits is not None:
            bounded = min(bounded, fits)
        if bounded < batch:
            log.info("batch %d lowered to %d (the job's %s nonces, memory for %s a device)", batch, bounded,
                     job.schedule.count, fits)
        return bounded
