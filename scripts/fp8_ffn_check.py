"""The FP8 screen's FFN on the presets' shapes: the e4m3 gated kernel against XLA's form of the same
arithmetic, and the whole FFN against the exact float16 one (Hopper only).

For each preset, on random data of the model's scale (rows = nonces × seq_len), it times:
  exact        the float16 FFN as the exact step runs it (gated_ffn.gated_ffn, then x·W2);
  fp8-xla      the screen's FFN through XLA (fp8.gated_interleaved without a kernel, then the down
               product through cuBLASLt's FP8 GEMM);
  fp8/<config> the same with the gated half in gated_ffn.gated_ffn_fp8, for each configuration asked for;
and reports the gated half's and the whole FFN's time and TFLOP/s, how many e4m3 elements of the
kernel's hidden state differ from XLA's (and by how many e4m3 steps at most), and each FP8 FFN's
relative error against the float16 one (‖fp8 − float16‖ / ‖float16‖ over the output). The JSON is
written after each preset, so a run cut short keeps what it measured.

    python scripts/fp8_ffn_check.py [--presets mainnet,bench] [--rows 16384] [--configs s4,s3,...] [--out $OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxbench import fp8, gated_ffn  # noqa: E402
from jaxbench.model import matmul  # noqa: E402
from jaxbench.params import PRESETS  # noqa: E402
from jaxbench.steps import COMPILER_OPTIONS  # noqa: E402
from jaxbench.weights import interleave_columns  # noqa: E402
from gated_ffn_check import timed as median_call_seconds  # noqa: E402  (this script's folder)

BASE = gated_ffn.FP8_CONFIG
CONFIGS = {
    "s4": BASE,
    "s3": dataclasses.replace(BASE, stages=3),
    "s4c2": dataclasses.replace(BASE, cluster=2),
    "s4w16": dataclasses.replace(BASE, grid_tile_width=16),
    "s4e128": dataclasses.replace(BASE, epilogue_cols=128),
    "k64s8": dataclasses.replace(BASE, tile_k=64, stages=8),
}

T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {text}", file=sys.stderr, flush=True)


def compiled(fn, args):
    """fn compiled as the screen's step is (without XLA's Triton GEMMs, whose autotuning of e4m3
    products takes minutes)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=COMPILER_OPTIONS["fp8"])


def timed(fn, args, reps: int) -> tuple[float, float]:
    """(compile seconds, median seconds a call over `reps` calls)."""
    t = time.perf_counter()
    program = compiled(fn, args)
    compile_s = time.perf_counter() - t
    return compile_s, median_call_seconds(program, *args, reps=reps)


