"""Settings of the model server, read once from the environment at start.

Every duration the protocol uses has a module-level default here, an environment override
(read at start) and, for the warmup and pooled flows, a per-request override (see requests.py).

| env | default | what |
|---|---|---|
| MODEL_SERVER_HOST | 127.0.0.1 | bind address (the PyWorker on the same host is the only intended client) |
| MODEL_SERVER_PORT | 18000 | bind port |
| MODEL_LOG | /var/log/model/server.log | log file (truncated at start; every line also goes to stdout) |
| LOG_LEVEL | INFO | root log level |
| MODEL_ACCESS_LOG | 0 | 1 = log every HTTP request (hypercorn's access log) |
| MODEL_DEVICES | all | use the first N local devices |
| MODEL_DRAWS | auto | where inputs are drawn: auto, host or device (jaxbench.engine) |
| MODEL_BATCH | from free memory | nonces per device per step |
| JAXBENCH_CACHE_DIR | ~/.cache/jaxbench/xla | persistent XLA compile cache (read by jaxbench.engine) |
| MODEL_MAX_BODY_BYTES | 1048576 | largest request body (413 above it) and largest answer read from a peer |
| MODEL_DURATION_S | 420 | /generate `duration_s` default (the predecessor's window) |
| MODEL_BENCHMARK_NONCES | 1024 | /benchmark `max_nonces` default |
| MODEL_HTTP_TIMEOUT_S | 10 | total time of each outgoing HTTP call (connect, send, answer and its body), and the budget of a stopped job's goodbye calls |
| MODEL_WARMUP_POLL_S | 5 | /warmup: pause between polls of the callback for params |
| MODEL_WARMUP_TIMEOUT_S | 600 | /warmup: give up waiting for params after this |
| MODEL_POOLED_POLL_S | 0.5 | /pooled: config poll interval while computing |
| MODEL_POOLED_WAIT_POLL_S | 1.0 | /pooled: config poll interval while waiting for a block hash |
| MODEL_POOLED_BLOCK_HASH_TIMEOUT_S | 600 | /pooled: give up waiting for a block hash after this |
| MODEL_POOLED_SESSION_S | 600 | /pooled: longest computing phase of one session |
| MODEL_POOLED_HEARTBEAT_S | 10 | /pooled: heartbeat interval |
| MODEL_POOLED_PEER_GRACE_S | 60 | /pooled: the session ends (reason orchestrator_lost) once no call to the orchestrator, or no result post, has succeeded for this long |
| MODEL_RETRY_ATTEMPTS | 5 | attempts of the retried orchestrator calls (register, ready, shutdown) |
| MODEL_RETRY_BASE_S | 1.0 | retry/backoff base: sleeps base·2^k (1, 2, 4, 8 s), capped at MODEL_RETRY_MAX_S |
| MODEL_RETRY_MAX_S | 30 | longest backoff sleep |
| MODEL_RESULT_BUFFER | 1000 | /pooled: results held for (re)sending; the oldest is dropped (and counted) beyond it |
| MODEL_FINAL_FLUSH_S | 30 | /pooled: how long the end of a session keeps trying to send buffered results |
| MODEL_STOPPING_JOB_WAIT_S | 10 | a new request waits this long for a job that is already stopping (e.g. its client left) before 409 |
| MODEL_DRAIN_TIMEOUT_S | 30 | SIGTERM: how long running jobs get to end before the server stops anyway |
| MODEL_GRACEFUL_TIMEOUT_S | 3 | once the jobs have ended after SIGTERM, how long answers still being written get before every connection is closed |
| MODEL_MAX_CONNECTIONS | 256 | client connections open at once (fewer if the open-files limit is low): beyond it the oldest idle one is closed, or the new one refused (503) |
| MODEL_BODY_TIMEOUT_S | 60 | a request body not received in full within this is answered 408 (a chunked body whose chunk-size line never ends, too) |
| MODEL_IDLE_TIMEOUT_S | 5 | a connection with no request in progress (idle, or its request head incomplete) is closed after this |
| MODEL_CLIENT_STALL_S | 30 | a client that reads none of its answer for this long, or keeps a job's lines waiting this long in all, is treated as gone (the job stops, the connection is closed) |
| MODEL_PLATFORM | gpu | where the server computes: `gpu` (no usable GPU is fatal at start), `cpu` (local tests), `any` (what JAX finds) |
"""

from __future__ import annotations

import dataclasses
import math
import os


PLATFORMS = ("gpu", "cpu", "any")
DRAIN_MARGIN_S = 1.0  # the drain: jobs end by deadline - 2 margins, the server stops waiting at deadline - 1, then exits


class SettingsError(ValueError):
    pass


def _env(name: str, default, kind):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} must be a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise SettingsError(f"{name}={raw!r} must not be negative")
    return value


