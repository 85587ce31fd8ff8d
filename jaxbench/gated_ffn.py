"""The FFN's gated half in one Hopper kernel: `silu(x·W1) ⊙ (x·W3)`, the SwiGLU in the epilogue.

Through XLA the gate and up products are two cuBLAS calls, and the SwiGLU a third kernel that reads
both (rows, hidden) products back from memory and writes one. Here a warp-specialised Pallas Mosaic
GPU kernel computes both products of a tile at once and writes only the SwiGLU: its weight matrix
interleaves the columns of W1 and W3 in blocks of `block` (`weights.interleave_columns`), so one tile
of 2·block columns holds the gate and the up columns of the same `block` hidden units.

The rounding is the model's: each product accumulates in float32 and is rounded to the model dtype;
silu runs in float32 on the rounded gate and is rounded; the product of the two rounded halves is
rounded once (it is exact in float32).

Layout of the work: a persistent grid of one CTA per multiprocessor walks the output tiles. In each
CTA a memory warpgroup streams K-slices of x and of the interleaved weights into shared memory, and
two compute warpgroups each own `rows` rows of the tile and issue the WGMMAs; the epilogue goes
through shared memory to an asynchronous TMA store that overlaps the next tile's products. With
`cluster` 2, two CTAs work on neighbouring row tiles of the same columns and each weight slice is
loaded once for both, multicast by the TMA unit, which halves the weights' traffic out of L2.

`gated_ffn_fp8` is the same kernel for an FP8 screen (fp8.py): e4m3 operands, the weights stored
(2H, K) as cuBLASLt's FP8 GEMM takes them, float32 accumulation, the row and column scales applied in
the epilogue, and the SwiGLU written in e4m3 with a per-row scale chosen before the kernel runs, so
the down product reads it as it is; nothing of it is rounded to a 16-bit type on the way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

COMPUTE_WARPGROUPS = 2
E4M3 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class GatedConfig:
    rows: int = 64  # rows of a tile per compute warpgroup; a CTA tile has 2·rows
    block: int = 128  # hidden units per tile: the weight tile is 2·block columns (gate | up)
    tile_k: int = 64  # depth of one pipeline stage
    stages: int = 3  # K-slices in flight
    grid_tile_width: int = 8  # output tiles along the minor axis before the walk moves on (L2 reuse)
    epilogue_cols: int = 64  # columns per shared-memory store of the output
    cluster: int = 1  # CTAs sharing each weight slice (1 or 2)

    def __post_init__(self):
        if self.cluster not in (1, 2):
            raise ValueError(f"cluster must be 1 or 2, got {self.cluster}")

    @property
    def cta_rows(self) -> int:
        return COMPUTE_WARPGROUPS * self.rows

    @property
    def row_multiple(self) -> int:
        """Rows come in whole cluster tiles."""
        return self.cta_rows * self.cluster


# e4m3 stages are 128 deep: one 128-byte swizzle span, four WGMMAs of K 32.
FP8_CONFIG = GatedConfig(tile_k=128, stages=4)

# Two CTAs per weight slice measured +1 % to +7 % on one H200, −3 % to −8 % on another, and on a third
# +1 % to +2 % kept busy for seconds, +0.5 % to +0.7 % end to end (docs/benchmarks.md): within the
# spread between cards, so the default stays one CTA.
DEFAULT_CONFIG = GatedConfig()


def applies(rows: int, dim: int, hidden: int, dtype, config: GatedConfig = DEFAULT_CONFIG) -> bool:
    """Whether the kernel takes this shape: whole tiles in every dimension, a 16-bit dtype."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
            and rows % config.row_multiple == 0 and dim % config.tile_k == 0 and hidden % config.block == 0)


def applies_fp8(rows: int, dim: int, hidden: int, config: GatedConfig = FP8_CONFIG) -> bool:
    """Whether gated_ffn_fp8 takes this shape: whole tiles in every dimension."""
    return rows % config.row_multiple == 0 and dim % config.tile_k == 0 and hidden % config.block == 0


