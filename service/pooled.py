"""/pooled: the orchestrator protocol of docs/protocol.md §3, streamed live, with the bugs of docs/protocol.md §9 fixed.

The orchestrator's calls, their retries and the result sender are service/orchestrator.py's; while
the session is active a call or pause in flight is abandoned the moment the job stops (client gone,
SIGTERM).

Lines streamed back: registering, registered, waiting_block_hash, received_block_hash,
loading_model, model_loaded, ready, computing, then one result object per device group and step
with ≥1 valid nonce (docs/protocol.md §3.7 fields, and `screen`/`screen_margin` with a screen; also
the empty ones with `send_empty_results`), `switched_public_key`, `idle` (once per state;
`reason`: range_complete, empty_range, no_public_key, no_r_target — the predecessor computed on
with r_target 0, where nothing is valid), error lines, and at the end
`{"status": "shutdown", "total_batches_sent", "session_duration", "dropped_results",
"unsent_results", "reason"}` and the summary line `{"status": "done", …}`.

Computation:
* Nonce ranges are half-open, `[nonce_range_start, nonce_range_end)` (docs/algorithm.md §7, which
  wins over the predecessor's inclusive range), computed in order, each nonce exactly once per
  (block_hash, params, dtype, public_key): the nonces already computed for that job are
  remembered as intervals (service/coverage.py), so a changed or repeated range only computes what
  is new.
* Any poll answer's config fields are copied (as the predecessor did; requests.py checks them)
  and applied: a new block_hash or params rebuild the weights, a new public_key, r_target or range
  restarts the search (after collecting the steps in flight) on what is left to do. `switch_job` first collects every
  step in flight and flushes the results, then switches and resets the per-group counters of
  the result objects (a `jaxbench.results.SearchTally` of their own; the session's totals go on).
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
import dataclasses
import logging
import time
from typing import Any

from jaxbench import fields
from jaxbench.job import SearchJob, StepResult
from jaxbench.nonces import NonceSchedule
from jaxbench.params import Params
from jaxbench.results import SearchTally, batch_result

from . import peers
from .coverage import add_interval, first_gap
from .context import Context
from .jobs import Job, LineChannel
from .orchestrator import Orchestrator, ResultSender
from .outcome import Outcome, error_line
from .requests import ORCHESTRATOR_CONFIG, PooledRequest, copy_orchestrator_config, url_origin
from .search_run import SearchRun

log = logging.getLogger("service.pooled")

WAKE_S = 0.25  # the computing loop looks at the clock (session end, orchestrator lost) this often
PEER_FAILED = ("register_failed", "ready_failed", "orchestrator_lost")


def _str16(value: str | None) -> str | None:
    return value[:16] if value else None


@dataclasses.dataclass
class _Segment:
    run: SearchRun
    sjob: SearchJob
    first: int  # the nonce at flat index 0
    key: tuple


class PooledSession:
    def __init__(self, ctx: Context, job: Job, chan: LineChannel, req: PooledRequest):
        self.ctx = ctx
        self.job = job
        self.chan = chan
        self.req = req
        self.engine = ctx.engine
        self.orch = Orchestrator(ctx.http, req, job, ctx.settings.max_body_bytes)
        self.sender = ResultSender(self.orch, req.result_buffer, req.backoff)
        self.cfg: dict[str, Any] = dict(ORCHESTRATOR_CONFIG)
        self.outcome = Outcome(SearchTally(None), screen=req.screen)  # session totals and the summary line
        self.counts = SearchTally(None)  # the result objects' counters, reset by switch_job
        self.covered: dict[tuple, list[list[int]]] = {}
        self.model_key: tuple | None = None
        self.segment: _Segment | None = None
        self.step_task: asyncio.Task | None = None
        self.commands: asyncio.Queue = asyncio.Queue()
        self.shutdown_requested = False
        self.idle_state: tuple | None = None
        self.started = time.monotonic()
        self.results_produced = 0

    # Config ----------------------------------------------------------------------------------

    def copy_fields(self, data: dict) -> None:
        for name, value in copy_orchestrator_config(self.cfg, data):
            log.warning("pooled %s: ignoring %s=%.60r from the orchestrator", self.job.id, name, value)

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
            self.outcome.reason = self.job.stop_reason
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
                                  "gpu_count": len(self.engine.devices)})
            self.job.phase = "registering"
            reg = await self.orch.register(len(self.engine.devices), self.engine.describe())
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
            ready = await self.orch.ready(len(self.engine.devices))
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
            self.outcome.fail("error", str(e))
        except Exception as e:  # noqa: BLE001 — an error line; the end sequence still runs
            log.warning("pooled %s: failed: %s: %s", self.job.id, type(e).__name__, e)
            await self.chan.emit(error_line(e))
            self.outcome.fail("error", f"{type(e).__name__}: {e}")
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
                self.outcome.reason = "timeout_waiting_block_hash"
                return False
            if await self._check_lost():
                return False
            data = await self.orch.poll(interruptible=True)
            if data:
                if data.get("type") == "shutdown":
                    self.outcome.reason = "shutdown_command"
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
        info = await self.job.call(self.ctx.batches.prepare, params, self.cfg["block_hash"], self.req.dtype)
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
        self.outcome.fail(reason, error or message)

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
                    self.outcome.reason = "shutdown_command"
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.outcome.reason = "session_timeout"
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
        screened = None if self.req.screen is None else self.req.screen.search(self.engine, sjob, self.outcome.screened)
        self.segment = _Segment(self.job.search(sjob, screened=screened), sjob, a, key)
        self.outcome.tally.job = sjob

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
        counts = self.counts
        for tally in (self.outcome.tally, counts):
            tally.job = sjob
            tally.add(step)
        for g in step.groups:
            nonces, dist = g.valid(sjob.r_target)
            if not nonces and not self.req.send_empty_results:
                continue
            w = g.group
            result = {**batch_result(sjob, self.cfg["block_height"], g, nonces, dist, counts.worker_batches[w],
                                     counts.worker_computed[w], counts.worker_valid[w], counts.elapsed()),
                      **self.outcome.line_fields()}
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
                self.counts = SearchTally(None)
                await self.chan.emit({"status": "switched_public_key", "public_key": _str16(new_key)})
                log.info("pooled %s: switched public key %s… -> %s…", self.job.id, old_key[:16], new_key[:16])
            return
        if self.work_key() != before and self.segment is not None:
            self.segment.run.stop.set()  # its steps in flight still arrive; then the next segment starts

    # The end ---------------------------------------------------------------------------------

    async def _end(self) -> None:
        self.job.phase = "shutting_down"
        bounded = self.job.stop_reason is not None or self.outcome.reason in PEER_FAILED
        # Stopped or failed peer: flush and notice share one budget. Otherwise the flush gets
        # final_flush_s and the notice its own http_timeout_s (attempts included).
        budget = peers.Budget(self.job.goodbye_budget(self.req.http_timeout_s) if bounded else None)
        try:
            await self._finish_segment()
        except Exception as e:  # noqa: BLE001
            if self.outcome.reason != "error":
                await self.chan.emit(error_line(e))
                self.outcome.fail("error", f"{type(e).__name__}: {e}")
        if self.sender.running:
            await self.sender.flush(budget.left(self.req.final_flush_s) / (2 if bounded else 1))
        await self.sender.close()
        duration = int(time.monotonic() - self.started)
        stats = {
            "reason": self.outcome.reason,
            "total_batches_sent": self.sender.sent,
            "session_duration": duration,
            "total_computed": self.outcome.tally.total_computed,
            "total_valid": self.outcome.tally.total_valid,
            "results_produced": self.results_produced,
            "dropped_results": self.sender.dropped,
            "unsent_results": self.sender.pending(),
        }
        if self.outcome.error:
            stats["error"] = self.outcome.error
        notified = await self.orch.shutdown(stats, budget if bounded else peers.Budget(self.req.http_timeout_s))
        if not notified:
            log.warning("pooled %s: the shutdown notification could not be sent", self.job.id)
        await self.chan.emit({"status": "shutdown", "total_batches_sent": self.sender.sent,
                              "session_duration": duration, "dropped_results": self.sender.dropped,
                              "unsent_results": self.sender.pending(), "reason": self.outcome.reason,
                              "notified": notified})
        self.job.summary = self.outcome.summary()
        if self.outcome.error:
            self.job.summary["detail"] = self.outcome.error
        self.job.phase = "done"
        await self.chan.emit(self.job.summary)


async def pooled_driver(ctx: Context, job: Job, chan: LineChannel, req: PooledRequest) -> None:
    job.detail.update({"worker_id": req.worker_id, "orchestrator_url": url_origin(req.orchestrator_url)})
    await PooledSession(ctx, job, chan, req).run()
