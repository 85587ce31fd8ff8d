"""The CLI through subprocesses: its outputs, its exit statuses, and one line on stderr for every failure."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

import numpy as np
import pytest

from conftest import UNFITTABLE_PARAMS, cli_command, load_cases, run_cli
from jaxbench import cli
from jaxbench.params import PRESETS

BLOCK_HASH, PUBLIC_KEY = "cafe" * 16, "pk-cli"
TINY = ["--params", "tiny", "--block-hash", BLOCK_HASH, "--public-key", PUBLIC_KEY]
# No test machine holds this set (conftest.UNFITTABLE_PARAMS), though every field is within its limit.
UNFITTABLE = json.dumps(UNFITTABLE_PARAMS)
REFUSAL = re.compile(r"needs [\d.]+ GiB on each device .* has [\d.]+ GiB available")


def tiny_distances(engine, nonces: list[int]) -> dict[int, float]:
    return dict(zip(nonces, map(float, engine.distances(PRESETS["tiny"], BLOCK_HASH, PUBLIC_KEY, nonces, "float16"))))


def assert_one_line(out: subprocess.CompletedProcess, status: int, *named: str) -> str:
    """The failure's whole stderr is one line naming every string of `named`; nothing on stdout."""
    assert out.returncode == status, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert all(n in lines[0] for n in named), (named, lines[0])
    assert out.stdout == ""
    return lines[0]


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Outputs -------------------------------------------------------------------------------------------


def test_distances_prints_one_object_matching_the_engine_and_takes_v_after_the_command(engine):
    out = run_cli("distances", *TINY, "--nonces", "3,0-2,10", "-v")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["nonces"] == [3, 0, 1, 2, 10]
    expected = tiny_distances(engine, [3, 0, 1, 2, 10])
    np.testing.assert_array_equal(np.array(result["dist"], dtype=np.float32),
                                  np.array(list(expected.values()), dtype=np.float32))
    assert "INFO jaxbench.engine: built weights" in out.stderr  # -v after the command was heard


