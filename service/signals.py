"""The log lines the Vast.ai PyWorker watches for (substring matches on the model server's log).

Kept in one dependency-free module: the service prints them and pyworker/worker.py imports them.
"""

# Logged exactly once, when the server can take work.
READY_LINE = "jaxbench model server ready: accepting requests"

# Starts every log line about a condition that needs the worker replaced; no other line contains it.
FATAL_MARKER = "JAXBENCH-FATAL:"
