"""Request bodies: parsed and checked field by field before any work starts.

Every problem raises `jaxbench.fields.FieldError(field, message)`; the routes answer it with
HTTP 400 `{"error": "<field>: <message>", "field": "<field>"}`. Unknown top-level keys of a
/generate body are ignored, as the predecessor ignored them and its callers may send more than it
read, but not silently: they are logged and named in the summary (`ignored_fields`, docs/protocol.md
§1.1); unknown or inconsistent `params` keys are errors. The config fields of the orchestrator's answers (/pooled)
are checked here too, but a bad one is ignored rather than refused (`copy_orchestrator_config`).

Every JSON document that reaches the server (request bodies, and the answers of the warmup callback
and the orchestrator) goes through `parse_json`, which refuses, naming the field (dotted path of
object keys; "body" when the text is no JSON document at all):
* text that is not JSON, not UTF-8, or nested deeper than the parser can go;
* values nested more than MAX_JSON_DEPTH levels;
* integers beyond ±MAX_INT (JSON allows any length; Python refuses to convert more than 4300 digits);
* NaN, Infinity, -Infinity and numbers that overflow a float (1e400);
* strings or keys with lone surrogates ("\\ud800"), which are not text and cannot be encoded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import uuid
from typing import Any, Mapping
from urllib.parse import urlsplit

import httpx

from jaxbench import fields
from jaxbench.backoff import Backoff
from jaxbench.job import SearchJob
from jaxbench.nonces import NonceSchedule
from jaxbench.params import Params
from jaxbench.screen import ScreenCounts, ScreenedSearch, describe as screen_fields

from .config import Settings

FieldError = fields.FieldError
log = logging.getLogger("service")

MAX_DURATION_S = 7 * 24 * 3600.0
MAX_INTERVAL_S = 3600.0
MAX_HTTP_TIMEOUT_S = 300.0
MAX_JSON_DEPTH = 32
MAX_INT = 2**63 - 1  # nonces, heights and counts are int64 on the network
MAX_URL_LENGTH = 2048
WORKER_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")  # URL-unreserved: the same in a path and in a body
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Refused:
    """A JSON value the parser met but that is not accepted (kept so the walk can name its field)."""

    def __init__(self, message: str):
        self.message = message


def _parse_int(text: str):
    digits = len(text.lstrip("-"))
    if digits > 19 or abs(int(text)) > MAX_INT:
        return _Refused(f"must be an integer of magnitude at most 2**63-1, got {text[:24]}{'…' if len(text) > 24 else ''}")
    return int(text)


def _parse_constant(name: str):
    return _Refused(f"must be a finite number, got {name}")


def field_name(path: tuple) -> str:
    """The dotted path of object keys, printable and short (keys come from the sender)."""
    if not path:
        return "body"
    text = ".".join(k.encode("utf-8", "backslashreplace").decode("utf-8") for k in path)
    return text if len(text) <= 128 else text[:127] + "…"


def _walk(value: Any, path: tuple = ()) -> None:
    stack = [(value, path, 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, _Refused):
            raise FieldError(field_name(path), value.message)
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldError(field_name(path), "must be a finite number (it overflows a float)")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise FieldError(field_name(path), "must be valid Unicode text (no lone surrogates)") from None
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise FieldError(field_name(path), f"must not be nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(value, list):
                stack.extend((v, path, depth + 1) for v in value)
                continue
            for k, v in value.items():
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    raise FieldError(field_name(path + (k,)), "keys must be valid Unicode text") from None
                stack.append((v, path + (k,), depth + 1))


def _loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw, parse_int=_parse_int, parse_constant=_parse_constant)
    except RecursionError:
        raise FieldError("body", "Invalid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise FieldError("body", f"Invalid JSON: {e}") from None


def parse_json(raw: bytes | str) -> Any:
    """A JSON document, refused (FieldError) as the module docstring says."""
    data = _loads(raw)
    _walk(data)
    return data


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; `{"payload": {...}}` is unwrapped (the Vast wrapper), and
    only what is used is checked: the fields are named as in the payload."""
    data = _loads(raw or b"null")
    if isinstance(data, dict) and "payload" in data:
        data = data["payload"]
        if not isinstance(data, dict):
            _walk(data, ("payload",))
            raise FieldError("payload", f"must be a JSON object, got {_type(data)}")
    if not isinstance(data, dict):
        _walk(data)
        raise FieldError("body", f"must be a JSON object, got {_type(data)}")
    _walk(data)
    return data


def _type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _optional(data: Mapping[str, Any], name: str) -> bool:
    return data.get(name) is not None


def _seconds(data: Mapping[str, Any], name: str, default: float, maximum: float = MAX_INTERVAL_S) -> float:
    value = fields.number(data, name, default)
    if value > maximum:
        raise FieldError(name, f"must be at most {maximum:g} seconds, got {value:g}")
    return value


