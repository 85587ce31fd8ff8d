"""Helpers for the service tests: a live `python -m service` subprocess, NDJSON reading with
timestamps, the jaxbench CLI, and small real HTTP servers standing in for the warmup callback
and the orchestrator."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]
# The servers and CLI runs use JAX's CPU backend unless SERVICE_TEST_JAX_PLATFORMS says otherwise
# ("" = JAX's default, e.g. to run these tests on a GPU machine).
JAX_PLATFORMS = os.environ.get("SERVICE_TEST_JAX_PLATFORMS", "cpu")
PLATFORM_ENV = {"JAX_PLATFORMS": JAX_PLATFORMS} if JAX_PLATFORMS else {}
# The model server refuses to start without a GPU unless told where else to compute (MODEL_PLATFORM).
SERVER_PLATFORM = "cpu" if JAX_PLATFORMS == "cpu" else "any"
DRAWS = os.environ.get("SERVICE_TEST_DRAWS", "auto")  # where inputs are drawn (jaxbench.engine)
PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(REPO))

from service import signals  # noqa: E402

TINY_BODY = {
    "block_hash": "test-block-hash",
    "block_height": 7,
    "public_key": "test-public-key",
    "r_target": 2.0,  # every distance is below 2: every nonce is valid
    "batch_size": 100,
    "start_nonce": 0,
    "params": "tiny",
}

# Fast intervals for every test server; individual requests override some of them.
FAST_ENV = {
    "MODEL_BATCH": "8",
    "MODEL_WARMUP_POLL_S": "0.1",
    "MODEL_POOLED_POLL_S": "0.05",
    "MODEL_POOLED_WAIT_POLL_S": "0.05",
    "MODEL_POOLED_HEARTBEAT_S": "0.2",
    "MODEL_RETRY_BASE_S": "0.05",
    "MODEL_RETRY_MAX_S": "0.2",
    "MODEL_HTTP_TIMEOUT_S": "2",
    "MODEL_FINAL_FLUSH_S": "5",
    "MODEL_DRAIN_TIMEOUT_S": "15",
    "MODEL_BENCHMARK_NONCES": "32",
}


def assert_clean_log(log: str) -> None:
    """A model server's whole log after a run that went as meant: ready once, nothing fatal."""
    from service import signals

    assert log.count(signals.READY_LINE) == 1, log[-4000:]
    assert signals.FATAL_MARKER not in log, log[-4000:]


