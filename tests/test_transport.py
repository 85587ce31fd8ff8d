"""The transport under attack: raw sockets against live `python -m service` processes (CPU, tiny).

What a connection, a reader or a signal can do to the worker, and the bounds that hold: requests
the HTTP layer used to refuse, refusals that say why, idle and half-open connections of every kind
by the thousand on a 1024-file limit, clients that stop reading or read too slowly, pipelined
requests never read, the connection limit, and SIGTERM (once and twice) with a client that does not
read. Every bound asserted here is written in service/README.md, "Limits and security".
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service_helpers import TINY_BODY, ServiceProcess, wait_until

STALL_S = 2.0  # MODEL_CLIENT_STALL_S of the servers here
BODY_TIMEOUT_S = 2.0
IDLE_S = 2.0
OPEN_FILES = 1024  # the main server's hard limit on open files, as on the machine of the attack report
FLOOD = 2000  # idle connections, of four kinds
SMALL_LIMIT = 3  # MODEL_MAX_CONNECTIONS of the `small` server
DRAIN_S = 3.0
EXIT_SLACK_S = 4.0  # the process is gone within the drain plus this (README: "a few seconds")
STREAM = {**TINY_BODY, "r_target": 2.0, "duration_s": 120}  # every nonce valid: a line per step, for two minutes


def _start_all(servers: list[ServiceProcess]) -> None:
    errors = []

    def start(s):
        try:
            s.start()
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in servers:
            s.stop()
        raise errors[0]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, compile_cache):
    """main: the module's bounds on a 1024-file limit; small: 3 connections at most; term: a short
    drain. small and term wait long for clients that do not read (SIGTERM finds them attached)."""
    base = tmp_path_factory.mktemp("transport")
    common = {"MODEL_BATCH": "64", "MODEL_CLIENT_STALL_S": str(STALL_S)}
    made = {
        "main": ServiceProcess(base / "main", compile_cache, {**common, "MODEL_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                                                              "MODEL_IDLE_TIMEOUT_S": str(IDLE_S), "MODEL_ACCESS_LOG": "1"},
                               max_open_files=OPEN_FILES),
        "small": ServiceProcess(base / "small", compile_cache, {**common, "MODEL_MAX_CONNECTIONS": str(SMALL_LIMIT),
                                                                "MODEL_CLIENT_STALL_S": "120"}),
        "term": ServiceProcess(base / "term", compile_cache, {**common, "MODEL_CLIENT_STALL_S": "120",
                                                              "MODEL_DRAIN_TIMEOUT_S": str(DRAIN_S)}),
    }
    _start_all(list(made.values()))
    yield made
    for s in made.values():
        s.stop()


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"]


# Raw HTTP ------------------------------------------------------------------------------------------


def connect(server: ServiceProcess, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", server.port))
    return s


def read_all(s: socket.socket, wait: float, enough=None) -> tuple[bytes, bool]:
    """What arrives within `wait` seconds (or until `enough(data)`); True if the server closed the
    connection by then."""
    s.settimeout(0.1)
    out, deadline = b"", time.monotonic() + wait
    while time.monotonic() < deadline and not (enough and enough(out)):
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return out, True
        if not chunk:
            return out, True
        out += chunk
    return out, False


def exchange(server, data: bytes, wait: float = 1.0, pieces: int = 1,
             expect: int | None = None) -> tuple[list[tuple[int, bytes]], bool]:
    """Send `data` (in `pieces` writes), read for `wait` s (or until `expect` responses are in): the
    responses (status, body) and whether the server closed the connection."""
    s = connect(server)
    try:
        step = -(-len(data) // pieces)
        try:
            for i in range(0, len(data), step):
                s.sendall(data[i:i + step])
                if pieces > 1:
                    time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):  # refused before the rest was sent
            pass
        raw, closed = read_all(s, wait, None if expect is None else lambda got: len(parse_responses(got)) >= expect)
    finally:
        s.close()
    return parse_responses(raw), closed


def parse_responses(raw: bytes) -> list[tuple[int, bytes]]:
    out = []
    while raw.startswith(b"HTTP/") and b"\r\n\r\n" in raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        if status < 200:
            raw = rest
            continue
        length = int(headers.get(b"content-length", b"0"))
        if len(rest) < length:
            break
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


def request(path: str = "/health", *headers: str, method: str = "GET", body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", *(["Host: test"] if version == "1.1" else []), *headers]
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def health_answers(body: bytes) -> bool:
    return json.loads(body)["status"] == "healthy"


# The HTTP layer -------------------------------------------------------------------------------------


def test_valid_requests_the_http_layer_used_to_refuse(main):
    # A request that closes its connection, and another request in the same packet: the first is
    # answered, the rest ignored (RFC 9112 §9.6), never a 400.
    responses, closed = exchange(main, request("/health", "Connection: close") + request())
    assert [s for s, _ in responses] == [200] and health_answers(responses[0][1]) and closed
    responses, closed = exchange(main, request(version="1.0") + request(version="1.0"))
    assert [s for s, _ in responses] == [200] and closed
    # Content-Length with leading zeros is its number.
    responses, _ = exchange(main, request("/health", "Content-Length: 000000000000000000002", method="POST", body=b"{}"),
                            expect=1)
    assert [s for s, _ in responses] == [200]
    # Empty lines before the request line are skipped (RFC 9112 §2.2), also between pipelined requests.
    responses, closed = exchange(main, b"\r\n\r\n\n" + request() + b"\r\n" + request() + request(), expect=3)
    assert [s for s, _ in responses] == [200, 200, 200] and not closed
    # Heads of 16 KiB are fine, in one read or byte by byte in a few hundred pieces.
    big = request("/health", "X-Pad: " + "p" * (16 * 1024 - 100))
    assert len(big) <= 16 * 1024
    for pieces in (1, 100):
        responses, _ = exchange(main, big, pieces=pieces, expect=1)
        assert [s for s, _ in responses] == [200]
    # Upgrade: h2c is ignored: answered in HTTP/1.1.
    responses, _ = exchange(main, request("/health", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                                          "HTTP2-Settings: AAMAAABkAAQAAP__"), expect=1)
    assert [s for s, _ in responses] == [200]


REFUSED = [
    ("request line", b"GARBAGE\r\n\r\n", 400, "request_line"),
    ("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400, "request_line"),
    ("header line", request("/health", "X-A: a\x00b"), 400, "headers"),
    ("no Host", b"GET /health HTTP/1.1\r\n\r\n", 400, "headers"),
    ("two lengths", request("/health", "Content-Length: 2", "Content-Length: 3", method="POST", body=b"{}"), 400, "headers"),
    ("gzip framing", request("/health", "Transfer-Encoding: gzip", method="POST"), 501, "headers"),
    ("chunk size", request("/generate", "Transfer-Encoding: chunked", method="POST") + b"zz\r\n{}\r\n0\r\n\r\n", 400, "body"),
    ("chunk data", request("/generate", "Transfer-Encoding: chunked", method="POST") + b"2\r\n{}XX0\r\n\r\n", 400, "body"),
    ("17 KiB head", request("/health", "X-Pad: " + "p" * 17 * 1024), 431, "headers"),
    ("64 KiB head", request("/health", *[f"X-Pad-{i}: " + "p" * 1000 for i in range(64)]), 431, "headers"),
    ("20 KiB line", request("/" + "a" * 20 * 1024), 414, "request_line"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "http_version"),
    ("HTTP/2.0 line", request(version="2.0"), 505, "http_version"),
    ("HTTP/3.1 line", request(version="3.1"), 505, "http_version"),
]


@pytest.mark.parametrize("name,data,status,field", REFUSED, ids=[r[0] for r in REFUSED])
def test_every_refusal_says_what_was_wrong(main, name, data, status, field):
    for pieces in (1, 7):  # in one read or in several
        responses, closed = exchange(main, data, pieces=pieces)
        assert len(responses) == 1 and responses[0][0] == status, (name, responses)
        answer = json.loads(responses[0][1])
        assert answer["field"] == field and answer["error"].startswith(field + ": "), answer
        assert closed


def test_bodies_that_never_arrive_end_at_the_body_timeout(main):
    """A chunk-size line that never ends, or a body shorter than its Content-Length: 408 with a body
    naming it, once MODEL_BODY_TIMEOUT_S has passed."""
    outcomes = {}

    def send(name, data):
        t0 = time.monotonic()
        responses, closed = exchange(main, data, wait=BODY_TIMEOUT_S + 3)
        outcomes[name] = responses, closed, time.monotonic() - t0

    cases = {"chunk-size line": request("/generate", "Transfer-Encoding: chunked", method="POST") + b"zz",
             "short body": request("/generate", "Content-Length: 100", method="POST") + b"{"}
    threads = [threading.Thread(target=send, args=item) for item in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (responses, closed, took) in outcomes.items():
        assert [s for s, _ in responses] == [408] and json.loads(responses[0][1])["field"] == "body", name
        assert closed and BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 3, (name, took)


def test_a_head_sent_slowly_is_closed_when_idle(main):
    """A request head trickled a byte at a time never completes: the connection closes after
    MODEL_IDLE_TIMEOUT_S, like an idle one."""
    s = connect(main)
    t0 = time.monotonic()
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: a-very-long-host-name.example\r\n":
            s.send(bytes([byte]))
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    _, closed = read_all(s, 1.0)
    s.close()
    assert closed and time.monotonic() - t0 < IDLE_S + 2.5


# Connections ------------------------------------------------------------------------------------------


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_size(server: ServiceProcess) -> int:
    return server.log_path.stat().st_size + (server.workdir / "stdout.txt").stat().st_size


def test_two_thousand_idle_connections_of_every_kind(main):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else FLOOD * 2, hard))
    starts = [b"", b"GET /health HTTP/1.1\r\nHost", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
              b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]  # silent, half a head, HTTP/2, TLS
    limits = Path(f"/proc/{main.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == \
        [[str(OPEN_FILES), str(OPEN_FILES)]]
    files_before, log_before = open_files(main.pid), log_size(main)
    socks = []
    try:
        for i in range(FLOOD):
            s = socket.create_connection(("127.0.0.1", main.port), timeout=5)
            if starts[i % 4]:
                s.send(starts[i % 4])
            socks.append(s)
        # While they are open (and more arrive), /health answers at once on a new connection.
        for _ in range(3):
            t0 = time.monotonic()
            r = httpx.get(main.url + "/health", timeout=5)
            assert r.status_code == 200 and time.monotonic() - t0 < 1.0
            assert open_files(main.pid) < OPEN_FILES - 256
        # Idle ones close after MODEL_IDLE_TIMEOUT_S.
        wait_until(lambda: open_files(main.pid) <= files_before + 5, IDLE_S + 5, interval=0.2,
                   what="the idle connections to close")
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert log_size(main) - log_before < 8000, main.log()[-3000:]
    for text in (main.log(), (main.workdir / "stdout.txt").read_text()):
        assert "Traceback" not in text and "Too many open files" not in text and "Logging error" not in text


LOG_WITHOUT_DESCRIPTORS = """
import logging, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from service.logsetup import setup_logging
setup_logging(sys.argv[1], "INFO")
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
log = logging.getLogger("service.test")
for i in range(500):
    log.warning("flood %d\\nwith a newline and \\x85", i)
