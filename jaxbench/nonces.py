"""Which nonces a search computes, and which device group computes each (docs/algorithm.md §7).

A schedule is a sequence of nonces in a fixed "flat" order. A step takes the next G×B of them;
device group g gets flat indices f0 + x·G + g. For the arithmetic schedule of docs/algorithm.md §7
(nonce = start + node_id + i·n_nodes) that gives group g the nonces
start + node_id + g·n_nodes + x·(G·n_nodes), and the set computed after any number of steps
does not depend on G.

Nonces are int64 on the network: the nonce space is [0, NONCE_MAX], the same for every entry point
(the CLI, /generate, /pooled, /validate, the remote search). A node's schedule ends where its next
nonce would leave the space (`count_in_space`), so no search computes a nonce above NONCE_MAX; a
search that got there ends with the reason NONCE_SPACE_END (`NonceSchedule.end_reason`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


NONCE_MAX = 2**63 - 1
NONCE_SPACE_END = "nonce_space_end"  # why a search that reached the end of the nonce space ended


def count_in_space(first: int, stride: int) -> int:
    """How many of first, first + stride, first + 2·stride, … lie in the nonce space."""
    return 0 if first > NONCE_MAX else (NONCE_MAX - first) // stride + 1


@dataclasses.dataclass(frozen=True)
class NonceSchedule:
    """Arithmetic (`first + i * stride` for i < count) or an explicit list; count None = unbounded.
    `space_end`: the count is where the nonce space ends, not an end or limit the caller gave."""

    first: int = 0
    stride: int = 1
    count: int | None = None
    explicit: tuple[int, ...] | None = None
    space_end: bool = False

    @classmethod
    def for_node(
        cls, start_nonce: int = 0, node_id: int = 0, n_nodes: int = 1, end: int | None = None,
        limit: int | None = None,
    ) -> "NonceSchedule":
        """Node `node_id` of `n_nodes` from `start_nonce`; `end` excludes nonces ≥ end; `limit` caps the
        count; the nonce space's end (NONCE_MAX) bounds it always."""
        if not 0 <= node_id < n_nodes:
            raise ValueError(f"node_id must be in [0, n_nodes), got {node_id} of {n_nodes}")
        if not 0 <= start_nonce <= NONCE_MAX:
            raise ValueError(f"start_nonce must be in [0, {NONCE_MAX}], got {start_nonce}")
        first = start_nonce + node_id
        count, space_end = count_in_space(first, n_nodes), True
        if end is not None and max(0, -(-(end - first) // n_nodes)) <= count:
            count, space_end = max(0, -(-(end - first) // n_nodes)), False
        if limit is not None and limit <= count:
            count, space_end = limit, False
        return cls(first=first, stride=n_nodes, count=count, space_end=space_end)

    @classmethod
    def of(cls, nonces: Sequence[int]) -> "NonceSchedule":
        return cls(explicit=tuple(nonces), count=len(nonces))

    def end_reason(self, reason: str) -> str:
        """A finished search's reason: NONCE_SPACE_END where "completed" means the nonce space ran out."""
        return NONCE_SPACE_END if reason == "completed" and self.space_end else reason

    def take(self, flat_start: int, n: int) -> list[int]:
        """Up to n nonces from flat index flat_start (fewer at the end of a bounded schedule)."""
        stop = flat_start + n if self.count is None else min(flat_start + n, self.count)
        if self.explicit is not None:
            return list(self.explicit[flat_start:stop])
        return [self.first + i * self.stride for i in range(flat_start, stop)]


def device_major(nonces: list[int], n_groups: int, batch: int) -> tuple[list[int], list[list[int]]]:
    """Lay one step's nonces (flat order) out as G rows of B, row g holding flat offsets x·G + g.

    Returns the padded (G·B) list in row order (missing slots repeat the first nonce, so every row
    is a real computation) and each group's real nonces.
    """
    filler = nonces[0]
    rows: list[int] = []
    per_group: list[list[int]] = []
    for g in range(n_groups):
        real = nonces[g::n_groups]
        per_group.append(real)
        rows.extend(real + [filler] * (batch - len(real)))
    return rows, per_group
