"""/benchmark: a search without result lines, answered by its summary and what explains its rate.

The search runs as /generate's does (generate.run_generation). Its timed window starts when the
first step is back (the weights are built, the step compiled and running) and ends with the last:
`window_nonces` nonces in `window_seconds`, the GPUs sampled through NVML meanwhile
(jaxbench.telemetry: power, energy per nonce, SM clock, clock-event reasons). With
`sustained_seconds` > 0, float16 square products then run for that long on every GPU
(jaxbench.sustained), and `percent_of_sustained` compares the window's FLOP rate with that rate.
The probe is off by default, so the PyWorker's own benchmark, which times the whole request, is not
lengthened by it; it holds the devices `sustained_seconds` (at most fields.MAX_SUSTAINED_S) longer
than the search, also when the job is stopped during the probe.

A job of one step has no window (every window field and the telemetry are null, with the reason).
"""

from __future__ import annotations

import asyncio
import logging
import time

from jaxbench import sustained, telemetry
from jaxbench.job import StepResult

from .context import Context
from .generate import run_generation
from .jobs import Job, LineChannel
from .requests import GenerateRequest

log = logging.getLogger("service.benchmark")


class _Window:
    """Steps after the first, timed and sampled."""

    def __init__(self, sampler: telemetry.TelemetrySampler):
        self.sampler = sampler
        self.started: float | None = None
        self.nonces = 0

    def on_step(self, step: StepResult) -> None:
        if self.started is None:
            self.sampler.begin()
            self.started = time.monotonic()
        else:
            self.nonces += step.computed


async def benchmark_driver(ctx: Context, job: Job, chan: LineChannel, req: GenerateRequest,
                           sustained_seconds: float = 0.0) -> None:
    engine = ctx.engine
    sampler = telemetry.TelemetrySampler(engine.devices)
    await asyncio.to_thread(sampler.open)
    window = _Window(sampler)
    try:
        outcome = await run_generation(ctx, job, chan, req, emit_results=False, on_step=window.on_step)
        ended = time.monotonic()
        readings = await asyncio.to_thread(sampler.end)
    finally:
        await asyncio.to_thread(sampler.close)
    job.summary = outcome.summary()
    if req.ignored_fields:
        job.summary["ignored_fields"] = list(req.ignored_fields)
    reason = outcome.reason

    devices = len(engine.devices)
    out = {"device_kind": engine.devices[0].device_kind, "devices": devices}
    if window.nonces:
        seconds = ended - window.started
        rate = window.nonces / seconds
        tflops = rate * req.params.flops_per_nonce() / devices / 1e12
        out |= {"window_nonces": window.nonces, "window_seconds": round(seconds, 3),
                "window_nonces_per_s": round(rate, 3), "tflops_per_device": round(tflops, 2),
                **readings.fields(window.nonces)}
    else:
        tflops = None
        out |= {"window_nonces": 0, "window_seconds": None, "window_nonces_per_s": None, "tflops_per_device": None,
                **telemetry.unavailable(sampler.unavailable or "one step: no window after the first")}

    if sustained_seconds > 0 and job.stop_reason is None and reason != "error":
        job.phase = "sustained probe"
        try:
            ceiling = await job.call(sustained.ceiling, engine.devices, sustained_seconds)
        except Exception as e:  # noqa: BLE001 — the job noted a device failure; the answer keeps the search's
            log.warning("job %s: sustained probe failed: %s: %s", job.id, type(e).__name__, e)
            ceiling = {"sustained_tflops": None, "sustained_seconds": sustained_seconds,
                       "sustained_unavailable": f"{type(e).__name__}: {e}"}
    else:
        ceiling = {"sustained_tflops": None, "sustained_seconds": sustained_seconds,
                   "sustained_unavailable": "not measured" if sustained_seconds <= 0 else f"the search ended: {reason}"}
    out |= {**ceiling, "percent_of_sustained": sustained.percent_of_sustained(tflops, ceiling["sustained_tflops"])}
    job.phase = "done"
    await chan.emit({**job.summary, **out})
