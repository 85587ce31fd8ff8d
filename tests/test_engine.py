"""Engine behaviour: caches, stopping, out-of-memory retreat, the persistent compile cache."""

import threading

import numpy as np

from jaxbench.engine import Engine
from jaxbench.job import SearchJob
from jaxbench.nonces import NonceSchedule
from jaxbench.params import PRESETS

TINY = PRESETS["tiny"]


def test_weights_and_compiled_steps_are_kept_per_key(engine):
    a = engine.load(TINY, "keep", "float16")
    assert engine.load(TINY, "keep", "float16") is a
    step = engine.compiled_step(TINY, "float16", 4)
    assert engine.compiled_step(TINY, "float16", 4) is step
    assert engine.compiled_step(TINY, "float16", 2) is not step
    b = engine.load(TINY, "other", "float16")
    assert b is not a and engine.load(TINY, "other", "float16") is b


def test_stop_ends_the_search_within_a_step_and_keeps_what_was_computed(engine):
    job = SearchJob(TINY, "stop", "pk", 1.41, NonceSchedule.for_node(0), "float16")
    stop = threading.Event()
    seen = []
    for step in engine.search(job, stop, batch=4):
        seen.append(step)
        if len(seen) == 3:
            stop.set()
    # The step dispatched before the stop was seen is still collected, none after it.
    assert len(seen) in (3, 4)
    flat = [n for s in seen for g in s.groups for n in g.nonces]
    assert sorted(flat) == list(range(len(flat)))


def test_out_of_memory_retreats_to_a_smaller_batch_and_redoes_the_lost_step(monkeypatch):
    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    job = SearchJob(TINY, "oom", "pk", 1.41, NonceSchedule.for_node(0, limit=24), "float16")
    expected = engine.distances(TINY, "oom", "pk", list(range(24)), "float16", batch=8)
    real = engine.compiled_step
    failures = []

    def compiled_step(params, dtype, batch, products="exact"):
        step = real(params, dtype, batch, products)
        if batch < 8:
            return step

        def failing(*args):
            if len(failures) < 1 and args:
                failures.append(batch)
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
            return step(*args)

        return failing

    monkeypatch.setattr(engine, "compiled_step", compiled_step)
    got = {}
    batches = set()
    for step in engine.search(job, batch=8):
        batches.add(step.batch)
        for g in step.groups:
            got.update(zip(g.nonces, g.dist))
    assert failures == [8] and batches == {4}
    assert sorted(got) == list(range(24))
    # Another batch size is another XLA program: float32 sums may round differently in the last bit.
    np.testing.assert_allclose([got[n] for n in range(24)], expected, rtol=0, atol=1e-6)


def test_compiled_steps_persist_across_processes(tmp_path):
    cache = tmp_path / "xla"
    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=cache)
    engine.compiled_step(TINY, "float16", 3)  # from shapes alone: no weights needed
    assert any(cache.iterdir()), "the compilation cache directory stayed empty"


def test_a_failing_draw_reaches_the_caller(monkeypatch):
    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    job = SearchJob(TINY, "fail", "pk", 1.41, NonceSchedule.for_node(0), "float16")
    import jaxbench.feeder as feeder_mod

    real = feeder_mod.prepare_step

    def prepare_step(drawer, draws, stages, job, step, flat_start, batch):
        if step == 2:
            raise OSError("disk on fire")
        return real(drawer, draws, stages, job, step, flat_start, batch)

    monkeypatch.setattr(feeder_mod, "prepare_step", prepare_step)
    seen = []
    try:
        for step in engine.search(job, batch=4):
            seen.append(step.step)
    except OSError as e:
        assert "disk on fire" in str(e)
    else:
        raise AssertionError("the draw failure was swallowed")
    assert seen == [0, 1]  # what was computed before the failure still arrived


