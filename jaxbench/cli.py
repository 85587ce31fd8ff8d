"""`python -m jaxbench`: distances, search, validate and bench from the shell.

Results go to stdout as JSON (one object, or NDJSON lines for `search`); progress bars, tables and
logs go to stderr. Bad input prints one line naming the field and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from . import fields, remote
from .params import DEFAULT_R_TARGET, PRESETS, ParamsError, params_from_text

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def _add_common(p: argparse.ArgumentParser, with_hash: bool = True):
    p.add_argument("--params", required=True,
                   help=f"a preset ({', '.join(PRESETS)}), a JSON object, or @file.json")
    if with_hash:
        p.add_argument("--block-hash", required=True)
        p.add_argument("--public-key", required=True)
    _add_runtime(p)


def _add_runtime(p: argparse.ArgumentParser):
    p.add_argument("--dtype", default="float16", help="float16 (default, what validators run), bfloat16, float32")
    p.add_argument("--draws", default="auto", choices=("auto", "host", "device"),
                   help="where inputs are drawn: auto = device on GPUs, host elsewhere")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--batch", type=int, default=None, help="nonces per device per step (default: from free memory)")
    p.add_argument("--cache-dir", default=None, help="XLA compilation cache directory ('' disables it)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m jaxbench", description="Gonka PoC nonce search in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("distances", help="distances of given nonces (one JSON object)")
    _add_common(p)
    p.add_argument("--nonces", required=True, help="comma-separated integers and a-b ranges")

    p = sub.add_parser("search", help="stream valid nonces as NDJSON, then a summary line")
    _add_common(p)
    p.add_argument("--r-target", type=float, default=DEFAULT_R_TARGET)
    p.add_argument("--start-nonce", type=int, default=0)
    p.add_argument("--node-id", type=int, default=0)
    p.add_argument("--n-nodes", type=int, default=1)
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--max-nonces", type=int, default=None)
    stop.add_argument("--duration", type=float, default=None, help="seconds")

    p = sub.add_parser("validate", help="recompute a claimed batch and give the fraud verdict")
    p.add_argument("file", help="JSON with params, block_hash, public_key, nonces, dist, r_target")
    p.add_argument("--threshold", type=float, default=None, help="fraud threshold (default 1e-7)")
    _add_runtime(p)

    p = sub.add_parser("bench", help="measure end-to-end and device-only throughput")
    _add_common(p, with_hash=False)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the end-to-end run")
    p.add_argument("--block-hash", default="bench-" + "0" * 58)
    p.add_argument("--public-key", default="bench-public-key")

    remote.add_parser(sub)
    return parser


def _engine(args):
    import jax

    from .engine import DEFAULT_CACHE_DIR, Engine

    if args.devices is not None and args.devices > len(jax.devices()):
        raise fields.FieldError("devices", f"only {len(jax.devices())} device(s) here, asked for {args.devices}")
    cache = DEFAULT_CACHE_DIR if args.cache_dir is None else args.cache_dir
    return Engine(devices=args.devices, draws_mode=args.draws, compile_cache_dir=cache or None)


def _checked(args) -> dict:
    """The arguments every command shares, validated with the service's field rules."""
    values = {"dtype": fields.dtype({"dtype": args.dtype})}
    if getattr(args, "params", None) is not None:
        values["params"] = params_from_text(args.params)
    for name in ("block_hash", "public_key"):
        if getattr(args, name, None) is not None:
            values[name] = fields.seed_text({name: getattr(args, name)}, name)
    if args.batch is not None and args.batch < 1:
        raise fields.FieldError("batch", f"must be ≥ 1, got {args.batch}")
    if args.devices is not None and args.devices < 1:
        raise fields.FieldError("devices", f"must be ≥ 1, got {args.devices}")
    return values


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="nonce", file=sys.stderr, dynamic_ncols=True, desc=desc)


def _ready_message(engine, model, batch: int, compile_seconds: float) -> str:
    return (f"weights built in {model.build_seconds:.1f} s, step compiled in {compile_seconds:.1f} s: "
            f"{batch} nonces a step on each of {engine.n_groups} {engine.platform} device(s), "
            f"{engine.draws_mode} draws")


