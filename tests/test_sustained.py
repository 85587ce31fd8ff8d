"""jaxbench.sustained on the CPU: the window loop's rates are real (a small product's FLOPs over
measured time), the probe runs on every device at once, and `ceiling` says why it measured nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT
from service_helpers import host_devices_env

from jaxbench import sustained


def test_window_rates_are_flops_over_time():
    calls = []
    product = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((64, 64), jnp.float32)

    def counted(a, b):
        calls.append(time.perf_counter())
        return product(a, b)

    t0 = time.perf_counter()
    rates = sustained.window_tflops([(counted, (a, a))], flops=2 * 64**3, seconds=0.3, window=0.05)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.3 and len(rates) >= 4
    timed_calls = len(calls) - 1  # the first call warms up
    # Every window's rate is its calls' FLOPs over its time: together, about all calls over the run.
    assert sum(r * 0.05 for r in rates) * 1e12 == pytest.approx(timed_calls * 2 * 64**3, rel=0.5)
    assert all(r > 0 for r in rates)


def test_measure_runs_on_every_device():
    """In a process of two CPU devices: each device's product runs on that device."""
    code = """
import json, jax, jax.numpy as jnp
from jaxbench import sustained
devices = jax.devices()
runs, flops = sustained.square_runs(devices, size=32, dtype=jnp.float32)
print(json.dumps({"flops": flops, "ran_on": [next(iter(fn(*args).devices())).id for fn, args in runs],
                  "rate": sustained.measure(devices, 0.2, size=32, dtype=jnp.float32)}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **host_devices_env(2)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["flops"] == 2 * 32**3 and result["ran_on"] == [0, 1] and result["rate"] > 0


def test_ceiling_says_why_it_measured_nothing():
    cpu = jax.devices("cpu")
    out = sustained.ceiling(cpu, 2.0)
    assert out == {"sustained_tflops": None, "sustained_seconds": 2.0,
                   "sustained_unavailable": "measured on GPUs only (the devices are cpu)"}
    assert sustained.ceiling(cpu, 0)["sustained_unavailable"] == "not measured (0 seconds asked)"
    assert sustained.percent_of_sustained(600.0, 650.0) == 92.3
    assert sustained.percent_of_sustained(600.0, None) is None
