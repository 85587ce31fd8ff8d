"""/warmup against a live server and a real HTTP server standing in for the MLNode callback."""

from __future__ import annotations

import threading

import pytest

from service_helpers import TINY_BODY, FakeHTTPServer, read_stream, wait_until


class FakeMLNode:
    """Serves /warmup/params (waiting until `generation_input` is set) and records /warmup/complete."""

    def __init__(self):
        self.generation_input = None
        self.fail_polls = 0
        self.lock = threading.Lock()

    def __call__(self, method, path, query, body):
        if method == "GET" and path == "/warmup/params":
            with self.lock:
                if self.fail_polls:
                    self.fail_polls -= 1
                    return 503, {"error": "not now"}
                if self.generation_input is None:
                    return 200, {"status": "waiting"}
                return 200, {"status": "ready", "params": self.generation_input}
        if method == "POST" and path == "/warmup/complete":
            return 200, {"status": "ok"}
        return 404, {"error": f"no route {method} {path}"}


@pytest.fixture
def mlnode():
    node = FakeMLNode()
    with FakeHTTPServer(node) as http:
        http.node = node
        yield http


def statuses(lines):
    return [line.get("status") for line in lines]


def test_full_warmup_flow(client, server, mlnode):
    generation = {**TINY_BODY, "block_hash": "warm-block", "start_nonce": 500, "max_nonces": 40}
    seen_waiting = []

    def on_line(line):  # the MLNode gets ready only after the stream showed us it is waiting
        if line.get("status") == "warmup_waiting":
            seen_waiting.append(line)
            if len(seen_waiting) == 2:
                mlnode.node.generation_input = generation

    timed = read_stream(client, "/warmup", {"payload": {
        "callback_url": mlnode.url + "/", "job_id": "job-7", "params": "tiny", "block_hash": "warm-block",
        "poll_interval_s": 0.1}}, on_line=on_line)
    lines = [line for _, line in timed]
    st = statuses(lines)
    assert lines[0] == {"status": "warmup_ready", "job_id": "job-7"}
    assert st[1:3] == ["compiling", "compiled"]
    assert lines[2]["cached"] is False and lines[2]["seconds"] >= 0 and lines[2]["batch"] == 8
    assert st[3:5] == ["warmup_waiting", "warmup_waiting"]
    assert [line["poll_count"] for line in lines[3:5]] == [1, 2]
    i = st.index("warmup_params_received")
    assert st[i + 1:i + 3] == ["compiling", "compiled"]
    assert lines[i + 2]["cached"] is True  # warmup compiled it already: the generation starts at once
    results = lines[i + 3:-1]
    assert all("nonces" in line for line in results)
    assert sorted(n for line in results for n in line["nonces"]) == list(range(500, 540))
    summary = lines[-1]
    assert summary["status"] == "done" and summary["reason"] == "completed" and summary["callback"] == "sent"
    assert summary["total_computed"] == 40

    polls = mlnode.calls("/warmup/params", "GET")
    assert len(polls) >= 3 and all(p.path == "/warmup/params" and p.query == {"job_id": "job-7"} for p in polls)
    (complete,) = mlnode.calls("/warmup/complete", "POST")
    assert complete.path == "/warmup/complete"
    assert complete.body == {"job_id": "job-7", "total_batches": len(results), "total_computed": 40,
                             "total_valid": 40, "reason": "completed"}
    assert complete.time <= timed[-1][0]  # sent before the last line
    # Every line streamed live: the first ones arrived before the MLNode was even ready.
    assert timed[0][0] < polls[-1].time
    h = server.wait_idle()
    assert any(k["params"]["dim"] == 64 and k["batch"] == 8 for k in h["compiled"])


def test_params_only_from_the_callback_and_flaky_polls(client, mlnode):
    mlnode.node.fail_polls = 2  # two failed polls count as "not ready"
    mlnode.node.generation_input = {**TINY_BODY, "block_hash": "other-block", "max_nonces": 16}
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "j2", "poll_interval_s": 0.05})]
    st = statuses(lines)
    assert st[:3] == ["warmup_ready", "warmup_waiting", "warmup_waiting"]
    assert st[3:6] == ["warmup_params_received", "compiling", "compiled"]
    assert lines[-1]["reason"] == "completed" and lines[-1]["total_computed"] == 16
    (complete,) = mlnode.calls("/warmup/complete")
    assert complete.body["total_computed"] == 16 and "error" not in complete.body


def test_timeout_still_sends_the_completion(client, mlnode):
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "slow", "poll_interval_s": 0.05, "timeout_s": 0.3})]
    st = statuses(lines)
    assert st[0] == "warmup_ready" and "warmup_timeout" in st
    assert lines[-1]["reason"] == "warmup_timeout" and lines[-1]["callback"] == "sent"
    (complete,) = mlnode.calls("/warmup/complete")
    assert complete.body["job_id"] == "slow" and complete.body["reason"] == "warmup_timeout"
    assert "no params" in complete.body["error"] and complete.body["total_computed"] == 0


def test_bad_generation_input_is_an_error_line_naming_the_field(client, mlnode):
    mlnode.node.generation_input = {**TINY_BODY, "public_key": None, "max_nonces": 8}
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "bad", "poll_interval_s": 0.05})]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0]["field"] == "public_key" and errors[0]["source"] == "callback"
    assert lines[-1]["status"] == "done" and lines[-1]["reason"] == "error"
    (complete,) = mlnode.calls("/warmup/complete")
    assert "public_key" in complete.body["error"] and complete.body["reason"] == "error"


def test_disconnect_while_waiting_still_sends_the_completion(client, server, mlnode):
    with client.stream("POST", "/warmup", json={"callback_url": mlnode.url, "job_id": "gone",
                                                "poll_interval_s": 0.05}) as r:
        lines = r.iter_lines()
        assert '"warmup_ready"' in next(lines)
        assert '"warmup_waiting"' in next(lines)
    (complete,) = wait_until(lambda: mlnode.calls("/warmup/complete"), 10, what="the completion callback")
    assert complete.body["job_id"] == "gone" and complete.body["reason"] == "disconnected" and complete.body["error"]
    assert server.wait_idle()["last_job"]["stop_reason"] == "disconnected"


@pytest.mark.parametrize("payload,field", [
    ({}, "callback_url"),
    ({"callback_url": ""}, "callback_url"),
    ({"callback_url": 12}, "callback_url"),
    ({"callback_url": "ftp://host/x"}, "callback_url"),
    ({"callback_url": "not a url"}, "callback_url"),
    ({"callback_url": "http://h:99999"}, "callback_url"),
    ({"callback_url": "http://h", "job_id": 5}, "job_id"),
    ({"callback_url": "http://h", "params": {"dim": 7}}, "params.dim"),
    ({"callback_url": "http://h", "poll_interval_s": 0}, "poll_interval_s"),
    ({"callback_url": "http://h", "dtype": "fp8"}, "dtype"),
])
def test_malformed_warmup_is_400(client, payload, field):
    r = client.post("/warmup", json=payload)
    assert r.status_code == 400 and r.json()["field"] == field, r.text
