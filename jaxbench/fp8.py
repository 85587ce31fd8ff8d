"""FP8 (e4m3) weight products: the arithmetic of a screen, never of a reported distance.

A product x·W of the model (x: (…, K) in the model dtype, W: (K, N)) becomes one product of e4m3
operands accumulated in float32. W is quantized once, when a screen's weights are made: scaled per
output column so that the column's largest magnitude lands on e4m3's largest finite value (448),
rounded to e4m3 (to nearest even) and stored as (N, K), both operands' contracting axis innermost, the
layout cuBLASLt's FP8 GEMM takes without a transpose. x is quantized the same way per row at each
product, or, where it is an RMSNorm's output, with one scale from the norm's bound (quantize_normed).
The float32 result is multiplied by both scales and rounded to the model dtype.

The FFN's gated half keeps its float32 products: silu(gate) ⊙ up is computed from them and rounded
straight to e4m3, with a per-row scale fixed before the products run (swiglu_scale), so that the down
product reads it as it is. On Hopper one kernel does all of it (gated_ffn.gated_ffn_fp8); elsewhere
XLA runs the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from . import gated_ffn

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


def product(x: jax.Array, x_scale: jax.Array, w: Fp8Weight) -> jax.Array:
    """x (M, K) e4m3 with its row scales · w, accumulated and returned in float32: (M, N)."""
    out = jax.lax.dot_general(x, w.values, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return out * x_scale * w.scale


def scaled_product(x: jax.Array, x_scale: jax.Array, w: Fp8Weight, dtype) -> jax.Array:
    """product(), rounded to `dtype`."""
    return product(x, x_scale, w).astype(dtype)


def normed_bound(gamma: jax.Array) -> jax.Array:
    """The largest magnitude an RMSNorm with weight `gamma` (D,) can output: each |r_i| ≤ √D·rms(r), so
    |x_i| ≤ √D·max|γ| (widened by one part in 512 for the roundings to the model dtype)."""
    g = gamma.astype(jnp.float32)
    return math.sqrt(g.shape[-1]) * jnp.max(jnp.abs(g)) * (1 + 2.0 ** -9)


def quantize_normed(x: jax.Array, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (M, K), the output of an RMSNorm with weight `gamma`, in e4m3 with one scale for all rows
    (M, 1), from normed_bound: no pass over x to find its peak, so XLA folds the rounding into the norm.
    e4m3 rounds to the same relative precision across its normal range, so the bound's headroom over a
    row's own peak costs nothing while the row stays in that range (the bound is at most √D times the
    typical value); nothing can saturate."""
    scale = normed_bound(gamma) / E4M3_MAX
    values = jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return values, jnp.broadcast_to(scale, (x.shape[0], 1))


def _quantized_input(x: jax.Array, gamma: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    return quantize_rows(x) if gamma is None else quantize_normed(x, gamma)


def linear(x: jax.Array, w: Fp8Weight, gamma: jax.Array | None = None) -> jax.Array:
    """x (…, K) · w through e4m3 operands, float32 accumulation, in x's dtype. x is quantized per row,
    or, given the weight `gamma` of the RMSNorm that made it, with quantize_normed."""
    lead = x.shape[:-1]
    x_q, x_scale = _quantized_input(x.reshape(-1, x.shape[-1]), gamma)
    return scaled_product(x_q, x_scale, w, x.dtype).reshape(*lead, w.values.shape[-2])


# The SwiGLU's scale is fixed before the products run, from ‖x‖ and the weights' column peaks: x·w has
# a standard deviation of about ‖x‖·σ_w, with σ_w ≈ a column's peak / √(2 ln K), and |silu(gate)·up|
# over a row of the model's widths stays within about 10–20 σ_gate·σ_up (8–13 measured on Gaussian
# rows of 8,192 units). SWIGLU_SIGMAS of them land on e4m3's 448. e4m3 rounds to the same relative
# precision across its normal range, so the headroom costs no accuracy (the same rounding error from
# 16 to 256 as with each row's own peak); a value beyond it saturates at ±448. ‖x‖² is each row's own,
# or, for the output of an RMSNorm with weight γ, its expectation Σγ² (a row's is at most D·max γ²).
SWIGLU_SIGMAS = 128.0


def swiglu_scale(x: jax.Array, gate_scale: jax.Array, up_scale: jax.Array, gamma: jax.Array | None = None) -> jax.Array:
    """The e4m3 scale (M, 1) of silu(x·W1) ⊙ (x·W3) for x (M, K), from W1's and W3's column scales."""
    spread = E4M3_MAX / math.sqrt(2 * math.log(max(x.shape[-1], 2)))
    sigma_gate, sigma_up = jnp.mean(gate_scale) * spread, jnp.mean(up_scale) * spread
    if gamma is None:
        squared_norm = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    else:
        squared_norm = jnp.broadcast_to(jnp.sum(jnp.square(gamma.astype(jnp.float32))), (x.shape[0], 1))
    scale = SWIGLU_SIGMAS * squared_norm * sigma_gate * sigma_up / E4M3_MAX
    return jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)


def swiglu(gate: jax.Array, up: jax.Array, scale: jax.Array) -> jax.Array:
    """silu(gate) ⊙ up / scale in e4m3, from float32 halves; saturates at ±448 as the kernel does."""
    h = gate / (1.0 + jnp.exp(-gate)) * up * (1.0 / scale)
    return jnp.clip(h, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def gated(x: jax.Array, w1: Fp8Weight, w3: Fp8Weight, gamma: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """silu(x·W1) ⊙ (x·W3) for x (M, K): e4m3 (M, H) and its row scales (M, 1). `gamma`: the weight of
    the RMSNorm that made x, when it did (see linear)."""
    x_q, x_scale = _quantized_input(x, gamma)
    scale = swiglu_scale(x, w1.scale, w3.scale, gamma)
    return swiglu(product(x_q, x_scale, w1), product(x_q, x_scale, w3), scale), scale


def gated_interleaved(x: jax.Array, w13: Fp8Weight, block: int, kernel=None,
                      gamma: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """gated() with W1 and W3 interleaved in blocks of `block` columns (weights.interleave_columns):
    through gated_ffn.gated_ffn_fp8 with `kernel` (a GatedConfig), else through XLA."""
    x_q, x_scale = _quantized_input(x, gamma)
    gate_scale, up_scale = gated_ffn.split_gate_up(w13.scale, block)
    scale = swiglu_scale(x, gate_scale, up_scale, gamma)
    if kernel is not None:
        h = gated_ffn.gated_ffn_fp8(x_q, x_scale[:, 0], w13.values, w13.scale, scale[:, 0], kernel)
        return h, scale
    return swiglu(*gated_ffn.split_gate_up(product(x_q, x_scale, w13), block), scale), scale

