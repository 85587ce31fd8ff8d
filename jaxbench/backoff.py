"""The one retry rule of every call the project repeats after a failure: the orchestrator's calls,
the result sender, the warmup completion callback, and the remote client's requests.

The pause after the k-th failure in a row is `base_s · 2**(k-1)`, at most `max_s`.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float = math.inf

    def pause(self, failures: int) -> float:
        """Seconds to wait after `failures` (≥ 1) failures in a row."""
        return min(self.base_s * 2 ** max(0, failures - 1), self.max_s)
