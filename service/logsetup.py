"""Logging, configured once: every line to MODEL_LOG (truncated at start) and to stdout.

The Vast.ai PyWorker tails the log file and substring-matches `signals.READY_LINE` (→ "loaded") and
`signals.FATAL_MARKER` (→ "errored"). Those two strings may appear only in the lines meant to carry
them: the formatter defuses them in any other line (a block hash or an exception message from a
request could contain them). Control characters in a message (a CR or LF from a request's field)
are written escaped, so a message is one line and cannot forge another.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from . import signals

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIGNAL = "jaxbench_signal"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

log = logging.getLogger("service")


class SignalSafeFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # `format` has just set record.message from msg and args (for each handler anew): escape it there.
        if _CONTROL.search(record.message):
            record.message = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, _SIGNAL, False):
            return text
        if signals.FATAL_MARKER in text:
            text = text.replace(signals.FATAL_MARKER, signals.FATAL_MARKER.rstrip(":") + "(quoted)")
        if signals.READY_LINE in text:
            text = text.replace(signals.READY_LINE, signals.READY_LINE.replace(" ", "_"))
        return text


class _FlushingFileHandler(logging.FileHandler):
    def emit(self, record):
        super().emit(record)
        self.flush()


def setup_logging(log_path: str, level: str = "INFO") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    formatter = SignalSafeFormatter(FORMAT)
    if hasattr(sys.stdout, "reconfigure"):  # text that cannot be encoded is escaped, never an error
        sys.stdout.reconfigure(errors="backslashreplace")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_path:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_FlushingFileHandler(path, mode="w", encoding="utf-8", errors="backslashreplace"))
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(getattr(logging, level, logging.INFO) if isinstance(level, str) else level)
    # Libraries that attach their own handlers would print twice; make them go through root only.
    for name in ("hypercorn.error", "hypercorn.access", "quart.app", "quart.serving", "jax", "httpx"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per outgoing request otherwise
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.captureWarnings(True)


def log_ready() -> None:
    log.info(signals.READY_LINE, extra={_SIGNAL: True})


def log_fatal(cause: str, detail: str, *args) -> None:
    """The fatal line of `cause` (one of service/signals.py's), with `detail % args` after it."""
    log.critical("%s %s: " + detail, signals.FATAL_MARKER, cause, *args, extra={_SIGNAL: True})
