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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

COMPUTE_WARPGROUPS = 2


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


# Two CTAs per weight slice measured +1 % to +7 % on one H200, −3 % to −8 % on another, and on a third
# +1 % to +2 % kept busy for seconds, +0.5 % to +0.7 % end to end (docs/benchmarks.md): within the
# spread between cards, so the default stays one CTA.
DEFAULT_CONFIG = GatedConfig()


def applies(rows: int, dim: int, hidden: int, dtype, config: GatedConfig = DEFAULT_CONFIG) -> bool:
    """Whether the kernel takes this shape: whole tiles in every dimension, a 16-bit dtype."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
            and rows % config.row_multiple == 0 and dim % config.tile_k == 0 and hidden % config.block == 0)


def on_hopper(device: jax.Device) -> bool:
    """Hopper (compute capability 9.0) runs the kernel; every other device takes XLA's path."""
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def gated_ffn(x: jax.Array, w13: jax.Array, config: GatedConfig = DEFAULT_CONFIG,
              multiprocessors: int | None = None) -> jax.Array:
    """x (rows, K) and interleaved weights (K, 2H) → the SwiGLU (rows, H), in x's dtype."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, k = x.shape
    hidden = w13.shape[1] // 2
    if not applies(rows, k, hidden, x.dtype, config) or w13.shape[0] != k or w13.dtype != x.dtype:
        raise ValueError(f"gated_ffn: no kernel for x {x.shape} {x.dtype}, weights {w13.shape} {w13.dtype}")
    if multiprocessors is None:
        multiprocessors = jax.devices()[0].core_count
    run = plgpu.kernel(
        functools.partial(_kernel, config=config),
        out_type=jax.ShapeDtypeStruct((rows, hidden), x.dtype),
        grid=(multiprocessors // config.cluster,),
        grid_names=("sm",),
        cluster=(config.cluster,),
        cluster_names=("cluster",),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return run(x, w13)


def _kernel(x_gmem, w_gmem, out_gmem, *, config: GatedConfig):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    item = jnp.dtype(dtype).itemsize
    rows, k = x_gmem.shape
    block, tile_rows, tile_k = config.block, config.rows, config.tile_k
    row_groups, col_tiles, k_steps = rows // config.row_multiple, out_gmem.shape[1] // block, k // tile_k

    def swizzled(cols: int):
        swizzle = plgpu.find_swizzle(cols * item * 8)
        return plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle)

    epi_rows, epi_cols = min(tile_rows, 64), config.epilogue_cols
    epi_tiles = [(r, c) for r in range(tile_rows // epi_rows) for c in range(block // epi_cols)]
    out_slots = min(2, len(epi_tiles))

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((config.cta_rows, tile_k), lambda s: (0, s), transforms=swizzled(tile_k),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_k, 2 * block), lambda s: (s, 0), transforms=swizzled(tile_k),
                                memory_space=plgpu.SMEM, collective_axes=("cluster",) if config.cluster > 1 else ()),
            ],
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WARPGROUPS,
            max_concurrent_steps=config.stages,
            compute_context=compute_context,
        )

    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        buffers=pipeline(unused, unused).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, out_slots, epi_rows, epi_cols), dtype,
                            transforms=swizzled(epi_cols)),
        collective_axes="wg",
    )
    def _scope(buffers, out_smem):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((row_groups * col_tiles,), collective_axes="sm")
        def _tile(loop):
            (linear,) = loop.index
            row_group, col_tile = plgpu.planar_snake(linear, (row_groups, col_tiles), 1, config.grid_tile_width)
            row_tile = row_group * config.cluster + jax.lax.axis_index("cluster")
            cta_rows = pl.ds(row_tile * config.cta_rows, config.cta_rows)
            my_rows = pl.ds(wg * tile_rows, tile_rows)
            out_tile = out_gmem.at[cta_rows, pl.ds(col_tile * block, block)].at[my_rows]

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_rows, 2 * block), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    both = acc_ref[...]
                    gate = both[:, :block].astype(dtype).astype(jnp.float32)
                    up = both[:, block:].astype(dtype).astype(jnp.float32)
                    silu = (gate / (1.0 + jnp.exp(-gate))).astype(dtype).astype(jnp.float32)
                    swiglu = (silu * up).astype(dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read
                    for i, (r, c) in enumerate(epi_tiles):
                        slot = i % out_slots
                        plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                        out_smem[wg, slot] = swiglu[r * epi_rows:(r + 1) * epi_rows, c * epi_cols:(c + 1) * epi_cols]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg, slot],
                            out_tile.at[pl.ds(r * epi_rows, epi_rows), pl.ds(c * epi_cols, epi_cols)])

            def step(_, x_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem.at[my_rows], w_smem)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(step, compute_context)(
                x_gmem.at[cta_rows, :],
                w_gmem.at[:, pl.ds(col_tile * 2 * block, 2 * block)],
                allocations=buffers,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
