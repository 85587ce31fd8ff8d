"""What a stream of distinct parameter sets leaves in a live server (CPU, tiny-sized sets).

More distinct sets than the engine keeps compiled steps for (jaxbench.engine.MAX_COMPILED_STEPS),
three passes over them: after the first pass the server's memory stays where it is (service/README.md,
"Limits and security": weights of one set, the engine's compiled steps, JAX's caches cleared by
service/caches.py), and /health stays healthy and idle.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from jaxbench.steps import MAX_COMPILED_STEPS
from service_helpers import TINY_BODY, ServiceProcess

SETS = MAX_COMPILED_STEPS + 2
PASSES = 3
PLATEAU_GROWTH_MB = 40  # passes 2 and 3 together may grow the RSS by at most this
FIRST_PASS_GROWTH_MB = 400


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def distinct_sets(n: int) -> list[dict]:
    """Small parameter sets whose steps differ in shape (each needs a compiled step of its own)."""
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1000, "ffn_dim_multiplier": 1.3,
            "multiple_of": 64, "seq_len": 8}
    return [{**base, "vocab_size": 1000 + 37 * i, "dim": 64 * (1 + i % 2), "seq_len": 8 + i} for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
    proc = ServiceProcess(tmp_path_factory.mktemp("memory"), compile_cache).start()
    yield proc
    assert proc.stop() == 0


def test_distinct_parameter_sets_reach_a_plateau(server):
    body = {**TINY_BODY, "max_nonces": 8}
    sizes = [rss_mb(server.pid)]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for _ in range(PASSES):
            for params in distinct_sets(SETS):
                r = client.post("/generate", json={**body, "params": params})
                assert r.status_code == 200 and '"reason": "completed"' in r.text.splitlines()[-1], r.text[-300:]
            sizes.append(rss_mb(server.pid))
    health = server.health()
    assert health["status"] == "healthy" and not health["busy"]
    assert len(health["compiled"]) <= MAX_COMPILED_STEPS
    assert sizes[1] - sizes[0] < FIRST_PASS_GROWTH_MB, sizes
    assert sizes[-1] - sizes[1] < PLATEAU_GROWTH_MB, sizes
    assert "cleared JAX's caches" in server.log()
    print(f"\nRSS over {PASSES} passes of {SETS} sets: {sizes} MiB")
