"""Peers that hang, trickle, fail or vanish, clients that leave, and SIGTERM: every job ends, bounded.

Real HTTP everywhere: a live `python -m service` (CPU, tiny params) and small HTTP servers on
127.0.0.1 standing in for the MLNode warmup callback and the orchestrator. The bound asserted: the
server is busy no longer than the request's `http_timeout_s` + 2 s after its client left or its peer
failed (the job stops within a step; a goodbye call gets one timeout), and SIGTERM ends the process
within MODEL_DRAIN_TIMEOUT_S with the stream's last line written.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from conftest import UNFITTABLE_PARAMS
from service_helpers import TINY_BODY, FakeHTTPServer, Peer, RawReply, ServiceProcess, read_stream, wait_until

TIMEOUT = 1.0  # the requests' http_timeout_s
SLACK = 2.0


def trickle(handler):
    """Headers at once, then a byte every 0.2 s of a 10 kB body: no read ever waits a second."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "10000")
    handler.end_headers()
    for _ in range(10000):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.2)


def raw_json(text: bytes) -> RawReply:
    def write(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(text)))
        handler.end_headers()
        handler.wfile.write(text)

    return RawReply(write)


def released_after(server, since: float, limit: float) -> float:
    """Seconds from `since` until /health shows the server idle (fails past `limit`)."""
    server.wait_idle(limit + 5)
    return time.monotonic() - since


def leave_after(client, path, body, predicate, timeout=30.0) -> tuple[list[dict], float]:
    """Stream `path`, leave once `predicate(lines)` holds; returns the lines and when we left."""
    lines = []
    with client.stream("POST", path, json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for text in r.iter_lines():
            lines.append(json.loads(text))
            if predicate(lines):
                break
    return lines, time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def no_unforeseen_exception(server):
    """Whatever the peers did, the server logged no traceback (an exception nothing handled)."""
    yield
    log = server.log()
    for sign in ("Traceback", "Exception in callback", "unhandled error", "driver failed"):
        assert sign not in log, sign


@pytest.fixture
def peer_server():
    servers = []

    def make(routes: dict) -> FakeHTTPServer:
        peer = Peer(routes)
        http = FakeHTTPServer(peer).__enter__()
        http.peer = peer
        servers.append(http)
        return http

    yield make
    for http in servers:
        http.peer.release.set()
        http.vanish()


# /warmup ------------------------------------------------------------------------------------------


def test_warmup_hung_callback_client_leaves(server, client, peer_server):
    mlnode = peer_server({"/warmup/params": "hang", "/warmup/complete": "hang"})
    body = {"callback_url": mlnode.url, "job_id": "hung", "poll_interval_s": 0.05, "http_timeout_s": TIMEOUT}
    with client.stream("POST", "/warmup", json=body) as r:
        stream = r.iter_lines()  # (a dropped iterator would close the response)
        assert json.loads(next(stream))["status"] == "warmup_ready"
        wait_until(lambda: mlnode.calls("/warmup/params"), 10, what="a poll in flight")
    left = time.monotonic()
    assert released_after(server, left, TIMEOUT + SLACK) <= TIMEOUT + SLACK
    last = server.health()["last_job"]
    assert last["stop_reason"] == "disconnected" and last["summary"]["callback"] == "failed"
    (complete,) = mlnode.calls("/warmup/complete")
    assert complete.body["reason"] == "disconnected" and complete.time - left < TIMEOUT


def test_warmup_trickling_callback_is_cut_by_the_total_deadline(client, peer_server):
    mlnode = peer_server({"/warmup/params": lambda body: RawReply(trickle),
                          "/warmup/complete": lambda body: RawReply(trickle)})
    t0 = time.monotonic()
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "trickle", "poll_interval_s": 0.05, "timeout_s": 2.5,
        "http_timeout_s": TIMEOUT})]
    took = time.monotonic() - t0
    statuses = [line.get("status") for line in lines]
    assert statuses[0] == "warmup_ready" and statuses[-2:] == ["warmup_timeout", "done"]
    assert statuses.count("warmup_waiting") >= 2  # each poll gave up after 1 s, not 2000 s
    assert lines[-1]["reason"] == "warmup_timeout" and lines[-1]["callback"] == "failed"
    assert took <= 2.5 + TIMEOUT + SLACK
    assert len(mlnode.calls("/warmup/complete")) == 1  # a hung peer is not retried past the budget


