"""One step of the search on a placement, compiled ahead of time and kept.

A step takes each group's batch of inputs (or the generator states of device draws) and
permutations, and gives one float32 distance per nonce. On a placement of S stages (placement.py) it
is S programs, one per stage, each a `shard_map` over the stage's devices of every group: the first
draws the inputs (device draws) and runs its run of layers, the middle ones run theirs, the last
ends the model and takes the distances. With S = 1 the one program does all of it.

Every program is compiled from shapes alone (`weight_specs` and the batch's shapes, placed by the
placement's rules), before any weight exists, with the persistent XLA cache on; the compiled steps
are kept in a bounded least-recently-used table keyed by `StepKey`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import device_draws
from .distance import distances
from .model import ModelConfig, stage_fn
from .params import Params
from .placement import Placement, Stage, partition_spec
from .weights import JNP_DTYPES, WeightLayout, weight_specs

MAX_COMPILED_STEPS = 16  # executables kept; the least recently used goes first (each parameter set has its own)

# Logical axes of the arrays a step touches besides the weights.
STATE_AXES = ("batch", "state")
INPUT_AXES = ("batch", "seq", "embed")
PERMUTATION_AXES = ("batch", "vocab")
TARGET_AXES = (None, "vocab")
DISTANCE_AXES = ("batch",)


@dataclasses.dataclass(frozen=True)
class StepKey:
    """Everything a compiled step depends on."""

    params: Params
    dtype: str
    batch: int  # nonces per group per step
    groups: int
    group_size: int
    draws: str
    attention: str
    ffn: str
    layout: WeightLayout
    products: str = "exact"  # model.PRODUCTS: "fp8" is a screen's step

    def describe(self) -> dict:
        """The key as /health shows it; `devices` counts the devices the step runs on."""
        return {"params": self.params.to_dict(), "dtype": self.dtype, "batch": self.batch,
                "devices": self.groups * self.group_size, "groups": self.groups, "group_size": self.group_size,
                "draws": self.draws, "attention": self.attention, "ffn": self.ffn, "products": self.products}

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(self.params, self.dtype, self.attention, self.ffn, self.layout, self.products)

    def weight_specs(self, layers: range | None) -> dict:
        return weight_specs(self.params, self.dtype, self.layout, layers, self.products)


def input_axes(draws: str) -> tuple[str, ...]:
    return STATE_AXES if draws == "device" else INPUT_AXES


def abstract_weights(key: StepKey, stage: Stage) -> Any:
    """The stage's weights as placed ShapeDtypeStructs."""
    return jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=stage.sharding(t.axes)),
                        key.weight_specs(stage.layers))


class PipelinedStep:
    """The compiled programs of a step's stages; calling it dispatches them all and returns the distances
    (G·batch, on the last stage's devices) without waiting for them."""

    def __init__(self, key: StepKey, stages: list[Stage], programs: list[Callable], compile_seconds: float):
        self.key = key
        self.stages = stages
        self.programs = programs
        self.compile_seconds = compile_seconds
        self.activation = [stage.sharding(INPUT_AXES) for stage in stages]

    def __call__(self, stage_weights: list, inputs: jax.Array, permutations: jax.Array, target: jax.Array
                 ) -> jax.Array:
        h = inputs
        for stage, program, weights, placed in zip(self.stages, self.programs, stage_weights, self.activation):
            if not stage.is_first:  # the group's activation moves to its next device
                h = jax.device_put(h, placed)
            h = program(weights, h, permutations, target) if stage.is_last else program(weights, h)
        return h


def _stage_program(key: StepKey, stage: Stage) -> Callable:
    """The jitted program of one stage: (weights, inputs or activation[, permutations, target])."""
    forward = stage_fn(key.model)
    make_inputs = (device_draws.make_input_drawer(key.params.seq_len, key.params.dim, key.dtype)
                   if stage.is_first and key.draws == "device" else (lambda x: x))

    def per_device(weights, h, *distance_args):
        out = forward(weights, make_inputs(h))
        return distances(out, *distance_args) if stage.is_last else out

    weight_spec = jax.tree.map(lambda t: partition_spec(t.axes),
                               key.weight_specs(stage.layers))
    in_specs = (weight_spec, partition_spec(input_axes(key.draws) if stage.is_first else INPUT_AXES))
    if stage.is_last:
        in_specs += (partition_spec(PERMUTATION_AXES), partition_spec(TARGET_AXES))
    out_spec = partition_spec(DISTANCE_AXES if stage.is_last else INPUT_AXES)
    return jax.jit(jax.shard_map(per_device, mesh=stage.mesh, in_specs=in_specs, out_specs=out_spec,
                                 check_vma=False))


def _abstract_arguments(key: StepKey, stage: Stage) -> tuple:
    rows = key.groups * key.batch
    p = key.params
    if stage.is_first and key.draws == "device":
        h = jax.ShapeDtypeStruct((rows, *device_draws.STATE_SHAPE), jnp.uint32, sharding=stage.sharding(STATE_AXES))
    else:
        h = jax.ShapeDtypeStruct((rows, p.seq_len, p.dim), JNP_DTYPES[key.dtype], sharding=stage.sharding(INPUT_AXES))
    args = (abstract_weights(key, stage), h)
    if stage.is_last:
        args += (jax.ShapeDtypeStruct((rows, p.vocab_size), jnp.int32, sharding=stage.sharding(PERMUTATION_AXES)),
                 jax.ShapeDtypeStruct((2, p.vocab_size), jnp.float32, sharding=stage.sharding(TARGET_AXES)))
    return args


# XLA's Triton GEMM autotuning of e4m3 products took minutes on an H100 (JAX 0.11.2): the screen's
# products go to cuBLASLt's FP8 GEMM instead.
COMPILER_OPTIONS = {"exact": None, "fp8": {"xla_gpu_enable_triton_gemm": False}}


def compile_step(key: StepKey, placement: Placement) -> PipelinedStep:
    t0 = time.perf_counter()
    stages = placement.stages(key.params)
    options = COMPILER_OPTIONS[key.products]
    programs = [_stage_program(key, stage).lower(*_abstract_arguments(key, stage)).compile(compiler_options=options)
                for stage in stages]
    return PipelinedStep(key, stages, programs, time.perf_counter() - t0)


class CompiledSteps:
    """The compiled steps, at most MAX_COMPILED_STEPS, the least recently used evicted first. One
    compilation at a time; reading the table never waits for one."""

    def __init__(self):
        self._steps: collections.OrderedDict[StepKey, PipelinedStep] = collections.OrderedDict()
        self._compile_lock = threading.Lock()
        self._table_lock = threading.Lock()

    def get(self, key: StepKey) -> PipelinedStep | None:
        with self._table_lock:
            step = self._steps.get(key)
            if step is not None:
                self._steps.move_to_end(key)
            return step

    def get_or_compile(self, key: StepKey, placement: Placement) -> tuple[PipelinedStep, bool]:
        """The step for `key` and whether it was compiled by this call."""
        with self._compile_lock:
            step = self.get(key)
            if step is not None:
                return step, False
            step = compile_step(key, placement)
            with self._table_lock:
                self._steps[key] = step
                while len(self._steps) > MAX_COMPILED_STEPS:
                    self._steps.popitem(last=False)
            return step, True

    def discard(self, key: StepKey) -> None:
        with self._table_lock:
            self._steps.pop(key, None)

    def keys(self) -> list[StepKey]:
        with self._table_lock:
            return list(self._steps)
