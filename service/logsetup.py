"""Logging, configured once: every line to MODEL_LOG (truncated at start) and to stdout.

The Vast.ai PyWorker tails the log file and substring-matches `signals.READY_LINE` (→ "loaded") and
`signals.FATAL_MARKER` (→ "errored"). Those two strings may appear only in the lines meant to carry
them: the formatter defuses them in any other line (a block hash or an exception message from a
request could contain them). Control characters in a message (a CR or LF from a request's field)
are written escaped, so a message is one line and cannot forge another.

Secrets: query strings of URLs and `api_key` values are written as `<redacted>` in every line
(`redact`, which the PyWorker's log uses too): the vastai client puts the endpoint's key in the
query of every request it sends to a worker.

Floods: a log line that repeats (the same logger and message template) more than REPEAT_BURST times
within REPEAT_WINDOW_S is dropped, and the next one let through says how many were; signal lines are
never dropped. Writing a line needs no new file descriptor (escaping uses no codec that would be
imported on first use), and a handler that cannot write says so on stderr at most once a minute,
without a traceback: a process out of descriptors keeps a small log.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from pathlib import Path

from . import signals

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIGNAL = "jaxbench_signal"
_REPEAT_DECISION = "jaxbench_repeat_ok"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r"}
# A URL's query (after a path or host character) and api_key values, in any quoting.
_QUERY = re.compile(r"(?<=[\w/.~%:\]-])\?[^\s\"'<>]+")
_API_KEY = re.compile(r"(?i)(api[_-]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;}]+")
REDACTED = "<redacted>"
REPEAT_BURST = 50
REPEAT_WINDOW_S = 10.0
HANDLER_ERROR_EVERY_S = 60.0

log = logging.getLogger("service")


def redact(text: str) -> str:
    """`text` with URL query strings and api_key values replaced by REDACTED."""
    if "?" in text:
        text = _QUERY.sub("?" + REDACTED, text)
    if "key" in text.lower():
        text = _API_KEY.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def _escape(match: re.Match) -> str:
    c = match.group()
    return _ESCAPES.get(c) or f"\\x{ord(c):02x}"


class SignalSafeFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # `format` has just set record.message from msg and args (for each handler anew): escape it there.
        if _CONTROL.search(record.message):
            record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if getattr(record, _SIGNAL, False):
            return text
        if signals.FATAL_MARKER in text:
            text = text.replace(signals.FATAL_MARKER, signals.FATAL_MARKER.rstrip(":") + "(quoted)")
        if signals.READY_LINE in text:
            text = text.replace(signals.READY_LINE, signals.READY_LINE.replace(" ", "_"))
        return text


class RepeatLimit(logging.Filter):
    """Lets at most `burst` records of one (logger, message template) through per `window_s`; the
    first one after a window that dropped some carries the count."""

    def __init__(self, burst: int = REPEAT_BURST, window_s: float = REPEAT_WINDOW_S):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._lock = threading.Lock()
        self._seen: dict[tuple, list] = {}  # key -> [window start, records let through, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SIGNAL, False):
            return True
        decided = getattr(record, _REPEAT_DECISION, None)
        if decided is None:  # once per record, however many handlers it passes
            decided = self._decide(record)
            setattr(record, _REPEAT_DECISION, decided)
        return decided

    def _decide(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget old keys rather than grow
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            state = self._seen.setdefault(key, [now, 0, 0])
            if now - state[0] >= self.window_s:
                dropped = state[2]
                state[:] = [now, 0, 0]
                if dropped:
                    record.msg = f"({dropped} more like the next line dropped in {self.window_s:.0f} s) {record.msg}"
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
            return True


class _QuietErrors:
    """A handler that cannot write (no descriptors left, a full disk) says so on stderr once a
    minute, in one line, instead of a traceback per record."""

    _last_error_report = 0.0
    _errors = 0

    def handleError(self, record):  # noqa: N802 — logging's name
        self._errors += 1
        now = time.monotonic()
        if now - self._last_error_report < HANDLER_ERROR_EVERY_S:
            return
        self._last_error_report = now
        exc = sys.exc_info()[1]
        try:
            sys.stderr.write(f"logging: {self._errors} record(s) could not be written "
                             f"({type(exc).__name__}: {exc})\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 — nowhere left to report it
            pass
        self._errors = 0


class _StreamHandler(_QuietErrors, logging.StreamHandler):
    pass


class _FlushingFileHandler(_QuietErrors, logging.FileHandler):
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
    handlers: list[logging.Handler] = [_StreamHandler(sys.stdout)]
    if log_path:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_FlushingFileHandler(path, mode="w", encoding="utf-8", errors="backslashreplace"))
    repeat_limit = RepeatLimit()
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(repeat_limit)
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
