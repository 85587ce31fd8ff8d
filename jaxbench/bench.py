"""`python -m jaxbench bench`: the throughput figures every number in docs/benchmarks.md comes from.

In order: the weights, the batch and the compiled step; the draws alone; the device alone (the same
prepared step back to back); the end-to-end window (the pipelined search, with the GPUs' power,
energy and clocks sampled through NVML: jaxbench.telemetry); then the card's own ceiling, a few
seconds of float16 square products (jaxbench.sustained). Progress and a one-screen summary go to
stderr; the report (docs/output.md) is returned.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time

import jax
import numpy as np

from . import device_draws, sustained
from .engine import Engine
from .feeder import prepare_step
from .fields import DEFAULT_SUSTAINED_S
from .job import SearchJob
from .nonces import NonceSchedule
from .params import PRESETS, Params
from .progress import progress_display
from .telemetry import CLOCK_EVENT_REASONS, TelemetrySampler

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
    batch: int | None = None, sustained_seconds: float = DEFAULT_SUSTAINED_S,
) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    log(f"bench: {len(engine.devices)} {engine.platform} device(s); building the weights, choosing the batch, "
        f"compiling the step")
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
        source = "record" if recorded else "sweep" if entry else "default"  # default: no sweep (the CPU)
        choice = {"source": source, "seconds": round(time.perf_counter() - t0, 2),
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
    log(f"device only: one prepared step back to back for {min(seconds / 2, 10):.3g} s")
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
    with TelemetrySampler(model.placement.devices) as sampler, _window_progress(seconds, sampler) as progress:
        window_unix = [time.time()]
        sampler.begin()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        for result in engine.search(job, stop, batch=batch):
            computed += result.computed
            steps += 1
            draw_s += result.draw_seconds
            wait_s += result.wait_seconds
            step_s += result.seconds
            progress(computed, time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        telemetry = sampler.end()
        window_unix.append(time.time())
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
        "mean_draw_seconds_per_step": round(draw_s / max(steps, 1), 6),
        "mean_step_seconds": round(step_s / max(steps, 1), 6),
        # Draws of step k+1 overlap step k: the devices idle only for the part the host waited.
        "mean_host_wait_seconds_per_step": round(wait_s / max(steps, 1), 6),
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
    report.update(_explained(engine, model.placement.devices, e2e_rate * flops, telemetry.fields(computed),
                             sustained_seconds, log))
    report["telemetry_window_unix"] = [round(t, 3) for t in window_unix]
    print("\n".join(summary_lines(report)), file=sys.stderr, flush=True)
    return report


@contextlib.contextmanager
def _window_progress(seconds: float, sampler: TelemetrySampler):
    """Progress over the end-to-end window on stderr (jaxbench.progress): seconds done, nonces/s, and
    the GPUs' newest power and clock. Yields `update(nonces, elapsed_seconds)`."""
    with progress_display(round(seconds, 1), "end to end", unit="s", units="s", rate=False, mininterval=0.5,
                          bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}") as bar:
        def update(nonces: int, elapsed: float) -> None:
            bar.update(min(elapsed, bar.total) - bar.n)
            live = {"nonces/s": f"{nonces / elapsed:.1f}"}
            reading = sampler.latest()
            if reading is not None and reading["power_w"] is not None:
                live["power"] = f"{reading['power_w']:.0f} W"
            if reading is not None and reading["sm_mhz"] is not None:
                live["SM"] = f"{reading['sm_mhz']:.0f} MHz"
            bar.set_postfix(live, refresh=False)

        yield update


def _explained(engine: Engine, devices: list, flop_rate: float, telemetry_fields: dict, sustained_seconds: float,
               log) -> dict:
    """The window's telemetry, and the card's sustained ceiling measured now with the step's FLOP rate
    against it (per device of the search's groups: `flop_rate` is all their FLOP/s)."""
    if sustained_seconds > 0 and engine.platform == "gpu":
        log(f"sustained: float16 {sustained.SQUARE_SIZE}³ products on every device for {sustained_seconds:g} s")
    ceiling = sustained.ceiling(devices, sustained_seconds)
    tflops = flop_rate / len(devices) / 1e12
    return {**telemetry_fields, **ceiling,
            "percent_of_sustained": sustained.percent_of_sustained(tflops, ceiling["sustained_tflops"])}


