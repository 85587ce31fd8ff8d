"""What one `/generate` request may send back, checked line by line (docs/output.md lists the fields).

A correct worker sends its result lines step by step: within a step one line per device group that
found a valid nonce, in group order; `aggregated_batch_number` counts the request's lines from 1 and
`aggregated_total_valid` their valid nonces; `next_nonce` is the group's first nonce of the next step
(null after the request's last step); group g of G computes the request's indices k ≡ g (mod G);
every distance is below r_target. Then one summary line whose `total_valid` is the lines' sum and
whose `total_computed` counts every nonce computed, a prefix of the request's sequence.

`RequestCheck` holds a request to that. Anything else (a lost line, a line sent twice, a nonce of
another request, a step gone back, `dist` and `nonces` of different lengths, counts that disagree)
raises `Violation` before the line is used: a malformed line breaks the stream, it is never a
partial success. `settled` is the request's resume point: every index below it was computed and
every line of it received (a step is whole once a line of a later step arrives).
"""

from __future__ import annotations

import math


class Violation(Exception):
    """The worker sent what a correct worker never sends; the message says what."""


_MISSING = object()


def _integer(line: dict, name: str, minimum: int = 0) -> int:
    value = line.get(name, _MISSING)
    if type(value) is not int or value < minimum:  # not a bool either
        raise Violation(f"a line without {name}" if value is _MISSING else
                        f"{name} {value!r:.40} is not an integer ≥ {minimum}")
    return value


class RequestCheck:
    """One request's lines: nonce `first + k·stride` for request index k < count (None: no end)."""

    def __init__(self, first: int, stride: int, count: int | None, r_target: float):
        self.first = first
        self.stride = stride
        self.count = count
        self.r_target = r_target
        self.settled = 0  # every k below it: computed, and its lines received
        self.lines = 0
        self.valid = 0
        self.groups: int | None = None
        self._step = 0  # batch_number of the newest step seen
        self._group = -1  # worker_id of that step's newest line
        self._step_start = 0  # no nonce of the newest step lies below it (the step before ended there)
        self._step_end: int | None = None  # where the newest step ends, from its lines' next_nonce
        self._reached = 0  # past the newest step's highest index seen: where it ends at the least

    def index(self, nonce) -> int:
        if type(nonce) is not int:
            raise Violation(f"nonce {nonce!r:.40} is not an integer")
        k, rest = divmod(nonce - self.first, self.stride)
        if rest or k < 0 or (self.count is not None and k >= self.count):
            raise Violation(f"nonce {nonce} is not one of the request's")
        return k

    def result(self, line: dict) -> list[int]:
        """A result line's request indices, in the order of its nonces, once the line is checked."""
        number = _integer(line, "aggregated_batch_number", 1)
        if number != self.lines + 1:
            raise Violation(f"line {number} of the stream came after line {self.lines} (a line lost or sent twice)")
        groups = _integer(line, "n_workers", 1)
        if self.groups is None:
            self.groups = groups
        elif groups != self.groups:
            raise Violation(f"n_workers changed from {self.groups} to {groups}")
        group = _integer(line, "worker_id")
        if group >= groups:
            raise Violation(f"worker_id {group} of {groups} groups")
        nonces, dist = line.get("nonces"), line.get("dist")
        if not isinstance(nonces, list) or not isinstance(dist, list) or not nonces or len(nonces) != len(dist):
            raise Violation("nonces and dist are not two non-empty lists of one length")
        if _integer(line, "batch_valid") != len(nonces):
            raise Violation(f"batch_valid {line['batch_valid']} for {len(nonces)} nonces")
        if _integer(line, "aggregated_total_valid") != self.valid + len(nonces):
            raise Violation(f"aggregated_total_valid {line['aggregated_total_valid']} after "
                            f"{self.valid + len(nonces)} valid nonces")
        step = _integer(line, "batch_number", 1)
        if step < self._step or step == self._step and group <= self._group:
            raise Violation(f"step {step}, group {group} came after step {self._step}, group {self._group}")
        new_step = step > self._step
        if new_step:  # the step before ended where its lines say, else past its highest index at the least
            step_start = self._step_end if self._step_end is not None else max(self._step_start, self._reached)
        else:
            step_start = self._step_start

        indices = []
        last = step_start - 1
        for nonce, d in zip(nonces, dist):
            k = self.index(nonce)
            if k <= last or k % groups != group:
                raise Violation(f"nonce {nonce} does not belong to group {group} of step {step}")
            if type(d) is not float and type(d) is not int or not d < self.r_target or not math.isfinite(d):
                raise Violation(f"nonce {nonce} came with distance {d!r:.40}, not one below r_target")
            indices.append(k)
            last = k
        step_end = self._next_step_end(line, group, indices[-1])
        known_end = None if new_step else self._step_end
        if step_end is not None and known_end is not None and step_end != known_end:
            raise Violation(f"the lines of step {step} disagree on where it ends")

        if new_step:  # every line of the step before has arrived
            self.settled = max(self.settled, step_start)
            self._step, self._step_start, self._reached = step, step_start, 0
        self._group = group
        self._step_end = step_end if step_end is not None else known_end
        self._reached = max(self._reached, indices[-1] + 1)
        self.lines += 1
        self.valid += len(indices)
        return indices

    def _next_step_end(self, line: dict, group: int, last: int) -> int | None:
        """Where the line's step ends: its group's next index minus the group; None when the group has
        no next index (the request's indices end before it)."""
        if "next_nonce" not in line:
            raise Violation("a line without next_nonce")
        following = line["next_nonce"]
        if following is None:
            if self.count is None:
                raise Violation("a request without end sent no next_nonce")
            return None
        k = self.index(following)
        if k <= last or k % self.groups != group:
            raise Violation(f"next_nonce {following} does not follow group {group}'s nonces")
        return k - group

    @property
    def reached(self) -> int:
        """Every index below it is computed: where the newest step ends, as far as its lines tell."""
        return max(self.settled, self._reached if self._step_end is None else self._step_end)

    def summary(self, line: dict) -> str:
        """The summary line: checks it, settles what it counts computed, returns its reason."""
        reason = line.get("reason")
        if not isinstance(reason, str):
            raise Violation("a summary without a reason")
        computed = _integer(line, "total_computed")
        if _integer(line, "total_valid") != self.valid:
            raise Violation(f"the summary counts {line['total_valid']} valid nonces, its lines {self.valid}")
        end = self.reached
        if computed < end or self.count is not None and computed > self.count:
            raise Violation(f"the summary counts {computed} nonces computed, its lines show {end}" + ("" if self.count is None else f" of {self.count}"))
        if reason == "completed" and self.count is not None and computed != self.count:
            raise Violation(f"completed after {computed} of {self.count} nonces")
        self.settled = computed
        return reason
