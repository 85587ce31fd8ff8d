"""`python -m jaxbench remote search`: the bookkeeping on made-up lines (a request's stream checks,
the plan of parts, what is done and printed), bad input, then end to end: the real client (the
vastai SDK's Serverless client, streaming) against two real workers (model server and PyWorker,
CPU, `tiny`) behind a fake Vast autoscaler, all on 127.0.0.1, one worker killed mid-run.
tests/test_fleet.py runs the client against a simulated fleet of misbehaving workers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time

import pytest
from service_helpers import PLATFORM_ENV, host_devices_env, wait_until
from vast_helpers import (ACCOUNT_API_KEY, ENDPOINT_API_KEY, ENDPOINT_NAME, ROOT, FakeVast, WorkerStack,
                          running_workers)

from jaxbench.remote.intervals import Intervals, SortedInts
from jaxbench.remote.plan import ENDLESS, Plan, Running, Sequence, Track
from jaxbench.remote.runner import Silence
from jaxbench.remote.stream import RequestCheck, Violation
from jaxbench.remote.vast import Lines

DEVICES = 2
BATCH = 32
R_TARGET = 1.40  # about a quarter of the tiny model's distances are below it
SEARCH = ["--params", "tiny", "--block-hash", "remote-block", "--public-key", "remote-key",
          "--r-target", str(R_TARGET)]
START_TIMEOUT_S = 180


# A request's stream --------------------------------------------------------------------------------


def result(check: RequestCheck, step: int, group: int, groups: int, batch: int, ks: list[int],
           line_number: int, valid_before: int) -> dict:
    """A worker's line for device group `group` of step `step` (from 1) of the request `check`
    holds: its valid nonces are the request's indices `ks`."""
    following = step * groups * batch + group
    end = check.count
    return {"worker_id": group, "batch_number": step, "nonces": [check.first + k * check.stride for k in ks],
            "dist": [1.0] * len(ks), "batch_valid": len(ks), "batch_computed": batch, "n_workers": groups,
            "aggregated_batch_number": line_number, "aggregated_total_valid": valid_before + len(ks),
            "next_nonce": None if end is not None and following >= end else check.first + following * check.stride}


class Stream:
    """Lines for one RequestCheck, numbered and counted as a correct worker does."""

    def __init__(self, check: RequestCheck, groups: int, batch: int):
        self.check, self.groups, self.batch = check, groups, batch
        self.lines = self.valid = 0

    def line(self, step: int, group: int, ks: list[int]) -> dict:
        self.lines += 1
        out = result(self.check, step, group, self.groups, self.batch, ks, self.lines, self.valid)
        self.valid += len(ks)
        return out


def test_the_resume_point_trails_the_last_whole_step():
    check = RequestCheck(first=101, stride=3, count=None, r_target=1.5)  # nonces 101, 104, 107, …
    lines = Stream(check, groups=2, batch=4)
    # Two groups of 4: step 1 holds k 0-7 (group 0: k 0, 2, 4, 6; group 1: k 1, 3, 5, 7).
    assert check.result(lines.line(1, 0, [0, 4])) == [0, 4]
    check.result(lines.line(1, 1, [7]))
    assert check.settled == 0  # step 1's lines may not all be in yet
    check.result(lines.line(2, 1, [9]))
    assert check.settled == 8  # a line of step 2: step 1 is whole
    check.result(lines.line(4, 0, [24]))  # step 3 had no valid nonce
    assert check.settled == 16
    assert check.summary({"status": "done", "reason": "duration", "total_computed": 40, "total_valid": 5}) == "duration"
    assert check.settled == 40


def test_a_bounded_request_ends_at_its_count():
    check = RequestCheck(first=0, stride=2, count=10, r_target=1.5)
    lines = Stream(check, groups=4, batch=2)
    # Step 1 ends at k 8 (4 groups of 2); in step 2 only k 8 and 9 remain: group 1's next is past the end.
    check.result(lines.line(1, 3, [7]))
    last = lines.line(2, 1, [9])
    assert last["next_nonce"] is None
    check.result(last)
    assert check.settled == 8
    with pytest.raises(Violation, match="counts 9 nonces computed, its lines show 10 of 10"):
        check.summary({"status": "done", "reason": "completed", "total_computed": 9, "total_valid": 2})
    check.summary({"status": "done", "reason": "completed", "total_computed": 10, "total_valid": 2})
    assert check.settled == 10


def test_a_step_without_next_nonce_settles_on_its_highest_nonce():
    check = RequestCheck(first=0, stride=1, count=100, r_target=1.5)
    lines = Stream(check, groups=1, batch=8)
    check.result({**lines.line(1, 0, [2, 5]), "next_nonce": None})
    check.result(lines.line(2, 0, [9]))
    assert check.settled == 6  # everything up to the highest valid nonce of step 1 is certain


