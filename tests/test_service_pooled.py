"""/pooled against a live server and a real HTTP server standing in for the orchestrator."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from service_helpers import FakeHTTPServer, cli_distances, read_stream, wait_until

WORKER = "worker-under-test"


class FakeOrchestrator:
    """The orchestrator's API: scripted config answers (one queued command per poll), a `down`
    switch (every call answers 503), result recording."""

    def __init__(self, ready_reply: dict | None = None):
        self.lock = threading.Lock()
        self.commands: collections.deque = collections.deque()
        self.ready_reply = ready_reply or {}
        self.connect_reply = {"status": "wait"}
        self.down = False
        self.results_down = False
        self.results: list[dict] = []  # every result accepted, in arrival order
        self.rejected_results = 0
        self.shutdowns: list[dict] = []

    def push(self, command: dict):
        with self.lock:
            self.commands.append(command)

    def received(self) -> dict[tuple[str, str], list[int]]:
        with self.lock:
            out = collections.defaultdict(list)
            for r in self.results:
                out[(r["block_hash"], r["public_key"])].extend(r["nonces"])
            return dict(out)

    def __call__(self, method, path, query, body):
        base = f"/api/workers/{WORKER}/"
        if path.endswith("/shutdown"):
            with self.lock:
                self.shutdowns.append(body)
            return 200, {"status": "ok"}
        if self.down:
            return 503, {"error": "down"}
        if path == "/api/workers/connect":
            assert body["worker_id"] == WORKER and body["gpu_count"] == 1 and body["gpu_info"]
            return 200, self.connect_reply
        assert path.startswith(base), path
        tail = path[len(base):]
        if tail == "heartbeat":
            assert isinstance(body["pending_results"], int)
            return 200, {"status": "ok"}
        if tail == "config":
            with self.lock:
                return 200, (self.commands.popleft() if self.commands else {})
        if tail == "ready":
            return 200, self.ready_reply
        if tail in ("results", "results/batch"):
            if self.results_down:
                with self.lock:
                    self.rejected_results += 1
                return 503, {"error": "results down"}
            batch = body["results"] if tail == "results/batch" else [body]
            with self.lock:
                self.results.extend(batch)
            return 200, {"status": "ok"}
        return 404, {"error": "unknown"}


def pooled_body(url: str, **extra) -> dict:
    return {"orchestrator_url": url + "/", "worker_id": WORKER, "poll_interval_s": 0.05,
            "wait_poll_interval_s": 0.05, "heartbeat_interval_s": 0.1, **extra}


def status_lines(lines):
    return [line["status"] for line in lines if "status" in line]


def test_full_pooled_flow(client, server, compile_cache):
    orch = FakeOrchestrator(ready_reply={"status": "ok", "public_key": "pk-A", "nonce_range_start": 100,
                                         "nonce_range_end": 340, "r_target": 2.0, "block_height": 9})
    idles = []

    def on_line(line):  # the orchestrator script, driven by what the stream shows
        status = line.get("status")
        if status == "waiting_block_hash":
            orch.push({})
            orch.push({"type": "config", "block_hash": "bh-pool", "params": "tiny"})
        elif status == "idle" and line["reason"] == "range_complete":
            idles.append(line)
            step = len(idles)
            if step == 1:  # range of pk-A done: switch to pk-B with a new range
                orch.push({"type": "switch_job", "public_key": "pk-B", "nonce_range_start": 1000,
                           "nonce_range_end": 1100})
            elif step == 2:  # a wider range for the same job: only the new part is computed
                orch.push({"type": "compute", "nonce_range_start": 1000, "nonce_range_end": 1150})
            elif step == 3:  # a new block hash: new weights, the range again
                orch.push({"type": "config", "block_hash": "bh-pool-2", "nonce_range_start": 1100})
            elif step == 4:
                orch.push({"type": "shutdown"})

    with FakeHTTPServer(orch) as http:
        timed = read_stream(client, "/pooled", {"payload": pooled_body(http.url)}, on_line=on_line, timeout=90)
        lines = [line for _, line in timed]
        st = status_lines(lines)
        expected = ["registering", "registered", "waiting_block_hash", "received_block_hash", "loading_model",
                    "model_loaded", "ready", "computing", "idle", "switched_public_key", "idle", "idle",
                    "received_block_hash", "loading_model", "model_loaded", "idle", "shutdown", "done"]
        assert st == expected, st
        assert lines[0] == {"status": "registering", "worker_id": WORKER, "gpu_count": 1}
        assert lines[st.index("ready")]["public_key"] == "pk-A"
        received = orch.received()
        # Every nonce of every range exactly once: nothing skipped, nothing repeated.
        assert sorted(received[("bh-pool", "pk-A")]) == list(range(100, 340))
        assert sorted(received[("bh-pool", "pk-B")]) == list(range(1000, 1150))
        assert sorted(received[("bh-pool-2", "pk-B")]) == list(range(1100, 1150))
        assert set(received) == {("bh-pool", "pk-A"), ("bh-pool", "pk-B"), ("bh-pool-2", "pk-B")}
        # What was streamed is what was sent.
        streamed = [line for line in lines if "nonces" in line]
        assert len(streamed) == len(orch.results) == 30 + (13 + 7) + 7  # steps of 8; a range's last may be short
        assert sorted(map(str, streamed)) == sorted(map(str, orch.results))
        for r in orch.results:
            assert set(r) == {"worker_id", "public_key", "block_hash", "block_height", "nonces", "dist", "node_id",
                              "batch_number", "batch_computed", "batch_valid", "total_computed", "total_valid",
                              "elapsed_seconds"}
            assert r["block_height"] == 9 and r["batch_valid"] == len(r["nonces"]) > 0
        # switch_job reset the per-group counters.
        first_b = next(r for r in orch.results if r["public_key"] == "pk-B")
        assert first_b["batch_number"] == 1 and first_b["total_computed"] == 8
        # The new block hash really changed the weights: distances are the CLI's for that hash.
        new = {n: d for r in orch.results if r["block_hash"] == "bh-pool-2" for n, d in zip(r["nonces"], r["dist"])}
        cli = cli_distances("bh-pool-2", "pk-B", "1100-1115", compile_cache)
        assert max(abs(new[n] - cli[n]) for n in cli) <= 1e-6
        old = {n: d for r in orch.results if r["block_hash"] == "bh-pool" and r["public_key"] == "pk-B"
               for n, d in zip(r["nonces"], r["dist"])}
        assert all(old[n] != new[n] for n in cli)
        # The shutdown notification, with stats that add up.
        (shutdown,) = orch.shutdowns
        stats = shutdown["stats"]
        assert stats["reason"] == "shutdown_command"
        assert stats["total_batches_sent"] == len(orch.results) and stats["dropped_results"] == 0
        assert stats["unsent_results"] == 0 and stats["total_computed"] == 240 + 150 + 50
        assert lines[-2]["total_batches_sent"] == len(orch.results) and lines[-2]["notified"] is True
        assert lines[-1]["status"] == "done" and lines[-1]["total_computed"] == 440
        assert len(http.calls("/heartbeat")) >= 1
    server.wait_idle()


def test_orchestrator_down_for_a_while_loses_nothing(client, server):
    orch = FakeOrchestrator(ready_reply={"status": "ok", "public_key": "pk-C", "nonce_range_start": 0,
                                         "nonce_range_end": 400, "r_target": 2.0})
    orch.connect_reply = {"status": "ok", "block_hash": "bh-down", "params": "tiny"}
    state = {"downed": None}

    def on_line(line):
        if line.get("status") == "computing":
            orch.down = True  # every endpoint but shutdown answers 503
            state["downed"] = time.monotonic()

    def bring_back():
        wait_until(lambda: state["downed"], 60, what="computing")
        time.sleep(1.0)
        state["accepted_while_down"] = len(orch.results)
        orch.down = False
        wait_until(lambda: len(orch.results) >= 50, 30, what="the results after the outage")
        orch.push({"type": "shutdown"})

    with FakeHTTPServer(orch) as http:
        threading.Thread(target=bring_back, daemon=True).start()
        lines = [line for _, line in read_stream(client, "/pooled", pooled_body(http.url), on_line=on_line, timeout=90)]
        assert status_lines(lines)[-2:] == ["shutdown", "done"]
        assert state["accepted_while_down"] == 0
        down_calls = [r for r in http.requests if state["downed"] <= r.time <= state["downed"] + 1.0]
        assert any(r.path.endswith("/results") or r.path.endswith("/results/batch") for r in down_calls)
        assert sorted(orch.received()[("bh-down", "pk-C")]) == list(range(400))
        assert len(http.calls("/results/batch")) >= 1  # the backlog went out in batches
        stats = orch.shutdowns[0]["stats"]
        assert stats["dropped_results"] == 0 and stats["unsent_results"] == 0
        assert stats["total_batches_sent"] == len(orch.results) == 50
    server.wait_idle()


def test_dropped_results_are_counted_and_reported(client, server):
    orch = FakeOrchestrator(ready_reply={"status": "ok", "public_key": "pk-D", "nonce_range_start": 0,
                                         "nonce_range_end": 160, "r_target": 2.0})
    orch.connect_reply = {"status": "ok", "block_hash": "bh-drop", "params": "tiny"}
    orch.results_down = True

    def on_line(line):
        if line.get("status") == "idle":
            orch.push({"type": "shutdown"})

    with FakeHTTPServer(orch) as http:
        lines = [line for _, line in read_stream(client, "/pooled", pooled_body(
            http.url, result_buffer=3, final_flush_s=0.3), on_line=on_line, timeout=60)]
        produced = [line for line in lines if "nonces" in line]
        assert len(produced) == 20
        stats = orch.shutdowns[0]["stats"]
        assert stats["results_produced"] == 20 and stats["total_batches_sent"] == 0
        assert stats["dropped_results"] >= 15
        assert stats["dropped_results"] + stats["unsent_results"] == 20
        assert orch.rejected_results >= 1
        end = lines[-2]
        assert end["status"] == "shutdown" and end["dropped_results"] == stats["dropped_results"]
    server.wait_idle()


def test_a_screened_session_sends_the_exact_sessions_results(client, server):
    """A screen applies to every part of the range searched; what is sent is what the unscreened
    session sends, distances bit for bit."""

    def session(**screen) -> tuple[list[dict], dict]:
        orch = FakeOrchestrator(ready_reply={"status": "ok", "public_key": "pk-S", "nonce_range_start": 0,
                                             "nonce_range_end": 96, "r_target": 1.40})
        orch.connect_reply = {"status": "ok", "block_hash": "bh-screen", "params": "tiny"}

        def on_line(line):
            if line.get("status") == "idle" and line["reason"] == "range_complete":
                if line["nonce_range_end"] == 96:  # a second part: the screen goes on with it
                    orch.push({"type": "compute", "nonce_range_end": 160})
                else:
                    orch.push({"type": "shutdown"})

        with FakeHTTPServer(orch) as http:
            lines = [line for _, line in read_stream(client, "/pooled", pooled_body(http.url, **screen), on_line=on_line)]
        server.wait_idle()
        assert sorted(map(str, (line for line in lines if "nonces" in line))) == sorted(map(str, orch.results))
        return orch.results, lines[-1]

    pairs = lambda results: {n: d for r in results for n, d in zip(r["nonces"], r["dist"])}
    exact, exact_summary = session()
    screened, summary = session(screen="fp8", screen_margin=0.02)
    assert 0 < len(pairs(exact)) < 160 and pairs(screened) == pairs(exact)
    assert all(r["screen"] == "fp8" and r["screen_margin"] == 0.02 for r in screened)
    assert not any("screen" in r for r in exact) and "screened" not in exact_summary
    assert summary["screen"] == "fp8" and summary["screen_margin"] == 0.02
    assert summary["screened"] == summary["total_computed"] == 160
    assert summary["total_valid"] == exact_summary["total_valid"] <= summary["candidates_recomputed"] < 160


def test_waits_for_a_public_key_and_r_target(client, server):
    orch = FakeOrchestrator(ready_reply={"status": "ok"})
    orch.connect_reply = {"status": "ok", "block_hash": "bh-wait", "params": "tiny", "nonce_range_start": 7,
                          "nonce_range_end": 27}

    def on_line(line):
        if line.get("status") == "idle":
            if line["reason"] == "no_public_key":
                orch.push({"type": "compute", "public_key": "pk-W"})
            elif line["reason"] == "no_r_target":
                orch.push({"type": "compute", "r_target": 2.0})
            elif line["reason"] == "range_complete":
                orch.push({"type": "shutdown"})

    with FakeHTTPServer(orch) as http:
        lines = [line for _, line in read_stream(client, "/pooled", pooled_body(http.url), on_line=on_line)]
        idle = [line["reason"] for line in lines if line.get("status") == "idle"]
        assert idle == ["no_public_key", "no_r_target", "range_complete"]
        assert sorted(orch.received()[("bh-wait", "pk-W")]) == list(range(7, 27))
        assert lines[-1]["total_computed"] == 20
    server.wait_idle()


def test_register_failure_still_notifies_shutdown(client, server):
    orch = FakeOrchestrator()
    orch.down = True
    with FakeHTTPServer(orch) as http:
        lines = [line for _, line in read_stream(client, "/pooled", pooled_body(http.url, retry_attempts=2))]
        assert lines[1] == {"error": "Failed to register with orchestrator", "error_type": "ConnectionError"}
        assert len(http.calls("/api/workers/connect")) == 2
        assert orch.shutdowns[0]["stats"]["reason"] == "register_failed"
        assert lines[-1]["reason"] == "register_failed"
    server.wait_idle()


def test_disconnect_ends_the_session_and_notifies(client, server):
    orch = FakeOrchestrator(ready_reply={"status": "ok", "public_key": "pk-E", "nonce_range_start": 0,
                                         "nonce_range_end": 10**9, "r_target": 2.0})
    orch.connect_reply = {"status": "ok", "block_hash": "bh-gone", "params": "tiny"}
    with FakeHTTPServer(orch) as http:
        with client.stream("POST", "/pooled", json=pooled_body(http.url)) as r:
            for text in r.iter_lines():
                if '"nonces"' in text:
                    break
        wait_until(lambda: orch.shutdowns, 15, what="the shutdown notification")
        assert orch.shutdowns[0]["stats"]["reason"] == "disconnected"
        h = server.wait_idle()
        assert h["last_job"]["kind"] == "pooled" and h["last_job"]["stop_reason"] == "disconnected"
        steps = h["steps_completed"]
        time.sleep(0.3)
        assert server.health()["steps_completed"] == steps
        assert orch.shutdowns[0]["stats"]["total_computed"] == h["last_job"]["nonces_computed"]


@pytest.mark.parametrize("payload,field", [
    ({}, "orchestrator_url"),
    ({"orchestrator_url": "orchestrator"}, "orchestrator_url"),
    ({"orchestrator_url": "file:///etc"}, "orchestrator_url"),
    ({"orchestrator_url": "http://o", "poll_interval_s": -1}, "poll_interval_s"),
    ({"orchestrator_url": "http://o", "result_buffer": 0}, "result_buffer"),
    ({"orchestrator_url": "http://o", "worker_id": ""}, "worker_id"),
    ({"orchestrator_url": "http://o", "send_empty_results": "yes"}, "send_empty_results"),
    ({"orchestrator_url": "http://o", "screen": "int8"}, "screen"),
    ({"orchestrator_url": "http://o", "screen": "fp8", "screen_margin": -1}, "screen_margin"),
])
def test_malformed_pooled_is_400(client, payload, field):
    r = client.post("/pooled", json=payload)
    assert r.status_code == 400 and r.json()["field"] == field, r.text


def test_interval_bookkeeping():
    from service.coverage import add_interval, first_gap

    covered: list[list[int]] = []
    assert first_gap(covered, 10, 20) == (10, 20)
    add_interval(covered, 10, 14)
    add_interval(covered, 16, 18)
    assert covered == [[10, 14], [16, 18]]
    assert first_gap(covered, 10, 20) == (14, 16)
    assert first_gap(covered, 0, 12) == (0, 10)
    add_interval(covered, 14, 16)
    assert covered == [[10, 18]]
    assert first_gap(covered, 10, 18) is None and first_gap(covered, 12, 25) == (18, 25)
    add_interval(covered, 0, 5)
    add_interval(covered, 30, 30)  # empty: ignored
    assert covered == [[0, 5], [10, 18]] and first_gap(covered, 0, 18) == (5, 10)
    assert first_gap(covered, 5, 5) is None
