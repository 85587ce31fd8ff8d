"""/generate, /benchmark, /validate and /health against a live `python -m service` (CPU, tiny params)."""

from __future__ import annotations

import json
import time

import pytest

from jaxbench.fields import DEFAULT_SCREEN_MARGIN
from service_helpers import JAX_PLATFORMS, TINY_BODY, assert_clean_log, cli_distances, read_stream, wait_until
from service import signals

RESULT_FIELDS = {
    "worker_id": int, "public_key": str, "block_hash": str, "block_height": int, "nonces": list, "dist": list,
    "node_id": int, "batch_number": int, "batch_computed": int, "batch_valid": int, "total_computed": int,
    "total_valid": int, "elapsed_seconds": float, "next_nonce": (int, type(None)), "aggregated_batch_number": int,
    "aggregated_total_computed": int, "aggregated_total_valid": int, "n_workers": int,
}
SUMMARY_FIELDS = {"status", "reason", "total_computed", "total_valid", "elapsed_seconds", "nonces_per_second"}


def body(**changes):
    out = {**TINY_BODY, **changes}
    return {k: v for k, v in out.items() if v is not None}


def test_health_get_and_post(client):
    for r in (client.get("/health"), client.post("/health", json={})):
        assert r.status_code == 200
        h = r.json()
        assert h["status"] == "healthy" and h["cuda_broken"] is False and h["busy"] is False
        assert h["job"] is None
        assert h["devices"] and h["devices"][0]["platform"] == (JAX_PLATFORMS or h["devices"][0]["platform"])
        if h["groups"] is None:  # no parameter set loaded yet: the size is chosen per set
            assert h["group_size"] == "auto"
        else:
            assert h["groups"] >= 1 and h["groups"] * h["group_size"] <= len(h["devices"])
        assert isinstance(h["compiled"], list) and isinstance(h["steps_completed"], int)


def test_results_match_the_cli(client, compile_cache):
    start, n = 1000, 48
    lines = [line for _, line in read_stream(client, "/generate",
                                             {"payload": body(start_nonce=start, max_nonces=n, block_height=11)})]
    results, summary = lines[:-1], lines[-1]
    assert len(results) == n // 8  # one line per step of 8 (every nonce valid at r_target 2)
    for line in results:
        assert set(line) == set(RESULT_FIELDS)
        for key, kind in RESULT_FIELDS.items():
            assert isinstance(line[key], kind), (key, line[key])
        assert line["block_height"] == 11 and line["public_key"] == TINY_BODY["public_key"]
        assert line["batch_valid"] == len(line["nonces"]) == len(line["dist"]) == line["batch_computed"] == 8
    assert [line["aggregated_batch_number"] for line in results] == list(range(1, len(results) + 1))
    assert [line["aggregated_total_computed"] for line in results] == [8 * (i + 1) for i in range(len(results))]
    assert results[-1]["next_nonce"] is None and results[0]["next_nonce"] == start + 8
    got = {nonce: d for line in results for nonce, d in zip(line["nonces"], line["dist"])}
    assert sorted(got) == list(range(start, start + n))
    assert set(summary) == SUMMARY_FIELDS
    assert summary["status"] == "done" and summary["reason"] == "completed"
    assert summary["total_computed"] == n and summary["total_valid"] == n

    cli = cli_distances(TINY_BODY["block_hash"], TINY_BODY["public_key"], f"{start}-{start + n - 1}", compile_cache)
    assert sorted(cli) == sorted(got)
    assert max(abs(cli[k] - got[k]) for k in got) <= 1e-6

    # A real threshold keeps exactly the nonces the CLI's distances put below it.
    r_target = sorted(cli.values())[n // 4]
    lines = [line for _, line in read_stream(client, "/generate", body(start_nonce=start, max_nonces=n, r_target=r_target))]
    valid = sorted(nonce for line in lines[:-1] for nonce in line["nonces"])
    assert valid == sorted(k for k, d in cli.items() if d < r_target)
    assert lines[-1]["total_valid"] == len(valid) and lines[-1]["total_computed"] == n
    assert all(line["batch_valid"] >= 1 for line in lines[:-1])


def test_lines_stream_before_the_job_ends(client):
    t0 = time.monotonic()
    timed = read_stream(client, "/generate", body(duration_s=2.5))
    end_time, summary = timed[-1]
    results = timed[:-1]
    assert summary["reason"] == "duration" and summary["elapsed_seconds"] >= 2.5
    assert len(results) >= 10
    # The first lines reached us long before the job ended.
    assert results[0][0] < end_time - 1.0
    early = [t for t, _ in results if t < end_time - 1.0]
    assert len(early) >= 5
    assert end_time - t0 < 30
    # Aggregates count every computed nonce.
    assert summary["total_computed"] == sum(line["batch_computed"] for _, line in results)
    assert summary["total_valid"] == summary["total_computed"]
    assert results[-1][1]["aggregated_total_computed"] == summary["total_computed"]


BAD_REQUESTS = [
    ("not json", "body"),
    ("[1, 2]", "body"),
    ("42", "body"),
    ("null", "body"),
    ({"payload": [1]}, "payload"),
    (body(block_hash=None), "block_hash"),
    (body(block_hash=123), "block_hash"),
    (body(block_hash=""), "block_hash"),
    (body(block_hash="x" * 5000), "block_hash"),
    (body(public_key=["pk"]), "public_key"),
    (body(block_height="7"), "block_height"),
    (body(block_height=-1), "block_height"),
    (body(block_height=True), "block_height"),
    (body(r_target="1.4"), "r_target"),
    (body(r_target=-1.0), "r_target"),
    (body(r_target=0), "r_target"),
    (body(batch_size=0), "batch_size"),
    (body(batch_size=1.5), "batch_size"),
    (body(start_nonce=-5), "start_nonce"),
    (body(start_nonce="0"), "start_nonce"),
    (body(params=None), "params"),
    (body(params=[1, 2]), "params"),
    (body(params="no-such-preset"), "params"),
    (body(params={"dim": 64, "bogus": 1}), "params.bogus"),
    (body(params={"dim": 65, "n_heads": 4}), "params.dim"),
    (body(params={"n_layers": 0}), "params.n_layers"),
    (body(params={"norm_eps": "small"}), "params.norm_eps"),
    (body(dtype="int8"), "dtype"),
    (body(max_nonces=0), "max_nonces"),
    (body(max_nonces="10"), "max_nonces"),
    (body(duration_s=-1), "duration_s"),
    (body(duration_s="long"), "duration_s"),
    (body(n_nodes=2, node_id=2), "node_id"),
    (body(n_nodes=0), "n_nodes"),
    (body(screen="fp4"), "screen"),
    (body(screen=True), "screen"),
    (body(screen="fp8", screen_margin=-0.01), "screen_margin"),
    (body(screen="fp8", screen_margin=0.5), "screen_margin"),
    (body(screen="fp8", screen_margin="wide"), "screen_margin"),
    (body(screen_margin=0.01), "screen_margin"),  # a margin without a screen is a mistake, not a no-op
]


@pytest.mark.parametrize("payload,field", BAD_REQUESTS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_REQUESTS)])
def test_malformed_generate_is_400_naming_the_field(client, payload, field):
    content = payload if isinstance(payload, str) else json.dumps(payload)
    for path in ("/generate", "/benchmark"):
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field, r.json()
        assert r.json()["error"]


