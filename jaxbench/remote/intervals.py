"""Sets of integers kept sorted, for the remote search's bookkeeping: `Intervals` (which indices of a
nonce sequence are done) and `SortedInts` (indices printed but not yet done). Every operation is a
binary search plus a list splice, so bookkeeping costs do not grow with the number of requests."""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class Intervals:
    """A union of half-open integer intervals [lo, hi), merged and sorted."""

    def __init__(self):
        self._lo: list[int] = []
        self._hi: list[int] = []
        self.size = 0  # integers covered

    def add(self, lo: int, hi: int) -> int:
        """Cover [lo, hi); returns how many integers were not covered before."""
        if hi <= lo:
            return 0
        i = bisect_left(self._hi, lo)  # the first interval that ends at or after lo (touching merges)
        j = bisect_right(self._lo, hi)  # past the last interval that starts at or before hi
        before = sum(self._hi[t] - self._lo[t] for t in range(i, j))
        if i < j:
            lo, hi = min(lo, self._lo[i]), max(hi, self._hi[j - 1])
        self._lo[i:j], self._hi[i:j] = [lo], [hi]
        added = hi - lo - before
        self.size += added
        return added

    def __contains__(self, k: int) -> bool:
        i = bisect_right(self._lo, k) - 1
        return i >= 0 and k < self._hi[i]

    def covers(self, lo: int, hi: int) -> bool:
        if hi <= lo:
            return True
        i = bisect_right(self._lo, lo) - 1
        return i >= 0 and self._hi[i] >= hi

    def gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi) not covered, in order."""
        out = []
        i = max(0, bisect_right(self._lo, lo) - 1)
        at = lo
        while at < hi and i < len(self._lo):
            if self._hi[i] <= at:
                i += 1
                continue
            if self._lo[i] >= hi:
                break
            if self._lo[i] > at:
                out.append((at, self._lo[i]))
            at = self._hi[i]
            i += 1
        if at < hi:
            out.append((at, hi))
        return out

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi))


class SortedInts:
    """A sorted set of integers that can drop a whole range at once."""

    def __init__(self):
        self._items: list[int] = []

    def add(self, k: int) -> bool:
        """Add k; False if it was there already."""
        i = bisect_left(self._items, k)
        if i < len(self._items) and self._items[i] == k:
            return False
        self._items.insert(i, k)
        return True

    def __contains__(self, k: int) -> bool:
        i = bisect_left(self._items, k)
        return i < len(self._items) and self._items[i] == k

    def drop(self, lo: int, hi: int) -> None:
        """Remove every item in [lo, hi)."""
        del self._items[bisect_left(self._items, lo):bisect_left(self._items, hi)]

    def __len__(self) -> int:
        return len(self._items)
