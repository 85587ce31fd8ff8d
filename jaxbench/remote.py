"""`python -m jaxbench remote search`: one search on a Vast.ai Serverless endpoint, split over workers.

The search is cut into N parts, one per `/generate` request: part i is node i of N (`node_id`,
`n_nodes`), the nonces `start + i + k·N` for k = 0, 1, … (with `--max-nonces T`, those below
`start + T`, so the parts together are exactly the nonces `start … start + T − 1`). Each request goes
through the `vastai` SDK's Serverless client: it asks the autoscaler's `/route/` for a worker, signs
the request with the route's answer and opens the worker's NDJSON stream (`stream=True`: without it
the SDK reads the stream as one JSON document, fails, and sends the whole job again).

A part's resume point is the first k not known to be done: every nonce of the part before it has
been computed and its result lines received. A worker's lines come step by step, each step whole,
and a line carries `next_nonce`, the first nonce after its step; so once a line of a later step has
arrived, the earlier step is done, and a summary line settles everything its request computed. When
a worker dies (its stream breaks, or stays silent for `--stall-timeout` seconds) or ends its request
early (a time limit, a shutdown, an error), the part goes on from its resume point in a new request,
which the autoscaler routes to a live worker: `start_nonce = start + resume·N`, the same `node_id`
and `n_nodes`, and what is left of `max_nonces` (or of the search's time). At most one step per
device of the dead worker is computed twice; a nonce it had already sent is not printed again.

Output: the workers' result lines on stdout as they arrive (their counts are those of the request
that sent them), then one summary line; a progress bar and a one-line summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field

from . import fields
from .params import DEFAULT_R_TARGET, PRESETS, Params, params_from_text

log = logging.getLogger("jaxbench.remote")

EXIT_FAILED = 1
ROUTE = "/generate"
BACKOFF_S = (1, 2, 4, 8, 15, 30)


class RemoteError(Exception):
    """The search cannot go on: a missing endpoint or key, or a worker refusing the request itself."""


# Command line ---------------------------------------------------------------------------------------


def add_parser(subcommands) -> None:
    remote = subcommands.add_parser("remote", help="run a search or the benchmark on a Vast.ai Serverless endpoint")
    sub = remote.add_subparsers(dest="remote_command", required=True, parser_class=type(remote))
    p = sub.add_parser("search", help="split a search over the endpoint's workers; NDJSON lines, then a summary")
    p.add_argument("--endpoint", required=True, help="the endpoint's name (the API key comes from VAST_API_KEY)")
    p.add_argument("--workers", type=int, default=1, help="parts to split the search into, one request each")
    p.add_argument("--params", required=True,
                   help=f"a preset ({', '.join(PRESETS)}), a JSON object, or @file.json")
    p.add_argument("--block-hash", required=True)
    p.add_argument("--block-height", type=int, default=0)
    p.add_argument("--public-key", required=True)
    p.add_argument("--r-target", type=float, default=DEFAULT_R_TARGET)
    p.add_argument("--start-nonce", type=int, default=0)
    p.add_argument("--dtype", default="float16", help="float16 (default, what validators run), bfloat16, float32")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--max-nonces", type=int, default=None, help="search the nonces start … start + M − 1")
    stop.add_argument("--duration", type=float, default=None, help="search for this many seconds")
    p.add_argument("--cost", type=int, default=None,
                   help="workload the autoscaler is told for each request, in nonces "
                        "(default: the part's remaining nonces; 0 with --duration)")
    p.add_argument("--max-attempts", type=int, default=5,
                   help="requests in a row that may fail for one part before the search gives it up")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="seconds without a line after which a worker counts as dead")
    p.add_argument("--wait-timeout", type=float, default=900.0,
                   help="seconds a request may wait for a worker to start it (routing, cold start, queue)")
    p.add_argument("--autoscaler-url", default=None, help="Vast's autoscaler (default: the SDK's, run.vast.ai)")
    p.add_argument("--webserver-url", default=None, help="Vast's console API (default: the SDK's)")
    p.add_argument("--vast-ca-file", default=None,
                   help="Vast's root certificate, read from this file instead of downloaded at each start")
    from . import fleet

    fleet.add_parser(sub)


@dataclass(frozen=True)
class Search:
    """The search the parts share: the request fields of /generate other than the part's own."""

    params: Params
    block_hash: str
    block_height: int
    public_key: str
    r_target: float
    dtype: str
    start_nonce: int
    n_parts: int
    max_nonces: int | None
    duration_s: float | None

    @classmethod
    def from_args(cls, args) -> "Search":
        search = fields.search_fields({**vars(args), "params": params_from_text(args.params)})
        n_parts = fields.integer(vars(args), "workers", minimum=1)
        limit = search["max_nonces"]
        if limit is not None and limit < n_parts:
            raise fields.FieldError("workers", f"must be at most --max-nonces ({limit}), got {n_parts}")
        duration_s = None if args.duration is None else fields.number(vars(args), "duration")
        return cls(**search, n_parts=n_parts, duration_s=duration_s)

    def parts(self) -> list["Part"]:
        def count(i: int) -> int | None:  # node i's nonces below start + max_nonces
            return None if self.max_nonces is None else -(-(self.max_nonces - i) // self.n_parts)

        return [Part(i, self.n_parts, self.start_nonce, count(i)) for i in range(self.n_parts)]


# One part -------------------------------------------------------------------------------------------


@dataclass
class Part:
    """Node `node_id` of `n_nodes`: the nonces start + node_id + k·n_nodes for k < count (None: no end)."""

    node_id: int
    n_nodes: int
    start_nonce: int
    count: int | None
    resume: int = 0  # every k below it is computed and its lines received
    finished: bool = False
    error: str | None = None  # why the search gave the part up
    requests: list[dict] = field(default_factory=list)  # one per request: worker, first nonce, how it ended
    valid: int = 0  # nonces printed
    progress: int = 0  # k reached by the running request as far as its lines tell (the progress bar's)
    _base: int = 0  # the first k of the running request
    _step: int | None = None  # batch_number of the running request's newest step seen
    _step_end: int | None = None  # the k after that step, from a line's next_nonce
    _step_reached: int = 0  # the k after the step's highest valid nonce seen: where it ends at the least
    _sent: set[int] = field(default_factory=set)  # k ≥ resume already printed

    def nonce(self, k: int) -> int:
        return self.start_nonce + self.node_id + k * self.n_nodes

    def index(self, nonce: int) -> int:
        k, rest = divmod(nonce - self.start_nonce - self.node_id, self.n_nodes)
        if rest or k < self._base or (self.count is not None and k >= self.count):
            raise RemoteError(f"part {self.node_id}: the worker sent nonce {nonce}, which is not in its request")
        return k

    @property
    def remaining(self) -> int | None:
        return None if self.count is None else self.count - self.resume

    def request_fields(self) -> dict:
        """The part's fields of the next request: the rest of its sequence, from its resume point."""
        out = {"start_nonce": self.start_nonce + self.resume * self.n_nodes,
               "node_id": self.node_id, "n_nodes": self.n_nodes}
        if self.count is not None:
            out["max_nonces"] = self.remaining
        return out

    def begin(self, worker: str) -> None:
        self._base = self.progress = self.resume
        self._step, self._step_end, self._step_reached = None, None, 0
        self.requests.append({"worker": worker, "from": self.nonce(self.resume), "ended": None})

    def end(self, how: str) -> None:
        self.requests[-1]["ended"] = how

    def on_result(self, line: dict) -> dict | None:
        """A result line of the running request: the step bookkeeping, then the line with the nonces
        not printed before (None when none is left)."""
        indices = [self.index(n) for n in line["nonces"]]
        if line["batch_number"] != self._step:
            if self._step is not None:  # a later step: every line of the earlier one is here
                self._settle(self._step_end if self._step_end is not None else self._step_reached)
            self._step, self._step_end, self._step_reached = line["batch_number"], None, 0
        # next_nonce is the first nonce of this line's device group in the next step (None past the
        # part's end): minus the group, the step's end.
        if line.get("next_nonce") is not None:
            self._step_end = self.index(line["next_nonce"]) - line["worker_id"]
        self._step_reached = max([self._step_reached, *(k + 1 for k in indices)])
        self.progress = max(self.progress, self._base + line.get("aggregated_total_computed", 0))

        kept = [(n, d, k) for n, d, k in zip(line["nonces"], line["dist"], indices) if k not in self._sent]
        self._sent.update(k for _, _, k in kept)
        self.valid += len(kept)
        if not kept:
            return None
        return {**line, "nonces": [n for n, _, _ in kept], "dist": [d for _, d, _ in kept], "batch_valid": len(kept)}

    def on_summary(self, summary: dict, until_deadline: bool) -> bool:
        """The running request's summary: everything it computed is in. True when the part is done."""
        self._settle(self._base + summary["total_computed"])
        self.progress = self.resume
        if self.count is not None:
            self.finished = self.resume >= self.count
        else:
            self.finished = until_deadline and summary["reason"] == "duration"
        return self.finished

    def _settle(self, k: int) -> None:
        if k > self.resume:
            self.resume = k
            self._sent = {s for s in self._sent if s >= k}

    def report(self) -> dict:
        out = {"node_id": self.node_id, "n_nodes": self.n_nodes, "computed": self.resume, "valid": self.valid,
               "requests": self.requests}
        if self.error is not None:
            out["error"] = self.error
        return out


# The search ----------------------------------------------------------------------------------------


class RemoteSearch:
    """Runs the parts concurrently through one SDK endpoint; prints lines as they come."""

    def __init__(self, endpoint, search: Search, *, cost: int | None, max_attempts: int, stall_timeout: float,
                 wait_timeout: float, out=None, bar=None):
        self.endpoint = endpoint
        self.search = search
        self.parts = search.parts()
        self.cost = cost
        self.max_attempts = max_attempts
        self.stall_timeout = stall_timeout
        self.wait_timeout = wait_timeout
        self.out = out or sys.stdout
        self.bar = bar
        self.deadline: float | None = None
        self.restarts = 0

    def payload(self, part: Part) -> dict | None:
        """The next request of a part; None when its time is up."""
        s = self.search
        body = {"block_hash": s.block_hash, "block_height": s.block_height, "public_key": s.public_key,
                "r_target": s.r_target, "params": s.params.to_dict(), "dtype": s.dtype,
                "batch_size": 1,  # a required field of /generate; the worker picks the device batch itself
                **part.request_fields()}
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left < 1.0:
                return None
            body["duration_s"] = round(left, 3)
        return body

    async def run(self) -> str:
        """The reason the search ended: completed, duration, failed or interrupted."""
        if self.search.duration_s is not None:
            self.deadline = time.monotonic() + self.search.duration_s
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        tasks = [asyncio.create_task(self._run_part(part)) for part in self.parts]
        stop_waiter = asyncio.create_task(stopped.wait())
        try:
            pending = set(tasks)
            while pending and not stopped.is_set():
                done, pending = await asyncio.wait(pending | {stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop_waiter)
                for task in done - {stop_waiter}:
                    task.result()  # a fatal error ends the whole search
        finally:
            stop_waiter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if stopped.is_set():
            return "interrupted"
        if any(p.error for p in self.parts):
            return "failed"
        return "duration" if self.deadline is not None else "completed"

    async def _run_part(self, part: Part) -> None:
        failures = 0
        while not part.finished:
            payload = self.payload(part)
            if payload is None:  # the search's time is up
                part.finished = True
                break
            resumed_from = part.resume
            failure = await self._request(part, payload)
            if failure is None:
                continue
            failures = 1 if part.resume > resumed_from else failures + 1
            self._note(f"part {part.node_id}: {failure}; "
                       f"{'giving up' if failures >= self.max_attempts else 'going on'} from nonce "
                       f"{part.nonce(part.resume)}")
            if failures >= self.max_attempts:
                part.error = failure
                return
            self.restarts += 1
            await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1])

    async def _request(self, part: Part, payload: dict) -> str | None:
        """One request for a part, read to its end; None if it ended with a summary, else what failed."""
        cost = self.cost if self.cost is not None else (part.remaining or 0)
        try:
            answer = await asyncio.wait_for(
                self.endpoint.request(ROUTE, payload, cost=cost, stream=True, timeout=self.wait_timeout),
                self.wait_timeout + 60)
        except asyncio.TimeoutError:
            return f"no worker started the request within {self.wait_timeout:g} s"
        except Exception as e:  # noqa: BLE001 — the SDK raises plain exceptions for routing failures
            return f"the request failed: {type(e).__name__}: {e}"
        if not answer.get("ok"):
            body = answer.get("response")
            if answer.get("status") in (400, 422):  # the same body goes to every worker: no point retrying
                raise RemoteError(f"the worker refused the request ({answer.get('status')}): {body}")
            return f"the worker answered {answer.get('status')}: {body}"

        part.begin(answer.get("url", "?"))
        stream = answer["response"]
        try:
            while True:
                line = await asyncio.wait_for(anext(stream), self.stall_timeout)
                if line.get("status") == "done":
                    part.end(line["reason"])
                    part.on_summary(line, until_deadline=self.deadline is not None)
                    self._progress()
                    return f"the worker's job failed ({line['reason']})" if line["reason"] == "error" else None
                if "error" in line:
                    log.warning("part %d: the worker reported: %s", part.node_id, line["error"])
                    continue
                printed = part.on_result(line)
                if printed is not None:
                    print(json.dumps(printed), file=self.out, flush=True)
                self._progress()
        except StopAsyncIteration:
            part.end("stream ended")
            return "the worker's stream ended without a summary"
        except asyncio.TimeoutError:
            part.end("silent")
            return f"no line from the worker for {self.stall_timeout:g} s"
        except RemoteError:
            raise
        except Exception as e:  # noqa: BLE001 — aiohttp's payload and connection errors: the worker is gone
            part.end("connection lost")
            return f"the worker's stream broke ({type(e).__name__}: {e})"
        finally:
            await stream.aclose()

    def _note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.warning(message)

    def _progress(self) -> None:
        if self.bar is None:
            return
        self.bar.update(sum(p.progress for p in self.parts) - self.bar.n)
        running = sum(1 for p in self.parts if not p.finished and not p.error)
        self.bar.set_postfix(valid=sum(p.valid for p in self.parts), running=running, restarts=self.restarts,
                             refresh=False)

    def summary(self, reason: str, elapsed: float) -> dict:
        computed = sum(p.resume for p in self.parts)
        out = {
            "status": "done",
            "reason": reason,
            "total_computed": computed,
            "total_valid": sum(p.valid for p in self.parts),
            "elapsed_seconds": round(elapsed, 3),
            "nonces_per_second": round(computed / elapsed, 3) if elapsed > 0 else 0.0,
            "n_parts": len(self.parts),
            "restarts": self.restarts,
            "parts": [p.report() for p in self.parts],
        }
        unfinished = [p for p in self.parts if not p.finished]
        if unfinished and self.deadline is None:
            # What a later request (or `--start-nonce` runs) must still cover, as /generate fields.
            out["missing"] = [p.request_fields() for p in unfinished]
        return out


