"""Device groups: one replica of the weights split in stages over a group of devices, groups data-parallel.

The CPU backend with forced host devices stands in for a machine of small cards: a per-device memory
cap that holds half a replica of a test set, but not all of it, makes the engine form groups of two.
Each layer computes the same products on the same shapes in a group as on one device, so the
distances must be bit-identical to one uncapped device's for the same per-step batch.
"""

import json
import subprocess
import types

import httpx
import numpy as np
import pytest

from conftest import run_cli
from jaxbench.engine_config import EngineConfig, compute_capability, unsafe_blackwell
from jaxbench.fields import FieldError
from jaxbench.memory import MemoryNeed
from jaxbench.params import Params
from jaxbench.placement import GROUP_BATCH, balanced_runs, choose_group_size, partition_spec, stage_need
from jaxbench.sizes import format_size
from service_helpers import TINY_BODY, ServiceProcess, assert_clean_log, host_devices_env, read_stream

# Four layers (so groups of 2 and 4 can form) of a set whose weights outweigh its build pool.
SET = Params(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=64, seq_len=8)
BATCH = 4


def half_replica_cap() -> int:
    """A per-device cap that holds the fuller stage of a group of two with a group's preferred batch
    of activations, and not the whole replica."""
    half = stage_need(SET, "float16", 2)
    cap = half.total(GROUP_BATCH) + 1024
    assert cap < MemoryNeed.of(SET, "float16").total(1), "the test set's whole replica fits the cap"
    return cap


def found(stdout: str) -> dict[int, float]:
    """nonce → distance of a search's result lines."""
    out = {}
    for line in stdout.splitlines():
        row = json.loads(line)
        out.update(zip(row.get("nonces", []), row.get("dist", [])))
    return out


def search(*extra: str, devices: int) -> subprocess.CompletedProcess:
    return run_cli("search", "--params", json.dumps(SET.to_dict()), "--block-hash", "groups", "--public-key", "pk",
                   "--r-target", "2", "--max-nonces", "64", "--batch", str(BATCH), "--draws", "host", "--out", "-",
                   *extra, env=host_devices_env(devices))


def test_four_capped_devices_form_two_groups_of_two_with_one_devices_distances():
    one = search("--devices", "1", devices=4)
    assert one.returncode == 0, one.stderr
    grouped = search("--device-memory", str(half_replica_cap()), devices=4)
    assert grouped.returncode == 0, grouped.stderr
    assert "on each of 2 group(s) of 2 cpu devices" in grouped.stderr
    expected = found(one.stdout)
    assert sorted(expected) == list(range(64))
    assert found(grouped.stdout) == expected  # bit-identical: the same float, printed the same
    summary = json.loads(grouped.stdout.splitlines()[-1])
    assert summary["total_computed"] == 64 and summary["total_valid"] == 64
    lines = [json.loads(line) for line in grouped.stdout.splitlines()[:-1]]
    assert {line["n_workers"] for line in lines} == {2} and {line["worker_id"] for line in lines} == {0, 1}


def test_one_group_of_four_matches_one_device():
    one = search("--devices", "1", devices=4)
    four = search("--group-size", "4", devices=4)
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    assert "on each of 1 group(s) of 4 cpu devices" in four.stderr
    assert found(four.stdout) == found(one.stdout)


def test_a_cap_that_fits_no_split_is_refused_with_what_is_needed():
    cap = stage_need(SET, "float16", 4).total(1) - 1  # not even a quarter of the replica fits
    proc = search("--device-memory", str(cap), devices=4)
    assert proc.returncode == 2, proc.stderr
    need = stage_need(SET, "float16", 4).total(1)
    assert proc.stderr.startswith(f"error: --device-memory: {format_size(cap)} ({cap} bytes) cannot hold the "
                                  f"parameter set: it needs at least {format_size(need)} ({need} bytes) on each "
                                  f"device of a group of 4"), proc.stderr  # the cap, not the set: the devices have more
    assert "GiB available" in proc.stderr and proc.stdout == ""


