"""/generate and /benchmark: a search streamed as docs/protocol.md §1.4 result lines, ended by a summary line.

The lines and counts come from `jaxbench.results.SearchTally` (every computed nonce is counted,
also in batches with no valid nonce). Summary reasons: "completed" (max_nonces reached),
"nonce_space_end" (the node's last nonce below 2**63 computed: jaxbench/nonces.py),
"duration" (duration_s elapsed), "shutdown" (SIGTERM), "disconnected" (the client went away; only
/health's `last_job` sees it), "error" (after an error line).
"""

from __future__ import annotations

import logging

from jaxbench.results import SearchTally

from .jobs import Job, LineChannel, error_line
from .requests import GenerateRequest

log = logging.getLogger("service.generate")


async def run_generation(job: Job, chan: LineChannel, req: GenerateRequest,
                         emit_results: bool = True) -> tuple[SearchTally, str]:
    """Run the search, emitting result lines (and an error line on failure); returns the tally and
    the summary reason. The caller emits the summary."""
    sjob = req.search_job()
    tally = SearchTally(sjob, job.manager.engine.n_groups, req.block_height)
    job.phase = "computing"
    job.detail.update({"block_hash": req.block_hash[:16], "public_key": req.public_key[:16],
                       "start_nonce": req.start_nonce, "max_nonces": req.max_nonces})
    run = job.search(sjob)
    try:
        async for step in run:
            lines = tally.add(step)
            if emit_results:
                for line in lines:
                    await chan.emit(line)
    except Exception as e:  # noqa: BLE001 — reported as a line; the stream still ends with its summary
        log.warning("job %s: search failed: %s: %s", job.id, type(e).__name__, e)
        await chan.emit(error_line(e))
        return tally, "error"
    finally:
        run.stop.set()
    return tally, job.stop_reason or sjob.schedule.end_reason(tally.end_reason(False))


async def generate_driver(job: Job, chan: LineChannel, req: GenerateRequest, emit_results: bool = True) -> None:
    tally, reason = await run_generation(job, chan, req, emit_results)
    job.summary = tally.summary(reason)
    job.phase = "done"
    await chan.emit(job.summary)
