"""Weights from the block hash (docs/algorithm.md §3): one pool drawn on the CPU, every tensor built on the device.

A parameter of `n` elements is `pool[s : s+n]` when it fits in the pool, else the pool tiled to `n`
values and rotated left by `r`; in both cases element `i` is `pool[index(i)]`, so the device only
gathers. Tensors come out in the model's layout: linear weights transposed to (in, out) and the
per-layer tensors stacked along a leading layer axis.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import draws
from .device_draws import draw_pool_on_device
from .params import Params

JNP_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}

# Per-layer tensors: model name -> reference name inside `layers.{i}.`.
LAYER_TENSORS = {
    "wq": "attention.wq.weight",
    "wk": "attention.wk.weight",
    "wv": "attention.wv.weight",
    "wo": "attention.wo.weight",
    "w1": "feed_forward.w1.weight",
    "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight",
    "attention_norm": "attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
}
TOP_TENSORS = {"norm": "norm.weight", "output": "output.weight"}


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How the per-layer FFN weights are stored: as the reference has them, or w1 and w3 interleaved
    as one "w13" in blocks of `gate_up_block` columns for the gated-FFN kernel (gated_ffn.py).
    The values are the same; only their arrangement differs."""

    gate_up_block: int | None = None


REFERENCE_LAYOUT = WeightLayout()


def interleave_columns(w1: jax.Array, w3: jax.Array, block: int) -> jax.Array:
    """(…, K, H) twice → (…, K, 2H) whose column block j of 2·block is w1's block j, then w3's."""
    *lead, k, h = w1.shape
    pair = jnp.stack([w1.reshape(*lead, k, h // block, block), w3.reshape(*lead, k, h // block, block)], axis=-2)
    return pair.reshape(*lead, k, 2 * h)


def arrange(layers: dict, layout: WeightLayout) -> dict:
    """The per-layer tensors of the reference layout rearranged into `layout`."""
    layers = dict(layers)
    if layout.gate_up_block:
        layers["w13"] = interleave_columns(layers.pop("w1"), layers.pop("w3"), layout.gate_up_block)
    return layers


@dataclasses.dataclass(frozen=True)
class PoolPlacement:
    """Where one parameter's values sit in the pool: `pool[(i + rotation) % n % P]` for element i,
    which covers both the slice case (rotation = start, no wrap) and the tile-and-rotate case."""

    numel: int
    rotation: int

    @staticmethod
    def of(block_hash: str, name: str, numel: int, pool_size: int) -> "PoolPlacement":
        k = draws.parameter_offset(block_hash, name)
        if numel <= pool_size:
            return PoolPlacement(numel, k % (pool_size - numel + 1))
        return PoolPlacement(numel, k % numel)


def _gather(pool: jax.Array, numel: int, rotation: jax.Array) -> jax.Array:
    pool_size = pool.shape[0]
    if numel <= pool_size:
        return jax.lax.dynamic_slice_in_dim(pool, rotation, numel)
    # Indices stay below 2**32: numel < 2**31 (checked by the caller) and rotation < numel.
    i = jnp.arange(numel, dtype=jnp.uint32) + rotation.astype(jnp.uint32)
    i = jnp.where(i >= numel, i - numel, i)
    return pool[(i % pool_size).astype(jnp.int32)]


def _to_model_layout(flat: jax.Array, torch_shape: tuple[int, ...]) -> jax.Array:
    t = flat.reshape(torch_shape)
    return t.T if t.ndim == 2 else t  # (out, in) -> (in, out)


@partial(jax.jit, static_argnames=("params", "layout"))
def _build(pool: jax.Array, rotations: dict, params: Params, layout: WeightLayout) -> dict:
    shapes = params.parameter_shapes()
    layers = {}
    for key, ref in LAYER_TENSORS.items():
        shape = shapes[f"layers.0.{ref}"]
        build_one = lambda r, shape=shape: _to_model_layout(_gather(pool, math.prod(shape), r), shape)
        layers[key] = jax.vmap(build_one)(rotations["layers"][key])
    top = {}
    for key, ref in TOP_TENSORS.items():
        shape = shapes[ref]
        top[key] = _to_model_layout(_gather(pool, math.prod(shape), rotations[key]), shape)
    return {"layers": arrange(layers, layout), **top}


def placements(params: Params, block_hash: str) -> dict[str, PoolPlacement]:
    """Every parameter's placement, by reference name."""
    return {
        name: PoolPlacement.of(block_hash, name, math.prod(shape), params.pool_size)
        for name, shape in params.parameter_shapes().items()
    }


def build_weights(pool: jax.Array, params: Params, block_hash: str, layout: WeightLayout = REFERENCE_LAYOUT
                  ) -> dict:
    """The model's weight pytree from a pool already on the device in the model dtype.

    Output: {"layers": {wq, wk, wv, wo, w1, w2, w3 (L, in, out); attention_norm, ffn_norm (L, dim)},
             "norm": (dim,), "output": (dim, vocab)}, with w1 and w3 as one w13 if `layout` says so;
    the unused embedding table is not built.
    """
    where = placements(params, block_hash)
    for name, p in where.items():
        if p.numel >= 2**31:
            raise ValueError(f"parameter {name} has {p.numel} elements; at most 2**31 - 1 are supported")
    rotations = {
        "layers": {
            key: np.array([where[f"layers.{i}.{ref}"].rotation for i in range(params.n_layers)], np.int32)
            for key, ref in LAYER_TENSORS.items()
        },
        **{key: np.int32(where[ref].rotation) for key, ref in TOP_TENSORS.items()},
    }
    return _build(pool, rotations, params, layout)


def pool_on_device(block_hash: str, params: Params, dtype: str, placement=None, drawn_on_device: bool = False
                   ) -> jax.Array:
    """The pool in float32, drawn on the host (numpy) or on the device (device_draws, the same
    values), placed on `placement` (a device or sharding) and cast there to the model dtype."""
    if drawn_on_device:
        pool = draw_pool_on_device(block_hash, params.pool_size)
    else:
        pool = draws.draw_pool(block_hash, params.pool_size)
    return jax.device_put(pool, placement).astype(JNP_DTYPES[dtype])


def build_parameter(pool: jax.Array, params: Params, block_hash: str, name: str) -> jax.Array:
    """One parameter by its reference name, in PyTorch layout (the embedding table included)."""
    shape = params.parameter_shapes()[name]
    where = PoolPlacement.of(block_hash, name, math.prod(shape), params.pool_size)
    return _gather(pool, where.numel, jnp.int32(where.rotation)).reshape(shape)


def reference_layout(weights: dict, params: Params) -> dict[str, np.ndarray]:
    """Weights built in the reference layout, back in the reference's names and PyTorch layout (for tests)."""
    out = {}
    for key, ref in LAYER_TENSORS.items():
        stacked = np.asarray(weights["layers"][key])
        for i in range(params.n_layers):
            t = stacked[i]
            out[f"layers.{i}.{ref}"] = t.T if t.ndim == 2 else t
    for key, ref in TOP_TENSORS.items():
        t = np.asarray(weights[key])
        out[ref] = t.T if t.ndim == 2 else t
    return out
