"""Which nonces of a range are computed: sorted, disjoint, half-open intervals `[lo, hi)`.

/pooled keeps one list per (block hash, params, dtype, public key), so that a changed or repeated
nonce range computes only what is new (docs/algorithm.md §7: each nonce exactly once per job).
"""

from __future__ import annotations


def add_interval(intervals: list[list[int]], lo: int, hi: int) -> None:
    """Insert [lo, hi) into a sorted list of disjoint half-open intervals, merging neighbours."""
    if hi <= lo:
        return
    out: list[list[int]] = []
    placed = False
    for a, b in intervals:
        if b < lo:
            out.append([a, b])
        elif hi < a:
            if not placed:
                out.append([lo, hi])
                placed = True
            out.append([a, b])
        else:
            lo, hi = min(lo, a), max(hi, b)
    if not placed:
        out.append([lo, hi])
    out.sort()
    intervals[:] = out


def first_gap(intervals: list[list[int]], lo: int, hi: int) -> tuple[int, int] | None:
    """The first sub-interval of [lo, hi) not covered by the intervals."""
    pos = lo
    for a, b in intervals:
        if pos >= hi:
            return None
        if b <= pos:
            continue
        if a > pos:
            return pos, min(a, hi)
        pos = b
    return (pos, hi) if pos < hi else None
