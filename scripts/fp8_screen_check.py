"""How far an FP8 screen's distances fall from float16's, and what a screen at a margin would keep.

For each parameter set: N nonces through the exact float16 step (the engine's) and through the same
model with every weight product in e4m3 (jaxbench/fp8.py; attention's own products in float16), the
same inputs, permutations and weights. Reports the gap |fp8 − float16| (median, 99th percentile,
max), how long a step of each takes, whether XLA's compiled FP8 step calls an FP8 GEMM, and for
`r_target` at the float16 distances' 0.1 %, 1 % and 5 % quantiles and at the network's value: the
recall of the valid nonces (float16 distance below r_target) among the screen's candidates (FP8
distance below r_target + margin), and the share of nonces that are candidates, at each margin.

    python scripts/fp8_screen_check.py --params mainnet,bench --nonces 4096 [--start 0] [--budget-seconds S] [--out $OUT]
    python scripts/fp8_screen_check.py --merge a.npz b.npz ...   # one table over several runs' nonces
    python scripts/fp8_screen_check.py --params mainnet --nonces 20480 --exact-from a.npz b.npz ...

Writes fp8_screen_check.json after each set (and prints it), and each set's distances to
fp8_screen_distances-<params>-<start>.npz, so that runs over different nonces (`--start`) can be
merged into one table; progress goes to stderr. With `--exact-from`, the float16 distances come from
earlier runs' files (same parameter set, batch and nonces) and only the screen's step runs, after
the first step's float16 distances are checked against the files bit for bit. With `--budget-seconds` a set stops taking steps
once that much time has passed since the script started and reports the nonces it did. Both steps
are the engine's (`Engine.compiled_step`, products "exact" and "fp8"), the e4m3 weights its
`Engine.screen_weights`, made once.
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
import numpy as np  # noqa: E402

from jaxbench.engine import Engine  # noqa: E402
from jaxbench.feeder import prepare_step  # noqa: E402
from jaxbench.job import SearchJob  # noqa: E402
from jaxbench.nonces import NonceSchedule  # noqa: E402
from jaxbench.params import DEFAULT_R_TARGET, params_from_text  # noqa: E402
from fp8_gemm_rate import custom_calls  # noqa: E402  (this script's folder)

MARGINS = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02)
QUANTILES = (0.001, 0.01, 0.05)


T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {text}", file=sys.stderr, flush=True)


def seconds_per_step(fn, *args, reps: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def screen_table(exact: np.ndarray, screened: np.ndarray, r_target: float) -> list[dict]:
    valid = exact < r_target
    rows = []
    for margin in MARGINS:
        candidates = screened < r_target + margin
        kept = int((valid & candidates).sum())
        rows.append({"margin": margin, "recall": round(kept / max(int(valid.sum()), 1), 6),
                     "missed": int(valid.sum()) - kept, "candidate_share": round(float(candidates.mean()), 6)})
    return rows


def distance_tables(exact: np.ndarray, screened: np.ndarray) -> dict:
    """The gap and, at each r_target, the screen's recall and candidates, over these nonces."""
    gap = np.abs(screened - exact)
    targets = {f"q{q:g}": float(np.quantile(exact, q)) for q in QUANTILES}
    targets["network"] = DEFAULT_R_TARGET
    return {
        "nonces": int(len(exact)),
        "float16_distance": {"mean": float(exact.mean()), "std": float(exact.std())},
        "gap": {"median": float(np.median(gap)), "p99": float(np.quantile(gap, 0.99)), "max": float(gap.max()),
                "correlation": float(np.corrcoef(exact, screened)[0, 1])},
        "screens": {name: {"r_target": r, "valid": int((exact < r).sum()), "valid_share": float((exact < r).mean()),
                           "margins": screen_table(exact, screened, r)}
                    for name, r in targets.items()},
    }


def stored_exact(files: list[str]) -> dict[int, float]:
    """nonce → float16 distance from earlier runs' distance files."""
    known = {}
    for f in files:
        run = np.load(f)
        known.update(zip(range(int(run["first_nonce"]), int(run["first_nonce"]) + len(run["exact"])), run["exact"]))
    return known


