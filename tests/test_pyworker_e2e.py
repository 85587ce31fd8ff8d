"""The PyWorker (pyworker/worker.py): its configuration, its workload units, and end to end the real
vastai PyWorker process in front of the real model server (CPU, `tiny` params, started by
start_server.sh), reporting to a fake autoscaler, all on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15
from service_helpers import free_port, wait_until

from service.signals import FATAL_MARKER, READY_LINE

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_NONCES = 2000  # about half a second per benchmark request on one CPU core
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
    assert handlers["/benchmark"].response_generator is None  # one JSON answer: the SDK's default relay

    settings = Settings()
    assert (config.model_server_url, config.model_server_port) == ("http://127.0.0.1", settings.port)
    assert config.model_log_file == settings.log_path
    assert config.log_action_config.on_load == [READY_LINE]
    assert config.log_action_config.on_error == [FATAL_MARKER]


def test_benchmark_payload_is_a_valid_request(pyworker):
    from jaxbench.params import DEFAULT_R_TARGET
    from service import requests
    from service.config import Settings

    payload = pyworker.BENCHMARK_PAYLOAD
    request = requests.generate_request(payload, Settings())
    assert request.max_nonces == Settings().benchmark_nonces
    assert payload["r_target"] == DEFAULT_R_TARGET
    assert pyworker.job_workload(payload) == request.max_nonces


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


class FakeAutoscaler:
    """Serves GET /pubkey/ and records POST /worker_status/ and /delete_requests/."""

    def __init__(self):
        self.key = RSA.generate(2048)
        self.reports: dict[str, list[dict]] = {"/worker_status/": [], "/delete_requests/": []}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/pubkey/":
                    return self._answer(404, b"")
                self._answer(200, fake.key.publickey().export_key())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path not in fake.reports:
                    return self._answer(404, b"")
                with fake.lock:
                    fake.reports[self.path].append(body)
                self._answer(200, b"{}")

            def _answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def statuses(self) -> list[dict]:
        with self.lock:
            return list(self.reports["/worker_status/"])

    def finished(self, request_idx: int) -> str | None:
        """The status the PyWorker reported for a request once it ended ("Success", "Cancelled", …)."""
        with self.lock:
            done = [r for report in self.reports["/delete_requests/"] for r in report["requests"]]
        return next((r["status"] for r in done if r["request_idx"] == request_idx), None)

    def sign(self, url: str) -> str:
        message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
        return base64.b64encode(pkcs1_15.new(self.key).sign(SHA256.new(message))).decode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def stop(proc: subprocess.Popen, timeout: float = 15):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the script's children go too
            proc.wait(timeout)


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.model_port, self.worker_port = free_port(), free_port()
        self.model_url = f"http://127.0.0.1:{self.model_port}"
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        self.log = tmp / "model" / "server.log"
        self.scratch = tmp / "pyworker"  # the PyWorker's working directory, for .has_benchmark
        self.scratch.mkdir()
        self.autoscaler = FakeAutoscaler()
        self.requests_sent = 0
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "MODEL_SERVER_HOST": "127.0.0.1",
            "MODEL_SERVER_PORT": str(self.model_port),
            "MODEL_LOG": str(self.log),
            "MODEL_BENCHMARK_NONCES": str(BENCHMARK_NONCES),
            "JAXBENCH_BENCHMARK_PARAMS": "tiny",
            "JAXBENCH_CACHE_DIR": str(tmp / "xla-cache"),
        }
        with (tmp / "server.out").open("wb") as out:
            self.server = subprocess.Popen([str(ROOT / "start_server.sh")], env=env, start_new_session=True,
                                           stdout=out, stderr=subprocess.STDOUT)
        worker_env = {
            **env,
            "CONTAINER_ID": "7",
            "REPORT_ADDR": self.autoscaler.url,
            "WORKER_PORT": str(self.worker_port),
            "WORKER_HTTP_PORT": str(free_port()),
            "PUBLIC_IPADDR": "127.0.0.1",
            f"VAST_TCP_PORT_{self.worker_port}": str(self.worker_port),
            "MASTER_TOKEN": "test-master-token",
            "USE_SSL": "false",
        }
        with (tmp / "pyworker.out").open("wb") as out:
            self.worker = subprocess.Popen([sys.executable, "-m", "worker"], cwd=self.scratch, env=worker_env,
                                           start_new_session=True, stdout=out, stderr=subprocess.STDOUT)

    def request(self, payload: dict, signature: str | None = None) -> tuple[int, dict]:
        """A client's body for the PyWorker, signed by the autoscaler unless a signature is given."""
        self.requests_sent += 1
        n = self.requests_sent
        auth = {"cost": "1", "endpoint": "jaxbench-test", "reqnum": n, "request_idx": n, "url": self.worker_url,
                "signature": signature or self.autoscaler.sign(self.worker_url)}
        return n, {"auth_data": auth, "payload": payload}

    def model_health(self) -> dict:
        return httpx.get(f"{self.model_url}/health", timeout=5).json()

    def loaded_status(self) -> dict | None:
        for status in self.autoscaler.statuses():
            if status["loadtime"] > 0:
                return status
        return None

    def close(self):
        for proc in (self.worker, self.server):
            stop(proc)
        self.autoscaler.close()

    def outputs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.tmp / name).read_text(errors='replace')[-4000:]}"
                         for name in ("server.out", "pyworker.out"))


