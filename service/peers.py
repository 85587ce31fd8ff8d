"""Calls to the peers a request names: the warmup callback and the orchestrator.

Every call has one total deadline (connecting, sending, the answer's headers and its whole body
together: a peer that trickles a byte a second cannot hold a job), reads at most `max_bytes` of
answer, parses it with `requests.parse_json` (the checks a request body gets), and can be abandoned
at once when the job stops. A call never raises for anything the peer does; it returns an `Answer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx

from jaxbench.backoff import Backoff

from . import requests as rq

# What httpx raises for a call that could not be made or completed (InvalidURL and StreamError are
# not HTTPErrors).
_CALL_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, UnicodeError)


@dataclasses.dataclass
class Answer:
    status: int | None = None  # None: no HTTP answer
    data: Any = None  # the parsed JSON of a 2xx answer
    problem: str | None = None  # why the answer is not usable
    stopped: bool = False  # abandoned because the job stopped

    @property
    def delivered(self) -> bool:
        """The peer accepted the call (2xx), whatever its answer says."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def ok(self) -> bool:
        return self.problem is None and self.delivered

    def json_object(self) -> dict | None:
        return self.data if self.ok and isinstance(self.data, dict) else None

    def describe(self) -> str:
        return self.problem or f"HTTP {self.status}"


def client() -> httpx.AsyncClient:
    """The client of every call to a peer. No timeouts of its own: `call` gives each call one total
    deadline (httpx's are per read, which a trickling peer never trips)."""
    return httpx.AsyncClient(timeout=None, follow_redirects=False, trust_env=False)


async def _exchange(http: httpx.AsyncClient, method: str, url: str, body: Any, params: dict | None,
                    max_bytes: int, parse: bool) -> Answer:
    try:
        async with http.stream(method, url, json=body, params=params) as r:
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    return Answer(r.status_code, problem=f"answer larger than {max_bytes} bytes")
                chunks.append(chunk)
    except _CALL_ERRORS as e:
        return Answer(problem=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    if not parse or not 200 <= r.status_code < 300:
        return Answer(r.status_code)
    try:
        return Answer(r.status_code, rq.parse_json(b"".join(chunks)))
    except rq.FieldError as e:
        return Answer(r.status_code, problem=f"unusable answer: {e}")


async def call(http: httpx.AsyncClient, method: str, url: str, *, timeout: float, max_bytes: int,
               json: Any = None, params: dict | None = None, stop: asyncio.Event | None = None,
               parse: bool = True) -> Answer:
    """One call, over within `timeout` seconds in all; with `stop`, abandoned as soon as it is set.
    `parse`: the answer's body is JSON to use (else it is read, bounded, and dropped)."""
    if timeout <= 0:
        return Answer(problem="no time left for the call")
    if stop is not None and stop.is_set():
        return Answer(problem="the job stopped", stopped=True)
    exchange = asyncio.ensure_future(asyncio.wait_for(_exchange(http, method, url, json, params, max_bytes, parse), timeout))
    waits = {exchange}
    stopper = None
    if stop is not None:
        stopper = asyncio.ensure_future(stop.wait())
        waits.add(stopper)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopper is not None:
            stopper.cancel()
        if not exchange.done():
            exchange.cancel()
    if not exchange.done() or exchange.cancelled():
        return Answer(problem="the job stopped", stopped=True)
    try:
        return exchange.result()
    except asyncio.TimeoutError:
        return Answer(problem=f"no complete answer within {timeout:.3g} s")


class Budget:
    """A deadline shared by several calls and the pauses between them (None: no deadline)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self, cap: float) -> float:
        if self.deadline is None:
            return cap
        return max(0.0, min(cap, self.deadline - time.monotonic()))

    def retry_pause(self, backoff: Backoff, failures: int, attempts: int) -> float | None:
        """The pause after `failures` failed attempts of `attempts` (the backoff's); None when no
        attempt is left or the pause and a moment for the next attempt would not fit."""
        pause = backoff.pause(failures)
        if failures >= attempts or self.left(pause + 0.1) <= pause:
            return None
        return pause
