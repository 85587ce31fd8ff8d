"""The remote search's client against a simulated fleet in virtual time: the plan's requests, backups
and end in seconds instead of minutes, and the same answer every run.

    python scripts/fleet_sim.py [--scenario scale|killed|slow] [--seconds S] [--seeds 1,2,3]

The real `RemoteSearch` (runner.py, plan.py, workers.py, stream.py) runs on an event loop whose clock
jumps to its next timer instead of waiting (the client's blocking holds move it too). The router and
the workers are models: the autoscaler answers one route call at a time in ROUTE_S and sends it to
the worker with the fewest open requests (ties at random), as tests/vast_helpers.py's FakeVast does;
a worker runs its requests one at a time, as tests/fleet.py's fake does (a start, a weight load at its
first request, a step of groups × 64 nonces every 0.5 s, the same result lines and summary, its lines'
`elapsed_seconds` by its own clock). The scenarios are fleet_bench.py's. Prints one JSON object a run.

Network and CPU cost nothing here, so this measures the plan (requests, backups, the search's end),
not the client's CPU: fleet_bench.py measures both, on real sockets. Where the two were compared
(docs/benchmarks.md), the simulation's requests and ratio were a few percent below the bench's: on
real sockets the first wave takes longer, the workers' steps run late on a loaded machine, and the
client's holds delay what it sees.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import selectors
import sys
import time as real_time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fleet import fake_distances, r_target_for  # noqa: E402

from jaxbench.job import GroupResult, StepResult  # noqa: E402
from jaxbench.nonces import device_major  # noqa: E402
from jaxbench.params import params_from_text  # noqa: E402
from jaxbench import results as results_module  # noqa: E402
from jaxbench.remote import plan as plan_module, runner as runner_module, workers as workers_module  # noqa: E402
from jaxbench.remote.runner import RemoteSearch  # noqa: E402
from jaxbench.remote.search import Search  # noqa: E402
from jaxbench.results import SearchTally  # noqa: E402
from service.config import Settings  # noqa: E402
from service.requests import generate_request, parse_json  # noqa: E402

ROUTE_S = 0.002  # the autoscaler's time for one route call (they queue)
POST_S = 0.003  # a post's way to its worker
VAST_NOTICE_S = 2.0  # the autoscaler routes to a dead worker this long
GROUPS = (1, 2, 4, 8)
POST_INIT = plan_module.Running.__post_init__


class Clock:
    """Virtual time, as the `time` module the client's modules see."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:  # a blocking sleep holds the loop: time passes
        self.now += max(0.0, seconds)

    def perf_counter(self) -> float:
        return self.now


class VirtualSelector(selectors.BaseSelector):
    """Nothing to wait for but timers: a wait is a jump of the clock."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._map: dict = {}

    def register(self, fileobj, events, data=None):
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int) else fileobj.fileno(), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj):
        return self._map.pop(fileobj)

    def modify(self, fileobj, events, data=None):
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("the simulation waits for nothing: deadlock")
        self.clock.now += timeout
        return []

    def get_map(self):
        return self._map

    def close(self):
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: Clock):
        self.clock = clock
        super().__init__(VirtualSelector(clock))

    def time(self) -> float:
        return self.clock.now


@dataclasses.dataclass
class SimWorker:
    index: int
    groups: int
    url: str
    step_s: float = 0.5
    start_s: float = 0.05
    load_s: float = 1.0
    slow_start_s: float = 0.0
    busy: bool = False  # answers 429
    dies_at: float | None = None
    loaded: bool = False
    requests: int = 0
    open: int = 0
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def rate(self) -> float:
        return self.groups * 64 / self.step_s


class Stream:
    """A request's lines as `Lines` yields them; closing it is the client leaving."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self):
        self.closed = True


