"""Request bodies: parsed and checked field by field before any work starts.

Every problem raises `jaxbench.fields.FieldError(field, message)`; the routes answer it with
HTTP 400 `{"error": "<field>: <message>", "field": "<field>"}`. Unknown top-level keys are ignored
(the predecessor ignored them and callers send extra keys such as `auth_data`); unknown or
inconsistent `params` keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Mapping
from urllib.parse import urlsplit

from jaxbench import fields
from jaxbench.engine import SearchJob
from jaxbench.nonces import NonceSchedule
from jaxbench.params import Params

from .config import Settings

FieldError = fields.FieldError

MAX_DURATION_S = 7 * 24 * 3600.0
MAX_INTERVAL_S = 3600.0


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; `{"payload": {...}}` is unwrapped (the Vast wrapper)."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FieldError("body", f"Invalid JSON: {e}") from None
    if isinstance(data, dict) and "payload" in data:
        data = data["payload"]
        if not isinstance(data, dict):
            raise FieldError("payload", f"must be a JSON object, got {type(data).__name__}")
    if not isinstance(data, dict):
        raise FieldError("body", f"must be a JSON object, got {type(data).__name__}")
    return data


def _optional(data: Mapping[str, Any], name: str) -> bool:
    return data.get(name) is not None


def _seconds(data: Mapping[str, Any], name: str, default: float, maximum: float = MAX_INTERVAL_S) -> float:
    value = fields.number(data, name, default)
    if value > maximum:
        raise FieldError(name, f"must be at most {maximum:g} seconds, got {value:g}")
    return value


def _text(data: Mapping[str, Any], name: str, default: Any, max_len: int = 256) -> str:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise FieldError(name, f"must be a non-empty string of at most {max_len} characters, got {value!r:.60}")
    return value


def http_url(data: Mapping[str, Any], name: str) -> str:
    """An http(s) base URL without trailing slashes (so `base + "/path"` is right)."""
    value = data.get(name)
    if value is None or value == "":
        raise FieldError(name, "is required")
    if not isinstance(value, str) or len(value) > 2048:
        raise FieldError(name, f"must be a URL string, got {value!r:.60}")
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 — raises on a malformed port
    except ValueError as e:
        raise FieldError(name, f"is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FieldError(name, f"must be an http:// or https:// URL with a host, got {value!r:.60}")
    if parts.query or parts.fragment:
        raise FieldError(name, "must not have a query or fragment")
    return value.rstrip("/")


# /generate, /benchmark and the generation input of /warmup ----------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    params: Params
    block_hash: str
    block_height: int
    public_key: str
    r_target: float
    batch_size: int  # accepted and checked for compatibility; the device batch is the server's choice
    start_nonce: int
    node_id: int
    n_nodes: int
    max_nonces: int | None
    duration_s: float
    dtype: str

    def search_job(self) -> SearchJob:
        schedule = NonceSchedule.for_node(self.start_nonce, self.node_id, self.n_nodes, limit=self.max_nonces)
        return SearchJob(self.params, self.block_hash, self.public_key, self.r_target, schedule, self.dtype,
                         self.duration_s)


def generate_request(data: Mapping[str, Any], settings: Settings, default_max_nonces: int | None = None) -> GenerateRequest:
    """Spec §1.1 fields, all required and type/range-checked, plus the optional extensions
    `max_nonces`, `duration_s` (default MODEL_DURATION_S = 420), `dtype` (default float16) and
    `node_id`/`n_nodes` (default 0 of 1: the spec §7 schedule)."""
    block_hash = fields.seed_text(data, "block_hash")
    block_height = fields.integer(data, "block_height")
    public_key = fields.seed_text(data, "public_key")
    r_target = fields.number(data, "r_target")
    batch_size = fields.integer(data, "batch_size", minimum=1)
    start_nonce = fields.integer(data, "start_nonce")
    params = fields.params(data)
    n_nodes = fields.integer(data, "n_nodes", 1, minimum=1)
    node_id = fields.integer(data, "node_id", 0)
    if node_id >= n_nodes:
        raise FieldError("node_id", f"must be below n_nodes ({n_nodes}), got {node_id}")
    max_nonces = fields.integer(data, "max_nonces", minimum=1) if _optional(data, "max_nonces") else default_max_nonces
    duration_s = _seconds(data, "duration_s", settings.duration_s, MAX_DURATION_S)
    dtype = fields.dtype(data)
    return GenerateRequest(params, block_hash, block_height, public_key, r_target, batch_size, start_nonce,
                           node_id, n_nodes, max_nonces, duration_s, dtype)


# /warmup ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WarmupRequest:
    callback_url: str
    job_id: str
    params: Params | None  # known early: weights are built and the step compiled before polling
    block_hash: str | None
    dtype: str
    poll_interval_s: float
    timeout_s: float


def warmup_request(data: Mapping[str, Any], settings: Settings) -> WarmupRequest:
    """Spec §2.1 (`callback_url` http/https, `job_id` default "unknown") plus optional `params`
    (preset or object: compile now), `block_hash` (build those weights now), `dtype`,
    `poll_interval_s` (MODEL_WARMUP_POLL_S) and `timeout_s` (MODEL_WARMUP_TIMEOUT_S)."""
    callback_url = http_url(data, "callback_url")
    job_id = data.get("job_id", "unknown")
    if job_id is None:
        job_id = "unknown"
    if not isinstance(job_id, str) or len(job_id) > 256:
        raise FieldError("job_id", f"must be a string of at most 256 characters, got {job_id!r:.60}")
    params = fields.params(data) if _optional(data, "params") else None
    block_hash = fields.seed_text(data, "block_hash", None) if _optional(data, "block_hash") else None
    return WarmupRequest(
        callback_url=callback_url,
        job_id=job_id,
        params=params,
        block_hash=block_hash,
        dtype=fields.dtype(data),
        poll_interval_s=_seconds(data, "poll_interval_s", settings.warmup_poll_s),
        timeout_s=_seconds(data, "timeout_s", settings.warmup_timeout_s, MAX_DURATION_S),
    )


# /pooled ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PooledRequest:
    orchestrator_url: str
    worker_id: str
    dtype: str
    poll_interval_s: float
    wait_poll_interval_s: float
    block_hash_timeout_s: float
    session_timeout_s: float
    heartbeat_interval_s: float
    http_timeout_s: float
    retry_attempts: int
    retry_base_s: float
    retry_max_s: float
    result_buffer: int
    final_flush_s: float
    send_empty_results: bool


def pooled_request(data: Mapping[str, Any], settings: Settings) -> PooledRequest:
    """Spec §3.1 (`orchestrator_url` http/https, trailing slash stripped) plus optional overrides of
    every interval (see config.py), a stable `worker_id` (default: a fresh UUID, as the predecessor),
    `dtype` (default float16, as the predecessor's pooled mode) and `send_empty_results` (default
    false: only batches with a valid nonce are posted; true posts every batch like the predecessor)."""
    url = http_url(data, "orchestrator_url")
    worker_id = _text(data, "worker_id", str(uuid.uuid4()))
    send_empty = data.get("send_empty_results", False)
    if not isinstance(send_empty, bool):
        raise FieldError("send_empty_results", f"must be a boolean, got {send_empty!r:.60}")
    retry_attempts = fields.integer(data, "retry_attempts", settings.retry_attempts, minimum=1)
    if retry_attempts > 20:
        raise FieldError("retry_attempts", "must be at most 20")
    result_buffer = fields.integer(data, "result_buffer", settings.result_buffer, minimum=1)
    if result_buffer > 1_000_000:
        raise FieldError("result_buffer", "must be at most 1000000")
    return PooledRequest(
        orchestrator_url=url,
        worker_id=worker_id,
        dtype=fields.dtype(data),
        poll_interval_s=_seconds(data, "poll_interval_s", settings.pooled_poll_s),
        wait_poll_interval_s=_seconds(data, "wait_poll_interval_s", settings.pooled_wait_poll_s),
        block_hash_timeout_s=_seconds(data, "block_hash_timeout_s", settings.pooled_block_hash_timeout_s, MAX_DURATION_S),
        session_timeout_s=_seconds(data, "session_timeout_s", settings.pooled_session_s, MAX_DURATION_S),
        heartbeat_interval_s=_seconds(data, "heartbeat_interval_s", settings.pooled_heartbeat_s),
        http_timeout_s=_seconds(data, "http_timeout_s", settings.http_timeout_s),
        retry_attempts=retry_attempts,
        retry_base_s=_seconds(data, "retry_base_s", settings.retry_base_s),
        retry_max_s=_seconds(data, "retry_max_s", settings.retry_max_s),
        result_buffer=result_buffer,
        final_flush_s=_seconds(data, "final_flush_s", settings.final_flush_s),
        send_empty_results=send_empty,
    )
