"""Hostile requests against a live `python -m service` (real HTTP on 127.0.0.1, CPU, tiny params).

`test_fuzz_every_route` sends a generated table of well over 1000 requests across every route: each
field of each route's valid body replaced by each hostile value (wrong types, null, huge and
non-finite numbers, 5000-digit integers, lone surrogates, CR/LF, `@file` names, URLs with
credentials, deep JSON), fields removed, unknown fields added, and whole bodies that are no JSON
object (bad UTF-8, `[` × 100000, oversized bodies, …), plus wrong methods and paths. It asserts: no
answer ≥ 500; every 4xx names the field it is about (the mutated one, or "body" where the text
itself is at fault); a request that was accepted ran and ended; /health answers and is idle after
each batch; the server's RSS stays bounded; the log shows no unforeseen exception.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import UNFITTABLE_PARAMS
from service_helpers import TINY_BODY, FakeHTTPServer, Peer, wait_until

TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1000, "ffn_dim_multiplier": 1.3,
        "multiple_of": 64, "seq_len": 8}
RSS_GROWTH_LIMIT = 300 << 20


class Raw:
    """JSON text put into a body as is (what json.dumps cannot write: NaN, 5000 digits, "\\ud800")."""

    def __init__(self, text: str, body_level: bool = False):
        self.text = text
        self.body_level = body_level  # the parser fails on the whole text: the answer names "body"


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


HOSTILE = [
    ("null", None), ("true", True), ("zero", 0), ("minus one", -1), ("fraction", 0.5), ("2**63", 2**63),
    ("-2**63-1", -(2**63) - 1), ("5000 digits", Raw("9" * 5000)), ("-5000 digits", Raw("-" + "9" * 5000)),
    ("NaN", Raw("NaN")), ("Infinity", Raw("Infinity")), ("-Infinity", Raw("-Infinity")), ("1e400", Raw("1e400")),
    ("1e308", 1e308), ("empty string", ""), ("5000 chars", "x" * 5000), ("lone surrogate", Raw('"\\ud800"')),
    ("surrogate inside", Raw('"ab\\udfffcd"')), ("CRLF", "x\r\nHost: evil"), ("NUL", "a\x00b"),
    ("@/dev/zero", "@/dev/zero"), ("@/etc/passwd", "@/etc/passwd"), ("JSON text", '{"dim": 64}'),
    ("userinfo URL", "http://user:secret@127.0.0.1:9"), ("CRLF URL", "http://127.0.0.1:9/\r\nHost: evil"),
    ("query", "a?b=c#d"), ("unicode", "é☃𝄞"), ("empty list", []), ("list", [1, "a", None]), ("empty object", {}),
    ("object", {"a": {"b": 1}}), ("nested 40", nested(40)), ("nested 5000", Raw("[" * 5000 + "]" * 5000, body_level=True)),
]
# Sizes: each beyond a per-field bound, or a whole set beyond memory.
SIZE_HOSTILE = [("n_layers", 1_000_000), ("seq_len", 1_000_000_000), ("dim", 1e9), ("vocab_size", 10**12),
                ("multiple_of", 2**40), ("ffn_dim_multiplier", 1e12)]


def encode(body) -> bytes:
    """JSON text of a body whose values may include Raw pieces."""
    raws: list[Raw] = []

    def mark(v):
        if isinstance(v, Raw):
            raws.append(v)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(body), ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw.text, 1)
    return text.encode("utf-8")


# (field, hostile label) pairs that must be refused, beyond every Raw value and deep nesting.
MUST_REFUSE = {(url, label) for url in ("callback_url", "orchestrator_url")
               for label in ("userinfo URL", "CRLF URL", "CRLF", "query", "NUL", "unicode")}
MUST_REFUSE |= {(key, label) for key in ("worker_id", "job_id") for label in ("CRLF", "NUL")}
MUST_REFUSE |= {("worker_id", "query"), ("worker_id", "unicode"), ("params", "@/dev/zero"), ("params", "@/etc/passwd"),
                ("params", "JSON text")}


class Case:
    def __init__(self, route: str, name: str, content: bytes, target: str | None, body_level: bool = False,
                 method: str = "POST", must_refuse: bool = True):
        self.route, self.name, self.content, self.target = route, name, content, target
        self.body_level, self.method, self.must_refuse = body_level, method, must_refuse

    def __repr__(self):
        return f"{self.method} {self.route} [{self.name}]"


def field_cases(route: str, base: dict, optional: dict, params_key: str | None = "params",
                list_fields: tuple = ()) -> list[Case]:
    """Every field of `base` and of `optional` set to every hostile value; each field of `base`
    removed; unknown fields; each parameter field hostile; every other body wrapped as a payload."""
    out = []

    def add(name, body, target, value=None, label=None, must_refuse=False):
        if len(out) % 2:
            body = {"payload": body}
        body_level = isinstance(value, Raw) and value.body_level
        must_refuse = (must_refuse or isinstance(value, Raw) or label == "nested 40"
                       or (target, label) in MUST_REFUSE)
        out.append(Case(route, name, encode(body), target, body_level, must_refuse=must_refuse))

    for key in [*base, *optional]:
        for label, value in HOSTILE:
            if key == "params" and label == "empty object":
                continue  # all defaults: a legitimate (if large) set, seconds of compiling on a CPU
            add(f"{key}={label}", {**base, key: value}, key, value, label)
    for key in base:
        add(f"without {key}", {k: v for k, v in base.items() if k != key}, key)
    for label, value in HOSTILE:  # unknown fields are ignored, unless the value itself is refused
        if isinstance(value, (Raw, list)) or label in ("null", "CRLF"):
            add(f"extra={label}", {**base, "extra_field": value}, "extra_field", value, label)
    for key in list_fields:  # one element of a list field
        for label, value in HOSTILE:
            add(f"{key}[0]={label}", {**base, key: [value, *base[key][1:]]}, key, value, label)
    if params_key:
        for pkey in TINY:
            for label, value in HOSTILE[:20]:
                add(f"params.{pkey}={label}", {**base, params_key: {**TINY, pkey: value}}, f"{params_key}.{pkey}",
                    value, label)
        for pkey, value in SIZE_HOSTILE:
            add(f"params.{pkey}={value}", {**base, params_key: {**TINY, pkey: value}}, params_key, must_refuse=True)
        add("params beyond memory", {**base, params_key: UNFITTABLE_PARAMS}, params_key, must_refuse=True)
        add("params unknown key", {**base, params_key: {**TINY, "bogus": 1}}, params_key, must_refuse=True)
    return out


def body_cases(route: str, base: dict) -> list[Case]:
    """Bodies that are not the route's JSON object at all."""
    text = encode(base)
    raw = [
        ("empty", b""), ("not json", b"not json"), ("bad utf-8", b"\xff\xfe\xfd{"),
        ("bad utf-8 in a string", text[:-1] + b', "x": "\xc3\x28"}'), ("[ x 100000", b"[" * 100000),
        ("UTF-8-encoded surrogate", text[:-1] + b', "block_hash": "\xed\xa0\x80"}'),
        ('{"a": x 100000', b'{"a":' * 100000), ("5000 digits", b"9" * 5000), ("NaN", b"NaN"), ("null", b"null"),
        ("array", b"[]"), ("string", b'"s"'), ("number", b"42"), ("true", b"true"),
        ("payload null", b'{"payload": null}'), ("payload list", b'{"payload": [1]}'),
        ("payload 5000 digits", b'{"payload": ' + b"9" * 5000 + b"}"),
        ("payload nested", encode({"payload": nested(60)})), ("surrogate key", text[:-1] + b', "\\ud800": 1}'),
        ("100000-char key", encode({**base, "k" * 100000: 1})), ("utf-8 BOM", b"\xef\xbb\xbf" + text),
        ("utf-16", json.dumps(base).encode("utf-16")), ("2 MiB of spaces", b"{" + b" " * (2 << 20) + b"}"),
        ("2 MiB string", encode({**base, "pad": "x" * (2 << 20)})), ("trailing garbage", text + b"]]]"),
    ]
    return [Case(route, name, content, None, True, must_refuse=name not in ("100000-char key", "utf-16", "utf-8 BOM"))
            for name, content in raw]


