"""What a stream of distinct parameter sets leaves behind, bounded.

The engine keeps the weights of one parameter set and at most `jaxbench.engine.MAX_COMPILED_STEPS`
compiled steps, the least recently used going first. JAX keeps caches of its own for the functions
it traced, lowered and compiled (every compiled step is a function of its own), and the C allocator
keeps what was freed. `CacheTrim.after_job` clears both after a job that compiled a step while the
engine holds more than `keep` (KEEP_COMPILED: the worker's benchmark set and the network's): more
distinct parameter sets than a worker meets in normal work. The next job traces the helpers it uses
again (the persistent compile cache spares their compilation). Run on the event loop once the job's
threads have returned, so no other device work runs while the caches are cleared.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import time

log = logging.getLogger("service.caches")

KEEP_COMPILED = 2


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


class CacheTrim:
    def __init__(self, engine, keep: int = KEEP_COMPILED):
        self.engine = engine
        self.keep = keep
        self._compiled: set[str] = set()
        self._trim = _malloc_trim()
        self.clears = 0

    def after_job(self) -> bool:
        """Clear JAX's caches and trim the heap if the job compiled a step beyond `keep`; True if it did."""
        keys = self.engine.compiled_keys()
        compiled = {json.dumps(k, sort_keys=True) for k in keys}
        new = compiled - self._compiled
        self._compiled = compiled
        if not new or len(compiled) <= self.keep:
            return False
        import jax

        t0 = time.perf_counter()
        jax.clear_caches()
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self.clears += 1
        log.info("%d compiled steps held (more than %d): cleared JAX's caches in %.2f s", len(compiled), self.keep,
                 time.perf_counter() - t0)
        return True