def test_warmup_unusable_callback_answers_are_failed_polls(client, peer_server):
    """An answer that is not JSON the server accepts (5000 digits, 2 MiB, deep) is a failed poll."""
    answers = iter([raw_json(b'{"status": "ready", "params": {"start_nonce": ' + b"9" * 5000 + b"}}"),
                    raw_json(b'{"status": "ready", "pad": "' + b"x" * (2 << 20) + b'"}'),
                    raw_json(b"[" * 5000 + b"]" * 5000),
                    raw_json(b'{"status": "ready", "params": {"block_hash": "\\ud800"}}')])
    mlnode = peer_server({"/warmup/params": lambda body: next(answers, (200, {"status": "waiting"}))})
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "junk", "poll_interval_s": 0.05, "timeout_s": 1.0,
        "http_timeout_s": TIMEOUT})]
    assert [line["status"] for line in lines[1:5]] == ["warmup_waiting"] * 4
    assert lines[-1]["reason"] == "warmup_timeout" and lines[-1]["callback"] == "sent"


def test_warmup_failing_callback_still_ends_bounded(client, peer_server):
    mlnode = peer_server({"/warmup/params": (500, {"error": "down"}), "/warmup/complete": (500, {"error": "down"})})
    t0 = time.monotonic()
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "e500", "poll_interval_s": 0.05, "timeout_s": 0.5,
        "http_timeout_s": TIMEOUT})]
    assert lines[-1]["reason"] == "warmup_timeout" and lines[-1]["callback"] == "failed"
    assert 2 <= len(mlnode.calls("/warmup/complete")) <= 3  # quick failures are retried within the budget
    assert time.monotonic() - t0 <= 0.5 + TIMEOUT + SLACK


@pytest.mark.parametrize("generation,field,text", [
    ({**TINY_BODY, "params": UNFITTABLE_PARAMS}, "params", "GiB"),
    ({**TINY_BODY, "params": "@/etc/passwd"}, "params", "unknown preset"),
    ({**TINY_BODY, "params": {"n_layers": 1_000_000}}, "params.n_layers", "at most"),
    ({**TINY_BODY, "block_height": -1}, "block_height", "≥ 0"),
    ("tiny", "params", "object"),
])
def test_warmup_hostile_generation_input_is_an_error_line(client, peer_server, generation, field, text):
    mlnode = peer_server({"/warmup/params": (200, {"status": "ready", "params": generation})})
    lines = [line for _, line in read_stream(client, "/warmup", {
        "callback_url": mlnode.url, "job_id": "bad", "poll_interval_s": 0.05, "http_timeout_s": TIMEOUT})]
    errors = [line for line in lines if "error_type" in line]
    assert len(errors) == 1 and errors[0]["field"] == field and errors[0]["source"] == "callback", errors
    assert text in errors[0]["error"] and "root:" not in json.dumps(lines)
    assert lines[-1]["status"] == "done" and lines[-1]["reason"] == "error" and lines[-1]["callback"] == "sent"
    (complete,) = mlnode.calls("/warmup/complete")
    assert complete.body["reason"] == "error" and field in complete.body["error"]


