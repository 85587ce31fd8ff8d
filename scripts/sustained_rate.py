"""How fast the matrix units run when kept busy for seconds, as a step keeps them (GPU only).

The FLOP floor assumes 800 TFLOP/s. A product timed over a few calls can reach that; a search keeps
the card busy for minutes. For each workload this runs back-to-back calls for `--seconds`
(jaxbench.sustained.window_tflops, the loop `bench` uses for its ceiling), reports TFLOP/s per
window of about a quarter second, and samples the card's SM clock, power draw and the
reasons the driver gives for holding the clock down (nvidia-smi) while it runs:

  square         one 8192³ product through XLA (cuBLAS)
  gated-ffn      the gated half of mainnet's FFN, the Hopper kernel (gated_ffn.py), `--rows` rows
  gated-ffn-cluster2   the same with two CTAs sharing each weight slice (GatedConfig(cluster=2))
  down           mainnet's down projection through XLA (cuBLAS), `--rows` rows

    python scripts/sustained_rate.py [--seconds 6] [--rows 32768] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxbench import gated_ffn  # noqa: E402
from jaxbench.model import matmul  # noqa: E402
from jaxbench.params import PRESETS  # noqa: E402
from jaxbench.sustained import WINDOW_S, square_runs, window_tflops  # noqa: E402
from smi import SmiSampler  # noqa: E402

SMI_FIELDS = {"sm_mhz": "clocks.sm", "watts": "power.draw", "celsius": "temperature.gpu",
              "reasons": "clocks_throttle_reasons.active"}


def sustained(fn, args, flops: float, seconds: float) -> dict:
    jax.block_until_ready(fn(*args))  # compiled before the card is sampled
    with SmiSampler(SMI_FIELDS, gpu=0) as card:
        rates = window_tflops([(fn, args)], flops, seconds)
    clocks = [s["sm_mhz"] for s in card.samples]
    reasons = sorted({s["reasons"] for s in card.samples})
    return {
        "first_window_tflops": round(rates[0], 1),
        "last_second_tflops": round(statistics.mean(rates[-max(1, round(1 / WINDOW_S)):]), 1),
        "median_tflops": round(statistics.median(rates), 1),
        "windows_tflops": [round(r, 1) for r in rates],
        "sm_mhz_median": statistics.median(clocks) if clocks else None,
        "sm_mhz_min": min(clocks) if clocks else None,
        "watts_max": max((s["watts"] for s in card.samples), default=None),
        "celsius_max": max((s["celsius"] for s in card.samples), default=None),
        "clock_reasons_seen": reasons,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--workloads", default="square,gated-ffn,down")
    ap.add_argument("--rest", type=float, default=3.0, help="idle seconds before each workload")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = jnp.float16
    p = PRESETS["mainnet"]
    keys = jax.random.split(jax.random.key(0), 3)

    def normal(key, shape, scale):
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    workloads = []  # a name may come twice: the second run shows the drift between them
    for name in args.workloads.split(","):
        if name == "square":
            (run,), flops = square_runs(jax.devices()[:1])
            workloads.append((name, *run, flops))
        elif name in ("gated-ffn", "gated-ffn-cluster2"):
            config = gated_ffn.GatedConfig(cluster=2 if name.endswith("cluster2") else 1)
            x, w13 = normal(keys[0], (args.rows, p.dim), 1.0), normal(keys[1], (p.dim, 2 * p.hidden_dim), 0.02)
            workloads.append((name, jax.jit(lambda x, w, c=config: gated_ffn.gated_ffn(x, w, c)), (x, w13),
                               4 * args.rows * p.dim * p.hidden_dim))
        elif name == "down":
            h, w2 = normal(keys[0], (args.rows, p.hidden_dim), 0.5), normal(keys[1], (p.hidden_dim, p.dim), 0.02)
            workloads.append((name, jax.jit(lambda a, b: matmul("sh,hd->sd", a, b)), (h, w2),
                              2 * args.rows * p.hidden_dim * p.dim))
        else:
            raise SystemExit(f"unknown workload {name!r}")
    rows = []
    for name, fn, fn_args, flops in workloads:
        time.sleep(args.rest)
        row = {"workload": name, "seconds": args.seconds, **sustained(fn, fn_args, flops, args.seconds)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "windows_tflops"}), flush=True)
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
