"""`jaxbench remote search` against a simulated fleet: time against the ideal, exactness, client CPU.

    python scripts/fleet_bench.py [--scenarios killed,slow,scale] [--seconds S] [--valid-fraction F]
        [--load-s S] [--out FILE]

Each scenario starts FakeVast and a fleet of fake workers in this process (tests/fleet.py: the
PyWorker and model server protocol, deterministic distances, a fixed rate per worker), then runs the
real client (`python -m jaxbench remote search`, the vastai SDK) in a subprocess for a search of
`--seconds` × the healthy fleet's rate nonces, and checks its output against the known answer.

* killed: 100 workers, 10 % of them killed at random times within the ideal time;
* slow: 100 workers, 20 % whose first request computes nothing for 3 × the ideal time (a slow
  start) and 5 % that answer 429 to every request;
* scale: 500 workers, all healthy.

Workers have 1, 2, 4 or 8 device groups (in turn) of batch 64, a step every 0.5 s, start each
request in 0.05 s and load the weights in 1 s at their first request (`--load-s`); 0.1 % of the
nonces are valid (`--valid-fraction`). The ideal time is the search's nonces / the healthy fleet's rate.
`ratio` is the search's own time (the summary's elapsed_seconds) / the ideal; `wall_ratio` the
client's whole run (start-up and endpoint lookup included); `client_cpu_fraction` the client's CPU
seconds / its wall time; `fleet_step_lag_s` how late the simulated steps ran on average (near 0:
this process kept up). Prints one JSON object per scenario (and writes them to --out); exits 1 when
a result is not exact or over its target.

FLEET_BENCH_VERBOSE=1 gives the client -v and keeps its stderr; FLEET_BENCH_CLIENT_PREFIX puts a
command before the client's, a profiler for instance (its CPU counts in client_cpu_s):
`FLEET_BENCH_CLIENT_PREFIX='py-spy record -f raw -o client.txt --'`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fleet import Fault, FakeFleet, WorkerSpec, r_target_for, truth  # noqa: E402
from vast_helpers import ACCOUNT_API_KEY, ENDPOINT_NAME, FakeVast  # noqa: E402

BLOCK_HASH, PUBLIC_KEY = "fleet-bench-block", "fleet-bench-key"
VALID_FRACTION = 0.001
GROUPS = (1, 2, 4, 8)
TARGETS = {"killed": 1.3, "slow": 1.5, "scale": 1.1}


def specs(n: int, load_s: float) -> list[WorkerSpec]:
    return [WorkerSpec(groups=GROUPS[i % len(GROUPS)], batch=64, step_s=0.5, start_s=0.05, load_s=load_s)
            for i in range(n)]


def scenario(name: str, seconds: float, load_s: float,
             rng: random.Random) -> tuple[list[WorkerSpec], list[tuple[int, float]]]:
    """The workers, and (worker, time) of each kill."""
    if name == "killed":
        workers = specs(100, load_s)
        return workers, [(i, rng.uniform(0, seconds)) for i in rng.sample(range(100), 10)]
    if name == "slow":
        workers = specs(100, load_s)
        picked = rng.sample(range(100), 25)
        for i in picked[:20]:
            workers[i].fault = Fault("slow_start", seconds=3 * seconds)
        for i in picked[20:]:
            workers[i].fault = Fault("busy")
        return workers, []
    if name == "scale":
        return specs(500, load_s), []
    raise SystemExit(f"unknown scenario {name!r}")


def run(name: str, seconds: float, seed: int, valid_fraction: float = VALID_FRACTION, load_s: float = 1.0) -> dict:
    import certifi

    rng = random.Random(seed)
    workers, kills = scenario(name, seconds, load_s, rng)
    vast = FakeVast(seed=seed)
    fleet = FakeFleet(vast, workers, vast_notice_s=2.0)
    try:
        healthy_rate = sum(w.rate for w in fleet.workers)
        total = int(healthy_rate * seconds)
        r_target = r_target_for(valid_fraction)
        argv = [*shlex.split(os.environ.get("FLEET_BENCH_CLIENT_PREFIX", "")), sys.executable,
                "-m", "jaxbench", "remote", "search", "--endpoint", ENDPOINT_NAME,
                "--autoscaler-url", vast.url, "--webserver-url", vast.url, "--vast-ca-file", certifi.where(),
                "--params", "bench", "--block-hash", BLOCK_HASH, "--public-key", PUBLIC_KEY,
                "--r-target", repr(r_target), "--workers", str(len(workers)), "--max-nonces", str(total),
                *(["-v"] if os.environ.get("FLEET_BENCH_VERBOSE") else [])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": ACCOUNT_API_KEY})
        for index, at in kills:
            fleet.kill_at(fleet.workers[index], at + 1.0)  # the client's start-up takes about a second
        stdout, stderr = proc.communicate(timeout=seconds * 10 + 120)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [json.loads(line) for line in stdout.splitlines()]
        summary = lines[-1] if lines else {}
        found: dict[int, float] = {}
        duplicates = 0
        for line in lines[:-1]:
            for n, d in zip(line["nonces"], line["dist"]):
                duplicates += n in found
                found[n] = d
        expected = truth(BLOCK_HASH, PUBLIC_KEY, 0, total, r_target)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        ideal = total / healthy_rate
        return {
            "scenario": name, "workers": len(workers), "killed": len(kills), "valid_fraction": valid_fraction,
            "load_s": load_s,
            "slow_starters": sum(1 for w in workers if w.fault and w.fault.kind == "slow_start"),
            "answering_429": sum(1 for w in workers if w.fault and w.fault.kind == "busy"),
            "nonces": total, "ideal_s": round(ideal, 2), "elapsed_s": summary.get("elapsed_seconds"),
            "ratio": round(summary.get("elapsed_seconds", float("nan")) / ideal, 3),
            "target": TARGETS[name], "wall_s": round(wall, 2), "wall_ratio": round(wall / ideal, 3),
            "client_cpu_s": round(cpu, 2), "client_cpu_fraction": round(cpu / wall, 4),
            "client_user_s": round(after.ru_utime - before.ru_utime, 2),
            "client_system_s": round(after.ru_stime - before.ru_stime, 2),
            "exit_status": proc.returncode, "reason": summary.get("reason"),
            "exact": found == expected and duplicates == 0 and summary.get("total_valid") == len(expected),
            "valid": len(expected), "missing": len(set(expected) - set(found)),
            "extra": len(set(found) - set(expected)), "duplicates": duplicates,
            "wrong_distances": sum(1 for n in set(found) & set(expected) if found[n] != expected[n]),
            "fleet_step_lag_s": round(fleet.mean_step_lag(), 4),
            # From the client's start until every worker that lived had its first request: the
            # client's start-up (about a second) and the fake autoscaler's routing of the first wave.
            "all_started_s": round(max(w.first_request_at for w in fleet.workers if w.first_request_at) - t0, 2),
            "requests": summary.get("requests"), "restarts": summary.get("restarts"), "backups": summary.get("backups"),
            "stderr_tail": None if proc.returncode == 0 else stderr[-2000:],
            **({"stderr": stderr} if os.environ.get("FLEET_BENCH_VERBOSE") else {}),
        }
    finally:
        fleet.close()
        vast.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="killed,slow,scale")
    ap.add_argument("--seconds", type=float, default=60.0, help="the ideal time of each search (default 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--valid-fraction", type=float, default=VALID_FRACTION, help="of the nonces (default 0.001)")
    ap.add_argument("--load-s", type=float, default=1.0, help="a worker's weight load at its first request")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    args = ap.parse_args()
    results = []
    for name in args.scenarios.split(","):
        result = run(name, args.seconds, args.seed, args.valid_fraction, args.load_s)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0 if all(r["exact"] and r["ratio"] <= r["target"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