def label(data: Mapping[str, Any], name: str, default: str, max_len: int = 256) -> str:
    """A name the server logs and sends back (job_id): printable text, no control characters."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > max_len:
        raise FieldError(name, f"must be a string of at most {max_len} characters")
    if _CONTROL.search(value):
        raise FieldError(name, "must not contain control characters (CR, LF, NUL, …)")
    return value


def worker_id(data: Mapping[str, Any], name: str = "worker_id") -> str:
    """The orchestrator's name for this worker; it goes into URL paths, so only URL-unreserved
    characters (letters, digits, `.`, `_`, `~`, `-`) are accepted and nothing needs quoting."""
    value = data.get(name)
    if value is None:
        return str(uuid.uuid4())
    if not isinstance(value, str) or not WORKER_ID.fullmatch(value):
        raise FieldError(name, "must be 1 to 128 characters from A-Z a-z 0-9 . _ ~ -")
    return value


def http_url(data: Mapping[str, Any], name: str) -> str:
    """An http(s) base URL without trailing slashes (so `base + "/path"` is right). Its text is
    never echoed: a refused URL might carry a secret."""
    value = data.get(name)
    if value is None or value == "":
        raise FieldError(name, "is required")
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH:
        raise FieldError(name, f"must be a URL string of at most {MAX_URL_LENGTH} characters")
    if _CONTROL.search(value) or any(c.isspace() for c in value):
        raise FieldError(name, "must not contain spaces or control characters (CR, LF, NUL, …)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 — raises on a malformed port
        httpx.URL(value)
    except (ValueError, httpx.InvalidURL):
        raise FieldError(name, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FieldError(name, "must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise FieldError(name, "must not carry credentials (user:password@); they would be sent and shown in clear")
    if "?" in value or "#" in value:  # a query or fragment, empty ones too
        raise FieldError(name, "must not have a query or fragment")
    return value.rstrip("/")


def url_origin(url: str) -> str:
    """scheme://host[:port] of a checked URL: what /health shows of it (a path may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclasses.dataclass(frozen=True)
class Screen:
    """A request's `screen` and `screen_margin`: every search of its job runs through
    jaxbench.screen.ScreenedSearch."""

    products: str
    margin: float

    def check(self, engine) -> None:
        """FieldError naming `screen` where the engine's devices cannot run it."""
        ScreenedSearch.check(engine, self.products)

    def search(self, engine, sjob: SearchJob, counts: ScreenCounts) -> ScreenedSearch:
        return ScreenedSearch(engine, sjob, self.margin, self.products, counts)

    def describe(self) -> dict:
        return screen_fields(self.products, self.margin)


def screen(data: Mapping[str, Any]) -> Screen | None:
    """The optional `screen` ("fp8") and `screen_margin` (default jaxbench.fields.DEFAULT_SCREEN_MARGIN)."""
    products, margin = fields.screen(data)
    return None if products is None else Screen(products, margin)


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
    screen: Screen | None
    ignored_fields: tuple[str, ...] = ()  # top-level keys the protocol does not define

    def search_job(self) -> SearchJob:
        schedule = NonceSchedule.for_node(self.start_nonce, self.node_id, self.n_nodes, limit=self.max_nonces)
        return SearchJob(self.params, self.block_hash, self.public_key, self.r_target, schedule, self.dtype,
                         self.duration_s)


GENERATE_FIELDS = frozenset({
    "block_hash", "block_height", "public_key", "r_target", "batch_size", "start_nonce", "params",  # the predecessor's
    "max_nonces", "duration_s", "dtype", "node_id", "n_nodes", "screen", "screen_margin",  # jaxbench's
})


def generate_request(data: Mapping[str, Any], settings: Settings, default_max_nonces: int | None = None,
                     route: str = "/generate", also_known: frozenset[str] = frozenset()) -> GenerateRequest:
    """docs/protocol.md §1.1 fields, all required and type/range-checked, plus the optional extensions
    `max_nonces`, `duration_s` (default MODEL_DURATION_S = 420), `dtype` (default float16),
    `node_id`/`n_nodes` (default 0 of 1: the schedule of docs/algorithm.md §7) and `screen`/`screen_margin`.
    Other top-level keys (but `also_known`, the route's own) are ignored, with one log line naming them."""
    search = fields.search_fields(data)
    batch_size = fields.integer(data, "batch_size", minimum=1)
    node_id, n_nodes = fields.node(data, search["start_nonce"])
    if search["max_nonces"] is None:
        search["max_nonces"] = default_max_nonces
    duration_s = _seconds(data, "duration_s", settings.duration_s, MAX_DURATION_S)
    ignored = tuple(sorted(set(data) - GENERATE_FIELDS - also_known))
    if ignored:
        log.warning("%s: ignoring field(s) the protocol does not define: %s", route, ", ".join(ignored))
    return GenerateRequest(**search, batch_size=batch_size, node_id=node_id, n_nodes=n_nodes, duration_s=duration_s,
                           screen=screen(data), ignored_fields=ignored)


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
    http_timeout_s: float


