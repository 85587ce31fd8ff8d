"""/pooled: the orchestrator protocol of docs/protocol.md §3, streamed live, with the bugs of docs/protocol.md §9 fixed.

Orchestrator calls (base = `orchestrator_url`, all JSON, one shared httpx.AsyncClient):
  POST /api/workers/connect {"worker_id", "gpu_count", "gpu_info"}      register   (retried)
  POST /api/workers/{id}/heartbeat {"pending_results"}                  every heartbeat_interval_s
  GET  /api/workers/{id}/config                                         every poll interval
  POST /api/workers/{id}/ready {"gpu_count"}                            (retried)
  POST /api/workers/{id}/results <result> | /results/batch {"results"}  success = {"status": "ok"}
  POST /api/workers/{id}/shutdown {"stats": {...}}                      on every exit (retried)
Retried calls: `retry_attempts` tries, sleeping retry_base_s·2^k between them (1, 2, 4, 8 s).
Every call is over within `http_timeout_s` in all (service/peers.py); while the session is active a
call or pause in flight is abandoned the moment the job stops (client gone, SIGTERM).

Lines streamed back: registering, registered, waiting_block_hash, received_block_hash,
loading_model, model_loaded, ready, computing, then one result object per device group and step
with ≥1 valid nonce (docs/protocol.md §3.7 fields; also the empty ones with `send_empty_results`),
`switched_public_key`, `idle` (once per state; `reason`: range_complete, empty_range, no_public_key,
no_r_target — the predecessor computed on with r_target 0, where nothing is valid), error lines,
and at the end
`{"status": "shutdown", "total_batches_sent", "session_duration", "dropped_results",
"unsent_results", "reason"}` and the summary line `{"status": "done", …}`.

Computation:
* Nonce ranges are half-open, `[nonce_range_start, nonce_range_end)` (docs/algorithm.md §7, which
  wins over the predecessor's inclusive range), computed in order, each nonce exactly once per
  (block_hash, params, dtype, public_key): the nonces already computed for that job are
  remembered as intervals, so a changed or repeated range only computes what is new.
* Any poll answer's config fields are copied (as the predecessor did) and applied: a new
  block_hash or params rebuild the weights, a new public_key, r_target or range restarts the search
  (after collecting the steps in flight) on what is left to do. `switch_job` first collects every
  step in flight and flushes the results, then switches and resets the per-group counters.
  `shutdown` ends the session.
* Results go through a bounded buffer (`result_buffer`) sent by a background task, several at
  once through /results/batch when they pile up, retried with capped exponential backoff while the
  orchestrator is down. The oldest result is dropped only when the buffer is full; drops are counted
  and reported (shutdown stats and last line), as are results still unsent at the end.
* Config fields of a wrong type or range are ignored (logged); `params` that are no preset or
  parameter object, or that cannot fit the devices, end the session with an error line naming the
  field (`"source": "orchestrator"`).
* The orchestrator is lost when no call to it has succeeded, or no result post has, for
  `peer_grace_s`: computing stops (nothing it finds could be delivered), reason `orchestrator_lost`.

The end: the running search is stopped and its steps in flight collected, buffered results are
flushed (for `final_flush_s`), the shutdown notice is sent (retried, within `http_timeout_s`), then
the `shutdown` line and the summary. When the job was stopped (client gone, SIGTERM) or the orchestrator failed (lost, or
register / ready failed), the flush and the notice share one budget of `http_timeout_s` (less
while the server drains), the flush getting at most half.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any

import httpx

from jaxbench import fields
from jaxbench.job import SearchJob, StepResult
from jaxbench.nonces import NonceSchedule
from jaxbench.params import Params
from jaxbench.results import SearchTally, batch_result

from . import peers
from .jobs import Job, LineChannel, SearchRun, error_line
from .requests import PooledRequest, url_origin

log = logging.getLogger("service.pooled")

MAX_RESULTS_PER_POST = 100
WAKE_S = 0.25  # the computing loop looks at the clock (session end, orchestrator lost) this often
PEER_FAILED = ("register_failed", "ready_failed", "orchestrator_lost")


def _str16(value: str | None) -> str | None:
    return value[:16] if value else None


class Orchestrator:
    """The orchestrator's HTTP API; every call returns the parsed JSON object or None."""

    def __init__(self, http: httpx.AsyncClient, req: PooledRequest, job: Job):
        self.http = http
        self.base = req.orchestrator_url
        self.worker_id = req.worker_id
        self.req = req
        self.job = job
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
        for attempt in range(attempts):
            answer = await peers.call(self.http, method, self.base + path, json=body,
                                      timeout=budget.left(self.req.http_timeout_s),
                                      max_bytes=self.job.manager.settings.max_body_bytes,
                                      stop=self.job.stopped if interruptible else None)
            if answer.stopped:
                return None
            data = answer.json_object()
            if data is not None:
                self.last_contact = time.monotonic()
                self._note(what, True)
                return data
            self._note(what, False, "the answer is not a JSON object" if answer.ok else answer.describe())
            pause = budget.retry_pause(attempt, attempts, self.req.retry_base_s, self.req.retry_max_s)
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

    def __init__(self, orch: Orchestrator, capacity: int, retry_base_s: float, retry_max_s: float):
        self.orch = orch
        self.capacity = capacity
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
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
                delay = min(self.retry_base_s * 2 ** (self.failures - 1), self.retry_max_s)
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


