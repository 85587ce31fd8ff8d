"""What a search is asked to do and what each of its steps gives back: plain data, no JAX.

The engine runs a `SearchJob` step by step and yields one `StepResult` a step, holding one
`GroupResult` for each device group. The command line and the service read them without importing
JAX (results.py, service/requests.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .nonces import NonceSchedule
from .params import Params


@dataclasses.dataclass(frozen=True)
class SearchJob:
    params: Params
    block_hash: str
    public_key: str
    r_target: float
    schedule: NonceSchedule
    dtype: str = "float16"
    duration_s: float | None = None


@dataclasses.dataclass
class GroupResult:
    """One device group's share of a step: every nonce it computed and its distance."""

    group: int
    nonces: list[int]
    dist: np.ndarray

    def valid(self, r_target: float) -> tuple[list[int], list[float]]:
        keep = np.flatnonzero(self.dist < r_target)
        return [self.nonces[i] for i in keep], [float(self.dist[i]) for i in keep]


@dataclasses.dataclass
class StepResult:
    step: int
    flat_start: int  # schedule index of the step's first nonce; the step spans batch × groups of them
    batch: int
    groups: list[GroupResult]
    draw_seconds: float  # host time spent preparing this step's inputs (overlapped with the devices)
    wait_seconds: float  # time the dispatching thread waited for those inputs: the draws not overlapped
    seconds: float  # dispatch to distances on the host

    @property
    def computed(self) -> int:
        return sum(len(g.nonces) for g in self.groups)
