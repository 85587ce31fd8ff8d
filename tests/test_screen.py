"""The FP8 screen: e4m3 weight products for every nonce, the exact step for the candidates.

What a screen can never change is checked exactly: each nonce it reports is one the exact search
reports, with the bit-identical distance. What it may lose (a valid nonce screened out) is measured
on GPUs (scripts/fp8_screen_check.py, docs/benchmarks.md); here the margins are wide enough for the
tiny sets that nothing is lost, and a zero margin shows the loss is counted, not hidden.
"""

import json
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from jaxbench import fp8, weights
from jaxbench.fields import FieldError
from jaxbench.job import SearchJob
from jaxbench.model import ModelConfig, stage_fn
from jaxbench.nonces import NonceSchedule
from jaxbench.params import Params, params_from_text
from jaxbench.screen import ScreenedSearch, fp8_refusal
from service_helpers import host_devices_env

TINY = params_from_text("tiny")
R_TARGET = 1.40  # about a quarter of tiny's nonces are below it


def screen_weights(built: dict) -> dict:
    """`built` (tiny's weights, one device) with its layers' matrices in e4m3, as the engine makes them."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("device",))
    device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda t: device, weights.quantized_part(weights.weight_specs(TINY, "float16", products="fp8")))
    return weights.with_products(built, weights.quantized_products(built, shardings))


def test_quantized_weight_is_within_e4m3_rounding_of_the_weight():
    w = (jax.random.normal(jax.random.key(0), (3, 96, 40)) * jnp.linspace(0.01, 4, 40)).astype(jnp.float16)
    q = fp8.quantize_weight(w)
    assert q.values.dtype == fp8.E4M3 and q.values.shape == (3, 40, 96) and q.scale.shape == (3, 40)
    back = np.swapaxes(np.asarray(q.values.astype(jnp.float32)) * np.asarray(q.scale)[..., None], -1, -2)
    w32 = np.asarray(w, np.float32)
    # Each column's largest magnitude lands on 448; normal e4m3 values are within 2^-4 relatively,
    # subnormals (below 2^-6) within 2^-10 absolutely, in scaled units.
    scale = np.asarray(q.scale)[:, None, :]
    assert np.all(np.abs(back - w32) <= np.maximum(np.abs(w32) * 2**-4, scale * 2**-10) * (1 + 1e-6))
    assert np.allclose(np.abs(w32).max(axis=-2), np.abs(back).max(axis=-2), rtol=1e-6)


def test_linear_is_the_product_of_the_rounded_operands():
    x = jax.random.normal(jax.random.key(1), (2, 5, 64), jnp.float16)
    w = (jax.random.normal(jax.random.key(2), (64, 24)) / 8).astype(jnp.float16)
    q = fp8.quantize_weight(w)
    x8, x_scale = fp8.quantize_rows(x.reshape(-1, 64))
    expected = (np.asarray(x8.astype(jnp.float32)) * np.asarray(x_scale)) @ (
        np.asarray(q.values.astype(jnp.float32)) * np.asarray(q.scale)[:, None]).T
    got = np.asarray(fp8.linear(x, q), np.float32).reshape(-1, 24)
    assert np.allclose(got, expected, rtol=2e-3, atol=1e-3)  # one float16 rounding apart


def test_a_norms_output_is_quantized_within_its_bound_without_saturating():
    """|r_i| ≤ √D·rms(r): a row with all its weight on one coordinate reaches the bound, and still
    lands within e4m3's range; ordinary rows are rounded as finely as with their own peak."""
    from jaxbench.model import rms_norm

    d = 256
    gamma = jnp.linspace(0.5, 2.0, d).astype(jnp.float16)
    spike = jnp.zeros((1, d), jnp.float16).at[0, -1].set(3.0)  # |x| = √D·max|γ| exactly
    ordinary = jax.random.normal(jax.random.key(4), (7, d), jnp.float16)
    x = rms_norm(jnp.concatenate([spike, ordinary]), gamma, 1e-5)
    values, scale = fp8.quantize_normed(x, gamma)
    v = np.asarray(values.astype(jnp.float32))
    assert np.isfinite(v).all() and np.abs(v).max() <= fp8.E4M3_MAX
    assert np.abs(v[0]).max() > 0.99 * fp8.E4M3_MAX  # the spike is the bound
    back = v * np.asarray(scale)
    x32 = np.asarray(x, np.float32)
    normal = np.abs(x32) >= 2**-6 * np.asarray(scale)  # e4m3's normal range, in x's units
    assert np.all(np.abs(back - x32)[normal] <= np.abs(x32)[normal] * 2**-4 * (1 + 1e-6))


