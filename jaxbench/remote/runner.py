"""The remote search's runner: `--workers` requests in flight through a `Router` (vast.py), the parts
of plan.py handed out, every line checked (stream.py) and printed at most once.

One runner per worker sends a part and reads its stream to the end; then it takes the next part.
A request goes through the autoscaler to a worker the client does not avoid (workers.py: one that
failed, lied or was busy lately); a route to an avoided worker is dropped and the autoscaler asked
again. `wait_timeout` bounds each request's wait for a worker to start it (routing, re-routing, the
worker's queue); `stall_timeout` the silence of a running one. What a failed request left undone
goes back to the pending work, for whichever worker is free next; a nonce already printed is never
printed again. Each request also carries the time its worker may take (plan.py), so that a worker
slower than thought gives the rest of its part back instead of holding it.

The search ends when every nonce is done, at its deadline (`--duration`), on SIGINT/SIGTERM, or when
nothing can go on: every pending range given up (plan.py), no worker started a request for
`wait_timeout` while nothing progressed, or two workers refused the request itself (a 4xx naming a
field: the same body goes to every worker). Its summary is always written.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import signal
import sys
import time

from ..backoff import Backoff
from .plan import ENDLESS, Plan, Running, least_part
from .search import Search
from .stream import RequestCheck, Violation
from .workers import RATE_SPAN_S, Fleet, Worker

log = logging.getLogger("jaxbench.remote")

ROUTE = "/generate"
REROUTE = Backoff(0.2, 5.0)  # pauses between route calls while a request looks for a worker
RETRY = Backoff(1.0, 30.0)  # a runner's pause after its request failed, longer after each failure in a row
BUSY_STATUSES = (409, 429, 503)
REFUSED_STATUSES = (400, 413, 422)  # the request itself is refused
FLUSH_S = 0.1  # result lines go to stdout in one write at most this often, and at each tick and the end
TICK_S = 0.5  # how often idle runners look for a backup and the progress bar's counts refresh
DEADLINE_GRACE_S = 30.0  # requests still open this long after a --duration search's deadline are closed
FLEET_WAIT_S = 2.0  # how long a worker whose speed is known waits for the fleet's before it gets a part
FLEET_KNOWN = 0.9  # the fleet's speed is known once this share of the workers have reported theirs …
FLEET_SETTLE_S = 1.0  # … or this long after a quarter of them have (Fleet.total_rate)
COALESCE_S = 0.05  # while requests stream, the event loop takes its input this often (_coalesce) …
POST_S = 0.25  # … except during a route call and for this long after it, while the request is posted
QUIET_HOLD_S = 0.25  # … and for this long at a time while no request is due to end within DUE_MARGIN_S after it
DUE_MARGIN_S = 1.0
FREE_S = 0.01  # after a hold the loop runs free this long, so that what the held input sets going runs at once


class Refused(Exception):
    """Workers refuse the request itself."""


def _is_seconds(value) -> bool:
    """Whether a worker's clock reading (a line's elapsed_seconds) is one: a finite number ≥ 0."""
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


class _JobFailed(Exception):
    """The worker's job failed: an error line, then a summary with reason "error"."""


