"""The PoC transformer: a LLaMA fed with embeddings, returning the last position's logits.

Numerics follow the network's reference (docs/algorithm.md §4) so that distances agree within the fidelity rule:
every matrix product accumulates in float32 and rounds to the model dtype; RMSNorm, RoPE and the
softmax run in float32; the RoPE tables are rounded to the model dtype; the head's output is rounded
to the model dtype before it is widened to float32.

Written with Flax NNX: each part is an `nnx.Module` holding its weights as `nnx.Param`s. The weights
are not initialised by Flax but built from the block hash (weights.py), so the modules take arrays.
The full-sequence blocks' weights are stacked along a leading layer axis and scanned (`lax.scan`
over the stacked tree), so compile time does not grow with depth. The last block is stored apart:
only its last position goes through the query path, the final norm and the head.

A forward pass may be split into stages (placement.py): a `Stage` runs a contiguous run of the
blocks, and the one that holds the last block also ends the model. Each block computes the same
products on the same shapes whichever stage runs it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import fp8, gated_ffn
from .params import Params
from .weights import JNP_DTYPES, REFERENCE_LAYOUT, WeightLayout


def matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A product in the operands' dtype. XLA accumulates float16/bfloat16 products in float32 and rounds
    once, as cuBLAS does for the reference; float32 products run at full precision (no TF32)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, precision=precision)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


def rope_frequencies(params: Params) -> np.ndarray:
    """inv_k = 1 / theta ** (2k / head_dim) in float32, with Llama 3.1's scaling when asked for."""
    hd = params.head_dim
    freqs = (1.0 / (np.float32(params.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32)[: hd // 2] / np.float32(hd)))).astype(np.float32)
    if not params.use_scaled_rope:
        return freqs
    scale, low_factor, high_factor, old_context = 8.0, 1.0, 4.0, 8192.0
    low_wavelen, high_wavelen = old_context / low_factor, old_context / high_factor
    scaled = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            scaled.append(f)
        elif wavelen > low_wavelen:
            scaled.append(f / scale)
        else:
            smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
            scaled.append((1 - smooth) * f / scale + smooth * f)
    return np.array(scaled, dtype=np.float32)


def rope_tables(params: Params, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position × frequency, (seq_len, head_dim // 2), rounded to the model dtype."""
    angles = np.outer(np.arange(params.seq_len, dtype=np.float32), rope_frequencies(params)).astype(np.float32)
    return jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (x[2j], x[2j+1]) in float32. x: (B, S, heads, hd); tables: (S, hd/2).

    Written as x·cos + swap(x)·(−sin, sin), elementwise over x's own layout: the same two products
    and one sum per element as (x0·c − x1·s, x1·c + x0·s), without stacking the halves back together.
    """
    x32 = x.astype(jnp.float32)
    swapped = x32.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    c = jnp.repeat(cos.astype(jnp.float32), 2, axis=-1)
    s = sin.astype(jnp.float32)
    s = jnp.stack([-s, s], axis=-1).reshape(c.shape)
    return (x32 * c[:, None, :] + swapped * s[:, None, :]).astype(x.dtype)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "cudnn") -> jax.Array:
    """Causal attention through cuDNN's fused kernel; q (B, S, H, hd), k and v (B, S, KV, hd).

    cuDNN wants head sizes in multiples of 8: zero-padding q, k and v leaves every score and the
    first hd output columns unchanged. Scores and softmax stay in float32 inside the kernel, so
    the scores are not rounded to the model dtype as in the reference: the distances move by far
    less than the float16 fidelity bound (docs/benchmarks.md has the measured gaps).
    """
    hd = q.shape[-1]
    pad = [(0, 0)] * 3 + [(0, -hd % 8)]
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(hd), is_causal=True, implementation=implementation)
    return out[..., :hd]


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# "xla": two products and the SwiGLU (over w1 and w3, or one product over w13); "pallas": with w13, gate, up
# and SwiGLU in one Hopper kernel (gated_ffn.py; its e4m3 form for the "fp8" products) where the shape
# allows, one XLA product over w13 elsewhere.
FFN_IMPLEMENTATIONS = ("xla", "pallas")
# "exact": every product in the model dtype, as the reference; "fp8": the blocks' weight products through
# e4m3 operands (fp8.py; the weights from weights.quantized_products), the FFN's hidden state in e4m3,
# for a screen whose distances are never reported. Attention's own products and the head stay in the
# model dtype.
PRODUCTS = ("exact", "fp8")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a forward pass computes and how: the parameter set, the model dtype, and the implementation of
    each part. The implementation names are checked here, once.

    `attention`: "xla" follows the reference's rounding step by step; "cudnn" is the fused kernel (GPUs,
    float16/bfloat16) for the full-sequence blocks. `ffn`: "pallas" runs the gated half of the FFN as one
    Hopper kernel (needs the interleaved w13 of `layout`), "xla" as XLA's products. `layout`: how the
    weights are arranged (weights.WeightLayout). `products`: see PRODUCTS.
    """

    params: Params
    dtype: str
    attention: str = "xla"
    ffn: str = "xla"
    layout: WeightLayout = REFERENCE_LAYOUT
    products: str = "exact"

    def __post_init__(self):
        if self.dtype not in JNP_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(JNP_DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {self.attention!r}")
        if self.ffn not in FFN_IMPLEMENTATIONS:
            raise ValueError(f"ffn must be one of {', '.join(FFN_IMPLEMENTATIONS)}, got {self.ffn!r}")
        if self.products not in PRODUCTS:
            raise ValueError(f"products must be one of {', '.join(PRODUCTS)}, got {self.products!r}")

    def weight_product(self) -> Callable[[str, jax.Array, jax.Array], jax.Array]:
        """(einsum spec, x, weight) -> x·weight: in the model dtype, or through e4m3 operands with `weight`
        an fp8.Fp8Weight."""
        if self.products == "fp8":
            return lambda spec, x, w: fp8.linear(x, w)
        return matmul

    @property
    def jnp_dtype(self):
        return JNP_DTYPES[self.dtype]


class Attention(nnx.Module):
    def __init__(self, w: dict, params: Params, implementation: str = "xla", product: Callable = matmul):
        """`w` holds wq, wk, wv and wo (and may hold other layers' tensors); `product` computes the
        weight products (ModelConfig.weight_product)."""
        self.wq, self.wk, self.wv, self.wo = (nnx.Param(w[k]) for k in ("wq", "wk", "wv", "wo"))
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim
        self.implementation = implementation
        self.product = product

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, last_only: bool,
                 norm_weight: jax.Array | None = None) -> jax.Array:
        """x: (B, S, dim) -> (B, S or 1, dim). With `last_only`, only the last position queries.
        `norm_weight`: with "fp8" products, the weight of the RMSNorm that made x (fp8.linear)."""
        b, s, _ = x.shape
        kv, group, hd = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        x_q, cos_q, sin_q = (x[:, -1:], cos[-1:], sin[-1:]) if last_only else (x, cos, sin)
        project = self.product
        project_input = project if norm_weight is None else lambda _, x, w: fp8.linear(x, w, norm_weight)
        q = apply_rope(project_input("bsd,de->bse", x_q, self.wq.get_value()).reshape(b, -1, self.n_heads, hd), cos_q, sin_q)
        k = apply_rope(project_input("bsd,de->bse", x, self.wk.get_value()).reshape(b, s, kv, hd), cos, sin)
        v = project_input("bsd,de->bse", x, self.wv.get_value()).reshape(b, s, kv, hd)
        if self.implementation == "cudnn" and not last_only:
            return project("bse,ed->bsd", flash_attention(q, k, v).reshape(b, s, -1), self.wo.get_value())

        # Query head j reads kv head j // group.
        q = q.reshape(b, -1, kv, group, hd)
        scores = matmul("bqkgd,btkd->bkgqt", q, k)
        scores = (scores.astype(jnp.float32) / jnp.float32(math.sqrt(hd))).astype(x.dtype).astype(jnp.float32)
        if not last_only:
            causal = jnp.tril(jnp.ones((s, s), dtype=bool))
            scores = jnp.where(causal, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = matmul("bkgqt,btkd->bqkgd", probs, v).reshape(b, -1, self.n_heads * hd)
        return project("bse,ed->bsd", out, self.wo.get_value())


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) ⊙ up: silu in float32 on the rounded gate, rounded, times the rounded up product."""
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up


class FeedForward(nnx.Module):
    def __init__(self, w: dict, gate_up_block: int | None = None, implementation: str = "xla",
                 products: str = "exact"):
        """`w` holds w1, w2 and w3, or w13 (w1 and w3 interleaved in blocks of `gate_up_block`) and w2.
        With w13, `implementation` "pallas" runs the gated half as one Hopper kernel where it applies.
        `products`: ModelConfig.products; with "fp8" the weights are fp8.Fp8Weights."""
        self.w13 = nnx.Param(w["w13"]) if "w13" in w else None
        if self.w13 is None:
            self.w1, self.w3 = nnx.Param(w["w1"]), nnx.Param(w["w3"])
        self.w2 = nnx.Param(w["w2"])
        self.block, self.implementation, self.products = gate_up_block, implementation, products

    def gated(self, x: jax.Array) -> jax.Array:
        if self.w13 is None:
            return swiglu(matmul("bsd,dh->bsh", x, self.w1.get_value()), matmul("bsd,dh->bsh", x, self.w3.get_value()))
        w13 = self.w13.get_value()
        if self.implementation == "pallas":
            b, s, d = x.shape
            hidden = w13.shape[-1] // 2
            kernel = dataclasses.replace(gated_ffn.DEFAULT_CONFIG, block=self.block)  # tiles on the interleaving's blocks
            if gated_ffn.applies(b * s, d, hidden, x.dtype, kernel):
                return gated_ffn.gated_ffn(x.reshape(b * s, d), w13, kernel).reshape(b, s, hidden)
        return swiglu(*gated_ffn.split_gate_up(matmul("bsd,dh->bsh", x, w13), self.block))

    def gated_fp8(self, x: jax.Array, norm_weight: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The gated half through e4m3 operands (x: (rows, dim)): e4m3 and its row scales (fp8.gated)."""
        if self.w13 is None:
            return fp8.gated(x, self.w1.get_value(), self.w3.get_value(), norm_weight)
        w13 = self.w13.get_value()
        kernel = dataclasses.replace(gated_ffn.FP8_CONFIG, block=self.block)
        fits = gated_ffn.applies_fp8(x.shape[0], x.shape[1], w13.values.shape[-2] // 2, kernel)
        return fp8.gated_interleaved(x, w13, self.block, kernel if self.implementation == "pallas" and fits else None,
                                     norm_weight)

    def __call__(self, x: jax.Array, norm_weight: jax.Array | None = None) -> jax.Array:
        """`norm_weight`: with "fp8" products, the weight of the RMSNorm that made x (fp8.linear)."""
        if self.products == "fp8":
            b, s, d = x.shape
            h, h_scale = self.gated_fp8(x.reshape(b * s, d), norm_weight)
            return fp8.scaled_product(h, h_scale, self.w2.get_value(), x.dtype).reshape(b, s, d)
        return matmul("bsh,hd->bsd", self.gated(x), self.w2.get_value())


class Block(nnx.Module):
    """One transformer block: h + attention(norm(h)), then + feed_forward(norm(h))."""

    def __init__(self, w: dict, config: ModelConfig):
        product = config.weight_product()
        self.attention = Attention(w, config.params, config.attention, product)
        self.feed_forward = FeedForward(w, config.layout.gate_up_block, config.ffn, config.products)
        self.attention_norm = nnx.Param(w["attention_norm"])
        self.ffn_norm = nnx.Param(w["ffn_norm"])
        self.eps = config.params.norm_eps
        self.screened = config.products == "fp8"  # the e4m3 products quantize the norms' outputs by their bound

    def __call__(self, h: jax.Array, cos, sin, last_only: bool = False) -> jax.Array:
        attention_norm, ffn_norm = self.attention_norm[...], self.ffn_norm[...]
        bound_by = lambda weight: weight if self.screened else None
        a = self.attention(rms_norm(h, attention_norm, self.eps), cos, sin, last_only, bound_by(attention_norm))
        h = (h[:, -1:] if last_only else h) + a
        return h + self.feed_forward(rms_norm(h, ffn_norm, self.eps), bound_by(ffn_norm))


class Stage(nnx.Module):
    """A contiguous run of the model's blocks, from the weight pytree of weights.build_weights.

    `blocks` holds full-sequence blocks stacked along a leading layer axis (possibly none). When the
    weights also hold `last`, `norm` and `output`, the stage ends the model: the last block runs for
    the last position only, then the final norm and the head.
    """

    def __init__(self, weights: dict, config: ModelConfig):
        self.config = config
        self.blocks = nnx.data(weights["blocks"])  # stacked along the layer axis: scanned, a Block per slice
        self.ends_model = "last" in weights
        if self.ends_model:
            self.last = Block(weights["last"], config)
            self.norm = nnx.Param(weights["norm"])
            self.output = nnx.Param(weights["output"])

    def __call__(self, h: jax.Array) -> jax.Array:
        """h: (B, seq_len, dim) -> the hidden state after these blocks, or, when the stage ends the model,
        the last position's logits (B, vocab) in float32."""
        config = self.config
        cos, sin = rope_tables(config.params, config.jnp_dtype)

        def run_block(h, layer_weights):
            return Block(layer_weights, config)(h, cos, sin), None

        h, _ = jax.lax.scan(run_block, h.astype(config.jnp_dtype), self.blocks)
        if not self.ends_model:
            return h
        h = self.last(h, cos, sin, last_only=True)[:, 0]
        h = rms_norm(h, self.norm[...], config.params.norm_eps)
        return matmul("bd,dv->bv", h, self.output[...]).astype(jnp.float32)


def stage_fn(config: ModelConfig):
    """A pure function (stage weights, h) -> h or logits, for jit: the NNX module rebuilt around traced
    weights. Given the whole model's weights (weights.build_weights without a stage), it is the forward
    pass: embeddings-sized inputs (B, seq_len, dim) in, last-position logits out."""

    def forward(weights: dict[str, Any], h: jax.Array) -> jax.Array:
        return Stage(weights, config)(h)

    return forward


def forward_fn(params: Params, dtype: str, attention: str = "xla", layout: WeightLayout = REFERENCE_LAYOUT,
               ffn: str = "xla"):
    """The whole forward pass (weights, x) -> logits, for jit (see ModelConfig for the options)."""
    return stage_fn(ModelConfig(params, dtype, attention, ffn, layout))
