"""Progress on stderr: on a terminal a tqdm bar redrawn in place; elsewhere (a log file, a pipe, a
container's log) a plain line every JAXBENCH_PROGRESS_S seconds (default 30; 0: none) and one at the
end, so that a log holds a line now and then instead of every redraw."""

from __future__ import annotations

import os
import sys
import time

PROGRESS_ENV = "JAXBENCH_PROGRESS_S"
DEFAULT_EVERY_S = 30.0


def line_interval() -> float:
    """Seconds between plain progress lines: JAXBENCH_PROGRESS_S, else the default; 0 turns them off."""
    text = os.environ.get(PROGRESS_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S
    return value if value >= 0 else DEFAULT_EVERY_S


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def progress_display(total: float | None, desc: str, unit: str = "nonce", units: str = "nonces",
                     rate: bool = True, **tqdm_options):
    """A progress display over `total` (None: open-ended) `units`: a tqdm bar where stderr is a
    terminal (`unit` and `tqdm_options` go to it), else PlainProgress. Both take update(n),
    set_postfix(...), write(text) and serve as a context manager; `rate`: whether the plain lines
    give units a second."""
    if stderr_is_terminal():
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, desc=desc, **tqdm_options)
    return PlainProgress(total, desc, units, line_interval(), rate)


class PlainProgress:
    """Progress as whole lines on stderr, at most one every `every_s` seconds and a last one at the
    end (none at all when `every_s` is 0): `search:  12% 4096/32768 nonces, 31 s, 132.1 nonces/s, valid=3`."""

    def __init__(self, total: float | None, desc: str, units: str, every_s: float, rate: bool = True):
        self.total, self.desc, self.units, self.every_s, self.rate = total, desc, units, every_s, rate
        self.n: float = 0
        self.postfix: dict = {}
        self._start = self._printed_at = time.monotonic()
        self._printed_n: float | None = None

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.every_s and now - self._printed_at >= self.every_s:
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def write(self, text: str, file=None) -> None:
        print(text, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.every_s and self._printed_n != self.n:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        self._printed_at, self._printed_n = now, self.n
        elapsed = now - self._start
        done = f"{self.n:.0f}" if self.total is None else f"{100 * self.n / self.total:3.0f}% {self.n:.0f}/{self.total:.0f}"
        parts = [f"{done} {self.units}"]
        if self.rate:
            parts += [f"{elapsed:.0f} s", f"{self.n / max(elapsed, 1e-9):.1f} {self.units}/s"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(f"{self.desc}: {', '.join(parts)}", file=sys.stderr, flush=True)
