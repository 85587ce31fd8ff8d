"""`python -m jaxbench remote search` against a simulated fleet (tests/fleet.py: fake workers in this
process that speak the PyWorker and model server protocol, routed by FakeVast; the real client and
the real vastai SDK): every misbehaviour of a worker costs that worker's work, never the fleet's.
The output is checked against the known answer: every valid nonce once, with its distance, and a
summary that is always written (what could not be done listed in `missing`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import certifi
import pytest
from fleet import FAULTS, Fault, FakeFleet, WorkerSpec, r_target_for, truth
from vast_helpers import ACCOUNT_API_KEY, ENDPOINT_NAME, ROOT, FakeVast

BLOCK_HASH, PUBLIC_KEY = "fleet-block", "fleet-key"
R_TARGET = r_target_for(0.05)  # about three lines in four steps of a group of 16 nonces
SPEC = dict(groups=2, batch=16, step_s=0.1, start_s=0.02)  # 320 nonces/s a worker


class Run:
    """One `remote search` against `vast`, to its end: exit status, result lines, summary, stderr."""

    def __init__(self, vast: FakeVast, *args: str, timeout: float = 60):
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "jaxbench", "remote", "search", "-v", "--endpoint", ENDPOINT_NAME,
             "--autoscaler-url", vast.url, "--webserver-url", vast.url, "--vast-ca-file", certifi.where(),
             "--params", "tiny", "--block-hash", BLOCK_HASH, "--public-key", PUBLIC_KEY, "--r-target", repr(R_TARGET),
             *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": ACCOUNT_API_KEY},
            capture_output=True, text=True, timeout=timeout)
        self.seconds = time.monotonic() - t0
        self.status, self.stderr = out.returncode, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert lines and lines[-1].get("status") == "done", out.stderr[-3000:]
        *self.results, self.summary = lines

    def found(self) -> dict[int, float]:
        nonces = [n for line in self.results for n in line["nonces"]]
        assert len(nonces) == len(set(nonces)), "a nonce was printed twice"
        return {n: d for line in self.results for n, d in zip(line["nonces"], line["dist"])}


@pytest.fixture
def fleet_of():
    """fleet_of(specs) -> (FakeVast, FakeFleet), closed after the test."""
    made = []

    def make(specs: list[WorkerSpec], **kwargs) -> tuple[FakeVast, FakeFleet]:
        vast = FakeVast(seed=len(made))
        made.append((vast, None))
        fleet = FakeFleet(vast, specs, **kwargs)
        made[-1] = (vast, fleet)
        return vast, fleet

    yield make
    for vast, fleet in made:
        if fleet is not None:
            fleet.close()
        vast.close()


# Every fault of FAULTS on a worker of its own, at its 5th step (its first request), beside 16 healthy ones.
ROGUES = [kind for kind in FAULTS if kind not in ("late", "slow_start")]


def test_every_misbehaviour_costs_only_its_workers_work(fleet_of):
    specs = [WorkerSpec(**SPEC, fault=Fault(kind, at_step=5)) for kind in ROGUES]
    specs += [WorkerSpec(**SPEC) for _ in range(16)]
    vast, fleet = fleet_of(specs)
    total = int(fleet.rate * 3)
    run = Run(vast, "--workers", str(len(specs)), "--max-nonces", str(total), "--stall-timeout", "2")

    assert run.status == 0 and run.summary["reason"] == "completed", run.stderr[-3000:]
    assert run.found() == truth(BLOCK_HASH, PUBLIC_KEY, 0, total, R_TARGET)
    assert run.summary["total_computed"] == total and run.summary["total_valid"] == len(run.found())
    assert "missing" not in run.summary and "given_up" not in run.summary
    reports = run.summary["workers"]
    for worker, kind in zip(fleet.workers, ROGUES):
        if kind != "busy" and (kind != "restart" or worker.requests > 1):  # "restart" lies from its 2nd request
            assert reports[worker.url]["failures"] >= 1, (kind, reports.get(worker.url))
        assert reports.get(worker.url, {}).get("computed", 0) < total / 4, kind
    assert all(reports[w.url]["failures"] == 0 for w in fleet.workers[len(ROGUES):] if w.url in reports)
    for kind, cause in (("cut", "line \\d+ of the stream came after line"), ("short_dist", "nonces and dist"),
                        ("foreign", "is not one of the request's"), ("bad_dist", "not one below r_target"),
                        ("wrong_total", "the summary counts \\d+ valid nonces"), ("hang", "no line from it for 2 s"),
                        ("die", "its stream broke|unreachable"), ("close", "ended without a summary"),
                        ("error", "its job failed"), ("fail", "answered 500"), ("refuse", "refused the request \\(400\\)"),
                        ("replay", "line \\d+ of the stream came after line")):
        report = reports[fleet.workers[ROGUES.index(kind)].url]
        assert re.search(cause, report["last_failure"]), (kind, report)
        url = fleet.workers[ROGUES.index(kind)].url
        assert re.search(f"{re.escape(url)}: ", run.stderr), kind  # a note on stderr says what it did
    busy = reports[fleet.workers[ROGUES.index("busy")].url]
    assert busy["computed"] == 0 and busy["failures"] == 0


def test_a_replayed_step_is_printed_once(fleet_of):
    vast, fleet = fleet_of([WorkerSpec(**SPEC, fault=Fault("replay", at_step=3))] + [WorkerSpec(**SPEC)])
    total = int(fleet.rate * 2)
    run = Run(vast, "--workers", "2", "--max-nonces", str(total))
    assert run.status == 0 and run.summary["reason"] == "completed", run.stderr[-3000:]
    assert run.found() == truth(BLOCK_HASH, PUBLIC_KEY, 0, total, R_TARGET)
    assert run.summary["workers"][fleet.workers[0].url]["last_failure"].startswith(
        "it sent what a correct worker never sends: line ")


def test_a_retry_avoids_the_worker_that_failed_it(fleet_of):
    """A worker that fails every request at once would be the least loaded worker for every route:
    it gets a few, and no part is given up while the healthy ones work."""
    vast, fleet = fleet_of([WorkerSpec(**SPEC, fault=Fault("fail"))] + [WorkerSpec(**SPEC) for _ in range(5)])
    total = int(fleet.rate * 3)
    run = Run(vast, "--workers", "6", "--max-nonces", str(total), "--max-attempts", "2")
    assert run.status == 0 and run.summary["reason"] == "completed", run.stderr[-3000:]
    assert run.found() == truth(BLOCK_HASH, PUBLIC_KEY, 0, total, R_TARGET)
    failing = run.summary["workers"][fleet.workers[0].url]
    assert 1 <= failing["requests"] <= 3 and failing["failures"] == failing["requests"]


def test_the_wait_for_a_worker_is_bounded_as_stated(fleet_of):
    """Every worker keeps requests in its queue for a minute: --wait-timeout 2 ends the search at
    about 2 s, with its summary and everything missing."""
    vast, fleet = fleet_of([WorkerSpec(**SPEC, fault=Fault("late", seconds=60)) for _ in range(2)])
    run = Run(vast, "--workers", "2", "--max-nonces", "1000", "--wait-timeout", "2")
    assert run.status == 1 and run.summary["reason"] == "failed"
    assert run.summary["error"] == "no worker started the request within 2 s, and nothing progressed meanwhile"
    assert 2 <= run.summary["elapsed_seconds"] < 3.5
    assert run.summary["missing"] == [{"start_nonce": 0, "node_id": 0, "n_nodes": 1, "max_nonces": 1000}]
    assert run.results == [] and run.summary["total_computed"] == 0


def test_a_request_all_workers_refuse_ends_the_search_with_its_summary(fleet_of):
    vast, fleet = fleet_of([WorkerSpec(**SPEC, fault=Fault("refuse")) for _ in range(3)])
    run = Run(vast, "--workers", "3", "--max-nonces", "5000")
    assert run.status == 1 and run.summary["reason"] == "failed"
    assert run.summary["error"].startswith("2 workers refused the request (400): ")
    assert "block_hash: refused by this worker" in run.summary["error"]
    assert run.summary["missing"] == [{"start_nonce": 0, "node_id": 0, "n_nodes": 1, "max_nonces": 5000}]


def test_slow_starters_and_dead_workers_leave_their_work_to_the_others(fleet_of):
    """Two workers that do nothing for a minute at their first request and two that die early:
    idle workers take their parts over, and the search ends near its ideal time."""
    specs = [WorkerSpec(**SPEC, fault=Fault("slow_start", seconds=60)) for _ in range(2)]
    specs += [WorkerSpec(**SPEC, fault=Fault("die", at_step=3)) for _ in range(2)]
    specs += [WorkerSpec(**SPEC) for _ in range(16)]
    vast, fleet = fleet_of(specs)
    healthy = sum(w.rate for w in fleet.workers[4:])
    total = int(healthy * 4)
    run = Run(vast, "--workers", "20", "--max-nonces", str(total))
    assert run.status == 0 and run.summary["reason"] == "completed", run.stderr[-3000:]
    assert run.found() == truth(BLOCK_HASH, PUBLIC_KEY, 0, total, R_TARGET)
    assert run.summary["elapsed_seconds"] < 4 * 2.5  # the slow starters alone would take a minute
    assert run.summary["backups"] >= 1


def test_a_duration_search_on_a_fleet_with_a_dead_worker(fleet_of):
    vast, fleet = fleet_of([WorkerSpec(**SPEC, fault=Fault("die", at_step=5))] + [WorkerSpec(**SPEC) for _ in range(7)])
    run = Run(vast, "--workers", "8", "--duration", "3", "--start-nonce", "1000")
    assert run.status == 0 and run.summary["reason"] == "duration", run.stderr[-3000:]
    assert "missing" not in run.summary and run.summary["restarts"] == 1
    found = run.found()
    # Part i is node i of 8 from 1000; it computed its first `computed` nonces, and every valid one
    # of them was printed, with its distance.
    ends = {p["node_id"]: p["computed"] for p in run.summary["parts"]}
    assert len(ends) == 8 and all(ends.values())
    expected = {}
    for node, computed in ends.items():
        nonces = [1000 + node + 8 * k for k in range(computed)]
        expected.update({n: d for n, d in truth(BLOCK_HASH, PUBLIC_KEY, 1000, 8 * computed + 8, R_TARGET).items()
                         if n in set(nonces)})
    assert found == expected and run.summary["total_computed"] == sum(ends.values())


def test_an_endpoint_the_account_does_not_have_is_bad_input(fleet_of):
    vast, _ = fleet_of([WorkerSpec(**SPEC)])
    out = subprocess.run(
        [sys.executable, "-m", "jaxbench", "remote", "search", "--endpoint", "no-such-endpoint",
         "--autoscaler-url", vast.url, "--webserver-url", vast.url, "--vast-ca-file", certifi.where(),
         "--params", "tiny", "--block-hash", BLOCK_HASH, "--public-key", PUBLIC_KEY, "--max-nonces", "10"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": ACCOUNT_API_KEY},
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr == (f"error: --endpoint: no endpoint named 'no-such-endpoint' in this account "
                          f"(it has: {ENDPOINT_NAME})\n")
