"""`python -m jaxbench remote search`: the part bookkeeping on made-up lines, then end to end: the
real client (the vastai SDK's Serverless client, streaming) against two real workers (model server
and PyWorker, CPU, `tiny`) behind a fake Vast autoscaler, all on 127.0.0.1, one worker killed mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from service_helpers import PLATFORM_ENV, host_devices_env, wait_until
from vast_helpers import ACCOUNT_API_KEY, ENDPOINT_API_KEY, ENDPOINT_NAME, ROOT, FakeVast, WorkerStack

from jaxbench.remote import Part, RemoteError

DEVICES = 2
BATCH = 32
R_TARGET = 1.40  # about a quarter of the tiny model's distances are below it
SEARCH = ["--params", "tiny", "--block-hash", "remote-block", "--public-key", "remote-key",
          "--r-target", str(R_TARGET)]
START_TIMEOUT_S = 180


# The part bookkeeping -------------------------------------------------------------------------------


def result(part: Part, step: int, group: int, groups: int, batch: int, ks: list[int], base: int = 0) -> dict:
    """A worker's line for device group `group` of step `step` (numbered from 1) of a request for
    `part` that started at k = base: its valid nonces are the part's k in `ks`."""
    step_start = base + (step - 1) * groups * batch
    following = step_start + groups * batch + group
    return {"worker_id": group, "batch_number": step, "nonces": [part.nonce(k) for k in ks],
            "dist": [1.0] * len(ks), "aggregated_total_computed": step * groups * batch,
            "next_nonce": part.nonce(following) if part.count is None or following < part.count else None}


def test_the_resume_point_trails_the_last_whole_step():
    part = Part(node_id=1, n_nodes=3, start_nonce=100, count=None)  # nonces 101, 104, 107, …
    part.begin("worker-a")
    assert part.request_fields() == {"start_nonce": 100, "node_id": 1, "n_nodes": 3}
    # Two groups of 4: step 1 holds k 0-7 (group 0: k 0, 2, 4, 6; group 1: k 1, 3, 5, 7).
    assert part.on_result(result(part, 1, 0, 2, 4, [0, 4]))["nonces"] == [101, 113]
    part.on_result(result(part, 1, 1, 2, 4, [7]))
    assert part.resume == 0  # step 1's lines may not all be in yet
    part.on_result(result(part, 2, 1, 2, 4, [9]))
    assert part.resume == 8  # a line of step 2: step 1 is whole
    part.on_result(result(part, 4, 0, 2, 4, [24]))  # step 3 had no valid nonce
    assert part.resume == 16
    # The worker dies here: step 4's line for group 1, if any, is lost. The next request starts at k 16.
    part.end("connection lost")
    assert part.request_fields() == {"start_nonce": 100 + 16 * 3, "node_id": 1, "n_nodes": 3}

    part.begin("worker-b")  # the same steps again, now from k 16
    again = part.on_result(result(part, 1, 0, 2, 4, [16, 18], base=16))
    assert again["nonces"] == [part.nonce(16), part.nonce(18)]  # not sent before
    assert part.on_result(result(part, 2, 0, 2, 4, [24], base=16)) is None  # k 24 was printed already
    assert part.on_result(result(part, 2, 1, 2, 4, [25], base=16))["nonces"] == [part.nonce(25)]
    assert part.valid == 8 and part.progress == 16 + 16
    assert part.on_summary({"status": "done", "reason": "duration", "total_computed": 40}, until_deadline=True)
    assert part.resume == 56 and part.finished


def test_a_bounded_part_ends_at_its_count_and_checks_the_nonces():
    part = Part(node_id=0, n_nodes=2, start_nonce=0, count=10)
    part.begin("w")
    # Step 1 ends at k 8 (4 groups of 2); in step 2 only k 8 and 9 remain: group 1's next is past the end.
    part.on_result(result(part, 1, 3, 4, 2, [7]))
    last = result(part, 2, 1, 4, 2, [9])
    assert last["next_nonce"] is None
    part.on_result(last)
    assert part.resume == 8
    part.end("connection lost")  # k 8 and 9 were computed, but their lines may be incomplete
    assert part.request_fields()["max_nonces"] == 2
    with pytest.raises(RemoteError):
        part.on_result(result(part, 3, 0, 4, 2, [3]) | {"nonces": [3]})  # an odd nonce: not node 0's
    part.begin("w2")
    with pytest.raises(RemoteError):
        part.on_result({**result(part, 1, 0, 4, 2, []), "nonces": [2]})  # k 1: before this request's start
    assert part.on_summary({"status": "done", "reason": "completed", "total_computed": 2}, until_deadline=False)
    assert part.resume == 10


