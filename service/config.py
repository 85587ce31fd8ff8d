"""Settings of the model server, read once from the environment at start.

Each setting is declared once, in `Settings`: its field, environment variable, default, kind (how
its text is read and checked) and description. README.md's "Model server" table is printed from
these declarations (`scripts/settings_table.py`; tests/test_service_config.py fails when the two
differ). Every duration the protocol uses has its default here; the warmup and pooled flows also
take a per-request override (see requests.py).

An unset or empty variable means the default. A value its kind refuses is a `SettingsError`
naming the variable: the server logs the "bad configuration" fatal line and exits (server.py).

The PyWorker (pyworker/worker.py) reads a few of these with the same code, in a venv without JAX or
jaxbench: this module imports neither (the one kind that needs jaxbench imports it when used).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable

PLATFORMS = ("gpu", "cpu", "any")
DRAIN_MARGIN_S = 1.0  # the drain: jobs end by deadline - 2 margins, the server stops waiting at deadline - 1, then exits


class SettingsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a setting's text is read: `read` returns the value or raises ValueError saying what it
    must be."""

    read: Callable[[str], Any]


def _text(raw: str) -> str:
    return raw


def _upper(raw: str) -> str:
    return raw.upper()


def _flag(raw: str) -> bool:
    return raw.lower() in ("1", "true", "yes", "on")


def _integer(minimum: int, maximum: int | None = None) -> Kind:
    def read(raw: str) -> int:
        bound = f" from {minimum} to {maximum}" if maximum is not None else f" ≥ {minimum}"
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be an integer{bound}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be an integer{bound}")
        return value

    return Kind(read)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number of seconds, not negative")
    return value


def _choice(*values: Any) -> Kind:
    def read(raw: str) -> Any:
        for value in values:
            if raw == str(value):
                return value
        raise ValueError(f"must be one of {', '.join(map(str, values))}")

    return Kind(read)


def _size(raw: str) -> int:
    from jaxbench.sizes import parse_size  # imported only where the setting is given: the PyWorker's venv is lean

    return parse_size(raw)


def _positive_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


TEXT, LEVEL, FLAG, SECONDS, SIZE = Kind(_text), Kind(_upper), Kind(_flag), Kind(_seconds), Kind(_size)
POSITIVE_SECONDS = Kind(_positive_seconds)
COUNT = _integer(1)
BYTES = _integer(0)


