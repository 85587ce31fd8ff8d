"""The job lifecycle: one job owns the devices at a time.

* `JobManager.acquire(kind)` hands out the single `Job`, or raises `Refused` (409 busy, 503 broken
  device or shutting down). It never waits.
* A job's device work runs in worker threads (`Job.call` for one function, `Job.search` for
  `engine.search` or a screened search, read on the loop as a `SearchRun`: service/search_run.py),
  never on the event loop. A few steps may wait unread, then the search thread waits (backpressure,
  nothing is dropped).
* A job's driver (the /generate, /warmup or /pooled flow) runs as its own task and writes lines to a
  `LineChannel`; the HTTP response only relays them. A client that disconnects detaches the channel,
  which stops the job (`Job.stop("disconnected")`): the stop Event of every search is set, the engine
  ends within one step, and the driver runs its normal end (callbacks, orchestrator shutdown) without
  anyone listening. A client that stops reading is one that left, once it has kept the job's lines
  waiting for MODEL_CLIENT_STALL_S in all (`LineChannel.emit`), and its connection is closed.
* The job is released, and the next one can start, only when its driver has finished *and* every
  thread it started has returned, so two jobs never share the devices.
* A stopped job still says goodbye to its peers (warmup completion callback, orchestrator flush and
  shutdown notice), within `Job.goodbye_budget`: one call's timeout, and less when the server must
  be gone by its drain deadline.
* SIGTERM: `begin_drain()` refuses new jobs and stops the running one with reason "shutdown"; its
  stream ends with its summary line; `wait_idle()` tells the server when it may exit.
* A device runtime error that is not an out-of-memory marks the device broken (FATAL marker in the
  log, /health unhealthy, new jobs refused with 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

from jaxbench.engine import Engine
from jaxbench.job import SearchJob
from jaxbench.params import Params
from jaxbench.results import SearchTally
from jaxbench.screen import ScreenedSearch

from . import signals
from .caches import CacheTrim
from .config import DRAIN_MARGIN_S, Settings
from .context import BatchPlan
from .logsetup import log_fatal
from .outcome import Outcome, error_line, is_device_failure
from .search_run import SearchRun

log = logging.getLogger("service.jobs")

LINE_QUEUE = 512  # lines a driver may run ahead of the HTTP client before it waits
_ids = itertools.count(1)


class JobStopped(Exception):
    """Raised in a job's worker thread, between steps, once the job has been stopped."""


