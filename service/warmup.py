"""/warmup (docs/protocol.md §2), streamed live, with the predecessor's bugs fixed.

Lines, in order:
1. `{"status": "warmup_ready", "job_id"}` at once.
2. If the request carries `params` (and optionally `block_hash`, `dtype`): `{"status": "compiling"}`,
   then `{"status": "compiled", "seconds", "batch", "devices", "cached"}`: the step is compiled (it
   depends on the shapes only) and, when `block_hash` is given, the weights are built, while the
   MLNode is not ready yet.
3. Polls of `GET {callback_url}/warmup/params?job_id=…` every `poll_interval_s`: while not ready
   `{"status": "warmup_waiting", "poll_count", "elapsed"}`; "ready" means HTTP 2xx and a JSON object
   with `status == "ready"`; its `params` object is the whole /generate input, validated like one,
   parameter set fitting the devices included (a bad field is an error line naming it, with
   `"source": "callback"`). After `timeout_s`: `{"status": "warmup_timeout", "elapsed"}`; a poll
   never runs past it (each poll's deadline is the smaller of `http_timeout_s` and what is left).
4. With the input: `{"status": "warmup_params_received", "elapsed"}`, `compiling`/`compiled` (cached,
   near 0 s, when step 2 already compiled these params), then the generation's result lines.
5. `POST {callback_url}/warmup/complete` with `{"job_id", "total_batches", "total_computed",
   "total_valid", "reason"}` and an `error` field when the warmup failed: sent on every exit (timeout,
   error, client disconnect, shutdown), before the last line; up to 3 attempts, all within one
   `http_timeout_s` (less while the server drains).
A client that leaves stops the job in any phase: a poll in flight is abandoned, a compilation in
flight finishes (it cannot be interrupted) and nothing follows it but the completion callback.
6. The summary line `{"status": "done", "reason", …, "callback": "sent"|"failed"}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from jaxbench.backoff import Backoff
from jaxbench.params import Params
from jaxbench.results import SearchTally

from . import peers
from . import requests as rq
from .context import Context
from .generate import run_generation
from .jobs import Job, LineChannel
from .outcome import Outcome, error_line

log = logging.getLogger("service.warmup")

COMPLETE_ATTEMPTS = 3


async def warmup_driver(ctx: Context, job: Job, chan: LineChannel, req: rq.WarmupRequest) -> None:
    job.detail.update({"job_id": req.job_id, "callback_url": rq.url_origin(req.callback_url)})
    await chan.emit({"status": "warmup_ready", "job_id": req.job_id})
    outcome = Outcome(SearchTally(None))  # replaced by the generation's
    try:
        if req.params is not None:
            await compile_step(ctx, job, chan, req.params, req.block_hash, req.dtype)
        gen = await wait_for_input(ctx, job, chan, req, outcome)
        if gen is not None:
            await compile_step(ctx, job, chan, gen.params, gen.block_hash, gen.dtype)
            outcome = await run_generation(ctx, job, chan, gen)
    except Exception as e:  # noqa: BLE001 — an error line, then the callback and the summary
        log.warning("warmup %s: failed: %s: %s", req.job_id, type(e).__name__, e)
        await chan.emit(error_line(e))
        outcome.fail("error", f"{type(e).__name__}: {e}")
    await complete(ctx, job, chan, req, outcome)


async def compile_step(ctx: Context, job: Job, chan: LineChannel, params: Params, block_hash: str | None,
                       dtype: str) -> dict:
    job.phase = "compiling"
    await chan.emit({"status": "compiling", "dtype": dtype})
    info = await job.call(ctx.batches.prepare, params, block_hash, dtype)
    await chan.emit({"status": "compiled", **info})
    return info


async def wait_for_input(ctx: Context, job: Job, chan: LineChannel, req: rq.WarmupRequest,
                         outcome: Outcome) -> rq.GenerateRequest | None:
    """Poll the callback until it has the generation input (returned, checked); None when the job
    stopped, the wait timed out or the input is bad, the outcome saying which."""
    job.phase = "waiting_params"
    start = time.monotonic()
    deadline = start + req.timeout_s
    polls = 0
    while True:
        if job.stop_reason:
            outcome.fail(job.stop_reason, f"stopped ({job.stop_reason}) while waiting for params")
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            elapsed = time.monotonic() - start
            await chan.emit({"status": "warmup_timeout", "elapsed": int(elapsed)})
            outcome.fail("warmup_timeout", f"no params after {int(elapsed)} s")
            return None
        data = await fetch_params(ctx, job, req, min(req.http_timeout_s, left))
        if job.stop_reason:
            continue
        if data is not _NOT_READY:
            await chan.emit({"status": "warmup_params_received", "elapsed": int(time.monotonic() - start)})
            try:
                return generation_input(ctx, data)
            except rq.FieldError as e:
                log.warning("warmup %s: bad generation input from the callback: %s", req.job_id, e)
                await chan.emit({**error_line(e), "source": "callback"})
                outcome.fail("error", str(e))
                return None
        polls += 1
        await chan.emit({"status": "warmup_waiting", "poll_count": polls, "elapsed": int(time.monotonic() - start)})
        if polls == 1 or polls % 12 == 0:
            log.info("warmup %s: waiting for params (poll %d)", req.job_id, polls)
        await job.sleep(min(req.poll_interval_s, max(0.0, deadline - time.monotonic())))


_NOT_READY = object()


async def fetch_params(ctx: Context, job: Job, req: rq.WarmupRequest, timeout: float) -> Any:
    """The ready answer's `params` (the generation input, unchecked) if the MLNode has it ready,
    else _NOT_READY (also when the job stopped)."""
    url = req.callback_url + "/warmup/params"
    answer = await peers.call(ctx.http, "GET", url, params={"job_id": req.job_id}, timeout=timeout,
                              max_bytes=ctx.settings.max_body_bytes, stop=job.stopped)
    if answer.stopped:
        return _NOT_READY
    body = answer.json_object()
    if body is None:
        log.warning("warmup %s: polling the callback failed: %s", req.job_id, answer.describe())
        return _NOT_READY
    if body.get("status") != "ready":
        return _NOT_READY
    return body.get("params")


def generation_input(ctx: Context, data: Any) -> rq.GenerateRequest:
    """The callback's generation input, checked like a /generate body, its parameter set against
    the devices' memory and its screen against what they can run."""
    if not isinstance(data, dict):
        raise rq.FieldError("params", "the callback's ready answer must carry a `params` object")
    gen = rq.generate_request(data, ctx.settings, route="/warmup: the callback's generation input")
    ctx.engine.check_fits(gen.params, gen.dtype)
    if gen.screen is not None:
        gen.screen.check(ctx.engine)
    return gen


