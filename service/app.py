"""The Quart app: thin routes that parse, validate, take the one-job lock and relay the job's lines.

Routes (bodies may be wrapped as `{"payload": {...}}`):
  POST /generate   NDJSON stream of result lines and a summary line (generate.py)
  POST /warmup     NDJSON stream, callback protocol (warmup.py)
  POST /pooled     NDJSON stream, orchestrator protocol (pooled.py)
  POST /benchmark  one JSON object: the summary line's fields plus `workload` (nonces computed) and
                   what explains the rate: its timed window, GPU telemetry, the sustained ceiling (benchmark.py)
  POST /validate   one JSON object: jaxbench.claims' report
  GET|POST /health device, job and compile state; 503 and "unhealthy" once a device is broken
Errors before a stream starts: 400 {"error", "field"} for a bad field (a parameter set that cannot
fit the devices is a bad `params`, a screen they cannot run a bad `screen`), 409 {"error": "busy",
"job"} while a job runs, 503 when the device is broken or the server is shutting down, 413
{"error", "field": "body"} for a body over MAX_CONTENT_LENGTH; every other 4xx names what it is
about too (`method`, `path`, `body`).
An exception no check foresaw is logged with its traceback ("unhandled error in …") and answered
400 {"error", "field": "body", "internal_error": true}: a last line of defence, never the plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from quart import Quart, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from jaxbench import fields
from jaxbench.claims import parse_claim, validate_claim
from jaxbench.engine import Engine

from . import peers
from . import requests as rq
from .benchmark import benchmark_driver
from .config import Settings
from .context import BatchPlan, Context
from .generate import generate_driver
from .jobs import JobManager, JobStopped, LineChannel, Refused
from .pooled import pooled_driver
from .warmup import warmup_driver

log = logging.getLogger("service.app")


def _json_line(line: dict) -> str:
    try:
        return json.dumps(line, allow_nan=False) + "\n"
    except ValueError:  # a NaN distance: write it as null rather than invalid JSON
        return json.dumps(_no_nan(line)) + "\n"


def _no_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def ndjson(chan: LineChannel) -> Response:
    """The channel's lines as an NDJSON stream; a client the channel gives up on (LineChannel) has
    its connection closed, so it sees the stream break rather than end."""
    connections = current_app.extensions.get("connections")  # service/transport.py, under `serve`
    client = request.scope.get("client")
    if connections is not None and client:
        chan.on_abandon = lambda why: connections.abort_peer(client, why)

    async def lines():
        try:
            async for line in chan:
                yield _json_line(line)
        finally:
            chan.detach()  # on a disconnect this stops the job

    resp = Response(lines(), status=200, mimetype="application/x-ndjson")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None
    return resp


def create_app(engine: Engine, settings: Settings) -> Quart:
    app = Quart("service")
    app.config["RESPONSE_TIMEOUT"] = None  # streams run for minutes; jobs enforce their own limits
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.body_timeout_s  # a body not received by then: 408
    batches = BatchPlan(engine, settings.batch)
    manager = JobManager(engine, settings, batches)
    ctx = Context(engine, settings, peers.client(), batches)
    app.extensions["jobs"] = manager

    @app.after_serving
    async def _stop():
        await manager.cancel_all()
        await ctx.http.aclose()

    async def body() -> dict:
        return rq.parse_body(await request.get_data())

    def check_screen(screen: rq.Screen | None) -> None:
        """A 400 naming `screen` where the devices cannot run it, before the job starts."""
        if screen is not None:
            screen.check(engine)

    @app.errorhandler(rq.FieldError)
    async def _bad_field(e: rq.FieldError):
        return jsonify({"error": str(e), "field": e.field}), 400

    @app.errorhandler(Refused)
    async def _refused(e: Refused):
        return jsonify(e.body), e.status

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException):
        body = {"error": e.name, "field": {404: "path", 405: "method"}.get(e.code, "body")}
        if e.code == 413:
            body["error"] = f"body larger than {settings.max_body_bytes} bytes"
        # The request's body may not have been read: this connection cannot carry another request.
        return jsonify(body), e.code, {"Connection": "close"}

    @app.errorhandler(Exception)
    async def _internal(e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify({"error": f"the request could not be handled ({type(e).__name__})", "field": "body",
                        "internal_error": True}), 400

    @app.route("/health", methods=["GET", "POST"])
    async def health():
        status, report = manager.health()
        return jsonify(report), status

    @app.post("/generate")
    async def generate():
        req = rq.generate_request(await body(), settings)
        check_screen(req.screen)
        job = await manager.acquire("generate", ((req.params, req.dtype),))
        return ndjson(manager.start_session(job, lambda chan: generate_driver(ctx, job, chan, req)))

    @app.post("/benchmark")
    async def benchmark():
        data = await body()
        req = rq.generate_request(data, settings, default_max_nonces=settings.benchmark_nonces, route="/benchmark",
                                  also_known=frozenset({"sustained_seconds"}))
        probe_s = fields.sustained_seconds(data, default=0.0)
        check_screen(req.screen)
        job = await manager.acquire("benchmark", ((req.params, req.dtype),))
        chan = manager.start_session(job, lambda chan: benchmark_driver(ctx, job, chan, req, probe_s))
        errors, summary = [], None
        try:
            async for line in chan:
                if line.get("status") == "done":
                    summary = line
                elif "error" in line:
                    errors.append(line)
        finally:
            chan.detach()
        if summary is None:
            return jsonify({"error": "benchmark ended without a summary", "errors": errors}), 500
        out = {**summary, "workload": summary["total_computed"]}
        if errors:
            out["errors"] = errors
            field = next((e["field"] for e in errors if "field" in e), None)
            if field is not None:  # the request's fault, found once the job ran
                return jsonify({**out, "error": errors[0]["error"], "field": field}), 400
        return jsonify(out), (500 if summary["reason"] == "error" else 200)

    @app.post("/warmup")
    async def warmup():
        req = rq.warmup_request(await body(), settings)
        job = await manager.acquire("warmup", ((req.params, req.dtype),) if req.params is not None else ())
        return ndjson(manager.start_session(job, lambda chan: warmup_driver(ctx, job, chan, req)))

    @app.post("/pooled")
    async def pooled():
        req = rq.pooled_request(await body(), settings)
        check_screen(req.screen)
        job = await manager.acquire("pooled")
        return ndjson(manager.start_session(job, lambda chan: pooled_driver(ctx, job, chan, req)))

    @app.post("/validate")
    async def validate():
        claim = parse_claim(await body())
        job = await manager.acquire("validate", ((claim.params, claim.dtype),))
        job.phase = "computing"
        job.detail.update({"block_hash": claim.block_hash[:16], "n": len(claim.nonces)})

        def on_step(n: int) -> None:  # in the worker thread, after each step: progress, and the stop
            job.computed += n
            job.check_stop()

        try:
            report = await job.call(validate_claim, ctx.engine, claim, on_step)
            job.summary = {"reason": "completed", "n": report["n"], "n_invalid": report["n_invalid"]}
        except asyncio.CancelledError:  # the client left: the thread stops after its current step
            job.stop("disconnected")
            job.summary = {"reason": "disconnected"}
            raise
        except JobStopped:
            job.summary = {"reason": job.stop_reason}
            raise Refused(503, {"error": "shutting down" if manager.draining else f"stopped ({job.stop_reason})"})
        except BaseException:
            job.summary = {"reason": job.stop_reason or "error"}
            raise
        finally:
            job.finish()
        return Response(_json_line(report), status=200, mimetype="application/json")

    return app