def test_the_swiglu_scale_leaves_headroom_and_never_saturates_gaussian_rows():
    k, hidden = 512, 1024
    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (64, k), jnp.float32) * 1.7
    w1, w3 = (fp8.quantize_weight(jax.random.normal(kk, (k, hidden)) * s) for kk, s in zip(keys[1:], (0.02, 0.05)))
    h, scale = fp8.gated(x.astype(jnp.float16), w1, w3)
    h32 = np.asarray(h.astype(jnp.float32))
    assert scale.shape == (64, 1) and np.isfinite(h32).all()
    assert np.abs(h32).max() < fp8.E4M3_MAX / 4  # at least four times the largest value in reserve
    # The norm's expectation in place of each row's own: the same scale within the rows' spread.
    gamma = jnp.full((k,), 1.7, jnp.float16)
    _, expected = fp8.gated(x.astype(jnp.float16), w1, w3, gamma)
    assert np.allclose(np.asarray(expected), np.asarray(scale), rtol=0.25)


def test_interleaved_gated_half_is_the_separate_ones_arithmetic():
    """What the Hopper kernel computes (gated_interleaved through XLA here) equals fp8.gated over the
    separate W1 and W3, up to the float32 products' last bits: at most one e4m3 step apart."""
    from jaxbench.weights import interleave_columns

    k, hidden, block = 128, 512, 128
    keys = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(keys[0], (32, k), jnp.float16)
    w1, w3 = ((jax.random.normal(kk, (k, hidden)) / 10).astype(jnp.float16) for kk in keys[1:])
    separate, separate_scale = fp8.gated(x, fp8.quantize_weight(w1), fp8.quantize_weight(w3))
    fused, fused_scale = fp8.gated_interleaved(x, fp8.quantize_weight(interleave_columns(w1, w3, block)), block)
    np.testing.assert_allclose(np.asarray(fused_scale), np.asarray(separate_scale), rtol=1e-6)
    line = lambda v: (lambda b: np.where(b < 0, -128 - b, b))(np.asarray(jax.lax.bitcast_convert_type(v, jnp.int8), np.int32))
    assert np.abs(line(fused) - line(separate)).max() <= 1


def test_the_e4m3_kernel_lowers_for_hopper():
    """The kernel is lowered to Mosaic GPU for compute capability 9.0 through jax.export, which runs its
    layout inference and lowering here, without a GPU: an API change in JAX breaks this test, not a
    user's first screened search. (Its results are checked on a GPU: scripts/fp8_ffn_check.py.)"""
    from jax import export

    from jaxbench import gated_ffn

    rows, k, hidden = 256, 256, 256
    e4m3 = jax.ShapeDtypeStruct
    args = (e4m3((rows, k), fp8.E4M3), e4m3((rows,), jnp.float32), e4m3((2 * hidden, k), fp8.E4M3),
            e4m3((2 * hidden,), jnp.float32), e4m3((rows,), jnp.float32))
    kernel = jax.jit(lambda *a: gated_ffn.gated_ffn_fp8(*a, multiprocessors=132))
    module = export.export(kernel, platforms=("cuda",))(*args).mlir_module()
    assert "mosaic_gpu" in module