# Which nonces are done --------------------------------------------------------------------------


def add_interval(intervals: list[list[int]], lo: int, hi: int) -> None:
    """Insert [lo, hi) into a sorted list of disjoint half-open intervals, merging neighbours."""
    if hi <= lo:
        return
    out: list[list[int]] = []
    placed = False
    for a, b in intervals:
        if b < lo:
            out.append([a, b])
        elif hi < a:
            if not placed:
                out.append([lo, hi])
                placed = True
            out.append([a, b])
        else:
            lo, hi = min(lo, a), max(hi, b)
    if not placed:
        out.append([lo, hi])
    out.sort()
    intervals[:] = out


def first_gap(intervals: list[list[int]], lo: int, hi: int) -> tuple[int, int] | None:
    """The first sub-interval of [lo, hi) not covered by the intervals."""
    pos = lo
    for a, b in intervals:
        if pos >= hi:
            return None
        if b <= pos:
            continue
        if a > pos:
            return pos, min(a, hi)
        pos = b
    return (pos, hi) if pos < hi else None


@dataclasses.dataclass
class GroupCounters:
    """The per-group counters of the result objects of docs/protocol.md §3.7; reset by switch_job."""

    n: int
    started: float = dataclasses.field(default_factory=time.monotonic)

    def __post_init__(self):
        self.batches = [0] * self.n
        self.computed = [0] * self.n
        self.valid = [0] * self.n


@dataclasses.dataclass
class _Segment:
    run: SearchRun
    sjob: SearchJob
    first: int  # the nonce at flat index 0
    key: tuple