log.error("a different line after the flood")
"""


def test_logging_survives_running_out_of_descriptors(tmp_path):
    """A process with no descriptor left still logs (escaping opens no codec module), a flood of one
    line is cut to REPEAT_BURST lines, and no handler error or traceback is written."""
    from conftest import ROOT

    log = tmp_path / "server.log"
    proc = subprocess.run([sys.executable, "-c", LOG_WITHOUT_DESCRIPTORS, str(log)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    for text in (proc.stdout, log.read_text()):
        lines = text.splitlines()
        assert "flood 0\\nwith a newline and \\x85" in lines[0]
        assert sum(": flood " in line for line in lines) == 50 and "a different line after the flood" in lines[-1]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_connections_beyond_the_limit(servers):
    small = servers["small"]
    seen = []  # lines of a stream that a reader thread takes as they come

    def follow(stream):
        try:
            for text in stream.iter_lines():
                seen.append(json.loads(text))
        except httpx.HTTPError:  # the test closed the stream
            pass

    with httpx.Client(base_url=small.url, timeout=30) as client, \
            client.stream("POST", "/generate", json=STREAM) as stream:
        reader = threading.Thread(target=follow, args=(stream,), daemon=True)
        reader.start()
        wait_until(lambda: len(seen) > 3, 30, what="the stream's first lines")
        # Idle connections beyond the limit close older idle ones; the stream, being answered, stays.
        idle = [connect(small) for _ in range(20)]
        time.sleep(0.5)
        closed = sum(read_all(s, 0.01)[1] for s in idle)
        assert closed >= 20 - SMALL_LIMIT
        assert httpx.get(small.url + "/health", timeout=5).status_code == 200
        for s in idle:
            s.close()
        # Two connections that pipeline requests and never read the answers: busy, not idle. With
        # the stream, every connection is being answered: a new one is refused, with a body.
        floods = []
        for _ in range(2):
            s = connect(small, rcvbuf=4096)
            s.setblocking(False)
            try:
                s.send(request() * 4000)
            except BlockingIOError:
                pass
            floods.append(s)
            time.sleep(0.5)  # its answers fill the buffers: from then on it is being answered
        # (once their answers have filled the buffers and they wait, mid-answer, for their clients)
        responses, was_closed = wait_until(lambda: (lambda r: r if [st for st, _ in r[0]] == [503] else None)(
            exchange(small, request(), wait=0.5)), 10, interval=0.3, what="a 503")
        assert was_closed and json.loads(responses[0][1])["field"] == "connection"
        # Once they are gone, there is room again (test_unread_pipelined_requests_are_closed: the
        # server closes them itself after MODEL_CLIENT_STALL_S).
        for s in floods:
            s.close()
        wait_until(lambda: httpx.get(small.url + "/health", timeout=5).status_code == 200, 5,
                   interval=0.2, what="room for a new connection")
        count = len(seen)
        wait_until(lambda: len(seen) > count + 5, 10, what="more lines of the stream")
        assert small.health()["busy"]
    log = small.log()
    assert 1 <= log.count(f"connection limit ({SMALL_LIMIT}) reached") <= 3
    assert "socket.send() raised" not in log


# Clients that do not read ------------------------------------------------------------------------------


def start_stream(server: ServiceProcess, body: dict, rcvbuf: int = 4096) -> socket.socket:
    data = json.dumps(body).encode()
    s = connect(server, rcvbuf=rcvbuf)
    s.sendall(request("/generate", "Content-Type: application/json", method="POST", body=data))
    return s


def wait_job(server: ServiceProcess, timeout: float) -> dict:
    wait_until(lambda: server.health()["busy"], 30, interval=0.05, what="the job to start")
    t0 = time.monotonic()
    health = server.wait_idle(timeout)
    return {**health, "took": time.monotonic() - t0}


def test_a_client_that_stops_reading_loses_the_job(main):
    """The job stops once its answer has not moved for MODEL_CLIENT_STALL_S (here long before its
    duration_s), the device is free and /health idle; the log says why."""
    s = start_stream(main, STREAM)
    try:
        s.recv(1000)  # the headers and the first lines, then nothing
        health = wait_job(main, 30)
        assert health["took"] < STREAM["duration_s"] / 4
        assert health["last_job"]["stop_reason"] == "disconnected"
        steps = health["steps_completed"]
        time.sleep(0.5)
        assert main.health()["steps_completed"] == steps
        assert read_all(s, 3.0)[1]  # the server closed the connection (what was buffered arrives first)
    finally:
        s.close()
    assert "the client has read nothing for" in main.log()


def test_a_client_that_reads_too_slowly_loses_the_job_too(main):
    """A client that reads, but less than the job writes: its waits add up to MODEL_CLIENT_STALL_S,
    then it is treated as gone just the same."""
    s = start_stream(main, STREAM, rcvbuf=65536)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                if not s.recv(8192):
                    return
            except OSError:
                return
            time.sleep(0.5)

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()
    try:
        health = wait_job(main, 40)
        assert health["took"] < STREAM["duration_s"] / 3
        assert health["last_job"]["stop_reason"] == "disconnected"
    finally:
        stop.set()
        s.close()
        reader.join(5)
    log = main.log()
    assert "lines unread for" in log or log.count("the client has read nothing for") >= 2


def test_a_job_ends_within_its_duration_plus_the_stall_bound(main):
    """duration_s + MODEL_CLIENT_STALL_S + a step: the bound of a client that stops reading late."""
    duration = 3.0
    s = start_stream(main, {**STREAM, "duration_s": duration})
    t0 = time.monotonic()
    try:
        s.recv(1000)
        wait_until(lambda: main.health()["busy"], 30, interval=0.05, what="the job to start")
        main.wait_idle(duration + STALL_S + 10)
        assert time.monotonic() - t0 < duration + STALL_S + 3 + 2  # + compile (the step is cached) and a step
    finally:
        s.close()


def test_unread_pipelined_requests_are_closed(main):
    s = connect(main, rcvbuf=4096)
    s.setblocking(False)
    t0 = time.monotonic()
    try:
        try:
            s.send(request() * 4000)
        except BlockingIOError:
            pass
        time.sleep(0.5)
        assert httpx.get(main.url + "/health", timeout=5).status_code == 200
        wait_until(lambda: read_all(s, 0.05)[1], STALL_S + 5, interval=0.1, what="the connection to close")
    finally:
        s.close()
    assert time.monotonic() - t0 < STALL_S + 5


def test_line_channel_waits_add_up_to_the_stall_bound():
    """In-process: a reader that takes a line now and then keeps the channel's emits waiting; once
    their waits add up to stall_s, the client counts as gone (detached, job stopped, connection
    closed through on_abandon). A reader that keeps up is never given up on."""
    from types import SimpleNamespace

    from service.jobs import LineChannel

    async def scenario(reader_pause: float, lines: int) -> tuple[list, list]:
        stopped, abandoned = [], []
        job = SimpleNamespace(id="t-1", manager=SimpleNamespace(drain_deadline=None), stop=stopped.append)
        chan = LineChannel(job, limit=2, stall_s=0.6)
        chan.on_abandon = abandoned.append

        async def read():
            async for _ in chan:
                await asyncio.sleep(reader_pause)

        reader = asyncio.get_running_loop().create_task(read())
        for i in range(lines):
            await chan.emit({"n": i})
        chan.end()
        await asyncio.wait_for(reader, 5)
        return stopped, abandoned

    stopped, abandoned = asyncio.run(scenario(0.2, 12))
    assert stopped == ["disconnected"] and len(abandoned) == 1 and "in all" in abandoned[0]
    stopped, abandoned = asyncio.run(scenario(0.0, 200))
    assert stopped == [] and abandoned == []


# SIGTERM ------------------------------------------------------------------------------------------------


def test_sigterm_with_a_client_that_does_not_read(servers):
    term = servers["term"]
    s = start_stream(term, STREAM)
    idle = connect(term)  # and an idle connection, and half a head
    half = connect(term)
    half.send(b"GET /hea")
    try:
        s.recv(1000)
        wait_until(lambda: term.health()["busy"], 30, interval=0.05, what="the job to start")
        time.sleep(2)  # the client's buffers fill
        t0 = time.monotonic()
        os.kill(term.pid, signal.SIGTERM)
        assert term.proc.wait(DRAIN_S + EXIT_SLACK_S + 5) == 0
        assert time.monotonic() - t0 < DRAIN_S + EXIT_SLACK_S
    finally:
        for c in (s, idle, half):
            c.close()
    log = term.log()
    assert "SIGTERM: draining" in log and "INFO service: stopped" in log and "Traceback" not in log


def test_a_second_sigterm_exits_at_once(servers):
    small = servers["small"]
    s = start_stream(small, STREAM)
    try:
        s.recv(1000)
        wait_until(lambda: small.health()["busy"], 30, interval=0.05, what="the job to start")
        time.sleep(2)  # the client's buffers fill: the drain would last MODEL_DRAIN_TIMEOUT_S (30 s)
        os.kill(small.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert small.proc.poll() is None
        t0 = time.monotonic()
        os.kill(small.pid, signal.SIGTERM)
        assert small.proc.wait(5) == 1
        assert time.monotonic() - t0 < 1.5
    finally:
        s.close()
    assert "SIGTERM again: exiting now" in small.log()


# The PyWorker ---------------------------------------------------------------------------------------


class PyWorkerAlone:
    """The real vastai PyWorker (`python -m worker`) in front of a small fake model server, reporting to
    the fake autoscaler: what it does with a request before any model server work."""

    def __init__(self, tmp: Path, compile_cache: Path):
        from service_helpers import FakeHTTPServer, free_port, model_server_env
        from vast_helpers import FakeVast, pyworker_env

        self.vast = FakeVast()
        self.model = FakeHTTPServer(lambda method, path, query, body: (200, {"status": "healthy", "path": path}))
        self.model.__enter__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = tmp / "model.log"
        log.write_text("")  # never ready: no benchmark runs, requests are served all the same
        (tmp / "scratch").mkdir()
        self.output = tmp / "pyworker.out"
        env = {**model_server_env(log, int(self.model.url.rsplit(":", 1)[1]), compile_cache),
               **pyworker_env(self.vast, self.port, 9)}
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=tmp / "scratch", env=env,
                                         start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self._listening(), 60, interval=0.1, what="the PyWorker to listen")
        wait_until(lambda: "pubkey" in self.output.read_text().lower(), 30, interval=0.1, what="the public key")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.output.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def auth(self, n: int, **changes) -> dict:
        return {**self.vast.auth_data(self.url, n), **changes}

    def close(self):
        from vast_helpers import stop

        stop(self.proc)
        self.model.vanish()
        self.vast.close()


@pytest.fixture(scope="module")
def pyworker(tmp_path_factory, compile_cache):
    worker = PyWorkerAlone(tmp_path_factory.mktemp("pyworker"), compile_cache)
    yield worker
    worker.close()


def _malformed(w: PyWorkerAlone) -> list[tuple[str, object, str]]:
    """(route, body: bytes as sent or a JSON value, the field the answer must name)."""
    signed = w.auth(1)
    out = [(route, raw, "body") for route in ("/generate", "/health", "/session/create", "/session/end")
           for raw in (b"null", b'"str"', b"1", b"NaN", b"[]", b"[" * 10000, b"{" * 5000, b"not json", b"\xff{}",
                       b"9" * 5000)]
    for bad in ("x", [1], None, 5):
        out += [("/health", {"auth_data": bad, "payload": {}}, "auth_data"),
                ("/session/create", {"auth_data": bad, "payload": {}}, "auth_data")]
    for key in ("cost", "endpoint", "reqnum", "request_idx", "signature", "url"):
        out.append(("/generate", {"auth_data": {k: v for k, v in signed.items() if k != key}, "payload": {}},
                    f"auth_data.{key}"))
    for key, bad in (("reqnum", "1"), ("reqnum", 1.5), ("reqnum", -1), ("reqnum", 2**64), ("request_idx", "x"),
                     ("request_idx", None), ("signature", 5), ("url", []), ("endpoint", {}), ("cost", [1]),
                     ("cost", True)):
        out.append(("/health", {"auth_data": {**signed, key: bad}, "payload": {}}, f"auth_data.{key}"))
    for bad in (None, [1], "x"):
        out.append(("/pooled", {"auth_data": signed, "payload": bad}, "payload"))
    out += [("/health", {"auth_data": signed, "payload": {}, "session_id": bad}, "session_id") for bad in ([], {}, 5)]
    session = {**signed, "cost": 5}  # /session/create adds cost to the load: a number
    out += [("/session/create", {"auth_data": {**signed, "cost": "5"}, "payload": {}}, "auth_data.cost"),
            ("/session/create", {"auth_data": session, "payload": None}, "payload"),
            ("/session/create", {"auth_data": session, "payload": {"lifetime": "60"}}, "payload.lifetime"),
            ("/session/create", {"auth_data": session, "payload": {"lifetime": 1e300}}, "payload.lifetime"),
            ("/session/create", {"auth_data": session, "payload": {"on_close_route": "/generate"}},
             "payload.on_close_route")]
    for route in ("/session/end", "/session/get", "/session/health"):
        out += [(route, {"session_id": bad}, "session_id") for bad in ([], {"a": 1}, None, "")]
    out.append(("/generate", {"auth_data": signed, "payload": {}, "pad": "x" * (2 << 20)}, "body"))
    return out


def test_the_pyworker_answers_malformed_requests_with_the_field(pyworker):
    problems = []
    cases = _malformed(pyworker)
    with httpx.Client(base_url=pyworker.url, timeout=10) as client:
        for route, body, field in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post(route, content=content, headers={"Content-Type": "application/json"})
            try:
                answer = r.json()
            except ValueError:
                answer = {}
            if not (400 <= r.status_code < 500 and answer.get("field") == field and answer.get("error")):
                problems.append(f"{route} {content[:60]!r}: {r.status_code} {r.text[:200]}")
        # What passes is served as before: a signed request reaches the model server.
        r = client.post("/health", json={"auth_data": pyworker.auth(2), "payload": {}})
        assert r.status_code == 200 and r.json()["path"] == "/health", r.text
        r = client.post("/session/create", json={"auth_data": pyworker.auth(3, cost=5), "payload": {"lifetime": 30}})
        assert r.status_code == 201, r.text
        session = r.json()["session_id"]
        r = client.post("/session/end", json={"session_id": session, "session_auth": pyworker.auth(3, cost=5)})
        assert r.status_code == 200, r.text
    assert not problems, "\n".join(problems)
    output = pyworker.output.read_text()
    assert "Traceback" not in output and "Error handling request" not in output, output[-3000:]
    assert len(cases) > 80


def test_the_endpoint_key_never_reaches_a_log(pyworker, main):
    """The vastai client puts the endpoint's api_key in the query of every request to a worker: the
    PyWorker's log (aiohttp's access log) writes the query redacted, the model server's (hypercorn's,
    MODEL_ACCESS_LOG=1) writes none, and both redact any line that would carry it."""
    secret = "s3cret-endpoint-key"
    r = httpx.post(f"{pyworker.url}/health?api_key={secret}&x=1", json={"auth_data": pyworker.auth(4), "payload": {}},
                   timeout=10)
    assert r.status_code == 200
    r = httpx.get(f"{main.url}/health?api_key={secret}", timeout=10)
    assert r.status_code == 200
    wait_until(lambda: "/health?<redacted>" in pyworker.output.read_text(), 5, what="the access log line")
    wait_until(lambda: '"GET /health 1.1" 200' in main.log(), 5, what="the model server's access log line")
    for text in (pyworker.output.read_text(), main.log(), (main.workdir / "stdout.txt").read_text()):
        assert secret not in text