def test_warmup_client_leaves_while_compiling(server, client, peer_server):
    """The compilation cannot be interrupted; once it is done nothing else runs: no polling."""
    mlnode = peer_server({"/warmup/params": (200, {"status": "waiting"})})
    params = {"dim": 96, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 777, "multiple_of": 32,
              "seq_len": 12}
    leave_after(client, "/warmup", {"callback_url": mlnode.url, "job_id": "compile", "params": params,
                                    "poll_interval_s": 0.05, "http_timeout_s": TIMEOUT},
                lambda lines: lines[-1].get("status") == "compiling")
    h = server.health()
    if h["busy"]:  # still compiling: the state says so
        assert h["job"]["phase"] == "compiling" and h["job"]["stop_reason"] == "disconnected"
    server.wait_idle(60)  # the compilation ends
    last = server.health()["last_job"]
    assert last["stop_reason"] == "disconnected" and last["summary"]["callback"] == "sent"
    assert mlnode.calls("/warmup/params") == []
    (complete,) = mlnode.calls("/warmup/complete")
    assert complete.body["reason"] == "disconnected"
    assert any(k["params"]["dim"] == 96 for k in server.health()["compiled"])  # its work was kept


# /pooled ------------------------------------------------------------------------------------------


def pooled_body(url: str, **extra) -> dict:
    return {"orchestrator_url": url, "worker_id": "peer-test", "poll_interval_s": 0.05, "wait_poll_interval_s": 0.05,
            "heartbeat_interval_s": 0.2, "http_timeout_s": TIMEOUT, "retry_base_s": 0.05, "retry_max_s": 0.1, **extra}


def test_pooled_hung_orchestrator_client_leaves_while_registering(server, client, peer_server):
    orch = peer_server({"/connect": "hang", "/shutdown": "hang"})
    lines, left = leave_after(client, "/pooled", pooled_body(orch.url),
                              lambda lines: wait_until(lambda: orch.calls("/connect"), 10, what="the register call"))
    assert lines[0]["status"] == "registering"
    assert released_after(server, left, TIMEOUT + SLACK) <= TIMEOUT + SLACK
    last = server.health()["last_job"]
    assert last["stop_reason"] == "disconnected" and last["summary"]["reason"] == "disconnected"
    assert len(orch.calls("/connect")) == 1  # the attempt in flight was dropped, no retries
    assert len(orch.calls("/shutdown")) == 1


def test_pooled_orchestrator_slower_than_the_timeout(client, peer_server):
    def slow(body):
        time.sleep(TIMEOUT + 0.5)
        return 200, {"status": "ok", "block_hash": "bh", "params": "tiny"}

    orch = peer_server({"/connect": slow, "/shutdown": slow})
    t0 = time.monotonic()
    lines = [line for _, line in read_stream(client, "/pooled", pooled_body(orch.url, retry_attempts=3))]
    took = time.monotonic() - t0
    assert lines[1] == {"error": "Failed to register with orchestrator", "error_type": "ConnectionError"}
    assert lines[-1]["reason"] == "register_failed" and lines[-1]["total_computed"] == 0
    assert lines[-2]["status"] == "shutdown" and lines[-2]["notified"] is False
    assert len(orch.calls("/connect")) == 3
    assert took <= 3 * TIMEOUT + 0.05 + 0.1 + TIMEOUT + SLACK  # three attempts, two pauses, the notice


