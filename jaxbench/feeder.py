"""The host side of a search: each step's nonces drawn and placed on the devices ahead of time.

A step takes the next G×B nonces of the job's schedule (nonces.py lays them out group by group). On
the host it draws, per nonce, either the whole input (host draws) or only its generator's state
(device draws), and the permutation; then it puts the inputs on the first stage's devices and the
permutations on the last stage's. `StepFeeder` does this on a thread of its own ("jaxbench-draw"),
a few steps ahead of the devices, so that the devices wait for the host only when drawing is slower
than computing.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Iterator

import jax

from . import device_draws
from .draws import HostDrawer
from .job import SearchJob
from .nonces import device_major
from .placement import Stage
from .steps import PERMUTATION_AXES, input_axes

READY_STEPS = 2  # steps drawn ahead of the devices


@dataclasses.dataclass
class PreparedStep:
    step: int
    flat_start: int
    per_group: list[list[int]]  # each group's real nonces
    inputs: jax.Array
    permutations: jax.Array
    draw_seconds: float


def prepare_step(drawer: HostDrawer, draws: str, stages: list[Stage], job: SearchJob, step: int, flat_start: int,
                 batch: int) -> PreparedStep | None:
    """Step `step`'s inputs and permutations on the devices; None past the end of the schedule."""
    n_groups = len(stages[0].mesh.devices)
    nonces = job.schedule.take(flat_start, batch * n_groups)
    if not nonces:
        return None
    t0 = time.perf_counter()
    rows, per_group = device_major(nonces, n_groups, batch)
    if draws == "device":
        host_inputs = device_draws.initial_states(job.block_hash, job.public_key, rows)
    else:
        host_inputs = drawer.inputs(job.block_hash, job.public_key, rows, job.params, job.dtype)
    perms = drawer.permutations(job.block_hash, job.public_key, rows, job.params.vocab_size)
    inputs = jax.device_put(host_inputs, stages[0].sharding(input_axes(draws)))
    permutations = jax.device_put(perms, stages[-1].sharding(PERMUTATION_AXES))
    return PreparedStep(step, flat_start, per_group, inputs, permutations, time.perf_counter() - t0)


class StepFeeder:
    """Prepared steps from `flat_start` on, drawn on a thread ahead of the consumer. Iterating gives
    (step, seconds the consumer waited for it) until the schedule ends; a draw's failure is raised
    where the consumer takes that step. `close()` stops the thread."""

    def __init__(self, drawer: HostDrawer, draws: str, stages: list[Stage], job: SearchJob, batch: int,
                 flat_start: int, step_no: int):
        self._ready: queue.Queue = queue.Queue(maxsize=READY_STEPS)
        self._stop = threading.Event()
        per_step = batch * len(stages[0].mesh.devices)

        def produce():
            flat, k = flat_start, step_no
            try:
                while not self._stop.is_set():
                    item = prepare_step(drawer, draws, stages, job, k, flat, batch)
                    self._offer(item)
                    if item is None:
                        return
                    flat, k = flat + per_step, k + 1
            except BaseException as e:  # noqa: BLE001 — handed to the consumer
                self._offer(e)

        self._thread = threading.Thread(target=produce, name="jaxbench-draw", daemon=True)
        self._thread.start()

    def _offer(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[PreparedStep, float]]:
        while True:
            waited = time.perf_counter()
            item = self._ready.get()
            waited = time.perf_counter() - waited
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item, waited

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
