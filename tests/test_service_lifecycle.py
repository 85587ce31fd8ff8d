"""Shutdown on SIGTERM (live servers), a broken device (in-process, with an engine that fails), a
screen the device cannot run (in-process), and the log signals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types

import httpx
import jax
import numpy as np

from service_helpers import REPO, TINY_BODY, FakeHTTPServer, ServiceProcess, assert_clean_log, wait_until
from jaxbench.job import GroupResult, StepResult
from service import signals
from service.app import create_app
from service.config import Settings
from service.logsetup import SignalSafeFormatter


def test_sigterm_mid_stream_ends_with_the_summary_and_exits_0(tmp_path, compile_cache):
    server = ServiceProcess(tmp_path, compile_cache).start()
    try:
        results = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/generate", json={**TINY_BODY, "duration_s": 120}) as r:
                assert r.status_code == 200
                for text in r.iter_lines():
                    line = json.loads(text)
                    results.append(line)
                    if len(results) == 3:
                        sent = time.monotonic()
                        os.kill(server.pid, signal.SIGTERM)
                ended = time.monotonic()
        summary = results[-1]
        assert summary["status"] == "done" and summary["reason"] == "shutdown"
        assert summary["total_computed"] == sum(line["batch_computed"] for line in results[:-1]) > 0
        assert ended - sent < 10
        assert server.proc.wait(15) == 0
        assert time.monotonic() - sent < 20
        log = server.log()
        assert "SIGTERM: draining" in log
        assert_clean_log(log)
    finally:
        server.stop()


def test_sigterm_during_pooled_notifies_the_orchestrator_and_refuses_new_jobs(tmp_path, compile_cache):
    shutdowns = []
    release = threading.Event()

    def orchestrator(method, path, query, body):
        if path == "/api/workers/connect":
            return 200, {"status": "ok", "block_hash": "bh-term", "params": "tiny"}
        if path.endswith("/ready"):
            return 200, {"status": "ok", "public_key": "pk", "nonce_range_start": 0, "nonce_range_end": 10**9,
                         "r_target": 2.0}
        if path.endswith("/shutdown"):
            release.wait(5)  # a slow orchestrator keeps the server draining for a moment
            shutdowns.append(body)
        return 200, {"status": "ok"}

    server = ServiceProcess(tmp_path, compile_cache).start()
    try:
        with FakeHTTPServer(orchestrator) as orch, httpx.Client(base_url=server.url, timeout=30) as client:
            lines = []
            with client.stream("POST", "/pooled", json={"orchestrator_url": orch.url, "poll_interval_s": 0.05}) as r:
                for text in r.iter_lines():
                    lines.append(json.loads(text))
                    if len(lines) == 12:
                        os.kill(server.pid, signal.SIGTERM)
                        # Draining: new jobs are refused while the session ends.
                        refused = wait_until(lambda: (lambda x: x if x.status_code == 503 else None)(
                            httpx.post(server.url + "/generate", json=TINY_BODY, timeout=10)), 10, what="503")
                        assert refused.json()["error"] == "shutting down"
                        assert httpx.get(server.url + "/health", timeout=10).json()["draining"] is True
                        release.set()
            assert lines[-2]["status"] == "shutdown" and lines[-2]["reason"] == "shutdown"
            assert lines[-1]["status"] == "done" and lines[-1]["reason"] == "shutdown"
            assert shutdowns and shutdowns[0]["stats"]["reason"] == "shutdown"
            assert server.proc.wait(20) == 0
    finally:
        release.set()
        server.stop()


def test_stale_log_is_truncated_and_a_taken_port_is_fatal(tmp_path, compile_cache):
    first = ServiceProcess(tmp_path / "a", compile_cache)
    first.log_path.parent.mkdir(parents=True)
    first.log_path.write_text(f"old run: {signals.READY_LINE}\nold run: {signals.FATAL_MARKER} gone\n")
    first.start()
    try:
        log = first.log()
        assert "old run" not in log and log.count(signals.READY_LINE) == 1
        # A second server on the same port: FATAL, exit 1, never ready.
        second = ServiceProcess(tmp_path / "b", compile_cache)
        second.port, second.env["MODEL_SERVER_PORT"] = first.port, str(first.port)
        proc = subprocess.run([sys.executable, "-m", "service"], env=second.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        log = second.log()
        assert f"{signals.FATAL_MARKER} {signals.SERVER_DID_NOT_START}" in log and signals.READY_LINE not in log
        assert log == proc.stdout  # every log line goes to the file and to stdout, once
        assert first.health()["status"] == "healthy"
    finally:
        first.stop()


def test_no_gpu_is_fatal_where_the_server_expects_one(tmp_path, compile_cache):
    """MODEL_PLATFORM=gpu (the default, and the image's) on a machine whose JAX has no usable GPU:
    exit 1, never ready, and the fatal line says why; the test servers compute on the CPU only
    because they say MODEL_PLATFORM=cpu."""
    server = ServiceProcess(tmp_path, compile_cache, {"MODEL_PLATFORM": "gpu", "JAX_PLATFORMS": "cpu"})  # no GPU anywhere
    proc = subprocess.run([sys.executable, "-m", "service"], env=server.env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    log = server.log()
    fatal = [line for line in log.splitlines() if signals.FATAL_MARKER in line]
    assert len(fatal) == 1 and signals.READY_LINE not in log, log
    assert f"{signals.FATAL_MARKER} {signals.NO_USABLE_DEVICE}: no usable GPU: " in fatal[0]
    assert "MODEL_PLATFORM=cpu" in fatal[0] and "Traceback" not in log

    server.env["MODEL_PLATFORM"] = "tpu-please"
    proc = subprocess.run([sys.executable, "-m", "service"], env=server.env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and f"{signals.FATAL_MARKER} {signals.BAD_CONFIGURATION}: MODEL_PLATFORM" in server.log()


def test_the_start_up_log_has_no_failed_probes_of_backends_nobody_asked_for(tmp_path, compile_cache):
    server = ServiceProcess(tmp_path, compile_cache, {"JAX_PLATFORMS": "", "MODEL_PLATFORM": "cpu"}).start()
    try:
        log = server.log()
    finally:
        assert server.stop() == 0
    assert "INFO service: engine: " in log  # the start's INFO lines are there
    assert "Unable to initialize backend 'tpu'" not in log and "Unable to initialize backend 'proxy'" not in log, log


# A broken device, in-process ----------------------------------------------------------------------


class FailingEngine:
    """Yields one step, then raises `failure` (what a device runtime error looks like to the service)."""

    platform = "gpu"
    devices = ["fake"]

    class batches:  # the batch policy: four nonces a step, no memory bound known
        default = staticmethod(lambda params, dtype: 4)
        max_batch = staticmethod(lambda params, dtype: None)

    def __init__(self, failure: BaseException):
        self.failure = failure
        self.steps_completed = 0

    def describe(self):
        return [{"id": 0, "kind": "fake", "platform": "gpu"}]

    def groups(self):
        return {"groups": 1, "group_size": 1}

    def compiled_keys(self):
        return []

    def load(self, params, block_hash, dtype):
        return None

    def check_fits(self, params, dtype, batch=1):
        return None

    def search(self, job, stop=None, batch=None, on_compiled=None):
        nonces = job.schedule.take(0, batch)
        self.steps_completed += 1
        timings = {f.name: 0.0 for f in dataclasses.fields(StepResult)}  # draw/wait/step seconds
        yield StepResult(**{**timings, "step": 0, "flat_start": 0, "batch": batch,
                            "groups": [GroupResult(0, nonces, np.full(len(nonces), 1.0, np.float32))]})
        raise self.failure

    def close(self):
        pass


def run_in_process(engine, scenario):
    async def main():
        app = create_app(engine, Settings(log_path=""))
        async with app.test_app() as test_app:
            return await scenario(test_app.test_client())

    return asyncio.run(main())


async def generate_lines(client) -> list[dict]:
    r = await client.post("/generate", json={**TINY_BODY, "max_nonces": 100})
    assert r.status_code == 200
    return [json.loads(t) for t in (await r.get_data(as_text=True)).splitlines()]


def test_device_failure_marks_the_device_broken(caplog):
    caplog.set_level(logging.INFO)
    failure = jax.errors.JaxRuntimeError("INTERNAL: CUDA error: an illegal memory access was encountered")

    async def scenario(client):
        lines = await generate_lines(client)
        # The result computed before the failure is not dropped; then the error, then the summary.
        assert lines[0]["nonces"] == [0, 1, 2, 3]
        assert lines[1]["error_type"] == "JaxRuntimeError" and lines[1]["fatal"] is True
        assert lines[2]["status"] == "done" and lines[2]["reason"] == "error" and lines[2]["total_computed"] == 4
        for method in ("get", "post"):
            r = await getattr(client, method)("/health")
            h = await r.get_json()
            assert r.status_code == 503 and h["status"] == "unhealthy" and h["cuda_broken"] is True
            assert "illegal memory access" in h["broken_reason"]
        for path in ("/generate", "/benchmark"):
            r = await client.post(path, json=TINY_BODY)
            assert r.status_code == 503 and (await r.get_json())["error"] == "device broken"

    run_in_process(FailingEngine(failure), scenario)
    fatal = [r for r in caplog.records if signals.FATAL_MARKER in r.getMessage()]
    assert len(fatal) == 1 and fatal[0].getMessage().startswith(signals.FATAL_MARKER)


def test_out_of_memory_is_an_error_not_a_broken_device():
    failure = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    async def scenario(client):
        lines = await generate_lines(client)
        assert lines[1]["error_type"] == "JaxRuntimeError" and "fatal" not in lines[1]
        assert lines[-1]["reason"] == "error"
        r = await client.get("/health")
        assert r.status_code == 200 and (await r.get_json())["cuda_broken"] is False
        assert (await generate_lines(client))[-1]["reason"] == "error"  # new jobs still run

    run_in_process(FailingEngine(failure), scenario)


class OldGpuEngine(FailingEngine):
    """A GPU without e4m3 tensor cores (compute capability 8.6)."""

    devices = [types.SimpleNamespace(platform="gpu", device_kind="old card", compute_capability="8.6")]


def test_a_screen_the_devices_cannot_run_is_a_400_naming_it():
    screened = {**TINY_BODY, "max_nonces": 4, "screen": "fp8"}

    async def scenario(client):
        for path, body in (("/generate", screened), ("/benchmark", screened),
                           ("/pooled", {"orchestrator_url": "http://127.0.0.1:9", "screen": "fp8"})):
            r = await client.post(path, json=body)
            answer = await r.get_json()
            assert r.status_code == 400 and answer["field"] == "screen", (path, answer)
            assert "compute capability 8.9" in answer["error"]
        r = await client.get("/health")
        h = await r.get_json()
        assert h["last_job"] is None and h["steps_completed"] == 0  # no job started

    run_in_process(OldGpuEngine(RuntimeError("unused")), scenario)


def test_signal_strings_only_in_signal_lines():
    fmt = SignalSafeFormatter("%(message)s")
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "hash %s", (signals.FATAL_MARKER + signals.READY_LINE,), None)
    text = fmt.format(plain)
    assert signals.FATAL_MARKER not in text and signals.READY_LINE not in text
    marked = logging.LogRecord("x", logging.INFO, __file__, 1, signals.READY_LINE, (), None)
    marked.jaxbench_signal = True
    assert fmt.format(marked) == signals.READY_LINE
