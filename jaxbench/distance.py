"""Distances to the target (docs/algorithm.md §6) and the network's fraud test of a claimed batch (docs/algorithm.md §7)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

PROBABILITY_MISMATCH = 5e-4
DEFAULT_FRAUD_THRESHOLD = 1e-7


def split_target(target: np.ndarray) -> np.ndarray:
    """The float64 target as a float32 pair (hi, lo) with hi + lo ≈ target to ~48 bits, shape (2, V)."""
    hi = target.astype(np.float32)
    lo = (target - hi.astype(np.float64)).astype(np.float32)
    return np.stack([hi, lo])


def distances(logits: jax.Array, permutations: jax.Array, target: jax.Array) -> jax.Array:
    """logits (B, V) float32, permutations (B, V) int, target (2, V) from split_target -> (B,) float32.

    p[j] = z[perm[j]], u = p / ||p|| in float32 as the reference does; ||u - target|| is taken against
    the two-part target so the float64 target is not rounded to float32 before the difference.
    """
    p = jnp.take_along_axis(logits, permutations, axis=1)
    u = p / jnp.sqrt(jnp.sum(p * p, axis=1, keepdims=True))
    d = (u - target[0]) - target[1]
    return jnp.sqrt(jnp.sum(d * d, axis=1))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p): the one-sided p-value of k or more invalid nonces."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k, n + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def fraud_report(
    claimed: np.ndarray, recomputed: np.ndarray, r_target: float, fraud_threshold: float = DEFAULT_FRAUD_THRESHOLD
) -> dict:
    """The network's validation of a claimed batch: a nonce is invalid when its recomputed distance is
    above r_target (or NaN); fraud when P[X >= n_invalid] under Binomial(n, 5e-4) is below
    the threshold."""
    recomputed = np.asarray(recomputed, dtype=np.float64)
    invalid = ~(recomputed <= r_target)
    n_invalid = int(invalid.sum())
    p_value = binomial_sf(n_invalid, len(recomputed), PROBABILITY_MISMATCH)
    gaps = np.abs(recomputed - np.asarray(claimed, dtype=np.float64))
    return {
        "n": len(recomputed),
        "n_invalid": n_invalid,
        "invalid_indices": np.flatnonzero(invalid).tolist(),
        "max_abs_gap": float(np.nanmax(gaps)) if len(gaps) else 0.0,
        "p_value": p_value,
        "fraud_threshold": fraud_threshold,
        "fraud": p_value < fraud_threshold,
        "recomputed_dist": recomputed.tolist(),
    }
