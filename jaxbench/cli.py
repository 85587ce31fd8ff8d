"""`jaxbench` (or `python -m jaxbench`): distances, search, validate and bench from the shell.

Results are JSON: one object on stdout, or for `search` NDJSON result lines (on stdout when it is
not a terminal, else in a file) and a summary line. Progress bars, tables and logs go to stderr.
Exit status: 0 done, 1 an unexpected failure, 2 bad input, 3 `validate` found fraud, 130 interrupted;
every failure is one line on stderr (`-v` adds the traceback of an unexpected one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
import traceback
from pathlib import Path

from . import fields, options, remote
from .backend_probes import quiet_backend_probes
from .progress import progress_display
from .options import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_FRAUD, EXIT_INTERRUPTED, UsageError
from .params import DEFAULT_R_TARGET, InputFileError, ParamsError, params_from_text, read_input_file


def _version() -> str:
    """The project's version: pyproject.toml's in a checkout, else the installed package's."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
        if project["name"] == "jaxbench":
            return project["version"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        return importlib.metadata.version("jaxbench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(prog: str = "jaxbench") -> argparse.ArgumentParser:
    parser = options.Parser(prog=prog, description="Gonka PoC nonce search in JAX.",
                            epilog=f"{options.EXIT_STATUSES}. docs/output.md describes every output field.")
    options.verbose(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=options.Parser, metavar="COMMAND")

    p = options.command(sub, "distances", "distances of given nonces (one JSON object)")
    options.params(p)
    options.seeds(p)
    options.runtime(p)
    p.add_argument("--nonces", required=True, metavar="LIST", help="comma-separated integers and inclusive a-b ranges")

    p = options.command(sub, "search", "search for valid nonces: NDJSON result lines, then a summary line")
    options.params(p)
    options.seeds(p)
    options.runtime(p)
    options.search(p)
    options.screen(p)
    p.add_argument("--node-id", type=int, default=0, metavar="I", help="this node's index, below --n-nodes (default 0)")
    p.add_argument("--n-nodes", type=int, default=1, metavar="M", help="nodes sharing the nonce space (default 1)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="append result lines and the summary to FILE ('-': stdout). Default: stdout when it "
                        "is not a terminal, else a new jaxbench-search-<UTC time>.ndjson here")

    p = options.command(sub, "validate",
                        f"recompute a claimed batch and give the fraud verdict (exit {options.EXIT_FRAUD} on fraud)")
    p.add_argument("file", help="JSON with params, block_hash, public_key, nonces, dist, r_target")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="fraud when the p-value is below this (default: the claim's fraud_threshold, else 1e-7)")
    options.runtime(p)

    p = options.command(sub, "bench", "measure end-to-end and device-only throughput (a table on stderr, JSON on stdout)")
    options.params(p)
    options.seeds(p, block_hash="bench-" + "0" * 58, public_key="bench-public-key")
    options.runtime(p)
    p.add_argument("--seconds", type=float, default=20.0, metavar="S", help="length of the end-to-end run (default 20)")
    options.screen(p)
    p.add_argument("--r-target", type=float, default=None, metavar="R",
                   help=f"with --screen: valid nonces are counted below this (default {DEFAULT_R_TARGET})")
    p.add_argument("--sustained-seconds", type=float, default=None, metavar="S",
                   help="then float16 square products for this long on every GPU: the rate the card sustains, "
                        f"which percent_of_sustained compares the step with (default {fields.DEFAULT_SUSTAINED_S:g}; "
                        f"0 turns it off; at most {fields.MAX_SUSTAINED_S:g})")

    remote.add_parser(sub)
    options.name_options(parser)
    return parser


@contextlib.contextmanager
def _options(args):
    """Field errors raised inside name the command-line option (`--r-target`, not `r_target`;
    `--params: dim` for a field of the parameter set)."""
    try:
        yield
    except (fields.FieldError, ParamsError) as e:
        if getattr(e, "cap_message", None) is not None:  # placement.MemoryCapError: the cap given is at fault
            raise fields.FieldError(args.option_names.get("device_memory", "device_memory"), e.cap_message) from None
        field = e.under("params") if isinstance(e, ParamsError) else e.field
        head, dot, rest = field.partition(".")
        option = args.option_names.get(head)
        if option is None:
            raise
        raise fields.FieldError(option, f"{rest}: {e.message}" if dot else e.message) from None


def _cache_dir(args) -> str | None:
    from .engine_config import DEFAULT_CACHE_DIR

    directory = str(DEFAULT_CACHE_DIR) if args.cache_dir is None else args.cache_dir
    if not directory:
        return None
    source = "" if args.cache_dir is not None else " (from JAXBENCH_CACHE_DIR or the default)"
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise fields.FieldError("cache_dir", f"{directory!r}{source} is not a directory")
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fields.FieldError("cache_dir", f"cannot use {directory!r}{source}: {e.strerror or e}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise fields.FieldError("cache_dir", f"cannot write in {directory!r}{source}")
    return directory


def _engine(args, params, dtype: str):
    """The engine for the command's options, refusing (before any output) a parameter set that
    cannot fit in these devices' memory."""
    import jax

    from .engine import Engine

    cache = _cache_dir(args)
    if args.devices is not None and args.devices > len(jax.devices()):
        raise fields.FieldError("devices", f"only {len(jax.devices())} device(s) here, asked for {args.devices}")
    engine = Engine(devices=args.devices, draws_mode=args.draws, compile_cache_dir=cache,
                    group_size=args.group_size, device_memory=_device_memory(args))
    engine.check_fits(params, dtype)
    return engine


def _device_memory(args) -> int | None:
    from .sizes import parse_size

    if args.device_memory is None:
        return None
    try:
        return parse_size(args.device_memory)
    except ValueError as e:
        raise fields.FieldError("device_memory", str(e)) from None


def _read_json_file(path: str, field: str):
    """A JSON file's content; unreadable, oversized or malformed files are a FieldError on `field`."""
    try:
        raw = read_input_file(path)
    except InputFileError as e:
        raise fields.FieldError(field, str(e)) from None
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise fields.FieldError(field, f"{path!r} is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and integers too long to convert
        raise fields.FieldError(field, f"{path!r} is not valid JSON: {e}") from None


def _checked(args) -> dict:
    """The arguments every command shares, validated with the service's field rules."""
    values = {"dtype": fields.dtype(vars(args))}
    if getattr(args, "params", None) is not None:
        values["params"] = params_from_text(args.params)
    for name in ("block_hash", "public_key"):
        if getattr(args, name, None) is not None:
            values[name] = fields.seed_text(vars(args), name)
    _check_runtime(args)
    return values


def _check_runtime(args) -> None:
    for name in ("batch", "devices", "group_size"):
        if getattr(args, name) is not None:
            fields.integer(vars(args), name, minimum=1)


def _ready_message(engine, model, batch: int, compile_seconds: float) -> str:
    placement = model.placement
    groups = (f"each of {placement.n_groups} {engine.platform} device(s)" if placement.group_size == 1 else
              f"each of {placement.n_groups} group(s) of {placement.group_size} {engine.platform} devices "
              f"(the layers split in {placement.group_size} stages)")
    return (f"weights built in {model.build_seconds:.1f} s, step compiled in {compile_seconds:.1f} s: "
            f"{batch} nonces a step on {groups}, {engine.draws_mode} draws")


def cmd_distances(args) -> int:
    v = _checked(args)
    nonces = fields.parse_nonce_ranges(args.nonces)
    engine = _engine(args, v["params"], v["dtype"])
    with progress_display(len(nonces), "distances") as bar:
        dist = engine.distances(v["params"], v["block_hash"], v["public_key"], nonces, v["dtype"], batch=args.batch,
                                on_step=bar.update)
    print(json.dumps({"nonces": nonces, "dist": [float(d) for d in dist], "dtype": v["dtype"],
                      "draws": engine.draws_mode}))
    return 0


def _result_file(out: str | None) -> str | None:
    """Where result lines go: None for stdout ('-', or a stdout that is not a terminal), else a path."""
    if out == "":
        raise fields.FieldError("out", "must be a file name, or '-' for stdout")
    if out == "-" or out is None and not sys.stdout.isatty():
        return None
    return out or time.strftime("jaxbench-search-%Y%m%dT%H%M%SZ.ndjson", time.gmtime())


class ResultWriteError(Exception):
    """The result file refused a line: the search stopped, and what it could not hold went to stdout."""


class ResultLines:
    """Where a search's lines go: stdout, or a file that each line is appended to whole. Once the file
    refuses a line (a full disk), the part of it written is cut back off, and that line and every
    later one go to stdout instead; `failure` says why."""

    def __init__(self, path: str | None, name: str):
        self.path = path
        self.name = name  # how an error names the file: `--out: 'found.ndjson'`
        self.file = None if path is None else open(path, "ab", buffering=0)
        self.failure: str | None = None
        self.redirected = 0  # lines that went to stdout because the file refused them

    @property
    def on_stdout(self) -> bool:
        return self.file is None or self.failure is not None

    def write(self, line: dict) -> None:
        text = json.dumps(line) + "\n"
        if not self.on_stdout:
            end = self.file.tell()
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[self.file.write(data):]
                return
            except OSError as e:
                self.failure = f"{self.name}cannot write {self.path!r}: {e.strerror or e}"
                with contextlib.suppress(OSError):
                    self.file.truncate(end)
        if self.failure:
            self.redirected += 1
        print(text, end="", flush=True)

    def is_empty(self) -> bool:
        return self.file is not None and os.fstat(self.file.fileno()).st_size == 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def cmd_search(args) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # the first ends the search with its summary, a second at once
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored (`&` in a script): stays so
            signal.signal(signum, lambda n, _: (stop.set(), signal.signal(n, signal.SIG_DFL)))
    v = fields.search_fields({**vars(args), "params": params_from_text(args.params)})
    _check_runtime(args)
    n_nodes = fields.integer(vars(args), "n_nodes", minimum=1)
    node_id = fields.integer(vars(args), "node_id")
    if node_id >= n_nodes:
        raise fields.FieldError("node_id", f"must be below --n-nodes ({n_nodes}), got {node_id}")
    screen, margin = fields.screen(vars(args))
    limit = v["max_nonces"]
    duration = None if args.duration is None else fields.number(vars(args), "duration")
    path = _result_file(args.out)
    created = path is not None and not os.path.exists(path)
    try:
        results = ResultLines(path, "--out: " if args.out is not None else "")
    except OSError as e:
        raise fields.FieldError("out", f"cannot write {path!r}: {e.strerror or e}") from None

    from .job import SearchJob
    from .nonces import NonceSchedule
    from .results import SearchTally
    from .screen import ScreenedSearch

    try:
        engine = _engine(args, v["params"], v["dtype"])
        job = SearchJob(v["params"], v["block_hash"], v["public_key"], v["r_target"],
                        NonceSchedule.for_node(v["start_nonce"], node_id, n_nodes, limit=limit), v["dtype"], duration)
        tally = SearchTally(job, block_height=v["block_height"], node_id=node_id)
        screened = ScreenedSearch(engine, job, margin) if screen else None
        said = screened.describe() if screened else {}  # on every line
        try:
            with progress_display(limit, "search") as bar:
                on_ready = lambda *ready: bar.write(_ready_message(engine, *ready), file=sys.stderr)
                steps = (screened.steps(stop, batch=args.batch, on_ready=on_ready) if screened
                         else engine.search(job, stop, batch=args.batch, on_ready=on_ready))
                for step in steps:
                    for line in tally.add(step):
                        results.write({**line, **said})
                    if results.failure:  # the steps in flight still end, their lines on stdout
                        stop.set()
                    bar.set_postfix(valid=tally.total_valid, refresh=False)
                    bar.update(step.computed)
        except (fields.FieldError, ParamsError):
            raise
        except Exception as e:  # a device error mid-search: the lines computed stand, the summary says why
            failed = {**tally.summary("error"), **(screened.summary_fields() if screened else {}),
                      "error": f"{type(e).__name__}: {_one_line(str(e))}"}
            results.write(failed)
            raise
        if results.failure:
            summary = {**tally.summary("error"), **(screened.summary_fields() if screened else {}),
                       "error": results.failure}
        else:
            summary = {**tally.summary("interrupted" if stop.is_set() else tally.end_reason(False)),
                       **(screened.summary_fields() if screened else {})}
        results.write(summary)
        if results.failure:
            raise ResultWriteError(f"{results.failure}; the search stopped, and the {results.redirected} line(s) "
                                   f"the file could not take, the summary last, went to stdout")
    except BaseException:
        if created and results.is_empty():  # a file this run made and never wrote to
            os.unlink(path)
        raise
    finally:
        results.close()
    if results.file is not None:
        print(json.dumps(summary), flush=True)
    where = "on stdout" if path is None else f"in {path}"
    print(f"{summary['total_computed']} nonces in {summary['elapsed_seconds']:.1f} s "
          f"({summary['nonces_per_second']:.1f}/s), {summary['total_valid']} valid below r_target {v['r_target']} "
          f"[{summary['reason']}]; {tally.lines_emitted} result line(s) and the summary {where}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    dtype = _checked(args)["dtype"]
    threshold = None
    if args.threshold is not None:
        threshold = fields.p_value_bound(vars(args), "threshold")
    data = _read_json_file(args.file, "file")
    from .claims import FIDELITY_BOUND, beyond_fidelity, parse_claim, validate_claim

    if isinstance(data, dict):
        data = {"dtype": dtype, **data}
        if threshold is not None:
            data["fraud_threshold"] = threshold
    try:
        claim = parse_claim(data)
    except fields.FieldError as e:
        raise fields.FieldError("file", f"{args.file!r}: {e}") from None
    engine = _engine(args, claim.params, claim.dtype)
    with progress_display(len(claim.nonces), "validate") as bar:
        report = validate_claim(engine, claim, on_step=bar.update)
    print(json.dumps(report))
    verdict = "FRAUD" if report["fraud"] else "not fraud"
    line = (f"{report['n_invalid']} of {report['n']} invalid, p-value {report['p_value']:.3g}: {verdict} "
            f"at threshold {report['fraud_threshold']:g}")
    far = beyond_fidelity(claim, report["recomputed_dist"])
    if far:
        line += (f"; {far} claimed distance(s) differ from the recomputed ones by more than two faithful "
                 f"{claim.dtype} computations can ({2 * FIDELITY_BOUND[claim.dtype]:.3g}; largest gap "
                 f"{report['max_abs_gap']:.3g}), which the verdict leaves out: the network's rule counts only "
                 f"recomputed distances above r_target")
    print(line, file=sys.stderr)
    return EXIT_FRAUD if report["fraud"] else 0


def cmd_bench(args) -> int:
    v = _checked(args)
    seconds = fields.number(vars(args), "seconds")
    sustained_seconds = fields.sustained_seconds(vars(args), default=fields.DEFAULT_SUSTAINED_S)
    from .bench import run_bench

    engine = _engine(args, v["params"], v["dtype"])
    if args.batch is not None:  # bench runs the batch it is given: it must fit
        try:
            engine.check_fits(v["params"], v["dtype"], args.batch)
        except fields.FieldError as e:
            raise fields.FieldError("batch", e.message) from None
    screen, margin = fields.screen(vars(args))
    if not screen and args.r_target is not None:
        raise fields.FieldError("r_target", "applies only with --screen (bench counts valid nonces only then)")
    if screen and args.sustained_seconds is not None:
        raise fields.FieldError("sustained_seconds", "applies only without --screen")
    if screen:
        from .bench import run_screen_bench
        from .screen import ScreenedSearch

        ScreenedSearch.check(engine, screen)
        r_target = fields.number(vars(args), "r_target", DEFAULT_R_TARGET)
        report = run_screen_bench(engine, v["params"], v["dtype"], v["block_hash"], v["public_key"], seconds,
                                  r_target, margin, screen, batch=args.batch)
    else:
        report = run_bench(engine, v["params"], v["dtype"], v["block_hash"], v["public_key"], seconds,
                           batch=args.batch, sustained_seconds=sustained_seconds)
    print(json.dumps(report))
    return 0


COMMANDS = {"distances": cmd_distances, "search": cmd_search, "validate": cmd_validate, "bench": cmd_bench,
            "remote": remote.run}


def _one_line(text: str, limit: int = 500) -> str:
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _silence_stdout() -> None:
    """After a broken pipe: later writes (and the flush at exit) go nowhere instead of failing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def main(argv: list[str] | None = None, prog: str = "jaxbench") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    existing = set(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # a library's logged exception (JAX's plugin set-up, say) is one line too
        for handler in set(logging.getLogger().handlers) - existing:
            handler.addFilter(_without_traceback)
    quiet_backend_probes()
    try:
        with _options(args):
            status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a failing write (a full disk, a closed pipe) is reported here, not at exit
        return status
    except (fields.FieldError, ParamsError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ResultWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing more to say
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 — one line, the traceback only when asked for
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {_one_line(str(e))}"
              + ("" if args.verbose else " (-v shows the traceback)"), file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    """The `jaxbench` console script."""
    sys.exit(main())