class Refused(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error"))
        self.status = status
        self.body = body


class LineChannel:
    """Lines from a job's driver to the HTTP response. `emit` waits while the client lags (`limit`
    lines unread), but a job's waits add up to at most `stall_s` (MODEL_CLIENT_STALL_S): a write that
    cannot proceed counts against the job's time. Past that, and past the drain's end while the
    server drains, the client counts as gone: the channel detaches and `on_abandon` (set by the
    response: it closes the client's connection) is called. After the client has gone (`detach`)
    lines are dropped and the job is told to stop."""

    _END = object()
    POLL_S = 0.25  # how often a waiting emit looks at the job's state (a drain that began)

    def __init__(self, job: "Job", limit: int = LINE_QUEUE, stall_s: float | None = None):
        self.job = job
        self.limit = limit
        self.stall_s = job.manager.settings.client_stall_s if stall_s is None else stall_s
        self.waited_s = 0.0  # how long emit has waited for the client, in all
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detached = False
        self.finished = False  # the reader saw the end
        self.on_abandon: Callable[[str], None] | None = None
        self._space = asyncio.Event()

    async def emit(self, line: dict) -> None:
        while not self.detached and self.queue.qsize() >= self.limit:
            left = min(self.stall_s - self.waited_s, self._drain_left())
            if left <= 0:
                self._abandon()
                break
            self._space.clear()
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(self._space.wait(), min(left, self.POLL_S))
            except asyncio.TimeoutError:
                pass
            self.waited_s += time.monotonic() - t0
        if not self.detached:
            self.queue.put_nowait(line)

    def _drain_left(self) -> float:
        """Seconds a line may still wait while the server drains (the job must end by then)."""
        deadline = self.job.manager.drain_deadline
        return float("inf") if deadline is None else deadline - 2 * DRAIN_MARGIN_S - time.monotonic()

    def _abandon(self) -> None:
        if self.waited_s >= self.stall_s:
            why = f"the client has kept {self.limit} lines unread for {self.waited_s:.0f} s in all (MODEL_CLIENT_STALL_S)"
        else:
            why = "the client is not reading and the server is shutting down"
        log.warning("job %s: %s: treating it as gone", self.job.id, why)
        self.detach()
        if self.on_abandon is not None:
            self.on_abandon(why)

    def end(self) -> None:
        self.queue.put_nowait(self._END)

    def detach(self) -> None:
        if self.detached:
            return
        self.detached = True
        self._space.set()
        if not self.finished:
            self.job.stop("disconnected")

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        item = await self.queue.get()
        self._space.set()
        if item is self._END:
            self.finished = True
            raise StopAsyncIteration
        return item


class Job:
    def __init__(self, manager: "JobManager", kind: str):
        self.manager = manager
        self.kind = kind
        self.id = f"{kind}-{next(_ids)}"
        self.started = time.time()
        self._t0 = time.monotonic()
        self.loop = asyncio.get_running_loop()
        self.stop_reason: str | None = None
        self.stopped = asyncio.Event()
        self.halt = threading.Event()  # `stopped`, for worker threads
        self.phase = "starting"
        self.detail: dict[str, Any] = {}
        self.summary: dict | None = None
        self.computed = 0  # nonces computed by this job's searches (written by the search thread)
        self._steps_at_start = manager.engine.steps_completed
        self._threads = 0
        self._runs: list[SearchRun] = []
        self._finished = False
        self._released = False

    # Thread plumbing -------------------------------------------------------------------------

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the event loop (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _start_thread(self, target: Callable[[], Callable[[], None] | None], name: str) -> None:
        """Run target() in a thread. What it returns is called on the loop once the thread counts as
        done: whoever learns the outcome (and answers a client) finds the job releasable."""

        def body():
            last = None
            try:
                last = target()
            finally:
                self.post(self._thread_done, last)

        self._threads += 1
        threading.Thread(target=body, name=f"{self.id}-{name}", daemon=True).start()

    def _thread_done(self, last: Callable[[], None] | None = None) -> None:
        self._threads -= 1
        try:
            if last is not None:
                last()
        finally:
            self._maybe_release()

    async def call(self, fn: Callable, *args) -> Any:
        """fn(*args) in a worker thread of this job (device work); its result or exception."""
        fut = self.loop.create_future()

        def settle(value, exc):
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

        def target():
            try:
                value = fn(*args)
            except BaseException as e:  # noqa: BLE001 — handed to the awaiting task
                self.manager.note_failure(e)
                return lambda exc=e: settle(None, exc)
            return lambda: settle(value, None)

        self._start_thread(target, getattr(fn, "__name__", "call"))
        return await fut

    def search(self, sjob: SearchJob, batch: int | None = None, screened: ScreenedSearch | None = None) -> SearchRun:
        run = SearchRun(self, sjob, batch, screened)
        self._runs = [r for r in self._runs if not r.ended] + [run]
        if self.stop_reason is not None:
            run.stop.set()
        self._start_thread(run._target, "search")
        return run

    # Lifecycle -------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Ask the job to end (first reason wins): its searches stop within one step."""
        if self.stop_reason is None and not self._finished:
            self.stop_reason = reason
            log.info("job %s: stopping (%s)", self.id, reason)
        self.stopped.set()
        self.halt.set()
        for run in self._runs:
            run.stop.set()

    def check_stop(self) -> None:
        """For worker threads, between steps: raise JobStopped once the job is stopped."""
        if self.halt.is_set():
            raise JobStopped(self.stop_reason or "stopped")

    def goodbye_budget(self, timeout: float) -> float:
        """Seconds a stopped job may spend on its goodbye calls: one call's timeout, less while the
        server drains (the job must end, last line written, before the drain deadline)."""
        deadline = self.manager.drain_deadline
        if deadline is not None:
            timeout = min(timeout, deadline - 2 * DRAIN_MARGIN_S - time.monotonic())
        return max(0.0, timeout)

    async def sleep(self, seconds: float) -> bool:
        """Sleep, waking early when the job is stopped; True if stopped."""
        try:
            await asyncio.wait_for(self.stopped.wait(), timeout=max(0.0, seconds))
        except asyncio.TimeoutError:
            pass
        return self.stopped.is_set()

    def finish(self) -> None:
        """The driver is done; the job is released once its threads have returned too."""
        self._finished = True
        for run in self._runs:
            run.stop.set()
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._finished and self._threads == 0 and not self._released:
            self._released = True
            self.manager._release(self)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def info(self) -> dict:
        out = {
            "id": self.id,
            "kind": self.kind,
            "started_at": round(self.started, 3),
            "elapsed_seconds": round(self.elapsed, 3),
            "phase": self.phase,
            "steps_completed": self.manager.engine.steps_completed - self._steps_at_start,
            "nonces_computed": self.computed,
            "stop_reason": self.stop_reason,
        }
        out.update(self.detail)
        if self.summary is not None:
            out["summary"] = self.summary
        return out


class JobManager:
    def __init__(self, engine: Engine, settings: Settings, batches: BatchPlan):
        self.engine = engine
        self.settings = settings
        self.batches = batches  # what every search of a job runs with
        self.instance = uuid.uuid4().hex  # tells this process's /health from anything else on the port
        self.job: Job | None = None
        self.last_job: dict | None = None
        self.broken: str | None = None
        self.draining = False
        self.drain_deadline: float | None = None  # monotonic time by which the server must be gone
        self._tasks: set[asyncio.Task] = set()
        self.caches = CacheTrim(engine)

    # The one-job lock ------------------------------------------------------------------------

    def check_available(self) -> None:
        if self.broken:
            raise Refused(503, {"error": "device broken", "fatal": True, "detail": self.broken})
        if self.draining:
            raise Refused(503, {"error": "shutting down"})
        if self.job is not None:
            raise Refused(409, {"error": "busy", "job": self.job.info()})

    async def acquire(self, kind: str, needs: tuple[tuple[Params, str], ...] = ()) -> Job:
        """The devices for a new job. A job that is already stopping (its client left, say) is
        waited for a little, since the PyWorker sends the next queued request at once. `needs`:
        the (params, dtype) the job will run, refused (FieldError on `params`, a 400) when they
        cannot fit the devices, checked once the devices are free and before the job exists."""
        deadline = time.monotonic() + self.settings.stopping_job_wait_s
        while (self.job is not None and self.job.stop_reason is not None and not self.draining
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)
        self.check_available()
        for params, dtype in needs:
            self.engine.check_fits(params, dtype)
        self.job = Job(self, kind)
        log.info("job %s: started", self.job.id)
        return self.job

    def _release(self, job: Job) -> None:
        if self.job is job:
            self.job = None
        self.last_job = {**job.info(), "ended_at": round(time.time(), 3)}
        log.info("job %s: released (%s)", job.id, (job.summary or {}).get("reason", job.stop_reason or "done"))
        self.caches.after_job()  # before the next job can start

    def start_session(self, job: Job, driver: Callable[[LineChannel], Awaitable[None]]) -> LineChannel:
        """Run the job's driver as its own task; the returned channel carries its lines."""
        chan = LineChannel(job)

        async def run():
            try:
                await driver(chan)
            except Exception as e:  # noqa: BLE001 — drivers report their own errors; this is the backstop
                log.exception("job %s: driver failed", job.id)
                await chan.emit(error_line(e))
                if job.summary is None:  # every stream ends with a summary line
                    job.summary = Outcome(SearchTally(None)).summary()
                    await chan.emit(job.summary)
            finally:
                job.finish()
                chan.end()

        self.spawn(run(), name=job.id)
        return chan

    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Shutdown --------------------------------------------------------------------------------

    def begin_drain(self, deadline: float) -> None:
        self.draining = True
        self.drain_deadline = deadline
        if self.job is not None:
            self.job.stop("shutdown")

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.job is not None or self._tasks:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # Device state ----------------------------------------------------------------------------

    def note_failure(self, exc: BaseException) -> None:
        """Called from worker threads with every exception they end on."""
        if is_device_failure(exc):
            self.mark_broken(f"{type(exc).__name__}: {exc}")

    def mark_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason[:2000]
            log_fatal(signals.DEVICE_FAILURE, "the worker must be replaced: %s", self.broken)

    # Reporting -------------------------------------------------------------------------------

    def compiled(self) -> list[dict]:
        return self.engine.compiled_keys()

    def health(self) -> tuple[int, dict]:
        body = {
            "status": "unhealthy" if self.broken else "healthy",
            "cuda_broken": self.broken is not None,
            "broken_reason": self.broken,
            "busy": self.job is not None,
            "draining": self.draining,
            "devices": self.engine.describe(),
            **self.engine.groups(),  # groups (what nonces are assigned to) and group_size (devices a replica)
            "compiled": self.compiled(),
            "steps_completed": self.engine.steps_completed,
            "job": self.job.info() if self.job is not None else None,
            "last_job": self.last_job,
            "instance": self.instance,
        }
        return (503 if self.broken else 200), body