async def complete(ctx: Context, job: Job, chan: LineChannel, req: rq.WarmupRequest, outcome: Outcome) -> None:
    """The completion callback, then the summary line."""
    job.phase = "completing"
    sent = await post_complete(ctx, job, req, completion(req, outcome))
    job.summary = {**outcome.summary(), "callback": "sent" if sent else "failed"}
    job.phase = "done"
    await chan.emit(job.summary)


def completion(req: rq.WarmupRequest, outcome: Outcome) -> dict:
    payload = {
        "job_id": req.job_id,
        "total_batches": outcome.tally.lines_emitted,
        "total_computed": outcome.tally.total_computed,
        "total_valid": outcome.tally.total_valid,
        "reason": outcome.reason,
    }
    if outcome.error is not None:
        payload["error"] = outcome.error
    return payload


async def post_complete(ctx: Context, job: Job, req: rq.WarmupRequest, payload: dict) -> bool:
    """The completion callback: a few attempts, all within one goodbye budget."""
    url = req.callback_url + "/warmup/complete"
    budget = peers.Budget(job.goodbye_budget(req.http_timeout_s))
    backoff = Backoff(ctx.settings.retry_base_s, ctx.settings.retry_max_s)
    for failures in range(1, COMPLETE_ATTEMPTS + 1):
        answer = await peers.call(ctx.http, "POST", url, json=payload, timeout=budget.left(req.http_timeout_s),
                                  max_bytes=ctx.settings.max_body_bytes, parse=False)
        if answer.delivered:
            log.info("warmup %s: completion sent (%s)", req.job_id, payload.get("reason"))
            return True
        log.warning("warmup %s: completion callback failed: %s", req.job_id, answer.describe())
        pause = budget.retry_pause(backoff, failures, COMPLETE_ATTEMPTS)
        if pause is None:
            break
        await asyncio.sleep(pause)
    return False
