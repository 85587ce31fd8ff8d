"""`python -m jaxbench bench`: the throughput figures every number in docs/benchmarks.md comes from."""

from __future__ import annotations

import resource
import sys
import threading
import time

import jax
import numpy as np

from . import device_draws
from .engine import Engine
from .feeder import prepare_step
from .job import SearchJob
from .nonces import NonceSchedule
from .params import Params

# Dense fp16/bf16 matrix rate measured on these cards (docs/benchmarks.md, "Reference points"): the floor's clock.
MATRIX_PEAK_FLOPS = {"H100": 800e12, "H200": 800e12}


def matrix_peak(device_kind: str) -> float | None:
    for name, rate in MATRIX_PEAK_FLOPS.items():
        if name in device_kind:
            return rate
    return None


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_memory(engine: Engine) -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in engine.devices]
    return max(peaks) if all(p is not None for p in peaks) else None


def run_bench(
    engine: Engine, params: Params, dtype: str, block_hash: str, public_key: str, seconds: float,
    batch: int | None = None,
) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model = engine.load(params, block_hash, dtype)
    build_seconds = time.perf_counter() - t0
    groups, group_size = model.placement.n_groups, model.placement.group_size
    devices = groups * group_size
    if batch is None:
        recorded = engine.batches.choice(params, dtype)
        t0 = time.perf_counter()
        batch = engine.batches.default(params, dtype)
        entry = recorded or engine.batches.choice(params, dtype)  # the sweep's, where the default ran one
        choice = {"source": "record" if recorded else "sweep", "seconds": round(time.perf_counter() - t0, 2),
                  "block_nonces_per_s": (entry or {}).get("block_nonces_per_s")}
    else:
        choice = {"source": "given", "seconds": 0.0, "block_nonces_per_s": None}
    step_fn = engine.compiled_step(params, dtype, batch)
    compile_seconds = step_fn.compile_seconds
    log(f"weights {build_seconds:.2f} s, batch {batch} ({choice['source']}, {choice['seconds']:.2f} s), "
        f"compile {compile_seconds:.2f} s, {groups} group(s) of {group_size} device(s)")

    # Draws alone: one step's inputs and permutations prepared on the host (and sent).
    job = SearchJob(params, block_hash, public_key, 0.0, NonceSchedule.for_node(0), dtype)
    prepared = prepare_step(engine.drawer, engine.draws_mode, model.stages, job, 0, 0, batch)
    jax.block_until_ready((prepared.inputs, prepared.permutations))
    t0 = time.perf_counter()
    prepared = prepare_step(engine.drawer, engine.draws_mode, model.stages, job, 1, batch * groups, batch)
    jax.block_until_ready((prepared.inputs, prepared.permutations))
    draw_rate = batch * groups / (time.perf_counter() - t0)

    device_draw_rate = _device_draw_rate(engine, params, dtype, prepared.inputs) if engine.draws_mode == "device" else None

    # Device only: the same prepared step run back to back.
    jax.block_until_ready(step_fn(model.weights, prepared.inputs, prepared.permutations, model.target))
    reps = 0
    t0 = time.perf_counter()
    while True:
        out = step_fn(model.weights, prepared.inputs, prepared.permutations, model.target)
        reps += 1
        if reps >= 3 and time.perf_counter() - t0 >= min(seconds / 2, 10):
            break
        if reps % 4 == 0:
            out.block_until_ready()
    out.block_until_ready()
    device_rate = reps * batch * groups / (time.perf_counter() - t0)
    device_result = np.asarray(out)
    if not np.all(np.isfinite(device_result)):
        raise RuntimeError("non-finite distances in the benchmark step")

    # End to end: draws, transfers, steps and distances back on the host, pipelined.
    job = SearchJob(params, block_hash, public_key, 0.0, NonceSchedule.for_node(10**9), dtype, duration_s=seconds)
    stop = threading.Event()
    computed = steps = 0
    draw_s = wait_s = step_s = 0.0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for result in engine.search(job, stop, batch=batch):
        computed += result.computed
        steps += 1
        draw_s += result.draw_seconds
        wait_s += result.wait_seconds
        step_s += result.seconds
    wall = time.perf_counter() - t0
    cpu_cores = (_cpu_seconds() - cpu0) / wall
    e2e_rate = computed / wall

    flops = params.flops_per_nonce()
    kind = engine.devices[0].device_kind
    peak = matrix_peak(kind)
    report = {
        "params": params.to_dict(),
        "dtype": dtype,
        "draws": engine.draws_mode,
        "attention": engine.attention_for(dtype),
        "ffn": engine.config.ffn,
        "device_kind": kind,
        "devices": devices,
        "groups": groups,
        "group_size": group_size,
        "batch_per_device": batch,  # nonces a group takes per step, passed from stage to stage
        "end_to_end_nonces_per_s": round(e2e_rate, 2),
        "end_to_end_nonces_per_s_per_device": round(e2e_rate / devices, 2),
        "device_only_nonces_per_s": round(device_rate, 2),
        "achieved_tflops_per_device": round(e2e_rate / devices * flops / 1e12, 1),
        "device_only_tflops_per_device": round(device_rate / devices * flops / 1e12, 1),
        "floor_nonces_per_s_per_device": round(peak / flops, 1) if peak else None,
        "percent_of_floor": round(100 * e2e_rate / devices * flops / peak, 1) if peak else None,
        # Host side of a step: inputs and permutations (host draws), or states and permutations.
        "draw_nonces_per_s": round(draw_rate, 1),
        "device_draw_nonces_per_s_alone": None if device_draw_rate is None else round(device_draw_rate, 1),
        "mean_draw_seconds_per_step": round(draw_s / max(steps, 1), 4),
        "mean_step_seconds": round(step_s / max(steps, 1), 4),
        # Draws of step k+1 overlap step k: the devices idle only for the part the host waited.
        "mean_host_wait_seconds_per_step": round(wait_s / max(steps, 1), 4),
        "host_cpu_cores_busy": round(cpu_cores, 2),
        "weight_build_seconds": round(build_seconds, 2),
        "compile_seconds": round(compile_seconds, 2),
        "batch_choice": choice,
        # Before the first nonce: weights, the batch (recorded or swept) and the compiled step.
        "cold_start_seconds": round(build_seconds + choice["seconds"] + compile_seconds, 2),
        "peak_device_memory_gib": None if (m := _peak_memory(engine)) is None else round(m / 2**30, 2),
        "end_to_end_seconds": round(wall, 2),
        "nonces_computed": computed,
    }
    _print_table(report)
    return report


def _device_draw_rate(engine: Engine, params: Params, dtype: str, states: jax.Array) -> float:
    """Nonces/s of the device input draw alone, on the first device, for one step's states."""
    local = states.addressable_shards[0].data
    draw = jax.jit(device_draws.make_input_drawer(params.seq_len, params.dim, dtype))
    draw(local).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 2.0:
        draw(local).block_until_ready()
        reps += 1
    return reps * local.shape[0] / (time.perf_counter() - t0)


def _print_table(report: dict) -> None:
    rows = [(k, v) for k, v in report.items() if k != "params"]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows), file=sys.stderr, flush=True)
