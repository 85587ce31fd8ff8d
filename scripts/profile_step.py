"""Profile a few engine steps with jax.profiler and print where the device time goes, by kernel.

    python scripts/profile_step.py --params bench [--dtype float16] [--batch 64] [--steps 3] [--out DIR]

Reads the Chrome-trace file the profiler writes and sums device-side event durations by name.
"""

import argparse
import collections
import gzip
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxbench.engine import Engine  # noqa: E402
from jaxbench.feeder import prepare_step  # noqa: E402
from jaxbench.job import SearchJob  # noqa: E402
from jaxbench.nonces import NonceSchedule  # noqa: E402
from jaxbench.params import params_from_text  # noqa: E402


def device_time_by_kernel(trace_dir: Path) -> tuple[collections.Counter, float]:
    path = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    trace = json.loads(gzip.open(path).read())
    events = trace.get("traceEvents", [])
    device_pids = {
        e["pid"] for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:" in str(e.get("args", {}).get("name", ""))
    }
    by_name: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            by_name[e["name"]] += e.get("dur", 0) / 1e6
    return by_name, sum(by_name.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="bench")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--draws", default="auto")
    ap.add_argument("--out", default="/tmp/jaxbench-profile")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    params = params_from_text(args.params)
    engine = Engine(draws_mode=args.draws)
    model = engine.load(params, "profile", args.dtype)
    batch = args.batch or engine.batches.default(params, args.dtype)
    step = engine.compiled_step(params, args.dtype, batch)
    job = SearchJob(params, "profile", "pk", 0.0, NonceSchedule.for_node(0), args.dtype)
    prepared = prepare_step(engine.drawer, engine.draws_mode, model.stages, job, 0, 0, batch)
    run = lambda: step(model.weights, prepared.inputs, prepared.permutations, model.target).block_until_ready()
    run()
    out = Path(args.out)
    t0 = time.perf_counter()
    with jax.profiler.trace(str(out)):
        for _ in range(args.steps):
            run()
    wall = time.perf_counter() - t0
    by_name, total = device_time_by_kernel(out)
    groups = model.placement.n_groups
    nonces = args.steps * batch * groups
    print(f"{args.steps} steps × {batch} × {groups} group(s): wall {wall:.3f} s "
          f"({nonces / wall:.1f} nonces/s), device events {total:.3f} s")
    for name, seconds in by_name.most_common(args.top):
        print(f"{100 * seconds / total:6.2f}%  {seconds:8.4f} s  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