def warmup_request(data: Mapping[str, Any], settings: Settings) -> WarmupRequest:
    """docs/protocol.md §2.1 (`callback_url` http/https, `job_id` default "unknown") plus optional `params`
    (preset or object: compile now), `block_hash` (build those weights now), `dtype`,
    `poll_interval_s` (MODEL_WARMUP_POLL_S), `timeout_s` (MODEL_WARMUP_TIMEOUT_S) and
    `http_timeout_s` (MODEL_HTTP_TIMEOUT_S: the whole of one call to the callback)."""
    callback_url = http_url(data, "callback_url")
    job_id = label(data, "job_id", "unknown")
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
        http_timeout_s=_seconds(data, "http_timeout_s", settings.http_timeout_s, MAX_HTTP_TIMEOUT_S),
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
    peer_grace_s: float
    send_empty_results: bool
    screen: Screen | None

    @property
    def backoff(self) -> Backoff:
        """The pauses between the attempts of a retried orchestrator call and of result posts."""
        return Backoff(self.retry_base_s, self.retry_max_s)


def pooled_request(data: Mapping[str, Any], settings: Settings) -> PooledRequest:
    """docs/protocol.md §3.1 (`orchestrator_url` http/https, trailing slash stripped) plus optional overrides of
    every interval (see config.py), a stable `worker_id` (default: a fresh UUID, as the predecessor),
    `dtype` (default float16, as the predecessor's pooled mode), `peer_grace_s` (how long the
    orchestrator may fail every call before the session ends), `send_empty_results` (default
    false: only batches with a valid nonce are posted; true posts every batch like the predecessor)
    and `screen`/`screen_margin` (every part of the range searched through the screen)."""
    url = http_url(data, "orchestrator_url")
    worker = worker_id(data)
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
        worker_id=worker,
        dtype=fields.dtype(data),
        poll_interval_s=_seconds(data, "poll_interval_s", settings.pooled_poll_s),
        wait_poll_interval_s=_seconds(data, "wait_poll_interval_s", settings.pooled_wait_poll_s),
        block_hash_timeout_s=_seconds(data, "block_hash_timeout_s", settings.pooled_block_hash_timeout_s, MAX_DURATION_S),
        session_timeout_s=_seconds(data, "session_timeout_s", settings.pooled_session_s, MAX_DURATION_S),
        heartbeat_interval_s=_seconds(data, "heartbeat_interval_s", settings.pooled_heartbeat_s),
        http_timeout_s=_seconds(data, "http_timeout_s", settings.http_timeout_s, MAX_HTTP_TIMEOUT_S),
        retry_attempts=retry_attempts,
        retry_base_s=_seconds(data, "retry_base_s", settings.retry_base_s),
        retry_max_s=_seconds(data, "retry_max_s", settings.retry_max_s),
        result_buffer=result_buffer,
        final_flush_s=_seconds(data, "final_flush_s", settings.final_flush_s),
        peer_grace_s=_seconds(data, "peer_grace_s", settings.pooled_peer_grace_s),
        send_empty_results=send_empty,
        screen=screen(data),
    )


# /pooled: the config fields of the orchestrator's answers -----------------------------------------

# The config fields an orchestrator answer may carry, and their values before any answer (or when null).
ORCHESTRATOR_CONFIG = {"block_hash": "", "block_height": 0, "r_target": 0.0, "params": {}, "public_key": "",
                       "nonce_range_start": 0, "nonce_range_end": 0}


def orchestrator_value_ok(name: str, value: Any) -> bool:
    """Whether a config value from the orchestrator may be used: seeds are text of the request limits,
    `params` a preset name or an object (checked in full with `fields.params` when used), the rest
    non-negative numbers (`r_target` any, the heights and nonces integers). `parse_json` has already
    refused non-finite numbers and huge integers."""
    if name in ("block_hash", "public_key"):
        return isinstance(value, str) and len(value) <= fields.MAX_SEED_TEXT
    if name == "params":
        return isinstance(value, (dict, str))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return False
    return name == "r_target" or isinstance(value, int)


def copy_orchestrator_config(config: dict[str, Any], answer: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Copy the config fields present in an orchestrator answer into `config`, as the predecessor did
    (null means the default); returns the (name, value) pairs ignored for a wrong type or range."""
    ignored = []
    for name, default in ORCHESTRATOR_CONFIG.items():
        if name not in answer:
            continue
        value = default if answer[name] is None else answer[name]
        if orchestrator_value_ok(name, value):
            config[name] = value
        else:
            ignored.append((name, value))
    return ignored
