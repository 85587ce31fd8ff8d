"""The FFN's gated half in one Hopper kernel: `silu(x·W1) ⊙ (x·W3)`, the SwiGLU in the epilogue.

Through XLA the gate and up products are two cuBLAS calls, and the SwiGLU a third kernel that reads
both (rows, hidden) products back from memory and writes one. Here a warp-specialised Pallas Mosaic
GPU kernel computes both products of a tile at once and writes only the SwiGLU: its weight matrix
interleaves the columns of W1 and W3 in blocks of `block` (`weights.interleave_columns`), so one tile
of 2·block columns holds the gate and the up columns of the same `block` hidden units.

The rounding is the model's: each product accumulates in float32 and is rounded to the model dtype;
silu runs in float32 on the rounded gate and is rounded; the product of the two rounded halves is
rounded once (it is exact in float32).

Layout of the work: a persistent grid of one CTA per multiprocessor walks the output tiles; in each
CTA a memory warpgroup streams K-slices of x and of the interleaved weights into shared memory and
two compute warpgroups issue the WGMMAs. Two schedules:

- "cooperative": both compute warpgroups work on one tile (`rows` rows each) and run its epilogue
  together, so the tensor cores idle while the SwiGLU is computed. With `cluster` 2, two CTAs on
  neighbouring row tiles share each weight slice through a TMA multicast.
- "pingpong": each compute warpgroup owns every other tile of the CTA. The memory warpgroup fills
  one ring of stages in tile order, so one warpgroup's epilogue runs while the other's products
  keep the tensor cores busy.

The epilogue goes through shared memory to an asynchronous TMA store that overlaps later products.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

COMPUTE_WARPGROUPS = 2
SCHEDULES = ("cooperative", "pingpong")


@dataclasses.dataclass(frozen=True)
class GatedConfig:
    rows: int = 64  # rows of a tile per compute warpgroup
    block: int = 128  # hidden units per tile: the weight tile is 2·block columns (gate | up)
    tile_k: int = 64  # depth of one pipeline stage
    stages: int = 3  # K-slices in flight
    grid_tile_width: int = 8  # output tiles along the minor axis before the walk moves on (L2 reuse)
    epilogue_cols: int = 64  # columns per shared-memory store of the output
    schedule: str = "cooperative"
    cluster: int = 1  # cooperative only: CTAs sharing each weight slice
    in_flight: int = 1  # pingpong only: WGMMA groups left running while the next stage is awaited

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.cluster not in (1, 2) or (self.cluster == 2 and self.schedule != "cooperative"):
            raise ValueError(f"cluster {self.cluster} is not available with the {self.schedule} schedule")

    @property
    def cta_rows(self) -> int:
        """Rows of the tile one CTA computes at a time."""
        return self.rows * (COMPUTE_WARPGROUPS if self.schedule == "cooperative" else 1)

    @property
    def row_multiple(self) -> int:
        return self.cta_rows * self.cluster


# JAXBENCH_GATED_SCHEDULE picks the schedule for a measurement; anything else than a known name is ignored.
_SCHEDULE = os.environ.get("JAXBENCH_GATED_SCHEDULE", "")
DEFAULT_CONFIG = GatedConfig(schedule=_SCHEDULE) if _SCHEDULE in SCHEDULES else GatedConfig()


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
    body = _cooperative_kernel if config.schedule == "cooperative" else _pingpong_kernel
    run = plgpu.kernel(
        functools.partial(body, config=config, ctas=multiprocessors // config.cluster),
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


def _swizzled(cols: int, dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    item = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * item * 8)
    return plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle)


class _Epilogue:
    """The SwiGLU of one warpgroup's accumulator, stored through shared memory slots by TMA."""

    def __init__(self, config: GatedConfig, dtype):
        self.config, self.dtype = config, dtype
        self.rows, self.cols = min(config.rows, 64), config.epilogue_cols
        self.tiles = [(r, c) for r in range(config.rows // self.rows) for c in range(config.block // self.cols)]
        self.slots = min(2, len(self.tiles))

    def smem(self):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return plgpu.SMEM((COMPUTE_WARPGROUPS, self.slots, self.rows, self.cols), self.dtype,
                          transforms=_swizzled(self.cols, self.dtype))

    def __call__(self, acc_ref, out_smem, out_tile):
        """`out_smem`: this warpgroup's slots; `out_tile`: its (rows, block) window of the output."""
        from jax.experimental import pallas as pl
        from jax.experimental.pallas import mosaic_gpu as plgpu

        block, dtype = self.config.block, self.dtype
        both = acc_ref[...]
        gate = both[:, :block].astype(dtype).astype(jnp.float32)
        up = both[:, block:].astype(dtype).astype(jnp.float32)
        silu = (gate / (1.0 + jnp.exp(-gate))).astype(dtype).astype(jnp.float32)
        swiglu = (silu * up).astype(dtype)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read
        for i, (r, c) in enumerate(self.tiles):
            slot = i % self.slots
            plgpu.wait_smem_to_gmem(self.slots - 1, wait_read_only=True)
            out_smem[slot] = swiglu[r * self.rows:(r + 1) * self.rows, c * self.cols:(c + 1) * self.cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[slot], out_tile.at[pl.ds(r * self.rows, self.rows), pl.ds(c * self.cols, self.cols)])


def _cooperative_kernel(x_gmem, w_gmem, out_gmem, *, config: GatedConfig, ctas: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    rows, k = x_gmem.shape
    block, tile_rows, tile_k = config.block, config.rows, config.tile_k
    row_groups, col_tiles, k_steps = rows // config.row_multiple, out_gmem.shape[1] // block, k // tile_k
    epilogue = _Epilogue(config, dtype)
    shared = ("cluster",) if config.cluster > 1 else ()

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((config.cta_rows, tile_k), lambda s: (0, s), transforms=_swizzled(tile_k, dtype),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_k, 2 * block), lambda s: (s, 0), transforms=_swizzled(tile_k, dtype),
                                memory_space=plgpu.SMEM, collective_axes=shared),
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
        out_smem=epilogue.smem(),
        collective_axes="wg",
    )
    def _scope(buffers, out_smem):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((row_groups * col_tiles,), collective_axes="sm")
        def _tile(loop):
            (linear,) = loop.index
            row_group, col_tile = plgpu.planar_snake(linear, (row_groups, col_tiles), 1, config.grid_tile_width)
            row_tile = row_group * config.cluster + (jax.lax.axis_index("cluster") if config.cluster > 1 else 0)
            cta_rows = pl.ds(row_tile * config.cta_rows, config.cta_rows)
            my_rows = pl.ds(wg * tile_rows, tile_rows)
            out_tile = out_gmem.at[cta_rows, pl.ds(col_tile * block, block)].at[my_rows]

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_rows, 2 * block), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    epilogue(acc_ref, out_smem.at[wg], out_tile)

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


