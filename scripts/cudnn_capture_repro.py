"""Try to reproduce, in a loop, the cuDNN failure that once ended a search on an H200 (GPU only).

The failure: a `mainnet` search (batch 64, the FFN on XLA, compile cache off, inputs drawn on the
device) died in its step with `JaxRuntimeError: INTERNAL: detail::cuda_graph_end_capture … capturing
stream has unjoined work`, raised while cuDNN deserialised a graph inside `jit_per_device`; the same
settings passed on the next three runs. XLA replays parts of a step as CUDA graphs ("command
buffers") recorded by stream capture, and a cuDNN graph that sets itself up on another stream while
it is being captured leaves the capture unjoined.

Which kinds of work XLA captures is its flag `--xla_gpu_enable_command_buffer`: a comma-separated
list of FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN, DYNAMIC_SLICE_FUSION, … (`+KIND` or `-KIND`
edits XLA's default list instead; an empty value turns capture off). cuDNN's work, the fused attention
among it, is captured only with CUDNN in the list. jaxbench/__init__.py sets FUSION,CUBLAS,CUBLASLT
unless XLA_FLAGS already names the flag. `--variants` runs the search under these settings in turn:

  package      jaxbench's own setting, as the failing run had it
  xla-default  XLA's default list, CUDNN in it ("+CUDNN")
  no-cudnn     XLA's default list without CUDNN ("-CUDNN")
  off          no command buffers ("")

Each run is `python -m jaxbench search` in a fresh process (a fresh process deserialises the cuDNN
graphs again), for `--steps` steps; no run starts that would, at the pace of the longest run so far,
end after `--budget-s` (each is killed after `--run-timeout-s`). After every run the results so far
go to `$OUT/cudnn_capture_repro.json` (or `--out`): each run's settings, exit status, time, summary
line, the last lines of its stderr and whether the failure's signature was in them; per variant, the
runs and reproductions; and the versions of JAX, cuBLAS and cuDNN with the cards' compute capability.

    python scripts/cudnn_capture_repro.py [--budget-s 300] [--variants package] [--params mainnet]
        [--batch 64] [--steps 4] [--draws device] [--ffn xla]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAG = "xla_gpu_enable_command_buffer"
VARIANTS = {"package": None, "xla-default": "+CUDNN", "no-cudnn": "-CUDNN", "off": ""}
SIGNATURE = re.compile(r"unjoined|cuda_graph_end_capture|STREAM_CAPTURE", re.IGNORECASE)
STDERR_LINES = 25

# Run in a child process, so that this one never holds the GPU: the versions the failure depends on.
VERSIONS_PROBE = r"""
import importlib, importlib.metadata, json
import jax
out = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "platform": jax.default_backend(),
       "devices": [d.device_kind for d in jax.devices()],
       "compute_capability": [getattr(d, "compute_capability", None) for d in jax.devices()]}
for plugin in ("jax_cuda13_plugin", "jax_cuda12_plugin"):
    try:
        versions = importlib.import_module(plugin + "._versions")
    except ImportError:
        continue
    out["cuda_plugin"] = plugin
    for name in ("cublas_get_version", "cudnn_get_version", "cuda_runtime_get_version"):
        try:
            out[name.replace("_get_version", "")] = getattr(versions, name)()
        except Exception as e:  # a library that cannot be loaded is worth knowing too
            out[name.replace("_get_version", "")] = f"{type(e).__name__}: {e}"
    break
print(json.dumps(out))
"""
# What XLA_FLAGS a jaxbench process ends up with (jaxbench/__init__.py may add the flag).
FLAGS_PROBE = "import os, jaxbench; print(os.environ.get('XLA_FLAGS', ''))"


def variant_env(variant: str, ffn: str) -> dict[str, str]:
    """The environment of a run: XLA_FLAGS without any command-buffer setting, then the variant's."""
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if FLAG not in f]
    setting = VARIANTS[variant]
    flags = inherited + ([] if setting is None else [f"--{FLAG}={setting}"])
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAXBENCH_FFN": ffn,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def probe(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env={**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return done.stdout.strip() if done.returncode == 0 else f"probe failed: {done.stderr.strip()[-500:]}"


def run_search(args, variant: str, env: dict[str, str], timeout: float) -> dict:
    block_hash = secrets.token_hex(32)  # new weights each run, as a new block would bring
    command = [sys.executable, "-m", "jaxbench", "search", "--params", args.params, "--block-hash", block_hash,
               "--public-key", "cudnn-capture-repro", "--batch", str(args.batch), "--cache-dir", "",
               "--draws", args.draws, "--max-nonces", str(args.batch * args.steps), "--out", "-"]
    t0 = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        status, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    summary = None
    for line in reversed(stdout.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("status") == "done":
            summary = obj
            break
    return {
        "variant": variant,
        "block_hash": block_hash,
        "exit_status": status,
        "seconds": round(time.monotonic() - t0, 1),
        "summary": summary,
        "reproduced": bool(SIGNATURE.search(stderr) or SIGNATURE.search(stdout)),
        "stderr_tail": stderr.splitlines()[-STDERR_LINES:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no run that would end after this")
    ap.add_argument("--run-timeout-s", type=float, default=240.0, help="longest one run may take")
    ap.add_argument("--variants", default="package", help=f"comma-separated, run in turn: {', '.join(VARIANTS)}")
    ap.add_argument("--params", default="mainnet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the failure came in the first)")
    ap.add_argument("--draws", default="device", choices=("device", "host", "auto"))
    ap.add_argument("--ffn", default="xla", choices=("xla", "pallas"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "cudnn_capture_repro.json")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"--variants: {', '.join(unknown) or 'none given'}; choose from {', '.join(VARIANTS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    envs = {v: variant_env(v, args.ffn) for v in variants}
    report = {
        "script": "scripts/cudnn_capture_repro.py",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "environment": json.loads(raw) if (raw := probe(VERSIONS_PROBE, envs[variants[0]])).startswith("{") else raw,
        "variants": {v: {"xla_flags": probe(FLAGS_PROBE, envs[v]), "runs": 0, "reproduced": 0, "other_failures": 0}
                     for v in variants},
        "runs": [],
    }
    deadline = time.monotonic() + args.budget_s
    for variant in itertools.cycle(variants):
        longest = max((r["seconds"] for r in report["runs"]), default=0.0)
        if deadline - time.monotonic() < longest or time.monotonic() >= deadline:
            break
        run = run_search(args, variant, envs[variant], args.run_timeout_s)
        report["runs"].append(run)
        tally = report["variants"][variant]
        tally["runs"] += 1
        tally["reproduced"] += run["reproduced"]
        tally["other_failures"] += run["exit_status"] != 0 and not run["reproduced"]
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({k: run[k] for k in ("variant", "exit_status", "seconds", "reproduced")}), flush=True)
    print(json.dumps({"variants": report["variants"], "out": str(args.out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
