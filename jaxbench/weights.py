"""Weights from the block hash (docs/algorithm.md §3): one pool drawn on the CPU, every tensor built on the device.

A parameter of `n` elements is `pool[s : s+n]` when it fits in the pool, else the pool tiled to `n`
values and rotated left by `r`; in both cases element `i` is `pool[index(i)]`, so the device only
gathers. Tensors come out in the model's layout (model.py): linear weights transposed to (in, out),
the full-sequence blocks' tensors stacked along a leading layer axis, the last block's apart. A run of
layers (one pipeline stage of a device group, placement.py) is built alone, on its own devices.

Beside the tensor list stands its abstract description (`weight_specs`: shape, dtype, logical axes),
from which steps are compiled before any weight exists and placement derives where each tensor lives.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import draws, fp8
from .device_draws import draw_pool_on_device
from .params import Params

JNP_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


class Tensor(NamedTuple):
    """A weight tensor: its name in the reference (inside `layers.{i}.` for a layer's), and the logical
    axes of its dimensions in the model's layout (placement.py maps logical axes to devices)."""

    reference: str
    axes: tuple[str, ...]


# Every tensor of a layer, and of the model's end, by the model's name. Linear weights are (in, out).
LAYER_TENSORS = {
    "wq": Tensor("attention.wq.weight", ("embed", "q_heads")),
    "wk": Tensor("attention.wk.weight", ("embed", "kv_heads")),
    "wv": Tensor("attention.wv.weight", ("embed", "kv_heads")),
    "wo": Tensor("attention.wo.weight", ("q_heads", "embed")),
    "w1": Tensor("feed_forward.w1.weight", ("embed", "ffn")),
    "w2": Tensor("feed_forward.w2.weight", ("ffn", "embed")),
    "w3": Tensor("feed_forward.w3.weight", ("embed", "ffn")),
    "attention_norm": Tensor("attention_norm.weight", ("embed",)),
    "ffn_norm": Tensor("ffn_norm.weight", ("embed",)),
}
TOP_TENSORS = {"norm": Tensor("norm.weight", ("embed",)), "output": Tensor("output.weight", ("embed", "vocab"))}
PRODUCT_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "w13")  # the layers' matrices, w13 as arranged
LAYERS_AXIS = "layers"  # the leading axis of the stacked blocks


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


def _layer_shape(params: Params, key: str) -> tuple[int, ...]:
    return params.parameter_shapes()[f"layers.0.{LAYER_TENSORS[key].reference}"]


@partial(jax.jit, static_argnames=("params", "layout"))
def _build(pool: jax.Array, rotations: dict, params: Params, layout: WeightLayout) -> dict:
    """The tensors `rotations` names (see build_weights), gathered from the pool."""
    shapes = params.parameter_shapes()

    def layer(rotation_of: dict, stacked: bool) -> dict:
        tensors = {}
        for key, r in rotation_of.items():
            shape = _layer_shape(params, key)
            build_one = lambda r, shape=shape: _to_model_layout(_gather(pool, math.prod(shape), r), shape)
            tensors[key] = jax.vmap(build_one)(r) if stacked else build_one(r)
        return arrange(tensors, layout)

    out = {"blocks": layer(rotations["blocks"], stacked=True)}
    if "last" in rotations:
        out["last"] = layer(rotations["last"], stacked=False)
        for key, tensor in TOP_TENSORS.items():
            shape = shapes[tensor.reference]
            out[key] = _to_model_layout(_gather(pool, math.prod(shape), rotations[key]), shape)
    return out


def quantized_products(weights: dict, shardings: dict) -> dict:
    """The layers' matrices of a stage's weights (build_weights) as fp8.Fp8Weights, placed by
    `shardings` (the tree of quantized_part), in the same tree ("blocks" and "last", where present);
    with_products puts them in place of the originals. A stack is quantized a layer at a time into
    its place: XLA would transpose a whole stack at once, as large again as the stack."""
    out: dict = {}
    for part, tensors in shardings.items():
        out[part] = {}
        for key, placed in tensors.items():
            w = weights[part][key]
            if part != "blocks":
                out[part][key] = jax.jit(fp8.quantize_weight, out_shardings=placed)(w)
                continue
            shape = jax.eval_shape(fp8.quantize_weight, w)
            stack = jax.tree.map(lambda t, p: jnp.zeros(t.shape, t.dtype, device=p), shape, placed)
            for layer in range(w.shape[0]):
                stack = _quantize_layer(stack, w, layer)
            out[part][key] = stack
    return out


@partial(jax.jit, donate_argnums=0)
def _quantize_layer(stack: "fp8.Fp8Weight", w: jax.Array, layer: int) -> "fp8.Fp8Weight":
    return jax.tree.map(lambda whole, one: whole.at[layer].set(one), stack, fp8.quantize_weight(w[layer]))


def with_products(weights: dict, products: dict) -> dict:
    """The weights for the "fp8" products: `products` (quantized_products) in place of the layers'
    matrices, the norms and the head shared with `weights`."""
    return {part: {**tensors, **products[part]} if part in products else tensors for part, tensors in weights.items()}


def placements(params: Params, block_hash: str) -> dict[str, PoolPlacement]:
    """Every parameter's placement, by reference name."""
    return {
        name: PoolPlacement.of(block_hash, name, math.prod(shape), params.pool_size)
        for name, shape in params.parameter_shapes().items()
    }