def test_screen_weight_specs_are_what_quantization_makes():
    pool = weights.pool_on_device("specs", TINY, "float16")
    built = weights.build_weights(pool, TINY, "specs")
    made = screen_weights(built)
    specs = weights.weight_specs(TINY, "float16", products="fp8")
    shape = lambda tree: jax.tree.map(lambda t: (tuple(t.shape), jnp.dtype(t.dtype)), tree)
    assert shape(made) == shape(specs)
    assert made["output"] is built["output"] and made["blocks"]["ffn_norm"] is built["blocks"]["ffn_norm"]
    # The stack at once, compiled as the engine compiles it: what a layer at a time must give. (Not
    # op by op: XLA may turn the division by 448 into a product by its reciprocal, which moves an
    # e4m3 tie; jaxlib 0.12.1 on the CPU does.)
    whole = jax.jit(fp8.quantize_weight)(built["blocks"]["w2"])
    assert np.array_equal(np.asarray(made["blocks"]["w2"].values, np.float32), np.asarray(whole.values, np.float32))
    assert np.array_equal(np.asarray(made["blocks"]["w2"].scale), np.asarray(whole.scale))


def test_fp8_forward_stays_near_the_exact_one():
    pool = weights.pool_on_device("near", TINY, "float16")
    built = weights.build_weights(pool, TINY, "near")
    x = jax.random.normal(jax.random.key(3), (4, TINY.seq_len, TINY.dim), jnp.float16)
    exact = jax.jit(stage_fn(ModelConfig(TINY, "float16")))(built, x)
    screened = jax.jit(stage_fn(ModelConfig(TINY, "float16", products="fp8")))(
        screen_weights(built), x)
    assert not np.array_equal(np.asarray(exact), np.asarray(screened))  # the products did change
    assert np.allclose(np.asarray(screened), np.asarray(exact), rtol=0.05, atol=0.05 * float(jnp.abs(exact).max()))


def _valid(steps) -> dict[int, float]:
    out = {}
    for step in steps:
        for g in step.groups:
            out.update(zip(*g.valid(R_TARGET)))
    return out


@pytest.mark.parametrize("margin", [0.0, 0.01])
def test_screened_search_reports_only_exact_nonces_with_exact_distances(engine, margin):
    job = SearchJob(TINY, "screen-block", "screen-key", R_TARGET, NonceSchedule.for_node(0, limit=1200), "float16")
    exact = _valid(engine.search(job, batch=8))
    search = ScreenedSearch(engine, job, margin)
    steps = list(search.steps(batch=8))
    screened = _valid(steps)
    assert sum(s.computed for s in steps) == 1200
    assert [s.step for s in steps] == list(range(len(steps)))  # in order, each once
    assert screened.keys() <= exact.keys()
    assert all(screened[n] == exact[n] for n in screened)  # bit-identical: the exact step computed them
    assert search.counts.screened == 1200
    assert len(screened) <= search.counts.candidates < 1200
    if margin:
        assert screened == exact  # tiny's fp8 gap is far below 0.01
    for step in steps:  # a nonce screened out is never valid
        for g in step.groups:
            assert np.all(np.isinf(g.dist) | (g.dist < R_TARGET + margin + 0.05))


def test_a_stopped_screened_search_keeps_what_it_screened(engine):
    job = SearchJob(TINY, "screen-stop", "screen-key", R_TARGET, NonceSchedule.for_node(0, limit=100_000), "float16")
    exact_job = SearchJob(TINY, "screen-stop", "screen-key", R_TARGET, NonceSchedule.for_node(0, limit=400), "float16")
    exact = _valid(engine.search(exact_job, batch=8))
    stop = threading.Event()
    search = ScreenedSearch(engine, job, 0.01)
    steps = []
    for step in search.steps(stop, batch=8):
        steps.append(step)
        if sum(s.computed for s in steps) >= 300:
            stop.set()
    computed = sum(s.computed for s in steps)
    assert 300 <= computed <= 400 and computed == search.counts.screened
    assert _valid(steps) == {n: d for n, d in exact.items() if n < computed}


