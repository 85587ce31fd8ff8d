"""The gated-FFN kernel against XLA on the FFN shapes of the presets: agreement and speed (GPU only).

For each (preset, rows) it times, on random data of the model's scale:
  xla        two products (x·W1, x·W3) and the SwiGLU, as the reference layout runs;
  xla-w13    one product against the interleaved weights, then the SwiGLU;
  pallas/…   the kernel (gated_ffn.py) in each configuration asked for,
and reports TFLOP/s of the gated half (4·rows·dim·hidden FLOPs) and how many output elements differ
from the xla path, by how many units in the last place at most. With `--down`, it also times the down
projection through JAX's Hopper matmul kernel in the DOWN_CONFIGS asked for, against cuBLAS.

    python scripts/gated_ffn_check.py [--presets mainnet,bench] [--rows 16384,32768] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxbench import gated_ffn  # noqa: E402
from jaxbench.model import matmul, swiglu  # noqa: E402
from jaxbench.params import PRESETS  # noqa: E402
from jaxbench.weights import JNP_DTYPES, interleave_columns  # noqa: E402

CONFIGS = {
    "c2s3": gated_ffn.GatedConfig(cluster=2, stages=3),
    "c1s3": gated_ffn.GatedConfig(cluster=1, stages=3),
    "c1s4": gated_ffn.GatedConfig(cluster=1, stages=4),
    "c1r128b64s4": gated_ffn.GatedConfig(cluster=1, rows=128, block=64, stages=4),
    "c1s3w16": gated_ffn.GatedConfig(cluster=1, stages=3, grid_tile_width=16),
}

# The FFN's down projection (rows, hidden)·(hidden, dim) through JAX's Hopper matmul kernel
# (jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu), against XLA's cuBLAS call:
# per-warpgroup tile (m, n), which dimension the two compute warpgroups split, cluster dimension.
DOWN_CONFIGS = {
    "m128n128wgM": dict(tile_m=128, tile_n=128, wg="M", cluster=None),
    "m64n256wgM": dict(tile_m=64, tile_n=256, wg="M", cluster=None),
    "m128n128wgN": dict(tile_m=128, tile_n=128, wg="N", cluster=None),
    "m128n128wgMcM": dict(tile_m=128, tile_n=128, wg="M", cluster="M"),
    "m64n256wgMcM": dict(tile_m=64, tile_n=256, wg="M", cluster="M"),
}


def timed(fn, *args, reps: int = 10) -> float:
    """Median seconds of one call over `reps` calls, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@jax.jit