def test_distances_accepts_a_vector_case_as_json_params():
    case = load_cases()[0]
    out = run_cli("distances", "--params", json.dumps(case["params"]), "--block-hash", case["block_hash"],
                  "--public-key", case["public_key"], "--nonces", ",".join(map(str, case["nonces"])),
                  "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(json.loads(out.stdout)["dist"], case["dist_f32"], atol=1e-5)


def test_search_into_a_pipe_streams_ndjson_with_the_nodes_fields(engine):
    out = run_cli("search", *TINY, "--r-target", "1.41", "--start-nonce", "100", "--node-id", "1", "--n-nodes", "2",
                  "--block-height", "77", "--max-nonces", "25", "--batch", "8")
    assert out.returncode == 0, out.stderr
    lines = ndjson(out.stdout)
    results, summary = lines[:-1], lines[-1]
    assert summary["status"] == "done" and summary["reason"] == "completed"
    assert summary["total_computed"] == 25 and isinstance(summary["elapsed_seconds"], float)
    for line in results:
        assert line["node_id"] == 1 and line["block_height"] == 77 and line["n_workers"] == 1
        assert isinstance(line["elapsed_seconds"], float)
    found = {n: d for line in results for n, d in zip(line["nonces"], line["dist"])}
    # Node 1 of 2 from 100 computes 101, 103, …, 149: recompute them all and compare the valid set.
    expected = {n: d for n, d in tiny_distances(engine, list(range(101, 150, 2))).items() if d < 1.41}
    assert found == expected and summary["total_valid"] == len(found) > 0
    assert "25 nonces" in out.stderr and "on stdout" in out.stderr


def read_terminal(master: int, timeout: float) -> bytes:
    """What a pseudo-terminal shows until its last writer has gone or `timeout` has passed."""
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not data:
                break
            shown += data
    return shown


def run_on_a_terminal(args: list[str], cwd, timeout: float = 300) -> tuple[int, str, str]:
    """Run the CLI with a pseudo-terminal as stdout: (status, what the terminal showed, stderr)."""
    master, slave = pty.openpty()
    argv, env = cli_command(*args)
    with open(cwd / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(argv, stdout=slave, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
        os.close(slave)
        deadline = time.monotonic() + timeout
        try:
            shown = read_terminal(master, timeout)
        finally:
            os.close(master)
        status = proc.wait(timeout=max(1, deadline - time.monotonic()))
        err.seek(0)
        return status, shown.decode().replace("\r\n", "\n"), err.read()


def test_search_on_a_terminal_writes_lines_to_a_file_and_shows_the_summary(tmp_path):
    status, shown, stderr = run_on_a_terminal(["search", *TINY, "--r-target", "1.41", "--max-nonces", "24"], tmp_path)
    assert status == 0, stderr
    (written,) = tmp_path.glob("jaxbench-search-*.ndjson")
    lines = ndjson(written.read_text())
    assert len(lines) > 1 and all("nonces" in line for line in lines[:-1])
    assert lines[-1]["status"] == "done" and lines[-1]["total_computed"] == 24
    assert ndjson(shown) == [lines[-1]]  # the terminal shows the summary line alone
    assert f"in {written.name}" in stderr


def test_search_out_appends_lines_and_summary_to_the_file(tmp_path):
    path = tmp_path / "found.ndjson"
    for _ in range(2):
        out = run_cli("search", *TINY, "--r-target", "1.41", "--max-nonces", "16", "--out", str(path))
        assert out.returncode == 0, out.stderr
        (summary,) = ndjson(out.stdout)
        assert summary["status"] == "done" and f"in {path}" in out.stderr
    lines = ndjson(path.read_text())
    summaries = [i for i, line in enumerate(lines) if "status" in line]
    assert len(summaries) == 2 and summaries[1] == len(lines) - 1
    timeless = [{k: v for k, v in line.items() if k != "elapsed_seconds"} for line in lines]
    assert timeless[: summaries[0]] == timeless[summaries[0] + 1 : -1]  # the same search twice, appended


def test_a_batch_far_beyond_the_work_is_lowered_to_it():
    started = time.monotonic()
    out = run_cli("-v", "search", *TINY, "--batch", "2000000", "--max-nonces", "16", timeout=120)
    assert out.returncode == 0, out.stderr
    assert ndjson(out.stdout)[-1]["total_computed"] == 16
    assert "batch 2000000 lowered to 16" in out.stderr
    assert time.monotonic() - started < 60


def _claim(engine, tmp_path, tamper: int, claimed_gap: float = 0.0) -> str:
    nonces = list(range(20))
    dist = engine.distances(PRESETS["tiny"], BLOCK_HASH, PUBLIC_KEY, nonces, "float16")
    r_target = float(np.max(dist)) + 1e-3
    claim = {"params": "tiny", "block_hash": BLOCK_HASH, "public_key": PUBLIC_KEY, "nonces": nonces,
             "dist": dist.tolist(), "r_target": r_target}
    if tamper:
        claim["r_target"] = float(np.sort(dist)[tamper - 1]) - 1e-6  # the `20 - tamper + 1` largest now fail
    if claimed_gap:
        claim["dist"][:3] = [d - claimed_gap for d in claim["dist"][:3]]  # claimed closer than computed
    path = tmp_path / f"claim{tamper}-{claimed_gap}.json"
    path.write_text(json.dumps(claim))
    return str(path)


def test_validate_exits_0_on_an_honest_claim_and_3_on_fraud(engine, tmp_path):
    honest = run_cli("validate", _claim(engine, tmp_path, 0))
    assert honest.returncode == 0, honest.stderr
    report = json.loads(honest.stdout)
    assert report["n_invalid"] == 0 and report["fraud"] is False and report["p_value"] == 1.0
    bad = run_cli("validate", _claim(engine, tmp_path, 15))
    assert bad.returncode == cli.EXIT_FRAUD == 3, bad.stderr
    report = json.loads(bad.stdout)
    assert report["n_invalid"] == 6 and report["fraud"] is True and report["p_value"] < 1e-7
    assert "FRAUD" in bad.stderr


def test_validate_says_when_claimed_distances_are_beyond_the_fidelity_bound(engine, tmp_path):
    """Still not fraud (the network's rule counts recomputed distances above r_target), but said."""
    far = run_cli("validate", _claim(engine, tmp_path, 0, claimed_gap=0.01))
    assert far.returncode == 0, far.stderr
    assert json.loads(far.stdout)["max_abs_gap"] > 0.009
    verdict = far.stderr.strip().splitlines()[-1]
    assert verdict.startswith("0 of 20 invalid, p-value 1: not fraud at threshold 1e-07; 3 claimed distance(s) "
                              "differ from the recomputed ones by more than two faithful float16 computations can")
    assert "counts only recomputed distances above r_target" in verdict
    near = run_cli("validate", _claim(engine, tmp_path, 0, claimed_gap=2e-5))  # within the bound
    assert near.returncode == 0 and "differ" not in near.stderr, near.stderr


def test_the_fidelity_bounds_are_the_reference_cases_largest():
    from jaxbench.claims import FIDELITY_BOUND

    cases = load_cases()
    assert FIDELITY_BOUND["float32"] == 1e-5
    for dtype, key in (("float16", "dist_f16"), ("bfloat16", "dist_bf16")):
        largest = max(2 * np.max(np.abs(np.array(c[key]) - np.array(c["dist_f32"]))) + 1e-5 for c in cases)
        assert largest <= FIDELITY_BOUND[dtype] <= largest * 1.01, (dtype, largest)


def test_version_is_the_projects():
    import tomllib

    from conftest import ROOT

    out = run_cli("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.returncode == 0 and out.stdout.strip() == f"python -m jaxbench {version}", out


def test_a_missing_command_names_help():
    line = assert_one_line(run_cli(), cli.EXIT_BAD_INPUT, "COMMAND")
    assert line.endswith("(`python -m jaxbench --help` lists the commands)"), line
    line = assert_one_line(run_cli("remote"), cli.EXIT_BAD_INPUT, "COMMAND")
    assert line.endswith("(`python -m jaxbench remote --help` lists the commands)"), line


def test_bench_reports_every_figure():
    """Host draws here (the step is the one the searches above compiled); the device-draw figures
    are test_bench.py's."""
    out = run_cli("bench", "--params", "tiny", "--seconds", "1", "--batch", "8")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("end_to_end_nonces_per_s", "device_only_nonces_per_s", "draw_nonces_per_s", "weight_build_seconds",
                "compile_seconds", "mean_draw_seconds_per_step", "mean_step_seconds"):
        assert report[key] > 0, key
    assert 0 <= report["mean_host_wait_seconds_per_step"] <= report["end_to_end_seconds"]  # draws may run ahead
    assert report["batch_per_device"] == 8 and report["devices"] == 1 and report["draws"] == "host"
    assert report["device_draw_nonces_per_s_alone"] is None and report["nonces_computed"] >= 8
    assert report["achieved_tflops_per_device"] >= 0 and report["percent_of_floor"] is None  # no floor on a CPU
    # Progress while it runs: each phase, and a bar over the end-to-end window that reaches its end.
    assert "device only: one prepared step back to back for 0.5 s" in out.stderr
    assert "end to end: 100%" in out.stderr
    # The summary on stderr, with the figures of the JSON.
    assert f"end to end   {report['end_to_end_nonces_per_s']:,.2f} nonces/s" in out.stderr
    # No GPU: every telemetry field null, with the reason; no ceiling probe.
    assert report["telemetry_unavailable"] == "no NVIDIA GPU (the devices are cpu)"
    assert report["mean_power_w"] is report["energy_joules_per_nonce"] is report["clock_limited_share"] is None
    assert report["sustained_tflops"] is report["percent_of_sustained"] is None
    assert "telemetry    unavailable: no NVIDIA GPU (the devices are cpu)" in out.stderr


# Bad input: one line on stderr, exit status 2 -----------------------------------------------------

DISTANCES = ["distances", *TINY, "--nonces", "1"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["distances", "--params", "huge", "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "--params"),
        (["distances", "--params", '{"dim": 63}', "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "dim"),
        (["distances", "--params", '{"colour": 1}', "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "colour"),
        (["distances", "--params", '{"dim": 1e400}', "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "dim"),
        (["distances", "--params", '{"dim": ' + "9" * 5000 + "}", "--block-hash", "a", "--public-key", "b",
          "--nonces", "1"], "--params"),
        (["distances", "--params", "{" * 100_000, "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "--params"),
        (["distances", "--params", "@/nonexistent.json", "--block-hash", "a", "--public-key", "b", "--nonces", "1"],
         "--params"),
        (["distances", "--params", "[]", "--block-hash", "a", "--public-key", "b", "--nonces", "1"],
         "--params: '[]' is not a preset (mainnet, testnet, bench, tiny) or a JSON object"),
        (["distances", "--params", "7", "--block-hash", "a", "--public-key", "b", "--nonces", "1"],
         "is not a preset"),
        (["distances", "--params", "@/dev/zero", "--block-hash", "a", "--public-key", "b", "--nonces", "1"], "--params"),
        (["distances", *TINY, "--nonces", "1,x"], "--nonces"),
        (["distances", *TINY, "--nonces", "9-2"], "--nonces"),
        (["distances", *TINY, "--nonces", "-4"], "--nonces"),
        (["distances", *TINY, "--nonces", "0-100000000000"], "--nonces"),
        (["distances", *TINY, "--nonces", "9" * 5000], "--nonces"),
        (["distances", *TINY], "--nonces"),
        ([*DISTANCES, "--dtype", "float8"], "--dtype"),
        (["distances", "--params", "tiny", "--block-hash", "", "--public-key", "b", "--nonces", "1"], "--block-hash"),
        (["distances", "--params", "tiny", "--block-hash", "a" * 5000, "--public-key", "b", "--nonces", "1"],
         "--block-hash"),
        (["distances", "--params", "tiny", "--block-hash", "a", "--public-key", b"\xff", "--nonces", "1"],
         "--public-key"),
        ([*DISTANCES, "--devices", "0"], "--devices"),
        ([*DISTANCES, "--devices", "-3"], "--devices"),
        ([*DISTANCES, "--devices", "64"], "--devices"),
        ([*DISTANCES, "--batch", "0"], "--batch"),
        ([*DISTANCES, "--cache-dir", "/dev/null/x"], "--cache-dir"),
        ([*DISTANCES, "--cache-dir", "/dev/null"], "--cache-dir: '/dev/null' is not a directory"),
        ([*DISTANCES, "--draws", "gpu"], "--draws"),
        (["search", *TINY, "--r-target", "-1"], "--r-target"),
        (["search", *TINY, "--r-target", "nan"], "--r-target"),
        (["search", *TINY, "--max-nonces", "0"], "--max-nonces"),
        (["search", *TINY, "--max-nonces", "5", "--duration", "3"], "--duration"),
        (["search", *TINY, "--duration", "inf"], "--duration"),
        (["search", *TINY, "--duration", "-1"], "--duration"),
        (["search", *TINY, "--start-nonce", "ten"], "--start-nonce"),
        (["search", *TINY, "--start-nonce", "-1"], "--start-nonce"),
        (["search", *TINY, "--block-height", "-1"], "--block-height"),
        (["search", *TINY, "--node-id", "3", "--n-nodes", "2"], "--node-id"),
        (["search", *TINY, "--n-nodes", "0"], "--n-nodes"),
        (["search", *TINY, "--out", "/dev/null/x"], "--out"),
        (["search", *TINY, "--out", ""], "--out"),
        (["search", *TINY, "--max-nonces", str(2**63 + 1)], "--max-nonces"),
        (["validate", "claim.json", "--threshold", "-1"], "--threshold"),
        (["validate", "claim.json", "--threshold", "2"], "--threshold"),
        (["validate", "/nonexistent/claim.json"], "file"),
        (["validate", "/"], "file"),
        (["validate", "/dev/zero"], "file"),
        (["bench", "--params", "tiny", "--seconds", "0"], "--seconds"),
        (["bench", "--params", "tiny", "--sustained-seconds", "31"], "--sustained-seconds"),
        (["bench", "--params", "tiny", "--sustained-seconds", "-1"], "--sustained-seconds"),
        (["bench", "--params", "tiny", "--batch", "2000000"], "--batch"),  # bench runs its batch: it must fit
        (["frobnicate"], "frobnicate"),
        (["-v"], "COMMAND"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(args, named):
    assert_one_line(run_cli(*args), cli.EXIT_BAD_INPUT, "error: ", named)


@pytest.mark.parametrize("command", ["distances", "search", "bench"])
def test_a_set_no_machine_can_hold_is_refused_saying_what_it_needs(command):
    args = ["--params", UNFITTABLE, "--dtype", "float32", "--devices", "1"]
    args += ["--block-hash", "a", "--public-key", "b"] if command != "bench" else []
    args += ["--nonces", "1"] if command == "distances" else []
    line = assert_one_line(run_cli(command, *args), cli.EXIT_BAD_INPUT, "--params")
    assert REFUSAL.search(line), line


def test_the_refusal_in_process_names_the_need_and_what_is_there(capsys, engine):
    from jaxbench.fields import FieldError
    from jaxbench.params import Params

    with pytest.raises(FieldError) as refused:
        engine.check_fits(Params.from_dict(json.loads(UNFITTABLE)), "float32")
    assert refused.value.field == "params" and REFUSAL.search(refused.value.message)
    status = cli.main(["distances", "--params", UNFITTABLE, "--dtype", "float32", "--block-hash", "a",
                       "--public-key", "b", "--nonces", "1", "--cache-dir", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_BAD_INPUT and len(err) == 1 and REFUSAL.search(err[0])


def test_a_device_memory_cap_below_the_sets_need_names_the_option_and_what_would_fit():
    from jaxbench.placement import stage_need
    from jaxbench.sizes import format_size

    least = format_size(stage_need(PRESETS["tiny"], "float16", 1).total(1))
    for command in (["distances", *TINY, "--nonces", "1"], ["search", *TINY, "--max-nonces", "8"]):
        line = assert_one_line(run_cli(*command, "--device-memory", "1KiB", "--devices", "1"), cli.EXIT_BAD_INPUT)
        assert line.startswith(f"error: --device-memory: 1.00 KiB cannot hold the parameter set: it needs at least "
                               f"{least} on each device"), line
        assert "--params" not in line and re.search(r"each cpu device has [\d.]+ GiB available$", line), line


def test_a_set_too_large_for_the_device_itself_still_names_params_under_a_cap():
    line = assert_one_line(run_cli("distances", "--params", UNFITTABLE, "--dtype", "float32", "--devices", "1",
                                   "--block-hash", "a", "--public-key", "b", "--nonces", "1", "--device-memory", "1GiB"),
                           cli.EXIT_BAD_INPUT, "error: --params: needs")
    assert REFUSAL.search(line) and "(1.00 GiB is the device memory cap; each device has " in line, line


@pytest.mark.parametrize(
    "claim, named",
    [
        ("[1, 2]", "body"),
        ('{"params": "tiny"}', "nonces"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1, 2], "dist": [1.0], "r_target": 1.4}',
         "dist"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1.4, '
         '"x": 1}', "x"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [-1], "dist": [1.0], "r_target": 1.4}',
         "nonces"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": ["x"], "r_target": 1.4}',
         "dist"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [NaN], "r_target": 1.4}',
         "dist"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": NaN}',
         "r_target"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1e400}',
         "r_target"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1.4, '
         '"fraud_threshold": -1}', "fraud_threshold"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1.4, '
         '"fraud_threshold": 2}', "fraud_threshold: must be at most 1"),
        ('{"params": "tiny", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1.4, '
         '"dtype": "float8"}', "dtype"),
        ('{"params": {"dim": 63}, "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1}',
         "dim"),
        ('{"params": "mainnet", "block_hash": "a", "public_key": "b", "nonces": [1], "dist": [1.0], "r_target": 1}',
         "needs"),
        ('{"nonces": [' + "1" * 5000 + "]}", "file"),
        ("[" * 100_000, "file"),
        ("{not json", "file"),
        (b"\xff\xfe{}", "file"),
    ],
)
def test_validate_rejects_malformed_claims(tmp_path, claim, named):
    path = tmp_path / "claim.json"
    path.write_bytes(claim if isinstance(claim, bytes) else claim.encode())
    assert_one_line(run_cli("validate", str(path)), cli.EXIT_BAD_INPUT, named)


# Other ends: interrupts, a closed pipe, an unexpected failure --------------------------------------


# Ctrl-C's usual action in the child: pytest itself may run with SIGINT ignored (a background job
# of a script does), and a child inherits that.
WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('jaxbench', run_name='__main__', alter_sys=True)")


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    argv, env = cli_command(*args, env=env)
    assert argv[1:3] == ["-m", "jaxbench"]
    return subprocess.Popen([argv[0], "-c", WITH_CTRL_C, *argv[3:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _read_stderr_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while not re.search(pattern, seen):
        assert time.monotonic() < deadline and proc.poll() is None, seen
        if select.select([proc.stderr], [], [], 1)[0]:
            seen += os.read(proc.stderr.fileno(), 65536).decode()
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `timeout`, `docker stop`
def test_ctrl_c_or_sigterm_ends_a_search_with_its_summary(signum):
    proc = _start(["search", *TINY, "--r-target", "1.41", "--duration", "300", "--batch", "8"])
    _read_stderr_until(proc, "step compiled")
    time.sleep(1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert ndjson(stdout)[-1]["reason"] == "interrupted"


def test_ctrl_c_stops_other_commands_with_one_line():
    proc = _start(["distances", *TINY, "--nonces", "0-999999", "--batch", "8"], env={"JAXBENCH_PROGRESS_S": "0.2"})
    _read_stderr_until(proc, r"distances: +\d+% [1-9]\d*/1000000")  # some steps are done
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED and stdout == "", stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr


def test_a_reader_that_leaves_ends_the_search_quietly():
    proc = _start(["search", *TINY, "--r-target", "1.5", "--duration", "300", "--batch", "8"])
    json.loads(proc.stdout.readline())
    proc.stdout.close()  # like `| head -1`
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_a_failing_write_is_one_line():
    argv, env = cli_command(*DISTANCES)
    with open("/dev/full", "w") as full:
        out = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert out.returncode == cli.EXIT_ERROR
    assert out.stderr.strip().splitlines()[-1].startswith("error: OSError: [Errno 28]"), out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr


# `python -m jaxbench` with files capped at a size (argv[1], bytes): a write past the cap fails with
# EFBIG, like one on a disk that has just filled.
WITH_FILE_SIZE_CAP = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                      "cap = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap)); "
                      "os.execv(sys.executable, [sys.executable, '-m', 'jaxbench', *sys.argv[2:]])")


def _search_into(path: str, file_size_cap: int | None = None) -> subprocess.CompletedProcess:
    """A search whose every nonce is valid (r_target 2), writing its lines to `path`."""
    argv, env = cli_command("search", *TINY, "--r-target", "2", "--max-nonces", "32", "--batch", "8", "--out", path)
    if file_size_cap is not None:
        argv = [argv[0], "-c", WITH_FILE_SIZE_CAP, str(file_size_cap), *argv[3:]]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def _error_line(stderr: str) -> str:
    """stderr's lines less the progress display and the ready line: the one error line."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("search:", "weights built"))]
    assert len(lines) == 1, stderr
    return lines[0]


def test_an_out_file_that_refuses_every_write_names_out_and_keeps_the_lines_on_stdout(engine):
    out = _search_into("/dev/full")
    assert out.returncode == cli.EXIT_ERROR, out.stderr
    error = _error_line(out.stderr)
    assert error.startswith("error: --out: cannot write '/dev/full': No space left on device"), error
    lines = ndjson(out.stdout)
    summary = lines[-1]
    assert summary["reason"] == "error" and summary["error"] == "--out: cannot write '/dev/full': No space left on device"
    found = {n: d for line in lines[:-1] for n, d in zip(line["nonces"], line["dist"])}
    assert summary["total_computed"] > 0 and sorted(found) == list(range(summary["total_computed"]))
    assert found == tiny_distances(engine, sorted(found))


def test_a_disk_that_fills_mid_search_leaves_whole_lines_in_the_file_and_the_rest_on_stdout(tmp_path):
    path = tmp_path / "found.ndjson"
    out = _search_into(str(path), file_size_cap=700)  # room for one line of 8 nonces, not two
    assert out.returncode == cli.EXIT_ERROR, out.stderr
    assert _error_line(out.stderr).startswith(f"error: --out: cannot write '{path}': File too large")
    in_file, on_stdout = ndjson(path.read_text()), ndjson(out.stdout)  # every line whole: none cut off
    assert in_file and path.read_text().endswith("\n")
    summary = on_stdout[-1]
    assert summary["reason"] == "error" and "status" not in in_file[-1]
    nonces = [n for line in in_file + on_stdout[:-1] for n in line["nonces"]]
    assert nonces == list(range(summary["total_computed"]))  # each computed nonce once, in the file or on stdout


def test_an_unexpected_failure_is_one_line_and_v_adds_its_traceback(monkeypatch, capsys):
    def fail(args):
        raise RuntimeError("the device fell over\nsecond line of detail")

    monkeypatch.setitem(cli.COMMANDS, "distances", fail)
    assert cli.main(DISTANCES) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: RuntimeError: the device fell over (-v shows the traceback)"]
    assert cli.main([*DISTANCES, "-v"]) == cli.EXIT_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_a_device_error_mid_search_keeps_the_lines_and_ends_with_the_summary(monkeypatch, capsys):
    """What a runtime error of the device in the third step looks like: the two steps already
    computed are written, then the summary with the reason and the error, then one line and exit 1."""
    from jaxbench.engine import Engine

    real = Engine.search

    def failing(self, job, stop=None, batch=None, on_ready=None):
        for n, step in enumerate(real(self, job, stop, batch=batch, on_ready=on_ready)):
            if n == 2:
                raise RuntimeError("INTERNAL: CUDA error: an illegal memory access was encountered\nmore")
            yield step

    monkeypatch.setattr(Engine, "search", failing)
    status = cli.main(["search", "--params", "tiny", "--block-hash", "a", "--public-key", "b", "--r-target", "2",
                       "--max-nonces", "64", "--batch", "8", "--draws", "host", "--cache-dir", "", "--out", "-"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == cli.EXIT_ERROR
    assert [n for line in lines[:-1] for n in line["nonces"]] == list(range(16))  # two steps of 8, every nonce valid
    assert lines[-1]["status"] == "done" and lines[-1]["reason"] == "error" and lines[-1]["total_computed"] == 16
    assert lines[-1]["error"] == "RuntimeError: INTERNAL: CUDA error: an illegal memory access was encountered"
    assert err.strip().splitlines()[-1].startswith("error: RuntimeError: INTERNAL: CUDA error: an illegal memory")


LOGS_AN_EXCEPTION = """
import logging, sys
from jaxbench import cli

def command(args):
    try:
        raise OSError("plugin set-up failed")
    except OSError:
        logging.getLogger("some.library").exception("could not initialise a backend")
    return 0

cli.COMMANDS["distances"] = command
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_librarys_logged_exception_is_one_line_unless_v(verbose):
    argv, env = cli_command()
    out = subprocess.run([argv[0], "-c", LOGS_AN_EXCEPTION, *DISTANCES, *(["-v"] if verbose else [])],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "some.library: could not initialise a backend" in out.stderr
    assert ("Traceback" in out.stderr) == verbose, out.stderr
    if not verbose:
        assert len(out.stderr.strip().splitlines()) == 1


PROBE_NOISE = ("Unable to initialize backend 'tpu'", "Unable to initialize backend 'proxy'")


def test_v_logs_no_failed_probes_of_backends_nobody_asked_for():
    out = run_cli("-v", *DISTANCES, env={"JAX_PLATFORMS": ""})  # JAX probes every backend it knows
    assert out.returncode == 0, out.stderr
    assert "INFO jaxbench.engine: built weights" in out.stderr  # -v's INFO lines still come
    assert not [noise for noise in PROBE_NOISE if noise in out.stderr], out.stderr


def test_quieting_the_probes_keeps_every_other_backend_message(caplog, monkeypatch):
    from jaxbench.backend_probes import BACKEND_SETUP_LOGGER, quiet_backend_probes

    logger = logging.getLogger(BACKEND_SETUP_LOGGER)
    monkeypatch.setattr(logger, "filters", list(logger.filters))  # the filter goes with the test
    monkeypatch.delenv("JAX_BACKEND_TARGET", raising=False)
    quiet_backend_probes()
    quiet_backend_probes()  # twice: still one filter
    kept = ["Unable to initialize backend 'cuda': no CUDA-capable device is detected",
            "Unable to initialize backend 'rocm': plugin failed"]
    with caplog.at_level(logging.INFO, logger=BACKEND_SETUP_LOGGER):
        for message in [*kept, *(f"{noise}: not here" for noise in PROBE_NOISE)]:
            logger.info(message)
        logger.warning("Unable to initialize backend 'tpu': a TPU is present but libtpu failed")
        logger.error("Jax plugin configuration error: Exception when calling jax_plugins.xla_cuda12.initialize()")
    assert [r.getMessage() for r in caplog.records] == [
        *kept, "Unable to initialize backend 'tpu': a TPU is present but libtpu failed",
        "Jax plugin configuration error: Exception when calling jax_plugins.xla_cuda12.initialize()"]

    monkeypatch.setenv("JAX_BACKEND_TARGET", "grpc://localhost:29000")  # a proxy asked for: its failure is news
    quiet_backend_probes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=BACKEND_SETUP_LOGGER):
        logger.info("Unable to initialize backend 'proxy': connection refused")
    assert [r.getMessage() for r in caplog.records] == ["Unable to initialize backend 'proxy': connection refused"]


# Progress: a bar on a terminal, plain lines now and then elsewhere ---------------------------------


SEARCH_FOR_3_S = ["search", *TINY, "--duration", "3", "--batch", "8", "--out", "-"]


def test_progress_into_a_log_is_a_plain_line_every_few_seconds():
    out = run_cli(*SEARCH_FOR_3_S, env={"JAXBENCH_PROGRESS_S": "0.5"})
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b" not in out.stderr  # nothing redrawn in place
    shown = [line for line in out.stderr.splitlines() if line.startswith("search: ")]
    assert 2 <= len(shown) <= 3 / 0.5 + 2, out.stderr  # every half second of the search, and the last
    total = ndjson(out.stdout)[-1]["total_computed"]
    assert re.fullmatch(rf"search: {total} nonces, \d+ s, [\d.]+ nonces/s, valid=\d+", shown[-1]), shown[-1]


def test_progress_lines_can_be_turned_off():
    out = run_cli(*SEARCH_FOR_3_S, env={"JAXBENCH_PROGRESS_S": "0"})
    assert out.returncode == 0, out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("search: ")], out.stderr
    assert "valid below r_target" in out.stderr  # the closing summary line stays


def test_progress_on_a_terminal_is_still_a_bar_redrawn_in_place():
    argv, env = cli_command(*SEARCH_FOR_3_S, env={"JAXBENCH_PROGRESS_S": "0.5"})
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns for the bar
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env)
        os.close(slave)
        shown = read_terminal(master, 120)
        assert proc.wait(timeout=120) == 0, shown
    finally:
        os.close(master)
    assert re.search(rb"\rsearch: [1-9]\d*nonce \[\d\d:\d\d, [\d.]+nonce/s", shown), shown[-2000:]  # tqdm's, after a CR

