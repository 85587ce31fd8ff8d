"""The orchestrator's HTTP API (docs/protocol.md §3) and the sender of a /pooled session's results.

Calls (base = `orchestrator_url`, all JSON, one shared httpx.AsyncClient):
  POST /api/workers/connect {"worker_id", "gpu_count", "gpu_info"}      register   (retried)
  POST /api/workers/{id}/heartbeat {"pending_results"}                  every heartbeat_interval_s
  GET  /api/workers/{id}/config                                         every poll interval
  POST /api/workers/{id}/ready {"gpu_count"}                            (retried)
  POST /api/workers/{id}/results <result> | /results/batch {"results"}  success = {"status": "ok"}
  POST /api/workers/{id}/shutdown {"stats": {...}}                      on every exit (retried)
Retried calls: `retry_attempts` tries, pausing between them as `jaxbench.backoff.Backoff` says
(retry_base_s·2^k: 1, 2, 4, 8 s, at most retry_max_s). Every call is over within `http_timeout_s`
in all (service/peers.py); an interruptible call, or its pause, is abandoned the moment the job
stops (client gone, SIGTERM). A call's failures are logged once per outage, not once per call.

`ResultSender`: a bounded buffer (`result_buffer`) sent by a background task, several results at
once through /results/batch when they pile up, retried with the same backoff while the
orchestrator is down (a flush cuts a pause short). The oldest result is dropped only when the
buffer is full; `dropped`, `sent` and `pending()` are what the session reports.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import httpx

from jaxbench.backoff import Backoff

from . import peers
from .jobs import Job
from .requests import PooledRequest

log = logging.getLogger("service.pooled")

MAX_RESULTS_PER_POST = 100


class Orchestrator:
    """The orchestrator's HTTP API; every call returns the parsed JSON object or None."""

    def __init__(self, http: httpx.AsyncClient, req: PooledRequest, job: Job, max_bytes: int):
        self.http = http
        self.base = req.orchestrator_url
        self.worker_id = req.worker_id
        self.req = req
        self.job = job
        self.max_bytes = max_bytes  # the largest answer read
        self.backoff = req.backoff
        self.last_contact = time.monotonic()  # of the last call that succeeded
        self._failing: set[str] = set()

    def _note(self, what: str, ok: bool, detail: str = "") -> None:
        """Log a call's failures once per outage, not once per call."""
        if ok and what in self._failing:
            self._failing.discard(what)
            log.info("orchestrator %s: %s works again", self.worker_id[:8], what)
        elif not ok and what not in self._failing:
            self._failing.add(what)
            log.warning("orchestrator %s: %s failed: %s", self.worker_id[:8], what, detail)

    async def call(self, method: str, path: str, what: str, body: Any = None, attempts: int = 1, *,
                   interruptible: bool = False, budget: peers.Budget | None = None) -> dict | None:
        """The answer's JSON object, or None. `interruptible`: give up at once when the job stops;
        `budget`: every attempt and pause within it."""
        budget = budget or peers.Budget(None)
        for failures in range(1, attempts + 1):
            answer = await peers.call(self.http, method, self.base + path, json=body,
                                      timeout=budget.left(self.req.http_timeout_s),
                                      max_bytes=self.max_bytes,
                                      stop=self.job.stopped if interruptible else None)
            if answer.stopped:
                return None
            data = answer.json_object()
            if data is not None:
                self.last_contact = time.monotonic()
                self._note(what, True)
                return data
            self._note(what, False, "the answer is not a JSON object" if answer.ok else answer.describe())
            pause = budget.retry_pause(self.backoff, failures, attempts)
            if pause is None:
                break
            if interruptible:
                if await self.job.sleep(pause):
                    return None
            else:
                await asyncio.sleep(pause)
        return None

    def _path(self, tail: str) -> str:
        return f"/api/workers/{self.worker_id}/{tail}"

    async def register(self, gpu_count: int, gpu_info: list) -> dict | None:
        data = await self.call("POST", "/api/workers/connect", "register",
                               {"worker_id": self.worker_id, "gpu_count": gpu_count, "gpu_info": gpu_info},
                               self.req.retry_attempts, interruptible=True)
        return data if data and data.get("status") != "error" else None

    async def heartbeat(self, pending: int) -> None:
        await self.call("POST", self._path("heartbeat"), "heartbeat", {"pending_results": pending})

    async def poll(self, interruptible: bool = False) -> dict | None:
        return await self.call("GET", self._path("config"), "config poll", interruptible=interruptible) or None

    async def ready(self, gpu_count: int) -> dict | None:
        data = await self.call("POST", self._path("ready"), "ready", {"gpu_count": gpu_count},
                               self.req.retry_attempts, interruptible=True)
        return data if data and data.get("status") != "error" else None

    async def send_results(self, results: list[dict]) -> bool:
        if len(results) == 1:
            data = await self.call("POST", self._path("results"), "results", results[0])
        else:
            data = await self.call("POST", self._path("results/batch"), "results", {"results": results})
        return bool(data) and data.get("status") == "ok"

    async def shutdown(self, stats: dict, budget: peers.Budget) -> bool:
        return await self.call("POST", self._path("shutdown"), "shutdown", {"stats": stats}, self.req.retry_attempts,
                               budget=budget) is not None


class ResultSender:
    """A bounded buffer of results and the task that sends them, retrying with backoff."""

    def __init__(self, orch: Orchestrator, capacity: int, backoff: Backoff):
        self.orch = orch
        self.capacity = capacity
        self.backoff = backoff
        self.buffer: collections.deque[dict] = collections.deque()
        self.in_flight: list[dict] = []
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self.failing_since: float | None = None  # since when no post has succeeded
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._retry_now = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pooled-sender")

    @property
    def running(self) -> bool:
        """Started and not closed: a flush can deliver."""
        return self._task is not None and not self._task.done()

    def pending(self) -> int:
        return len(self.buffer) + len(self.in_flight)

    def add(self, result: dict) -> None:
        self.buffer.append(result)
        self._trim()
        self._empty.clear()
        self._wake.set()

    def _trim(self) -> None:
        while self.pending() > self.capacity and self.buffer:
            self.buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("result buffer full (%d): dropped the oldest result (%d dropped so far)",
                            self.capacity, self.dropped)

    async def _run(self) -> None:
        try:
            while True:
                if not self.buffer:
                    self._empty.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                n = min(len(self.buffer), MAX_RESULTS_PER_POST)
                self.in_flight = [self.buffer.popleft() for _ in range(n)]
                ok = await self.orch.send_results(self.in_flight)
                if ok:
                    self.sent += len(self.in_flight)
                    self.in_flight = []
                    self.failures = 0
                    self.failing_since = None
                    continue
                self.buffer.extendleft(reversed(self.in_flight))
                self.in_flight = []
                self._trim()
                self.failures += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                delay = self.backoff.pause(self.failures)
                try:  # back off, unless a flush asks to try again now
                    await asyncio.wait_for(self._retry_now.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                self._retry_now.clear()
        except asyncio.CancelledError:
            self.buffer.extendleft(reversed(self.in_flight))
            self.in_flight = []
            raise

    async def flush(self, timeout: float) -> bool:
        """Wait until everything buffered has been sent (True) or the timeout passed (False)."""
        if self.pending() == 0:
            return True
        self._retry_now.set()  # cut a backoff short
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.pending() == 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
