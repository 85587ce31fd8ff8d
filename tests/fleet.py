"""A fleet of fake Vast workers in one process, for tests/test_fleet.py and scripts/fleet_bench.py.

Each worker listens on its own 127.0.0.1 port and speaks what a client sees of a real one: the
PyWorker's side (the body `{"auth_data", "payload"}`, auth_data checked against FakeVast's signature
(401), one request at a time in a FIFO queue, 429 when the queue would keep a request waiting longer
than `max_queue_s`, a client that leaves stops its job, each request reported to FakeVast when it is
received and when it ends) and the model server's `/generate` (the body checked by
service.requests, 400 naming the field; the lines made by jaxbench.results.SearchTally, steps laid
out by jaxbench.nonces, a summary line). Instead of a model a worker computes `fake_distances`, a
hash of the seeds and the nonce, `groups × batch` nonces every `step_s` seconds, paced by the clock.
So the right output of any search is known (`truth`) and the fleet's speed is set exactly.

`Fault` makes a worker misbehave: die, hang, cut a line, replay a step, send nonces of another part,
restart from its first request's nonces, and so on (`FAULTS`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import threading
import time

import numpy as np
from aiohttp import web
from Crypto.Hash import SHA256
from Crypto.Signature import pkcs1_15

from jaxbench.job import GroupResult, StepResult
from jaxbench.nonces import device_major
from jaxbench.results import SearchTally
from service.config import Settings
from service.requests import generate_request, parse_json

AUTH_KEYS = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")
LOW, SPREAD = 1.30, 0.20  # fake distances are uniform in [LOW, LOW + SPREAD)

FAULTS = {
    "die": "the machine goes away at step N: its connections are reset and its port closes",
    "hang": "from step N it sends nothing more, its connection open",
    "close": "at step N it ends its stream cleanly, without a summary",
    "cut": "at step N (or the first after it with a line) a line is cut short; the rest of the stream goes on",
    "replay": "after step N (or the first after it with a line) it sends the step's lines again",
    "short_dist": "at step N (or the first after it with a line) a line's dist is one shorter than its nonces",
    "foreign": "at step N (or the first after it with a line) a line carries nonces of another part",
    "restart": "every request after its first computes from its first request's start_nonce",
    "bad_dist": "at step N (or the first after it with a line) a line claims a nonce whose distance is above "
                "r_target",
    "wrong_total": "the summary of the request holding step N miscounts total_valid",
    "error": "at step N its job fails: an error line, then the summary (reason error)",
    "fail": "answers 500 to every request",
    "refuse": "answers 400 to every request, naming a field",
    "busy": "answers 429 to every request",
    "slow_start": "its first request computes nothing for `seconds`",
    "late": "every request waits `seconds` in its queue before the stream starts",
}


LINE_FAULTS = ("cut", "replay", "short_dist", "foreign", "bad_dist")


def fake_distances(block_hash: str, public_key: str, nonces) -> np.ndarray:
    """Deterministic distances in [LOW, LOW + SPREAD): splitmix64 of the nonce, seeded by the seeds."""
    seed = int.from_bytes(hashlib.sha256(f"{block_hash}/{public_key}".encode()).digest()[:8], "little")
    with np.errstate(over="ignore"):
        x = np.asarray(nonces, dtype=np.uint64) ^ np.uint64(seed)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return LOW + SPREAD * (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def r_target_for(valid_fraction: float) -> float:
    return LOW + SPREAD * valid_fraction


def truth(block_hash: str, public_key: str, start: int, count: int, r_target: float) -> dict[int, float]:
    """Every valid nonce of start … start + count − 1 and its distance, as a worker reports it."""
    nonces = np.arange(start, start + count, dtype=np.uint64)
    dist = fake_distances(block_hash, public_key, nonces)
    keep = np.flatnonzero(dist < r_target)
    return {int(nonces[i]): float(dist[i]) for i in keep}


@dataclasses.dataclass
class Fault:
    kind: str
    at_step: int = 5  # the worker's step (counted over all its requests, from 1) where it misbehaves, once
    seconds: float = 0.0

    def __post_init__(self):
        assert self.kind in FAULTS, self.kind


@dataclasses.dataclass
class WorkerSpec:
    groups: int = 1  # device groups
    batch: int = 64  # nonces per group per step
    step_s: float = 0.1
    start_s: float = 0.02  # a request's start (the job set up) before its first step
    load_s: float = 0.0  # the first request of a block hash builds the weights this long
    max_queue_s: float = 60.0
    fault: Fault | None = None


class FakeWorker:
    def __init__(self, fleet: "FakeFleet", index: int, spec: WorkerSpec):
        self.fleet = fleet
        self.index = index
        self.spec = spec
        self.url: str | None = None
        self.site: web.TCPSite | None = None
        self.alive = True
        self.steps = 0  # steps computed over all requests
        self.late_s = 0.0  # how late its steps ended, in all (the simulation's own lag)
        self.misbehaved = False  # its step fault happened
        self.requests = 0  # requests started (past the queue)
        self.queued_work = 0.0  # seconds of work queued or running
        self.loaded: set[tuple] = set()
        self.first_start: int | None = None
        self.first_request_at: float | None = None  # when its first request got past its queue
        self.transports: set = set()
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float:
        return self.spec.groups * self.spec.batch / self.spec.step_s

    # The PyWorker -------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.transports.add(request.transport)
        try:
            return await self._handle(request)
        except ConnectionResetError:  # the client left (aiohttp's ClientConnectionResetError too)
            return web.Response(status=499)
        finally:
            self.transports.discard(request.transport)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = self.spec.fault.kind if self.spec.fault else None
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=422)
        if not isinstance(body, dict) or not isinstance(body.get("auth_data"), dict) or "payload" not in body:
            return web.json_response({"auth_data": "field missing", "payload": "field missing"}, status=422)
        auth = body["auth_data"]
        if any(k not in auth for k in AUTH_KEYS):
            return web.json_response({"auth_data": {k: "missing parameter" for k in AUTH_KEYS if k not in auth}},
                                     status=422)
        if not self.fleet.signed(auth["url"], auth["signature"]) or auth["url"] != self.url:
            return web.Response(status=401)
        idx = auth["request_idx"]
        self.fleet.vast.request_received(self.url, idx)
        try:
            if kind == "fail":
                return web.json_response({"error": "internal error"}, status=500)
            if kind == "refuse":
                return web.json_response({"error": "block_hash: refused by this worker", "field": "block_hash"},
                                         status=400)
            if kind == "busy":
                return web.json_response({"error": "queue full"}, status=429)
            try:
                req = generate_request(parse_json(json.dumps(body["payload"])), Settings())
            except ValueError as e:  # FieldError
                return web.json_response({"error": str(e), "field": getattr(e, "field", None)}, status=400)
            work = self._seconds(req)
            if self.queued_work > self.spec.max_queue_s:
                return web.json_response({"error": "queue time exceeded"}, status=429)
            self.queued_work += work
            try:
                async with self._lock:
                    if kind == "late":
                        await asyncio.sleep(self.spec.fault.seconds)
                    return await self._generate(request, req)
            finally:
                self.queued_work -= work
        finally:
            self.fleet.vast.request_done(self.url, idx)

    def _seconds(self, req) -> float:
        n = req.max_nonces if req.max_nonces is not None else req.duration_s * self.rate
        return min(req.duration_s, n / self.rate)

    # The model server ---------------------------------------------------------------------------

    async def _generate(self, request: web.Request, req) -> web.StreamResponse:
        spec, fault = self.spec, self.spec.fault
        kind = fault.kind if fault else None
        self.requests += 1
        if self.first_request_at is None:
            self.first_request_at = time.monotonic()
        if kind == "restart":
            if self.first_start is None:
                self.first_start = req.start_nonce
            req = dataclasses.replace(req, start_nonce=self.first_start)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await response.prepare(request)
        job = req.search_job()
        groups, batch = spec.groups, spec.batch
        tally = SearchTally(job, groups, req.block_height)
        t0 = time.monotonic()
        delay = spec.start_s
        if (req.block_hash, req.public_key) not in self.loaded:
            delay += spec.load_s
            self.loaded.add((req.block_hash, req.public_key))
        if kind == "slow_start" and self.requests == 1:
            delay += fault.seconds
        began = t0 + delay
        await asyncio.sleep(max(0.0, began - time.monotonic()))
        reason, step, wrong_total = "completed", 0, False
        while True:
            if time.monotonic() - t0 >= req.duration_s:
                reason = "duration"
                break
            nonces = job.schedule.take(step * groups * batch, groups * batch)
            if not nonces:
                break
            step += 1
            self.steps += 1
            await asyncio.sleep(max(0.0, began + step * spec.step_s - time.monotonic()))
            self.late_s += time.monotonic() - (began + step * spec.step_s)  # > 0: the fleet's loop falls behind
            due = fault is not None and not self.misbehaved and self.steps >= fault.at_step
            if due and kind in ("die", "hang", "close", "error"):  # the step is lost: not counted
                self.misbehaved = True
                if kind == "die":
                    self.fleet.kill(self)
                    return response
                if kind == "hang":
                    await asyncio.Event().wait()
                if kind == "close":
                    await response.write_eof()
                    return response
                await self._write(response, {"error": "device failed", "error_type": "JaxRuntimeError"})
                reason = "error"
                break
            _, per_group = device_major(nonces, groups, batch)
            lines = tally.add(StepResult(step - 1, (step - 1) * groups * batch, batch, [
                GroupResult(g, ns, fake_distances(req.block_hash, req.public_key, ns)) for g, ns in enumerate(per_group)
            ], 0.0, 0.0, spec.step_s))
            here = due and (lines or kind not in LINE_FAULTS)  # a fault of the lines waits for a step with some
            self.misbehaved = self.misbehaved or here
            wrong_total = wrong_total or here and kind == "wrong_total"
            for i, line in enumerate(lines):
                text = json.dumps(self._spoil(line, req) if here and i == 0 else line)
                if here and i == 0 and kind == "cut":
                    text = text[: len(text) // 2]
                await response.write((text + "\n").encode())
            if here and kind == "replay":
                for line in lines:
                    await self._write(response, line)
        summary = tally.summary(reason)
        if wrong_total:
            summary["total_valid"] += 1
        await self._write(response, summary)
        await response.write_eof()
        return response

    def _spoil(self, line: dict, req) -> dict:
        kind = self.spec.fault.kind
        if kind == "short_dist":
            return {**line, "dist": line["dist"][:-1]}
        if kind == "foreign":  # the same positions in the next part of the search
            shift = req.max_nonces or 1_000_000
            return {**line, "nonces": [n + shift for n in line["nonces"]]}
        if kind == "bad_dist":
            return {**line, "dist": [line["dist"][0] + SPREAD, *line["dist"][1:]]}
        return line

    @staticmethod
    async def _write(response: web.StreamResponse, line: dict) -> None:
        await response.write((json.dumps(line) + "\n").encode())


class FakeFleet:
    """Fake workers on one event loop in a thread of their own, routed by `vast` (FakeVast)."""

    def __init__(self, vast, specs: list[WorkerSpec], vast_notice_s: float = 1.0):
        self.vast = vast
        self.vast_notice_s = vast_notice_s  # how long FakeVast goes on routing to a dead worker
        self.public_key = vast.key.publickey()
        self._signatures: dict[tuple[str, str], bool] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fake-fleet")
        self.thread.start()
        self.workers = [FakeWorker(self, i, spec) for i, spec in enumerate(specs)]
        self._call(self._start())
        # Each worker's signature, made and checked now rather than at its first route: the RSA
        # private-key operation is a few ms of this process's CPU, and Vast's autoscaler does not run
        # on the client's machine (a 500-worker fleet's first routes otherwise wait seconds on it).
        for worker in self.workers:
            self.signed(worker.url, vast.sign(worker.url))

    def _call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/generate", self._route)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        self._by_port: dict[int, FakeWorker] = {}
        for worker in self.workers:
            worker.site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=512)
            await worker.site.start()
            port = worker.site._server.sockets[0].getsockname()[1]
            self._by_port[port] = worker
            worker.url = f"http://127.0.0.1:{port}"
            self.vast.add_worker(worker.url)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        worker = self._by_port[request.transport.get_extra_info("sockname")[1]]
        if not worker.alive:
            request.transport.abort()
            raise web.HTTPServiceUnavailable()
        return await worker.handle(request)

    def signed(self, url: str, signature: str) -> bool:
        key = (url, signature)
        if key not in self._signatures:
            message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
            try:
                pkcs1_15.new(self.public_key).verify(SHA256.new(message), base64.b64decode(signature))
                self._signatures[key] = True
            except (ValueError, TypeError):
                self._signatures[key] = False
        return self._signatures[key]

    def kill(self, worker: FakeWorker) -> None:
        """The machine goes away (call on the fleet's loop): its listening socket closes, its
        connections are reset, and after `vast_notice_s` FakeVast stops routing to it."""
        if not worker.alive:
            return
        worker.alive = False
        server = worker.site._server
        if server is not None:
            server.close()
        for transport in list(worker.transports):
            transport.abort()
        self.loop.call_later(self.vast_notice_s, self.vast.remove_worker, worker.url)

    def kill_at(self, worker: FakeWorker, seconds: float) -> None:
        self.loop.call_soon_threadsafe(self.loop.call_later, seconds, self.kill, worker)

    def close(self) -> None:
        try:
            self._call(self.runner.cleanup(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def rate(self) -> float:
        """Nonces per second of the whole fleet, every worker healthy."""
        return sum(w.rate for w in self.workers)

    def mean_step_lag(self) -> float:
        """How late the fleet's steps ended on average, in seconds: near 0 when this process keeps
        up with the rates it simulates."""
        steps = sum(w.steps for w in self.workers)
        return sum(w.late_s for w in self.workers) / steps if steps else 0.0