@jax.jit
def e4m3_steps(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(elements that differ, largest difference in e4m3 steps) of two e4m3 arrays."""
    def line(v):
        bits = jax.lax.bitcast_convert_type(v, jnp.int8).astype(jnp.int32)
        return jnp.where(bits < 0, -128 - bits, bits)  # sign-magnitude onto a monotonic line
    diff = jnp.abs(line(a) - line(b))
    return jnp.count_nonzero(diff), diff.max()


@jax.jit
def relative_error(approx: jax.Array, exact: jax.Array) -> jax.Array:
    a, e = approx.astype(jnp.float32), exact.astype(jnp.float32)
    return jnp.linalg.norm(a - e) / jnp.linalg.norm(e)


def check(preset: str, rows: int, configs: list[str], reps: int) -> dict:
    params = PRESETS[preset]
    dim, hidden, block = params.dim, params.hidden_dim, BASE.block
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (rows, dim), jnp.float16)
    w1, w3 = ((jax.random.normal(k, (dim, hidden), jnp.float32) / dim ** 0.5).astype(jnp.float16) for k in keys[1:3])
    w2 = (jax.random.normal(keys[3], (hidden, dim), jnp.float32) / hidden ** 0.5).astype(jnp.float16)
    w13 = interleave_columns(w1, w3, block)
    w13_q, w2_q = jax.jit(fp8.quantize_weight)(w13), jax.jit(fp8.quantize_weight)(w2)
    gated_flops, ffn_flops = 4 * rows * dim * hidden, 6 * rows * dim * hidden
    row = {"preset": preset, "rows": rows, "dim": dim, "hidden": hidden, "runs": {}}

    def record(name: str, gated_fn, ffn_fn, gated_args, ffn_args):
        compile_s, gated_s = timed(gated_fn, gated_args, reps)
        _, ffn_s = timed(ffn_fn, ffn_args, reps)
        row["runs"][name] = {"compile_s": round(compile_s, 2), "gated_ms": round(gated_s * 1e3, 3),
                             "gated_tflops": round(gated_flops / gated_s / 1e12, 1), "ffn_ms": round(ffn_s * 1e3, 3),
                             "ffn_tflops": round(ffn_flops / ffn_s / 1e12, 1)}
        say(f"{preset} {rows} rows {name}: gated {gated_s * 1e3:.3f} ms ({row['runs'][name]['gated_tflops']} TFLOP/s), "
            f"FFN {ffn_s * 1e3:.3f} ms ({row['runs'][name]['ffn_tflops']} TFLOP/s)")

    exact_config = dataclasses.replace(gated_ffn.DEFAULT_CONFIG, block=block)
    exact_gated = lambda x, w13: gated_ffn.gated_ffn(x, w13, exact_config)
    exact_ffn = lambda x, w13, w2: matmul("sh,hd->sd", exact_gated(x, w13), w2)
    record("exact", exact_gated, exact_ffn, (x, w13), (x, w13, w2))
    reference_out = jax.jit(exact_ffn)(x, w13, w2)

    def fp8_forms(kernel):
        gated = lambda x, w13_q: fp8.gated_interleaved(x, w13_q, block, kernel)
        ffn = lambda x, w13_q, w2_q: fp8.scaled_product(*gated(x, w13_q), w2_q, jnp.float16)
        return gated, ffn

    xla_gated, xla_ffn = fp8_forms(None)
    record("fp8-xla", xla_gated, xla_ffn, (x, w13_q), (x, w13_q, w2_q))
    xla_h, _ = compiled(xla_gated, (x, w13_q))(x, w13_q)
    ffn_out = compiled(xla_ffn, (x, w13_q, w2_q))(x, w13_q, w2_q)
    row["runs"]["fp8-xla"]["relative_error"] = float(relative_error(ffn_out, reference_out))
    for name in configs:
        config = CONFIGS[name]
        if not gated_ffn.applies_fp8(rows, dim, hidden, config):
            say(f"{preset}: {name} does not fit {rows}×{dim}·{dim}×{2 * hidden}")
            continue
        gated, ffn = fp8_forms(config)
        label = f"fp8/{name}"
        try:
            record(label, gated, ffn, (x, w13_q), (x, w13_q, w2_q))
        except Exception as e:  # a configuration the card or compiler refuses: say so, measure the rest
            row["runs"][label] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            say(f"{preset} {label}: {type(e).__name__}: {str(e)[:400]}")
            continue
        h, _ = compiled(gated, (x, w13_q))(x, w13_q)
        differ, most = e4m3_steps(h, xla_h)
        ffn_out = compiled(ffn, (x, w13_q, w2_q))(x, w13_q, w2_q)
        row["runs"][label].update(
            differing_elements=int(differ), elements=int(h.size), max_e4m3_steps=int(most),
            relative_error=float(relative_error(ffn_out, reference_out)))
        say(f"{preset} {label}: {int(differ)} of {h.size} hidden elements differ from XLA's (at most {int(most)} steps), "
            f"FFN error {row['runs'][label]['relative_error']:.3e}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="mainnet,bench")
    ap.add_argument("--rows", default="16384")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    args = ap.parse_args()
    out = Path(args.out) / "fp8_ffn_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "results": []}
    for preset in args.presets.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            report["results"].append(check(preset, rows, args.configs.split(","), args.reps))
            out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