def _share_text(share: dict | None) -> str:
    if share is None:
        return "clock-event reasons not reported"
    held = sorted(((v, k) for k, v in share.items() if k in CLOCK_EVENT_REASONS and v >= 0.01), reverse=True)
    if not held:
        return "no clock-event reason in any sample"
    return "clock held by " + ", ".join(f"{name} in {100 * v:.0f} %" for v, name in held) + " of samples"


BATCH_SOURCES = {"given": "--batch", "record": "the recorded batch", "sweep": "batch swept now",
                 "default": "the default batch"}


def summary_lines(r: dict) -> list[str]:
    """The report in a dozen lines for a person: rates, how far they are from the floor and from the
    card's own ceiling, what the card drew and how it clocked, the host, the cold start."""
    def n(value, digits=1):
        return "–" if value is None else f"{value:,.{digits}f}"

    params = next((name for name, preset in PRESETS.items() if preset.to_dict() == r["params"]), "custom params")
    lines = [
        f"bench        {params}, {r['dtype']}, {r['draws']} draws, batch {r['batch_per_device']} on {r['devices']} × "
        f"{r['device_kind']} ({BATCH_SOURCES[r['batch_choice']['source']]})",
        f"end to end   {n(r['end_to_end_nonces_per_s'], 2)} nonces/s ({n(r['end_to_end_nonces_per_s_per_device'], 2)} "
        f"a device), {n(r['achieved_tflops_per_device'])} TFLOP/s a device",
        f"device only  {n(r['device_only_nonces_per_s'], 2)} nonces/s, {n(r['device_only_tflops_per_device'])} "
        f"TFLOP/s a device",
    ]
    floor = (f"{n(r['percent_of_floor'])} % of the FLOP floor ({n(r['floor_nonces_per_s_per_device'])} nonces/s a "
             f"device at 800 TFLOP/s)" if r["percent_of_floor"] is not None else f"no FLOP floor for {r['device_kind']}")
    ceiling = (f"{n(r['percent_of_sustained'])} % of the {n(r['sustained_tflops'])} TFLOP/s this card sustained"
               if r["sustained_tflops"] is not None else f"no sustained rate: {r['sustained_unavailable']}")
    lines.append(f"ceilings     {floor}; {ceiling}")
    if r["telemetry_unavailable"] is not None:
        lines.append(f"telemetry    unavailable: {r['telemetry_unavailable']}")
    else:
        energy = ("no energy reading" if r["energy_joules_per_nonce"] is None else
                  f"{n(r['energy_joules_per_nonce'], 3)} J/nonce ({r['energy_method'].replace('_', ' ')})")
        lines.append(f"power        {n(r['mean_power_w'])} W a device, limit {n(r['power_limit_w'], 0)} W; {energy}")
        lines.append(f"SM clock     {n(r['mean_sm_clock_mhz'], 0)} MHz mean, {n(r['max_sm_clock_mhz'], 0)} max "
                     f"(limit {n(r['sm_clock_limit_mhz'], 0)}); {_share_text(r['clock_limited_share'])}")
    alone = r["device_draw_nonces_per_s_alone"]
    lines.append(f"host         draws {n(r['draw_nonces_per_s'])} nonces/s"
                 + ("" if alone is None else f" (device draws alone {n(alone)})")
                 + f"; the devices waited {1e3 * r['mean_host_wait_seconds_per_step']:.1f} ms a step; "
                 f"{n(r['host_cpu_cores_busy'], 2)} cores busy")
    lines.append(f"cold start   {n(r['cold_start_seconds'], 2)} s: weights {n(r['weight_build_seconds'], 2)}, batch "
                 f"{n(r['batch_choice']['seconds'], 2)}, compile {n(r['compile_seconds'], 2)}"
                 + ("" if r["peak_device_memory_gib"] is None else f"; peak memory {r['peak_device_memory_gib']} GiB"))
    lines.append(f"window       {n(r['end_to_end_seconds'], 2)} s, {r['nonces_computed']:,} nonces")
    return lines


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



