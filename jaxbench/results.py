"""Result lines of a search, as the predecessor's /generate streams them (docs/protocol.md §1.4),
and the summary line that ends every stream. Shared by the CLI and the service."""

from __future__ import annotations

import time

from .job import GroupResult, SearchJob, StepResult


def batch_result(
    job: SearchJob, block_height: int, group: GroupResult, nonces: list[int], dist: list[float],
    batch_number: int, total_computed: int, total_valid: int, elapsed_seconds: float, node_id: int | None = None,
) -> dict:
    """One worker batch's result object: the fields /generate lines and /pooled results share
    (docs/protocol.md §1.4, §3.7); `nonces` and `dist` are its valid ones. `node_id` is the node of
    the search (docs/algorithm.md §7); None gives the predecessor's value, the worker's index. docs/output.md
    describes every field."""
    return {
        "worker_id": group.group,
        "public_key": job.public_key,
        "block_hash": job.block_hash,
        "block_height": block_height,
        "nonces": nonces,
        "dist": dist,
        "node_id": group.group if node_id is None else node_id,
        "batch_number": batch_number,
        "batch_computed": len(group.nonces),
        "batch_valid": len(nonces),
        "total_computed": total_computed,
        "total_valid": total_valid,
        "elapsed_seconds": round(elapsed_seconds, 3),
    }


class SearchTally:
    """Turns steps into result lines and keeps the per-worker and aggregate counts.

    Every computed nonce is counted, also in steps with no valid nonce (the predecessor's
    aggregate only counted emitted lines).
    """

    def __init__(self, job: SearchJob | None, n_workers: int | None = None, block_height: int = 0,
                 node_id: int | None = None):
        """`n_workers`: the device groups of the search; None takes them from its first step."""
        self.job = job
        self.n_workers = 0
        self.block_height = block_height
        self.node_id = node_id
        self.started = time.monotonic()
        self.worker_computed: list[int] = []
        self.worker_valid: list[int] = []
        self.worker_batches: list[int] = []
        self.lines_emitted = 0
        if n_workers is not None:
            self._size(n_workers)

    def _size(self, n_workers: int) -> None:
        grow = n_workers - self.n_workers
        if grow > 0:
            self.n_workers = n_workers
            for counts in (self.worker_computed, self.worker_valid, self.worker_batches):
                counts.extend([0] * grow)

    @property
    def total_computed(self) -> int:
        return sum(self.worker_computed)

    @property
    def total_valid(self) -> int:
        return sum(self.worker_valid)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, step: StepResult) -> list[dict]:
        """Count a step; return one line per worker batch with at least one valid nonce."""
        lines = []
        n_groups = len(step.groups)
        self._size(n_groups)
        for g in step.groups:
            nonces, dist = g.valid(self.job.r_target)
            w = g.group
            self.worker_batches[w] += 1
            self.worker_computed[w] += len(g.nonces)
            self.worker_valid[w] += len(nonces)
            if not nonces:
                continue
            self.lines_emitted += 1
            following = self.job.schedule.take(step.flat_start + step.batch * n_groups + w, 1)
            lines.append({
                **batch_result(self.job, self.block_height, g, nonces, dist, self.worker_batches[w],
                               self.worker_computed[w], self.worker_valid[w], self.elapsed(), self.node_id),
                "next_nonce": following[0] if following else None,
                "aggregated_batch_number": self.lines_emitted,
                "aggregated_total_computed": self.total_computed,
                "aggregated_total_valid": self.total_valid,
                "n_workers": n_groups,
            })
        return lines

    def end_reason(self, stopped: bool) -> str:
        """Why a search that ended without error ended: stopped by its caller, out of time, or done."""
        if stopped:
            return "stopped"
        if self.job.duration_s is not None and self.elapsed() >= self.job.duration_s:
            return "duration"
        return self.job.schedule.end_reason("completed")  # or the end of the nonce space

    def summary(self, reason: str) -> dict:
        elapsed = self.elapsed()
        return {
            "status": "done",
            "reason": reason,
            "total_computed": self.total_computed,
            "total_valid": self.total_valid,
            "elapsed_seconds": round(elapsed, 3),
            "nonces_per_second": round(self.total_computed / elapsed, 3) if elapsed > 0 else 0.0,
        }
