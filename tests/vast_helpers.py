"""Vast.ai Serverless on 127.0.0.1 for the tests: a fake of Vast's side (the autoscaler and the
console's endpoint list) and worker stacks of the real model server (start_server.sh) and the real
vastai PyWorker (`python -m worker`), as Vast runs them on a worker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from aiohttp import web
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15
from conftest import ROOT
from service_helpers import free_port, model_server_env

ENDPOINT_NAME = "jaxbench-test"
ENDPOINT_ID = 4242
ENDPOINT_API_KEY = "endpoint-api-key"  # the endpoint's own key, which /route/ takes
ACCOUNT_API_KEY = "account-api-key"  # the user's key, which the console's endpoint list takes


class FakeVast:
    """Vast's side of Serverless, as the vastai SDK uses it:

    * for the PyWorkers (the autoscaler): GET /pubkey/, POST /worker_status/ and /delete_requests/;
    * for clients: GET /api/v0/endptjobs/ (the console's list of the account's endpoints),
      GET /api/v0/instances/<id>/ (an instance's record: `instances[id]`, its price `dph_total`
      among the fields) and POST /route/, which answers a worker's signed address, or no `url`
      while none is ready.

    /route/ sends a request to the loaded worker with the fewest open requests (routed to it and not
    yet reported done), ties broken at random (`seed`); `unready_polls` first answers without a url
    that many times per request, as the real one does while workers load. Workers are the PyWorkers
    that reported themselves loaded (and accept connections), and the in-process fakes of
    tests/fleet.py, registered with `add_worker` and dropped with `remove_worker` (when the
    autoscaler notices they are gone). A fake reports each request when it receives it and when it
    ends; a request routed to one that never receives it stops counting after the route's
    `replay_timeout`.
    """

    def __init__(self, unready_polls: int = 0, seed: int = 0, instances: dict[int, dict] | None = None):
        self.key = RSA.generate(2048)
        self.unready_polls = unready_polls
        self.instances = instances or {}
        self.reports: dict[str, list[dict]] = {"/worker_status/": [], "/delete_requests/": []}
        self.routes: list[dict] = []  # every /route/ call: its body, query and headers
        self.routed: list[tuple[int, str]] = []  # (request_idx, worker url) of each answer with a url
        self.fakes: set[str] = set()  # registered in-process workers that are routable
        self._open: dict[str, set[int]] = {}  # worker url → request_idx routed to it and not done
        self._unreceived: dict[int, float] = {}  # request_idx routed to a fake, not yet received → deadline
        self._signatures: dict[str, str] = {}
        self._rng = random.Random(seed)
        self._polls: dict[int, int] = {}
        self._request_idx = itertools.count(1)
        self.lock = threading.Lock()
        # An asyncio server in a thread of its own: hundreds of clients may call at once (a thread
        # per connection would make the first wave of a large fleet wait seconds for its routes).
        # The routing itself runs in the loop's thread pool: it may probe a PyWorker's port.
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/pubkey/", self._serve_pubkey)
        app.router.add_get("/api/v0/endptjobs/", self._serve_endpoints)
        app.router.add_get(r"/api/v0/instances/{id:\d+}/", self._serve_instance)
        app.router.add_post("/{path:.*}", self._serve_post)
        self._runner = web.AppRunner(app, access_log=None)
        threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-vast").start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.url = f"http://127.0.0.1:{port}"

    async def _start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _serve_pubkey(self, request: web.Request) -> web.Response:
        return web.Response(body=self.key.publickey().export_key(), content_type="application/json")

    async def _serve_instance(self, request: web.Request) -> web.Response:
        status, body = self._instance(request.headers, int(request.match_info["id"]))
        return web.json_response(body, status=status)

    async def _serve_endpoints(self, request: web.Request) -> web.Response:
        status, body = self._endpoints(request.headers)
        return web.json_response(body, status=status)

    async def _serve_post(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = json.loads(await request.read() or b"null")
        if path in self.reports:
            with self.lock:
                self.reports[path].append(body)
            if path == "/delete_requests/":
                for r in body.get("requests", []):
                    self.request_done(None, r["request_idx"])
            return web.json_response({})
        if path == "/route/":
            status, answer = await self._loop.run_in_executor(None, self._route, request.headers, body,
                                                              dict(request.query))
            return web.json_response(answer, status=status)
        return web.Response(status=404)

    # The console ------------------------------------------------------------------------------------

    def _endpoints(self, headers) -> tuple[int, dict]:
        if headers.get("Authorization") != f"Bearer {ACCOUNT_API_KEY}":
            return 401, {"error": "bad api key"}
        return 200, {"results": [{"id": ENDPOINT_ID, "endpoint_name": ENDPOINT_NAME, "api_key": ENDPOINT_API_KEY,
                                  "user_id": 1, "created_at": time.time(), "endpoint_state": "active"}]}

    def _instance(self, headers, instance_id: int) -> tuple[int, dict]:
        """The console's record of one of the account's instances (the fields the SDK reads, and
        the test's); null for one it does not have."""
        if headers.get("Authorization") != f"Bearer {ACCOUNT_API_KEY}":
            return 401, {"error": "bad api key"}
        record = self.instances.get(instance_id)
        if record is None:
            return 200, {"instances": None}
        return 200, {"instances": {"id": instance_id, "start_date": time.time() - 60, "extra_env": [], **record}}

    # The autoscaler ---------------------------------------------------------------------------------

    def _route(self, headers, body: dict, query: dict | None = None) -> tuple[int, dict]:
        with self.lock:
            self.routes.append({"body": body, "authorization": headers.get("Authorization"), "query": query or {},
                                "content_type": headers.get("Content-Type"), "user_agent": headers.get("User-Agent")})
        if (headers.get("Authorization") != f"Bearer {ENDPOINT_API_KEY}" or body.get("api_key") != ENDPOINT_API_KEY
                or body.get("endpoint") != ENDPOINT_NAME):
            return 401, {"error": "unknown endpoint or key"}
        with self.lock:
            idx = body.get("request_idx") or next(self._request_idx)
            polls = self._polls[idx] = self._polls.get(idx, 0) + 1
        worker = self._pick_worker(idx, body.get("replay_timeout") or 60.0) if polls > self.unready_polls else None
        if worker is None:
            return 200, {"request_idx": idx}
        return 200, {"url": worker, "signature": self.sign(worker), "reqnum": idx, "request_idx": idx,
                     "cost": body.get("cost"), "endpoint": ENDPOINT_NAME}

    def loaded_workers(self) -> list[str]:
        """The PyWorkers that reported themselves loaded (fakes not included)."""
        with self.lock:
            return sorted({s["url"] for s in self.reports["/worker_status/"] if s["loadtime"] > 0})

    def _pick_worker(self, request_idx: int, replay_timeout: float = 60.0) -> str | None:
        """The loaded worker with the fewest open requests (ties at random), recorded as this one's."""
        reported = [url for url in self.loaded_workers() if _reachable(url)]
        now = time.monotonic()
        with self.lock:  # choosing and recording at once: two parallel requests go to two workers
            for idx, deadline in list(self._unreceived.items()):
                if deadline < now:
                    del self._unreceived[idx]
                    for requests in self._open.values():
                        requests.discard(idx)
            candidates = [*reported, *sorted(self.fakes)]
            if not candidates:
                return None
            fewest = min(len(self._open.get(url, ())) for url in candidates)
            worker = self._rng.choice([url for url in candidates if len(self._open.get(url, ())) == fewest])
            self._open.setdefault(worker, set()).add(request_idx)
            if worker in self.fakes:
                self._unreceived[request_idx] = now + replay_timeout
            self.routed.append((request_idx, worker))
            return worker

    # The in-process fakes (tests/fleet.py) --------------------------------------------------------

    def add_worker(self, url: str) -> None:
        with self.lock:
            self.fakes.add(url)

    def remove_worker(self, url: str) -> None:
        with self.lock:
            self.fakes.discard(url)

    def request_received(self, url: str, request_idx: int) -> None:
        with self.lock:
            self._unreceived.pop(request_idx, None)

    def request_done(self, url: str | None, request_idx: int) -> None:
        with self.lock:
            self._unreceived.pop(request_idx, None)
            for requests in ([self._open.get(url, set())] if url else self._open.values()):
                requests.discard(request_idx)

    def statuses(self, url: str | None = None) -> list[dict]:
        with self.lock:
            return [s for s in self.reports["/worker_status/"] if url is None or s["url"] == url]

    def finished(self, request_idx: int) -> str | None:
        """The status the PyWorker reported for a request once it ended ("Success", "Cancelled", …)."""
        with self.lock:
            done = [r for report in self.reports["/delete_requests/"] for r in report["requests"]]
        return next((r["status"] for r in done if r["request_idx"] == request_idx), None)

    def sign(self, url: str) -> str:
        """What the autoscaler signs for a worker's request: the worker's URL (the same signature
        every time: PKCS#1 v1.5 is deterministic)."""
        if url not in self._signatures:
            message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
            self._signatures[url] = base64.b64encode(pkcs1_15.new(self.key).sign(SHA256.new(message))).decode()
        return self._signatures[url]

    def auth_data(self, url: str, request_idx: int, signature: str | None = None) -> dict:
        return {"cost": "1", "endpoint": ENDPOINT_NAME, "reqnum": request_idx, "request_idx": request_idx,
                "url": url, "signature": signature or self.sign(url)}

    def nudge(self, worker_url: str) -> None:
        """A signed request through the PyWorker: the SDK sends its next status report at once.

        Otherwise it sends one only every 10 s, unless a request changed something: a new error, or
        the worker turning loaded, waits for that.
        """
        body = {"auth_data": self.auth_data(worker_url, next(self._request_idx) + 10**6), "payload": {}}
        try:
            httpx.post(f"{worker_url}/health", json=body, timeout=5)
        except httpx.HTTPError:
            pass

    def wait_reported(self, worker_url: str, predicate, timeout: float, what: str) -> dict:
        """The first status report of the worker that satisfies `predicate`, nudging it meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            status = next((s for s in self.statuses(worker_url) if predicate(s)), None)
            if status is not None:
                return status
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            self.nudge(worker_url)
            time.sleep(0.5)

    def wait_loaded(self, worker_url: str, timeout: float) -> dict:
        return self.wait_reported(worker_url, lambda s: s["loadtime"] > 0, timeout, f"{worker_url} to load")

    def reports_cause(self, worker_url: str, cause: str, timeout: float = 8.0) -> bool:
        """Whether the PyWorker reports `cause` as its error within `timeout`; the next failed health
        check (every 10 s) would replace it."""
        try:
            self.wait_reported(worker_url, lambda s: s["error_msg"] == cause, timeout, cause)
            return True
        except AssertionError:
            return False

    def close(self):
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    return listening(parts.port, parts.hostname)


def stop(proc: subprocess.Popen, timeout: float = 15):
    """SIGTERM, then SIGKILL to the process's session (each stack process runs in its own)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def pyworker_env(vast: FakeVast, worker_port: int, container_id: int) -> dict:
    """What Vast and its bootstrap give the PyWorker, with reports going to the fake."""
    return {
        "CONTAINER_ID": str(container_id),
        "REPORT_ADDR": vast.url,
        "WORKER_PORT": str(worker_port),
        "WORKER_HTTP_PORT": str(free_port()),
        "PUBLIC_IPADDR": "127.0.0.1",
        f"VAST_TCP_PORT_{worker_port}": str(worker_port),
        "MASTER_TOKEN": "test-master-token",
        "USE_SSL": "false",
    }


def model_server_pid(log: Path) -> int:
    """The pid of `python -m service` (start_server.sh's child), from its start line in the log."""
    return int(re.search(r"\(pid (\d+),", log.read_text()).group(1))


def kill_after_a_health_check(log: Path, pid: int, timeout: float = 30):
    """SIGKILL `pid` just after the PyWorker's periodic GET /health has reached the model server (its
    access log, MODEL_ACCESS_LOG=1, shows it): the next one, which would replace the error that the
    PyWorker reports, is then 10 s away."""
    def health_checks() -> int:
        return log.read_text().count('"GET /health ')

    seen = health_checks()
    deadline = time.monotonic() + timeout
    while health_checks() == seen:
        assert time.monotonic() < deadline, "no health check from the PyWorker"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


class WorkerStack:
    """One Vast worker: start_server.sh (the model server) and the PyWorker, each in its own session,
    outputs in `tmp`; the PyWorker runs in a scratch working directory (for .has_benchmark)."""

    def __init__(self, tmp: Path, vast: FakeVast, compile_cache: Path, container_id: int = 7, env: dict | None = None):
        self.tmp = tmp
        self.vast = vast
        self.model_port, self.worker_port = free_port(), free_port()
        self.model_url = f"http://127.0.0.1:{self.model_port}"
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        self.log = tmp / "model" / "server.log"
        self.scratch = tmp / "pyworker"
        self.scratch.mkdir()
        self.requests_sent = 0
        server_env = model_server_env(self.log, self.model_port, compile_cache, env)
        with (tmp / "server.out").open("wb") as out:
            self.server = subprocess.Popen([str(ROOT / "start_server.sh")], env=server_env, start_new_session=True,
                                           stdout=out, stderr=subprocess.STDOUT)
        with (tmp / "pyworker.out").open("wb") as out:
            self.worker = subprocess.Popen([sys.executable, "-m", "worker"], cwd=self.scratch,
                                           env={**server_env, **pyworker_env(vast, self.worker_port, container_id)},
                                           start_new_session=True, stdout=out, stderr=subprocess.STDOUT)

    def request(self, payload: dict, signature: str | None = None) -> tuple[int, dict]:
        """A client's body for the PyWorker, signed by the autoscaler unless a signature is given."""
        self.requests_sent += 1
        n = self.requests_sent
        return n, {"auth_data": self.vast.auth_data(self.worker_url, n, signature), "payload": payload}

    def model_health(self) -> dict:
        return httpx.get(f"{self.model_url}/health", timeout=5).json()

    def loaded_status(self) -> dict | None:
        return next((s for s in self.vast.statuses(self.worker_url) if s["loadtime"] > 0), None)

    def wait_loaded(self, timeout: float) -> dict:
        return self.vast.wait_loaded(self.worker_url, timeout)

    def model_server_pid(self) -> int:
        return model_server_pid(self.log)

    def kill(self):
        """The machine goes away: every process of the stack dies at once."""
        for proc in (self.worker, self.server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def close(self):
        for proc in (self.worker, self.server):
            stop(proc)

    def outputs(self) -> str:
        return "\n".join(f"--- {self.tmp / name}\n{(self.tmp / name).read_text(errors='replace')[-4000:]}"
                         for name in ("server.out", "pyworker.out"))


@contextlib.contextmanager
def running_workers(vast: FakeVast, n: int, tmp_path_factory, compile_cache: Path, env: dict, timeout: float,
                    name: str = "worker"):
    """`n` WorkerStacks behind `vast`, each loaded within `timeout`; their outputs printed if one fails
    the test; every stack and `vast` closed at the end."""
    stacks = [WorkerStack(tmp_path_factory.mktemp(f"{name}{i}"), vast, compile_cache, container_id=i + 1, env=env)
              for i in range(n)]
    try:
        for stack in stacks:
            stack.wait_loaded(timeout)
        yield stacks
    except AssertionError:
        for stack in stacks:
            print(stack.outputs())
        raise
    finally:
        for stack in stacks:
            stack.close()
        vast.close()