def test_one_device_cannot_form_a_group_for_a_set_larger_than_its_memory():
    proc = search("--device-memory", str(half_replica_cap()), "--devices", "1", devices=4)
    assert proc.returncode == 2
    assert "a group of 2 would need 2 devices, 1 here" in proc.stderr


def test_bad_group_sizes_name_the_option():
    for size, message in (("3", "must be one of 1, 2, 4, 8"), ("8", "a group of 8 needs 8 devices; 4 here")):
        proc = search("--group-size", size, devices=4)
        assert proc.returncode == 2 and f"--group-size: {message}" in proc.stderr, proc.stderr
    proc = search("--device-memory", "lots", devices=1)
    assert proc.returncode == 2 and "--device-memory: 'lots' is not a size" in proc.stderr


@pytest.fixture(scope="module")
def grouped_server(tmp_path_factory, compile_cache):
    proc = ServiceProcess(tmp_path_factory.mktemp("groups"), compile_cache, env={
        **host_devices_env(4), "MODEL_DEVICE_MEMORY": str(half_replica_cap()), "MODEL_BATCH": str(BATCH),
        "MODEL_DRAWS": "host"}).start()
    yield proc
    assert proc.stop() == 0
    assert_clean_log(proc.log())


def test_generate_on_groups_matches_one_device(grouped_server, engine):
    body = {**TINY_BODY, "params": SET.to_dict(), "block_hash": "groups", "max_nonces": 40, "start_nonce": 3}
    with httpx.Client(base_url=grouped_server.url, timeout=120) as client:
        lines = [line for _, line in read_stream(client, "/generate", body, timeout=120)]
        health = client.get("/health").json()
    results = [line for line in lines if "nonces" in line]
    got = {n: d for line in results for n, d in zip(line["nonces"], line["dist"])}
    nonces = list(range(3, 43))
    expected = engine.distances(SET, "groups", TINY_BODY["public_key"], nonces, "float16", batch=BATCH)
    assert sorted(got) == nonces
    assert np.array_equal(np.array([got[n] for n in nonces], np.float32), expected)
    assert {line["n_workers"] for line in results} == {2}
    assert lines[-1]["total_computed"] == 40
    (step,) = [c for c in health["compiled"] if c["params"] == SET.to_dict()]
    assert (step["groups"], step["group_size"], step["devices"], step["batch"]) == (2, 2, 4, BATCH)


# Choices made without devices: the split, the rules, the group size and the paths per card.


def test_layers_are_cut_where_the_flops_balance():
    mainnet_like = [10] * 63 + [3]  # the last block runs one query position and carries the head
    assert balanced_runs(mainnet_like, 2) == [range(0, 32), range(32, 64)]
    assert balanced_runs([1, 1, 1, 1], 4) == [range(i, i + 1) for i in range(4)]
    assert balanced_runs([1] * 5, 2) == [range(0, 3), range(3, 5)]
    assert balanced_runs([9, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError):
        balanced_runs([1, 1], 3)


def test_the_rules_put_the_batch_over_groups_and_replicate_the_rest():
    from jax.sharding import PartitionSpec as P

    assert partition_spec(("batch", "seq", "embed")) == P("group", None, None)
    assert partition_spec(("layers", "embed", "ffn")) == P(None, None, None)  # each stage holds its own run
    assert partition_spec((None, "vocab")) == P(None, None)


def test_the_group_size_is_the_smallest_that_fits():
    need = {s: stage_need(SET, "float16", s).total(1) for s in (1, 2, 4)}
    room = {s: stage_need(SET, "float16", s).total(GROUP_BATCH) for s in (1, 2, 4)}
    assert need[1] > need[2] > need[4] and room[1] > room[2] > room[4]
    assert choose_group_size(4, SET, "float16", room[1]) == 1
    assert choose_group_size(4, SET, "float16", room[2]) == 2
    assert choose_group_size(4, SET, "float16", room[4]) == 4
    # One nonce of room is not enough when a larger group leaves room for a whole batch...
    assert choose_group_size(4, SET, "float16", max(need[1], room[2])) == 2
    # ...and is when nothing larger does.
    assert choose_group_size(1, SET, "float16", need[1]) == 1
    assert choose_group_size(4, SET, "float16", need[4]) == 4
    assert choose_group_size(4, SET, "float16", None) == 1
    assert choose_group_size(4, SET, "float16", need[1], forced=4) == 4
    for available, forced in ((need[4] - 1, None), (need[2] - 1, 2)):
        with pytest.raises(FieldError) as refused:
            choose_group_size(4, SET, "float16", available, forced)
        assert refused.value.field == "params"
    for devices, forced, message in ((1, 4, "a group of 4 needs 4 devices; 1 here"), (8, 8, "at least 8 layers"),
                                     (4, 3, "must be one of 1, 2, 4, 8")):
        with pytest.raises(FieldError, match=message) as refused:
            choose_group_size(devices, SET, "float16", None, forced)
        assert refused.value.field == "group_size"


def fake_gpu(kind: str, capability: str):
    return types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability, id=0)