def test_a_set_that_cannot_fit_is_refused_before_anything_is_built(monkeypatch):
    import jaxbench.engine as engine_mod
    import jaxbench.placement as placement_mod
    from jaxbench.fields import FieldError
    from jaxbench.sizes import GiB

    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    monkeypatch.setattr(placement_mod, "device_free_bytes", lambda device: 8 * GiB)
    built = []
    monkeypatch.setattr(engine_mod.weights_mod, "pool_on_device", lambda *a, **k: built.append(a))
    mainnet = PRESETS["mainnet"]
    for attempt in (lambda: engine.load(mainnet, "h", "float16"),
                    lambda: engine.compiled_step(mainnet, "float16", 1)):
        try:
            attempt()
        except FieldError as e:
            assert e.field == "params"
            assert "33.06 GiB" in e.message and "8.00 GiB available" in e.message
        else:
            raise AssertionError("mainnet was accepted on an 8 GiB device")
    assert built == [] and engine.compiled_keys() == []
    engine.check_fits(PRESETS["bench"], "float16")  # 2.6 GiB fits


def test_the_batch_is_bounded_by_the_work_and_by_memory(monkeypatch):
    import jaxbench.placement as placement_mod
    from jaxbench.memory import MemoryNeed

    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    small = SearchJob(TINY, "b", "pk", 1.41, NonceSchedule.for_node(0, limit=16), "float16")
    assert engine.batches.fit(small, 2_000_000, 1) == 16
    need = MemoryNeed.of(TINY, "float16")
    monkeypatch.setattr(placement_mod, "device_free_bytes", lambda device: need.weights + 5 * need.per_nonce)
    unbounded = SearchJob(TINY, "b", "pk", 1.41, NonceSchedule.for_node(0), "float16")
    assert engine.batches.fit(unbounded, 2_000_000, 1) == 5
    assert engine.batches.default(TINY, "float16") == 5


def test_the_batch_choice_is_swept_once_and_remembered_beside_the_compile_cache(tmp_path, monkeypatch):
    import json

    from jaxbench import batch_choice

    monkeypatch.setattr(batch_choice, "CANDIDATES", (2, 4))
    first = Engine(devices=1, draws_mode="host", compile_cache_dir=tmp_path / "xla")
    assert first.batches.choice(TINY, "float16") is None
    entry = first.batches.choice(TINY, "float16", sweep=True)
    assert entry["batch"] in (2, 4) and set(entry["block_nonces_per_s"]) == {"2", "4"}
    record = json.loads((tmp_path / batch_choice.RECORD_NAME).read_text())
    assert list(record.values()) == [entry]

    second = Engine(devices=1, draws_mode="host", compile_cache_dir=tmp_path / "xla")
    monkeypatch.setattr(second.batches, "sweep", lambda *a, **k: (_ for _ in ()).throw(AssertionError("swept again")))
    assert second.batches.choice(TINY, "float16", sweep=True) == entry
    assert second.batches.choice(TINY, "bfloat16") is None  # another configuration, another choice


def test_the_sweep_keeps_the_smallest_batch_within_one_percent_of_the_fastest():
    from jaxbench.batch_choice import sweep

    rates = {32: 60.0, 64: 65.0, 128: 65.5, 256: 63.0}
    entry = sweep(lambda b: 1.0 / rates[b], list(rates))
    assert entry["batch"] == 64
    assert entry["block_nonces_per_s"] == {str(b): r for b, r in rates.items()}
    assert sweep(lambda b: 1.0 / {32: 10.0, 64: 20.0}[b], [32, 64])["batch"] == 64


def test_compiled_steps_are_bounded_least_recently_used_first(monkeypatch):
    import jaxbench.steps as steps_mod

    monkeypatch.setattr(steps_mod, "MAX_COMPILED_STEPS", 2)
    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    one = engine.compiled_step(TINY, "float16", 1)
    engine.compiled_step(TINY, "float16", 2)
    assert engine.compiled_step(TINY, "float16", 1) is one  # now the most recent
    engine.compiled_step(TINY, "float16", 3)
    assert sorted(k["batch"] for k in engine.compiled_keys()) == [1, 3]


def test_a_search_stopped_before_it_starts_builds_and_compiles_nothing(monkeypatch):
    engine = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    stop = threading.Event()
    stop.set()
    monkeypatch.setattr(engine, "load", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    job = SearchJob(TINY, "s", "pk", 1.41, NonceSchedule.for_node(0), "float16")
    assert list(engine.search(job, stop, batch=2)) == []