def search(duration_s: float) -> dict:
    """A /generate payload whose every device batch yields a result line (all distances are below 2)."""
    return {"block_hash": "e2e-block", "block_height": 1, "public_key": "e2e-key", "r_target": 2.0,
            "batch_size": 1, "start_nonce": 0, "params": "tiny", "duration_s": duration_s}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("e2e"))
    try:
        wait_until(stack.loaded_status, START_TIMEOUT_S, interval=0.5, what="the PyWorker to report the model loaded")
        yield stack
    except AssertionError:
        print(stack.outputs())
        raise
    finally:
        stack.close()


def test_ready_line_starts_the_benchmark_and_its_throughput_is_real(stack):
    status = stack.loaded_status()
    assert status["error_msg"] == ""
    assert status["id"] == 7 and status["url"] == stack.worker_url
    assert stack.log.read_text().count(READY_LINE) == 1
    assert float((stack.scratch / ".has_benchmark").read_text()) == pytest.approx(status["max_perf"])

    # The PyWorker's benchmark request straight to the model server, timed here: the best of three.
    from pyworker.worker import BENCHMARK_PAYLOAD

    payload = {**BENCHMARK_PAYLOAD, "params": "tiny", "max_nonces": BENCHMARK_NONCES}
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        answer = httpx.post(f"{stack.model_url}/benchmark", json=payload, timeout=60).json()
        rates.append(answer["workload"] / (time.perf_counter() - t0))
        assert answer["workload"] == BENCHMARK_NONCES
    measured = max(rates)
    assert measured / 3 < status["max_perf"] < measured * 3, (status["max_perf"], rates)


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
    wait_until(lambda: stack.autoscaler.finished(n) == "Success", 15, what="the request reported done")


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
    wait_until(lambda: stack.autoscaler.finished(n) == "Cancelled", 15, what="the request reported cancelled")


def test_only_requests_signed_by_the_autoscaler_pass(stack):
    _, signed = stack.request({})
    response = httpx.post(f"{stack.worker_url}/health", json=signed, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "healthy"

    _, forged = stack.request({}, signature=stack.autoscaler.sign("http://somewhere.else:1"))
    assert httpx.post(f"{stack.worker_url}/health", json=forged, timeout=10).status_code == 401
    _, garbage = stack.request({}, signature=base64.b64encode(b"not a signature").decode())
    assert httpx.post(f"{stack.worker_url}/health", json=garbage, timeout=10).status_code == 401


def test_model_server_crash_is_reported_as_an_error(stack):
    """Runs last: kills the model server; start_server.sh logs the fatal marker for the PyWorker."""
    pid = int(re.search(r"\(pid (\d+),", stack.log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any(s["error_msg"] == FATAL_MARKER for s in stack.autoscaler.statuses()), 30,
               what="the PyWorker to report the fatal marker")
    assert stack.server.wait(10) != 0