def setting(env: str, default: Any, kind: Kind, what: str, shown: str | None = None) -> Any:
    """A field of `Settings` read from `env`. `shown`: the default as README's table states it, when
    the value itself does not say it (None: computed at start)."""
    return dataclasses.field(default=default, metadata={"env": env, "kind": kind, "what": what, "shown": shown})


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = setting(
        "MODEL_SERVER_HOST", "127.0.0.1", TEXT,
        "bind address: loopback, since the model server has no authentication and the PyWorker on the same "
        "host is its only intended client")
    port: int = setting("MODEL_SERVER_PORT", 18000, _integer(1, 65535), "bind port (the PyWorker reads it too)")
    log_path: str = setting(
        "MODEL_LOG", "/var/log/model/server.log", TEXT,
        "log file, truncated at start; every line also goes to stdout (the PyWorker reads it too)")
    log_level: str = setting("LOG_LEVEL", "INFO", LEVEL, "root log level")
    access_log: bool = setting("MODEL_ACCESS_LOG", False, FLAG, "`1` logs every HTTP request (hypercorn's access log)")
    devices: int | None = setting("MODEL_DEVICES", None, COUNT, "use the first N local devices", shown="all")
    group_size: int | None = setting(
        "MODEL_GROUP_SIZE", None, _choice(1, 2, 4, 8),
        "devices sharing one replica of the weights, each running a share of the layers: `1`, `2`, `4` or `8`",
        shown="chosen by the engine from memory")
    device_memory: int | None = setting(
        "MODEL_DEVICE_MEMORY", None, SIZE,
        "memory the engine may use on each device, e.g. `24GiB`: memory checks and batch bounds obey it",
        shown="what each device reports")
    draws: str = setting("MODEL_DRAWS", "auto", _choice("auto", "host", "device"),
                         "where inputs are drawn: `auto` (device on GPUs), `host`, `device`")
    batch: int | None = setting("MODEL_BATCH", None, COUNT,
                                "nonces per device per step (never more than fits beside the weights)",
                                shown="measured (as the CLI's `--batch`)")
    max_body_bytes: int = setting("MODEL_MAX_BODY_BYTES", 1 << 20, BYTES,
                                  "largest request body (413 above it) and largest answer read from a peer")
    duration_s: float = setting("MODEL_DURATION_S", 420.0, SECONDS,
                                "`/generate` `duration_s` default (the PyWorker's workload uses it too)")
    benchmark_nonces: int = setting("MODEL_BENCHMARK_NONCES", 1024, COUNT,
                                    "`/benchmark` `max_nonces` default; the PyWorker's benchmark sends this many")
    http_timeout_s: float = setting(
        "MODEL_HTTP_TIMEOUT_S", 10.0, SECONDS,
        "total time of each outgoing call (warmup callback, orchestrator: connecting, sending, the answer and its "
        "body), and the budget of a stopped job's goodbye calls")
    warmup_poll_s: float = setting("MODEL_WARMUP_POLL_S", 5.0, SECONDS, "`/warmup`: pause between polls for params")
    warmup_timeout_s: float = setting("MODEL_WARMUP_TIMEOUT_S", 600.0, SECONDS,
                                      "`/warmup`: give up waiting for params after this")
    pooled_poll_s: float = setting("MODEL_POOLED_POLL_S", 0.5, SECONDS, "`/pooled`: config poll interval while computing")
    pooled_wait_poll_s: float = setting("MODEL_POOLED_WAIT_POLL_S", 1.0, SECONDS,
                                        "`/pooled`: config poll interval while waiting for a block hash")
    pooled_block_hash_timeout_s: float = setting("MODEL_POOLED_BLOCK_HASH_TIMEOUT_S", 600.0, SECONDS,
                                                 "`/pooled`: give up waiting for a block hash after this")
    pooled_session_s: float = setting(
        "MODEL_POOLED_SESSION_S", 600.0, SECONDS,
        "`/pooled`: longest computing phase of one session (the PyWorker's workload uses it too)")
    pooled_heartbeat_s: float = setting("MODEL_POOLED_HEARTBEAT_S", 10.0, SECONDS, "`/pooled`: heartbeat interval")
    pooled_peer_grace_s: float = setting(
        "MODEL_POOLED_PEER_GRACE_S", 60.0, SECONDS,
        "`/pooled`: the session ends (reason `orchestrator_lost`) once no call to the orchestrator, or no result "
        "post, has succeeded for this long")
    retry_attempts: int = setting("MODEL_RETRY_ATTEMPTS", 5, COUNT,
                                  "attempts of the retried orchestrator calls (register, ready, shutdown)")
    retry_base_s: float = setting(
        "MODEL_RETRY_BASE_S", 1.0, SECONDS,
        "backoff base of every retried call (orchestrator, result posts, warmup completion): pauses base·2^k "
        "(1, 2, 4, 8 s), at most `MODEL_RETRY_MAX_S`")
    retry_max_s: float = setting("MODEL_RETRY_MAX_S", 30.0, SECONDS, "longest backoff pause")
    result_buffer: int = setting("MODEL_RESULT_BUFFER", 1000, COUNT,
                                 "`/pooled`: results held for (re)sending; the oldest is dropped (and counted) beyond it")
    final_flush_s: float = setting("MODEL_FINAL_FLUSH_S", 30.0, SECONDS,
                                   "`/pooled`: how long the end of a session keeps sending buffered results")
    stopping_job_wait_s: float = setting(
        "MODEL_STOPPING_JOB_WAIT_S", 10.0, SECONDS,
        "a new request waits this long for a job that is already stopping (its client left) before answering 409")
    drain_timeout_s: float = setting("MODEL_DRAIN_TIMEOUT_S", 30.0, SECONDS,
                                     "SIGTERM: how long the running job gets to end before the server stops anyway")
    graceful_timeout_s: float = setting(
        "MODEL_GRACEFUL_TIMEOUT_S", 3.0, SECONDS,
        "once the jobs have ended after SIGTERM, how long answers still being written get before every connection "
        "is closed")
    max_connections: int = setting(
        "MODEL_MAX_CONNECTIONS", 256, COUNT,
        "client connections open at once (fewer if the open-files limit is low): beyond it the oldest idle one is "
        "closed, or the new one refused (503)")
    body_timeout_s: float = setting(
        "MODEL_BODY_TIMEOUT_S", 60.0, POSITIVE_SECONDS,
        "a request body not received in full within this is answered 408 (a chunked body whose chunk-size line "
        "never ends, too)")
    idle_timeout_s: float = setting(
        "MODEL_IDLE_TIMEOUT_S", 5.0, POSITIVE_SECONDS,
        "a connection with no request in progress (idle, or its request head incomplete) is closed after this")
    client_stall_s: float = setting(
        "MODEL_CLIENT_STALL_S", 30.0, POSITIVE_SECONDS,
        "a client that reads none of its answer for this long, or keeps a job's lines waiting this long in all, is "
        "treated as gone (the job stops, the connection is closed)")
    platform: str = setting(
        "MODEL_PLATFORM", "gpu", _choice(*PLATFORMS),
        "where the server computes: `gpu` (no usable GPU is fatal at start), `cpu` (local tests), `any` (what JAX "
        "finds)")

    @classmethod
    def from_env(cls, only: Iterable[str] | None = None) -> "Settings":
        """The settings the environment gives; `only`: read just these fields (the others keep their
        defaults), for a reader that uses no others (the PyWorker)."""
        wanted = None if only is None else set(only)
        values = {}
        for f in dataclasses.fields(cls):
            if wanted is not None and f.name not in wanted:
                continue
            env = f.metadata["env"]
            raw = os.environ.get(env)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = f.metadata["kind"].read(raw.strip())
            except ValueError as e:
                raise SettingsError(f"{env}={raw!r:.60}: {e}") from None
        return cls(**values)


def _shown(f: dataclasses.Field) -> str:
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    value = f.default
    if isinstance(value, bool):
        return f"`{int(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def markdown_table() -> str:
    """README.md's table of the model server's settings: variable, default, description."""
    rows = ["| variable | default | what |", "|---|---|---|"]
    rows += [f"| `{f.metadata['env']}` | {_shown(f)} | {f.metadata['what']} |" for f in dataclasses.fields(Settings)]
    return "\n".join(rows) + "\n"