@pytest.mark.parametrize("how", ["vanishes", "hangs"])
def test_pooled_orchestrator_lost_mid_session_stops_computing(server, client, peer_server, how):
    grace = 1.0
    state = {"hung": False}

    def answer(reply):
        def respond(body):
            if state["hung"]:
                orch.peer.release.wait(60)
                return 503, {"error": "released"}
            return reply
        return respond

    orch = peer_server({
        "/connect": answer((200, {"status": "ok", "block_hash": "bh-lost", "params": "tiny"})),
        "/ready": answer((200, {"status": "ok", "public_key": "pk", "nonce_range_start": 0, "nonce_range_end": 10**9,
                                "r_target": 2.0})),
        "/config": answer((200, {})), "/heartbeat": answer((200, {"status": "ok"})),
        "/results": answer((200, {"status": "ok"})), "/results/batch": answer((200, {"status": "ok"})),
        "/shutdown": answer((200, {"status": "ok"})),
    })
    failed_at = {}

    def on_line(line):
        if "nonces" in line and not failed_at:
            failed_at["t"] = time.monotonic()
            if how == "vanishes":
                orch.vanish()
            else:
                state["hung"] = True

    lines = [line for _, line in read_stream(client, "/pooled", pooled_body(orch.url, peer_grace_s=grace),
                                            on_line=on_line, timeout=60)]
    ended = time.monotonic()
    errors = [line for line in lines if "error_type" in line]
    assert errors and errors[-1]["error"].startswith("orchestrator lost"), errors
    shutdown, summary = lines[-2], lines[-1]
    assert shutdown["status"] == "shutdown" and shutdown["reason"] == "orchestrator_lost"
    assert shutdown["notified"] is False
    assert summary["status"] == "done" and summary["reason"] == "orchestrator_lost" and summary["detail"]
    # Lost after the grace, then one goodbye budget; a step or a call in flight at most on top.
    assert ended - failed_at["t"] <= grace + TIMEOUT + TIMEOUT + SLACK
    h = server.wait_idle()
    steps = h["steps_completed"]
    time.sleep(0.3)
    assert server.health()["steps_completed"] == steps
    assert h["last_job"]["summary"]["reason"] == "orchestrator_lost"


def test_pooled_normal_end_with_a_hung_orchestrator_is_bounded(client, peer_server):
    """A shutdown command, then the orchestrator hangs: the flush gets final_flush_s, the notice one timeout."""
    commands = []
    orch = peer_server({
        "/connect": (200, {"status": "ok", "block_hash": "bh-end", "params": "tiny"}),
        "/ready": (200, {"status": "ok", "public_key": "pk", "nonce_range_start": 0, "nonce_range_end": 16,
                         "r_target": 2.0}),
        "/config": lambda body: (200, commands.pop() if commands else {}),
        "/results": "hang", "/results/batch": "hang", "/shutdown": "hang",
    })
    flush = 0.5
    asked = {}

    def on_line(line):
        if line.get("status") == "idle" and not asked:
            asked["t"] = time.monotonic()
            commands.append({"type": "shutdown"})

    lines = [line for _, line in read_stream(client, "/pooled", pooled_body(orch.url, final_flush_s=flush),
                                            on_line=on_line)]
    took = time.monotonic() - asked["t"]
    assert lines[-2]["status"] == "shutdown" and lines[-2]["reason"] == "shutdown_command"
    assert lines[-2]["notified"] is False and lines[-2]["unsent_results"] == 2
    assert took <= flush + TIMEOUT + SLACK
    assert len(orch.calls("/shutdown")) == 1


@pytest.mark.parametrize("connect,field", [
    ((200, {"status": "ok", "block_hash": "bh", "params": "@/etc/passwd"}), "params"),
    ((200, {"status": "ok", "block_hash": "bh", "params": "@/dev/zero"}), "params"),
    ((200, {"status": "ok", "block_hash": "bh", "params": UNFITTABLE_PARAMS}), "params"),
    ((200, {"status": "ok", "block_hash": "bh", "params": {"seq_len": 1_000_000_000}}), "params.seq_len"),
    (raw_json(b'{"status": "ok", "block_hash": "\\ud800", "params": "tiny"}'), None),
    (raw_json(b'{"status": "ok", "block_hash": ' + b"[" * 5000 + b"]" * 5000 + b"}"), None),
    (raw_json(b'{"status": "ok", "pad": "' + b"x" * (2 << 20) + b'"}'), None),
    (raw_json(b'{"status": "ok", "r_target": NaN}'), None),
])
def test_pooled_hostile_orchestrator_answers(client, server, peer_server, connect, field):
    orch = peer_server({"/connect": connect})
    lines = [line for _, line in read_stream(client, "/pooled", pooled_body(orch.url, retry_attempts=2))]
    assert lines[-1]["status"] == "done" and lines[-2]["status"] == "shutdown"
    (shutdown,) = orch.calls("/shutdown")
    if field is None:  # the answer itself is refused: registering failed
        assert lines[-1]["reason"] == "register_failed" and len(orch.calls("/connect")) == 2
        return
    (error,) = [line for line in lines if "error_type" in line]
    assert error["field"] == field and error["source"] == "orchestrator" and "root:" not in error["error"]
    assert lines[-1]["reason"] == "error" and shutdown.body["stats"]["reason"] == "error"
    assert server.health()["last_job"]["nonces_computed"] == 0


