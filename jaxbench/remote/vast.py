"""The vastai SDK's Serverless client, as `jaxbench remote` uses it (checked against vastai 1.9.1).

`connect(args, connection_limit)` is the one way in for every `remote` command: it reads the
account's key (VAST_API_KEY), Vast's root certificate (`--vast-ca-file`, else the SDK downloads it),
the endpoint (`--endpoint`) and the SDK's URLs (`--autoscaler-url`, `--webserver-url`), and yields a
`Router` on that endpoint.

A request goes in two steps, the two the SDK's own `request()` takes, kept apart so that the client
sees which worker it got before it sends anything: `route()` asks the autoscaler's `/route/` for a
worker (a fresh route each time, polled until a worker is given, as `Endpoint._route` does), then
`open()` posts `{"auth_data", "payload"}` to it and returns its NDJSON stream. The SDK's request
would retry a failing worker itself (the same route, with no bound on a streaming request's wait);
here the caller decides, and bounds the wait itself.

Both send what the SDK sends, through its session (its connection pool, whose idle connections are
kept KEEPALIVE_S, and certificate): `route()` the POST of `Endpoint._route` (its body, the
endpoint's key as `api_key` and bearer token, one attempt of at most 10 s, RuntimeError when it
fails), `open()` that of the streaming `_make_request`. They build the request themselves, its URL
(with the key) and headers made once: the SDK's general-purpose `_make_request` copies every
answer's headers, decodes its body twice, formats the whole answer for a debug log and encodes the
query again at each call (a route and a `/generate` took about a fifth more CPU that way:
docs/benchmarks.md). `open()` reads the stream itself (`Lines`): the SDK's stream yields parsed
objects only, through two generators, and each line printed would be encoded again. The SDK's own
`_route` still answers where it does more: a route while the endpoint's record is due for a refresh,
or with VAST_DEBUG_WORKER_URL set.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import ssl
import sys
import time

from .. import fields
from ..backoff import Backoff

API_KEY_VARIABLE = "VAST_API_KEY"
DEFAULT_CONNECTION_LIMIT = 500  # the SDK's
ROUTE_POLL = Backoff(0.25, 2.0)  # pauses between /route/ calls while no worker is given
DRAIN_S = 1.0  # how long the end of a stream may take after its last line
ROUTE_TIMEOUT_S = 10.0  # the SDK's limit on a /route/ call
REPLAY_TIMEOUT_S = 60.0  # the SDK's replay_timeout of a route
KEEPALIVE_S = 60.0  # how long an idle connection is kept (aiohttp's default: 15 s)


class RemoteError(Exception):
    """The remote command cannot start: Vast is unreachable or refuses the account."""


def add_connection_options(p) -> None:
    """The options every `remote` command takes to reach an endpoint."""
    p.add_argument("--endpoint", required=True, metavar="NAME",
                   help=f"the Serverless endpoint's name (the account's API key comes from {API_KEY_VARIABLE})")
    p.add_argument("--autoscaler-url", default=None, metavar="URL", help="Vast's autoscaler (default: the SDK's, run.vast.ai)")
    p.add_argument("--webserver-url", default=None, metavar="URL", help="Vast's console API (default: the SDK's)")
    p.add_argument("--vast-ca-file", default=None, metavar="FILE",
                   help="Vast's root certificate, read from this file instead of downloaded at each start")


def run_async(main):
    """`asyncio.run(main)`, on uvloop's event loop where uvloop is installed (it is not on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return asyncio.run(main, loop_factory=uvloop.new_event_loop)


def api_key() -> str:
    key = os.environ.get(API_KEY_VARIABLE, "")
    if not key:
        raise fields.FieldError(API_KEY_VARIABLE, "is not set (the API key of the Vast.ai account that owns the "
                                                  "endpoint)")
    return key


def ca_context(ca_file: str) -> ssl.SSLContext:
    """A context that trusts the certificates of `ca_file` beside the system's, as the SDK's
    context trusts the downloaded one."""
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise fields.FieldError("vast_ca_file", f"cannot load certificates from {ca_file!r}: "
                                                f"{getattr(e, 'strerror', None) or e}") from None
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # Vast's root lacks keyCertSign (see the SDK)
    return context


