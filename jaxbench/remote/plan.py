"""Which nonces a remote search asks each request for, and what is done: no network here.

The search is one or more sequences in the `/generate` schedule (docs/algorithm.md §7): node i of N
from `start` computes the k-th nonce `start + i + k·N`. A request is a range [lo, hi) of one
sequence's k, sent as `start_nonce = start + lo·N`, `node_id = i`, `n_nodes = N` and
`max_nonces = hi − lo` (no `max_nonces` for a range without end), which a worker understands as it
is. With `--max-nonces M` there is one sequence (node 0 of 1) of M nonces, handed out in parts:
a worker whose speed is not known yet gets an equal share of the whole search and is asked to stop
after PROBE_S, so that the first requests end together and the first speeds known are a fair sample
(the runner has a worker wait briefly for the fleet's speed rather than probe again; PROBE_S of its
work if it does not come); then each part is the worker's speed × the time the rest of the search
would take the whole fleet (at least MIN_PART_S, less the time the worker is busy with another
request of the search first), so that parts end together at the search's end: few requests a
worker, and a request costs the client far more than a result line. A part is cut from the fresh
range that fits it best (`resize`): the ranges a first request leaves are of many sizes, and a fast
worker handed a small one comes back for more. What a part leaves of its range stays pending,
however little: a part that took it would end after the others. A fresh range given back joins the
fresh ranges beside it, so that a part can span them. Every part carries a time bound (`bound`): a
worker slower than thought gives the rest back. With `--duration` there is one endless sequence per
worker (node i of N = workers).

`Plan` keeps, per sequence, the `done` indices (computed, every result line received), the indices
printed but not yet done (so that no nonce is printed twice, whoever computes it again), the
`pending` ranges nobody runs, and the `running` requests. When pending work runs out while requests
still run, `backup` hands an idle worker a piece (about MIN_PART_S of its work) from the top of the
range the slowest running request has not settled (as much as a fresh part of a request that computes
nothing, a stuck one or a slow starter); whoever finishes an index first settles it, and
a request whose range is all done is stopped. So the search's end waits for no slow, stuck or
silent worker (a worker whose lines are rare settles its range only at its next line).
A range fails `give_up_after` times in a row on different workers (a worker failing it twice
counts once) before it is given up, and then it is listed as missing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from bisect import bisect_left, insort

from .intervals import Intervals, SortedInts

MIN_PART_S = 2.0  # a part is at least this many seconds of its worker's work
PROBE_S = 10.0  # a worker whose speed is not known yet is asked to stop after this many seconds
BOUND_SLACK = 1.5  # … one whose speed is known, after this × its part's expected time + MIN_PART_S
UNSTARTED_S = 5.0  # a request without a worker after this long may be backed up
LEFT_S = 0.5  # how long an estimate of the work left stands
ENDLESS = 1 << 64  # the end of a sequence without one (beyond every nonce)


@dataclasses.dataclass(frozen=True)
class Sequence:
    """Node `node_id` of `n_nodes` from `start`: the k-th nonce is start + node_id + k·n_nodes."""

    start: int
    node_id: int
    n_nodes: int
    count: int | None  # None: no end

    @property
    def end(self) -> int:
        return ENDLESS if self.count is None else self.count

    def nonce(self, k: int) -> int:
        return self.start + self.node_id + k * self.n_nodes

    def request_fields(self, lo: int, hi: int) -> dict:
        """The /generate fields of the range [lo, hi) (hi = ENDLESS: no max_nonces)."""
        out = {"start_nonce": self.start + lo * self.n_nodes, "node_id": self.node_id, "n_nodes": self.n_nodes}
        if hi != ENDLESS:
            out["max_nonces"] = hi - lo
        return out


class Track:
    """One sequence's state: what is done, and what was printed beyond it."""

    def __init__(self, sequence: Sequence, index: int):
        self.sequence = sequence
        self.index = index  # its place in the plan's order
        self.done = Intervals()
        self.printed = SortedInts()  # indices printed that are not done yet
        self.valid = 0  # nonces printed
        self.running: list[Running] = []