@pytest.mark.parametrize("spoil, message", [
    (lambda s, c: {**s.line(2, 0, [8])} | {"aggregated_batch_number": 3}, "line 3 of the stream came after line 1"),
    (lambda s, c: {**s.line(1, 0, [0])} | {"aggregated_batch_number": 1}, "came after line 1"),  # sent twice
    (lambda s, c: s.line(2, 0, [8]) | {"dist": []}, "nonces and dist"),
    (lambda s, c: s.line(2, 0, [8]) | {"nonces": [c.first + 8 + 1000]}, "is not one of the request's"),
    (lambda s, c: s.line(2, 0, [8]) | {"nonces": [c.first - 1]}, "is not one of the request's"),
    (lambda s, c: s.line(2, 0, [8]) | {"nonces": [c.first + 2]}, "does not belong to group 0 of step 2"),
    (lambda s, c: s.line(2, 1, [8]), "does not belong to group 1"),
    (lambda s, c: s.line(2, 0, [8]) | {"dist": [1.6]}, "not one below r_target"),
    (lambda s, c: s.line(2, 0, [8]) | {"dist": [float("nan")]}, "not one below r_target"),
    (lambda s, c: s.line(2, 0, [8]) | {"batch_valid": 2}, "batch_valid 2 for 1 nonces"),
    (lambda s, c: s.line(2, 0, [8]) | {"aggregated_total_valid": 7}, "aggregated_total_valid"),
    (lambda s, c: s.line(2, 0, [8]) | {"n_workers": 3}, "n_workers changed"),
    (lambda s, c: s.line(1, 0, [2]), "step 1, group 0 came after step 1, group 0"),
    (lambda s, c: s.line(2, 0, [8]) | {"next_nonce": c.first + 9}, "does not follow group 0"),
    (lambda s, c: {k: v for k, v in s.line(2, 0, [8]).items() if k != "next_nonce"}, "without next_nonce"),
])
def test_a_line_no_correct_worker_sends_breaks_the_stream(spoil, message):
    check = RequestCheck(first=1000, stride=1, count=64, r_target=1.5)
    lines = Stream(check, groups=2, batch=4)
    check.result(lines.line(1, 0, [0, 6]))
    with pytest.raises(Violation, match=message):
        check.result(spoil(lines, check))
    assert check.settled == 0 and check.lines == 1  # nothing of the bad line was taken


def test_a_summary_that_disagrees_with_the_lines_breaks_the_stream():
    check = RequestCheck(first=0, stride=1, count=64, r_target=1.5)
    lines = Stream(check, groups=1, batch=8)
    check.result(lines.line(1, 0, [3]))
    check.result(lines.line(2, 0, [9]))
    with pytest.raises(Violation, match="counts 1 valid nonces, its lines 2"):  # a line was lost at the end
        check.summary({"status": "done", "reason": "duration", "total_computed": 16, "total_valid": 1})
    with pytest.raises(Violation, match="counts 12 nonces computed, its lines show 16"):
        check.summary({"status": "done", "reason": "duration", "total_computed": 12, "total_valid": 2})
    with pytest.raises(Violation, match="completed after 16 of 64"):
        check.summary({"status": "done", "reason": "completed", "total_computed": 16, "total_valid": 2})
    assert check.settled == 8


