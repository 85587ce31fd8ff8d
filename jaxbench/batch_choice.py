"""The per-device batch, chosen by measurement and remembered on disk beside the compile cache.

The fastest batch is not the largest that fits: the matrix units' efficiency moves with the shapes
of the products, which the batch sets. The first time a configuration is seen (parameters, dtype,
device kind and count, draws, attention, FFN path, weight layout, JAX version), a short sweep times
one transformer block — random weights of the model's scale, the step's own attention and FFN
paths — at each candidate batch that fits in memory, and keeps the one with the most nonces per
second (the smaller one when two are within 1 %). A block is where nearly all of a step's time goes,
and it compiles in seconds where the whole step takes longer, so the sweep stays short. The choice
goes into a JSON record that every later engine reads (the CLI, the model server, the notebooks).
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

from .params import Params

log = logging.getLogger("jaxbench.batch")

CANDIDATES = (32, 64, 128, 256)  # engine.MAX_BATCH bounds them
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
