"""The Vast.ai PyWorker in front of the jaxbench model server (`python -m service`).

It checks each request's signature, queues the nonce-search routes one at a time, forwards the
payload to the model server on this machine and reports load and throughput to the autoscaler.
The model server's port, log file and default job length come from the same environment
variables, read by the same code (`service.config.Settings`), as the model server's own.

Workload units are nonces of the benchmark's parameter set (`JAXBENCH_BENCHMARK_PARAMS`, default
`bench`: set it to the parameters your clients send). The benchmark runs on the model server's
non-streaming `/benchmark` route: its warm-up request (`MODEL_BENCHMARK_NONCES` nonces) builds the
weights and compiles the step; each timed request then computes `JAXBENCH_BENCHMARK_STEPS` full
steps, a step being the model server's device groups × batch (read from its `/health` once compiled), so
every worker is measured on whole steps however many GPUs it has. Each request counts exactly the
nonces it asks for, so the throughput the SDK measures (`max_perf`) is nonces per second.
A job counts the nonces it will compute: its time limit times the measured rate, or its
`max_nonces` if that is smaller. The time limit is `duration_s` (default `MODEL_DURATION_S`) for
`/generate`, `/benchmark` and `/warmup` (whose generation is a `/generate` job), and
`session_timeout_s` (default `MODEL_POOLED_SESSION_S`) for `/pooled`. The measured rate is the
benchmark result that the SDK keeps in `.has_benchmark` in its working directory; before the
benchmark has run (the autoscaler sends no traffic then) a job without `max_nonces` counts 0. With
these units, the SDK's queue estimate (working load / max_perf) is the seconds of work ahead.

A client's `/benchmark` (`jaxbench remote bench`) gets the model server's answer with this worker's
Vast instance id added (`vast_instance_id`, from CONTAINER_ID), by which the console lists its price.

Every request passes pyworker/checks.py before the SDK's handler sees it (a malformed one gets a 4xx
naming its field), and every line this process logs has query strings and api_key values redacted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.request
from pathlib import Path

from aiohttp import ClientResponse, web

# Imported from the module itself: `from vastai import Worker` gives None when the import fails.
from vastai.serverless.server.worker import (
    BenchmarkConfig,
    HandlerConfig,
    LogActionConfig,
    Worker,
    WorkerConfig,
)

from pyworker import checks
from service.config import Settings
from service.logsetup import redact
from service.signals import FATAL_CAUSES, FATAL_MARKER, READY_LINE

# Only the settings used here: the others may need what this venv lacks (MODEL_DEVICE_MEMORY, jaxbench).
MODEL_SETTINGS = Settings.from_env(only=("port", "log_path", "duration_s", "pooled_session_s", "benchmark_nonces"))
MODEL_SERVER_URL = "http://127.0.0.1"

# Where the SDK writes the measured throughput; relative to its working directory, as the SDK reads it.
BENCHMARK_RESULT_FILE = Path(".has_benchmark")
BENCHMARK_RUNS = 3
BENCHMARK_STEPS = int(os.environ.get("JAXBENCH_BENCHMARK_STEPS", "8"))
BENCHMARK_DTYPE = "float16"
# A job route rejects a request (429) when the work already running would hold it longer than this.
MAX_QUEUE_SECONDS = 60.0


def _benchmark_params(spec: str) -> str | dict:
    """A preset name, or a JSON object of parameter fields."""
    return json.loads(spec) if spec.lstrip().startswith("{") else spec


BENCHMARK_PAYLOAD = {
    "block_hash": "jaxbench-pyworker-benchmark",
    "block_height": 0,
    "public_key": "jaxbench-pyworker-benchmark",
    # The network's r_target (jaxbench.params.DEFAULT_R_TARGET), so the benchmark emits as many
    # results as a real job; not imported, to keep jaxbench out of the PyWorker's environment.
    "r_target": 1.4013564660458173,
    "batch_size": 1,  # required by the model server, which picks the device batch itself
    "start_nonce": 0,
    "params": _benchmark_params(os.environ.get("JAXBENCH_BENCHMARK_PARAMS", "bench")),
    "dtype": BENCHMARK_DTYPE,
    "max_nonces": MODEL_SETTINGS.benchmark_nonces,
}


def _is_benchmark_step(compiled: dict) -> bool:
    """A compiled step (an entry of /health's `compiled`) of the benchmark's dtype and parameters.
    Parameters given as a preset name cannot be compared here (the PyWorker does not load jaxbench);
    when the benchmark runs, right after the model server started, its steps are the only ones."""
    params = BENCHMARK_PAYLOAD["params"]
    if compiled.get("dtype") != BENCHMARK_DTYPE:
        return False
    return not isinstance(params, dict) or all(compiled.get("params", {}).get(k) == v for k, v in params.items())


def compiled_step_nonces() -> int | None:
    """Nonces in one step of the benchmark's compiled step (device groups × batch: a group of several
    devices takes one batch through its stages), None before it is compiled.

    Asks the model server's /health on this machine; the SDK calls the benchmark generator inside its
    event loop, where this blocks for the milliseconds of one local request.
    """
    url = f"{MODEL_SERVER_URL}:{MODEL_SETTINGS.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            health = json.load(response)
    except (OSError, ValueError):
        return None
    steps = [c["batch"] * c["groups"] for c in health.get("compiled") or [] if _is_benchmark_step(c)]
    return max(steps, default=None)


def benchmark_request() -> dict:
    """The payload of each benchmark request: BENCHMARK_STEPS full steps once the benchmark's step is
    compiled; before that (the SDK's warm-up request, which compiles it) MODEL_BENCHMARK_NONCES."""
    step = compiled_step_nonces()
    return {**BENCHMARK_PAYLOAD, "max_nonces": BENCHMARK_STEPS * step} if step else dict(BENCHMARK_PAYLOAD)


def _positive(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def measured_rate() -> float | None:
    """Nonces per second from the SDK's benchmark result, or None before the benchmark has run."""
    try:
        return _positive(float(BENCHMARK_RESULT_FILE.read_text().strip()))
    except (OSError, ValueError):
        return None


def _nonces_within(seconds: float, max_nonces: float | None = None) -> float:
    rate = measured_rate()
    bounds = [b for b in (max_nonces, seconds * rate if rate else None) if b is not None]
    return min(bounds) if bounds else 0.0


def _unwrapped(payload: dict) -> dict:
    inner = payload.get("payload")
    return inner if isinstance(inner, dict) else payload  # the model server unwraps this form too


def job_workload(payload: dict) -> float:
    """The nonces a /generate, /benchmark or /warmup job will compute (see the module docstring)."""
    job = _unwrapped(payload)
    seconds = _positive(job.get("duration_s")) or MODEL_SETTINGS.duration_s
    return _nonces_within(seconds, _positive(job.get("max_nonces")))


def pooled_workload(payload: dict) -> float:
    """The nonces a /pooled session will compute (see the module docstring)."""
    seconds = _positive(_unwrapped(payload).get("session_timeout_s")) or MODEL_SETTINGS.pooled_session_s
    return _nonces_within(seconds)


def no_workload(payload: dict) -> float:
    return 0.0


async def relay_stream(client_request: web.Request, model_response: ClientResponse) -> web.StreamResponse:
    """Pass the model server's answer on chunk by chunk, then close the connection to it.

    The SDK's default relay never closes `model_response`, so a client that goes away leaves the
    job running on the GPU; closing it here (also on cancellation) makes the model server stop.
    """
    try:
        response = web.StreamResponse(status=model_response.status)
        response.content_type = model_response.content_type
        await response.prepare(client_request)
        async for chunk in model_response.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        model_response.close()


def _instance_id() -> int | None:
    """This worker's Vast instance id (the SDK's CONTAINER_ID), by which the console lists its price."""
    try:
        return int(os.environ.get("CONTAINER_ID", ""))
    except ValueError:
        return None


async def benchmark_answer(client_request: web.Request, model_response: ClientResponse) -> web.Response:
    """The model server's /benchmark answer with `vast_instance_id` added (a JSON object; anything
    else passes as it came), so that a client can look the worker's price up (`jaxbench remote bench`)."""
    try:
        body = await model_response.read()
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            body = json.dumps({**answer, "vast_instance_id": _instance_id()}).encode()
        return web.Response(body=body, status=model_response.status,
                            content_type=model_response.content_type or "application/json")
    finally:
        model_response.close()


def _job_route(route: str, workload_calculator) -> HandlerConfig:
    return HandlerConfig(
        route=route,
        allow_parallel_requests=False,
        max_queue_time=MAX_QUEUE_SECONDS,
        workload_calculator=workload_calculator,
        response_generator=relay_stream,
    )


worker_config = WorkerConfig(
    model_server_url=MODEL_SERVER_URL,
    model_server_port=MODEL_SETTINGS.port,
    model_log_file=MODEL_SETTINGS.log_path,
    model_healthcheck_url="/health",
    handlers=[
        _job_route("/generate", job_workload),
        _job_route("/warmup", job_workload),
        _job_route("/pooled", pooled_workload),
        HandlerConfig(
            route="/health",
            allow_parallel_requests=True,
            max_queue_time=None,
            workload_calculator=no_workload,
        ),
        # Non-streaming: the model server answers once the nonces are computed, so the SDK, which
        # times each request until its response headers, times the work itself (its own benchmark
        # calls the model server directly; clients get benchmark_answer).
        HandlerConfig(
            route="/benchmark",
            allow_parallel_requests=False,
            max_queue_time=MAX_QUEUE_SECONDS,
            workload_calculator=job_workload,
            response_generator=benchmark_answer,
            benchmark_config=BenchmarkConfig(
                generator=benchmark_request, runs=BENCHMARK_RUNS, concurrency=1, do_warmup=True
            ),
        ),
    ],
    # The SDK reports the first pattern that matches: the specific causes, then the bare marker.
    log_action_config=LogActionConfig(on_load=[READY_LINE], on_error=[*FATAL_CAUSES, FATAL_MARKER]),
)


# A request's body beyond the payload the model server takes (MODEL_MAX_BODY_BYTES): auth_data, session_id.
REQUEST_WRAPPER_BYTES = 64 * 1024


class RedactingFormatter(logging.Formatter):
    """Another formatter's lines with URL query strings and api_key values redacted."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def redact_logs() -> None:
    """Every log handler of this process writes redacted lines: the vastai client puts the endpoint's
    api_key in the query of each request it sends a worker, and aiohttp's access log writes the query."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter))


def main() -> None:
    worker = Worker(worker_config)  # sets up the SDK's logging
    checks.guard(worker, MODEL_SETTINGS.max_body_bytes + REQUEST_WRAPPER_BYTES)
    redact_logs()
    worker.run()


if __name__ == "__main__":
    main()
