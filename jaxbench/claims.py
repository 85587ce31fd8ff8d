"""Validation of a claimed batch of nonces, as a network validator does it (docs/algorithm.md §7)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from . import fields
from .distance import DEFAULT_FRAUD_THRESHOLD, fraud_report
from .params import Params

# The fidelity rule (docs/algorithm.md, "Fidelity") bounds each faithful computation's largest gap to the
# reference's float32 distances: 1e-5 in float32, else twice the reference's own gap in the dtype plus
# 1e-5. These are its largest bounds over the vendored reference cases (tests/data/reference-vectors.json;
# tests/test_cli.py recomputes them). Two faithful computations differ by at most twice the bound.
FIDELITY_BOUND = {"float32": 1e-5, "float16": 5.99e-5, "bfloat16": 3.68e-4}


@dataclasses.dataclass(frozen=True)
class Claim:
    params: Params
    block_hash: str
    public_key: str
    nonces: list[int]
    dist: list[float]
    r_target: float
    dtype: str = "float16"
    fraud_threshold: float = DEFAULT_FRAUD_THRESHOLD


def parse_claim(data: Any) -> Claim:
    if not isinstance(data, Mapping):
        raise fields.FieldError("body", "must be a JSON object")
    known = {f.name for f in dataclasses.fields(Claim)}
    for key in data:
        if key not in known:
            raise fields.FieldError(str(key), "unknown field")
    nonces = fields.nonce_list(data, "nonces")
    dist = data.get("dist")
    if not isinstance(dist, list) or len(dist) != len(nonces):
        raise fields.FieldError("dist", f"must be a list of {len(nonces)} numbers, one per nonce")
    for v in dist:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise fields.FieldError("dist", f"must hold finite numbers, got {v!r:.60}")
    return Claim(
        params=fields.params(data),
        block_hash=fields.seed_text(data, "block_hash"),
        public_key=fields.seed_text(data, "public_key"),
        nonces=nonces,
        dist=[float(v) for v in dist],
        r_target=fields.number(data, "r_target"),
        dtype=fields.dtype(data),
        fraud_threshold=fields.p_value_bound(data, "fraud_threshold", DEFAULT_FRAUD_THRESHOLD),
    )


def validate_claim(engine, claim: Claim, on_step=None) -> dict:
    """Recompute every distance and report invalid nonces, the binomial p-value and the verdict."""
    recomputed = engine.distances(claim.params, claim.block_hash, claim.public_key, claim.nonces, claim.dtype,
                                  on_step=on_step)
    report = fraud_report(np.array(claim.dist), recomputed, claim.r_target, claim.fraud_threshold)
    report["invalid_nonces"] = [claim.nonces[i] for i in report.pop("invalid_indices")]
    report["dtype"] = claim.dtype
    return report


def beyond_fidelity(claim: Claim, recomputed: list[float]) -> int:
    """How many claimed distances differ from the recomputed ones by more than two faithful computations
    in the claim's dtype can (twice FIDELITY_BOUND); a recomputed NaN counts."""
    gaps = np.abs(np.asarray(recomputed, dtype=np.float64) - np.asarray(claim.dist, dtype=np.float64))
    return int(np.count_nonzero(~(gaps <= 2 * FIDELITY_BOUND[claim.dtype])))
