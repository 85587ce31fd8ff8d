"""What stands between the network and the app: HTTP/1.1 only, request heads checked before h11
parses them, a bounded set of connections, and connections that always end.

hypercorn 0.18 parses HTTP/1.1 with h11 and has no settings for any of the following, so `install`
puts two subclasses in the places hypercorn takes its classes from: `GuardedH11Protocol` (for
`hypercorn.protocol.H11Protocol`, every connection's HTTP/1.1 protocol) and `Connection` (for
`hypercorn.asyncio.run.TCPServer`, every accepted socket). tests/test_transport.py fails if a
hypercorn release stops using either.

HTTP
* HTTP/1.1 and HTTP/1.0 only. The PyWorker, the only intended client, speaks HTTP/1.1. A request
  line of another version, the HTTP/2 preface (`PRI * HTTP/2.0`) among them, is answered 505 and the
  connection closed; an `Upgrade: h2c` header is ignored (the request is answered in HTTP/1.1).
* A request head (request line and headers) goes through `RequestGuard` before h11 sees it: empty
  lines before the request line are skipped (RFC 9112 §2.2); a head longer than `max_head` bytes
  (16 KiB) is answered 431, or 414 when the request line alone is, however many reads it arrived
  in; a Content-Length written with leading zeros is read as its number.
* After a request that closes its connection (`Connection: close`, or HTTP/1.0 without
  keep-alive), whatever else arrived on the connection is ignored (RFC 9112 §9.6), never answered.
* Every refusal at this level has a JSON body `{"error": "<field>: <why>", "field": "<field>"}`,
  the field being `request_line`, `headers`, `body`, `http_version` or `connection`. A malformed
  chunk-size line is answered 400 once its line ends; one that never ends is answered by the app's
  body timeout (408).

Connections (`Connections`, one per server)
* At most `max_connections` at once. A connection beyond that closes the oldest one that is not
  being answered (idle, still sending its request, or closed by its peer: hypercorn keeps those
  until its idle timer ends); when every connection is being answered, the newcomer gets 503
  (`field: connection`) and is closed. Connections without a request in progress close after
  hypercorn's `keep_alive_timeout`. What was closed or refused is logged once per LIMIT_REPORT_S.
* A connection whose peer has read none of the answer waiting for it for `stall_s` is aborted,
  and the log says so: the app sees its client leave (a job stops as if the client had gone).
  Its kernel send buffer is SEND_BUFFER_BYTES, so what a client that stops reading holds is small.
* `abort_all` ends every connection at once: the end of the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import re
import resource
import socket
import time

import h11
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.utils import parse_socket_addr

log = logging.getLogger("service.transport")

MAX_HEAD_BYTES = 16 * 1024
LIMIT_REPORT_S = 10.0  # at most one log line per this long about closed or refused connections
WATCH_INTERVAL_S = 0.5
# Descriptors the process needs besides its client connections (JAX and XLA, the log, calls to
# peers, the compile cache) and sockets accepted in one pass of the event loop before the limit
# closes them (hypercorn's listen backlog).
RESERVED_DESCRIPTORS = 256
ACCEPT_BURST = 100
# The kernel's send buffer of a client connection (Linux doubles it): enough for any answer's pace
# on the host, and what a client that stops reading can leave in the kernel's memory (without it
# Linux lets each grow to megabytes).
SEND_BUFFER_BYTES = 128 * 1024

_HEAD_END = re.compile(rb"\n\r?\n")
_LEADING_ZEROS = re.compile(rb"(?im)^(content-length[ \t]*:[ \t]*)0+(?=[0-9])")
_VERSION = re.compile(rb" HTTP/([0-9]\.[0-9])$")


def refusal_body(field: str, message: str) -> bytes:
    return json.dumps({"error": f"{field}: {message}", "field": field}).encode()


class RequestGuard:
    """An h11 server connection whose request heads are checked (module docstring) before h11 parses
    them. It offers what hypercorn's H11Protocol uses of an `h11.Connection`."""

    def __init__(self, max_head: int = MAX_HEAD_BYTES):
        self.max_head = max_head
        self._h11 = self._fresh()
        self._head = bytearray()  # the beginning of a request head, held until it is complete
        self._head_passed = False  # this cycle's head has gone to h11
        self._scanned = 0  # bytes of _head already searched for the head's end
        self._line_end = -1  # where the request line ends in _head, once seen
        self._refusal: tuple[int, str, str] | None = None  # (status, field, why) decided here
        self.problem: tuple[str, str] = ("request_line", "malformed request")  # (field, why) of the last refusal
        self.request: str | None = None  # "METHOD target" of the last request, for log lines

    def _fresh(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)

    # What hypercorn reads and calls ----------------------------------------------------------

    @property
    def our_state(self):
        return self._h11.our_state

    @property
    def their_state(self):
        return self._h11.their_state

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self._h11.they_are_waiting_for_100_continue

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return bytes(self._head) + self._h11.trailing_data[0], self._h11.trailing_data[1]

    def send(self, event):
        return self._h11.send(event)

    def receive_data(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        if self._head_passed:
            self._h11.receive_data(data)
        elif not data:  # the peer closed before a whole head: h11 sees the end and nothing of the head
            self._h11.receive_data(b"")
        else:
            self._head += data
            self._take_head()

    def next_event(self):
        if self._refusal is not None:
            status, field, why = self._refusal
            self.problem = (field, why)
            raise h11.RemoteProtocolError(why, error_status_hint=status)
        if not self._head_passed:  # nothing, or the peer's end: h11 has no part of a head
            return self._h11.next_event()
        if self._h11.their_state is h11.MUST_CLOSE:  # the last request of this connection was read
            return h11.NEED_DATA
        state = self._h11.their_state
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as e:
            why = (str(e) or "malformed request")[:200]
            if state is h11.SEND_BODY:
                self.problem = ("body", why)
            else:
                self.problem = ("request_line" if "request line" in why else "headers", why)
            raise
        if isinstance(event, h11.Request):
            self.request = f"{event.method.decode('ascii', 'replace')} {event.target.decode('ascii', 'replace')[:200]}"
        return event

    def start_next_cycle(self) -> None:
        leftover, closed = self._h11.trailing_data
        self._h11.start_next_cycle()  # raises unless both sides are done, as h11 does
        self._h11 = self._fresh()  # what the peer sent after the last request goes through the checks too
        self._head_passed = False
        if leftover:
            self.receive_data(leftover)
        if closed:
            self.receive_data(b"")

    # The checks ------------------------------------------------------------------------------

    def _take_head(self) -> None:
        head = self._head
        if not self._scanned:  # the head's first bytes: empty lines before a request line are skipped
            blank = 0
            while blank < len(head) and head[blank] in b"\r\n":
                blank += 1
            del head[:blank]
        # Only what arrived since the last look is searched (a head trickled byte by byte costs O(n)).
        end = _HEAD_END.search(head, max(0, self._scanned - 2))
        if self._line_end < 0:
            self._line_end = head.find(b"\n", max(0, self._scanned - 1))
        self._scanned = len(head)
        line_end = self._line_end
        if line_end < 0 and len(head) > self.max_head or line_end > self.max_head:
            self._refuse(414, "request_line", f"the request line is longer than {self.max_head} bytes")
            return
        if end is None:
            if len(head) > self.max_head:
                self._refuse(431, "headers", f"the request line and headers are longer than {self.max_head} bytes")
            return
        if end.end() > self.max_head:
            self._refuse(431, "headers", f"the request line and headers are longer than {self.max_head} bytes")
            return
        version = _VERSION.search(bytes(head[:line_end]).rstrip(b"\r"))
        if version and version.group(1) not in (b"1.0", b"1.1"):  # the HTTP/2 preface too
            self._refuse(505, "http_version", f"HTTP/{version.group(1).decode()} is not served here: send HTTP/1.1")
            return
        data = _LEADING_ZEROS.sub(rb"\1", bytes(head[:end.end()])) + bytes(head[end.end():])
        head.clear()
        self._scanned, self._line_end = 0, -1
        self._head_passed = True
        self._h11.receive_data(data)

    def _refuse(self, status: int, field: str, why: str) -> None:
        self._refusal = (status, field, why)
        self._head.clear()


class GuardedH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with a RequestGuard for its h11 connection, no switch to
    HTTP/2, and refusals that say what was wrong."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connection = RequestGuard(self.config.h11_max_incomplete_size)

    async def _check_protocol(self, event) -> None:
        """Never HTTP/2: `Upgrade: h2c` is ignored; the preface never reaches h11 (RequestGuard)."""

    async def _send_error_response(self, status_code: int) -> None:
        field, why = self.connection.problem
        body = refusal_body(field, why)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *self.config.response_headers("h11")]
        try:
            reason = http.HTTPStatus(status_code).phrase.encode()
        except ValueError:
            reason = b""
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers, reason=reason))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class Connection(TCPServer):
    """hypercorn's handler of one accepted socket, admitted by (and watched from) the Connections
    that `install` made."""

    async def run(self) -> None:
        connections = _connections
        if connections is None:  # not installed: hypercorn's own behaviour
            await super().run()
            return
        self.opened = time.monotonic()
        self.progress_at = self.opened  # the last moment the peer was seen reading (or nothing waited)
        self.written = 0  # bytes hypercorn gave the transport
        self.sent = 0  # of which the kernel had taken this many at the last look
        sock = self.writer.get_extra_info("socket")
        try:
            self.peer = parse_socket_addr(sock.family, self.writer.get_extra_info("peername"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except (AttributeError, OSError, TypeError, ValueError):
            self.peer = None
        if not connections.admit(self):
            return
        try:
            await super().run()
        finally:
            connections.remove(self)

    async def protocol_send(self, event) -> None:
        if isinstance(event, RawData):
            if self.transport.is_closing():  # aborted (a stalled reader, room made, the drain's end)
                await self.protocol.handle(Closed())
                return
            self.written += len(event.data)
        await super().protocol_send(event)

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.writer.transport

    def answering(self) -> bool:
        """Its request is in and its answer not yet out (a stream, a long /benchmark, an answer
        waiting in the buffer for its client): the one kind of connection the limit never closes.
        Idle ones, ones still sending their request and ones the peer has closed are not."""
        if self.transport.get_write_buffer_size():
            return True
        guard = getattr(getattr(getattr(self, "protocol", None), "protocol", None), "connection", None)
        if not isinstance(guard, RequestGuard):
            return False
        return (guard.their_state in (h11.DONE, h11.MUST_CLOSE)
                and guard.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY, h11.DONE))

    def describe(self) -> str:
        peer = f"{self.peer[0]}:{self.peer[1]}" if self.peer else "an unknown peer"
        guard = getattr(getattr(getattr(self, "protocol", None), "protocol", None), "connection", None)
        request = getattr(guard, "request", None)
        return f"{peer} ({request})" if request else peer

    def abort(self) -> None:
        """Close now, dropping whatever was not sent (a close would wait for the peer to read it)."""
        self.transport.abort()


def descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (at most 65536); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    wanted = min(wanted, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):
            pass
    return 65536 if soft == resource.RLIM_INFINITY else soft


def connection_limit(wanted: int) -> int:
    """`wanted` connections, fewer where the descriptor limit would not leave room for the rest."""
    room = descriptor_limit() - RESERVED_DESCRIPTORS - ACCEPT_BURST
    if room < wanted:
        log.warning("MODEL_MAX_CONNECTIONS=%d lowered to %d: the process may open only %d files", wanted,
                    max(8, room), room + RESERVED_DESCRIPTORS + ACCEPT_BURST)
        return max(8, room)
    return wanted


class Connections:
    """The open client connections: admitted up to `max_connections`, watched for stalled readers."""

    def __init__(self, max_connections: int, stall_s: float):
        self.max_connections = max_connections
        self.stall_s = stall_s
        self.open: dict[Connection, None] = {}  # insertion order: oldest first
        self.closed_for_room = 0  # since the last report
        self.refused = 0
        self._reported_at = 0.0

    def admit(self, conn: Connection) -> bool:
        """Take `conn` in, closing a connection not being answered if there is no room; False (and
        `conn` answered 503 and closed) when every open connection is being answered."""
        if len(self.open) >= self.max_connections:
            victim = next((c for c in self.open if not c.answering()), None)
            if victim is None:
                self.refused += 1
                body = refusal_body("connection", f"too many connections (at most {self.max_connections} "
                                                  "at once, all busy); try again")
                conn.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n\r\n%s"
                                     % (len(body), body))
                conn.transport.close()
                self._report()
                return False
            self.open.pop(victim, None)
            victim.abort()
            self.closed_for_room += 1
            self._report()
        self.open[conn] = None
        return True

    def remove(self, conn: Connection) -> None:
        self.open.pop(conn, None)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (self.closed_for_room or self.refused) or not force and now - self._reported_at < LIMIT_REPORT_S:
            return
        self._reported_at = now
        log.warning("connection limit (%d) reached: closed %d connection(s) not being answered to make room, "
                    "refused %d", self.max_connections, self.closed_for_room, self.refused)
        self.closed_for_room = self.refused = 0

    def by_peer(self, peer) -> Connection | None:
        return next((c for c in self.open if c.peer == tuple(peer or ())), None)

    def abort_peer(self, peer, why: str) -> None:
        """Close the connection of the client at `peer` (the ASGI scope's `client`) now."""
        conn = self.by_peer(peer)
        if conn is not None:
            log.info("closing the connection of %s: %s", conn.describe(), why)
            conn.abort()

    def check_stalls(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for conn in list(self.open):
            waiting = conn.transport.get_write_buffer_size()
            sent = getattr(conn, "written", 0) - waiting
            if waiting == 0 or sent > conn.sent:
                conn.progress_at = now
            conn.sent = sent
            if waiting and now - conn.progress_at >= self.stall_s:
                log.warning("connection of %s: the client has read nothing for %.0f s (%d bytes wait): closing it",
                            conn.describe(), now - conn.progress_at, waiting)
                self.open.pop(conn, None)
                conn.abort()

    async def watch(self) -> None:
        """Check for stalled readers, and report the limit's work, until cancelled."""
        while True:
            await asyncio.sleep(min(WATCH_INTERVAL_S, self.stall_s / 4))
            self.check_stalls()
            self._report()

    def abort_all(self) -> int:
        conns = list(self.open)
        self.open.clear()
        for conn in conns:
            conn.abort()
        if conns:
            log.info("closed %d connection(s) still open", len(conns))
        return len(conns)


_connections: Connections | None = None


def install(max_connections: int, stall_s: float) -> Connections:
    """Put GuardedH11Protocol and Connection in hypercorn's places; the Connections they report to."""
    global _connections
    import hypercorn.asyncio.run
    import hypercorn.protocol

    hypercorn.protocol.H11Protocol = GuardedH11Protocol
    hypercorn.asyncio.run.TCPServer = Connection
    _connections = Connections(connection_limit(max_connections), stall_s)
    return _connections