def _import_serverless_client():
    """The SDK's CoroutineServerless, imported without the rest of the SDK. `import vastai` runs the
    package's __init__, which imports all of it (the console API's client with requests, the PyWorker's
    server, pycryptodome through cffi): about 0.15 s of CPU at each start of a client that uses none of it.
    Where vastai is not imported yet, the package is registered without running its __init__, which
    then runs at the package's first attribute lookup (`vastai.X`, `from vastai import X`); its
    submodules import as usual."""
    if "vastai" not in sys.modules:
        spec = importlib.util.find_spec("vastai")
        if spec is not None and spec.loader is not None and spec.submodule_search_locations is not None:
            package = importlib.util.module_from_spec(spec)

            def initialise(name: str):
                del package.__getattr__
                spec.loader.exec_module(package)
                return getattr(package, name)

            package.__getattr__ = initialise
            sys.modules["vastai"] = package
    from vastai.serverless.client.client import CoroutineServerless

    return CoroutineServerless


def client(api_key: str, args, ca: ssl.SSLContext | None, connection_limit: int = DEFAULT_CONNECTION_LIMIT):
    """The SDK's async client for the options of `add_connection_options`; given a context that
    trusts Vast's root certificate, it uses that one instead of downloading the certificate."""
    CoroutineServerless = _import_serverless_client()

    class Client(CoroutineServerless):
        async def get_ssl_context(self) -> ssl.SSLContext:
            return ca or await super().get_ssl_context()

        async def _get_session(self):
            """The SDK's session, its connections kept KEEPALIVE_S while idle: a search comes back
            to the autoscaler and to each worker in waves tens of seconds apart, and a new connection
            costs a TLS handshake."""
            import aiohttp

            if self._session is None or self._session.closed:
                connector = aiohttp.TCPConnector(limit=self.connection_limit, ssl=await self.get_ssl_context(),
                                                 keepalive_timeout=KEEPALIVE_S)
                self._session = aiohttp.ClientSession(connector=connector)
            return self._session

    urls = {k: v for k, v in (("autoscaler_url", args.autoscaler_url), ("webserver_url", args.webserver_url)) if v}
    return Client(api_key, connection_limit=max(DEFAULT_CONNECTION_LIMIT, connection_limit), **urls)


def check_options(args) -> tuple[str, ssl.SSLContext | None]:
    """The key and the certificate context, checked before anything is sent (FieldError if bad)."""
    ca = None if args.vast_ca_file is None else ca_context(args.vast_ca_file)
    return api_key(), ca


@contextlib.asynccontextmanager
async def connect(args, connection_limit: int = DEFAULT_CONNECTION_LIMIT, checked=None):
    """A `Router` on `--endpoint`; `checked`: what `check_options(args)` returned, if it ran."""
    key, ca = checked or check_options(args)
    async with client(key, args, ca, connection_limit) as c:
        try:
            endpoints = await c.get_endpoints()
        except Exception as e:  # noqa: BLE001 — the SDK raises plain exceptions
            raise RemoteError(f"cannot list the account's endpoints: {e}") from None
        for endpoint in endpoints:
            if endpoint.name == args.endpoint:
                yield Router(c, endpoint)
                return
        names = ", ".join(sorted(e.name for e in endpoints)) or "none"
        raise fields.FieldError("endpoint", f"no endpoint named {args.endpoint!r} in this account (it has: {names})")