def run_screen_bench(engine: Engine, params: Params, dtype: str, block_hash: str, public_key: str, seconds: float,
                     r_target: float, margin: float, products: str = "fp8", batch: int | None = None) -> dict:
    """The screened search against the exact one on the same nonces: the exact search for `seconds`, then
    the screen over the nonces it computed; each one's rate, valid nonces per second at `r_target` and
    energy per nonce, and the screen's recall of the exact search's valid nonces."""
    from .screen import ScreenedSearch

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    model = engine.load(params, block_hash, dtype)
    batch = batch or engine.batches.default(params, dtype)
    log(f"bench --screen {products}: compiling the exact and the screen's steps (batch {batch}), quantizing the weights")
    engine.compiled_step(params, dtype, batch)
    engine.compiled_step(params, dtype, batch, products)
    engine.screen_weights(model)

    def window(steps) -> dict:
        valid: dict[int, float] = {}
        computed = 0
        with TelemetrySampler(model.placement.devices) as sampler, _window_progress(seconds, sampler) as progress:
            sampler.begin()
            t0 = time.perf_counter()
            for result in steps:
                computed += result.computed
                for g in result.groups:
                    valid.update(zip(*g.valid(r_target)))
                progress(computed, time.perf_counter() - t0)
            wall = time.perf_counter() - t0
            energy = sampler.end().fields(computed).get("energy_joules_per_nonce")
        return {"nonces": computed, "seconds": round(wall, 2), "nonces_per_s": round(computed / wall, 2),
                "valid": len(valid), "valid_per_s": round(len(valid) / wall, 3), "energy_joules_per_nonce": energy,
                "_valid": valid}

    start = 2 * 10**9  # away from bench's own window
    log(f"exact: {seconds:g} s")
    exact_job = SearchJob(params, block_hash, public_key, r_target, NonceSchedule.for_node(start), dtype, seconds)
    exact = window(engine.search(exact_job, batch=batch))
    log(f"screen: the same {exact['nonces']:,} nonces")
    screened_job = SearchJob(params, block_hash, public_key, r_target,
                             NonceSchedule.for_node(start, limit=exact["nonces"]), dtype)
    search = ScreenedSearch(engine, screened_job, margin, products)
    screened = window(search.steps(batch=batch))
    found, reported = exact.pop("_valid"), screened.pop("_valid")
    kept = sum(1 for nonce in reported if nonce in found)
    screened.update(search.counts.describe(),
                    candidate_share=round(search.counts.candidates / max(search.counts.screened, 1), 5))
    report = {
        "params": params.to_dict(), "dtype": dtype, "device_kind": engine.devices[0].device_kind,
        "devices": len(model.placement.devices), "batch_per_device": batch, "r_target": r_target,
        "screen": products, "screen_margin": margin, "exact": exact, "screened": screened,
        "valid_per_s_ratio": round(screened["valid_per_s"] / exact["valid_per_s"], 3) if exact["valid_per_s"] else None,
        "recall": round(kept / len(found), 6) if found else None,
        "missed": len(found) - kept,
        # What the screen cannot change: every nonce it reports, the exact search reports with the same distance.
        "reported_are_exact": all(found.get(nonce) == dist for nonce, dist in reported.items()),
    }
    joules = (screened["energy_joules_per_nonce"], exact["energy_joules_per_nonce"])
    energy = ("no energy reading (no NVIDIA GPU through NVML)" if None in joules else
              f"{screened['energy_joules_per_nonce']:.3f} J/nonce against {exact['energy_joules_per_nonce']:.3f}")
    log(f"screen       {screened['nonces_per_s']:,.2f} nonces/s screened against {exact['nonces_per_s']:,.2f} exact; "
        f"valid/s {screened['valid_per_s']:,.3f} against {exact['valid_per_s']:,.3f} "
        f"(× {report['valid_per_s_ratio']}) at r_target {r_target}; recall {report['recall']} "
        f"({report['missed']} missed), candidates {100 * screened['candidate_share']:.2f} %; {energy}")
    return report