class Response:
    """What Lines reads of an aiohttp response: `content.readany()`, then `release()`."""

    def __init__(self, chunks: list[bytes]):
        self.content = self
        self.chunks = chunks
        self.released = False

    async def readany(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def release(self) -> None:
        self.released = True


def test_a_streams_lines_are_whole_across_chunks_and_kept_as_sent():
    response = Response([b'{"a": 1}\n{"b": [1.', b'50]}\n\n', b'data: {"c": 2}\nnot json\n{"d": 3}'])

    async def read():
        lines = Lines(response)
        out = [pair async for pair in lines]
        await lines.aclose()
        return out

    assert asyncio.run(read()) == [('{"a": 1}', {"a": 1}), ('{"b": [1.50]}', {"b": [1.5]}),
                                   ('{"c": 2}', {"c": 2}), ('{"d": 3}', {"d": 3})]
    assert response.released


def test_silence_times_out_only_after_that_long_without_a_line():
    async def lines(gaps: list[float], seconds: float) -> str:
        async with Silence(seconds) as silence:
            for gap in gaps:
                await asyncio.sleep(gap)
                silence.heard()
        return "done"

    async def outcome(gaps: list[float], seconds: float) -> str:
        try:
            return await lines(gaps, seconds)
        except TimeoutError:
            return "timed out"

    async def cancelled_from_outside() -> bool:
        task = asyncio.create_task(lines([1.0], 0.5))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    # Lines 0.1 s apart for 0.6 s keep a 0.25 s silence from firing; a gap of 0.4 s does not.
    assert asyncio.run(outcome([0.1] * 6, 0.25)) == "done"
    assert asyncio.run(outcome([0.1, 0.1, 0.4], 0.25)) == "timed out"
    assert asyncio.run(cancelled_from_outside())


def test_the_loop_is_held_only_while_no_request_is_being_routed_or_posted():
    """While requests stream, the loop takes its input every COALESCE_S (one turn for the lines of
    many streams) and then runs free for FREE_S; every QUIET_HOLD_S while no request is due to end
    soon and no runner waits; a route call in flight, or one that ended less than POST_S ago, ends
    the holds."""
    from jaxbench.params import PRESETS
    from jaxbench.remote.runner import COALESCE_S, DUE_MARGIN_S, FREE_S, POST_S, QUIET_HOLD_S, RemoteSearch
    from jaxbench.remote.search import Search

    search = Search(PRESETS["tiny"], "hash", 0, "key", 1.4, "float16", 0, 1000, None, workers=2)

    async def hold(streaming: int, routing: int = 0, routed_ago: float = 10.0, due_in: float | None = 0.1,
                   idle: bool = False, retrying: int = 0) -> tuple[float, float]:
        """(seconds one call held the loop, delay of the next call), with one request that ends by
        itself in `due_in` seconds (None: none runs)."""
        remote = RemoteSearch(None, search)
        remote._streaming, remote._routing, remote._retrying = streaming, routing, retrying
        remote._hold_from = time.monotonic() - routed_ago + POST_S
        loop = asyncio.get_running_loop()
        if due_in is not None:
            run = Running(Track(remote.plan.tracks[0].sequence, 0), 0, 1000, rate=100.0)
            run.opened, run.bound_s = time.monotonic(), due_in
            remote._expect(run)
        if idle:
            remote._idle.append(loop.create_future())
        t0 = time.monotonic()
        remote._coalesce()
        held = time.monotonic() - t0
        delay = remote._coalescing.when() - loop.time()
        remote._coalescing.cancel()
        return held, delay

    held, delay = asyncio.run(hold(streaming=2))
    assert COALESCE_S <= held < QUIET_HOLD_S and delay == pytest.approx(FREE_S, abs=0.005)  # held, then free
    for case in (dict(due_in=QUIET_HOLD_S + DUE_MARGIN_S + 1.0), dict(due_in=None)):  # nothing due soon
        held, delay = asyncio.run(hold(streaming=2, **case))
        assert held >= QUIET_HOLD_S and delay == pytest.approx(FREE_S, abs=0.005), case
    for case in (dict(idle=True), dict(retrying=1)):  # a runner waits for work (a backup may come) or to retry
        held, delay = asyncio.run(hold(streaming=2, due_in=None, **case))
        assert COALESCE_S <= held < QUIET_HOLD_S, case
    for case in (dict(streaming=2, routing=1), dict(streaming=2, routed_ago=POST_S / 2), dict(streaming=0)):
        held, delay = asyncio.run(hold(**case))
        assert held < COALESCE_S / 2 and delay == pytest.approx(COALESCE_S, abs=0.01), case
    # The expected ends of requests that ended early (stopped, failed) do not pile up.
    remote = RemoteSearch(None, search)
    for i in range(1000):
        run = Running(Track(remote.plan.tracks[0].sequence, 0), 0, 1000, rate=100.0)
        run.opened, run.bound_s = time.monotonic(), 1000.0 - i
        remote._expect(run)
        run.ended = True
    assert len(remote._due) <= 64 + 1 and remote._next_due() == math.inf


# The plan --------------------------------------------------------------------------------------------


def test_intervals_merge_and_report_gaps():
    done = Intervals()
    assert done.add(10, 20) == 10 and done.add(30, 40) == 10 and done.add(15, 32) == 10
    assert done.intervals() == [(10, 40)] and done.size == 30
    assert done.add(0, 5) == 5 and done.gaps(0, 50) == [(5, 10), (40, 50)]
    assert 3 in done and 5 not in done and done.covers(10, 40) and not done.covers(4, 11)
    printed = SortedInts()
    assert printed.add(5) and not printed.add(5) and printed.add(9) and printed.add(12)
    printed.drop(6, 12)
    assert 5 in printed and 9 not in printed and 12 in printed and len(printed) == 2


def test_first_requests_take_equal_shares_and_what_fails_goes_back():
    plan = Plan([Sequence(start=100, node_id=0, n_nodes=1, count=10_000)], workers=4, give_up_after=3)
    sizes = []
    while plan.pending:
        run = plan.take(plan.part_size(None, None, quantum=8))
        sizes.append(run.hi - run.lo)
    assert sizes == [2504, 2504, 2504, 2488]  # a share each (in whole steps), whoever asks first
    first, second = plan.tracks[0].running[:2]
    assert first.fields == {"start_nonce": 100, "node_id": 0, "n_nodes": 1, "max_nonces": 2504}
    # The first request prints two nonces, settles [0, 1000) and dies: the rest goes back to pending.
    track = first.track
    assert plan.is_new(track, 400) and plan.is_new(track, 1200) and not plan.is_new(track, 1200)
    plan.settle(first, 1000)
    assert plan.computed == 1000 and not plan.is_new(track, 400)  # done: never printed again
    first.worker = "w1"
    plan.end(first, worker_failed="its stream broke")
    (back,) = plan.pending
    assert (back.lo, back.hi, back.failures) == (1000, 2504, 1)
    again = plan.take(10_000)
    assert again.fields["start_nonce"] == 1100 and not plan.is_new(track, 1200)  # printed before it died
    assert plan.missing() == [{"start_nonce": 1100, "node_id": 0, "n_nodes": 1, "max_nonces": 9000}]


def test_a_range_is_given_up_only_after_different_workers_fail_it():
    plan = Plan([Sequence(0, 0, 1, 100)], workers=1, give_up_after=3)
    for worker in ("a", "a", "b", "a", "c"):  # a failing twice in a row counts once
        run = plan.take(100)
        run.worker = worker
        plan.end(run, worker_failed=f"{worker} failed")
    assert not plan.pending and len(plan.given_up) == 1 and plan.given_up[0].cause == "c failed"
    assert plan.missing() == [{"start_nonce": 0, "node_id": 0, "n_nodes": 1, "max_nonces": 100}]


def test_backups_take_pieces_from_the_top_of_what_the_slowest_request_has_not_settled():
    plan = Plan([Sequence(0, 0, 1, 1000)], workers=2, give_up_after=3)
    fast, slow = plan.take(500), plan.take(500)
    for run, rate in ((fast, 100.0), (slow, 10.0)):
        run.opened, run.rate, run.bound_s = 0.0, rate, 60.0
    plan.settle(fast, 500)
    plan.end(fast)
    first = plan.backup(rate=100.0, now=1.0)  # slow needs 50 s for [500, 1000)
    assert first.backup and (first.lo, first.hi) == (800, 1000)  # MIN_PART_S of the backup's worker
    second = plan.backup(rate=100.0, now=1.0)
    assert (second.lo, second.hi) == (600, 800)
    plan.settle(slow, 580)
    third = plan.backup(rate=100.0, now=1.0)  # [580, 600): the faster one does 19 of the 20 meanwhile
    assert (third.lo, third.hi) == (581, 600)
    # slow ends by itself only in 42 s, and settles [580, 581) maybe only then: that too is backed up.
    fourth = plan.backup(rate=100.0, now=1.0)
    assert (fourth.lo, fourth.hi) == (580, 581) and plan.backup(rate=100.0, now=1.0) is None
    for backup in (first, second, third):
        assert plan.settle(backup, backup.hi) == []
    assert plan.settle(fourth, 581) == [slow] and plan.finished and plan.missing() == []  # slow may stop


def test_a_parts_rest_joins_the_fresh_work_beside_it():
    plan = Plan([Sequence(0, 0, 1, 1000)], workers=2, give_up_after=3)
    first, second = plan.take(300), plan.take(300)  # [0, 300), [300, 600); [600, 1000) pending
    plan.settle(second, 400)
    plan.end(second)  # stopped by its time bound: [400, 600) is fresh work beside [600, 1000)
    assert [(p.lo, p.hi) for p in plan.pending] == [(400, 1000)] and plan.pending_size == 600
    plan.settle(first, 100)
    first.worker = "w1"
    plan.end(first, worker_failed="its stream broke")  # a failed range stays apart: its failures count
    assert [(p.lo, p.hi, p.failures) for p in plan.pending] == [(100, 300, 1), (400, 1000, 0)]
    assert plan.take(600).fields == {"start_nonce": 100, "node_id": 0, "n_nodes": 1, "max_nonces": 200}
    assert plan.take(600).fields == {"start_nonce": 400, "node_id": 0, "n_nodes": 1, "max_nonces": 600}


def test_a_part_is_cut_from_the_fresh_range_that_fits_it_best():
    plan = Plan([Sequence(0, 0, 1, 1000)], workers=3, give_up_after=3)
    probes = [plan.take(100) for _ in range(3)]  # [0, 100), [100, 200), [200, 300); [300, 1000) pending
    for probe, reached in zip(probes, (40, 190, 250)):  # stopped by PROBE_S: the rests are fresh work
        plan.settle(probe, reached)
        plan.end(probe)
    assert [(p.lo, p.hi) for p in plan.pending] == [(40, 100), (190, 200), (250, 1000)]
    slow = plan.take(50)  # the front, before the worker is known …
    plan.resize(slow, 8)  # … then the smallest range that holds its part
    assert (slow.lo, slow.hi) == (190, 198)
    medium = plan.take(50)
    plan.resize(medium, 50)  # what it leaves of [40, 100) stays pending, however little
    assert (medium.lo, medium.hi) == (40, 90)
    fast = plan.take(50)
    plan.resize(fast, 900)  # none holds it: the largest
    assert (fast.lo, fast.hi) == (250, 1000) and [(p.lo, p.hi) for p in plan.pending] == [(90, 100), (198, 200)]
    assert plan.pending_size == 12 and sorted((r.lo, r.hi) for r in plan.tracks[0].running) == [
        (40, 90), (190, 198), (250, 1000)]


def test_the_best_fit_index_follows_every_change_of_the_pending_work():
    """Random takes, resizes, settles, failures and ends: the size index of the fresh ranges stays what
    the pending list holds, and the best fit is what a scan of that list finds."""
    import random

    rng = random.Random(7)

    def scanned_best_fit(plan, size):
        fresh = [(i, p.hi - p.lo) for i, p in enumerate(plan.pending) if not p.failures]
        holding = [(have, i) for i, have in fresh if have >= size]
        return min(holding)[1] if holding else min((-have, i) for i, have in fresh)[1]

    for _ in range(20):
        plan = Plan([Sequence(0, 0, 1, 5000)], workers=8, give_up_after=3)
        running = []
        for _ in range(60):
            if plan.pending and (len(running) < 8 and rng.random() < 0.6):
                run = plan.take(rng.randint(1, 400), least=rng.randint(0, 50))
                if rng.random() < 0.7:  # fitted at its route
                    plan.resize(run, rng.randint(1, 900))
                running.append(run)
            elif running:
                run = running.pop(rng.randrange(len(running)))
                plan.settle(run, rng.randint(run.lo, run.hi))
                run.worker = f"w{rng.randrange(4)}"
                plan.end(run, worker_failed="broke" if rng.random() < 0.3 else None)
            index = sorted((p.hi - p.lo, p.lo) for p in plan.pending if not p.failures)
            assert plan._fresh.get(0, []) == index
            if index:
                size = rng.randint(1, 1200)
                assert plan._best_fit(plan.tracks[0], size) == scanned_best_fit(plan, size)


def test_the_work_left_counts_a_first_request_at_the_fleets_mean_speed():
    """What the running requests have not reached counts in the work left: at their workers' speed
    where it is known, at the fleet's mean speed where it is not (a first request, whose lines may
    settle nothing for seconds), and all of it for a request whose stream has not opened."""
    plan = Plan([Sequence(0, 0, 1, 10_000)], workers=4, give_up_after=3)
    first, known, unopened = plan.take(1000), plan.take(1000), plan.take(1000)
    now = time.monotonic()
    first.opened = now - 5.0  # 400 nonces/s from 4 workers: 100 a worker, so 500 of its 1000 done
    known.opened, known.rate = now - 5.0, 50.0  # 250 done
    assert unopened.opened is None
    assert plan.work_left(fleet_rate=400.0) == pytest.approx(7000 + 500 + 750 + 1000, abs=2)


def test_a_workers_speed_is_learnt_from_its_first_result_line_to_its_summary():
    """By the worker's own clock (the lines' elapsed_seconds), where that span is long enough: the
    stream's start also holds the job's start and, at a first request, the build of the weights.
    Otherwise, or where the worker's clock is not a number of seconds, from the stream's start."""
    from jaxbench.remote.runner import RemoteSearch

    run = Running(Track(Sequence(0, 0, 1, 10_000), 0), 0, 10_000)
    run.opened = time.monotonic() - 12.0
    run.first_line = (2.5, 640)  # every index below 640 was computed 2.5 s into the request
    assert RemoteSearch._speed(run, 2688, 10.5) == (2048, 8.0)
    for began, elapsed in ((2.5, 4.0), (None, 10.5), (2.5, "10.5"), (2.5, math.inf), (True, 10.5), (-1.0, 10.5)):
        run.first_line = (began, 640)
        nonces, seconds = RemoteSearch._speed(run, 2688, elapsed)
        assert nonces == 2688 and seconds == pytest.approx(12.0, abs=0.5), (began, elapsed)


def test_the_fleets_speed_is_known_once_most_workers_reported_or_soon_after_a_quarter(monkeypatch):
    """Parts to the search's end are sized from the fleet's speed: a quarter of the workers is a
    sample a few percent off, so it counts once FLEET_KNOWN of them have reported, or FLEET_SETTLE_S
    after a quarter have (the rest may be slow to start, or dead)."""
    from jaxbench.params import PRESETS
    from jaxbench.remote import runner
    from jaxbench.remote.search import Search

    monkeypatch.setattr(runner, "FLEET_SETTLE_S", 0.2)
    search = Search(PRESETS["tiny"], "hash", 0, "key", 1.4, "float16", 0, 100_000, None, workers=40)

    async def reported(n: int) -> tuple[bool, bool]:
        """(known as the n-th reported, known FLEET_SETTLE_S later)"""
        remote = runner.RemoteSearch(None, search)
        for i in range(n):
            remote.fleet.served(f"http://w{i}", 1000, 4.0)
            remote._learnt()
        at_once = remote._fleet_known.is_set()
        assert (remote._fleet_rate() is not None) == at_once
        await asyncio.sleep(0.3)
        assert (remote._fleet_rate() == pytest.approx(40 * 250.0)) == remote._fleet_known.is_set()
        return at_once, remote._fleet_known.is_set()

    assert asyncio.run(reported(36)) == (True, True)  # FLEET_KNOWN of them
    assert asyncio.run(reported(10)) == (False, True)  # a quarter
    assert asyncio.run(reported(9)) == (False, False)


def test_a_backup_of_a_request_that_computes_nothing_takes_a_whole_part():
    plan = Plan([Sequence(0, 0, 1, 10_000)], workers=2, give_up_after=3)
    stuck, done = plan.take(5000), plan.take(5000)
    stuck.opened, stuck.bound_s = 0.0, 10.0  # its speed unknown, past its bound: it may be stuck
    plan.settle(done, 10_000)
    plan.end(done)
    piece = plan.backup(rate=100.0, now=30.0)
    assert (piece.lo, piece.hi) == (4800, 5000)  # MIN_PART_S of the worker's work when no part is given
    plan.settle(piece, 5000)
    plan.end(piece)
    part = plan.backup(rate=100.0, now=30.0, part=3000)
    assert part.victim is stuck and (part.lo, part.hi) == (1800, 4800) and not plan.pending


def test_while_work_is_pending_only_a_request_that_may_be_stuck_is_backed_up():
    plan = Plan([Sequence(0, 0, 1, 10_000)], workers=3, give_up_after=3)
    stuck, running = plan.take(2000), plan.take(2000)  # [4000, 10000) pending
    stuck.opened, stuck.bound_s = 0.0, 10.0  # a first request: its speed not known yet
    running.opened, running.bound_s, running.rate = 0.0, 30.0, 100.0  # 20 s of work left at 13 s
    assert plan.backup(rate=100.0, now=5.0, part=1000, stuck_only=True) is None  # none past its bound yet
    piece = plan.backup(rate=100.0, now=13.0, part=1000, stuck_only=True)  # 10 s + MIN_PART_S: may be stuck
    assert piece.victim is stuck and (piece.lo, piece.hi) == (1000, 2000)
    assert plan.pending_size == 6000


def test_a_duration_search_has_one_endless_part_per_worker():
    plan = Plan([Sequence(7, i, 3, None) for i in range(3)], workers=3, give_up_after=5)
    runs = [plan.take(1) for _ in range(3)]
    assert [r.fields for r in runs] == [{"start_nonce": 7, "node_id": i, "n_nodes": 3} for i in range(3)]
    assert all(r.hi == ENDLESS for r in runs) and plan.take(1) is None
    plan.settle(runs[1], 40)
    plan.end(runs[1])
    assert plan.take(1).fields == {"start_nonce": 7 + 40 * 3, "node_id": 1, "n_nodes": 3}


# The command line ----------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_status_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": "x"}
    for args, field in ((["--workers", "0", "--max-nonces", "10"], "--workers"),
                        (["--workers", "20", "--max-nonces", "10"], "--workers"),
                        (["--max-nonces", "10", "--dtype", "int8"], "--dtype"),
                        (["--max-nonces", "10", "--params", "@/nonexistent/params.json"], "--params"),
                        (["--max-nonces", "10", "--params", '{"dim": 63}'], "--params: dim"),
                        (["--max-nonces", "10", "--params", '{"dim": ' + "9" * 5000 + "}"], "--params"),
                        (["--max-nonces", "10", "--max-attempts", "0"], "--max-attempts"),
                        (["--max-nonces", "10", "--stall-timeout", "nan"], "--stall-timeout"),
                        (["--max-nonces", "10", "--vast-ca-file", "/nonexistent.pem"], "--vast-ca-file"),
                        (["--max-nonces", "10", "--vast-ca-file", __file__], "--vast-ca-file"),
                        (["--max-nonces", "10", "--start-nonce", str(2**63)], "--start-nonce"),
                        (["--max-nonces", "11", "--start-nonce", str(2**63 - 10)], "--max-nonces"),
                        (["--max-nonces", "10", "--block-height", str(2**63)], "--block-height"),
                        (["--max-nonces", "10", "--screen-margin", "0.01"], "--screen-margin"),
                        (["--max-nonces", "10", "--screen", "fp8", "--screen-margin", "1"], "--screen-margin")):
        out = subprocess.run([sys.executable, "-m", "jaxbench", "remote", "search", "--endpoint", "e", *SEARCH, *args],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {field}:"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    # The last nonce of the space is a nonce: --start-nonce 2**63 - 10 with 10 nonces is fine (it fails later, at
    # Vast, which is not there).
    out = subprocess.run([sys.executable, "-m", "jaxbench", "remote", "search", "-v", "--endpoint", "e", *SEARCH,
                          "--max-nonces", "10"], env={**env, "VAST_API_KEY": ""}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and out.stderr == ("error: VAST_API_KEY: is not set (the API key of the Vast.ai "
                                                  "account that owns the endpoint)\n"), out.stderr


def test_the_sdks_connection_limit_follows_the_workers():
    from argparse import Namespace

    from jaxbench.remote import vast

    args = Namespace(autoscaler_url=None, webserver_url=None)
    assert vast.client("key", args, None, connection_limit=2 * 510 + 16).connection_limit == 1036
    assert vast.client("key", args, None, connection_limit=10).connection_limit == 500  # never below the SDK's

    async def session_connector():
        async with vast.client("key", args, ssl.create_default_context(), connection_limit=1036) as c:
            connector = (await c._get_session()).connector
            return connector.limit, connector._keepalive_timeout

    # The session the requests go through: the limit, and idle connections kept between waves of requests.
    assert asyncio.run(session_connector()) == (1036, vast.KEEPALIVE_S)


def test_the_client_imports_the_sdks_serverless_client_alone():
    """Without the package's __init__ (the rest of the SDK: its console client, the PyWorker's
    server), which still runs, whole, at the package's first attribute lookup."""
    code = """if True:
        import sys
        from argparse import Namespace
        from jaxbench.remote import vast
        c = vast.client("key", Namespace(autoscaler_url=None, webserver_url=None), None)
        print("vastai.sdk" in sys.modules, "vastai.serverless.server.worker" in sys.modules)
        import vastai
        from vastai import VastAI, Worker
        from vastai.serverless.client.client import CoroutineServerless
        print(vastai.CoroutineServerless is CoroutineServerless and isinstance(c, CoroutineServerless),
              vastai.serverless.server.worker.Worker is Worker, VastAI.__module__)
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True", "True", "vastai.sdk"]


def test_a_route_call_sends_and_reads_what_the_sdks_does():
    """Router's own /route/ call against the SDK's `Endpoint._route`, on the same fake autoscaler: the
    same request (body, key in the query, headers), the same answers, the same error."""
    from argparse import Namespace

    import certifi

    from jaxbench.remote import vast as remote_vast

    fake = FakeVast(unready_polls=1)
    args = Namespace(endpoint=ENDPOINT_NAME, autoscaler_url=fake.url, webserver_url=fake.url,
                     vast_ca_file=certifi.where())

    checked = (ACCOUNT_API_KEY, remote_vast.ca_context(certifi.where()))

    async def calls(ours: bool) -> list:
        async with remote_vast.connect(args, checked=checked) as router:
            async def route(cost, idx):
                if ours:
                    return await router._route(cost, idx)
                return (await router.endpoint._route(cost=cost, req_idx=idx, timeout=60.0)).body

            waiting = await route(12, 0)
            ready = await route(12, waiting["request_idx"])
            router.endpoint.data.api_key = "not-the-key"
            try:
                await route(12, 0)
            except RuntimeError as e:
                refused = str(e)
            return [{k: v for k, v in waiting.items() if k != "request_idx"},
                    {k: v for k, v in ready.items() if k not in ("request_idx", "reqnum", "url", "signature")},
                    refused]

    try:
        sdk_answers = asyncio.run(calls(ours=False))
        sdk_requests = fake.routes[:]
        del fake.routes[:]
        assert asyncio.run(calls(ours=True)) == sdk_answers
        assert sdk_answers[2].startswith("Failed to route endpoint: HTTP 401")
        strip = lambda r: {**r, "body": {k: v for k, v in r["body"].items() if k != "request_idx"}}  # noqa: E731
        assert [strip(r) for r in fake.routes] == [strip(r) for r in sdk_requests]
        assert fake.routes[0]["query"] == {"api_key": ENDPOINT_API_KEY}
        assert [bool(r["body"]["request_idx"]) for r in fake.routes] == [False, True, False]
    finally:
        fake.close()


# End to end -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth(compile_cache):
    """The valid nonces among 0 … 29999, from a local search with the workers' devices and batch."""
    out = subprocess.run(
        [sys.executable, "-m", "jaxbench", "search", *SEARCH, "--max-nonces", "30000", "--batch", str(BATCH),
         "--cache-dir", str(compile_cache)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **PLATFORM_ENV,
             **host_devices_env(DEVICES)},
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return {n: d for line in lines if "nonces" in line for n, d in zip(line["nonces"], line["dist"])}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, truth, compile_cache):
    """Two workers of two (CPU) devices each, loaded, behind a fake autoscaler that makes each
    request wait one poll before it routes it."""
    vast = FakeVast(unready_polls=1)
    env = {"MODEL_BATCH": str(BATCH), "MODEL_BENCHMARK_NONCES": "128", "JAXBENCH_BENCHMARK_STEPS": "2",
           **host_devices_env(DEVICES)}
    with running_workers(vast, 2, tmp_path_factory, compile_cache, env, START_TIMEOUT_S) as stacks:
        yield vast, stacks


class Client:
    """`python -m jaxbench remote search` against the fake, its stdout read line by line."""

    def __init__(self, vast: FakeVast, *args: str):
        import certifi

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxbench", "remote", "search", "--endpoint", ENDPOINT_NAME, *SEARCH,
             "--autoscaler-url", vast.url, "--webserver-url", vast.url, "--vast-ca-file", certifi.where(), *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": ACCOUNT_API_KEY},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for text in self.proc.stdout:
            self.lines.append(json.loads(text))

    def finish(self, timeout: float) -> tuple[int, list[dict], dict, str]:
        """Exit status, result lines, summary, stderr."""
        try:
            status = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)
        stderr = self.proc.stderr.read()
        *results, summary = self.lines or [{}]
        assert summary.get("status") == "done", stderr[-3000:]
        return status, results, summary, stderr


def printed(results: list[dict]) -> dict[int, float]:
    nonces = [n for line in results for n in line["nonces"]]
    assert len(nonces) == len(set(nonces)), "a nonce was printed twice"
    return {n: d for line in results for n, d in zip(line["nonces"], line["dist"])}


def test_interrupt_stops_the_workers(endpoint):
    vast, stacks = endpoint
    client = Client(vast, "--workers", "2", "--max-nonces", "10000000")
    wait_until(lambda: all(s.model_health()["busy"] for s in stacks), 60, interval=0.1,
               what="both workers to run a part")
    client.proc.send_signal(signal.SIGINT)
    status, results, summary, _ = client.finish(60)
    assert status == 0 and summary["reason"] == "interrupted"
    for stack in stacks:
        wait_until(lambda: not stack.model_health()["busy"], 15, what="the worker's job to stop")
        assert stack.model_health()["last_job"]["stop_reason"] == "disconnected"


def test_duration_search_ends_at_the_deadline(endpoint, truth):
    vast, _ = endpoint
    client = Client(vast, "-v", "--workers", "2", "--duration", "4", "--start-nonce", "0")
    status, results, summary, stderr = client.finish(90)
    assert status == 0 and summary["reason"] == "duration" and summary["restarts"] == 0
    assert re.findall(r"INFO jaxbench.remote: \S+: (\w+) after \d+ nonces", stderr) == ["duration", "duration"]
    # stderr is a pipe here: progress is whole lines, the last at the end, never a bar redrawn in place.
    assert "\r" not in stderr and re.search(r"^remote: \d+ nonces, \d+ s, ", stderr, re.M), stderr[-2000:]
    found = printed(results)
    # Each part computed a prefix of its node's nonces (node i: 2k + i for k below its end): every
    # nonce printed lies in it, and below 30000 (what the local search covers) every valid one of it
    # was printed, with the local search's distance.
    ends = {p["node_id"]: p["computed"] for p in summary["parts"]}
    assert all(n // 2 < ends[n % 2] for n in found) and summary["total_valid"] == len(found)
    assert {n: d for n, d in found.items() if n < 30000} == {n: d for n, d in truth.items() if n // 2 < ends[n % 2]}
    assert summary["total_computed"] == sum(ends.values()) > 0


def test_a_screened_search_finds_the_exact_ones_nonces(endpoint, truth):
    """--screen reaches the workers: each line says so, and every valid nonce has its exact distance."""
    vast, _ = endpoint
    client = Client(vast, "--workers", "2", "--max-nonces", "6000", "--screen", "fp8", "--screen-margin", "0.01")
    status, results, summary, stderr = client.finish(120)
    assert status == 0 and summary["reason"] == "completed", stderr[-3000:]
    assert results and all(line["screen"] == "fp8" and line["screen_margin"] == 0.01 for line in results)
    assert printed(results) == {n: d for n, d in truth.items() if n < 6000}


def test_split_search_survives_a_worker_killed_mid_run(endpoint, truth):
    """Runs last: kills one of the two workers while it computes its part."""
    vast, stacks = endpoint
    routes_before = len(vast.routes)
    client = Client(vast, "-v", "--workers", "2", "--max-nonces", "30000")

    def midway() -> WorkerStack | None:  # the first worker to be part-way through a part
        for stack in stacks:
            job = stack.model_health()["job"]
            if job is not None and job.get("nonces_computed", 0) >= 4000:
                return stack
        return None

    doomed = wait_until(midway, 90, interval=0.05, what="a worker to be part-way through its part")
    (survivor,) = [s for s in stacks if s is not doomed]
    doomed.kill()
    status, results, summary, stderr = client.finish(180)

    assert status == 0, stderr[-3000:]
    assert summary["reason"] == "completed" and summary["total_computed"] == 30000
    found = printed(results)
    assert found == truth  # every valid nonce of 0 … 29999 exactly once, with the same distance
    assert summary["total_valid"] == len(truth)

    lost = summary["workers"][doomed.worker_url]
    # The request it computed broke; one the autoscaler had queued behind it, if any (both runners'
    # requests can be routed to one worker), failed with it.
    assert 1 <= lost["failures"] <= 2 and re.match("its stream (broke|ended)|unreachable", lost["last_failure"]), lost
    assert summary["workers"][survivor.worker_url]["failures"] == 0
    assert lost["computed"] + summary["workers"][survivor.worker_url]["computed"] == 30000
    # Its part goes on from where its lines had settled it, not from the part's beginning: at most
    # the step in flight and the one before it (no line of a later step had come) are done again.
    url = re.escape(doomed.worker_url)
    started = [int(n) for n in re.findall(rf"INFO jaxbench.remote: {url}: nonces from (\d+)", stderr)]
    resumed = int(re.search(rf"{url}: its stream broke .*; nonces from (\d+) go back to the queue", stderr).group(1))
    part_start = max(n for n in started if n <= resumed)
    assert resumed - part_start >= 4000 - 2 * DEVICES * BATCH
    later = re.findall(r"INFO jaxbench.remote: (\S+): nonces from (\d+)", stderr.split("go back to the queue")[1])
    assert any(worker == survivor.worker_url and int(n) == resumed for worker, n in later)
    assert summary["restarts"] >= 1

    # The SDK routed every request with the endpoint's key, polled while no worker was given, and
    # sent replay_timeout.
    routes = vast.routes[routes_before:]
    assert {r["authorization"] for r in routes} == {f"Bearer {ENDPOINT_API_KEY}"}
    assert all("replay_timeout" in r["body"] for r in routes)
    assert any(r["body"]["request_idx"] for r in routes)  # a poll carries the request_idx it was given