class PooledSession:
    # The config fields an orchestrator answer may carry, and their values before any answer (or when null).
    DEFAULTS = {"block_hash": "", "block_height": 0, "r_target": 0.0, "params": {}, "public_key": "",
                "nonce_range_start": 0, "nonce_range_end": 0}

    def __init__(self, job: Job, chan: LineChannel, req: PooledRequest, http: httpx.AsyncClient):
        self.job = job
        self.chan = chan
        self.req = req
        self.engine = job.manager.engine
        self.orch = Orchestrator(http, req, job)
        self.sender = ResultSender(self.orch, req.result_buffer, req.retry_base_s, req.retry_max_s)
        self.cfg: dict[str, Any] = dict(self.DEFAULTS)
        self.tally = SearchTally(None, self.engine.n_groups)  # session totals and the summary line
        self.counters = GroupCounters(self.engine.n_groups)
        self.covered: dict[tuple, list[list[int]]] = {}
        self.model_key: tuple | None = None
        self.segment: _Segment | None = None
        self.step_task: asyncio.Task | None = None
        self.commands: asyncio.Queue = asyncio.Queue()
        self.shutdown_requested = False
        self.idle_state: tuple | None = None
        self.reason = "error"
        self.error: str | None = None
        self.started = time.monotonic()
        self.results_produced = 0

    # Config ----------------------------------------------------------------------------------

    @staticmethod
    def _acceptable(name: str, value: Any) -> bool:
        if name in ("block_hash", "public_key"):
            return isinstance(value, str) and len(value) <= fields.MAX_SEED_TEXT
        if name == "params":
            return isinstance(value, (dict, str))  # checked in full when used
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return False  # parse_json already refused non-finite numbers and huge integers
        return name == "r_target" or isinstance(value, int)

    def copy_fields(self, data: dict) -> None:
        """Copy the config fields present in an orchestrator answer (null means the default; values
        of a wrong type or range are ignored)."""
        for name in self.DEFAULTS:
            if name not in data:
                continue
            value = data[name]
            if value is None:
                value = self.DEFAULTS[name]
            if not self._acceptable(name, value):
                log.warning("pooled %s: ignoring %s=%.60r from the orchestrator", self.job.id, name, value)
                continue
            self.cfg[name] = value

    def params(self) -> Params:
        return fields.params({"params": self.cfg["params"]})

    def lost(self) -> str | None:
        """Why results can no longer be delivered, once the orchestrator has failed for peer_grace_s."""
        now, grace = time.monotonic(), self.req.peer_grace_s
        if now - self.orch.last_contact > grace:
            return f"no call to the orchestrator succeeded for {now - self.orch.last_contact:.0f} s"
        since = self.sender.failing_since
        if since is not None and now - since > grace:
            return f"no result could be delivered for {now - since:.0f} s"
        return None

    def stopped(self) -> bool:
        """The job was stopped (client gone, SIGTERM): the session ends with that reason."""
        if self.job.stop_reason:
            self.reason = self.job.stop_reason
            return True
        return False

    def work_key(self) -> tuple:
        """What the computation depends on: a change restarts the search."""
        c = self.cfg
        return (c["block_hash"], repr(c["params"]), c["public_key"], c["r_target"],
                c["nonce_range_start"], c["nonce_range_end"])

    # The session -----------------------------------------------------------------------------

    async def run(self) -> None:
        heartbeat = poller = None
        try:
            await self.chan.emit({"status": "registering", "worker_id": self.req.worker_id,
                                  "gpu_count": self.engine.n_groups})
            self.job.phase = "registering"
            reg = await self.orch.register(self.engine.n_groups, self.engine.describe())
            if self.stopped():
                return
            if reg is None:
                await self._end_on_peer_failure("register_failed", "Failed to register with orchestrator")
                return
            self.copy_fields(reg)
            await self.chan.emit({"status": "registered", "worker_id": self.req.worker_id})
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())
            self.sender.start()
            if not await self._wait_block_hash():
                return
            await self._ensure_model()
            if self.stopped():
                return
            ready = await self.orch.ready(self.engine.n_groups)
            if self.stopped():
                return
            if ready is None:
                await self._end_on_peer_failure("ready_failed", "Failed to notify ready")
                return
            self.copy_fields(ready)
            await self.chan.emit({"status": "ready", "public_key": _str16(self.cfg["public_key"])})
            await self.chan.emit({"status": "computing"})
            poller = asyncio.get_running_loop().create_task(self._poller())
            await self._compute()
        except fields.FieldError as e:  # the orchestrator's config: the request itself was checked
            log.warning("pooled %s: bad config from the orchestrator: %s", self.job.id, e)
            await self.chan.emit({**error_line(e), "source": "orchestrator"})
            self.reason, self.error = "error", str(e)
        except Exception as e:  # noqa: BLE001 — an error line; the end sequence still runs
            log.warning("pooled %s: failed: %s: %s", self.job.id, type(e).__name__, e)
            await self.chan.emit(error_line(e))
            self.reason, self.error = "error", f"{type(e).__name__}: {e}"
        finally:
            for task in (poller, heartbeat):
                if task is not None:
                    task.cancel()
            if self.segment is not None:
                self.segment.run.stop.set()
            await self._end()

    async def _wait_block_hash(self) -> bool:
        await self.chan.emit({"status": "waiting_block_hash"})
        self.job.phase = "waiting_block_hash"
        deadline = time.monotonic() + self.req.block_hash_timeout_s
        while not self.cfg["block_hash"]:
            if self.stopped():
                return False
            if time.monotonic() > deadline:
                await self.chan.emit({"status": "timeout", "message": "No block_hash received"})
                self.reason = "timeout_waiting_block_hash"
                return False
            if await self._check_lost():
                return False
            data = await self.orch.poll(interruptible=True)
            if data:
                if data.get("type") == "shutdown":
                    self.reason = "shutdown_command"
                    return False
                self.copy_fields(data)
                if self.cfg["block_hash"]:
                    break
            await self.job.sleep(self.req.wait_poll_interval_s)
        return True

    async def _ensure_model(self) -> Params:
        """Weights for the configured block hash and params, and the compiled step."""
        params = self.params()
        key = (self.cfg["block_hash"], params, self.req.dtype)
        if key == self.model_key:
            return params
        self.engine.check_fits(params, self.req.dtype)  # before anything is built or compiled
        await self.chan.emit({"status": "received_block_hash", "block_hash": _str16(self.cfg["block_hash"])})
        await self.chan.emit({"status": "loading_model"})
        self.job.phase = "loading_model"
        t0 = time.monotonic()
        info = await self.job.call(self.job.manager.prepare, params, self.cfg["block_hash"], self.req.dtype)
        self.model_key = key
        await self.chan.emit({"status": "model_loaded", "load_time": int(time.monotonic() - t0), **info})
        return params

    async def _check_lost(self) -> bool:
        """End the session (True) once the orchestrator is lost."""
        why = self.lost()
        if why is None:
            return False
        log.warning("pooled %s: the orchestrator is lost: %s", self.job.id, why)
        await self._end_on_peer_failure("orchestrator_lost", f"orchestrator lost: {why}", error=why)
        return True

    async def _end_on_peer_failure(self, reason: str, message: str, error: str | None = None) -> None:
        """The orchestrator failed the session: an error line with `message`, then the summary's
        reason and error (`message` unless given)."""
        await self.chan.emit({"error": message, "error_type": "ConnectionError"})
        self.reason, self.error = reason, error or message

    async def _poller(self) -> None:
        while True:
            data = await self.orch.poll()
            if data:
                self.commands.put_nowait(data)
            await asyncio.sleep(self.req.poll_interval_s)

    async def _heartbeat(self) -> None:
        while True:
            await self.orch.heartbeat(self.sender.pending())
            await asyncio.sleep(self.req.heartbeat_interval_s)

    # Computing -------------------------------------------------------------------------------

    async def _compute(self) -> None:
        self.job.phase = "computing"
        deadline = time.monotonic() + self.req.session_timeout_s
        cmd_task: asyncio.Task | None = None
        stopped = asyncio.get_running_loop().create_task(self.job.stopped.wait())
        try:
            while True:
                if self.stopped():
                    break
                if self.shutdown_requested:
                    self.reason = "shutdown_command"
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.reason = "session_timeout"
                    break
                if await self._check_lost():
                    break
                if self.segment is None:
                    await self._start_segment()
                if cmd_task is None:
                    cmd_task = asyncio.get_running_loop().create_task(self.commands.get())
                waits = {cmd_task, stopped}
                if self.segment is not None:
                    if self.step_task is None:
                        self.step_task = asyncio.get_running_loop().create_task(self.segment.run.next())
                    waits.add(self.step_task)
                await asyncio.wait(waits, timeout=min(remaining, WAKE_S), return_when=asyncio.FIRST_COMPLETED)
                if self.step_task is not None and self.step_task.done():
                    task, self.step_task = self.step_task, None
                    await self._on_item(task.result())
                if cmd_task.done():
                    data, cmd_task = cmd_task.result(), None
                    await self._on_command(data)
            await self._finish_segment()
        finally:
            stopped.cancel()
            if cmd_task is not None:
                cmd_task.cancel()

    async def _on_item(self, step: StepResult | None) -> None:
        if step is None:  # the segment's search ended (range done, or stopped for a change)
            self.segment = None
            return
        await self._handle_step(step)

    async def _finish_segment(self) -> None:
        """Stop the running search and handle every step still coming from it."""
        seg = self.segment
        if seg is None:
            return
        seg.run.stop.set()
        while True:
            if self.step_task is None:
                self.step_task = asyncio.get_running_loop().create_task(seg.run.next())
            task = self.step_task
            step = await task
            self.step_task = None
            if step is None:
                break
            await self._handle_step(step)
        self.segment = None

    async def _start_segment(self) -> None:
        """Start a search over the first part of the range not yet computed for the current job."""
        c = self.cfg
        lo, hi = c["nonce_range_start"], c["nonce_range_end"]
        if not c["public_key"]:
            await self._idle("no_public_key")
            return
        if not c["r_target"] > 0:  # the predecessor computed on with 0.0, where nothing is ever valid
            await self._idle("no_r_target")
            return
        params = await self._ensure_model()
        key = (c["block_hash"], params, self.req.dtype, c["public_key"])
        covered = self.covered.setdefault(key, [])
        gap = first_gap(covered, lo, hi)
        if gap is None:
            await self._idle("range_complete" if hi > lo else "empty_range")
            return
        a, b = gap
        sjob = SearchJob(params, c["block_hash"], c["public_key"], float(c["r_target"]),
                         NonceSchedule.for_node(a, 0, 1, end=b), self.req.dtype, None)
        self.idle_state = None
        self.job.detail.update({"public_key": c["public_key"][:16], "nonce_range": [lo, hi], "segment": [a, b]})
        log.info("pooled %s: computing [%d, %d) of [%d, %d) for %s…", self.job.id, a, b, lo, hi, c["public_key"][:16])
        self.segment = _Segment(self.job.search(sjob), sjob, a, key)
        self.tally.job = sjob

    async def _idle(self, why: str) -> None:
        state = (why, self.cfg["nonce_range_start"], self.cfg["nonce_range_end"], self.cfg["public_key"])
        if state != self.idle_state:
            self.idle_state = state
            self.job.phase = "idle"
            await self.chan.emit({"status": "idle", "reason": why, "nonce_range_start": state[1],
                                  "nonce_range_end": state[2]})

    async def _handle_step(self, step: StepResult) -> None:
        seg = self.segment
        sjob = seg.sjob
        lo = seg.first + step.flat_start
        add_interval(self.covered.setdefault(seg.key, []), lo, lo + step.computed)
        self.tally.job = sjob
        self.tally.add(step)
        cnt = self.counters
        for g in step.groups:
            nonces, dist = g.valid(sjob.r_target)
            w = g.group
            cnt.batches[w] += 1
            cnt.computed[w] += len(g.nonces)
            cnt.valid[w] += len(nonces)
            if not nonces and not self.req.send_empty_results:
                continue
            result = batch_result(sjob, self.cfg["block_height"], g, nonces, dist, cnt.batches[w],
                                  cnt.computed[w], cnt.valid[w], time.monotonic() - cnt.started)
            self.results_produced += 1
            self.sender.add(result)
            await self.chan.emit(result)

    async def _on_command(self, data: dict) -> None:
        kind = data.get("type")
        if kind == "shutdown":
            self.shutdown_requested = True
            return
        before = self.work_key()
        old_key = self.cfg["public_key"]
        self.copy_fields(data)
        if kind == "switch_job":
            await self._finish_segment()
            await self.sender.flush(self.req.final_flush_s)
            new_key = data.get("public_key")
            if isinstance(new_key, str) and new_key:
                self.counters = GroupCounters(self.engine.n_groups)
                await self.chan.emit({"status": "switched_public_key", "public_key": _str16(new_key)})
                log.info("pooled %s: switched public key %s… -> %s…", self.job.id, old_key[:16], new_key[:16])
            return
        if self.work_key() != before and self.segment is not None:
            self.segment.run.stop.set()  # its steps in flight still arrive; then the next segment starts

    # The end ---------------------------------------------------------------------------------

    async def _end(self) -> None:
        self.job.phase = "shutting_down"
        bounded = self.job.stop_reason is not None or self.reason in PEER_FAILED
        # Stopped or failed peer: flush and notice share one budget. Otherwise the flush gets
        # final_flush_s and the notice its own http_timeout_s (attempts included).
        budget = peers.Budget(self.job.goodbye_budget(self.req.http_timeout_s) if bounded else None)
        try:
            await self._finish_segment()
        except Exception as e:  # noqa: BLE001
            if self.reason != "error":
                await self.chan.emit(error_line(e))
                self.reason, self.error = "error", f"{type(e).__name__}: {e}"
        if self.sender._task is not None:
            await self.sender.flush(budget.left(self.req.final_flush_s) / (2 if bounded else 1))
        await self.sender.close()
        duration = int(time.monotonic() - self.started)
        stats = {
            "reason": self.reason,
            "total_batches_sent": self.sender.sent,
            "session_duration": duration,
            "total_computed": self.tally.total_computed,
            "total_valid": self.tally.total_valid,
            "results_produced": self.results_produced,
            "dropped_results": self.sender.dropped,
            "unsent_results": self.sender.pending(),
        }
        if self.error:
            stats["error"] = self.error
        notified = await self.orch.shutdown(stats, budget if bounded else peers.Budget(self.req.http_timeout_s))
        if not notified:
            log.warning("pooled %s: the shutdown notification could not be sent", self.job.id)
        await self.chan.emit({"status": "shutdown", "total_batches_sent": self.sender.sent,
                              "session_duration": duration, "dropped_results": self.sender.dropped,
                              "unsent_results": self.sender.pending(), "reason": self.reason,
                              "notified": notified})
        self.job.summary = self.tally.summary(self.reason)
        if self.error:
            self.job.summary["detail"] = self.error
        self.job.phase = "done"
        await self.chan.emit(self.job.summary)


async def pooled_driver(job: Job, chan: LineChannel, req: PooledRequest, http: httpx.AsyncClient) -> None:
    job.detail.update({"worker_id": req.worker_id, "orchestrator_url": url_origin(req.orchestrator_url)})
    await PooledSession(job, chan, req, http).run()
