"""The CLI through a subprocess: outputs, and bad input answered with one line and exit status 2."""

import json

import numpy as np
import pytest

from conftest import load_cases, run_cli
from jaxbench.params import PRESETS

TINY = ["--params", "tiny", "--block-hash", "cafe" * 16, "--public-key", "pk-cli"]


def test_distances_prints_one_object_matching_the_engine(engine):
    out = run_cli("distances", *TINY, "--nonces", "3,0-2,10")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["nonces"] == [3, 0, 1, 2, 10]
    expected = engine.distances(PRESETS["tiny"], "cafe" * 16, "pk-cli", [3, 0, 1, 2, 10], "float16")
    np.testing.assert_array_equal(np.array(result["dist"], dtype=np.float32), expected)


def test_distances_accepts_a_vector_case_as_json_params():
    case = load_cases()[0]
    out = run_cli("distances", "--params", json.dumps(case["params"]), "--block-hash", case["block_hash"],
                  "--public-key", case["public_key"], "--nonces", ",".join(map(str, case["nonces"])),
                  "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(json.loads(out.stdout)["dist"], case["dist_f32"], atol=1e-5)


def test_search_streams_valid_nonces_and_a_summary(engine):
    out = run_cli("search", *TINY, "--r-target", "1.41", "--start-nonce", "100", "--max-nonces", "50",
                  "--batch", "8")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    summary = lines[-1]
    assert summary["status"] == "done" and summary["reason"] == "completed"
    assert summary["total_computed"] == 50
    found = {n: d for line in lines[:-1] for n, d in zip(line["nonces"], line["dist"])}
    assert summary["total_valid"] == len(found) > 0
    # Every nonce of the range was computed: recompute them all and compare the valid set.
    dist = engine.distances(PRESETS["tiny"], "cafe" * 16, "pk-cli", list(range(100, 150)), "float16")
    expected = {100 + i: float(d) for i, d in enumerate(dist) if d < 1.41}
    assert found == expected
    assert "search" in out.stderr and "50 nonces" in out.stderr


def _claim(engine, tmp_path, tamper: int) -> str:
    nonces = list(range(20))
    dist = engine.distances(PRESETS["tiny"], "cafe" * 16, "pk-cli", nonces, "float16")
    r_target = float(np.max(dist)) + 1e-3
    claim = {"params": "tiny", "block_hash": "cafe" * 16, "public_key": "pk-cli", "nonces": nonces,
             "dist": dist.tolist(), "r_target": r_target}
    if tamper:
        claim["r_target"] = float(np.sort(dist)[tamper - 1]) - 1e-6  # the `20 - tamper + 1` largest now fail
    path = tmp_path / f"claim{tamper}.json"
    path.write_text(json.dumps(claim))
    return str(path)


def test_validate_honest_and_fraudulent_claims(engine, tmp_path):
    honest = run_cli("validate", _claim(engine, tmp_path, 0))
    assert honest.returncode == 0, honest.stderr
    report = json.loads(honest.stdout)
    assert report["n_invalid"] == 0 and report["fraud"] is False and report["p_value"] == 1.0
    bad = run_cli("validate", _claim(engine, tmp_path, 15))
    report = json.loads(bad.stdout)
    assert report["n_invalid"] == 6 and report["fraud"] is True and report["p_value"] < 1e-7
    assert "FRAUD" in bad.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["distances", "--params", "huge", "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "params"),
        (["distances", "--params", '{"dim": 63}', "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "dim"),
        (["distances", "--params", '{"colour": 1}', "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "colour"),
        (["distances", *TINY, "--nonces", "1,x"], "nonces"),
        (["distances", *TINY, "--nonces", "9-2"], "nonces"),
        (["distances", *TINY, "--nonces", "-4"], "nonces"),
        (["distances", *TINY], "--nonces"),
        (["distances", *TINY, "--nonces", "1", "--dtype", "float8"], "dtype"),
        (["distances", "--params", "tiny", "--block-hash", "", "--public-key", "b", "--nonces", "1"], "block_hash"),
        (["search", *TINY, "--r-target", "-1"], "r_target"),
        (["search", *TINY, "--max-nonces", "0"], "max_nonces"),
        (["search", *TINY, "--max-nonces", "5", "--duration", "3"], "--duration"),
        (["search", *TINY, "--start-nonce", "ten"], "--start-nonce"),
        (["search", *TINY, "--node-id", "3", "--n-nodes", "2"], "node_id"),
        (["search", *TINY, "--batch", "0"], "batch"),
        (["distances", *TINY, "--nonces", "1", "--devices", "64"], "devices"),
        (["validate", "/nonexistent/claim.json"], "file"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(args, named):
    out = run_cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and named in err[0], out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize(
    "claim, named",
    [
        ("[1, 2]", "body"),
        ('{"params": "tiny"}', "nonces"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1, 2], "dist": [1.0], "r_target": 1.4}', "dist"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1.4, "x": 1}', "x"),
        ("{not json", "file"),
    ],
)
def test_validate_rejects_malformed_claims(tmp_path, claim, named):
    path = tmp_path / "claim.json"
    path.write_text(claim)
    out = run_cli("validate", str(path))
    assert out.returncode == 2
    assert named in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_bench_reports_every_figure():
    out = run_cli("bench", "--params", "tiny", "--seconds", "1", "--draws", "device", "--batch", "4")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("end_to_end_nonces_per_s", "device_only_nonces_per_s", "draw_nonces_per_s",
                "device_draw_nonces_per_s_alone", "weight_build_seconds", "compile_seconds",
                "mean_draw_seconds_per_step", "mean_step_seconds", "mean_host_wait_seconds_per_step"):
        assert report[key] > 0, key
    assert report["batch_per_device"] == 4 and report["devices"] == 1 and report["draws"] == "device"
    assert report["nonces_computed"] >= 4
    assert report["achieved_tflops_per_device"] >= 0 and report["percent_of_floor"] is None  # no floor on a CPU
    assert "end_to_end_nonces_per_s" in out.stderr  # the table
