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
    def mean_rate(self) -> float | None:
        return self._rate_sum / len(self._rates) if self._rates else None

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
        w = self.get(url)
        w.strikes = 0
        if computed > 0 and seconds > 0:
            w.rate = computed / seconds
            self._rate_sum += w.rate - self._rates.get(url, 0.0)
            self._rates[url] = w.rate

    def report(self) -> dict:
        return {url: {"requests": w.requests, "computed": w.computed, "valid": w.valid, "failures": w.failures,
                      **({"last_failure": w.last_failure} if w.last_failure else {})}
                for url, w in self.workers.items()}