@pytest.fixture(scope="module")
def peers():
    """The MLNode callback (never ready) and an orchestrator that says shutdown at once: accepted
    /warmup and /pooled requests end by themselves within a second."""
    with FakeHTTPServer(Peer({"/warmup/params": (200, {"status": "waiting"}),
                              "/api/workers/connect": (200, {"status": "wait"}),
                              "/config": (200, {"type": "shutdown"})})) as http:
        yield http


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def bases(peer_url: str) -> dict[str, tuple[dict, dict, dict]]:
    """route -> (valid body, optional fields with a valid value, field_cases keyword arguments)."""
    generate = {**TINY_BODY, "params": TINY, "max_nonces": 8}
    generate_optional = {"duration_s": 5, "dtype": "float16", "node_id": 0, "n_nodes": 1, "screen": "fp8",
                         "screen_margin": 0.01}
    return {
        "/generate": (generate, generate_optional, {}),
        "/benchmark": ({**generate, "block_hash": "bench"}, generate_optional, {"params_key": None}),
        "/warmup": ({"callback_url": peer_url, "job_id": "fuzz", "params": TINY, "block_hash": "fuzz-bh",
                     "poll_interval_s": 0.05, "timeout_s": 0.2, "http_timeout_s": 1},
                    {"dtype": "float16"}, {}),
        "/pooled": ({"orchestrator_url": peer_url, "worker_id": "fuzz-worker", "poll_interval_s": 0.05,
                     "wait_poll_interval_s": 0.05, "heartbeat_interval_s": 0.2, "http_timeout_s": 1, "retry_attempts": 1},
                    {"dtype": "float16", "block_hash_timeout_s": 5, "session_timeout_s": 5, "retry_base_s": 0.05,
                     "retry_max_s": 0.1, "result_buffer": 10, "final_flush_s": 0.5, "peer_grace_s": 5,
                     "send_empty_results": False, "screen": "fp8", "screen_margin": 0.01}, {"params_key": None}),
        "/validate": ({"params": TINY, "block_hash": "vbh", "public_key": "vpk", "nonces": [3, 4], "dist": [1.0, 1.0],
                       "r_target": 2.0}, {"dtype": "float16", "fraud_threshold": 0.01},
                      {"list_fields": ("nonces", "dist")}),
    }


