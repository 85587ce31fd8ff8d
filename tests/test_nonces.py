"""Nonce assignment (docs/algorithm.md §7): the groups of a step, and results that do not depend on the device count."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from service_helpers import host_devices_env

from jaxbench.nonces import NonceSchedule, device_major


def test_node_schedule_follows_spec_formula():
    s = NonceSchedule.for_node(start_nonce=1000, node_id=2, n_nodes=5)
    assert s.take(0, 4) == [1002, 1007, 1012, 1017]
    # Group g of G gets node_id + g·n_nodes + x·(G·n_nodes): with G = 3, step 0, batch 2:
    rows, per_group = device_major(s.take(0, 6), n_groups=3, batch=2)
    assert per_group == [[1002, 1017], [1007, 1022], [1012, 1027]]
    assert rows == [1002, 1017, 1007, 1022, 1012, 1027]


def test_bounded_schedules_stop_at_end_and_limit():
    assert NonceSchedule.for_node(10, end=15).take(0, 100) == [10, 11, 12, 13, 14]
    assert NonceSchedule.for_node(10, node_id=1, n_nodes=2, end=15).take(0, 100) == [11, 13]
    assert NonceSchedule.for_node(0, limit=3).take(2, 5) == [2]
    assert NonceSchedule.for_node(20, end=10).take(0, 5) == []
    assert NonceSchedule.of([5, 1, 9]).take(1, 5) == [1, 9]


def test_a_short_last_step_pads_with_real_nonces_but_reports_only_its_own():
    rows, per_group = device_major([7, 8, 9], n_groups=2, batch=2)
    assert per_group == [[7, 9], [8]]
    assert rows == [7, 9, 8, 7]


SCRIPT = """
import json, sys
from jaxbench.engine import Engine
from jaxbench.job import SearchJob
from jaxbench.nonces import NonceSchedule
from jaxbench.params import PRESETS
out = {}
for n in (1, 2, 4):
    e = Engine(devices=n, draws_mode="host", compile_cache_dir=None)
    job = SearchJob(PRESETS["tiny"], "ab" * 32, "pk", 1.41, NonceSchedule.for_node(5, limit=37), "float16")
    found = {}
    for step in e.search(job, batch=3):
        for g in step.groups:
            found.update({str(k): float(v) for k, v in zip(g.nonces, g.dist)})
    out[n] = found
print(json.dumps(out))
"""


def test_results_are_identical_whatever_the_device_count():
    env = {**host_devices_env(4), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    by_devices = json.loads(proc.stdout)
    assert set(by_devices["1"]) == {str(n) for n in range(5, 42)}
    assert by_devices["1"] == by_devices["2"] == by_devices["4"]


# The nonce space ----------------------------------------------------------------------------------


def test_schedules_end_where_the_nonce_space_ends():
    from jaxbench.nonces import NONCE_MAX, NONCE_SPACE_END, count_in_space

    s = NonceSchedule.for_node(NONCE_MAX - 9, node_id=1, n_nodes=4)
    assert s.take(0, 100) == [NONCE_MAX - 8, NONCE_MAX - 4, NONCE_MAX]
    assert s.count == count_in_space(NONCE_MAX - 8, 4) == 3 and s.space_end
    assert s.end_reason("completed") == NONCE_SPACE_END and s.end_reason("duration") == "duration"
    huge = NonceSchedule.for_node(NONCE_MAX, n_nodes=NONCE_MAX)  # 2.77e19 was reachable with a large n_nodes
    assert huge.take(0, 10) == [NONCE_MAX]
    # A limit or an end the caller gave that comes first is the reason, not the space.
    for bounded in (NonceSchedule.for_node(NONCE_MAX - 9, limit=3), NonceSchedule.for_node(NONCE_MAX - 9, end=NONCE_MAX),
                    NonceSchedule.for_node(NONCE_MAX - 9, limit=10)):
        assert not bounded.space_end and bounded.end_reason("completed") == "completed"
        assert max(bounded.take(0, 100)) <= NONCE_MAX
    assert NonceSchedule.for_node(NONCE_MAX - 9, limit=11).space_end  # asks for more than there is
    assert NonceSchedule.for_node(0).count == NONCE_MAX + 1
    assert NonceSchedule.for_node(NONCE_MAX - 1, node_id=1, n_nodes=2).take(0, 5) == [NONCE_MAX]
    assert NonceSchedule.for_node(NONCE_MAX, node_id=1, n_nodes=2).take(0, 5) == []
    with pytest.raises(ValueError):
        NonceSchedule.for_node(NONCE_MAX + 1)


def test_every_nonce_field_is_in_the_nonce_space():
    from jaxbench import fields
    from jaxbench.nonces import NONCE_MAX

    assert fields.nonce({"n": NONCE_MAX}, "n") == NONCE_MAX
    for data, name in (({"start_nonce": NONCE_MAX + 1}, "start_nonce"), ({"start_nonce": -1}, "start_nonce")):
        with pytest.raises(fields.FieldError) as e:
            fields.nonce(data, name)
        assert e.value.field == name
    assert fields.node({"node_id": 3, "n_nodes": 4}, NONCE_MAX - 3) == (3, 4)
    with pytest.raises(fields.FieldError) as e:
        fields.node({"node_id": 3, "n_nodes": 4}, NONCE_MAX - 2)
    assert e.value.field == "node_id" and "nonce space" in e.value.message
    with pytest.raises(fields.FieldError):
        fields.nonce_list({"nonces": [1, NONCE_MAX + 1]})
    assert fields.parse_nonce_ranges(f"{NONCE_MAX - 1}-{NONCE_MAX}") == [NONCE_MAX - 1, NONCE_MAX]
    with pytest.raises(fields.FieldError):
        fields.parse_nonce_ranges(f"{NONCE_MAX}-{NONCE_MAX + 1}")
