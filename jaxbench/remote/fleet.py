"""`jaxbench remote bench`: the benchmark on N workers of a Vast.ai Serverless endpoint, one row each.

N `/benchmark` requests go out at once through the vastai SDK's Serverless client; the autoscaler
routes each to a worker, so N idle workers get one each. A worker's model server runs the search
for `--seconds` and answers with its timed window, its GPUs' telemetry and, with
`--sustained-seconds`, the rate its cards sustain (service/benchmark.py); its PyWorker adds the
worker's Vast instance id, by which the console's instance record (the SDK's `show_instance`) gives
its price, `dph_total` in $/hour. Each worker becomes one row (ROW_FIELDS): GPU model and count,
nonces/s, TFLOP/s per GPU, % of sustained, J/nonce, power and clock, the share of samples held by
the power cap, $/hour and nonces per dollar. A worker that failed has a row with its error; a
price the console does not give is null.

Files in `--out-dir` (default `jaxbench-fleet-<UTC time>`): fleet.json (the rows and every
worker's whole answer; also printed on stdout), fleet.csv (a row per worker), fleet.md (a Markdown
table) and fleet.png (nonces/s and nonces per dollar per worker). A progress bar and the table on
stderr. Exit status 0, 1 when a worker's request failed (the files are written all the same), 2
for bad input (a missing VAST_API_KEY or an unknown endpoint included).
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

from .. import fields, options
from ..params import DEFAULT_R_TARGET, PRESETS, params_from_text
from . import vast

log = logging.getLogger("jaxbench.remote.fleet")

ROUTE = "/benchmark"
BLOCK_HASH = "jaxbench-fleet-benchmark"
PUBLIC_KEY = "jaxbench-fleet-benchmark"
NO_NONCE_LIMIT = 2**62  # the request ends by its duration
WORKER_TIMEOUT_S = 600  # the SDK's wait for a worker's answer once it has the request

ROW_FIELDS = (
    "worker",  # the worker's URL, as the autoscaler routed the request
    "vast_instance_id",
    "gpu",  # NVML's name of its cards, else JAX's device kind
    "gpu_count",
    "nonces_per_s",  # the timed window's rate (all of the worker's GPUs)
    "tflops_per_gpu",
    "sustained_tflops",  # per GPU: float16 square products kept busy
    "percent_of_sustained",
    "joules_per_nonce",
    "mean_power_w",  # per GPU
    "power_limit_w",  # per GPU
    "mean_sm_clock_mhz",
    "power_cap_share",  # share of samples in which the software power cap held the clock
    "dollars_per_hour",  # the instance's dph_total
    "nonces_per_dollar",
    "error",
)


def add_parser(remote_commands) -> None:
    p = options.command(remote_commands, "bench", "run the benchmark on N workers: a row each (JSON, CSV, Markdown, "
                                                  "PNG)")
    vast.add_connection_options(p)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="workers to benchmark, one request each, all at once (default 1)")
    p.add_argument("--params", default="bench", metavar="P",
                   help=f"a preset ({', '.join(PRESETS)}), a JSON object, or @file.json (default bench)")
    options.dtype(p)
    p.add_argument("--seconds", type=float, default=20.0, metavar="S", help="length of each worker's search (default 20)")
    p.add_argument("--sustained-seconds", type=float, default=fields.DEFAULT_SUSTAINED_S,
                   help="then float16 square products for this long: the rate each card sustains "
                        f"(default {fields.DEFAULT_SUSTAINED_S:g}; 0 turns it off)")
    p.add_argument("--out-dir", default=None,
                   help="where fleet.json, fleet.csv, fleet.md and fleet.png go (default jaxbench-fleet-<UTC time>)")
    p.add_argument("--wait-timeout", type=float, default=900.0, metavar="S",
                   help="seconds a request may wait for a worker to start it (routing, cold start, queue)")
    p.set_defaults(run=run)


# Rows -------------------------------------------------------------------------------------------


def _rounded(value, digits: int):
    return None if value is None else round(value, digits)


def row(answer: dict, dollars_per_hour: float | None) -> dict:
    """One worker's row from the SDK's answer to its /benchmark request (and the instance's price)."""
    out = dict.fromkeys(ROW_FIELDS)
    out["worker"] = answer.get("url")
    body = answer.get("response")
    if not answer.get("ok") or not isinstance(body, dict):
        message = body.get("error") if isinstance(body, dict) else body
        out["error"] = f"HTTP {answer.get('status')}: {message}"
        return out
    share = body.get("clock_limited_share")
    rate = body.get("window_nonces_per_s")
    out |= {
        "vast_instance_id": body.get("vast_instance_id"),
        "gpu": body.get("gpu_name") or body.get("device_kind"),
        "gpu_count": body.get("devices"),
        "nonces_per_s": rate,
        "tflops_per_gpu": body.get("tflops_per_device"),
        "sustained_tflops": body.get("sustained_tflops"),
        "percent_of_sustained": body.get("percent_of_sustained"),
        "joules_per_nonce": body.get("energy_joules_per_nonce"),
        "mean_power_w": body.get("mean_power_w"),
        "power_limit_w": body.get("power_limit_w"),
        "mean_sm_clock_mhz": body.get("mean_sm_clock_mhz"),
        "power_cap_share": None if share is None else share.get("sw_power_cap"),
        "dollars_per_hour": dollars_per_hour,
        "nonces_per_dollar": (_rounded(rate * 3600 / dollars_per_hour, 0)
                              if rate is not None and dollars_per_hour else None),
    }
    if body.get("reason") not in ("completed", "duration"):
        out["error"] = f"the search ended: {body.get('reason')}"
    elif rate is None:
        out["error"] = "no timed window (the search ran one step)"
    return out


def _text(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    head = ["#", "GPU", "GPUs", "nonces/s", "TFLOP/s a GPU", "% of sustained", "J/nonce", "W a GPU (limit)",
            "SM MHz", "power-capped", "$/hour", "nonces per $", "instance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        if r["error"] is not None and r["nonces_per_s"] is None:
            cells = [str(i), f"failed: {r['error']}".replace("|", "/"), *["–"] * (len(head) - 3), _text(r["vast_instance_id"])]
        else:
            power = (f"{_text(r['mean_power_w'], 0)} ({_text(r['power_limit_w'], 0)})"
                     if r["mean_power_w"] is not None else "–")
            capped = "–" if r["power_cap_share"] is None else f"{100 * r['power_cap_share']:.0f} %"
            cells = [str(i), _text(r["gpu"]), _text(r["gpu_count"]), _text(r["nonces_per_s"], 2),
                     _text(r["tflops_per_gpu"]), _text(r["percent_of_sustained"]), _text(r["joules_per_nonce"], 3),
                     power, _text(r["mean_sm_clock_mhz"], 0), capped, _text(r["dollars_per_hour"], 3),
                     _text(r["nonces_per_dollar"], 0), _text(r["vast_instance_id"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_chart(path: Path, rows: list[dict], title: str) -> None:
    """Two bar panels, a bar per worker: nonces/s, and nonces per dollar (where the price is known)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    labels = [f"#{i} {r['gpu']} ×{r['gpu_count']}" if r["gpu"] else f"#{i} failed" for i, r in enumerate(rows, 1)]
    fig = Figure(figsize=(11, 1.6 + 0.45 * len(rows)))
    panels = (("nonces_per_s", "nonces/s (timed window)", "tab:blue", 1),
              ("nonces_per_dollar", "nonces per dollar", "tab:green", 0))
    for ax, (key, xlabel, color, digits) in zip(fig.subplots(1, 2, sharey=True), panels):
        values = [r[key] or 0 for r in rows]
        bars = ax.barh(range(len(rows)), values, color=color)
        for bar, r in zip(bars, rows):
            note = ("failed" if r["nonces_per_s"] is None else "no price") if r[key] is None else f"{r[key]:,.{digits}f}"
            ax.annotate(note, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, 1.25 * max(values) if any(values) else 1)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Requests ---------------------------------------------------------------------------------------


def _payload(params, dtype: str, seconds: float, sustained_seconds: float) -> dict:
    return {"block_hash": BLOCK_HASH, "block_height": 0, "public_key": PUBLIC_KEY, "r_target": DEFAULT_R_TARGET,
            "batch_size": 1,  # required by the model server, which picks the device batch itself
            "start_nonce": 0, "params": params.to_dict(), "dtype": dtype, "duration_s": seconds,
            "max_nonces": NO_NONCE_LIMIT, "sustained_seconds": sustained_seconds}


async def _benchmark(endpoint, payload: dict, wait_timeout: float) -> dict:
    """One worker's answer as the SDK gives it (`ok`, `status`, `response`, `url`), failures included."""
    try:
        return await asyncio.wait_for(endpoint.request(ROUTE, payload, cost=0, stream=False, timeout=wait_timeout),
                                      wait_timeout + WORKER_TIMEOUT_S + 60)
    except asyncio.TimeoutError:
        return {"ok": False, "status": None, "response": f"no answer within {wait_timeout:g} s of waiting for a worker"}
    except Exception as e:  # noqa: BLE001 — the SDK raises plain exceptions for routing failures
        return {"ok": False, "status": None, "response": f"{type(e).__name__}: {e}"}


def _price(api_key: str, webserver_url: str | None, instance_id) -> float | None:
    """The instance's $/hour (dph_total) from the console, through the SDK; None where it has none."""
    from vastai.sdk import VastAI

    if not isinstance(instance_id, int):
        return None
    try:
        record = VastAI(api_key=api_key, server_url=webserver_url, retry=2).show_instance(id=instance_id)
    except Exception as e:  # noqa: BLE001 — a price is extra: the row stays, without it
        log.warning("no price for instance %s: %s: %s", instance_id, type(e).__name__, e)
        return None
    price = (record or {}).get("dph_total")
    return float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) and price > 0 else None


async def _fleet(args, checked, payload: dict, workers: int, bar) -> list[tuple[dict, float | None]]:
    api_key = checked[0]
    async with vast.connect(args, connection_limit=workers + 16, checked=checked) as router:

        async def one() -> tuple[dict, float | None]:
            answer = await _benchmark(router.endpoint, payload, args.wait_timeout)
            body = answer.get("response")
            instance = body.get("vast_instance_id") if answer.get("ok") and isinstance(body, dict) else None
            price = await asyncio.to_thread(_price, api_key, args.webserver_url, instance)
            bar.update(1)
            return answer, price

        return await asyncio.gather(*(one() for _ in range(workers)))


def _out_dir(args) -> Path:
    path = Path(args.out_dir or time.strftime("jaxbench-fleet-%Y%m%dT%H%M%SZ", time.gmtime()))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fields.FieldError("out_dir", f"cannot use {str(path)!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise fields.FieldError("out_dir", f"cannot write in {str(path)!r}")
    return path


def run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..progress import progress_display

    params = params_from_text(args.params)
    dtype = fields.dtype(vars(args))
    workers = fields.integer(vars(args), "workers", minimum=1)
    seconds = fields.number(vars(args), "seconds")
    sustained_seconds = fields.sustained_seconds(vars(args))
    fields.number(vars(args), "wait_timeout")
    checked = vast.check_options(args)
    out_dir = _out_dir(args)

    payload = _payload(params, dtype, seconds, sustained_seconds)
    started = time.time()
    with progress_display(workers, "remote bench", unit="worker", units="workers", rate=False) as bar, \
            logging_redirect_tqdm():
        try:
            answers = vast.run_async(_fleet(args, checked, payload, workers, bar))
        except vast.RemoteError as e:
            bar.write(f"error: {e}", file=sys.stderr)
            return options.EXIT_ERROR
    rows = [row(answer, price) for answer, price in answers]
    preset = next((name for name, p in PRESETS.items() if p == params), None)
    report = {"endpoint": args.endpoint, "params": preset or params.to_dict(), "dtype": dtype, "seconds": seconds,
              "sustained_seconds": sustained_seconds, "started_at": round(started, 3), "workers": workers,
              "rows": rows, "answers": [{"url": a.get("url"), "status": a.get("status"), "response": a.get("response")}
                                        for a, _ in answers]}
    title = f"{preset or 'custom params'}, {dtype}: {workers} worker(s) of {args.endpoint}"
    (out_dir / "fleet.json").write_text(json.dumps(report, indent=1) + "\n")
    write_csv(out_dir / "fleet.csv", rows)
    table = markdown(rows)
    (out_dir / "fleet.md").write_text(f"# {title}\n\n{table}")
    written = ["fleet.json", "fleet.csv", "fleet.md"]
    try:
        write_chart(out_dir / "fleet.png", rows, title)
        written.append("fleet.png")
    except ImportError:
        print("no chart: matplotlib is not installed", file=sys.stderr)
    print(json.dumps(report), flush=True)
    failed = [r for r in rows if r["error"] is not None]
    distinct = len({r["worker"] for r in rows if r["worker"]})
    print(table, end="", file=sys.stderr)
    print(f"{workers - len(failed)} of {workers} worker(s) measured ({distinct} distinct); "
          f"{', '.join(written)} in {out_dir}", file=sys.stderr)
    return options.EXIT_ERROR if failed else options.EXIT_OK
