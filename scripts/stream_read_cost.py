"""What reading NDJSON result lines costs the client's stack alone: aiohttp on uvloop, no fleet beside it.

    python scripts/stream_read_cost.py [--streams 500] [--lines 30] [--gap 0.5]

Starts an aiohttp server in a subprocess that streams `--lines` result lines (one write each, of the
size a worker's line has) `--gap` seconds apart on every request, then opens `--streams` requests at
once from this process and reads them with `readany()`, once only counting the lines and once also
parsing each with `json.loads`. Prints the client's CPU time per line for each. The fleet simulation
(scripts/fleet_bench.py) measures the same reads among 500 simulated workers on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

LINE = json.dumps({
    "block_hash": "b" * 64, "block_height": 0, "public_key": "k" * 64, "nonces": [123456789], "dist": [1.3000123],
    "node_id": 0, "n_nodes": 1, "worker_id": 3, "batch_number": 5, "batch_size": 64, "batch_valid": 1,
    "worker_computed": 4096, "worker_valid": 3, "elapsed": 12.5, "next_nonce": 123456797,
    "aggregated_batch_number": 7, "aggregated_total_computed": 32768, "aggregated_total_valid": 9, "n_workers": 8,
}) + "\n"

SERVER = """
import asyncio, sys
from aiohttp import web
LINE = sys.argv[2].encode()
async def lines(request):
    n, gap = int(request.query["n"]), float(request.query["gap"])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for _ in range(n):
        await asyncio.sleep(gap)
        await response.write(LINE)
    await response.write(b'{"status": "done"}\\n')
    await response.write_eof()
    return response
app = web.Application()
app.router.add_get("/lines", lines)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def read(session, url: str, parse: bool) -> int:
    count, partial = 0, b""
    async with session.get(url) as response:
        while chunk := await response.content.readany():
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                if parse:
                    json.loads(line)
                count += 1
    return count


async def measure(port: int, streams: int, lines: int, gap: float, parse: bool) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/lines?n={lines}&gap={gap}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams + 16)) as session:
        cpu, wall = time.process_time(), time.monotonic()
        counts = await asyncio.gather(*(read(session, url, parse) for _ in range(streams)))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    n = sum(counts)
    return {"parse": parse, "streams": streams, "lines": n, "cpu_s": round(cpu, 3),
            "cpu_us_per_line": round(cpu / n * 1e6, 1), "wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--lines", type=int, default=30, help="result lines per stream")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between a stream's lines")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.port), LINE])
    try:
        time.sleep(2.0)  # the server's start-up
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        for parse in (False, True):
            print(json.dumps(run(measure(args.port, args.streams, args.lines, args.gap, parse))), flush=True)
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
