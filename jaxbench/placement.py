"""Where the weights and each step live: device groups, pipeline stages, and the rules from logical axes to them.

The local devices form a grid of G groups × S stages (mesh axes "group" and "stage"). Each group holds
one replica of the weights with its layers cut into S contiguous runs, run s on the group's s-th
device, and the groups run data-parallel, each on its own nonces of every step (nonces.py). With
S = 1 every device holds the whole model.

Choosing S: the smallest of GROUP_SIZES whose fullest stage fits each device's memory with a step of
GROUP_BATCH nonces (memory.py's generous estimate); if none does, the smallest that fits one nonce. A
forced size must fit one nonce. Devices beyond G·S stay idle.

How a step crosses a group: each group's whole batch runs through stage 0, its activation
(batch, seq_len, dim) moves to the group's next device (`jax.device_put` between the two stages'
shardings), and so on; the last stage ends the model and computes the distances. The host dispatches
every stage of a step before it waits for an earlier one, so JAX's asynchronous dispatch keeps each
stage busy with a different step. A micro-batch is a whole step's batch, so every layer computes
the same products on the same shapes as on one device, and a group's distances are bit-identical
to one device's for the same per-step batch. Across stages only activations move: about
seq_len·dim·2 bytes a nonce per boundary in float16, where splitting each product across the cards
(tensor parallelism) would move the activations of every layer (docs/architecture.md).

The layers are cut where the FLOPs balance (Params.layer_flops: the last block runs one query
position and carries the head, so it costs less than a full one).

Logical axes map to mesh axes by RULES: "batch" (a step's nonces) → "group"; "layers" (the stacked
layer axis) → "stage", realised by giving each stage its own run of layers; every other axis is
replicated. Everything the engine places goes through `Placement.sharding`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .fields import FieldError
from .memory import MemoryNeed, device_free_bytes
from .params import Params
from .sizes import format_size

GROUP_SIZES = (1, 2, 4, 8)
GROUP_BATCH = 8  # nonces a group should be able to take per step: fewer feed the products too few rows
MESH_AXES = ("group", "stage")
RULES = {"batch": "group", "layers": "stage"}  # logical axis → mesh axis; the others are replicated


def partition_spec(axes: Sequence[str | None]) -> P:
    """The spec of an array with these logical axes inside one stage's mesh (axis "group"): the
    stage axis is already realised by each stage holding its own run of layers."""
    return P(*(RULES.get(a) if RULES.get(a) == "group" else None for a in axes))


def balanced_runs(costs: Sequence[int], n_runs: int) -> list[range]:
    """`costs` cut into `n_runs` contiguous non-empty runs, the largest run's sum as small as it can be."""
    if not 1 <= n_runs <= len(costs):
        raise ValueError(f"cannot cut {len(costs)} layers into {n_runs} runs")

    def cut(limit: float) -> list[int]:  # greedy: each run as long as it stays within limit
        starts, total = [0], 0
        for i, c in enumerate(costs):
            if total + c > limit and total > 0:
                starts.append(i)
                total = 0
            total += c
        return starts

    low, high = max(costs), sum(costs)
    while low < high:  # the smallest limit the greedy cut meets with n_runs runs or fewer
        mid = (low + high) // 2
        if len(cut(mid)) <= n_runs:
            high = mid
        else:
            low = mid + 1
    starts = cut(low)
    bounds = starts + [len(costs)]
    runs = [range(a, b) for a, b in zip(bounds, bounds[1:])]
    while len(runs) < n_runs:  # fewer runs than asked: split the longest, which cannot raise the largest sum
        longest = max(range(len(runs)), key=lambda i: len(runs[i]))
        r = runs[longest]
        half = r.start + len(r) // 2
        runs[longest : longest + 1] = [range(r.start, half), range(half, r.stop)]
    return runs


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    layers: range  # the run of the model's layers this stage holds
    mesh: Mesh  # the stage's device in every group, one mesh axis "group"
    is_first: bool
    is_last: bool

    def sharding(self, axes: Sequence[str | None]) -> NamedSharding:
        """Where an array with these logical axes lives on this stage's devices."""
        return NamedSharding(self.mesh, partition_spec(axes))