def _ulp_counts(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    ia = jax.lax.bitcast_convert_type(a, jnp.int16).astype(jnp.int32)
    ib = jax.lax.bitcast_convert_type(b, jnp.int16).astype(jnp.int32)
    # Map sign-magnitude bit patterns to a monotonic integer line.
    ia = jnp.where(ia < 0, -32768 - ia, ia)
    ib = jnp.where(ib < 0, -32768 - ib, ib)
    diff = jnp.abs(ia - ib)
    return jnp.count_nonzero(diff), diff.max(), jnp.isfinite(a).all()


def ulp_gap(a: jax.Array, b: jax.Array) -> tuple[int, int, bool]:
    """(elements that differ, largest difference in units in the last place, all finite) of two 16-bit
    arrays, computed where they are."""
    differ, max_ulp, finite = _ulp_counts(a, b)
    return int(differ), int(max_ulp), bool(finite)


def measured(row: dict, fn, args: tuple, flops: int, reference: jax.Array) -> dict:
    """`row` (preset, rows, variant) with the variant's time, rate and gap to `reference`, or the error
    that stopped it (a configuration that does not build is a result); printed as it comes."""
    try:
        out = fn(*args)
        seconds = timed(fn, *args)
    except Exception as e:  # noqa: BLE001
        return {**row, "error": str(e)[:300]}
    differ, max_ulp, finite = ulp_gap(out, reference)
    row = {**row, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "differ": differ, "max_ulp": max_ulp,
           "finite": finite}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def down_projection(p, preset: str, rows: int, dtype, names: list[str]) -> list[dict]:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hopper

    k1, k2 = jax.random.split(jax.random.key(1))
    h = (0.5 * jax.random.normal(k1, (rows, p.hidden_dim), jnp.float32)).astype(dtype)
    w2 = (0.02 * jax.random.normal(k2, (p.hidden_dim, p.dim), jnp.float32)).astype(dtype)
    flops = 2 * rows * p.hidden_dim * p.dim
    xla = jax.jit(lambda a, b: matmul("sh,hd->sd", a, b))
    reference = xla(h, w2)
    row = {"preset": preset, "rows": rows}
    out = [measured({**row, "variant": "down/xla"}, xla, (h, w2), flops, reference)]
    dims = hopper.MatmulDimension
    for name in names:
        c = DOWN_CONFIGS[name]
        config = hopper.TuningConfig(
            tile_m=c["tile_m"], tile_n=c["tile_n"], tile_k=64, max_concurrent_steps=4, grid_minor_dim=dims.N,
            grid_tile_width=8, wg_dimension=dims[c["wg"]],
            cluster_dimension=dims[c["cluster"]] if c["cluster"] else None)
        fn = jax.jit(lambda a, b, config=config: hopper.matmul(a, b, None, config))
        out.append(measured({**row, "variant": "down/" + name}, fn, (h, w2), flops, reference))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="mainnet,bench")
    ap.add_argument("--rows", default="16384,32768,65536")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--down", default="", help="also time the down projection with these DOWN_CONFIGS "
                    "(comma-separated, 'all' for every one)")
    ap.add_argument("--json", default=None, help="also write the rows of the table to this file")
    args = ap.parse_args()
    dtype = JNP_DTYPES[args.dtype]
    results = []
    for name in args.presets.split(","):
        p = PRESETS[name]
        d, h = p.dim, p.hidden_dim
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        w1 = (0.02 * jax.random.normal(k1, (d, h), jnp.float32)).astype(dtype)
        w3 = (0.02 * jax.random.normal(k2, (d, h), jnp.float32)).astype(dtype)
        for rows in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(k3, (rows, d), jnp.float32).astype(dtype)
            flops = 4 * rows * d * h
            two = jax.jit(lambda x, a, b: swiglu(matmul("sd,dh->sh", x, a), matmul("sd,dh->sh", x, b)))
            reference = two(x, w1, w3)
            row = {"preset": name, "rows": rows}
            results.append(measured({**row, "variant": "xla"}, two, (x, w1, w3), flops, reference))
            variants = {}
            block = CONFIGS[args.configs.split(",")[0]].block

            def one_product(x, w, block=block):
                return swiglu(*gated_ffn.split_gate_up(matmul("sd,dh->sh", x, w), block))

            variants["xla-w13"] = (jax.jit(one_product), block)
            for cname in args.configs.split(","):
                config = CONFIGS[cname]
                if gated_ffn.applies(rows, d, h, dtype, config):
                    variants["pallas/" + cname] = (jax.jit(lambda x, w, c=config: gated_ffn.gated_ffn(x, w, c)),
                                                   config.block)
            for vname, (fn, block) in variants.items():
                w13 = interleave_columns(w1, w3, block)
                results.append(measured({**row, "variant": vname}, fn, (x, w13), flops, reference))
                del w13
    if args.down:
        names = list(DOWN_CONFIGS) if args.down == "all" else args.down.split(",")
        for name in args.presets.split(","):
            for rows in (int(r) for r in args.rows.split(",")):
                results += down_projection(PRESETS[name], name, rows, dtype, names)
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in results) + "\n")
    print(f"{'preset':8} {'rows':>7} {'variant':22} {'ms':>8} {'TFLOP/s':>8} {'differ':>9} {'ulp':>4}")
    for r in results:
        if "error" in r:
            print(f"{r['preset']:8} {r['rows']:>7} {r['variant']:22} ERROR {r['error'][:150]}")
        else:
            print(f"{r['preset']:8} {r['rows']:>7} {r['variant']:22} {r['ms']:8.3f} {r['tflops']:8.1f} "
                  f"{r['differ']:>9} {r['max_ulp']:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
