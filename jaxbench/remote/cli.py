"""`jaxbench remote …`: commands that drive a Vast.ai Serverless endpoint's workers.

A new `remote` command is one call in `add_parser`: make its parser with
`options.command(sub, NAME, HELP)`, give it the connection options (`vast.add_connection_options`)
and `set_defaults(run=FUNCTION)`; FUNCTION(args) returns the exit status and reaches the endpoint
with `async with vast.connect(args, connection_limit) as router` (router.client is the SDK's client,
router.endpoint the endpoint).
"""

from __future__ import annotations

import json
import sys
import time

from .. import fields, options
from . import fleet, vast
from .runner import RemoteSearch
from .search import Search


def add_parser(subcommands) -> None:
    _, sub = options.group(subcommands, "remote", "run work on a Vast.ai Serverless endpoint", "remote_command")
    add_search(sub)
    fleet.add_parser(sub)


def run(args) -> int:
    return args.run(args)


# remote search -------------------------------------------------------------------------------------


def add_search(sub) -> None:
    p = options.command(sub, "search", "split a search over the endpoint's workers: NDJSON result lines, then a "
                                       "summary line")
    vast.add_connection_options(p)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="requests in flight at once: the workers the search uses (default 1)")
    options.params(p)
    options.seeds(p)
    options.dtype(p)
    options.search(p, stop_required=True)
    options.screen(p)
    p.add_argument("--cost", type=int, default=None, metavar="NONCES",
                   help="workload the autoscaler is told for each request, in nonces "
                        "(default: the request's nonces; 0 with --duration)")
    p.add_argument("--max-attempts", type=int, default=5, metavar="N",
                   help="failed requests in a row, on different workers, before a part of the search is given up "
                        "(default 5)")
    p.add_argument("--stall-timeout", type=float, default=600.0, metavar="S",
                   help="seconds without a line after which a worker counts as dead (default 600)")
    p.add_argument("--wait-timeout", type=float, default=900.0, metavar="S",
                   help="seconds a request may wait for a worker to start it: routing, cold start, the worker's "
                        "queue (default 900)")
    p.set_defaults(run=run_search)


def run_search(args) -> int:
    search = Search.from_args(args)
    fields.integer(vars(args), "max_attempts", minimum=1)
    if args.cost is not None:
        fields.integer(vars(args), "cost")
    for name in ("stall_timeout", "wait_timeout"):
        fields.number(vars(args), name)
    checked = vast.check_options(args)
    try:
        summary = vast.run_async(_search(args, checked, search))
    except vast.RemoteError as e:
        print(f"error: {e}", file=sys.stderr)
        return options.EXIT_ERROR
    print(json.dumps(summary), flush=True)
    reason = summary["reason"]
    print(f"{summary['total_computed']} nonces in {summary['elapsed_seconds']:.1f} s "
          f"({summary['nonces_per_second']:.1f}/s) in {summary['requests']} request(s) on "
          f"{len(summary['workers'])} worker(s), {summary['total_valid']} valid below r_target {search.r_target}, "
          f"{summary['restarts']} restart(s) [{reason}]" + (f": {summary['error']}" if "error" in summary else ""),
          file=sys.stderr)
    return options.EXIT_ERROR if reason == "failed" else options.EXIT_OK


async def _search(args, checked, search: Search) -> dict:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..progress import progress_display

    # Each request in flight holds a connection to its worker, and route calls want one each too.
    async with vast.connect(args, connection_limit=2 * search.workers + 16, checked=checked) as router:
        with progress_display(search.max_nonces, "remote") as bar, \
                logging_redirect_tqdm():
            runner = RemoteSearch(router, search, cost=args.cost, max_attempts=args.max_attempts,
                                  stall_timeout=args.stall_timeout, wait_timeout=args.wait_timeout, bar=bar)
            t0 = time.monotonic()
            reason = await runner.run()
            return runner.summary(reason, time.monotonic() - t0)