@pytest.mark.parametrize("kind, capability, attention, ffn", [
    ("NVIDIA GeForce RTX 3090", "8.6", "cudnn", "xla"),  # Ampere
    ("NVIDIA A10", "8.6", "cudnn", "xla"),
    ("NVIDIA A100-SXM4-40GB", "8.0", "cudnn", "xla"),
    ("NVIDIA GeForce RTX 4090", "8.9", "cudnn", "xla"),  # Ada
    ("NVIDIA L4", "8.9", "cudnn", "xla"),
    ("NVIDIA H100 80GB HBM3", "9.0", "cudnn", "pallas"),  # Hopper
    ("NVIDIA GeForce RTX 5090", "12.0", "cudnn", "xla"),  # Blackwell, consumer
    ("NVIDIA B200", "10.0", "cudnn", "xla"),  # Blackwell, data centre, with cuBLAS 13.2
    ("Tesla T4", "7.5", "xla", "xla"),  # Turing: no fused attention
])
def test_every_card_takes_a_path_of_its_own_without_a_flag(kind, capability, attention, ffn, monkeypatch):
    monkeypatch.delenv("JAXBENCH_ATTENTION", raising=False)
    monkeypatch.delenv("JAXBENCH_FFN", raising=False)
    config = EngineConfig.resolve([fake_gpu(kind, capability)], cublas=(13, 2))
    assert (config.draws, config.attention, config.ffn) == ("device", attention, ffn)
    assert config.attention_for("float32") == "xla"
    assert (config.layout.gate_up_block is not None) == (ffn == "pallas")


def test_the_pallas_kernel_is_refused_off_hopper_by_name():
    with pytest.raises(ValueError, match="needs a Hopper GPU, not NVIDIA GeForce RTX 4090"):
        EngineConfig.resolve([fake_gpu("NVIDIA GeForce RTX 4090", "8.9")], ffn="pallas", cublas=(12, 9))


def test_blackwell_with_an_old_cublas_is_refused_with_the_fix():
    b200 = fake_gpu("NVIDIA B200", "10.0")
    reason = unsafe_blackwell(b200, (12, 9))
    assert "cuBLAS 12.9" in reason and "-cuda13" in reason and "jax[cuda13]" in reason
    with pytest.raises(ValueError, match="silently corrupt"):
        EngineConfig.resolve([b200], cublas=(12, 9))
    assert unsafe_blackwell(b200, (13, 2)) is None
    assert unsafe_blackwell(fake_gpu("NVIDIA GeForce RTX 5090", "12.0"), (12, 9)) is None
    assert "compute capability 11.0" in unsafe_blackwell(fake_gpu("NVIDIA Thor", "11.0"), (13, 1))
    assert compute_capability(types.SimpleNamespace(platform="cpu")) is None


def test_the_cpu_reads_no_cublas_and_takes_the_reference_paths(monkeypatch):
    import jax

    monkeypatch.delenv("JAXBENCH_ATTENTION", raising=False)
    monkeypatch.delenv("JAXBENCH_FFN", raising=False)
    config = EngineConfig.resolve(jax.devices()[:1])
    assert (config.draws, config.attention, config.ffn, config.group_size) == ("host", "xla", "xla", None)