def _flag(raw: str) -> bool:
    return raw.lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 18000
    log_path: str = "/var/log/model/server.log"
    log_level: str = "INFO"
    access_log: bool = False
    devices: int | None = None
    draws: str = "auto"
    batch: int | None = None
    max_body_bytes: int = 1 << 20
    duration_s: float = 420.0
    benchmark_nonces: int = 1024
    http_timeout_s: float = 10.0
    warmup_poll_s: float = 5.0
    warmup_timeout_s: float = 600.0
    pooled_poll_s: float = 0.5
    pooled_wait_poll_s: float = 1.0
    pooled_block_hash_timeout_s: float = 600.0
    pooled_session_s: float = 600.0
    pooled_heartbeat_s: float = 10.0
    pooled_peer_grace_s: float = 60.0
    retry_attempts: int = 5
    retry_base_s: float = 1.0
    retry_max_s: float = 30.0
    result_buffer: int = 1000
    final_flush_s: float = 30.0
    stopping_job_wait_s: float = 10.0
    drain_timeout_s: float = 30.0
    graceful_timeout_s: float = 3.0
    max_connections: int = 256
    idle_timeout_s: float = 5.0
    body_timeout_s: float = 60.0
    client_stall_s: float = 30.0
    platform: str = "gpu"

    @classmethod
    def from_env(cls) -> "Settings":
        d = cls()
        s = cls(
            host=_env("MODEL_SERVER_HOST", d.host, str),
            port=_env("MODEL_SERVER_PORT", d.port, int),
            log_path=_env("MODEL_LOG", d.log_path, str),
            log_level=_env("LOG_LEVEL", d.log_level, str).upper(),
            access_log=_env("MODEL_ACCESS_LOG", d.access_log, _flag),
            devices=_env("MODEL_DEVICES", d.devices, int),
            draws=_env("MODEL_DRAWS", d.draws, str),
            batch=_env("MODEL_BATCH", d.batch, int),
            max_body_bytes=_env("MODEL_MAX_BODY_BYTES", d.max_body_bytes, int),
            duration_s=_env("MODEL_DURATION_S", d.duration_s, float),
            benchmark_nonces=_env("MODEL_BENCHMARK_NONCES", d.benchmark_nonces, int),
            http_timeout_s=_env("MODEL_HTTP_TIMEOUT_S", d.http_timeout_s, float),
            warmup_poll_s=_env("MODEL_WARMUP_POLL_S", d.warmup_poll_s, float),
            warmup_timeout_s=_env("MODEL_WARMUP_TIMEOUT_S", d.warmup_timeout_s, float),
            pooled_poll_s=_env("MODEL_POOLED_POLL_S", d.pooled_poll_s, float),
            pooled_wait_poll_s=_env("MODEL_POOLED_WAIT_POLL_S", d.pooled_wait_poll_s, float),
            pooled_block_hash_timeout_s=_env("MODEL_POOLED_BLOCK_HASH_TIMEOUT_S", d.pooled_block_hash_timeout_s, float),
            pooled_session_s=_env("MODEL_POOLED_SESSION_S", d.pooled_session_s, float),
            pooled_heartbeat_s=_env("MODEL_POOLED_HEARTBEAT_S", d.pooled_heartbeat_s, float),
            pooled_peer_grace_s=_env("MODEL_POOLED_PEER_GRACE_S", d.pooled_peer_grace_s, float),
            retry_attempts=_env("MODEL_RETRY_ATTEMPTS", d.retry_attempts, int),
            retry_base_s=_env("MODEL_RETRY_BASE_S", d.retry_base_s, float),
            retry_max_s=_env("MODEL_RETRY_MAX_S", d.retry_max_s, float),
            result_buffer=_env("MODEL_RESULT_BUFFER", d.result_buffer, int),
            final_flush_s=_env("MODEL_FINAL_FLUSH_S", d.final_flush_s, float),
            stopping_job_wait_s=_env("MODEL_STOPPING_JOB_WAIT_S", d.stopping_job_wait_s, float),
            drain_timeout_s=_env("MODEL_DRAIN_TIMEOUT_S", d.drain_timeout_s, float),
            graceful_timeout_s=_env("MODEL_GRACEFUL_TIMEOUT_S", d.graceful_timeout_s, float),
            max_connections=_env("MODEL_MAX_CONNECTIONS", d.max_connections, int),
            idle_timeout_s=_env("MODEL_IDLE_TIMEOUT_S", d.idle_timeout_s, float),
            body_timeout_s=_env("MODEL_BODY_TIMEOUT_S", d.body_timeout_s, float),
            client_stall_s=_env("MODEL_CLIENT_STALL_S", d.client_stall_s, float),
            platform=_env("MODEL_PLATFORM", d.platform, str).lower(),
        )
        if not 0 < s.port < 65536:
            raise SettingsError(f"MODEL_SERVER_PORT={s.port} is not a port")
        if s.devices is not None and s.devices < 1:
            raise SettingsError("MODEL_DEVICES must be ≥ 1")
        if s.batch is not None and s.batch < 1:
            raise SettingsError("MODEL_BATCH must be ≥ 1")
        if s.draws not in ("auto", "host", "device"):
            raise SettingsError(f"MODEL_DRAWS must be auto, host or device, got {s.draws!r}")
        if s.platform not in PLATFORMS:
            raise SettingsError(f"MODEL_PLATFORM must be {', '.join(PLATFORMS)}, got {s.platform!r}")
        if s.max_connections < 1:
            raise SettingsError("MODEL_MAX_CONNECTIONS must be ≥ 1")
        if s.idle_timeout_s <= 0 or s.client_stall_s <= 0 or s.body_timeout_s <= 0:
            raise SettingsError("MODEL_IDLE_TIMEOUT_S, MODEL_BODY_TIMEOUT_S and MODEL_CLIENT_STALL_S must be positive")
        if s.result_buffer < 1 or s.benchmark_nonces < 1 or s.retry_attempts < 1:
            raise SettingsError("MODEL_RESULT_BUFFER, MODEL_BENCHMARK_NONCES and MODEL_RETRY_ATTEMPTS must be ≥ 1")
        return s
