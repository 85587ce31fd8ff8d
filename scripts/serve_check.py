"""Measure the model server end to end: time from request to first result line, and served nonces/s.

    python scripts/serve_check.py --params bench --seconds 30 [--requests 2] [--port 18123]

Starts `python -m service` on 127.0.0.1, waits for its ready line, sends /generate requests one after
another (the first builds the weights and compiles, later ones reuse both), prints one JSON object
per request and stops the server with SIGTERM.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.signals import READY_LINE  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="bench")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--port", type=int, default=18123)
    ap.add_argument("--r-target", type=float, default=1.4013564660458173)
    args = ap.parse_args()

    log = Path(tempfile.mkdtemp()) / "server.log"
    env = {**os.environ, "MODEL_SERVER_HOST": "127.0.0.1", "MODEL_SERVER_PORT": str(args.port),
           "MODEL_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    server = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while READY_LINE not in (log.read_text() if log.exists() else ""):
            if server.poll() is not None or time.monotonic() - t0 > 300:
                print(log.read_text() if log.exists() else "no log", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(json.dumps({"server_ready_seconds": round(time.monotonic() - t0, 2)}), flush=True)
        body = {"block_hash": "serve-check-" + "ab" * 26, "block_height": 1, "public_key": "serve-check",
                "r_target": args.r_target, "batch_size": 1, "start_nonce": 0, "params": args.params,
                "duration_s": args.seconds}
        for i in range(args.requests):
            sent = time.monotonic()
            first = None
            lines = 0
            with httpx.stream("POST", f"http://127.0.0.1:{args.port}/generate", json=body, timeout=None) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if "nonces" in item and first is None:
                        first = time.monotonic() - sent
                    lines += 1
                    summary = item
            print(json.dumps({"request": i + 1, "first_result_line_seconds": round(first, 2) if first else None,
                              "lines": lines, "wall_seconds": round(time.monotonic() - sent, 2), **summary}),
                  flush=True)
            body["start_nonce"] += summary["total_computed"]  # fresh nonces for the next request
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