class Outcome:
    def __init__(self):
        self.by_status: dict[int, int] = {}
        self.accepted: list[Case] = []
        self.problems: list[str] = []


def send(client: httpx.Client, case: Case, outcome: Outcome) -> None:
    try:
        _send(client, case, outcome)
    except httpx.HTTPError as e:
        outcome.problems.append(f"{case}: no answer: {type(e).__name__}: {e}")


def _send(client: httpx.Client, case: Case, outcome: Outcome) -> None:
    headers = {"Content-Type": "application/json"}
    with client.stream(case.method, case.route, content=case.content, headers=headers, timeout=60) as r:
        status = r.status_code
        outcome.by_status[status] = outcome.by_status.get(status, 0) + 1
        if status >= 500:
            outcome.problems.append(f"{case}: HTTP {status} {r.read()[:300]!r}")
            return
        if status == 200:
            outcome.accepted.append(case)
            if case.must_refuse:
                outcome.problems.append(f"{case}: accepted")
            if r.headers["content-type"].startswith("application/x-ndjson"):
                # A stream: read a moment, then leave (a disconnect stops the job).
                deadline = time.monotonic() + 0.5
                for text in r.iter_lines():
                    if '"status": "done"' in text or time.monotonic() > deadline:
                        break
            else:
                r.read()
            return
        raw = r.read()
    try:
        answer = json.loads(raw)
    except ValueError:
        outcome.problems.append(f"{case}: HTTP {status} is not JSON: {raw[:200]!r}")
        return
    field = answer.get("field") if isinstance(answer, dict) else None
    if not isinstance(field, str) or not field or not answer.get("error"):
        outcome.problems.append(f"{case}: HTTP {status} names no field: {answer}")
        return
    if answer.get("internal_error"):
        outcome.problems.append(f"{case}: an unforeseen exception: {answer}")
    if case.target is not None and not (field == case.target or field.startswith(case.target + ".")
                                        or (case.body_level and field == "body") or (status == 413 and field == "body")):
        outcome.problems.append(f"{case}: HTTP {status} names {field!r}, not {case.target!r}: {answer['error'][:200]}")
    if b"root:" in raw:
        outcome.problems.append(f"{case}: the answer shows a file's content: {raw[:200]!r}")


