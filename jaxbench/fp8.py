"""FP8 (e4m3) weight products: the arithmetic of a screen, never of a reported distance.

A product x·W of the model (x: (…, K) in the model dtype, W: (K, N)) becomes one product of e4m3
operands accumulated in float32: W scaled per output column and x per row so that each one's
largest magnitude lands on e4m3's largest finite value (448), both rounded to e4m3 (to nearest
even), multiplied with float32 accumulation (`dot_general` of float8 operands: cuBLASLt's FP8 GEMM on
Hopper and Blackwell), then the scales multiplied back in and the result rounded to the model dtype.
Attention's own products (scores, probabilities × values) stay in the model dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448


def _scaled(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """x in e4m3, scaled along `axis` by its largest magnitude, and the float32 scale (keepdims)."""
    peak = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)
    scale = jnp.where(peak > 0, peak / E4M3_MAX, 1.0)
    return (x.astype(jnp.float32) / scale).astype(E4M3), scale


def quantize_columns(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A weight (K, N) in e4m3 with one float32 scale per output column, (1, N)."""
    return _scaled(w, axis=-2)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (…, K) · w (K, N) through e4m3 operands, float32 accumulation, in x's dtype."""
    w_q, w_scale = quantize_columns(w)
    lead = x.shape[:-1]
    x_q, x_scale = _scaled(x.reshape(-1, x.shape[-1]), axis=-1)
    out = jax.lax.dot_general(x_q, w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (out * x_scale * w_scale).astype(x.dtype).reshape(*lead, w.shape[-1])