def cmd_distances(args) -> int:
    v = _checked(args)
    nonces = fields.parse_nonce_ranges(args.nonces)
    engine = _engine(args)
    with _progress(len(nonces), "distances") as bar:
        dist = engine.distances(v["params"], v["block_hash"], v["public_key"], nonces, v["dtype"], batch=args.batch,
                                on_step=bar.update)
    print(json.dumps({"nonces": nonces, "dist": [float(d) for d in dist], "dtype": v["dtype"],
                      "draws": engine.draws_mode}))
    return 0


def cmd_search(args) -> int:
    from .engine import SearchJob
    from .nonces import NonceSchedule
    from .results import SearchTally

    v = _checked(args)
    r_target = fields.number({"r_target": args.r_target}, "r_target")
    start = fields.integer({"start_nonce": args.start_nonce}, "start_nonce")
    n_nodes = fields.integer({"n_nodes": args.n_nodes}, "n_nodes", minimum=1)
    node_id = fields.integer({"node_id": args.node_id}, "node_id")
    if node_id >= n_nodes:
        raise fields.FieldError("node_id", f"must be below n_nodes ({n_nodes})")
    limit = None if args.max_nonces is None else fields.integer({"max_nonces": args.max_nonces}, "max_nonces", minimum=1)
    duration = None if args.duration is None else fields.number({"duration": args.duration}, "duration")

    engine = _engine(args)
    job = SearchJob(v["params"], v["block_hash"], v["public_key"], r_target,
                    NonceSchedule.for_node(start, node_id, n_nodes, limit=limit), v["dtype"], duration)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: (stop.set(), signal.signal(signal.SIGINT, signal.SIG_DFL)))
    tally = SearchTally(job, engine.n_groups)
    with _progress(limit, "search") as bar:
        on_ready = lambda *ready: bar.write(_ready_message(engine, *ready), file=sys.stderr)
        for step in engine.search(job, stop, batch=args.batch, on_ready=on_ready):
            for line in tally.add(step):
                print(json.dumps(line), flush=True)
            bar.update(step.computed)
            bar.set_postfix(valid=tally.total_valid, refresh=False)
    summary = tally.summary("interrupted" if stop.is_set() else tally.end_reason(False))
    print(json.dumps(summary), flush=True)
    print(f"{summary['total_computed']} nonces in {summary['elapsed_seconds']:.1f} s "
          f"({summary['nonces_per_second']:.1f}/s), {summary['total_valid']} valid below r_target {r_target} "
          f"[{summary['reason']}]", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from .claims import parse_claim, validate_claim

    path = Path(args.file)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise fields.FieldError("file", f"cannot read {args.file!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise fields.FieldError("file", f"{args.file!r} is not valid JSON: {e}") from None
    if isinstance(data, dict) and args.threshold is not None:
        data = {**data, "fraud_threshold": args.threshold}
    if isinstance(data, dict) and "dtype" not in data:
        data = {**data, "dtype": fields.dtype({"dtype": args.dtype})}
    claim = parse_claim(data)
    with _progress(len(claim.nonces), "validate") as bar:
        report = validate_claim(_engine(args), claim, on_step=bar.update)
    print(json.dumps(report))
    verdict = "FRAUD" if report["fraud"] else "not fraud"
    print(f"{report['n_invalid']} of {report['n']} invalid, p-value {report['p_value']:.3g}: {verdict} "
          f"at threshold {report['fraud_threshold']:g}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    v = _checked(args)
    seconds = fields.number({"seconds": args.seconds}, "seconds")
    report = run_bench(_engine(args), v["params"], v["dtype"], v["block_hash"], v["public_key"], seconds,
                       batch=args.batch)
    print(json.dumps(report))
    return 0


COMMANDS = {"distances": cmd_distances, "search": cmd_search, "validate": cmd_validate, "bench": cmd_bench,
            "remote": remote.run}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (fields.FieldError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return 0
