"""A screened search: every nonce through the e4m3 step, only the likely valid ones through the exact one.

The screen's step (the blocks' weight products in e4m3, fp8.py) gives each nonce a distance near its
float16 one. The nonces whose screen distance is below `r_target + margin` are the candidates; they
are computed again by the exact step (the one an unscreened search runs, the same inputs and
weights), and only those distances are kept. Every other nonce counts as computed and not valid.

What it can change: a valid nonce whose screen distance lands at or above `r_target + margin` is not
reported (the recall, measured by scripts/fp8_screen_check.py). What it cannot: a reported nonce is
one the exact search reports, with the bit-identical distance, since that distance comes from the
exact step itself.

The candidates of a few steps are gathered until they fill one exact step (batch × groups), then
recomputed; the screened steps are yielded after, in order, each group's distances the exact ones
for its candidates and +inf for the rest. A search that stops still recomputes what it gathered.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Iterator

import numpy as np

from .fields import DEFAULT_SCREEN_MARGIN, SCREEN_PRODUCTS, FieldError
from .job import GroupResult, SearchJob, StepResult

FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor cores: Ada, Hopper, Blackwell


def describe(products: str, margin: float) -> dict:
    """What the result lines and the summary of a screened search say of its screen."""
    return {"screen": products, "screen_margin": margin}


@dataclasses.dataclass
class ScreenCounts:
    screened: int = 0  # nonces through the screen's step
    candidates: int = 0  # of them, below r_target + margin: computed again in the model dtype

    def describe(self) -> dict:
        return {"screened": self.screened, "candidates_recomputed": self.candidates}


def fp8_refusal(device) -> str | None:
    """Why `device` cannot run the screen's e4m3 products; None when it can. The CPU runs them (XLA
    widens e4m3 operands exactly), slowly: for tests and to try the screen."""
    from .engine_config import compute_capability

    if device.platform == "cpu":
        return None
    capability = compute_capability(device)
    if capability is None or capability < FP8_MIN_CAPABILITY:
        return (f"{device.device_kind} has no e4m3 tensor cores (they start at compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada, Hopper, Blackwell); search without a screen")
    return None


class ScreenedSearch:
    """A search of `job` on `engine` through the screen; iterate `steps()` like `Engine.search`. It
    counts into `counts` when given: the total of several searches (a /pooled session's)."""

    def __init__(self, engine, job: SearchJob, margin: float = DEFAULT_SCREEN_MARGIN, products: str = "fp8",
                 counts: ScreenCounts | None = None):
        self.check(engine, products)
        self.engine, self.job, self.margin, self.products = engine, job, margin, products
        self.counts = ScreenCounts() if counts is None else counts

    @staticmethod
    def check(engine, products: str) -> None:
        """FieldError naming `screen` when the engine's devices cannot run this screen."""
        if products not in SCREEN_PRODUCTS:
            raise FieldError("screen", f"must be one of {', '.join(SCREEN_PRODUCTS)}, got {products!r}")
        refusal = fp8_refusal(engine.devices[0])
        if refusal:
            raise FieldError("screen", refusal)

    def describe(self) -> dict:
        return describe(self.products, self.margin)

    def summary_fields(self) -> dict:
        """What the summary says of the screen: describe() and the counts."""
        return {**self.describe(), **self.counts.describe()}

    def steps(self, stop: threading.Event | None = None, batch: int | None = None,
              on_ready: Callable | None = None) -> Iterator[StepResult]:
        threshold = self.job.r_target + self.margin
        pending: list[StepResult] = []
        gathered = 0
        exact_batch = None
        for step in self.engine.search(self.job, stop, batch=batch, on_ready=on_ready, products=self.products):
            exact_batch = exact_batch or step.batch * len(step.groups)
            pending.append(step)
            gathered += sum(int((g.dist < threshold).sum()) for g in step.groups)
            if gathered >= exact_batch:
                yield from self._settle(pending, threshold, step.batch)
                pending, gathered = [], 0
        if pending:
            yield from self._settle(pending, threshold, pending[-1].batch)

    def _settle(self, steps: list[StepResult], threshold: float, batch: int) -> list[StepResult]:
        """The steps with their candidates' distances recomputed exactly and +inf for the rest."""
        picks = [(g, np.flatnonzero(g.dist < threshold)) for step in steps for g in step.groups]
        candidates = [g.nonces[i] for g, keep in picks for i in keep]
        self.counts.screened += sum(len(g.nonces) for g, _ in picks)
        self.counts.candidates += len(candidates)
        exact = (self.engine.distances(self.job.params, self.job.block_hash, self.job.public_key, candidates,
                                       self.job.dtype, batch=batch, fit_batch=False) if candidates else np.empty(0, np.float32))
        picked = iter(picks)
        settled, offset = [], 0
        for step in steps:
            groups = []
            for _ in step.groups:
                g, keep = next(picked)
                dist = np.full(len(g.nonces), np.inf, dtype=np.float32)
                dist[keep] = exact[offset: offset + len(keep)]
                offset += len(keep)
                groups.append(GroupResult(g.group, g.nonces, dist))
            settled.append(dataclasses.replace(step, groups=groups))
        return settled