@dataclasses.dataclass(eq=False)
class Pending:
    track: Track
    lo: int
    hi: int
    failures: int = 0  # failed requests in a row for this range, on different workers
    failed_on: frozenset = frozenset()
    cause: str | None = None  # the last failure's


@dataclasses.dataclass(eq=False)
class Running:
    """A request in flight: the range [lo, hi) of its track; `settled` is its resume point."""

    track: Track
    lo: int
    hi: int
    failures: int = 0
    failed_on: frozenset = frozenset()
    worker: str | None = None
    rate: float | None = None  # the worker's nonces per second, when known
    started: float = dataclasses.field(default_factory=time.monotonic)  # handed out (then routed)
    opened: float | None = None  # the worker's stream opened
    first_line: tuple | None = None  # (elapsed_seconds, index) of its first result line: all below computed
    bound_s: float | None = None  # the request's duration_s: the worker stops after it
    quantum: int = 1  # nonces of the worker's full step, as far as known
    settled: int = 0  # absolute index: everything in [lo, settled) settled by this request
    done_elsewhere: bool = False  # stopped because other requests did all of its range
    ended: bool = False
    backup: bool = False  # it runs the top of another running request's range: its `victim`
    victim: Running | None = None
    against: float = 0.0  # a backup: the victim's speed when the backup was made
    uncovered: int = 0  # … and where the part of its range that the backup may take began
    stop = None  # set by the runner: a callable that ends the request

    def __post_init__(self):
        self.settled = self.lo
        self.backups: list[Running] = []  # the running backups of its range

    def ancestors(self):
        """The running requests whose ranges hold this one's: its victim, the victim's, …"""
        run = self.victim
        while run is not None and not run.ended:
            yield run
            run = run.victim

    @property
    def fields(self) -> dict:
        return self.track.sequence.request_fields(self.settled, self.hi)

    def bound(self, rate: float | None) -> None:
        """The time the worker gets for the part: PROBE_S while its speed is unknown."""
        self.rate = rate
        if self.hi == ENDLESS:
            self.bound_s = None
        else:
            self.bound_s = PROBE_S if not rate else BOUND_SLACK * (self.hi - self.settled) / rate + MIN_PART_S

    def outlook(self, now: float) -> tuple[float, float]:
        """(seconds until it ends by itself, nonces per second it computes) as far as the client can
        tell: a request past its time bound without a summary, or without a worker after
        UNSTARTED_S, may be stuck (inf, 0); one still being routed is left alone (0, 0)."""
        if self.opened is None:
            return (math.inf, 0.0) if now - self.started > UNSTARTED_S else (0.0, 0.0)
        end = self.opened + (self.bound_s if self.bound_s is not None else math.inf)
        if now > end + MIN_PART_S:
            return math.inf, 0.0
        if not self.rate:
            return end - now, 0.0
        at = max(self.settled, self.lo + self.rate * (now - self.opened))
        return max(0.0, min(end - now, (self.hi - at) / self.rate)), self.rate


