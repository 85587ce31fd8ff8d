"""`python -m service`: logging, the one Engine, hypercorn, the ready line and graceful shutdown.

Start: settings from the environment (config.py) → logging (MODEL_LOG truncated) → Engine (imports
JAX, finds the devices) and a tiny computation on every device → hypercorn binds → once the port
accepts connections, `signals.READY_LINE` is logged, exactly once. A failure on the way logs
`signals.FATAL_MARKER` and exits with status 1.

SIGTERM / SIGINT: new jobs are refused (503), the running job is stopped with reason "shutdown" (its
stream ends with its summary line, a pooled session notifies the orchestrator, a warmup sends its
completion callback, each within what is left of the drain); once it has ended hypercorn stops,
answers still being written get MODEL_GRACEFUL_TIMEOUT_S (or what is left of the drain), every
connection still open is then closed (service/transport.py), and the process exits 0, within
MODEL_DRAIN_TIMEOUT_S of the signal in all, whatever the clients do. A second signal exits at once
(status 1); so does a process still alive EXIT_GRACE_S after the drain's deadline (a backstop: a
thread, not the event loop, enforces it). The drain does not rely on hypercorn's graceful_timeout,
which Python ≥ 3.12 does not honour while a stream is open.

Which devices: MODEL_PLATFORM=gpu (the default, and the image's) makes a missing or failing GPU
fatal at start, with JAX's reason on the fatal line; `cpu` computes on the CPU (local tests),
`any` on whatever JAX finds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time

from jaxbench.backend_probes import quiet_backend_probes

from . import config, signals, transport
from .config import DRAIN_MARGIN_S
from .logsetup import log_fatal, log_ready, setup_logging

log = logging.getLogger("service")

READY_WAIT_S = 60.0
EXIT_GRACE_S = 5.0
GPU_BACKENDS = ("cuda", "rocm")  # JAX's GPU plugins, whose start-up errors say why there is no GPU


class NoUsableDevice(RuntimeError):
    pass


def platform_devices(platform: str, count: int | None):
    """The devices to compute on (MODEL_PLATFORM, MODEL_DEVICES); NoUsableDevice says why there are none."""
    import jax

    if platform == "any":
        devices = jax.devices()
    else:
        try:
            devices = jax.devices(platform)
        except RuntimeError as e:  # no such backend: JAX fell back to the CPU, or JAX_PLATFORMS left it out
            why = str(e)
            try:  # why JAX fell back (cuInit's error, say), which it keeps only in a private record
                from jax._src import xla_bridge

                why += "".join(f"; {name}: {err}" for name, err in getattr(xla_bridge, "_backend_errors", {}).items()
                               if name in GPU_BACKENDS)
            except ImportError:
                pass
            hint = " (MODEL_PLATFORM=cpu computes on the CPU)" if platform == "gpu" else ""
            raise NoUsableDevice(f"no usable {platform.upper()}: {why}{hint}") from None
    if count is not None:
        if count > len(devices):
            raise NoUsableDevice(f"MODEL_DEVICES={count}, but there are {len(devices)} {devices[0].platform} device(s)")
        devices = devices[:count]
    return devices


def create_engine(settings: config.Settings):
    import jax
    import jax.numpy as jnp

    from jaxbench.engine import Engine

    engine = Engine(devices=platform_devices(settings.platform, settings.devices), draws_mode=settings.draws,
                    group_size=settings.group_size, device_memory=settings.device_memory)
    # A tiny computation on every device: a device that can't run fails here, not in the first job.
    double_sum = jax.jit(lambda v: (v * 2).sum())
    for device in engine.devices:
        total = float(jax.block_until_ready(double_sum(jax.device_put(jnp.arange(8, dtype=jnp.float32), device))))
        if total != 56.0:
            raise RuntimeError(f"device self-test gave {total} on {device}")
    return engine


def _probe_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


async def _wait_serving(host: str, port: int, instance: str, serve_task: asyncio.Task) -> bool:
    """True once this process's app answers /health on the port (not just anything listening there)."""
    import httpx

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/health"
    deadline = time.monotonic() + READY_WAIT_S
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline and not serve_task.done():
            try:
                r = await client.get(url)
                if r.json().get("instance") == instance:
                    return True
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            await asyncio.sleep(0.05)
    return False


