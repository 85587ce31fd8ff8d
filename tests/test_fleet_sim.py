"""scripts/fleet_sim.py: the real client in virtual time against a modelled fleet."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import fleet_sim  # noqa: E402

from jaxbench.remote import plan, runner  # noqa: E402


def test_a_simulated_search_with_killed_workers_is_whole_and_leaves_the_clock_alone():
    result = fleet_sim.simulate("killed", seconds=10.0, seed=1)
    assert result["reason"] == "completed" and result["computed"] == result["nonces"] == 100 * 480 * 10
    assert result["restarts"] >= 1  # a killed worker's request broke, and its range went elsewhere
    assert result["ratio"] >= 1.0 and result["requests"] >= result["workers"]
    assert result["sim_wall_s"] < result["elapsed_s"]  # virtual time: faster than the search it simulates
    assert plan.time is time and runner.time is time and plan.Running.__post_init__ is fleet_sim.POST_INIT