class Plan:
    def __init__(self, sequences: list[Sequence], workers: int, give_up_after: int):
        self.tracks = [Track(s, i) for i, s in enumerate(sequences)]
        self.workers = workers
        self.give_up_after = give_up_after
        self.pending: list[Pending] = []  # in sequence order: the earliest are run first
        self.pending_size = 0  # indices pending in bounded ranges
        self._fresh: dict[int, list[tuple[int, int]]] = {}  # track index → (size, lo) of its fresh bounded ranges, sorted
        for t in self.tracks:
            self._insert(len(self.pending), Pending(t, 0, t.sequence.end))
        self.given_up: list[Pending] = []
        self.bounded = all(s.count is not None for s in sequences)
        self.total = sum(s.count for s in sequences) if self.bounded else None
        # Every first request gets as much, so that none ends before PROBE_S by running out of work,
        # and so that the first speeds known are not those of the fastest workers.
        self.share = self.pending_size / workers
        self.computed = 0  # indices done, over every track
        self._left, self._left_at = 0.0, -math.inf
        self.valid = 0
        self.running_count = 0

    # Handing out work ------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.bounded and self.computed == self.total

    def part_size(self, rate: float | None, fleet_rate: float | None, quantum: int, busy_s: float = 0.0) -> int:
        """How many indices a new part of a bounded range gets, for a worker of `rate` nonces/s
        (None: not known yet) when all the workers together do `fleet_rate` (None: not known yet),
        and which starts it only after `busy_s` (it runs another request first)."""
        if rate and fleet_rate:
            size = rate * max(MIN_PART_S, self.work_left(fleet_rate) / fleet_rate - busy_s)
        elif rate:  # the fleet's speed is not known yet: PROBE_S of this worker's work
            size = rate * PROBE_S
        else:  # a first request: an equal share of the search (it stops after PROBE_S anyway)
            size = self.share
        return max(quantum, math.ceil(size / quantum) * quantum)

    def work_left(self, fleet_rate: float) -> float:
        """Indices of bounded ranges not computed yet, as far as the client can tell: the pending
        ones, and what the running requests have not reached at their workers' speed (their lines
        may settle it only later), or at the fleet's mean speed (`fleet_rate` / workers) where a
        worker's is not known yet. Worked out at most every LEFT_S: it costs a pass over them."""
        now = time.monotonic()
        if now - self._left_at > LEFT_S:
            left = self.pending_size
            mean = fleet_rate / self.workers
            for track in self.tracks:
                if track.sequence.count is not None:
                    for run in track.running:
                        at = run.settled if run.opened is None else max(
                            run.settled, run.lo + (run.rate or mean) * (now - run.opened))
                        left += max(0.0, run.hi - at)
            self._left, self._left_at = left, now
        return self._left

    def take(self, size: int, least: int = 0) -> Running | None:
        """The next pending work: the front of the earliest pending range, `size` indices of a
        bounded one (all of it if less than `least`, the smallest part worth a request of its own,
        would be left), or a whole endless one."""
        if not self.pending:
            return None
        p = self.pending[0]
        hi = p.hi if p.hi == ENDLESS or p.hi - p.lo < size + least else p.lo + size
        if hi == p.hi:
            self._pop(0)
        else:
            self._replace(0, dataclasses.replace(p, lo=hi))
        return self._start(Running(p.track, p.lo, hi, p.failures, p.failed_on))

    def resize(self, run: Running, size: int) -> None:
        """Fit a part not yet sent to `size` indices. A part of fresh work is cut again from the fresh
        range that fits it best: the smallest one that holds `size`, else the largest (so that a fast
        worker is not handed the rest of a probe it would finish early, and a slow one leaves the large
        ranges alone); what it leaves of that range stays pending. A part of a range that failed before
        keeps its place: it gives the excess back, or takes more from the pending range that follows it."""
        if run.hi == ENDLESS or run.backup:
            return
        if run.failures == 0:
            self._give_back(Pending(run.track, run.lo, run.hi))
            i = self._best_fit(run.track, size)
            p = self.pending[i]
            hi = min(p.hi, p.lo + size)
            if hi == p.hi:
                self._pop(i)
            else:
                self._replace(i, dataclasses.replace(p, lo=hi))
            run.lo = run.settled = p.lo
            run.hi = hi
            return
        want = run.lo + size
        if want < run.hi:
            self._give_back(Pending(run.track, want, run.hi, run.failures, run.failed_on))
            run.hi = want
        elif want > run.hi:
            for i, p in enumerate(self.pending):
                if p.track is run.track and p.lo == run.hi and p.failures == run.failures:
                    grown = min(p.hi, want)
                    if grown == p.hi:
                        self._pop(i)
                    else:
                        self._replace(i, dataclasses.replace(p, lo=grown))
                    run.hi = grown
                    break

    def _best_fit(self, track: Track, size: int) -> int:
        """The index of the fresh pending range of `track` that fits a part of `size` best (see resize);
        the earliest among equals."""
        fresh = self._fresh[track.index]
        j = bisect_left(fresh, (size, -1))
        if j == len(fresh):  # none holds it: the largest
            j = bisect_left(fresh, (fresh[-1][0], -1))
        return bisect_left(self.pending, (track.index, fresh[j][1]), key=_order)

    def backup(self, rate: float | None, now: float, part: int | None = None,
               stuck_only: bool = False) -> Running | None:
        """With nothing pending: a piece from the top of what the running request that looks the
        slowest has not settled (and no other backs up), for a worker of `rate` nonces/s whose fresh
        part would be `part` indices (fit_backup); None when every running request ends within
        MIN_PART_S. With `stuck_only` (while work is pending) only of a request that may be stuck.
        A request settles an index only when a line of a later step comes, maybe only with its
        summary: backups take its range down to what it has settled, so that it can be stopped once
        they are done."""
        least = math.inf if stuck_only else MIN_PART_S
        outlooks = [(*run.outlook(now), run) for track in self.tracks if track.sequence.count is not None
                    for run in track.running]
        # The one that ends last, of those with something uncovered (the largest such piece among equals):
        # what a request leaves uncovered costs more to work out than its outlook, so only for those.
        best = None
        for seconds, speed, run in sorted((o for o in outlooks if o[0] >= least), key=lambda o: o[0], reverse=True):
            if best is not None and seconds < best[0]:
                break
            lo, hi = self._uncovered(run)
            if hi > lo and (best is None or hi - lo > best[3] - best[2]):
                best = (seconds, run, lo, hi, speed)
        if best is None:
            return None
        _, run, lo, hi, speed = best
        backup = self._start(Running(run.track, lo, hi, backup=True, quantum=run.quantum))
        backup.victim, backup.against, backup.uncovered = run, speed, lo
        self.fit_backup(backup, rate, part)
        run.backups.append(backup)
        return backup

    def fit_backup(self, backup: Running, rate: float | None, part: int | None = None) -> None:
        """Size a backup not yet sent for a worker of `rate` nonces/s: the top of its range that ends
        when the request it backs up would reach it, at most MIN_PART_S of the worker's work. What a
        request that computes nothing (stuck, or starting slowly) holds is as good as pending work:
        a backup of it takes up to `part`, the worker's fresh part, if given."""
        span = backup.hi - backup.uncovered
        mine = rate or backup.against
        if not backup.against and part:
            span = min(span, part)
        elif mine:
            span = min(span * mine / (mine + backup.against), mine * MIN_PART_S)
        size = min(backup.hi - backup.uncovered, max(backup.quantum, math.ceil(span / backup.quantum) * backup.quantum))
        backup.lo = backup.settled = backup.hi - size

    def _uncovered(self, run: Running) -> tuple[int, int]:
        """The lowest part of what `run` has not settled that neither `done` nor its backups cover."""
        hi = min([b.lo for b in run.backups if b.lo >= run.settled] + [run.hi])
        gaps = run.track.done.gaps(run.settled, hi)
        return gaps[0] if gaps else (hi, hi)

    def _start(self, run: Running) -> Running:
        run.track.running.append(run)
        self.running_count += 1
        return run

    # Results ---------------------------------------------------------------------------------------

    def is_new(self, track: Track, k: int) -> bool:
        """Whether index k of `track` may be printed (it is not done and was not printed); records it."""
        if k in track.done or not track.printed.add(k):
            return False
        track.valid += 1
        self.valid += 1
        return True

    def settle(self, run: Running, k: int) -> list[Running]:
        """`run` has settled its range up to k: the requests (`run` too) whose range is all done now
        though they have not reached its end."""
        k = min(k, run.hi)
        if k <= run.settled:
            return []
        track, lo = run.track, run.settled
        run.settled = k
        added = track.done.add(lo, k)
        if not added:
            return []
        self.computed += added
        track.printed.drop(lo, k)
        if self.finished:
            return [r for t in self.tracks for r in t.running if r.settled < r.hi]
        # Only the requests whose ranges overlap run's may have become all done: its own, its backups'
        # and those it backs up.
        return [r for r in (run, *run.backups, *run.ancestors())
                if r.settled < r.hi and track.done.covers(r.settled, r.hi)]

    def end(self, run: Running, worker_failed: str | None = None) -> None:
        """The request is over; what it left undone goes back to pending unless another running
        request covers it (or, after `give_up_after` failures in a row, to `given_up`).
        `worker_failed`: the cause when the request failed through its worker (or finding one)."""
        track = run.track
        track.running.remove(run)
        run.ended = True
        if run.victim is not None and run in run.victim.backups:
            run.victim.backups.remove(run)
        self.running_count -= 1
        if not worker_failed:
            failures, failed_on = 0, frozenset()
        elif run.settled > run.lo:  # it progressed: a new run of failures
            failures, failed_on = 1, frozenset({run.worker})
        else:
            failures = run.failures + (run.worker is None or run.worker not in run.failed_on)
            failed_on = run.failed_on | {run.worker}
        left = track.done.gaps(run.settled, run.hi)
        for other in (*run.backups, *run.ancestors()):  # what the others cover stays theirs
            left = [g for a, b in left for g in _minus(a, b, other.settled, other.hi)]
        for lo, hi in left:
            p = Pending(track, lo, hi, failures, failed_on, worker_failed)
            if failures >= self.give_up_after:
                self.given_up.append(p)
            else:
                self._give_back(p)

    def _give_back(self, p: Pending) -> None:
        """Put `p` back in order, one range with the fresh work it touches (a part's rest beside the
        rest of its probe), so that a part can be cut from both."""
        i = bisect_left(self.pending, (p.track.index, p.lo), key=_order)
        if p.failures == 0:
            if i < len(self.pending) and _joins(p, self.pending[i]):
                p = dataclasses.replace(p, hi=self.pending[i].hi)
                self._pop(i)
            if i > 0 and _joins(self.pending[i - 1], p):
                self._replace(i - 1, dataclasses.replace(self.pending[i - 1], hi=p.hi))
                return
        self._insert(i, p)

    def _size(self, p: Pending) -> int:
        return 0 if p.hi == ENDLESS else p.hi - p.lo

    def _insert(self, i: int, p: Pending) -> None:
        self.pending.insert(i, p)
        self.pending_size += self._size(p)
        self._index(p)

    def _pop(self, i: int) -> None:
        p = self.pending.pop(i)
        self.pending_size -= self._size(p)
        self._unindex(p)

    def _replace(self, i: int, p: Pending) -> None:
        self.pending_size += self._size(p) - self._size(self.pending[i])
        self._unindex(self.pending[i])
        self.pending[i] = p
        self._index(p)

    def _index(self, p: Pending) -> None:
        if not p.failures and p.hi != ENDLESS:
            insort(self._fresh.setdefault(p.track.index, []), (p.hi - p.lo, p.lo))

    def _unindex(self, p: Pending) -> None:
        if not p.failures and p.hi != ENDLESS:
            fresh = self._fresh[p.track.index]
            del fresh[bisect_left(fresh, (p.hi - p.lo, p.lo))]

    def give_up_pending(self, cause: str) -> None:
        """Nothing more will run: every pending range is given up."""
        for p in self.pending:
            p.cause = p.cause or cause
        self.given_up.extend(self.pending)
        self.pending.clear()
        self.pending_size = 0
        self._fresh.clear()

    def missing(self) -> list[dict]:
        """What is not done, as /generate fields, in order."""
        out = []
        for track in self.tracks:
            for lo, hi in track.done.gaps(0, track.sequence.end):
                out.append(track.sequence.request_fields(lo, hi))
        return out


def least_part(rate: float | None, quantum: int) -> int:
    """The smallest part worth a request of its own: MIN_PART_S of a worker's work (`rate`)."""
    return max(quantum, int((rate or 0) * MIN_PART_S))


def _joins(a: Pending, b: Pending) -> bool:
    """Whether fresh range `a` ends where fresh range `b` begins."""
    return a.track is b.track and a.hi == b.lo and a.failures == b.failures == 0


def _order(p: Pending) -> tuple[int, int]:
    return p.track.index, p.lo


def _minus(a: int, b: int, c: int, d: int) -> list[tuple[int, int]]:
    """[a, b) without [c, d)."""
    return [(x, y) for x, y in ((a, min(b, c)), (max(a, d), b)) if x < y]