class SimRouter:
    def __init__(self, workers: list[SimWorker], clock: Clock, seed: int, valid_fraction: float, start: float):
        self.workers = {w.url: w for w in workers}
        self.clock = clock
        self.rng = random.Random(seed)
        self.r_target = r_target_for(valid_fraction)
        self.start = start
        self._free_at = 0.0
        self.routes = 0

    async def route(self, cost) -> dict:
        now = self.clock.now
        self._free_at = max(self._free_at, now) + ROUTE_S
        await asyncio.sleep(self._free_at - now)
        self.routes += 1
        alive = [w for w in self.workers.values()
                 if w.dies_at is None or self.clock.now < self.start + w.dies_at + VAST_NOTICE_S]
        fewest = min(w.open for w in alive)
        worker = self.rng.choice([w for w in alive if w.open == fewest])
        worker.open += 1
        return {"url": worker.url}

    async def open(self, auth: dict, route: str, payload: dict) -> dict:
        worker = self.workers[auth["url"]]
        await asyncio.sleep(POST_S)
        if worker.dies_at is not None and self.clock.now >= self.start + worker.dies_at:
            worker.open -= 1
            raise ConnectionRefusedError("the worker is gone")
        if worker.busy:
            worker.open -= 1
            return {"ok": False, "status": 429, "text": '{"error": "queue full"}', "json": {"error": "queue full"}}
        req = generate_request(parse_json(json.dumps(payload)), Settings())
        stream = Stream()
        started = asyncio.get_running_loop().create_future()  # the answer's headers: once the worker takes it
        asyncio.get_running_loop().create_task(self._generate(worker, req, stream, started))
        await started
        return {"ok": True, "status": 200, "stream": stream}

    @staticmethod
    async def drain(stream) -> None:
        return None

    async def _generate(self, worker: SimWorker, req, stream: Stream, started: asyncio.Future) -> None:
        try:
            async with worker.lock:
                if started.cancelled():  # the client left before the worker took it
                    return
                started.set_result(None)
                await self._steps(worker, req, stream)
        finally:
            worker.open -= 1

    async def _steps(self, worker: SimWorker, req, stream: Stream) -> None:
        clock = self.clock
        job = req.search_job()
        groups, batch = worker.groups, 64
        tally = SearchTally(job, groups, req.block_height)
        t0 = clock.now
        delay = worker.start_s
        if not worker.loaded:
            delay += worker.load_s
            worker.loaded = True
        worker.requests += 1
        if worker.slow_start_s and worker.requests == 1:
            delay += worker.slow_start_s
        began = t0 + delay
        await asyncio.sleep(max(0.0, began - clock.now))
        reason, step = "completed", 0
        while not stream.closed:
            if clock.now - t0 >= req.duration_s:
                reason = "duration"
                break
            nonces = job.schedule.take(step * groups * batch, groups * batch)
            if not nonces:
                break
            step += 1
            await asyncio.sleep(max(0.0, began + step * worker.step_s - clock.now))
            if worker.dies_at is not None and clock.now >= self.start + worker.dies_at:
                stream.queue.put_nowait(ConnectionResetError("the worker died"))
                return
            if stream.closed:
                return
            _, per_group = device_major(nonces, groups, batch)
            now, clock.now = clock.now, began + step * worker.step_s  # its lines' elapsed_seconds: the worker's own
            lines = tally.add(StepResult(step - 1, (step - 1) * groups * batch, batch, [
                GroupResult(g, ns, fake_distances(req.block_hash, req.public_key, ns)) for g, ns in enumerate(per_group)
            ], 0.0, 0.0, worker.step_s))
            clock.now = now
            for line in lines:
                stream.queue.put_nowait((json.dumps(line), line))
        if not stream.closed:
            now, clock.now = clock.now, min(clock.now, began + step * worker.step_s) if step else clock.now
            summary = tally.summary(reason)
            clock.now = now
            stream.queue.put_nowait((json.dumps(summary), summary))
            stream.queue.put_nowait(None)


class Sink:
    def __init__(self):
        self.lines = 0

    def write(self, text: str) -> None:
        self.lines += text.count("\n")

    def flush(self) -> None:
        pass


def fleet(name: str, seconds: float, rng: random.Random) -> list[SimWorker]:
    n = 500 if name == "scale" else 100
    workers = [SimWorker(i, GROUPS[i % len(GROUPS)], f"http://w{i}") for i in range(n)]
    if name == "killed":
        for i in rng.sample(range(n), 10):
            workers[i].dies_at = rng.uniform(0, seconds)
    elif name == "slow":
        picked = rng.sample(range(n), 25)
        for i in picked[:20]:
            workers[i].slow_start_s = 3 * seconds
        for i in picked[20:]:
            workers[i].busy = True
    return workers


def simulate(name: str, seconds: float, seed: int, valid_fraction: float = 0.001) -> dict:
    clock = Clock()
    for module in (plan_module, runner_module, workers_module, results_module):
        module.time = clock
    loop = VirtualLoop(clock)
    asyncio.set_event_loop(loop)

    def stamped(run):  # `started`'s default factory is the real time.monotonic
        run.started = clock.now
        POST_INIT(run)

    plan_module.Running.__post_init__ = stamped
    try:
        workers = fleet(name, seconds, random.Random(seed))
        healthy_rate = sum(w.rate for w in workers)  # as fleet_bench.py counts it
        total = int(healthy_rate * seconds)
        search = Search(params=params_from_text("bench"), block_hash="fleet-bench-block", block_height=0,
                        public_key="fleet-bench-key", r_target=r_target_for(valid_fraction), dtype="float16",
                        start_nonce=0, max_nonces=total, duration_s=None, workers=len(workers))
        router = SimRouter(workers, clock, seed, valid_fraction, clock.now)
        sink = Sink()
        remote = RemoteSearch(router, search, out=sink)
        t0 = clock.now
        wall0 = real_time.perf_counter()
        reason = loop.run_until_complete(remote.run())
        elapsed = clock.now - t0
        per_class = collections.defaultdict(list)
        for w in workers:
            per_class[w.groups].append(w.requests)
        return {
            "scenario": name, "workers": len(workers), "reason": reason, "ideal_s": round(total / healthy_rate, 2),
            "elapsed_s": round(elapsed, 2), "ratio": round(elapsed / (total / healthy_rate), 3),
            "requests": remote.requests, "backups": remote.backups, "restarts": remote.restarts,
            "computed": remote.plan.computed, "nonces": total, "lines_printed": sink.lines,
            "requests_a_worker_by_groups": {g: round(sum(r) / len(r), 2) for g, r in sorted(per_class.items())},
            "sim_wall_s": round(real_time.perf_counter() - wall0, 1),
        }
    finally:
        leftover = asyncio.all_tasks(loop)  # the workers' requests stopped after the search's end
        for task in leftover:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.close()
        plan_module.Running.__post_init__ = POST_INIT
        for module in (plan_module, runner_module, workers_module, results_module):
            module.time = real_time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="scale", choices=("scale", "killed", "slow"))
    ap.add_argument("--seconds", type=float, default=60.0, help="the ideal time of the search (default 60)")
    ap.add_argument("--seeds", default="1", help="comma-separated; one run each (default 1)")
    args = ap.parse_args()
    for seed in args.seeds.split(","):
        print(json.dumps(simulate(args.scenario, args.seconds, int(seed))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