def test_fields_outside_the_protocol_are_ignored_but_logged_and_named_in_the_summary(server, client):
    """The predecessor ignored every key it did not read, and its callers may send more: such keys
    are no 400, but the log and the summary name them (a typo such as `duration` for `duration_s`
    shows). The Vast wrapper's own keys beside `payload` are not the payload's: not named."""
    lines = [line for _, line in read_stream(client, "/generate", body(max_nonces=8, colour="red", duration=5))]
    summary = lines[-1]
    assert summary["status"] == "done" and summary["total_computed"] == 8
    assert summary["ignored_fields"] == ["colour", "duration"]
    wait_until(lambda: "/generate: ignoring field(s) the protocol does not define: colour, duration" in server.log(),
               5, what="the log line naming the ignored fields")

    wrapped = {"auth_data": {"signature": "x"}, "session_id": 3, "payload": body(max_nonces=8)}
    for sent in (wrapped, body(max_nonces=8)):
        summary = read_stream(client, "/generate", sent)[-1][1]
        assert summary["status"] == "done" and "ignored_fields" not in summary, summary


def test_nan_r_target_and_huge_body(client):
    r = client.post("/generate", content=json.dumps(body()).replace("2.0", "NaN"),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "r_target"
    r = client.post("/generate", content=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_busy_409_then_disconnect_stops_the_engine(server, client):
    with client.stream("POST", "/generate", json=body(duration_s=120)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert first["nonces"]
        h = server.health()
        assert h["busy"] is True and h["job"]["kind"] == "generate"
        steps_before = h["job"]["steps_completed"]
        wait_until(lambda: server.health()["job"]["steps_completed"] > steps_before + 3, 10, what="steps to grow")
        for path, payload in [("/generate", body()), ("/benchmark", body()), ("/warmup", {"callback_url": "http://127.0.0.1:9"}),
                              ("/pooled", {"orchestrator_url": "http://127.0.0.1:9"}),
                              ("/validate", {"params": "tiny", "block_hash": "b", "public_key": "p", "nonces": [1],
                                             "dist": [1.0], "r_target": 1.4})]:
            other = client.post(path, json=payload)
            assert other.status_code == 409, (path, other.text)
            assert other.json()["error"] == "busy" and other.json()["job"]["kind"] == "generate"
    # The client is gone: the engine stops and the job is released.
    h = server.wait_idle(10)
    assert h["last_job"]["stop_reason"] == "disconnected" and h["job"] is None
    assert h["last_job"]["nonces_computed"] > 0
    steps = h["steps_completed"]
    time.sleep(0.5)
    assert server.health()["steps_completed"] == steps
    # The next request starts cleanly.
    lines = [line for _, line in read_stream(client, "/generate", body(max_nonces=16))]
    assert lines[-1]["reason"] == "completed" and lines[-1]["total_computed"] == 16


def test_a_request_right_after_a_disconnect_waits_for_the_stopping_job(server, client):
    """The PyWorker forwards its next queued request the moment a client leaves: no 409 then."""
    # Steps of a few hundred milliseconds, so the job is still finishing one when the next request comes.
    slow = {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 1000, "seq_len": 128,
            "multiple_of": 64}
    with client.stream("POST", "/generate", json=body(duration_s=120, params=slow, r_target=2.0)) as r:
        assert json.loads(next(r.iter_lines()))["nonces"]
    lines = [line for _, line in read_stream(client, "/generate", body(max_nonces=16, params=slow))]
    assert lines[-1]["reason"] == "completed" and lines[-1]["total_computed"] == 16
    assert server.health()["last_job"]["kind"] == "generate"


def test_a_screened_search_reports_the_exact_searchs_nonces_and_distances(client):
    """The screen changes which nonces the exact step computes, never a reported distance: with a
    margin far above tiny's fp8 gap it reports every valid nonce, each with its bit-identical distance."""
    search = body(block_hash="screened-bh", max_nonces=200, r_target=1.40)
    pairs = lambda rows: {n: d for r in rows for n, d in zip(r["nonces"], r["dist"])}
    *exact, exact_summary = [line for _, line in read_stream(client, "/generate", search)]
    *results, summary = [line for _, line in read_stream(client, "/generate",
                                                         {**search, "screen": "fp8", "screen_margin": 0.02})]
    assert 0 < len(pairs(exact)) < 200  # a real threshold: some nonces valid, not all
    assert pairs(results) == pairs(exact)
    assert all(set(r) == set(RESULT_FIELDS) | {"screen", "screen_margin"} for r in results)
    assert all(r["screen"] == "fp8" and r["screen_margin"] == 0.02 for r in results)
    assert set(summary) == SUMMARY_FIELDS | {"screen", "screen_margin", "screened", "candidates_recomputed"}
    assert summary["screen"] == "fp8" and summary["screen_margin"] == 0.02
    assert summary["total_computed"] == summary["screened"] == 200 and summary["reason"] == "completed"
    assert summary["total_valid"] == exact_summary["total_valid"] <= summary["candidates_recomputed"] < 200

    r = client.post("/benchmark", json={**search, "screen": "fp8"})  # the default margin
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["screen"] == "fp8" and out["screen_margin"] == DEFAULT_SCREEN_MARGIN
    assert out["screened"] == out["workload"] == 200 and out["total_valid"] == exact_summary["total_valid"]


def test_benchmark_runs_to_completion(client):
    r = client.post("/benchmark", json=body(max_nonces=64, r_target=1.4))
    assert r.status_code == 200, r.text
    out = r.json()
    assert SUMMARY_FIELDS <= set(out)
    assert out["reason"] == "completed" and out["workload"] == out["total_computed"] == 64
    assert 0 <= out["total_valid"] < 64
    r = client.post("/benchmark", json={"payload": body()})  # max_nonces defaults to MODEL_BENCHMARK_NONCES
    assert r.status_code == 200 and r.json()["workload"] == 32


def test_benchmark_explains_its_rate(client):
    """Its window (the steps after the first), the telemetry fields (null on a CPU, with the reason)
    and, when asked, the sustained ceiling (not measured on a CPU, with the reason)."""
    from jaxbench import telemetry
    from jaxbench.params import PRESETS

    r = client.post("/benchmark", json=body(max_nonces=64, sustained_seconds=2))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["window_nonces"] == 64 - 8 and out["window_seconds"] > 0  # 8 steps of 8: all but the first
    seconds = out["window_seconds"]  # rounded to the millisecond
    assert out["window_nonces"] / (seconds + 5e-4) <= out["window_nonces_per_s"] <= out["window_nonces"] / (seconds - 5e-4)
    assert out["tflops_per_device"] == pytest.approx(
        out["window_nonces_per_s"] * PRESETS["tiny"].flops_per_nonce() / out["devices"] / 1e12, abs=0.01)
    assert out["devices"] >= 1 and out["device_kind"]
    assert set(telemetry.FIELDS) <= set(out)
    if out["device_kind"] == "cpu":
        assert out["telemetry_unavailable"] == "no NVIDIA GPU (the devices are cpu)"
        assert all(out[name] is None for name in telemetry.FIELDS if name != "telemetry_unavailable")
        assert out["sustained_tflops"] is None and out["percent_of_sustained"] is None
        assert out["sustained_unavailable"] == "measured on GPUs only (the devices are cpu)"
    assert out["sustained_seconds"] == 2

    one_step = client.post("/benchmark", json=body(max_nonces=8)).json()
    assert one_step["window_nonces"] == 0 and one_step["window_nonces_per_s"] is None
    assert one_step["sustained_unavailable"] == "not measured"  # off unless asked: the SDK times the request
    if one_step["device_kind"] != "cpu":
        assert one_step["telemetry_unavailable"] == "one step: no window after the first"

    for bad in (-1, 31, "5"):
        r = client.post("/benchmark", json=body(sustained_seconds=bad))
        assert r.status_code == 400 and r.json()["field"] == "sustained_seconds", r.text


def test_validate(client, compile_cache):
    cli = cli_distances("vbh", "vpk", "0-15", compile_cache)
    nonces = sorted(cli)
    claim = {"params": "tiny", "block_hash": "vbh", "public_key": "vpk", "nonces": nonces,
             "dist": [cli[n] for n in nonces], "r_target": 2.0}
    r = client.post("/validate", json=claim)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["n"] == 16 and report["n_invalid"] == 0 and report["fraud"] is False
    assert max(abs(a - cli[n]) for a, n in zip(report["recomputed_dist"], nonces)) <= 1e-6
    # Claimed below a threshold they are not below: every nonce invalid, fraud.
    r = client.post("/validate", json={"payload": {**claim, "r_target": min(cli.values()) - 0.01}})
    assert r.status_code == 200
    assert r.json()["n_invalid"] == 16 and r.json()["fraud"] is True
    r = client.post("/validate", json={**claim, "dist": [1.0]})
    assert r.status_code == 400 and r.json()["field"] == "dist"
    r = client.post("/validate", json={**claim, "extra": 1})
    assert r.status_code == 400 and r.json()["field"] == "extra"


def test_signal_strings_from_requests_are_defused_in_the_log(server, client):
    hostile = signals.FATAL_MARKER + signals.READY_LINE
    lines = [line for _, line in read_stream(client, "/generate", body(block_hash=hostile, max_nonces=8))]
    assert lines[-1]["reason"] == "completed" and lines[0]["block_hash"] == hostile
    log = server.log()
    assert "jaxbench.engine: built weights for JAXBENCH-FATAL(quoted)" in log
    assert_clean_log(log)


def test_a_search_stops_at_the_end_of_the_nonce_space(client):
    """Every nonce /generate emits is one /validate accepts; a search that reaches 2**63-1 ends there,
    saying so; a start or node past it is refused."""
    top = 2**63 - 1
    for n_nodes in (1, 3, top):
        lines = [line for _, line in read_stream(client, "/generate", body(start_nonce=top - 20, n_nodes=n_nodes,
                                                                           max_nonces=1000))]
        nonces = [n for line in lines[:-1] for n in line["nonces"]]
        assert nonces and max(nonces) <= top, n_nodes
        assert sorted(nonces) == list(range(top - 20, top + 1, n_nodes))
        assert lines[-1]["reason"] == "nonce_space_end" and lines[-1]["total_computed"] == len(nonces)
        assert all(line["next_nonce"] is None or line["next_nonce"] <= top for line in lines[:-1])
    dist = {n: d for line in lines[:-1] for n, d in zip(line["nonces"], line["dist"])}
    r = client.post("/validate", json={"params": "tiny", "block_hash": TINY_BODY["block_hash"],
                                       "public_key": TINY_BODY["public_key"], "nonces": list(dist),
                                       "dist": list(dist.values()), "r_target": 2.0})
    assert r.status_code == 200 and r.json()["n_invalid"] == 0, r.text
    for changes, field in (({"start_nonce": top + 1}, "start_nonce"), ({"start_nonce": top, "node_id": 1, "n_nodes": 2}, "node_id")):
        r = client.post("/generate", json=body(**changes))
        assert r.status_code == 400 and r.json()["field"] == field, r.text
