"""The rate a card's matrix units sustain when kept busy: the card's own ceiling for `bench`.

The FLOP floor assumes 800 TFLOP/s, which a product timed over a few calls can reach; a card kept
busy for seconds slows to what its power cap allows (an H200 under its 700 W cap: 650–668 TFLOP/s on
a square product, docs/benchmarks.md). `window_tflops` calls products back to back, at most two
queued per device so the card never idles and each window stays short, and gives the rate of each
window. `ceiling` runs a square float16 product on every device at once for a few seconds and
reports the median window: what the step's FLOP rate is compared with (`percent_of_sustained`).
scripts/sustained_rate.py runs the same loop on other products.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from .engine import is_out_of_memory
from .model import matmul

SQUARE_SIZE = 8192
WINDOW_S = 0.25
Run = tuple[Callable, tuple]  # a jitted function and its arguments, on one device


def window_tflops(runs: Sequence[Run], flops: float, seconds: float, window: float = WINDOW_S) -> list[float]:
    """TFLOP/s of each run, window by window, while every run is called back to back for `seconds`
    (after one call that compiles and warms it). `flops` counts one call of one run."""
    jax.block_until_ready([fn(*args) for fn, args in runs])
    rates = []
    start = time.perf_counter()
    while not rates or time.perf_counter() - start < seconds:
        t0, calls, previous = time.perf_counter(), 0, None
        while calls == 0 or time.perf_counter() - t0 < window:
            out = [fn(*args) for fn, args in runs]  # at most two calls queued per run
            if previous is not None:
                jax.block_until_ready(previous)
            previous, calls = out, calls + 1
        jax.block_until_ready(previous)
        rates.append(calls * flops / (time.perf_counter() - t0) / 1e12)
    return rates


def square_runs(devices: Sequence[Any], size: int = SQUARE_SIZE, dtype=jnp.float16) -> tuple[list[Run], float]:
    """One size³ product a device (random operands of unit and 0.01 scale), and the FLOPs of one."""
    product = jax.jit(lambda a, b: matmul("ik,kj->ij", a, b))
    runs = []
    for i, device in enumerate(devices):
        ka, kb = jax.random.split(jax.random.key(i))
        with jax.default_device(device):  # drawn there; committed there, so the product runs there
            a = jax.device_put(jax.random.normal(ka, (size, size), jnp.float32).astype(dtype), device)
            b = jax.device_put((0.01 * jax.random.normal(kb, (size, size), jnp.float32)).astype(dtype), device)
        runs.append((product, (a, b)))
    return runs, 2.0 * size**3


def measure(devices: Sequence[Any], seconds: float, size: int = SQUARE_SIZE, dtype=jnp.float16) -> float:
    """TFLOP/s per device sustained by a square product on every device at once: the median window."""
    runs, flops = square_runs(devices, size, dtype)
    return statistics.median(window_tflops(runs, flops, seconds))


def ceiling(devices: Sequence[Any], seconds: float) -> dict:
    """`sustained_tflops` (per device, float16 8192³ products for `seconds` on every device at once),
    or null with `sustained_unavailable` saying why: off (`seconds` 0), not a GPU, out of memory.
    Other device errors propagate: they are the device's, not the probe's."""
    out = {"sustained_tflops": None, "sustained_seconds": seconds, "sustained_unavailable": None}
    platforms = sorted({d.platform for d in devices})
    if seconds <= 0:
        out["sustained_unavailable"] = "not measured (0 seconds asked)"
    elif platforms != ["gpu"]:
        out["sustained_unavailable"] = f"measured on GPUs only (the devices are {', '.join(platforms)})"
    else:
        try:
            out["sustained_tflops"] = round(measure(devices, seconds), 1)
        except Exception as e:  # noqa: BLE001 — only out-of-memory is the probe's own failure
            if not is_out_of_memory(e):
                raise
            out["sustained_unavailable"] = f"out of memory for two {SQUARE_SIZE}² operands a device"
    return out


def percent_of_sustained(tflops_per_device: float | None, sustained_tflops: float | None) -> float | None:
    """The step's FLOP rate per device as a share of the sustained one."""
    if tflops_per_device is None or not sustained_tflops:
        return None
    return round(100 * tflops_per_device / sustained_tflops, 1)