def check(engine: Engine, params_text: str, n: int, batch: int | None, start: int, budget_s: float | None,
          out: Path, known_exact: dict[int, float] | None = None) -> dict:
    params, dtype = params_from_text(params_text), "float16"
    block_hash, public_key = "fp8-screen-" + params_text, "fp8-screen-key"
    say(f"{params_text}: building the weights")
    model = engine.load(params, block_hash, dtype)
    say(f"{params_text}: quantizing them to e4m3")
    t = time.perf_counter()
    screen_weights = engine.screen_weights(model)
    quantize_s = time.perf_counter() - t
    batch = batch or engine.batches.default(params, dtype)
    say(f"{params_text}: compiling the float16 step (batch {batch})")
    exact_step = engine.compiled_step(params, dtype, batch)
    say(f"{params_text}: compiled in {exact_step.compile_seconds:.1f} s; compiling the fp8 step")
    screen_step = engine.compiled_step(params, dtype, batch, "fp8")
    say(f"{params_text}: compiled in {screen_step.compile_seconds:.1f} s")
    job = SearchJob(params, block_hash, public_key, 0.0, NonceSchedule.for_node(start, limit=n), dtype)
    groups = model.placement.n_groups
    exact, screened = [], []
    exact_s = screen_s = 0.0
    for k, flat in enumerate(range(0, n, batch * groups)):
        prepared = prepare_step(engine.drawer, engine.draws_mode, model.stages, job, k, flat, batch)
        args = (prepared.inputs, prepared.permutations, model.target)
        if k == 0:
            exact_s = seconds_per_step(exact_step, model.weights, *args)
            screen_s = seconds_per_step(screen_step, screen_weights, *args)
            say(f"{params_text}: a step takes {exact_s:.4f} s in float16, {screen_s:.4f} s in fp8")
        real = sum(len(g) for g in prepared.per_group)
        nonces = [nonce for g in prepared.per_group for nonce in g]
        if known_exact is None or k == 0:
            exact.append(np.asarray(exact_step(model.weights, *args))[:real])
            if known_exact is not None:
                stored = np.array([known_exact[nonce] for nonce in nonces], np.float64)
                if not np.array_equal(stored, exact[0].astype(np.float64)):
                    raise SystemExit(f"{params_text}: the stored float16 distances differ from this run's; not reusing them")
                say(f"{params_text}: the first step's float16 distances equal the stored ones bit for bit")
        else:
            exact.append(np.array([known_exact[nonce] for nonce in nonces]))
        screened.append(np.asarray(screen_step(screen_weights, *args))[:real])
        if k % 10 == 9:
            say(f"{params_text}: {flat + real} of {n} nonces")
        if budget_s is not None and time.perf_counter() - T0 > budget_s:
            say(f"{params_text}: stopping at {flat + real} nonces, the time budget spent")
            break
    exact, screened = np.concatenate(exact)[:n].astype(np.float64), np.concatenate(screened)[:n].astype(np.float64)
    np.savez(out / f"fp8_screen_distances-{params_text}-{start}.npz", exact=exact, screened=screened,
             first_nonce=start)
    gemm_calls = sorted({call for program in screen_step.programs for call in custom_calls(program)})
    return {
        "params": params_text, "first_nonce": start, "batch": batch, "devices": groups,
        "device_kind": engine.devices[0].device_kind, "jax": jax.__version__,
        "quantize_seconds": round(quantize_s, 2),
        "compile_seconds": {"float16": round(exact_step.compile_seconds, 2), "fp8": round(screen_step.compile_seconds, 2)},
        **distance_tables(exact, screened),
        "step_seconds": {"float16": round(exact_s, 4), "fp8_screen": round(screen_s, 4),
                         "speedup": round(exact_s / screen_s, 3) if screen_s else None},
        "custom_calls_in_screen": gemm_calls,
        "fp8_gemm_in_screen": any("f8" in c.lower() for c in gemm_calls),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="mainnet,bench")
    ap.add_argument("--nonces", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--start", type=int, default=0, help="the first nonce")
    ap.add_argument("--budget-seconds", type=float, default=None)
    ap.add_argument("--merge", nargs="+", metavar="NPZ", help="print one table over these runs' distances")
    ap.add_argument("--exact-from", nargs="+", metavar="NPZ", help="take the float16 distances from these runs' files")
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    args = ap.parse_args()
    if args.merge:
        runs = [np.load(f) for f in args.merge]
        firsts = sorted(int(r["first_nonce"]) for r in runs)
        merged = distance_tables(np.concatenate([r["exact"] for r in runs]),
                                 np.concatenate([r["screened"] for r in runs]))
        print(json.dumps({"runs": args.merge, "first_nonces": firsts, **merged}, indent=1))
        return 0
    engine = Engine()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for p in args.params.split(","):  # written after each set: a run cut short keeps what it measured
        known = stored_exact(args.exact_from) if args.exact_from else None
        results.append(check(engine, p, args.nonces, args.batch, args.start, args.budget_seconds, Path(args.out), known))
        (Path(args.out) / "fp8_screen_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