def host_devices_env(n: int) -> dict[str, str]:
    """The environment that gives a child process `n` JAX CPU devices."""
    return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()}


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (and bind to port 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_EPHEMERAL = _ephemeral_ports()
_PORTS_TO_HAND_OUT = (range(20000, _EPHEMERAL.start) if _EPHEMERAL.start > 21000
                      else range(max(_EPHEMERAL.stop, 1024), 65536))
_handed_out: set[int] = set()
_port_choice = random.Random()


def _wildcard_addresses() -> list[tuple[socket.AddressFamily, str]]:
    """The wildcard addresses of the families this machine can bind (the PyWorker binds '::')."""
    addresses = [(socket.AF_INET, "0.0.0.0")]
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
        addresses.append((socket.AF_INET6, "::"))
    except OSError:
        pass
    return addresses


_WILDCARDS = _wildcard_addresses()


def _bindable(port: int) -> bool:
    """Whether a server could listen on `port` on every address."""
    for family, address in _WILDCARDS:
        try:
            with socket.socket(family) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((address, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port for a server under test to listen on: free now, handed out once per session, and
    outside the ephemeral range, so that no outgoing connection of the suite takes it as its local
    port before the server binds it (a bind to port 0 would pick one inside that range)."""
    while True:
        port = _port_choice.choice(_PORTS_TO_HAND_OUT)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port


def model_server_env(log: Path, port: int, compile_cache: Path, extra: dict | None = None) -> dict:
    """The environment of a model server under test, `python -m service` or start_server.sh (whose
    python3 is this Python): this checkout, on 127.0.0.1:`port`, its log, the compile cache, and
    the tiny set for a PyWorker's benchmark."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": PYTHONPATH,
        **PLATFORM_ENV,
        "MODEL_SERVER_HOST": "127.0.0.1",
        "MODEL_SERVER_PORT": str(port),
        "MODEL_LOG": str(log),
        "JAXBENCH_CACHE_DIR": str(compile_cache),
        "JAXBENCH_BENCHMARK_PARAMS": "tiny",
        "MODEL_PLATFORM": SERVER_PLATFORM,
        **(extra or {}),
    }


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ServiceProcess:
    """`python -m service` on 127.0.0.1:<free port>, ready once READY_LINE is in its log."""

    def __init__(self, workdir: Path, compile_cache: Path, env: dict | None = None, max_open_files: int | None = None):
        self.max_open_files = max_open_files  # the server's hard limit on open files (RLIMIT_NOFILE)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.workdir / "model" / "server.log"  # the directory does not exist yet
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = model_server_env(self.log_path, self.port, compile_cache,
                                    {"LOG_LEVEL": "INFO", "MODEL_DRAWS": DRAWS, **FAST_ENV, **(env or {})})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "ServiceProcess":
        self.stdout = open(self.workdir / "stdout.txt", "wb")
        argv = [sys.executable, "-m", "service"]
        if self.max_open_files:  # set by the child itself: a preexec_fn would fork this JAX process
            argv = [sys.executable, "-c", "import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, "
                    f"({self.max_open_files}, {self.max_open_files})); runpy.run_module('service', run_name='__main__')"]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=self.stdout, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        mine = f"(pid {self.proc.pid},"  # the start line of this process: a stale log does not count
        while not (mine in self.log() and signals.READY_LINE in self.log()):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 15.0) -> dict:
        return wait_until(lambda: (lambda h: h if not h["busy"] else None)(self.health()), timeout,
                          interval=0.05, what="the server to be idle")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.stdout.close()
        return self.proc.returncode


def read_stream(client: httpx.Client, path: str, body, on_line: Callable[[dict], None] | None = None,
                timeout: float = 60.0) -> list[tuple[float, dict]]:
    """POST and read an NDJSON stream to its end: [(monotonic arrival time, line)]."""
    out = []
    deadline = time.monotonic() + timeout
    with client.stream("POST", path, json=body, timeout=httpx.Timeout(timeout)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for text in r.iter_lines():
            if not text:
                continue
            line = json.loads(text)
            out.append((time.monotonic(), line))
            if on_line is not None:
                on_line(line)
            if time.monotonic() > deadline:
                raise AssertionError(f"stream still running after {timeout} s")
    return out


def cli_distances(block_hash: str, public_key: str, nonces: str, compile_cache: Path, params: str = "tiny",
                  dtype: str = "float16", batch: int = 8) -> dict[int, float]:
    """Distances from `python -m jaxbench distances` (a subprocess, like a user would run it)."""
    out = subprocess.run(
        [sys.executable, "-m", "jaxbench", "distances", "--params", params, "--block-hash", block_hash,
         "--public-key", public_key, "--nonces", nonces, "--dtype", dtype, "--batch", str(batch), "--draws", DRAWS,
         "--cache-dir", str(compile_cache)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": PYTHONPATH, **PLATFORM_ENV},
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return dict(zip(data["nonces"], data["dist"]))


class Recorded:
    def __init__(self, method: str, path: str, query: dict, body):
        self.time = time.monotonic()
        self.method = method
        self.path = path
        self.query = query
        self.body = body

    def __repr__(self):
        return f"{self.method} {self.path} {self.query} {str(self.body)[:80]}"


class RawReply:
    """A handler's answer written by `write(request_handler)` itself: raw bytes, a trickle, …"""

    def __init__(self, write: Callable[[BaseHTTPRequestHandler], None]):
        self.write = write


class Peer:
    """A peer's handler for FakeHTTPServer, scripted by path suffix: an answer (status, body) or a
    RawReply, a function of the request body giving one, or 'hang' (block until `release`, or a
    minute). Any other path answers 200 {"status": "ok"}."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.release = threading.Event()

    def __call__(self, method, path, query, body):
        for suffix, answer in self.routes.items():
            if path.endswith(suffix):
                if answer == "hang":
                    self.release.wait(60)
                    return 503, {"error": "released"}
                return answer(body) if callable(answer) else answer
        return 200, {"status": "ok"}


class FakeHTTPServer:
    """A real HTTP server on 127.0.0.1 in a thread. `handler(method, path, query, body)` returns
    (status, json_body) or a RawReply; every request is recorded in `requests`. `vanish()` makes it
    disappear: no new connections, and open ones are closed without an answer."""

    def __init__(self, handler: Callable[[str, str, dict, object], object]):
        self.handler = handler
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.gone = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if outer.gone.is_set():
                    self.close_connection = True
                    return
                with outer.lock:
                    outer.requests.append(Recorded(self.command, parts.path, query, body))
                try:
                    answer = outer.handler(self.command, parts.path, query, body)
                except Exception as e:  # noqa: BLE001
                    answer = 500, {"error": repr(e)}
                try:
                    if outer.gone.is_set():
                        self.close_connection = True
                    elif isinstance(answer, RawReply):
                        answer.write(self)
                    else:
                        status, reply = answer
                        data = json.dumps(reply).encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the caller gave up (cancelled call)
                    self.close_connection = True

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.vanish()

    def vanish(self):
        if not self.gone.is_set():
            self.gone.set()
            self.server.shutdown()
            self.server.server_close()

    def calls(self, path_suffix: str, method: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.endswith(path_suffix) and (method is None or r.method == method)]
