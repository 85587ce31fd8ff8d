"""What an e4m3 weight product gives on this card against the float16 one, on the model's own shapes.

For each product of a parameter set's FFN (x·w13 or x·w1, then the hidden state · w2) at a batch of
nonces: the float16 product as the exact step runs it, and the product of jaxbench/fp8.py with the
weight quantized beforehand (as a screen holds it) — once with x already in e4m3 (the product
alone) and once with x quantized per row inside the timed function (as the screen runs it). Reports
each one's compile time, time per call, TFLOP/s, and the custom calls XLA compiled it to (cuBLASLt's
FP8 GEMM shows as `__cublas$lt$matmul$f8`). Progress goes to stderr as it runs; the JSON is written
after each product, so a run cut short keeps what it measured.

    python scripts/fp8_gemm_rate.py [--params mainnet,bench] [--batch 64] [--reps 20] [--out $OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxbench import fp8  # noqa: E402
from jaxbench.params import params_from_text  # noqa: E402
from jaxbench.steps import COMPILER_OPTIONS  # noqa: E402

T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {text}", file=sys.stderr, flush=True)


def custom_calls(compiled) -> list[str]:
    """The custom calls of the compiled program, and "__triton_gemm" where XLA made a product a Triton
    fusion instead of a library call."""
    text = compiled.as_text()
    calls = {line.split('custom_call_target="')[1].split('"')[0] for line in text.splitlines()
             if 'custom_call_target="' in line}
    return sorted(calls | ({"__triton_gemm"} if "__triton_gemm" in text else set()))


def timed(fn, args, reps: int, options: dict | None) -> dict:
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    t = time.perf_counter()
    for _ in range(reps):
        out = compiled(*args)
    jax.block_until_ready(out)
    return {"compile_s": round(compile_s, 2), "seconds": (time.perf_counter() - t) / reps,
            "custom_calls": custom_calls(compiled)}


def products(params, batch: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, K, N) of the FFN's two products for `batch` nonces."""
    rows = batch * params.seq_len
    return [("gate_up", rows, params.dim, 2 * params.hidden_dim),
            ("down", rows, params.hidden_dim, params.dim)]


def measure(name: str, m: int, k: int, n: int, reps: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (m, k), jnp.float16)
    w = (jax.random.normal(keys[1], (k, n), jnp.float32) / k ** 0.5).astype(jnp.float16)
    w8 = jax.jit(fp8.quantize_weight)(w)
    x8, x_scale = jax.jit(fp8.quantize_rows)(x)
    flops = 2 * m * k * n
    row = {"product": name, "m": m, "k": k, "n": n}
    runs = {
        "float16": (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.float16), (x, w)),
        "fp8_product": (lambda x8, s, w8: fp8.scaled_product(x8, s, w8, jnp.float16), (x8, x_scale, w8)),
        "fp8_with_row_quantization": (lambda x, w8: fp8.linear(x, w8), (x, w8)),
    }
    for label, (fn, args) in runs.items():
        say(f"{name} ({m}×{k}·{k}×{n}) {label}: compiling")
        r = timed(fn, args, reps, None if label == "float16" else COMPILER_OPTIONS["fp8"])
        r["tflops"] = round(flops / r["seconds"] / 1e12, 1)
        r["seconds"] = round(r["seconds"], 6)
        row[label] = r
        say(f"{name} {label}: compile {r['compile_s']} s, {r['seconds'] * 1e3:.3f} ms, {r['tflops']} TFLOP/s, "
            f"calls {r['custom_calls']}")
    row["speedup_product"] = round(row["float16"]["seconds"] / row["fp8_product"]["seconds"], 3)
    row["speedup_with_quantization"] = round(row["float16"]["seconds"] / row["fp8_with_row_quantization"]["seconds"], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="mainnet,bench")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    args = ap.parse_args()
    out = Path(args.out) / "fp8_gemm_rate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch, "rows": []}
    for name in args.params.split(","):
        for product, m, k, n in products(params_from_text(name), args.batch):
            report["rows"].append({"params": name, **measure(product, m, k, n, args.reps)})
            out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
