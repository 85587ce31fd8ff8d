"""Largest distance gap to the reference's float32 distances, per vector case and dtype, on this backend.

    python scripts/vector_gaps.py [--dtypes float16,bfloat16,float32] [--draws host|device] [--cases NAME,...]

Prints one JSON object per line and exits non-zero if any case breaks the fidelity rule.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxbench.engine import Engine  # noqa: E402
from jaxbench.params import Params  # noqa: E402

REFERENCE_KEY = {"float32": "dist_f32", "float16": "dist_f16", "bfloat16": "dist_bf16"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--draws", default="host")
    ap.add_argument("--vectors", default=str(Path(__file__).resolve().parents[1] / "tests/data/reference-vectors.json"))
    ap.add_argument("--cases", default=None, help="only these cases (comma-separated names); default all")
    args = ap.parse_args()
    cases = json.loads(Path(args.vectors).read_text())
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {case["name"] for case in cases})
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; the file has {', '.join(c['name'] for c in cases)}")
        cases = [case for case in cases if case["name"] in wanted]
    engine = Engine(devices=1, draws_mode=args.draws, compile_cache_dir=None)
    ok = True
    for case in cases:
        ref32 = np.array(case["dist_f32"])
        for dtype in args.dtypes.split(","):
            dist = engine.distances(Params.from_dict(case["params"]), case["block_hash"], case["public_key"],
                                    case["nonces"], dtype)
            gap = float(np.max(np.abs(dist - ref32)))
            ref_gap = float(np.max(np.abs(np.array(case[REFERENCE_KEY[dtype]]) - ref32)))
            bound = 1e-5 if dtype == "float32" else 2 * ref_gap + 1e-5
            ok &= gap <= bound
            print(json.dumps({"case": case["name"], "dtype": dtype, "draws": args.draws,
                              "device": engine.devices[0].device_kind, "largest_gap": gap,
                              "reference_gap": ref_gap, "bound": bound, "pass": gap <= bound}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