def on_hopper(device: jax.Device) -> bool:
    """Hopper (compute capability 9.0) runs the kernel; every other device takes XLA's path."""
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def split_gate_up(both: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """The product with interleaved weights (…, 2H), blocks of `block` columns alternating gate and
    up (weights.interleave_columns), as gate (…, H) and up (…, H)."""
    *lead, width = both.shape
    hidden = width // 2
    pairs = both.reshape(*lead, hidden // block, 2, block)
    return pairs[..., 0, :].reshape(*lead, hidden), pairs[..., 1, :].reshape(*lead, hidden)


def gated_ffn(x: jax.Array, w13: jax.Array, config: GatedConfig = DEFAULT_CONFIG,
              multiprocessors: int | None = None) -> jax.Array:
    """x (rows, K) and interleaved weights (K, 2H) → the SwiGLU (rows, H), in x's dtype."""
    rows, k = x.shape
    hidden = w13.shape[1] // 2
    if not applies(rows, k, hidden, x.dtype, config) or w13.shape[0] != k or w13.dtype != x.dtype:
        raise ValueError(f"gated_ffn: no kernel for x {x.shape} {x.dtype}, weights {w13.shape} {w13.dtype}")
    dtype = x.dtype
    block = config.block

    def swiglu(acc):
        gate = acc[:, :block].astype(dtype).astype(jnp.float32)
        up = acc[:, block:].astype(dtype).astype(jnp.float32)
        silu = (gate / (1.0 + jnp.exp(-gate))).astype(dtype).astype(jnp.float32)
        return (silu * up).astype(dtype)

    return _launch(x, w13, swiglu, dtype, hidden, config, multiprocessors, weights_transposed=False)


def gated_ffn_fp8(x: jax.Array, x_scale: jax.Array, w13: jax.Array, w_scale: jax.Array, out_scale: jax.Array,
                  config: GatedConfig = FP8_CONFIG, multiprocessors: int | None = None) -> jax.Array:
    """The SwiGLU through e4m3 operands, in e4m3: x (rows, K) e4m3 with its row scales x_scale (rows,),
    interleaved weights w13 (2H, K) e4m3 with their column scales w_scale (2H,), and the output's row
    scales out_scale (rows,): returns h (rows, H) in e4m3 with h · out_scale ≈ silu(x·W1) ⊙ (x·W3).
    Values beyond e4m3's range saturate at ±448."""
    rows, k = x.shape
    hidden = w13.shape[0] // 2
    shapes_fit = (w13.shape[1] == k and x_scale.shape == (rows,) and out_scale.shape == (rows,)
                  and w_scale.shape == (2 * hidden,))
    if (not applies_fp8(rows, k, hidden, config) or not shapes_fit
            or x.dtype != E4M3 or w13.dtype != E4M3):
        raise ValueError(f"gated_ffn_fp8: no kernel for x {x.shape} {x.dtype}, weights {w13.shape} {w13.dtype}")
    block = config.block

    def swiglu(acc, x_s, inverse_out, w_s):
        gate = acc[:, :block] * x_s[:, None] * w_s[None, :block]
        up = acc[:, block:] * x_s[:, None] * w_s[None, block:]
        return (gate / (1.0 + jnp.exp(-gate)) * up * inverse_out[:, None]).astype(E4M3)

    row_vectors = (x_scale.astype(jnp.float32), (1.0 / out_scale).astype(jnp.float32))
    return _launch(x, w13, swiglu, E4M3, hidden, config, multiprocessors, weights_transposed=True,
                   row_vectors=row_vectors, col_vectors=(w_scale.astype(jnp.float32),))


def _launch(x, w13, epilogue, out_dtype, hidden: int, config: GatedConfig, multiprocessors: int | None,
            weights_transposed: bool, row_vectors: tuple = (), col_vectors: tuple = ()) -> jax.Array:
    """Runs the kernel; `epilogue(acc, *rows, *cols)` turns a warpgroup's float32 accumulator (rows,
    2·block) into its output tile, given that tile's slices of `row_vectors` (each (rows,)) and of
    `col_vectors` (each (2H,), in the weights' column order)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows = x.shape[0]
    if multiprocessors is None:
        multiprocessors = jax.devices()[0].core_count
    run = plgpu.kernel(
        functools.partial(_kernel, config=config, epilogue=epilogue, weights_transposed=weights_transposed,
                          row_count=len(row_vectors), col_count=len(col_vectors)),
        out_type=jax.ShapeDtypeStruct((rows, hidden), out_dtype),
        grid=(multiprocessors // config.cluster,),
        grid_names=("sm",),
        cluster=(config.cluster,),
        cluster_names=("cluster",),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return run(x, w13, *row_vectors, *col_vectors)


def _kernel(x_gmem, w_gmem, *refs, config: GatedConfig, epilogue, weights_transposed: bool, row_count: int,
            col_count: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row_gmems, col_gmems, (out_gmem,) = refs[:row_count], refs[row_count:row_count + col_count], refs[row_count + col_count:]
    item, out_item = jnp.dtype(x_gmem.dtype).itemsize, jnp.dtype(out_gmem.dtype).itemsize
    rows, k = x_gmem.shape
    block, tile_rows, tile_k = config.block, config.rows, config.tile_k
    row_groups, col_tiles, k_steps = rows // config.row_multiple, out_gmem.shape[1] // block, k // tile_k

    def swizzled(cols: int, itemsize: int):
        swizzle = plgpu.find_swizzle(cols * itemsize * 8)
        return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)

    epi_rows, epi_cols = min(tile_rows, 64), config.epilogue_cols
    epi_tiles = [(r, c) for r in range(tile_rows // epi_rows) for c in range(block // epi_cols)]
    out_slots = min(2, len(epi_tiles))
    weight_tile = (2 * block, tile_k) if weights_transposed else (tile_k, 2 * block)
    weight_index = (lambda s: (0, s)) if weights_transposed else (lambda s: (s, 0))
    vector_count = row_count + col_count

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((config.cta_rows, tile_k), lambda s: (0, s), transforms=swizzled(tile_k, item),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec(weight_tile, weight_index, transforms=swizzled(weight_tile[1], item),
                                memory_space=plgpu.SMEM, collective_axes=("cluster",) if config.cluster > 1 else ()),
            ],
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WARPGROUPS,
            max_concurrent_steps=config.stages,
            compute_context=compute_context,
        )

    unused = lambda *_, **__: None
    # Each compute warpgroup copies its tile's slices of the vectors into shared memory while its
    # products run (one barrier a copy), and reads them in the epilogue.
    vector_scratch = dict(
        row_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, max(row_count, 1), tile_rows), jnp.float32),
        col_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, max(col_count, 1), 2 * block), jnp.float32),
        vector_barriers=plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS * vector_count),
    ) if vector_count else {}

    @functools.partial(
        pl.run_scoped,
        buffers=pipeline(unused, unused).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, out_slots, epi_rows, epi_cols), out_gmem.dtype,
                            transforms=swizzled(epi_cols, out_item)),
        **vector_scratch,
        collective_axes="wg",
    )
    def _scope(buffers, out_smem, row_smem=None, col_smem=None, vector_barriers=None):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((row_groups * col_tiles,), collective_axes="sm")
        def _tile(loop):
            (linear,) = loop.index
            row_group, col_tile = plgpu.planar_snake(linear, (row_groups, col_tiles), 1, config.grid_tile_width)
            row_tile = row_group * config.cluster + jax.lax.axis_index("cluster")
            cta_rows = pl.ds(row_tile * config.cta_rows, config.cta_rows)
            my_rows = pl.ds(wg * tile_rows, tile_rows)
            weight_cols = pl.ds(col_tile * 2 * block, 2 * block)
            out_tile = out_gmem.at[cta_rows, pl.ds(col_tile * block, block)].at[my_rows]
            vector_copies = [(gmem.at[cta_rows].at[my_rows], row_smem.at[wg, i]) for i, gmem in enumerate(row_gmems)]
            vector_copies += [(gmem.at[weight_cols], col_smem.at[wg, i]) for i, gmem in enumerate(col_gmems)]

            def compute_context(run_pipeline):
                for i, (src, dst) in enumerate(vector_copies):
                    plgpu.copy_gmem_to_smem(src, dst, vector_barriers.at[wg * vector_count + i])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_rows, 2 * block), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    for i in range(vector_count):
                        plgpu.barrier_wait(vector_barriers.at[wg * vector_count + i])
                    row_values = [plgpu.load(row_smem.at[wg, i], layout=plgpu.Layout.WGMMA.reduce(1))
                                  for i in range(row_count)]
                    col_values = [plgpu.load(col_smem.at[wg, i], layout=plgpu.Layout.WGMMA.reduce(0))
                                  for i in range(col_count)]
                    out = epilogue(acc_ref[...], *row_values, *col_values)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read
                    for i, (r, c) in enumerate(epi_tiles):
                        slot = i % out_slots
                        plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                        out_smem[wg, slot] = out[r * epi_rows:(r + 1) * epi_rows, c * epi_cols:(c + 1) * epi_cols]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg, slot],
                            out_tile.at[pl.ds(r * epi_rows, epi_rows), pl.ds(c * epi_cols, epi_cols)])

            def step(_, x_smem, w_smem, acc_ref):
                weights = w_smem.T if weights_transposed else w_smem
                plgpu.wgmma(acc_ref, x_smem.at[my_rows], weights)
                plgpu.wgmma_wait(0)
                return acc_ref

            weight_slice = w_gmem.at[weight_cols, :] if weights_transposed else w_gmem.at[:, weight_cols]
            pipeline(step, compute_context)(x_gmem.at[cta_rows, :], weight_slice, allocations=buffers)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