class Placement:
    """G groups × S stages of the engine's devices, and each parameter set's stages on them."""

    def __init__(self, devices: Sequence[jax.Device], group_size: int):
        if group_size not in GROUP_SIZES or group_size > len(devices):
            raise ValueError(f"no groups of {group_size} from {len(devices)} device(s)")
        self.group_size = group_size
        self.n_groups = len(devices) // group_size
        self.grid = np.array(devices[: self.n_groups * group_size]).reshape(self.n_groups, group_size)
        self.mesh = Mesh(self.grid, MESH_AXES)
        self._stage_meshes = [Mesh(self.grid[:, s], ("group",)) for s in range(group_size)]

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.grid.flat)

    def stages(self, params: Params) -> list[Stage]:
        """The stages of a parameter set: each group's layers cut where the FLOPs balance."""
        runs = balanced_runs(params.layer_flops(), self.group_size)
        last = self.group_size - 1
        return [Stage(s, layers, self._stage_meshes[s], s == 0, s == last) for s, layers in enumerate(runs)]

    def describe(self) -> dict:
        return {"groups": self.n_groups, "group_size": self.group_size}


def stage_need(params: Params, dtype: str, group_size: int) -> MemoryNeed:
    """The memory of the fullest stage's device in a group of `group_size`: what each device must have."""
    runs = balanced_runs(params.layer_flops(), group_size)
    return max((MemoryNeed.of(params, dtype, r) for r in runs), key=lambda need: need.total(1))


def choose_group_size(n_devices: int, params: Params, dtype: str, available: int | None,
                      forced: int | None = None) -> int:
    """The group size for a parameter set: `forced` if it fits, else the smallest of GROUP_SIZES whose
    fullest stage fits `available` bytes a device with GROUP_BATCH nonces, else with one (None:
    unknown, 1). Refuses (FieldError on `params`) with what the set needs and what the devices have."""
    if forced is not None:
        if forced not in GROUP_SIZES:
            raise FieldError("group_size", f"must be one of {', '.join(map(str, GROUP_SIZES))}, got {forced}")
        if forced > n_devices:
            raise FieldError("group_size", f"a group of {forced} needs {forced} devices; {n_devices} here")
        if forced > params.n_layers:
            raise FieldError("group_size", f"a group of {forced} needs at least {forced} layers; "
                                           f"the parameter set has {params.n_layers}")
    sizes = [forced] if forced else [s for s in GROUP_SIZES if s <= min(n_devices, params.n_layers)]
    if available is None:
        return sizes[0]
    for batch in (GROUP_BATCH, 1):
        for size in sizes:
            if stage_need(params, dtype, size).total(batch) <= available:
                return size
    size = sizes[-1]
    where = "on each device" if size == 1 else f"on each device of a group of {size}"
    message = (f"needs {stage_need(params, dtype, size).describe().replace('on each device', where)}; "
               f"each device has {format_size(available)} available")
    larger = [s for s in GROUP_SIZES if s > size]
    if not forced and larger and larger[0] <= params.n_layers:
        message += f"; a group of {larger[0]} would need {larger[0]} devices, {n_devices} here"
    raise FieldError("params", message)


class MemoryCapError(FieldError):
    """A parameter set refused by the engine's `device_memory` cap alone: the devices' own memory would
    hold it. On `params`, what a service's caller sent; `cap_message` says it of the cap instead (the
    CLI's `--device-memory`)."""

    def __init__(self, message: str, cap_message: str):
        super().__init__("params", message)
        self.cap_message = cap_message


