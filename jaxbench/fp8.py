"""FP8 (e4m3) weight products: the arithmetic of a screen, never of a reported distance.

A product x·W of the model (x: (…, K) in the model dtype, W: (K, N)) becomes one product of e4m3
operands accumulated in float32. W is quantized once, when a screen's weights are made: scaled per
output column so that the column's largest magnitude lands on e4m3's largest finite value (448),
rounded to e4m3 (to nearest even) and stored as (N, K), both operands' contracting axis innermost, the
layout cuBLASLt's FP8 GEMM takes without a transpose. x is quantized the same way per row at each
product. The float32 result is multiplied by both scales and rounded to the model dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A weight (…, K, N) quantized per output column: `values` (…, N, K) in e4m3, `scale` (…, N) in
    float32, value ≈ values · scale. Leading axes (a stack of layers) are kept, so a scan slices both."""

    values: jax.Array
    scale: jax.Array


def _scaled(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """x in e4m3, scaled along `axis` by its largest magnitude, and the float32 scale (keepdims)."""
    x32 = x.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x32), axis=axis, keepdims=True)
    scale = jnp.where(peak > 0, peak / E4M3_MAX, 1.0)
    return (x32 / scale).astype(E4M3), scale


def quantize_weight(w: jax.Array) -> Fp8Weight:
    values, scale = _scaled(jnp.swapaxes(w, -1, -2), axis=-1)
    return Fp8Weight(values, scale[..., 0])


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (M, K) in e4m3 with one float32 scale per row, (M, 1)."""
    return _scaled(x, axis=-1)


def scaled_product(x: jax.Array, x_scale: jax.Array, w: Fp8Weight, dtype) -> jax.Array:
    """x (M, K) e4m3 with its row scales · w, float32 accumulation, rounded to `dtype`: (M, N)."""
    out = jax.lax.dot_general(x, w.values, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (out * x_scale * w.scale).astype(dtype)


def linear(x: jax.Array, w: Fp8Weight) -> jax.Array:
    """x (…, K) · w through e4m3 operands, float32 accumulation, in x's dtype."""
    lead = x.shape[:-1]
    x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    return scaled_product(x_q, x_scale, w, x.dtype).reshape(*lead, w.values.shape[-2])
