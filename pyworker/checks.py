"""Checks in front of the vastai SDK's request handlers, so that a malformed request gets a 4xx that
names its field instead of the SDK's 500 and a traceback in the log.

vastai 1.9.1's handlers (vastai/serverless/server/lib/backend.py) assume what they read: a body that is
a JSON object, an `auth_data` object whose `reqnum` is an integer, a string `session_id`, a number
`cost` on /session/create, and more (docs/upstream.md lists what fails and how). `guard(worker)` puts
a check before every route the SDK serves, the job routes of our handlers and its own /session/*
routes, which refuses what the SDK would fail on with `{"error": "<field>: <why>", "field": "<field>"}`:
413 for a body over `max_body` bytes, 422 (the SDK's status for a bad request) for everything else.
What passes is handed to the SDK's handler unchanged.

A /session/create whose payload names an `on_close_route` is refused: the SDK would POST the
session's `on_close_payload` to that route of the model server when the session ends, and
/session/create checks no signature, so anyone who reaches the PyWorker could send the model server
any request (this worker uses no sessions).
"""

from __future__ import annotations

import json
import math
from typing import Any, Awaitable, Callable

from aiohttp import web

MAX_DEPTH = 64
MAX_INT = 2**63 - 1
MAX_SESSION_LIFETIME_S = 24 * 3600.0
AUTH_FIELDS = {"cost": "cost", "endpoint": str, "reqnum": int, "request_idx": int, "signature": str, "url": str}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refused(Exception):
    def __init__(self, field: str, why: str, status: int = 422):
        super().__init__(f"{field}: {why}")
        self.field = field
        self.status = status


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth_ok(value: Any) -> bool:
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                return False
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return True


def json_object(raw: bytes) -> dict:
    """The body as a JSON object, or Refused naming `body`."""
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise Refused("body", f"nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN, a 5000-digit integer, bad UTF-8
        raise Refused("body", f"not JSON: {str(e)[:120]}") from None
    if not _depth_ok(data):
        raise Refused("body", f"nested more than {MAX_DEPTH} levels deep")
    if not isinstance(data, dict):
        raise Refused("body", f"must be a JSON object, got {type(data).__name__}")
    return data


def _integer(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise Refused(field, f"must be an integer in [0, 2**63-1], got {value!r:.60}")


def _number(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise Refused(field, f"must be a non-negative number, got {value!r:.60}")


def _object(data: dict, field: str) -> dict:
    value = data.get(field)
    if not isinstance(value, dict):
        raise Refused(field, "is required" if value is None else f"must be an object, got {type(value).__name__}")
    return value


def auth_data(data: dict, cost_is_workload: bool = False) -> None:
    """The six AuthData fields the SDK requires, of the types it uses them as."""
    auth = _object(data, "auth_data")
    for name, kind in AUTH_FIELDS.items():
        field = f"auth_data.{name}"
        if name not in auth:
            raise Refused(field, "is required")
        value = auth[name]
        if kind is int:
            _integer(value, field)
        elif kind is str and not isinstance(value, str):
            raise Refused(field, f"must be a string, got {type(value).__name__}")
        elif kind == "cost":  # the SDK declares a string; /session/create adds it to the load as a number
            if cost_is_workload:
                _number(value, field)
            elif not isinstance(value, str):
                _number(value, field)


def _session_id(data: dict, required: bool) -> None:
    value = data.get("session_id")
    if value is None and not required:
        return
    if not isinstance(value, str) or not value:
        raise Refused("session_id", "must be a non-empty string")


def job_request(data: dict) -> None:
    """A request for one of our handlers (the SDK's generic handler): auth_data, payload, session_id."""
    auth_data(data)
    _object(data, "payload")
    _session_id(data, required=False)


def session_create(data: dict) -> None:
    auth_data(data, cost_is_workload=True)
    payload = _object(data, "payload")
    if "lifetime" in payload:
        lifetime = payload["lifetime"]
        _number(lifetime, "payload.lifetime")
        if not 0 < lifetime <= MAX_SESSION_LIFETIME_S:
            raise Refused("payload.lifetime", f"must be in (0, {MAX_SESSION_LIFETIME_S:.0f}] seconds")
    if payload.get("on_close_route") is not None:
        raise Refused("payload.on_close_route", "is not accepted: it would let an unsigned request reach the model "
                                                "server (this worker uses no sessions)", status=403)


def session_lookup(data: dict) -> None:
    """/session/end, /session/get, /session/health."""
    _session_id(data, required=True)


def checked(handler: Handler, check: Callable[[dict], None], max_body: int) -> Handler:
    """`handler` behind `check`: the body read (at most max_body bytes), parsed and checked first."""

    async def run(request: web.Request) -> web.StreamResponse:
        limited = request.clone(client_max_size=max_body)
        try:
            try:
                raw = await limited.read()
            except web.HTTPRequestEntityTooLarge:
                raise Refused("body", f"larger than {max_body} bytes", status=413) from None
            check(json_object(raw))
        except Refused as e:
            return web.json_response({"error": str(e), "field": e.field}, status=e.status)
        return await handler(limited)  # the body read is kept: the SDK's own read returns it

    run.__name__ = getattr(handler, "__name__", "handler")
    return run


def guard(worker, max_body: int) -> None:
    """Put the checks before every route of `worker` (a vastai Worker, before `run`)."""
    worker.routes = [web.route(r.method, r.path, checked(r.handler, job_request, max_body), **r.kwargs)
                     for r in worker.routes]
    backend = worker.backend
    backend.session_create_handler = checked(backend.session_create_handler, session_create, max_body)
    for name in ("session_end_handler", "session_get_handler", "session_health_handler"):
        setattr(backend, name, checked(getattr(backend, name), session_lookup, max_body))