class Planner:
    """The placement of each parameter set on a fixed list of devices, chosen once per set from what
    the devices can give: their free memory plus what the engine's loaded weights hold there (those
    go before another set's are built), at most `device_memory` each."""

    def __init__(self, devices: Sequence[jax.Device], group_size: int | None, device_memory: int | None):
        self.devices = list(devices)
        self.group_size = group_size  # None: the smallest that fits, per set
        self.device_memory = device_memory
        self.held: dict[int, int] = {}  # device id → bytes of weights the engine holds there
        self._grids: dict[int, Placement] = {}
        self._sizes: dict[tuple[Params, str], int] = {}

    def hold(self, params: Params, dtype: str, stages: list[Stage] | None) -> None:
        """Record the weights loaded now (None: none)."""
        self.held = {}
        for stage in stages or []:
            for device in stage.mesh.devices.flat:
                self.held[device.id] = self.held.get(device.id, 0) + MemoryNeed.of(params, dtype, stage.layers).weights

    def device_bytes(self) -> int | None:
        """What every device itself could give a parameter set (the least over the devices), the cap
        aside; None where a device does not say."""
        free = [device_free_bytes(d) for d in self.devices]
        if any(f is None for f in free):
            return None
        return min(f + self.held.get(d.id, 0) for f, d in zip(free, self.devices))

    def available_bytes(self) -> int | None:
        """What every device could give a parameter set, at most the cap; None where a device does not
        say and no cap is set."""
        device = self.device_bytes()
        if device is None or self.device_memory is None:
            return self.device_memory if device is None else device
        return min(device, self.device_memory)

    def _refusal(self, refused: FieldError, params: Params, dtype: str, batch: int) -> FieldError:
        """`refused` (the set does not fit what is available), or a MemoryCapError where the cap alone
        refuses it: the least any group size needs is over the cap and within what the devices have."""
        cap, device = self.device_memory, self.device_bytes()
        if cap is None or device is not None and device <= cap:
            return refused
        sizes = [self.group_size] if self.group_size else [
            s for s in GROUP_SIZES if s <= min(len(self.devices), params.n_layers)]
        least, size = min((stage_need(params, dtype, s).total(batch), s) for s in sizes)
        capped = f"{refused.message} ({format_size(cap)} is the device memory cap" + (
            ")" if device is None else f"; each device has {format_size(device)} without it)")
        if device is not None and least > device:
            return FieldError("params", capped)
        grouped = "" if size == 1 else f" of a group of {size}"
        has = "" if device is None else f"; each {self.devices[0].platform} device has {format_size(device)} available"
        cap_text, least_text = format_size(cap), format_size(least)
        if cap_text == least_text:  # a hair short: the bytes tell them apart
            cap_text, least_text = f"{cap_text} ({cap} bytes)", f"{least_text} ({least} bytes)"
        message = (f"{cap_text} cannot hold the parameter set: it needs at least {least_text} "
                   f"on each device{grouped} (with {batch} nonce(s) a step){has}")
        larger = [s for s in GROUP_SIZES if len(self.devices) < s <= params.n_layers
                  and stage_need(params, dtype, s).total(batch) <= cap]
        if larger and not self.group_size:
            message += f"; a group of {larger[0]} would need {larger[0]} devices, {len(self.devices)} here"
        return MemoryCapError(capped, message)

    def placement(self, params: Params, dtype: str) -> Placement:
        """The groups a set runs on (FieldError on `params` when no group size fits the memory)."""
        size = self._sizes.get((params, dtype))
        if size is None:
            try:
                size = choose_group_size(len(self.devices), params, dtype, self.available_bytes(), self.group_size)
            except FieldError as e:
                raise (self._refusal(e, params, dtype, 1) if e.field == "params" else e) from None
            self._sizes[(params, dtype)] = size
        if size not in self._grids:
            self._grids[size] = Placement(self.devices, size)
        return self._grids[size]

    def stage_need(self, params: Params, dtype: str) -> MemoryNeed:
        return stage_need(params, dtype, self.placement(params, dtype).group_size)

    def check_fits(self, params: Params, dtype: str, batch: int = 1) -> None:
        """Refuse (FieldError on `params`) a set whose weights and `batch` nonces of a step cannot fit."""
        size = self.placement(params, dtype).group_size
        need, available = self.stage_need(params, dtype), self.available_bytes()
        if available is not None and need.total(batch) > available:
            where = "each device" if size == 1 else f"each device of a group of {size}"
            refused = FieldError("params", f"needs {need.describe(batch).replace('each device', where)}; each "
                                           f"{self.devices[0].platform} device has {format_size(available)} available")
            raise self._refusal(refused, params, dtype, batch)

    def describe(self, loaded: Placement | None) -> dict:
        """The groups of the loaded set; before any, what the setting gives ("auto": chosen per set)."""
        if loaded is not None:
            return loaded.describe()
        size = self.group_size
        return {"groups": len(self.devices) // size if size else None, "group_size": size or "auto"}
