"""A search of a job: `engine.search`, or a ScreenedSearch's steps, in one of the job's worker
threads, its steps read on the event loop.

The thread hands each finished step to an asyncio.Queue through `Job.post`
(`loop.call_soon_threadsafe`). At most MAX_UNREAD_STEPS steps wait there unread; then the thread
waits for the reader (backpressure: nothing is dropped). Once the run is stopped the thread hands
over the step in hand without waiting and the engine ends within one step. The batch is the job
manager's `BatchPlan` choice unless the run names one; an engine that retreated after an
out-of-memory leaves its smaller batch in the plan for the searches that follow.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Callable

from jaxbench.job import SearchJob, StepResult
from jaxbench.screen import ScreenedSearch

if TYPE_CHECKING:
    from .jobs import Job

MAX_UNREAD_STEPS = 8  # steps a search thread may run ahead of the driver before it waits


class _End:
    def __init__(self, exc: BaseException | None):
        self.exc = exc


class SearchRun:
    """`engine.search` (or `screened.steps`, the search of `sjob` through a screen) in a worker
    thread, read on the event loop: `await run.next()` gives the next StepResult, None at the end, or
    raises the search's exception."""

    def __init__(self, job: "Job", sjob: SearchJob, batch: int | None, screened: ScreenedSearch | None = None):
        self.job = job
        self.sjob = sjob
        self.batch = batch
        self.screened = screened
        self.stop = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._credits = threading.Semaphore(MAX_UNREAD_STEPS)
        self._end: _End | None = None

    def _take_credit(self) -> bool:
        while not self.stop.is_set():
            if self._credits.acquire(timeout=0.1):
                return True
        return False  # stopping: hand the step over anyway, the reader drains or is gone

    def _target(self) -> Callable[[], None]:
        manager = self.job.manager
        end = _End(None)
        try:
            batch = self.batch or manager.batches.batch_for(self.sjob.params, self.sjob.dtype)
            steps = (self.screened.steps(self.stop, batch=batch) if self.screened
                     else manager.engine.search(self.sjob, self.stop, batch=batch))
            for step in steps:
                self.job.computed += step.computed
                if step.batch < batch:  # the engine retreated after an out-of-memory
                    manager.batches.remember(self.sjob.params, self.sjob.dtype, step.batch)
                    batch = step.batch
                credited = self._take_credit()
                self.job.post(self.queue.put_nowait, (step, credited))
        except BaseException as e:  # noqa: BLE001 — handed to the reader
            end = _End(e)
            manager.note_failure(e)
        return lambda: self.queue.put_nowait(end)

    async def next(self) -> StepResult | None:
        if self._end is not None:
            if self._end.exc is not None:
                raise self._end.exc
            return None
        item = await self.queue.get()
        if isinstance(item, _End):
            self._end = item
            return await self.next()
        step, credited = item
        if credited:
            self._credits.release()
        return step

    @property
    def ended(self) -> bool:
        return self._end is not None

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepResult:
        step = await self.next()
        if step is None:
            raise StopAsyncIteration
        return step