def _pingpong_kernel(x_gmem, w_gmem, out_gmem, *, config: GatedConfig, ctas: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    rows, k = x_gmem.shape
    block, tile_rows, tile_k, stages = config.block, config.rows, config.tile_k, config.stages
    row_tiles, col_tiles, k_steps = rows // tile_rows, out_gmem.shape[1] // block, k // tile_k
    epilogue = _Epilogue(config, dtype)

    sm = jax.lax.axis_index("sm")
    cta_tiles = (row_tiles * col_tiles - sm + ctas - 1) // ctas

    def tile_origin(i):
        """Row and column offsets of the CTA's i-th tile."""
        row_tile, col_tile = plgpu.planar_snake(sm + i * ctas, (row_tiles, col_tiles), 1, config.grid_tile_width)
        return row_tile * tile_rows, col_tile * block

    # Stage g of the CTA's stream (tile g // k_steps, K-slice g % k_steps) lives in slot g % stages. Its
    # arrival is signalled on the barrier row of the warpgroup that owns the tile, so each warpgroup
    # waits on every phase of its own barriers; `empty` has one waiter, the memory warpgroup.
    @functools.partial(
        pl.run_scoped,
        x_smem=plgpu.SMEM((stages, tile_rows, tile_k), dtype, transforms=_swizzled(tile_k, dtype)),
        w_smem=plgpu.SMEM((stages, tile_k, 2 * block), dtype, transforms=_swizzled(tile_k, dtype)),
        out_smem=epilogue.smem(),
        full=plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WARPGROUPS * stages),
        empty=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        collective_axes="wg",
    )
    def _scope(x_smem, w_smem, out_smem, full, empty):
        wg = jax.lax.axis_index("wg")

        @pl.when(wg == COMPUTE_WARPGROUPS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, cta_tiles)
            def _tile(i):
                row0, col0 = tile_origin(i)
                owner = jax.lax.rem(i, COMPUTE_WARPGROUPS)

                @pl.loop(0, k_steps)
                def _slice(s):
                    g = i * k_steps + s
                    slot = jax.lax.rem(g, stages)

                    @pl.when(g >= stages)
                    def _():
                        plgpu.barrier_wait(empty.at[slot])

                    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row0, tile_rows), pl.ds(s * tile_k, tile_k)],
                                            x_smem.at[slot], full.at[owner * stages + slot])
                    plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(s * tile_k, tile_k), pl.ds(2 * col0, 2 * block)],
                                            w_smem.at[slot], full.at[owner * stages + slot])

        @pl.when(wg < COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, (cta_tiles - wg + 1) // COMPUTE_WARPGROUPS)
            def _tile(j):
                i = wg + COMPUTE_WARPGROUPS * j
                row0, col0 = tile_origin(i)
                first = i * k_steps

                def mma(s, acc_ref):
                    slot = jax.lax.rem(first + s, stages)
                    plgpu.barrier_wait(full.at[wg * stages + slot])
                    plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot])
                    plgpu.wgmma_wait(config.in_flight)
                    if config.in_flight:
                        @pl.when(s > 0)
                        def _():
                            plgpu.barrier_arrive(empty.at[jax.lax.rem(first + s - 1, stages)])
                    else:
                        plgpu.barrier_arrive(empty.at[slot])
                    return acc_ref

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_rows, 2 * block), jnp.float32))
                def _acc(acc_ref):
                    jax.lax.fori_loop(0, k_steps, mma, acc_ref)
                    if config.in_flight:
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(empty.at[jax.lax.rem(first + k_steps - 1, stages)])
                    epilogue(acc_ref, out_smem.at[wg],
                             out_gmem.at[pl.ds(row0, tile_rows), pl.ds(col0, block)])

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