# /validate ----------------------------------------------------------------------------------------


def test_validate_stops_when_its_client_leaves(server):
    n = 30000
    claim = {"params": "tiny", "block_hash": "long", "public_key": "validate", "nonces": list(range(n)),
             "dist": [1.0] * n, "r_target": 2.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/validate", json=claim, timeout=httpx.Timeout(10, read=1.5))
    left = time.monotonic()
    assert released_after(server, left, SLACK) <= SLACK
    h = server.health()
    assert h["last_job"]["kind"] == "validate" and h["last_job"]["stop_reason"] == "disconnected"
    assert 0 < h["last_job"]["nonces_computed"] < n
    steps = h["steps_completed"]
    time.sleep(0.3)
    assert server.health()["steps_completed"] == steps


# SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/warmup", "/pooled"])
def test_sigterm_with_a_hung_peer_exits_within_the_drain_timeout(tmp_path, compile_cache, peer_server, route):
    drain = 5.0
    proc = ServiceProcess(tmp_path, compile_cache,
                          env={"MODEL_DRAIN_TIMEOUT_S": str(drain), "MODEL_HTTP_TIMEOUT_S": "30"})
    proc.start()
    try:
        if route == "/warmup":
            peer = peer_server({"/warmup/params": "hang", "/warmup/complete": "hang"})
            body = {"callback_url": peer.url, "job_id": "term", "poll_interval_s": 0.05}
            in_flight = lambda: peer.calls("/warmup/params")  # noqa: E731
        else:
            peer = peer_server({"/connect": (200, {"status": "ok", "block_hash": "bh-term", "params": "tiny"}),
                                "/ready": (200, {"status": "ok", "public_key": "pk", "nonce_range_start": 0,
                                                 "nonce_range_end": 10**9, "r_target": 2.0}),
                                "/results": "hang", "/results/batch": "hang", "/shutdown": "hang"})
            body = {"orchestrator_url": peer.url, "worker_id": "term", "poll_interval_s": 0.05}
            in_flight = lambda: peer.calls("/results")  # noqa: E731
        lines = []
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            with client.stream("POST", route, json=body) as r:
                for text in r.iter_lines():
                    lines.append(json.loads(text))
                    if len(lines) == 1:
                        wait_until(in_flight, 20, what="a call in flight to the hung peer")
                        sent = time.monotonic()
                        os.kill(proc.pid, signal.SIGTERM)
        assert lines[-1]["status"] == "done" and lines[-1]["reason"] == "shutdown", lines[-3:]
        assert time.monotonic() - sent <= drain
        assert proc.proc.wait(drain) == 0
        assert time.monotonic() - sent <= drain + 0.5
        assert "SIGTERM: draining" in proc.log() and "did not end" not in proc.log()
    finally:
        proc.stop()


def test_retry_pauses_double_up_to_their_cap_and_stay_within_the_budget():
    from jaxbench.backoff import Backoff
    from service.peers import Budget

    unbounded = Budget(None)
    assert [unbounded.retry_pause(Backoff(0.5), a + 1, 4) for a in range(4)] == [0.5, 1.0, 2.0, None]
    assert [unbounded.retry_pause(Backoff(0.5, max_s=1.5), a + 1, 4) for a in range(3)] == [0.5, 1.0, 1.5]
    short = Budget(1.0)
    assert short.retry_pause(Backoff(0.5), 1, 4) == 0.5
    assert short.retry_pause(Backoff(0.5), 2, 4) is None  # a 1 s pause leaves nothing of a 1 s budget