# The SDK client --------------------------------------------------------------------------------------


def _client(api_key: str, args, ca_context: ssl.SSLContext | None):
    from vastai.serverless.client import CoroutineServerless

    class Client(CoroutineServerless):
        """The SDK's async client; given a context that trusts Vast's root certificate, it uses that
        one instead of downloading the certificate."""

        async def get_ssl_context(self) -> ssl.SSLContext:
            return ca_context or await super().get_ssl_context()

    urls = {k: v for k, v in (("autoscaler_url", args.autoscaler_url), ("webserver_url", args.webserver_url)) if v}
    return Client(api_key, **urls)


def _ca_context(ca_file: str) -> ssl.SSLContext:
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


async def _search(args, api_key: str, ca_context: ssl.SSLContext | None, search: Search, bar) -> tuple[str, dict]:
    async with _client(api_key, args, ca_context) as client:
        try:
            endpoint = await client.get_endpoint(args.endpoint)
        except Exception as e:  # noqa: BLE001 — the SDK raises plain exceptions
            raise RemoteError(f"cannot find endpoint {args.endpoint!r}: {e}") from None
        runner = RemoteSearch(endpoint, search, cost=args.cost, max_attempts=args.max_attempts,
                              stall_timeout=args.stall_timeout, wait_timeout=args.wait_timeout, bar=bar)
        t0 = time.monotonic()
        reason = await runner.run()
        return reason, runner.summary(reason, time.monotonic() - t0)


