"""What a job's driver works with, built once per app (app.py `create_app`) and handed to every
driver and route explicitly: the engine, the settings, the client of every call to a peer, and the
batch plan.

`BatchPlan` chooses the per-device batch once per (params, dtype), so a warmup's compilation and
the searches that follow use the same compiled step; a search that retreated after an
out-of-memory leaves its smaller batch for the next. `prepare` compiles that step and, when the
block hash is known, builds the weights (both kept by the engine). Its methods run in a job's
worker threads (device work), never on the event loop.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx

from jaxbench.engine import Engine
from jaxbench.params import Params

from .config import Settings


class BatchPlan:
    def __init__(self, engine: Engine, batch: int | None):
        self.engine = engine
        self.batch = batch  # MODEL_BATCH: asked for, never more than fits beside the weights
        self._lock = threading.Lock()
        self._batches: dict[tuple[Params, str], int] = {}

    def batch_for(self, params: Params, dtype: str) -> int:
        with self._lock:
            key = (params, dtype)
            if key not in self._batches:
                if self.batch:
                    self._batches[key] = min(self.batch, self.engine.batches.max_batch(params, dtype) or self.batch)
                else:
                    self._batches[key] = self.engine.batches.default(params, dtype)
            return self._batches[key]

    def remember(self, params: Params, dtype: str, batch: int) -> None:
        with self._lock:
            self._batches[(params, dtype)] = batch

    def prepare(self, params: Params, block_hash: str | None, dtype: str) -> dict:
        """The step compiled and, when the block hash is known, the weights built; what the
        `compiled` and `model_loaded` lines report."""
        t0 = time.perf_counter()
        batch = self.batch_for(params, dtype)
        was_compiled = self.engine.is_compiled(params, dtype, batch)
        key = self.engine.compiled_step(params, dtype, batch).key
        if block_hash is not None:
            self.engine.load(params, block_hash, dtype)
        return {"seconds": round(time.perf_counter() - t0, 3), "batch": batch, "cached": was_compiled,
                "devices": key.groups * key.group_size, "groups": key.groups, "group_size": key.group_size}


@dataclasses.dataclass(frozen=True)
class Context:
    engine: Engine
    settings: Settings
    http: httpx.AsyncClient  # every call to a peer (service/peers.py), opened and closed with the app
    batches: BatchPlan
