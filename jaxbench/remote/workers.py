"""What the remote search's client knows of each worker (by URL): its speed, its step, what it
did for the search, and whether to avoid it for now.

A worker that failed a request (its stream broke or went silent, it answered an error, its job
failed, it could not be reached) is avoided for `FAILED_WORKER.pause(k)` seconds after its k-th
failure in a row; one that sent what a correct worker never sends, for `LYING_WORKER.pause(k)`; one
that answered 429 or 503 (busy, draining) for `BUSY_WORKER.pause(1)`. A request it serves well
ends its run of failures.
"""

from __future__ import annotations

import dataclasses
import time

from ..backoff import Backoff

FAILED_WORKER = Backoff(2.0, 120.0)  # how long a worker that failed a request is avoided
LYING_WORKER = Backoff(60.0, 3600.0)  # … one that sent what a correct worker never sends
BUSY_WORKER = Backoff(1.0, 30.0)  # … one that answered 429 (its queue is full) or 503
RATE_SPAN_S = 3.0  # a worker's speed is learnt from requests at least this long


@dataclasses.dataclass
class Worker:
    requests: int = 0
    computed: int = 0  # nonces it settled
    valid: int = 0  # nonces of its lines that were printed
    failures: int = 0
    last_failure: str | None = None
    strikes: int = 0  # failures since its last good request
    avoid_until: float = 0.0
    rate: float | None = None  # nonces per second, from its last good request
    quantum: int = 1  # nonces of its full step (devices × batch), from its lines


class Fleet:
    """What the client knows of each worker, by URL."""

    def __init__(self):
        self.workers: dict[str, Worker] = {}
        self._rates: dict[str, float] = {}
        self._rate_sum = 0.0
        self.quantum = 1  # the largest step seen

    def get(self, url: str) -> Worker:
        w = self.workers.get(url)
        if w is None:
            w = self.workers[url] = Worker()
        return w

    @property
    def measured(self) -> int:
        """How many workers' speeds are known."""
        return len(self._rates)

    @property
    def mean_rate(self) -> float | None:
        return self._rate_sum / len(self._rates) if self._rates else None

    def total_rate(self, workers: int) -> float | None:
        """Nonces per second of `workers` workers: those measured, and the others at their mean;
        None until a quarter of them (and ten) are measured: the first to report need not be typical."""
        if len(self._rates) < min(workers, max(10, workers / 4)):
            return None
        return self._rate_sum + max(0, workers - len(self._rates)) * self.mean_rate

    def avoided(self, url: str, now: float) -> bool:
        w = self.workers.get(url)
        return w is not None and now < w.avoid_until

    def failed(self, url: str, cause: str, lied: bool = False) -> None:
        w = self.get(url)
        w.failures += 1
        w.strikes += 1
        w.last_failure = cause
        w.avoid_until = time.monotonic() + (LYING_WORKER if lied else FAILED_WORKER).pause(w.strikes)

    def busy(self, url: str) -> None:
        w = self.get(url)
        w.avoid_until = max(w.avoid_until, time.monotonic() + BUSY_WORKER.pause(1))

    def served(self, url: str, computed: int, seconds: float) -> None:
        """A request it ended well: `computed` nonces in `seconds` from its stream's start. Its speed
        is that of its newest request of RATE_SPAN_S or more (in a short one, starting up weighs too
        much; the first may also have built the weights)."""
        w = self.get(url)
        w.strikes = 0
        if computed > 0 and seconds >= RATE_SPAN_S:
            w.rate = computed / seconds
            self._rate_sum += w.rate - self._rates.get(url, 0.0)
            self._rates[url] = w.rate

    def report(self) -> dict:
        return {url: {"requests": w.requests, "computed": w.computed, "valid": w.valid, "failures": w.failures,
                      **({"last_failure": w.last_failure} if w.last_failure else {})}
                for url, w in self.workers.items()}
