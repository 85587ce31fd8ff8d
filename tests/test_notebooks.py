"""The notebooks: committed without outputs, and run top to bottom on CPU (`tiny`) with nbconvert."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PLOTS = {"profiling.ipynb": "throughput_vs_batch.png", "fidelity.ipynb": "fidelity_histograms.png"}


@pytest.mark.parametrize("name", PLOTS)
def test_committed_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", PLOTS)
def test_runs_and_saves_its_plot(name, tmp_path, compile_cache):
    out = tmp_path / "out"
    env = {**os.environ, "JAXBENCH_NOTEBOOK_PRESET": "tiny", "JAXBENCH_NOTEBOOK_OUT": str(out),
           "JAXBENCH_CACHE_DIR": str(compile_cache)}
    run = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", "--output-dir", str(tmp_path),
         str(ROOT / "notebooks" / name)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    executed = nbformat.read(tmp_path / name, as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (out / PLOTS[name]).read_bytes().startswith(b"\x89PNG")
    if name == "profiling.ipynb":
        assert list((out / "trace").rglob("*.xplane.pb"))
        # Power and SM clock beside the throughput; on a CPU the panels say why they are empty.
        assert (out / "telemetry_over_time.png").read_bytes().startswith(b"\x89PNG")
        printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        if jax.default_backend() == "cpu":
            assert "'telemetry_unavailable': 'no NVIDIA GPU (the devices are cpu)'" in printed