def after_batch(server, what: str) -> dict:
    """/health answers and the server is idle (an accepted job ended once its client left)."""
    h = wait_until(lambda: (lambda x: x if x.status_code == 200 and not x.json()["busy"] else None)(
        httpx.get(server.url + "/health", timeout=10)), 30, interval=0.05, what=f"an idle server after {what}")
    return h.json()


def test_fuzz_every_route(server, peers):
    cases_by_route: dict[str, list[Case]] = {}
    for route, (base, optional, kwargs) in bases(peers.url).items():
        cases_by_route[route] = field_cases(route, base, optional, **kwargs) + body_cases(route, base)
    cases_by_route["methods and paths"] = [
        Case("/generate", "GET", b"", "method", method="GET"), Case("/health", "PUT", b"{}", "method", method="PUT"),
        Case("/validate", "DELETE", b"", "method", method="DELETE"), Case("/nope", "POST", b"{}", "path"),
        Case("/nope", "GET", b"", "path", method="GET"), Case("/../etc/passwd", "GET", b"", "path", method="GET"),
    ] + [Case("/health", f"health {label}", encode({"x": value}), None, must_refuse=False) for label, value in HOSTILE]

    with httpx.Client(base_url=server.url, timeout=60) as client:
        # The valid bodies are accepted (so each mutation tests one thing), and warm the server up.
        for route, (base, _, _) in bases(peers.url).items():
            r = client.post(route, content=encode(base), headers={"Content-Type": "application/json"})
            assert r.status_code == 200, (route, r.text)
            if route in ("/generate", "/warmup", "/pooled"):
                assert json.loads(r.text.splitlines()[-1])["status"] == "done", (route, r.text)
            after_batch(server, route)
        rss_start = rss_bytes(server.pid)
        outcome = Outcome()
        total = 0
        t0 = time.monotonic()
        for route, cases in cases_by_route.items():
            for case in cases:
                send(client, case, outcome)
                if outcome.accepted and outcome.accepted[-1] is case:
                    after_batch(server, repr(case))
            total += len(cases)
            h = after_batch(server, route)
            assert h["status"] == "healthy" and h["job"] is None
        # Chunked bodies (no Content-Length) beyond the limit are cut off too.
        r = client.post("/generate", content=(b" " * 65536 for _ in range(40)), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body"
        elapsed = time.monotonic() - t0
        rss_end = rss_bytes(server.pid)

    assert total >= 1000
    assert not outcome.problems, "\n".join(outcome.problems[:40]) + f"\n({len(outcome.problems)} problems)"
    assert all(status < 500 for status in outcome.by_status), outcome.by_status
    assert 409 not in outcome.by_status and 503 not in outcome.by_status
    assert outcome.by_status.get(400, 0) > 900
    assert rss_end - rss_start < RSS_GROWTH_LIMIT, (rss_start >> 20, rss_end >> 20)
    log = server.log()
    for sign in ("unhandled error", "driver failed", "Logging error", "Traceback"):
        assert sign not in log, sign
    print(f"\n{total} hostile requests in {elapsed:.1f} s: {sorted(outcome.by_status.items())}, "
          f"{len(outcome.accepted)} accepted; RSS {rss_start >> 20} -> {rss_end >> 20} MiB")


# The reproductions, one by one --------------------------------------------------------------


def post(client: httpx.Client, path: str, body: dict) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    r = client.post(path, json=body)
    return r.status_code, r.json(), time.monotonic() - t0


def route_bodies(peer_url: str, params) -> dict[str, dict]:
    return {
        "/generate": {**TINY_BODY, "params": params, "max_nonces": 8},
        "/benchmark": {**TINY_BODY, "params": params, "max_nonces": 8},
        "/warmup": {"callback_url": peer_url, "params": params, "timeout_s": 0.2},
        "/validate": {"params": params, "block_hash": "b", "public_key": "p", "nonces": [1], "dist": [1.0],
                      "r_target": 2.0},
    }


@pytest.mark.parametrize("path", ["@/dev/zero", "@/etc/passwd", "@/no/such/file"])
def test_file_params_are_never_read(client, peers, path):
    for route, body in route_bodies(peers.url, path).items():
        status, answer, took = post(client, route, body)
        assert status == 400 and answer["field"] == "params", (route, answer)
        # The same answer whether the file exists or not, and nothing from it.
        assert answer["error"].startswith(f"params: unknown preset {path!r} (presets: "), answer
        assert "root:" not in answer["error"] and took < 2


@pytest.mark.parametrize("params,field,text", [
    ({**TINY, "n_layers": 1_000_000}, "params.n_layers", "at most 1024"),
    ({**TINY, "seq_len": 1_000_000_000}, "params.seq_len", "at most 65536"),
    ({**TINY, "dim": 1e9}, "params.dim", "integer"),
    ({**TINY, "dim": 10**9}, "params.dim", "at most 65536"),
    (UNFITTABLE_PARAMS, "params", "GiB"),
])
def test_parameter_sets_are_bounded_before_any_work(server, client, peers, params, field, text):
    before = server.health()
    for route, body in route_bodies(peers.url, params).items():
        status, answer, took = post(client, route, body)
        assert status == 400 and answer["field"] == field and text in answer["error"], (route, answer)
        assert took < 2
    after = server.health()
    assert after["compiled"] == before["compiled"] and after["steps_completed"] == before["steps_completed"]
    assert after["last_job"] == before["last_job"]  # no job was even started


@pytest.mark.parametrize("route,field,value", [
    ("/warmup", "callback_url", "http://user:s3cret@127.0.0.1:9"),
    ("/warmup", "callback_url", "http://:s3cret@127.0.0.1:9/x"),
    ("/pooled", "orchestrator_url", "https://user:s3cret@example.com"),
    ("/warmup", "callback_url", "http://127.0.0.1:9/\r\nHost: evil"),
    ("/pooled", "orchestrator_url", "http://127.0.0.1:9\r\nX-Injected: 1"),
    ("/warmup", "job_id", "x\r\nHost: evil"),
    ("/pooled", "worker_id", "a?b=c#d"),
    ("/pooled", "worker_id", "../../admin"),
    ("/pooled", "worker_id", "x\r\nHost: evil"),
])
def test_injections_and_credentials_are_refused_and_not_echoed(client, peers, route, field, value):
    body = {"callback_url": peers.url} if route == "/warmup" else {"orchestrator_url": peers.url}
    status, answer, _ = post(client, route, {**body, field: value})
    assert status == 400 and answer["field"] == field, answer
    assert "s3cret" not in json.dumps(answer)


def test_health_shows_only_the_origin_of_peer_urls(server, client, peers):
    url = peers.url + "/t0ken-in-the-path"
    seen = []

    def look(line):
        if line.get("status") == "warmup_waiting" and not seen:
            seen.append(httpx.get(server.url + "/health", timeout=10).text)

    from service_helpers import read_stream

    lines = [line for _, line in read_stream(client, "/warmup", {"callback_url": url, "job_id": "origin",
                                                                 "poll_interval_s": 0.05, "timeout_s": 0.5},
                                             on_line=look)]
    assert lines[-1]["callback"] == "sent"  # the path was used for the calls
    health = server.health()
    assert json.loads(seen[0])["job"]["callback_url"] == peers.url
    assert health["last_job"]["callback_url"] == peers.url
    assert "t0ken" not in seen[0] and "t0ken" not in json.dumps(health)


def test_the_server_binds_loopback_by_default(monkeypatch):
    from service.config import Settings

    monkeypatch.delenv("MODEL_SERVER_HOST", raising=False)
    assert Settings().host == "127.0.0.1" and Settings.from_env().host == "127.0.0.1"
