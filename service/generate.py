"""/generate and /benchmark: a search streamed as docs/protocol.md §1.4 result lines, ended by a summary line.

The lines and counts come from `jaxbench.results.SearchTally` (every computed nonce is counted,
also in batches with no valid nonce). Summary reasons: "completed" (max_nonces reached),
"nonce_space_end" (the node's last nonce below 2**63 computed: jaxbench/nonces.py),
"duration" (duration_s elapsed), "shutdown" (SIGTERM), "disconnected" (the client went away; only
/health's `last_job` sees it), "error" (after an error line).
"""

from __future__ import annotations

import logging
from typing import Callable

from jaxbench.job import StepResult
from jaxbench.results import SearchTally

from .context import Context
from .jobs import Job, LineChannel
from .outcome import Outcome, error_line
from .requests import GenerateRequest

log = logging.getLogger("service.generate")


async def run_generation(ctx: Context, job: Job, chan: LineChannel, req: GenerateRequest,
                         emit_results: bool = True, on_step: Callable[[StepResult], None] | None = None) -> Outcome:
    """Run the search, emitting result lines (and an error line on failure). The outcome's error
    is "generation failed" after an error, "stopped (<reason>)" when the job was stopped. The
    caller emits the summary. `on_step` sees each step as it is counted."""
    sjob = req.search_job()
    outcome = Outcome(SearchTally(sjob, block_height=req.block_height), screen=req.screen)
    job.phase = "computing"
    job.detail.update({"block_hash": req.block_hash[:16], "public_key": req.public_key[:16],
                       "start_nonce": req.start_nonce, "max_nonces": req.max_nonces})
    screened = None if req.screen is None else req.screen.search(ctx.engine, sjob, outcome.screened)
    run = job.search(sjob, screened=screened)
    said = outcome.line_fields()
    try:
        async for step in run:
            lines = outcome.tally.add(step)
            if on_step is not None:
                on_step(step)
            if emit_results:
                for line in lines:
                    await chan.emit({**line, **said})
    except Exception as e:  # noqa: BLE001 — reported as a line; the stream still ends with its summary
        log.warning("job %s: search failed: %s: %s", job.id, type(e).__name__, e)
        await chan.emit(error_line(e))
        outcome.fail("error", "generation failed")
        return outcome
    finally:
        run.stop.set()
    if job.stop_reason:
        outcome.fail(job.stop_reason, f"stopped ({job.stop_reason})")
    else:
        outcome.reason = outcome.tally.end_reason(False)
    return outcome


async def generate_driver(ctx: Context, job: Job, chan: LineChannel, req: GenerateRequest,
                          emit_results: bool = True) -> None:
    outcome = await run_generation(ctx, job, chan, req, emit_results)
    job.summary = outcome.summary()
    if req.ignored_fields:
        job.summary["ignored_fields"] = list(req.ignored_fields)
    job.phase = "done"
    await chan.emit(job.summary)