def test_devices_without_e4m3_tensor_cores_are_refused(engine):
    gpu = lambda capability: types.SimpleNamespace(platform="gpu", device_kind="card", compute_capability=capability)
    assert "8.9" in fp8_refusal(gpu("8.6")) and "search without a screen" in fp8_refusal(gpu("8.0"))
    assert fp8_refusal(gpu("8.9")) is None and fp8_refusal(gpu("9.0")) is None and fp8_refusal(gpu("12.0")) is None
    assert fp8_refusal(engine.devices[0]) is None  # the CPU runs the products, widened exactly
    with pytest.raises(FieldError) as e:
        ScreenedSearch(types.SimpleNamespace(devices=[gpu("8.6")]), None)
    assert e.value.field == "screen"


def test_search_with_a_screen_says_so_on_every_line_and_counts_in_its_summary():
    common = ("search", "--params", "tiny", "--block-hash", "cli-screen", "--public-key", "k", "--max-nonces", "400",
              "--r-target", str(R_TARGET), "--draws", "host", "--batch", "8", "--out", "-")
    exact = run_cli(*common)
    screened = run_cli(*common, "--screen", "fp8", "--screen-margin", "0.01")
    assert exact.returncode == 0 and screened.returncode == 0, screened.stderr
    exact_lines = [json.loads(line) for line in exact.stdout.splitlines()]
    lines = [json.loads(line) for line in screened.stdout.splitlines()]
    *results, summary = lines
    assert results and all(r["screen"] == "fp8" and r["screen_margin"] == 0.01 for r in results)
    pairs = lambda rows: {n: d for r in rows for n, d in zip(r["nonces"], r["dist"])}
    assert pairs(results) == pairs(exact_lines[:-1])
    assert summary["screened"] == 400 and summary["total_computed"] == 400
    assert summary["total_valid"] == exact_lines[-1]["total_valid"] <= summary["candidates_recomputed"] < 400


@pytest.mark.parametrize("extra, message", [
    (("--screen-margin", "-0.1"), "--screen-margin: must be between 0 and 0.1"),
    (("--screen-margin", "nan"), "--screen-margin: must be a finite number"),
    (("--screen", "fp4"), "invalid choice: 'fp4'"),
])
def test_bad_screen_options_are_one_line_errors(extra, message):
    r = run_cli("search", "--params", "tiny", "--block-hash", "b", "--public-key", "k", "--max-nonces", "8",
                "--screen", "fp8", *extra)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command, extra, message", [
    ("search", ("--screen-margin", "0.01"), "--screen-margin: applies only with screen"),
    ("bench", ("--r-target", "1.3"), "--r-target: applies only with --screen"),
    ("bench", ("--screen", "fp8", "--sustained-seconds", "2"), "--sustained-seconds: applies only without --screen"),
])
def test_options_that_do_not_apply_are_refused(command, extra, message):
    seeds = ("--block-hash", "b", "--public-key", "k", "--max-nonces", "8") if command == "search" else ("--seconds", "1")
    r = run_cli(command, "--params", "tiny", *seeds, *extra)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_screen_on_two_groups_of_two_devices_matches_one_device():
    """The e4m3 weights are placed like the model's own: stages over a group, groups side by side."""
    layered = Params(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=64, seq_len=8)
    args = ("search", "--params", json.dumps(layered.to_dict()), "--block-hash", "screen-groups", "--public-key",
            "pk", "--r-target", "1.41", "--max-nonces", "64", "--batch", "4", "--draws", "host", "--out", "-",
            "--screen", "fp8")
    one = run_cli(*args, "--devices", "1", env=host_devices_env(4))
    grouped = run_cli(*args, "--group-size", "2", env=host_devices_env(4))
    assert one.returncode == 0 and grouped.returncode == 0, grouped.stderr
    assert "2 group(s) of 2 cpu devices" in grouped.stderr
    *results, summary = [json.loads(line) for line in grouped.stdout.splitlines()]
    assert summary["screened"] == 64 and results
    assert one.stdout.splitlines()[:-1] != [] and {
        n: d for line in one.stdout.splitlines()[:-1] for n, d in zip(json.loads(line)["nonces"], json.loads(line)["dist"])
    } == {n: d for r in results for n, d in zip(r["nonces"], r["dist"])}
