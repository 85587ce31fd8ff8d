"""The PyWorker (pyworker/worker.py): its configuration, its workload units, and end to end the real
vastai PyWorker process in front of the real model server (CPU, `tiny` params, started by
start_server.sh), reporting to a fake autoscaler, all on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import FakeHTTPServer, host_devices_env, wait_until
from vast_helpers import FakeVast, WorkerStack, kill_after_a_health_check

from service.signals import FATAL_CAUSES, FATAL_MARKER, READY_LINE, SERVER_EXITED

DEVICES = 2
BATCH = 64
BENCHMARK_STEPS = 4
WARMUP_NONCES = 200  # the SDK's warm-up request: compiles the step (one step and a partial one)
START_TIMEOUT_S = 180


# Configuration and workload units ------------------------------------------------------------------


@pytest.fixture
def pyworker(monkeypatch, tmp_path):
    """pyworker.worker imported in a scratch working directory (where it looks for .has_benchmark)."""
    import pyworker.worker as module

    monkeypatch.chdir(tmp_path)
    return module


def test_routes_benchmark_and_log_signals(pyworker):
    from service.config import Settings

    config = pyworker.worker_config
    handlers = {h.route: h for h in config.handlers}
    assert set(handlers) == {"/generate", "/warmup", "/pooled", "/health", "/benchmark"}
    assert [route for route, h in handlers.items() if h.benchmark_config] == ["/benchmark"]
    for route in ("/generate", "/warmup", "/pooled"):
        assert not handlers[route].allow_parallel_requests
        assert handlers[route].response_generator is pyworker.relay_stream
    assert handlers["/health"].allow_parallel_requests
    # One JSON answer, with the worker's instance id added (the SDK's own benchmark does not read it).
    assert handlers["/benchmark"].response_generator is pyworker.benchmark_answer

    settings = Settings()
    assert (config.model_server_url, config.model_server_port) == ("http://127.0.0.1", settings.port)
    assert config.model_log_file == settings.log_path
    assert config.log_action_config.on_load == [READY_LINE]
    # The SDK reports the first pattern that matches a line: each specific cause before the bare marker.
    assert config.log_action_config.on_error == [*FATAL_CAUSES, FATAL_MARKER]
    assert all(cause.startswith(FATAL_MARKER + " ") for cause in FATAL_CAUSES)
    assert len(set(FATAL_CAUSES)) == len(FATAL_CAUSES)


def test_benchmark_payload_is_a_valid_request(pyworker):
    from jaxbench.params import DEFAULT_R_TARGET
    from service import requests
    from service.config import Settings

    payload = pyworker.BENCHMARK_PAYLOAD
    request = requests.generate_request(payload, Settings())
    assert request.max_nonces == Settings().benchmark_nonces
    assert request.dtype == pyworker.BENCHMARK_DTYPE
    assert payload["r_target"] == DEFAULT_R_TARGET
    assert pyworker.job_workload(payload) == request.max_nonces


def test_benchmark_is_whole_steps_of_the_model_servers_devices_and_batch(pyworker, monkeypatch):
    import dataclasses

    tiny = {"dim": 64, "n_layers": 2}
    health = {"compiled": []}
    with FakeHTTPServer(lambda method, path, query, body: (200, health) if path == "/health" else (404, {})) as fake:
        port = int(fake.url.rsplit(":", 1)[1])
        monkeypatch.setattr(pyworker, "MODEL_SETTINGS", dataclasses.replace(pyworker.MODEL_SETTINGS, port=port))
        warmup = pyworker.benchmark_request()  # nothing compiled yet: the warm-up request, which compiles
        assert warmup["max_nonces"] == pyworker.MODEL_SETTINGS.benchmark_nonces

        health["compiled"] = [{"params": tiny, "dtype": "float16", "batch": 96, "devices": 8, "groups": 8},
                              {"params": tiny, "dtype": "float32", "batch": 500, "devices": 8, "groups": 8}]
        timed = pyworker.benchmark_request()
        assert timed["max_nonces"] == pyworker.BENCHMARK_STEPS * 96 * 8
        # Groups of two devices: a step is a batch per group, not per device.
        health["compiled"][0] |= {"groups": 4, "group_size": 2}
        assert pyworker.benchmark_request()["max_nonces"] == pyworker.BENCHMARK_STEPS * 96 * 4
        health["compiled"][0] |= {"groups": 8, "group_size": 1}
        assert pyworker.job_workload(timed) == timed["max_nonces"]  # the SDK counts what is computed
        assert {k: v for k, v in timed.items() if k != "max_nonces"} == \
            {k: v for k, v in pyworker.BENCHMARK_PAYLOAD.items() if k != "max_nonces"}

        # Parameters given as an object must match the compiled step's.
        monkeypatch.setitem(pyworker.BENCHMARK_PAYLOAD, "params", {"dim": 128})
        assert pyworker.benchmark_request()["max_nonces"] == pyworker.MODEL_SETTINGS.benchmark_nonces
        monkeypatch.setitem(pyworker.BENCHMARK_PAYLOAD, "params", {"dim": 64})
        assert pyworker.benchmark_request()["max_nonces"] == pyworker.BENCHMARK_STEPS * 96 * 8

    # The model server not answering: the fixed size.
    assert pyworker.benchmark_request()["max_nonces"] == pyworker.MODEL_SETTINGS.benchmark_nonces


def test_workload_is_nonces(pyworker):
    assert pyworker.measured_rate() is None
    assert pyworker.job_workload({"max_nonces": 5000}) == 5000
    assert pyworker.job_workload({"payload": {"max_nonces": 5000}}) == 5000
    assert pyworker.job_workload({}) == 0.0  # no rate measured yet, no bound given
    assert pyworker.pooled_workload({}) == 0.0

    Path(".has_benchmark").write_text("250.0")
    assert pyworker.measured_rate() == 250.0
    assert pyworker.job_workload({}) == 250.0 * 420  # MODEL_DURATION_S's default
    assert pyworker.job_workload({"duration_s": 10}) == 2500
    assert pyworker.job_workload({"duration_s": 10, "max_nonces": 1000}) == 1000
    assert pyworker.job_workload({"duration_s": 10, "max_nonces": 9000}) == 2500
    assert pyworker.job_workload({"duration_s": "10", "max_nonces": True}) == 250.0 * 420  # bad fields: ignored
    assert pyworker.pooled_workload({}) == 250.0 * 600  # MODEL_POOLED_SESSION_S's default
    assert pyworker.pooled_workload({"session_timeout_s": 60}) == 250.0 * 60
    assert pyworker.no_workload({"anything": 1}) == 0.0


# End to end -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, compile_cache):
    """One worker whose model server has two (CPU) devices, reporting to a fake autoscaler."""
    vast = FakeVast()
    stack = WorkerStack(tmp_path_factory.mktemp("e2e"), vast, compile_cache, env={
        "MODEL_BATCH": str(BATCH),
        "MODEL_ACCESS_LOG": "1",
        "MODEL_BENCHMARK_NONCES": str(WARMUP_NONCES),
        "JAXBENCH_BENCHMARK_STEPS": str(BENCHMARK_STEPS),
        **host_devices_env(DEVICES),
    })
    try:
        stack.wait_loaded(START_TIMEOUT_S)
        yield stack
    except AssertionError:
        print(stack.outputs())
        raise
    finally:
        stack.close()
        vast.close()


def search(duration_s: float) -> dict:
    """A /generate payload whose every device batch yields a result line (all distances are below 2)."""
    return {"block_hash": "e2e-block", "block_height": 1, "public_key": "e2e-key", "r_target": 2.0,
            "batch_size": 1, "start_nonce": 0, "params": "tiny", "duration_s": duration_s}


def test_ready_line_starts_the_benchmark_and_its_throughput_is_real(stack):
    status = stack.loaded_status()
    assert status["error_msg"] == ""
    assert status["id"] == 7 and status["url"] == stack.worker_url
    assert stack.log.read_text().count(READY_LINE) == 1
    assert float((stack.scratch / ".has_benchmark").read_text()) == pytest.approx(status["max_perf"])

    # The timed benchmark requests were whole steps of both devices at the server's batch.
    step = DEVICES * BATCH
    last = stack.model_health()["last_job"]
    assert last["kind"] == "benchmark" and last["max_nonces"] == BENCHMARK_STEPS * step
    assert last["steps_completed"] == BENCHMARK_STEPS and last["nonces_computed"] == BENCHMARK_STEPS * step

    # The same request straight to the model server, timed here: the best of three.
    from pyworker.worker import BENCHMARK_PAYLOAD

    payload = {**BENCHMARK_PAYLOAD, "params": "tiny", "max_nonces": BENCHMARK_STEPS * step}
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        answer = httpx.post(f"{stack.model_url}/benchmark", json=payload, timeout=60).json()
        rates.append(answer["workload"] / (time.perf_counter() - t0))
        assert answer["workload"] == BENCHMARK_STEPS * step
    measured = max(rates)
    assert measured / 3 < status["max_perf"] < measured * 3, (status["max_perf"], rates)


def test_a_clients_benchmark_carries_the_instance_id(stack):
    from pyworker.worker import BENCHMARK_PAYLOAD

    _, body = stack.request({**BENCHMARK_PAYLOAD, "params": "tiny", "max_nonces": 4 * DEVICES * BATCH})
    response = httpx.post(f"{stack.worker_url}/benchmark", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert answer["vast_instance_id"] == 7  # the stack's CONTAINER_ID
    assert answer["workload"] == 4 * DEVICES * BATCH and answer["window_nonces"] == 3 * DEVICES * BATCH
    # A refusal passes as the model server sent it, with the id too.
    _, bad = stack.request({**BENCHMARK_PAYLOAD, "params": "tiny", "sustained_seconds": 99})
    refused = httpx.post(f"{stack.worker_url}/benchmark", json=bad, timeout=60)
    assert refused.status_code == 400 and refused.json()["field"] == "sustained_seconds"


def test_generate_streams_line_by_line(stack):
    n, body = stack.request(search(3.0))
    t0 = time.monotonic()
    lines = []
    with httpx.stream("POST", f"{stack.worker_url}/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for text in response.iter_lines():
            lines.append((time.monotonic() - t0, json.loads(text)))
    results = [(t, line) for t, line in lines if "nonces" in line]
    end_time, summary = lines[-1]
    assert summary["status"] == "done" and summary["reason"] == "duration"
    assert summary["total_computed"] == sum(len(line["nonces"]) for _, line in results)
    # Lines arrive while the job runs, not all at its end.
    assert end_time - results[0][0] > 2.0
    assert len({round(t, 1) for t, _ in results}) > 10
    wait_until(lambda: stack.vast.finished(n) == "Success", 15, what="the request reported done")


def test_client_disconnect_stops_the_job(stack):
    n, body = stack.request(search(120.0))
    with httpx.stream("POST", f"{stack.worker_url}/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept open: closing the iterator would close the connection
        for _ in range(5):
            assert "nonces" in json.loads(next(lines))
        assert stack.model_health()["busy"]
    closed = time.monotonic()

    wait_until(lambda: not stack.model_health()["busy"], 15, what="the job to stop")
    assert time.monotonic() - closed < 15
    health = stack.model_health()
    assert health["last_job"]["stop_reason"] == "disconnected"
    time.sleep(1.0)
    assert stack.model_health()["steps_completed"] == health["steps_completed"]
    wait_until(lambda: stack.vast.finished(n) == "Cancelled", 15, what="the request reported cancelled")


def test_only_requests_signed_by_the_autoscaler_pass(stack):
    _, signed = stack.request({})
    response = httpx.post(f"{stack.worker_url}/health", json=signed, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "healthy"

    _, forged = stack.request({}, signature=stack.vast.sign("http://somewhere.else:1"))
    assert httpx.post(f"{stack.worker_url}/health", json=forged, timeout=10).status_code == 401
    _, garbage = stack.request({}, signature=base64.b64encode(b"not a signature").decode())
    assert httpx.post(f"{stack.worker_url}/health", json=garbage, timeout=10).status_code == 401


def test_model_server_crash_is_reported_as_an_error(stack):
    """Runs last: kills the model server; start_server.sh logs a fatal line, and the PyWorker reports
    its cause (the pattern that matched), not just the marker."""
    kill_after_a_health_check(stack.log, stack.model_server_pid())
    cause = f"{FATAL_MARKER} {SERVER_EXITED}"
    assert cause in FATAL_CAUSES
    assert stack.vast.reports_cause(stack.worker_url, cause)
    assert stack.server.wait(10) != 0