def stage_layers(params: Params, layers: range | None) -> tuple[range, bool]:
    """The full-sequence blocks of a run of layers (all of them when None), and whether it ends the
    model, holding the last block, the final norm and the head."""
    layers = range(params.n_layers) if layers is None else layers
    if not (0 <= layers.start < layers.stop <= params.n_layers and layers.step == 1):
        raise ValueError(f"layers {layers} are not a run of the model's {params.n_layers} layers")
    ends = layers.stop == params.n_layers
    return (range(layers.start, layers.stop - 1) if ends else layers), ends


def build_weights(pool: jax.Array, params: Params, block_hash: str, layout: WeightLayout = REFERENCE_LAYOUT,
                  layers: range | None = None) -> dict:
    """The weight pytree of a run of layers (the whole model when `layers` is None) from a pool already
    on the device in the model dtype.

    Output: {"blocks": {wq, wk, wv, wo, w1, w2, w3 (n, in, out); attention_norm, ffn_norm (n, dim)}}: the
    run's full-sequence blocks stacked (n may be 0); when the run ends the model also "last" (the last
    block's tensors, unstacked), "norm" (dim,) and "output" (dim, vocab). w1 and w3 become one w13 if
    `layout` says so; the unused embedding table is not built.
    """
    where = placements(params, block_hash)
    for name, p in where.items():
        if p.numel >= 2**31:
            raise ValueError(f"parameter {name} has {p.numel} elements; at most 2**31 - 1 are supported")
    blocks, ends = stage_layers(params, layers)

    def rotation(i: int, key: str) -> int:
        return where[f"layers.{i}.{LAYER_TENSORS[key].reference}"].rotation

    rotations: dict = {"blocks": {key: np.array([rotation(i, key) for i in blocks], np.int32) for key in LAYER_TENSORS}}
    if ends:
        rotations["last"] = {key: np.int32(rotation(params.n_layers - 1, key)) for key in LAYER_TENSORS}
        rotations.update({key: np.int32(where[t.reference].rotation) for key, t in TOP_TENSORS.items()})
    return _build(pool, rotations, params, layout)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A weight tensor before it exists: enough to compile a step and to place it."""

    shape: tuple[int, ...]
    dtype: object
    axes: tuple[str, ...]  # logical axes, one per dimension


def _quantized_spec(t: TensorSpec) -> fp8.Fp8Weight:
    """The spec of fp8.quantize_weight's result for a weight (…, K, N)."""
    *lead, k, n = t.shape
    *lead_axes, k_axis, n_axis = t.axes
    return fp8.Fp8Weight(TensorSpec((*lead, n, k), fp8.E4M3, (*lead_axes, n_axis, k_axis)),
                         TensorSpec((*lead, n), jnp.float32, (*lead_axes, n_axis)))


def quantized_part(specs: dict) -> dict:
    """The part of a weight_specs tree for the "fp8" products that quantized_products makes."""
    return {part: {k: t for k, t in specs[part].items() if k in PRODUCT_WEIGHTS}
            for part in ("blocks", "last") if part in specs}


def spec_bytes(specs) -> int:
    return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize
               for t in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, TensorSpec)))


def weight_specs(params: Params, dtype: str, layout: WeightLayout = REFERENCE_LAYOUT, layers: range | None = None,
                 products: str = "exact") -> dict:
    """The pytree build_weights returns for these arguments, as TensorSpecs; with `products` "fp8", the
    pytree with_products makes of it."""
    blocks, ends = stage_layers(params, layers)
    jnp_dtype = JNP_DTYPES[dtype]

    def layer(lead: tuple[int, ...], lead_axes: tuple[str, ...]) -> dict:
        tensors = {key: TensorSpec((*lead, *_layer_shape(params, key)[::-1]), jnp_dtype, (*lead_axes, *t.axes))
                   for key, t in LAYER_TENSORS.items()}
        if layout.gate_up_block:
            w1 = tensors.pop("w1")
            tensors.pop("w3")
            tensors["w13"] = TensorSpec((*w1.shape[:-1], 2 * w1.shape[-1]), jnp_dtype, w1.axes)  # w1 and w3 side by side
        if products == "fp8":
            tensors = {k: _quantized_spec(t) if k in PRODUCT_WEIGHTS else t for k, t in tensors.items()}
        return tensors

    out = {"blocks": layer((len(blocks),), (LAYERS_AXIS,))}
    if ends:
        out["last"] = layer((), ())
        shapes = params.parameter_shapes()
        out.update({key: TensorSpec(shapes[t.reference][::-1], jnp_dtype, t.axes) for key, t in TOP_TENSORS.items()})
    return out


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
    """The whole model's weights built in the reference layout, back in the reference's names and
    PyTorch layout (for tests)."""
    out = {}
    for key, tensor in LAYER_TENSORS.items():
        stacked = np.concatenate([np.asarray(weights["blocks"][key]), np.asarray(weights["last"][key])[None]])
        for i in range(params.n_layers):
            t = stacked[i]
            out[f"layers.{i}.{tensor.reference}"] = t.T if t.ndim == 2 else t
    for key, tensor in TOP_TENSORS.items():
        t = np.asarray(weights[key])
        out[tensor.reference] = t.T if t.ndim == 2 else t
    return out