async def serve(app, settings: config.Settings) -> int:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    manager = app.extensions["jobs"]
    connections = transport.install(settings.max_connections, settings.client_stall_s)
    app.extensions["connections"] = connections
    cfg = Config()
    cfg.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"]
    cfg.graceful_timeout = settings.graceful_timeout_s
    cfg.keep_alive_timeout = settings.idle_timeout_s
    cfg.h11_max_incomplete_size = transport.MAX_HEAD_BYTES
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.accesslog = logging.getLogger("hypercorn.access") if settings.access_log else None
    loop = asyncio.get_running_loop()
    stop_serving = asyncio.Event()

    async def drain_then_stop(deadline: float):
        if not await manager.wait_idle(deadline - DRAIN_MARGIN_S - time.monotonic()):
            log.warning("the running job did not end within %.0f s; stopping anyway", settings.drain_timeout_s)
        stop_serving.set()

    def on_signal(name: str):
        if manager.draining:
            exit_now(f"{name} again: exiting now")
        log.info("%s: draining (refusing new jobs, ending the running one)", name)
        deadline = time.monotonic() + settings.drain_timeout_s
        manager.begin_drain(deadline)
        loop.create_task(drain_then_stop(deadline))
        backstop = threading.Timer(settings.drain_timeout_s + EXIT_GRACE_S, exit_now,
                                   (f"still running {EXIT_GRACE_S:.0f} s after the drain's deadline: exiting now",))
        backstop.daemon = True
        backstop.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    serve_task = loop.create_task(hypercorn_serve(app, cfg, shutdown_trigger=stop_serving.wait))
    watcher = loop.create_task(connections.watch())
    listening = await _wait_serving(_probe_host(settings.host), settings.port, manager.instance, serve_task)
    if serve_task.done():
        exc = serve_task.exception()
        log_fatal(signals.SERVER_DID_NOT_START, "%s", f"{type(exc).__name__}: {exc}" if exc else "it stopped")
        return 1
    if not listening:
        log_fatal(signals.SERVER_NOT_LISTENING, "none on port %d within %.0f s", settings.port, READY_WAIT_S)
        stop_serving.set()
        await asyncio.wait({serve_task}, timeout=settings.graceful_timeout_s + 5)
        return 1
    log_ready()
    waiter = loop.create_task(stop_serving.wait())
    await asyncio.wait({serve_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    # Answers still being written get the graceful timeout, within what is left of the drain; then
    # every connection is closed, whatever its client does, and hypercorn's end does not wait on it.
    left = settings.graceful_timeout_s + DRAIN_MARGIN_S
    if manager.drain_deadline is not None:
        left = manager.drain_deadline - time.monotonic()
    grace = max(0.0, min(settings.graceful_timeout_s, left - DRAIN_MARGIN_S))
    closer = loop.call_later(grace, connections.abort_all)
    try:
        await asyncio.wait_for(asyncio.shield(serve_task), grace + DRAIN_MARGIN_S)
    except asyncio.TimeoutError:
        log.warning("hypercorn did not stop in time; exiting anyway")
        serve_task.cancel()
    except Exception as e:  # noqa: BLE001
        log_fatal(signals.SERVER_FAILED, "%s: %s", type(e).__name__, e)
        return 1
    finally:
        closer.cancel()
        watcher.cancel()
    log.info("stopped")
    return 0


def exit_now(why: str) -> None:
    """Log `why`, flush the log, and end the process at once with status 1 (from any thread)."""
    log.warning("%s", why)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 — exiting regardless
            pass
    os._exit(1)


def main() -> int:
    try:
        settings = config.Settings.from_env()
    except config.SettingsError as e:
        try:
            setup_logging(os.environ.get("MODEL_LOG") or config.Settings.log_path)
        except OSError:
            setup_logging("")
        log_fatal(signals.BAD_CONFIGURATION, "%s", e)
        return 2
    try:
        setup_logging(settings.log_path, settings.log_level)
    except OSError as e:
        setup_logging("", settings.log_level)  # stdout only
        log_fatal(signals.LOG_NOT_WRITABLE, "%s: %s", settings.log_path, e)
        return 1
    log.info("starting the model server on %s:%d (pid %d, Python %s)", settings.host, settings.port, os.getpid(),
             sys.version.split()[0])
    quiet_backend_probes()
    try:
        engine = create_engine(settings)
    except NoUsableDevice as e:
        log_fatal(signals.NO_USABLE_DEVICE, "%s", e)
        return 1
    except Exception as e:  # noqa: BLE001
        log.exception("engine start failed")
        log_fatal(signals.NO_USABLE_DEVICE, "%s: %s", type(e).__name__, e)
        return 1
    groups = engine.groups()["group_size"]
    log.info("engine: %d device(s) %s in group(s) of %s, %s draws", len(engine.devices),
             ", ".join(sorted({d["kind"] for d in engine.describe()})),
             "a size chosen per parameter set" if groups == "auto" else groups, engine.draws_mode)
    try:
        from .app import create_app

        return asyncio.run(serve(create_app(engine, settings), settings))
    except Exception as e:  # noqa: BLE001 — whatever stops the server must reach the PyWorker's log watch
        log.exception("the server failed")
        log_fatal(signals.SERVER_FAILED, "%s: %s", type(e).__name__, e)
        return 1
    finally:
        engine.close()