class Silence:
    """`asyncio.timeout(seconds)` from the last `heard()`: TimeoutError once that long passes without
    one. A call costs a clock read; the timer is moved only when it fires early (asyncio.timeout's
    reschedule replaces its timer at each call, and a stream calls it at every line)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._expired = False

    async def __aenter__(self) -> "Silence":
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling()
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + self.seconds, self._check)
        return self

    def heard(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self.seconds
        if self._loop.time() >= due:
            self._expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._timer.cancel()
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is not None \
                and issubclass(exc_type, asyncio.CancelledError):
            raise TimeoutError from exc


class RemoteSearch:
    def __init__(self, router, search: Search, *, cost: int | None = None, max_attempts: int = 5,
                 stall_timeout: float = 600.0, wait_timeout: float = 900.0, out=None, bar=None):
        self.router = router
        self.search = search
        self.plan = Plan(search.sequences(), search.workers, max_attempts)
        self.fleet = Fleet()
        self.cost = cost
        self.stall_timeout = stall_timeout
        self.wait_timeout = wait_timeout
        self.out = out or sys.stdout
        self.bar = bar
        self.deadline: float | None = None
        self.requests = self.restarts = self.backups = 0
        self.error: str | None = None  # why the search could not go on
        self._body = search.body()
        self._idle: list[asyncio.Future] = []
        self._closing = False
        self._streaming = 0  # requests whose stream is open
        self._routing = 0  # route calls in flight
        self._retrying = 0  # runners pausing before their next request after a failed one
        self._hold_from = 0.0  # no hold before then: a routed request is being posted
        self._coalescing: asyncio.TimerHandle | None = None
        self._due: list[tuple[float, int, Running]] = []  # (when it ends by itself, order, request): a heap
        self._due_order = itertools.count()
        self._running_on: dict[str, list[Running]] = {}  # worker url → the search's requests streaming there
        self._last_progress = time.monotonic()
        self._refusals: dict[str, set[str]] = {}  # what was refused → by which workers
        self._route_error = ""
        self._unwritten: list[str] = []  # result lines not yet written to `out`
        self._flushed = 0.0
        self._no_backup_until = self._no_stuck_until = 0.0
        self._fleet_known = asyncio.Event()  # set once the fleet's speed is known (_learnt)
        self._fleet_settling: asyncio.TimerHandle | None = None

    # The search ------------------------------------------------------------------------------------

    async def run(self) -> str:
        """The reason the search ended: completed, duration, failed or interrupted."""
        if self.search.duration_s is not None:
            self.deadline = time.monotonic() + self.search.duration_s
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        self._coalescing = loop.call_later(COALESCE_S, self._coalesce)
        runners = asyncio.gather(*(self._runner() for _ in range(self.search.workers)))
        ticker = asyncio.create_task(self._tick())
        stop_waiter = asyncio.create_task(stopped.wait())
        try:
            await asyncio.wait({runners, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if runners.done() and runners.exception() is not None:
                raise runners.exception()
        except Exception as e:  # noqa: BLE001 — a fault of the client itself: still a summary
            log.error("the search failed: %s: %s", type(e).__name__, e, exc_info=e)
            self.error = self.error or f"{type(e).__name__}: {e}"
        finally:
            self._closing = True
            self._coalescing.cancel()
            if self._fleet_settling is not None:
                self._fleet_settling.cancel()
            for task in (ticker, stop_waiter, runners):
                task.cancel()
            await asyncio.gather(ticker, stop_waiter, runners, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self._show()
        if stopped.is_set():
            return "interrupted"
        if self.plan.finished:
            return "completed"
        if self.deadline is not None and self.error is None and not self.plan.given_up:
            return "duration"
        return "failed"

    def summary(self, reason: str, elapsed: float) -> dict:
        plan = self.plan
        out = {
            "status": "done",
            "reason": reason,
            "total_computed": plan.computed,
            "total_valid": plan.valid,
            "elapsed_seconds": round(elapsed, 3),
            "nonces_per_second": round(plan.computed / elapsed, 3) if elapsed > 0 else 0.0,
            "requests": self.requests,
            "restarts": self.restarts,
            "backups": self.backups,
            "parts": [{"node_id": t.sequence.node_id, "n_nodes": t.sequence.n_nodes, "computed": t.done.size,
                       "valid": t.valid} for t in plan.tracks],
            "workers": self.fleet.report(),
        }
        if self.error is not None:
            out["error"] = self.error
        if plan.given_up:
            out["given_up"] = [{**p.track.sequence.request_fields(p.lo, p.hi), "error": p.cause} for p in plan.given_up]
        if not plan.finished and self.deadline is None:
            out["missing"] = plan.missing()  # as /generate fields: what later requests must still cover
        return out

    # Runners ---------------------------------------------------------------------------------------

    async def _runner(self) -> None:
        failures = 0  # this runner's failed requests in a row
        while True:
            run = self._work()
            if run is None:
                if self._nothing_left():
                    return
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                run = await waiter
                if run is None:
                    return
            task = asyncio.create_task(self._request(run))
            run.stop = task.cancel
            try:
                await asyncio.wait({task})
            finally:
                if not task.done():  # the runner itself was cancelled
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if task.cancelled() or task.result() is None:
                failures = 0
            else:  # a failing autoscaler or client fault must not turn the runners into a busy loop
                failures += 1
                self._retrying += 1
                try:
                    await asyncio.sleep(RETRY.pause(failures))
                finally:
                    self._retrying -= 1

    def _work(self) -> Running | None:
        """The next request to send: a backup of what a request that computes nothing holds (left
        for the end, it would be the end), else pending work, else a backup of the slowest request."""
        if self._closing or self.deadline is not None and self.deadline - time.monotonic() < 1.0:
            return None
        plan, now = self.plan, time.monotonic()
        if plan.pending:
            stuck = self._backup(now, stuck_only=True) if now >= self._no_stuck_until else None
            return stuck or plan.take(plan.part_size(None, self._fleet_rate(), self.fleet.quantum),
                                      least_part(self.fleet.mean_rate, self.fleet.quantum))
        if now >= self._no_backup_until:
            return self._backup(now)
        return None

    def _backup(self, now: float, stuck_only: bool = False) -> Running | None:
        plan = self.plan
        if not plan.bounded or not plan.running_count:
            return None
        run = plan.backup(self.fleet.mean_rate, now,
                          plan.part_size(self.fleet.mean_rate, self._fleet_rate(), self.fleet.quantum), stuck_only)
        if run is None:  # a scan costs a pass over the running requests: at most one a tick
            if stuck_only:
                self._no_stuck_until = now + TICK_S
            else:
                self._no_backup_until = now + TICK_S
        else:
            self.backups += 1
        return run

    def _nothing_left(self) -> bool:
        plan = self.plan
        return (self._closing or plan.finished or not plan.pending and not plan.running_count
                or self.deadline is not None and self.deadline - time.monotonic() < 1.0)

    def _dispatch(self) -> None:
        """Hand work to idle runners while there is some; release them all once nothing is left."""
        while self._idle:
            if self._idle[-1].done():  # its runner was cancelled
                self._idle.pop()
                continue
            run = self._work()
            if run is None:
                break
            self._idle.pop().set_result(run)
        if self._nothing_left():
            for waiter in self._idle:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle.clear()

    def _coalesce(self) -> None:
        """Hold the event loop for COALESCE_S at a time while requests stream, then let it take what
        arrived meanwhile: a worker's result line is one packet, and waking for each (hundreds a
        second from a large fleet) costs far more than reading it, so lines are read many at a
        time. After a hold the loop runs free for FREE_S, time enough for what the input set going
        (a stream's end, the next request) to run through its steps, one loop turn each. While no
        request is due to end soon and no runner waits, for work or to retry, the holds are
        QUIET_HOLD_S: only result lines can come, and they wait that long at most. A route call, and
        the post that follows it for POST_S, are not held: a worker waits for them."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if self._routing == 0 and self._streaming and not self._closing and now >= self._hold_from:
            quiet = not self._idle and not self._retrying and self._next_due() > now + QUIET_HOLD_S + DUE_MARGIN_S
            time.sleep(QUIET_HOLD_S if quiet else COALESCE_S)
            self._coalescing = loop.call_later(FREE_S, self._coalesce)
        else:
            self._coalescing = loop.call_later(COALESCE_S, self._coalesce)

    def _expect(self, run: Running) -> None:
        """Note when a request that just opened ends by itself, as far as the client can tell. Ended
        requests leave the heap at its top, or all at once when they outnumber the running ones."""
        if len(self._due) > 2 * self.plan.running_count + 64:
            self._due = [entry for entry in self._due if not entry[2].ended]
            heapq.heapify(self._due)
        heapq.heappush(self._due, (run.opened + run.outlook(run.opened)[0], next(self._due_order), run))

    def _next_due(self) -> float:
        """The earliest time a running request ends by itself (inf: none does)."""
        due = self._due
        while due and due[0][2].ended:
            heapq.heappop(due)
        return due[0][0] if due else math.inf

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._dispatch()
            self._show()
            if self.deadline is not None and time.monotonic() > self.deadline + DEADLINE_GRACE_S:
                for track in self.plan.tracks:
                    for run in list(track.running):
                        if run.stop is not None:
                            run.stop()

    # One request -----------------------------------------------------------------------------------

    async def _request(self, run: Running) -> str | None:
        """Send one request and read it to its end; what failed, if anything."""
        url = failure = None
        lied = False
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.wait_timeout):
                url, stream = await self._open(run)
            if url is not None:  # else the search's deadline came first
                failure, lied = await self._read(run, url, stream)
        except TimeoutError:
            failure = f"no worker started the request within {self.wait_timeout:g} s" + self._route_error
            if self._streaming == 0 and self._last_progress <= began:
                self._stop(f"{failure}, and nothing progressed meanwhile")
        except Refused as e:
            failure = str(e)
        except Exception as e:  # noqa: BLE001 — a fault of the client's: the part goes back, the search goes on
            log.debug("request failed", exc_info=e)
            failure = f"{type(e).__name__}: {e}"
        finally:
            failure = self._end(run, url, failure, lied)
        return failure

    async def _open(self, run: Running):
        """Route the request to a worker the client does not avoid and open its stream; (url, stream),
        or (None, None) when the search's deadline came first."""
        attempt = 0
        fitted = False
        while True:
            if attempt:
                await asyncio.sleep(REROUTE.pause(attempt))
            attempt += 1
            cost = self.cost if self.cost is not None else (0 if run.hi == ENDLESS else run.hi - run.settled)
            self._routing += 1
            try:
                auth = await self.router.route(cost)
            except Exception as e:  # noqa: BLE001 — the SDK raises RuntimeError for a failed /route/ call
                self._route_error = f" (the last route call: {type(e).__name__}: {str(e)[:200]})"
                continue
            finally:
                self._routing -= 1
                self._hold_from = time.monotonic() + POST_S
            url = auth.get("url")
            if not url or self.fleet.avoided(url, time.monotonic()):
                continue
            worker = self.fleet.get(url)
            if not fitted:
                if worker.rate and run.hi != ENDLESS and not run.backup and not self._fleet_known.is_set():
                    # The first requests end together: rather than a second probe, a part sized for the
                    # fleet once its speed is known (_learnt).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FLEET_WAIT_S):
                            await self._fleet_known.wait()
                quantum = worker.quantum if worker.rate else self.fleet.quantum
                if run.backup:
                    self.plan.fit_backup(run, worker.rate, self.plan.part_size(worker.rate, self._fleet_rate(), quantum))
                else:  # a worker that runs one of the search's requests starts this one after it
                    now = time.monotonic()
                    busy_s = max([r.outlook(now)[0] for r in self._running_on.get(url, ())] + [0.0])
                    self.plan.resize(run, self.plan.part_size(worker.rate, self._fleet_rate(), quantum, busy_s))
                fitted = True
            run.bound(worker.rate)
            payload = self._payload(run)
            if payload is None:
                return None, None
            self.requests += 1
            worker.requests += 1
            try:
                answer = await self.router.open(auth, ROUTE, payload)
            except Exception as e:  # noqa: BLE001 — aiohttp's connection errors: the worker is unreachable
                self._worker_failed(url, f"unreachable ({type(e).__name__}: {e})")
                continue
            if answer.get("ok"):
                run.worker, run.opened, run.quantum = url, time.monotonic(), worker.quantum
                self._expect(run)
                log.info("%s: nonces from %d (%s)", url, run.track.sequence.nonce(run.settled),
                         "to the end" if run.hi == ENDLESS else f"{run.hi - run.settled} of them")
                return url, answer["stream"]
            status = answer.get("status")
            body = json.dumps(answer["json"]) if answer.get("json") is not None else (answer.get("text") or "")
            body = body[:300]
            if status in BUSY_STATUSES:
                self.fleet.busy(url)
            elif status in REFUSED_STATUSES:
                self._worker_failed(url, f"refused the request ({status}): {body}", lied=True)
                refusers = self._refusals.setdefault(f"{status}: {body}", set())
                refusers.add(url)
                if len(refusers) >= min(2, self.search.workers):
                    message = f"{len(refusers)} workers refused the request ({status}): {body}"
                    self._stop(message)
                    raise Refused(message)
            else:
                self._worker_failed(url, f"answered {status}: {body}")

    def _worker_failed(self, url: str, cause: str, lied: bool = False) -> None:
        """A worker failed before it started the request: avoided for a while, the request goes elsewhere."""
        self.fleet.failed(url, cause, lied)
        self._note(f"{url}: {cause}; the request goes to another worker")

    def _fleet_rate(self) -> float | None:
        return self.fleet.total_rate(self.search.workers) if self._fleet_known.is_set() else None

    def _learnt(self) -> None:
        """A worker's speed was measured: the fleet's is known once most workers have reported, or
        FLEET_SETTLE_S after a quarter have (Fleet.total_rate), so that the parts that take the
        search to its end are sized from most of the first requests (a quarter of them is a sample
        whose mean is a few percent off) without waiting for those that will not report soon."""
        workers = self.search.workers
        if self.fleet.measured >= FLEET_KNOWN * workers:
            self._fleet_known.set()
        elif self._fleet_settling is None and self.fleet.total_rate(workers) is not None:
            self._fleet_settling = asyncio.get_running_loop().call_later(FLEET_SETTLE_S, self._fleet_known.set)

    def _payload(self, run: Running) -> dict | None:
        """The request's body: its range, and the time it may take (the rest of the search's time,
        or its part's bound); None once the search's time is up."""
        body = {**self._body, **run.fields}
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left < 1.0:
                return None
            body["duration_s"] = round(left, 3)
        elif run.bound_s is not None:
            body["duration_s"] = round(run.bound_s, 3)
        return body

    async def _read(self, run: Running, url: str, stream) -> tuple[str | None, bool]:
        """Read the request's lines to its summary: (what failed, whether the worker lied)."""
        sequence, base = run.track.sequence, run.settled
        check = RequestCheck(sequence.nonce(base), sequence.n_nodes, None if run.hi == ENDLESS else run.hi - base,
                             self.search.r_target)
        self._streaming += 1
        self._running_on.setdefault(url, []).append(run)
        self._last_progress = time.monotonic()
        try:
            async with Silence(self.stall_timeout) as silence:
                while True:
                    try:
                        text, line = await anext(stream)
                    except StopAsyncIteration:
                        return "its stream ended without a summary", False
                    except Exception as e:  # noqa: BLE001 — aiohttp's payload and connection errors: the worker is gone
                        return f"its stream broke ({type(e).__name__}: {e})", False
                    silence.heard()
                    try:
                        if self._line(run, url, check, base, line, text):
                            if not run.done_elsewhere:
                                await self.router.drain(stream)
                            return None, False
                    except Violation as e:
                        return f"it sent what a correct worker never sends: {e}", True
                    except _JobFailed:
                        return "its job failed (an error line, then the summary)", False
        except TimeoutError:
            return f"no line from it for {self.stall_timeout:g} s", False
        finally:
            self._streaming -= 1
            self._running_on[url].remove(run)
            try:
                await stream.aclose()
            except Exception:  # noqa: BLE001 — closing a broken connection
                pass

    def _line(self, run: Running, url: str, check: RequestCheck, base: int, line, text: str) -> bool:
        """One line of a request's stream (`text`, parsed: `line`); True once it was the summary."""
        if not isinstance(line, dict):
            raise Violation(f"a line that is not an object: {json.dumps(line)[:80]}")
        if line.get("status") == "done":
            reason = check.summary(line)
            self._settle(run, base + check.settled)
            log.info("%s: %s after %d nonces in %.1f s", url, reason, check.settled, time.monotonic() - run.opened)
            if reason == "error":
                raise _JobFailed
            self.fleet.served(url, *self._speed(run, check.settled, line.get("elapsed_seconds")))
            if not self._fleet_known.is_set():
                self._learnt()
            if reason == "shutdown":
                self.fleet.busy(url)
            return True
        if "nonces" not in line and "error" in line:
            log.warning("%s reported: %s", url, str(line["error"])[:300])
            return False
        indices = check.result(line)
        if run.first_line is None:
            run.first_line = (line.get("elapsed_seconds"), check.reached)
        worker = self.fleet.get(url)
        if isinstance(line.get("batch_computed"), int) and check.groups * line["batch_computed"] > worker.quantum:
            worker.quantum = check.groups * line["batch_computed"]
            self.fleet.quantum = max(self.fleet.quantum, worker.quantum)
        if base + check.settled > run.settled:
            self._settle(run, base + check.settled)
        self._print(run, worker, line, text, indices, base)
        return run.done_elsewhere  # the rest of its range is done: it may stop

    @staticmethod
    def _speed(run: Running, computed: int, elapsed) -> tuple[int, float]:
        """What a request that ended well (`computed` nonces, its summary's `elapsed`) tells of its
        worker's speed: (nonces, seconds) from its first result line to its summary by the worker's
        own clock (the lines' elapsed_seconds), where that span is RATE_SPAN_S or more; else from
        its stream's start by the client's, which holds the job's start (and at a worker's first
        request the build of the weights, seconds on a GPU) and the client's own delays."""
        if run.first_line is not None:
            began, reached = run.first_line
            if _is_seconds(began) and _is_seconds(elapsed) and elapsed - began >= RATE_SPAN_S:
                return computed - reached, elapsed - began
        return computed, time.monotonic() - run.opened

    def _print(self, run: Running, worker: Worker, line: dict, text: str, indices: list[int], base: int) -> None:
        plan, track = self.plan, run.track
        keep = [i for i, k in enumerate(indices) if plan.is_new(track, base + k)]
        if not keep:
            return
        if len(keep) < len(indices):
            text = json.dumps({**line, "nonces": [line["nonces"][i] for i in keep],
                               "dist": [line["dist"][i] for i in keep], "batch_valid": len(keep)})
        worker.valid += len(keep)
        self._unwritten.append(text + "\n")
        if time.monotonic() - self._flushed > FLUSH_S:
            self._flush()

    def _flush(self) -> None:
        """Write the lines held back, in one system call even where stdout is unbuffered (PYTHONUNBUFFERED)."""
        if self._unwritten:
            self.out.write("".join(self._unwritten))
            self._unwritten.clear()
        self.out.flush()
        self._flushed = time.monotonic()

    def _settle(self, run: Running, k: int) -> None:
        before = self.plan.computed
        for other in self.plan.settle(run, k):
            other.done_elsewhere = True
            if other is not run and other.stop is not None:
                other.stop()
        if self.plan.computed > before:
            self._last_progress = time.monotonic()
            if run.worker:
                self.fleet.get(run.worker).computed += self.plan.computed - before
        if self.plan.finished:
            self._dispatch()

    def _end(self, run: Running, url: str | None, failure: str | None, lied: bool) -> str | None:
        if run.done_elsewhere or self._closing:
            failure = None  # stopped: its range is done, or the search is over
        self.plan.end(run, worker_failed=failure)
        if failure is not None:
            if url is not None:
                self.fleet.failed(url, failure, lied)
            self.restarts += 1
            sequence = run.track.sequence
            given_up = any(p.lo < run.hi and run.settled < p.hi for p in self.plan.given_up if p.track is run.track)
            then = (f"nonces from {sequence.nonce(run.settled)} go back to the queue" if not given_up
                    else f"given up after {self.plan.give_up_after} failures in a row")
            self._note(f"{url or 'no worker'}: {failure}; {then}")
        self._dispatch()
        return failure

    def _stop(self, error: str) -> None:
        """Nothing more can be done: no new request starts; the running ones end."""
        if self.error is None:
            self.error = error
            self._note(f"error: {error}")
        self.plan.give_up_pending(error)
        self._closing = True
        for track in self.plan.tracks:
            for run in list(track.running):
                if run.stop is not None:
                    run.stop()
        self._dispatch()

    def _note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.warning(message)

    def _show(self) -> None:
        self._flush()
        if self.bar is not None:
            self.bar.update(self.plan.computed - self.bar.n)
            self.bar.set_postfix(valid=self.plan.valid, running=self._streaming, restarts=self.restarts)