def run(args) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if args.remote_command == "bench":
        from . import fleet

        return fleet.run(args)
    search = Search.from_args(args)
    fields.integer(vars(args), "max_attempts", minimum=1)
    if args.cost is not None:
        fields.integer(vars(args), "cost")
    for name in ("stall_timeout", "wait_timeout"):
        fields.number(vars(args), name)
    ca_context = None if args.vast_ca_file is None else _ca_context(args.vast_ca_file)
    api_key = os.environ.get("VAST_API_KEY", "")
    if not api_key:
        print("error: VAST_API_KEY is not set (the API key of the Vast.ai account that owns the endpoint)",
              file=sys.stderr)
        return EXIT_FAILED
    with tqdm(total=search.max_nonces, unit="nonce", file=sys.stderr, dynamic_ncols=True, desc="remote") as bar, \
            logging_redirect_tqdm():
        try:
            reason, summary = asyncio.run(_search(args, api_key, ca_context, search, bar))
        except RemoteError as e:
            bar.write(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(summary), flush=True)
    print(f"{summary['total_computed']} nonces in {summary['elapsed_seconds']:.1f} s "
          f"({summary['nonces_per_second']:.1f}/s) on {search.n_parts} part(s), {summary['total_valid']} valid below "
          f"r_target {search.r_target}, {summary['restarts']} restart(s) [{reason}]", file=sys.stderr)
    return EXIT_FAILED if reason == "failed" else 0
