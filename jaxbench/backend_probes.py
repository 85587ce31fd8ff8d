"""JAX's start-up probes of backends no jaxbench machine uses, kept out of the logs.

When JAX first looks for devices it tries every backend it knows, and for the two that fail quietly,
whatever the machine, it logs the failure at INFO: 'tpu' (no libtpu) and 'proxy' (no IFRT proxy
server named by JAX_BACKEND_TARGET). In the CLI with -v and in the service's log those lines open
every start, on a GPU host as on a CPU. `quiet_backend_probes` drops exactly those records; every
other record of JAX's backend set-up stays: a GPU plugin that fails to load (an error or a raised
exception, never INFO), JAX's warning that a GPU or TPU is present but unusable, and the proxy's
failure when JAX_BACKEND_TARGET names a server.
"""

from __future__ import annotations

import logging
import os

BACKEND_SETUP_LOGGER = "jax._src.xla_bridge"


class QuietBackendProbes(logging.Filter):
    def __init__(self, backends: tuple[str, ...]):
        super().__init__()
        self.prefixes = tuple(f"Unable to initialize backend '{name}'" for name in backends)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith(self.prefixes)


def quiet_backend_probes() -> None:
    """Drop the INFO lines of the failed 'tpu' and 'proxy' probes (the latter only while no proxy
    server is configured). Idempotent."""
    backends = ("tpu",) if os.environ.get("JAX_BACKEND_TARGET") else ("tpu", "proxy")
    logger = logging.getLogger(BACKEND_SETUP_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, QuietBackendProbes)]:
        logger.removeFilter(old)
    logger.addFilter(QuietBackendProbes(backends))
