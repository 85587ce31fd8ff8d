"""How a job ends: its `Outcome` (reason, error, tally), the error line a failure streams, and which
failures mean the device can no longer be trusted.

Every driver (generate.py, warmup.py, pooled.py) keeps one `Outcome`; its summary line is
`jaxbench.results.SearchTally.summary(reason)` (with a screen, plus the screen's fields and counts),
to which a driver may add fields of its own (warmup: `callback`; pooled: `detail`). `error` is what
the job tells its peers and /health about a failure: warmup's completion callback and the
orchestrator's shutdown notice carry it.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxbench.engine import is_out_of_memory
from jaxbench.results import SearchTally
from jaxbench.screen import ScreenCounts

from .requests import Screen


@dataclasses.dataclass
class Outcome:
    tally: SearchTally  # what was computed: the summary's counts
    reason: str = "error"  # the summary's reason (a failure unless a driver says otherwise)
    error: str | None = None  # why it failed or stopped, in a sentence
    screen: Screen | None = None  # the request's, said on every result line and the summary
    screened: ScreenCounts = dataclasses.field(default_factory=ScreenCounts)  # of every search of the job

    def fail(self, reason: str, error: str) -> None:
        self.reason, self.error = reason, error

    def line_fields(self) -> dict:
        """What every result line says besides the tally's."""
        return {} if self.screen is None else self.screen.describe()

    def summary(self) -> dict:
        out = self.tally.summary(self.reason)
        if self.screen is not None:
            out |= {**self.screen.describe(), **self.screened.describe()}
        return out


# XLA statuses of runtime errors that say "this request was wrong", not "the device is bad".
_REQUEST_ERRORS = ("INVALID_ARGUMENT", "UNIMPLEMENTED", "CANCELLED", "OUT_OF_RANGE")


def is_device_failure(exc: BaseException) -> bool:
    """A runtime error from the device that is not an out-of-memory (the job reports those and
    retreats) nor a rejected request: the device can't be trusted any more."""
    runtime_error = getattr(jax.errors, "JaxRuntimeError", None)
    if runtime_error is None or not isinstance(exc, runtime_error) or is_out_of_memory(exc):
        return False
    return not str(exc).lstrip().startswith(_REQUEST_ERRORS)


def error_line(exc: BaseException) -> dict:
    """The line a failure streams: `{"error", "error_type"[, "field"][, "fatal": true]}`."""
    line = {"error": str(exc) or type(exc).__name__, "error_type": type(exc).__name__}
    field = getattr(exc, "field", None)
    if isinstance(field, str):
        line["field"] = field
    if is_device_failure(exc):
        line["fatal"] = True
    return line