def test_a_part_without_next_nonce_settles_on_its_highest_nonce():
    part = Part(node_id=0, n_nodes=1, start_nonce=0, count=None)
    part.begin("w")
    part.on_result({**result(part, 1, 0, 1, 8, [2, 5]), "next_nonce": None})
    part.on_result(result(part, 2, 0, 1, 8, [9]))
    assert part.resume == 6  # everything up to the highest valid nonce of step 1 is certain


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
                        (["--max-nonces", "10", "--vast-ca-file", __file__], "--vast-ca-file")):
        out = subprocess.run([sys.executable, "-m", "jaxbench", "remote", "search", "--endpoint", "e", *SEARCH, *args],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {field}:"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "jaxbench", "remote", "search", "--endpoint", "e", *SEARCH,
                          "--max-nonces", "10"], env={**env, "VAST_API_KEY": ""}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "VAST_API_KEY" in out.stderr


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
    stacks = [WorkerStack(tmp_path_factory.mktemp(f"worker{i}"), vast, compile_cache, container_id=i + 1, env=env)
              for i in range(2)]
    try:
        for stack in stacks:
            stack.wait_loaded(START_TIMEOUT_S)
        yield vast, stacks
    except AssertionError:
        for stack in stacks:
            print(stack.outputs())
        raise
    finally:
        for stack in stacks:
            stack.close()
        vast.close()


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
    client = Client(vast, "--workers", "2", "--duration", "4", "--start-nonce", "0")
    status, results, summary, _ = client.finish(90)
    assert status == 0 and summary["reason"] == "duration" and summary["restarts"] == 0
    assert all(p["requests"][-1]["ended"] == "duration" for p in summary["parts"])
    found = printed(results)
    # Each part computed a prefix of its node's nonces (node i: 2k + i for k below its end): every
    # nonce printed lies in it, and below 30000 (what the local search covers) every valid one of it
    # was printed, with the local search's distance.
    ends = {p["node_id"]: p["computed"] for p in summary["parts"]}
    assert all(n // 2 < ends[n % 2] for n in found) and summary["total_valid"] == len(found)
    assert {n: d for n, d in found.items() if n < 30000} == {n: d for n, d in truth.items() if n // 2 < ends[n % 2]}
    assert summary["total_computed"] == sum(ends.values()) > 0


def test_split_search_survives_a_worker_killed_mid_run(endpoint, truth):
    """Runs last: kills one of the two workers while it computes its part."""
    vast, stacks = endpoint
    routes_before = len(vast.routes)
    client = Client(vast, "--workers", "2", "--max-nonces", "30000")

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

    (lost,) = [p for p in summary["parts"] if p["requests"][0]["worker"] == doomed.worker_url]
    first, *later = lost["requests"]
    assert first["ended"] == "connection lost" and later and later[-1]["ended"] == "completed"
    assert all(r["worker"] == survivor.worker_url for r in later)
    resumed = later[0]["from"]
    assert 4000 < resumed < 30000 and resumed % 2 == lost["node_id"]  # the rest of its sequence, not all of it
    assert summary["restarts"] >= 1
    assert f"part {lost['node_id']}: the worker's stream broke" in stderr and f"going on from nonce {resumed}" in stderr

    # The SDK routed every request with the endpoint's key, polled while no worker was given, and
    # sent replay_timeout.
    routes = vast.routes[routes_before:]
    assert {r["authorization"] for r in routes} == {f"Bearer {ENDPOINT_API_KEY}"}
    assert all("replay_timeout" in r["body"] for r in routes)
    assert any(r["body"]["request_idx"] for r in routes)  # a poll carries the request_idx it was given