class Router:
    """One endpoint's workers, through the SDK's session: `route()` then `open()`."""

    def __init__(self, client, endpoint):
        import aiohttp
        from vastai.utils import VERSION

        self.client = client
        self.endpoint = endpoint
        self._user_agent = f"vastai-sdk/{VERSION}"
        self._route_timeout = aiohttp.ClientTimeout(total=ROUTE_TIMEOUT_S)
        self._stream_timeout = aiohttp.ClientTimeout(total=None)
        self._key = None
        self._keyed()
        self._debug_worker = bool(os.environ.get("VAST_DEBUG_WORKER_URL"))  # the SDK's own route then answers

    def _keyed(self) -> None:
        """The headers and URLs made with the endpoint's key, made again if a refresh changed it."""
        key = self._key = self.endpoint.api_key
        self._headers = {"Authorization": f"Bearer {key}", "User-Agent": self._user_agent,
                         "Content-Type": "application/json"}
        self._route_url = _with_key(self.client.autoscaler_url + "/route/", key)
        self._worker_urls: dict[str, object] = {}  # a worker's url + route → that URL with the key

    async def route(self, cost: float) -> dict:
        """A worker for a request of `cost` (its workload for the autoscaler): the route's answer,
        its url and what the worker needs to check that the autoscaler sent the request
        (auth_data). Polls while the autoscaler has none ready; the caller bounds the wait."""
        answer = await self._route(cost, 0)
        polls = 0
        while "url" not in answer:
            polls += 1
            await asyncio.sleep(ROUTE_POLL.pause(polls))
            answer = await self._route(cost, answer.get("request_idx", 0))
        return answer

    async def _route(self, cost: float, request_idx: int) -> dict:
        """One /route/ call, as `Endpoint._route` makes it: its answer's body."""
        endpoint = self.endpoint
        refresh_due = time.time() > endpoint.last_refresh + endpoint.soft_refresh_threshold
        if refresh_due or self._debug_worker:
            return (await endpoint._route(cost=cost, req_idx=request_idx, timeout=REPLAY_TIMEOUT_S)).body
        if endpoint.api_key != self._key:
            self._keyed()
        body = {"endpoint": endpoint.name, "api_key": self._key, "cost": cost, "request_idx": request_idx,
                "replay_timeout": REPLAY_TIMEOUT_S}
        session = await self.client._get_session()
        try:
            async with session.post(self._route_url, data=json.dumps(body).encode(), headers=self._headers,
                                    ssl=await self.client.get_ssl_context(), timeout=self._route_timeout) as response:
                raw = await response.read()
                status = response.status
        except Exception as e:  # noqa: BLE001 — as the SDK reports a failed call
            raise RuntimeError(f"Failed to route endpoint: {e}") from e
        if not 200 <= status < 300:
            raise RuntimeError(f"Failed to route endpoint: HTTP {status} - {raw.decode(errors='replace')[:512]}")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RuntimeError(f"Failed to route endpoint: invalid JSON: {raw[:512]!r}") from None
        return answer if isinstance(answer, dict) else {}

    async def open(self, auth_data: dict, route: str, payload: dict) -> dict:
        """Post the request to the routed worker. Returns `ok`, `status`, and `stream` (`Lines`) or
        the error's `json`/`text`, as the SDK's result does. Raises the connection's errors (the
        worker is unreachable or went away)."""
        if self.endpoint.api_key != self._key:
            self._keyed()
        target = auth_data["url"] + route
        url = self._worker_urls.get(target)
        if url is None:
            url = self._worker_urls[target] = _with_key(target, self._key)
        session = await self.client._get_session()
        response = await session.post(url, data=json.dumps({"auth_data": auth_data, "session_id": None,
                                                             "payload": payload}).encode(),
                                      headers=self._headers, ssl=await self.client.get_ssl_context(),
                                      timeout=self._stream_timeout)
        if 200 <= response.status < 300:
            return {"ok": True, "status": response.status, "stream": Lines(response)}
        try:
            text = await response.text()
        finally:
            response.release()
        answer = {"ok": False, "status": response.status, "text": text, "json": None}
        if text.lstrip().startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                answer["json"] = json.loads(text)
        return answer

    @staticmethod
    async def drain(stream) -> None:
        """Read a finished stream to its end, so that its connection carries the next request (aiohttp
        drops a connection closed before its response's end, and the next request opens one)."""
        try:
            async with asyncio.timeout(DRAIN_S):
                async for _ in stream:
                    pass
        except Exception:  # noqa: BLE001 — whatever it was, the request is done
            pass


def _with_key(url: str, key: str):
    """`url` with the key as its `api_key` query parameter, as aiohttp builds it from the SDK's `params`."""
    from yarl import URL

    return URL(url).extend_query(api_key=key)


class Lines:
    """A worker's NDJSON stream: its lines as (text, object) pairs. As the SDK's stream does, it passes
    over blank lines and lines that are not JSON (stream.py's checks see what they lost), and takes
    an SSE `data:` line's data."""

    def __init__(self, response):
        self.response = response
        self._partial: bytes | None = b""  # the start of a line not yet ended; None at the end
        self._ready: collections.deque[tuple[str, object]] = collections.deque()

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[str, object]:
        while not self._ready:
            if self._partial is None:
                raise StopAsyncIteration
            chunk = await self.response.content.readany()
            if chunk:
                *lines, self._partial = (self._partial + chunk).split(b"\n")
            else:
                lines, self._partial = [self._partial], None
            for raw in lines:
                raw = raw.strip()
                if raw.startswith(b"data:"):
                    raw = raw[5:].strip()
                if raw:
                    try:
                        text = raw.decode()
                        self._ready.append((text, json.loads(text)))
                    except ValueError:
                        pass
        return self._ready.popleft()

    async def aclose(self) -> None:
        self.response.release()
