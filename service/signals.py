"""The log lines the Vast.ai PyWorker watches for (substring matches on the model server's log).

Kept in one dependency-free module: the service prints them, pyworker/worker.py imports them, and
start_server.sh reads FATAL_MARKER and the causes it logs from this file (one `NAME = "text"` line each).
"""

# Logged exactly once, when the server can take work.
READY_LINE = "jaxbench model server ready: accepting requests"

# Starts every log line about a condition that needs the worker replaced; no other line contains it.
FATAL_MARKER = "JAXBENCH-FATAL:"

# The causes: a fatal line is "<marker> <cause>: <detail>".
DEVICE_FAILURE = "device failure"  # a job hit a broken device (service/jobs.py)
NO_USABLE_DEVICE = "no usable device"  # the engine could not start (service/server.py, like the five below)
BAD_CONFIGURATION = "bad configuration"
LOG_NOT_WRITABLE = "cannot write the log file"
SERVER_DID_NOT_START = "the server could not start"
SERVER_NOT_LISTENING = "the server did not accept connections"
SERVER_FAILED = "the server failed"
JAX_NOT_INSTALLED = "jax is not installed"  # start_server.sh, before starting the server
SERVER_EXITED = "model server exited unexpectedly"  # start_server.sh, after the server died

# The beginnings of the fatal lines, one per cause. The PyWorker matches these before the bare marker:
# the vastai SDK reports the pattern that matched, not the line, so the worker's error names its cause.
FATAL_CAUSES = tuple(
    f"{FATAL_MARKER} {cause}"
    for cause in (DEVICE_FAILURE, NO_USABLE_DEVICE, BAD_CONFIGURATION, LOG_NOT_WRITABLE, SERVER_DID_NOT_START,
                  SERVER_NOT_LISTENING, SERVER_FAILED, JAX_NOT_INSTALLED, SERVER_EXITED)
)
