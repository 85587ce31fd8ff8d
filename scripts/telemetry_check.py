"""Check bench's telemetry on a GPU against nvidia-smi read in the same window (issue 19's "Done when").

For each parameter set this runs `python -m jaxbench bench --params P` in a subprocess while a thread
here reads `nvidia-smi --query-gpu=index,power.draw,clocks.sm` every `--interval` seconds, each
reading stamped with the Unix time. Then, for each report:

* every telemetry field (jaxbench.telemetry.FIELDS) and the ceiling (`sustained_tflops`,
  `percent_of_sustained`) must carry a value, `telemetry_unavailable` none;
* nvidia-smi's readings inside the report's `telemetry_window_unix` give an independent energy per
  nonce: for each GPU the report sampled, its mean power.draw × the window's length, summed, over
  `nonces_computed`. It must agree with `energy_joules_per_nonce` within `--tolerance` (10 %), and
  the mean power per GPU likewise.

Writes `bench-<P>.json` (the report), `bench-<P>.log` (its stderr) and `telemetry_check.json` (the
comparison; also printed) in `--out` (default $OUT). Exit status 0 when every check passed.

    python scripts/telemetry_check.py [--params mainnet,bench] [--seconds 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxbench.telemetry import FIELDS  # noqa: E402  (JAX-free)
from smi import SmiSampler  # noqa: E402

CEILING_FIELDS = ("sustained_tflops", "percent_of_sustained")
MAY_BE_EMPTY = {"telemetry_unavailable", "telemetry_unsupported"}  # null / [] is the good value


def compare(report: dict, smi: SmiSampler, tolerance: float) -> dict:
    """The report's energy and power against nvidia-smi's readings in its window."""
    out: dict = {"missing_fields": [name for name in (*FIELDS, *CEILING_FIELDS)
                                    if name not in MAY_BE_EMPTY and report.get(name) is None]}
    if report.get("telemetry_unavailable") is not None:
        out["missing_fields"].append(f"telemetry_unavailable: {report['telemetry_unavailable']}")
    start, end = report["telemetry_window_unix"]
    devices = report.get("telemetry_devices") or []
    indices = [d["nvml_index"] for d in devices if isinstance(d["nvml_index"], int)]
    inside = [s for s in smi.samples if start <= s["t"] <= end and s["index"] in indices]
    per_gpu = {i: [s["power_w"] for s in inside if s["index"] == i] for i in indices}
    out["smi_samples"] = len(inside)
    if not indices or not all(per_gpu.values()):
        out["ok"] = False
        out["why"] = "no nvidia-smi readings in the window for the sampled GPUs" + (
            f" ({smi.errors[-1]})" if smi.errors else "")
        return out
    seconds = end - start
    smi_joules = sum(statistics.mean(p) * seconds for p in per_gpu.values())
    smi_mean_power = statistics.mean(statistics.mean(p) for p in per_gpu.values())
    smi_per_nonce = smi_joules / report["nonces_computed"]
    nvml_per_nonce, nvml_power = report.get("energy_joules_per_nonce"), report.get("mean_power_w")
    out |= {
        "window_seconds": round(seconds, 3),
        "nvml_joules_per_nonce": nvml_per_nonce,
        "nvml_energy_method": report.get("energy_method"),
        "smi_joules_per_nonce": round(smi_per_nonce, 4),
        "energy_ratio": None if nvml_per_nonce is None else round(nvml_per_nonce / smi_per_nonce, 4),
        "nvml_mean_power_w": nvml_power,
        "smi_mean_power_w": round(smi_mean_power, 1),
        "power_ratio": None if nvml_power is None else round(nvml_power / smi_mean_power, 4),
        "smi_mean_sm_clock_mhz": round(statistics.mean(s["sm_mhz"] for s in inside), 1),
        "nvml_mean_sm_clock_mhz": report.get("mean_sm_clock_mhz"),
    }
    within = [r is not None and abs(r - 1) <= tolerance for r in (out["energy_ratio"], out["power_ratio"])]
    out["ok"] = all(within) and not out["missing_fields"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="mainnet,bench")
    ap.add_argument("--seconds", type=float, default=20.0, help="bench's end-to-end window")
    ap.add_argument("--sustained-seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between nvidia-smi readings")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ap.add_argument("bench_args", nargs="*", help="more arguments for bench (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with SmiSampler({"power_w": "power.draw", "sm_mhz": "clocks.sm"}, args.interval) as smi:
        for name in args.params.split(","):
            command = [sys.executable, "-m", "jaxbench", "bench", "--params", name, "--seconds", str(args.seconds),
                       "--sustained-seconds", str(args.sustained_seconds), *args.bench_args]
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            (out / f"bench-{name}.log").write_text(run.stderr)
            if run.returncode != 0:
                results[name] = {"ok": False, "why": f"bench exited {run.returncode}: {run.stderr.strip()[-500:]}"}
                continue
            (out / f"bench-{name}.json").write_text(run.stdout)
            report = json.loads(run.stdout)
            results[name] = {
                "device_kind": report["device_kind"],
                "end_to_end_nonces_per_s": report["end_to_end_nonces_per_s"],
                "achieved_tflops_per_device": report["achieved_tflops_per_device"],
                "percent_of_floor": report["percent_of_floor"],
                "sustained_tflops": report.get("sustained_tflops"),
                "percent_of_sustained": report.get("percent_of_sustained"),
                "clock_limited_share": report.get("clock_limited_share"),
                **compare(report, smi, args.tolerance),
            }
    summary = {"ok": all(r.get("ok") for r in results.values()), "tolerance": args.tolerance,
               "smi_errors": smi.errors[-5:], "results": results}
    (out / "telemetry_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
