"""serving.slots through AdapterServer's Python API: pinning, LRU eviction of the unpinned,
pins against max_adapters and the memory budget, load and eviction counts, last use; and
serving.metrics' ServingStats counting what generate() ran."""

import pytest

from adaptr.errors import InvalidInputError, NotFoundError
from adaptr.registry import Registry

from helpers import write_adapter

NAMES = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def reg(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("slots")
    registry = Registry(root / "home")
    registry.add_base("tiny", tiny_llama)
    for i, name in enumerate(NAMES):
        registry.add(name, write_adapter(root / name, seed=i), base="tiny")
    return registry


def server(reg, **kw):
    from adaptr.serving import AdapterServer

    return AdapterServer(reg, "tiny", **kw)


def test_a_pinned_adapter_outlives_lru_eviction(reg):
    s = server(reg, max_adapters=2)
    assert s.pin("a") == "a@1"
    for name in NAMES[1:]:  # 2 x max_adapters others
        s.load(name)
        assert "a@1" in s.resident() and len(s.resident()) == 2
    assert s.slots.pinned() == ["a@1"]
    assert s.slots.counts.loads == 5 and s.slots.counts.lru == 3
    (pinned,) = [r for r in s.slots.residents() if r.pinned]
    assert pinned.ref == "a@1" and pinned.slot in (1, 2) and pinned.bytes > 0
    assert pinned.last_used >= pinned.loaded
    assert s.unpin("a") and not s.unpin("a")
    s.load("b")  # a is now the least recently used, and may go
    assert "a@1" not in s.resident() and s.slots.counts.lru == 4
    assert s.slots.last_used("a@1") is not None  # (kept after eviction)


def test_pins_count_against_max_adapters(reg):
    s = server(reg, max_adapters=2)
    s.pin("a")
    s.pin("b@1")
    s.pin("a")  # again: nothing changes
    with pytest.raises(InvalidInputError, match="cannot pin c@1: 2 adapters are pinned already"):
        s.pin("c")
    with pytest.raises(InvalidInputError, match="resident adapters are pinned"):
        s.load("c")
    assert set(s.resident()) == {"a@1", "b@1"}
    with pytest.raises(NotFoundError):
        s.pin("ghost")


def test_pins_count_against_the_memory_budget(reg):
    probe = server(reg)
    probe.load("a")
    one = probe.memory()  # every adapter here has the same shapes
    s = server(reg, max_memory_mb=1.5 * one / 2**20)
    s.pin("a")
    with pytest.raises(InvalidInputError, match="max_memory_mb"):
        s.load("b")  # it would not fit beside the pinned one
    assert s.resident() == ["a@1"]
    s.unpin("a")
    s.load("b")
    assert s.resident() == ["b@1"] and s.slots.counts.lru == 1


def test_unload_evicts_and_counts(reg):
    s = server(reg, max_adapters=3)
    s.pin("a")
    assert s.unload("a") == "a@1"
    assert s.resident() == [] and s.slots.pinned() == [] and s.slots.counts.unload == 1
    with pytest.raises(NotFoundError, match="not loaded"):
        s.unload("a")


def test_stats_count_what_generate_ran(reg):
    s = server(reg, max_adapters=2)
    prompts, adapters = ["one", "two", "three"], ["a", "a@1", None]
    s.generate(prompts, adapters, max_new_tokens=4, eos_token_id=-1)  # 4 tokens each
    a, bare = s.stats.of("a@1"), s.stats.of("")
    assert (a.requests, a.finished["length"], a.generation_tokens) == (2, 2, 8)
    assert (bare.requests, bare.generation_tokens) == (1, 4)
    ids = [len(s.tokenizer(p).input_ids) for p in prompts]
    assert (a.prompt_tokens, bare.prompt_tokens) == (ids[0] + ids[1], ids[2])
    use, (ttft, itl, e2e) = s.stats.snapshot()
    assert (ttft.count, itl.count, e2e.count) == (3, 9, 3)
    assert ttft.cumulative()[-1] == ("+Inf", 3) and itl.sum >= 0
    assert set(use) == {"a@1", ""}


def _alone(reg, ref: str, prompt: str, n: int) -> list[int]:
    s = server(reg, max_adapters=4)
    try:
        return s.submit(prompt, ref, max_new_tokens=n, eos_token_id=-1).wait(120).tokens
    finally:
        s.scheduler.close(60)


def test_a_pin_leaves_fewer_slots_to_a_batch_and_its_rows_still_run(reg):
    """max_adapters=2 with one pinned: b and c arriving together cannot share a batch (one
    slot is left); each runs, on its own adapter, and the pinned one stays."""
    s = server(reg, max_adapters=2)
    s.pin("a")
    scheduler = s.scheduler
    scheduler.hold()
    try:
        jobs = [s.submit("Hello", ref, max_new_tokens=6, eos_token_id=-1) for ref in ("b", "c")]
    finally:
        scheduler.release()
    got = [j.wait(120) for j in jobs]
    scheduler.close(60)
    assert all(j.error is None and j.finish == "length" for j in got), [j.error for j in got]
    assert [j.tokens for j in got] == [_alone(reg, r, "Hello", 6) for r in ("b", "c")]
    assert "a@1" in s.resident() and s.slots.pinned() == ["a@1"]


def test_pinning_never_evicts_an_adapter_under_running_rows(reg):
    """A pin while a request runs on the only unpinned slot's adapter is refused, not an
    eviction under the running rows (which would decode with the wrong weights)."""
    import threading

    s = server(reg, max_adapters=2)
    s.pin("a")
    scheduler = s.scheduler
    gate, stepped = threading.Event(), threading.Event()

    def pause(_steps: int) -> None:
        stepped.set()
        gate.wait(120)

    scheduler.on_step = pause
    try:
        running = s.submit("Long", "b", max_new_tokens=8, eos_token_id=-1)
        assert stepped.wait(120)
        with pytest.raises(InvalidInputError, match="running requests"):
            s.pin("c")
        with pytest.raises(InvalidInputError, match="running requests"):
            s.load("c")
        assert set(s.resident()) == {"a@1", "b@1"}
    finally:
        scheduler.on_step = None
        gate.set()
    assert running.wait(120).tokens == _alone(reg, "b", "Long", 8)
    scheduler.close(60)
    s.pin("c")  # b is free now: it goes
    assert set(s.resident()) == {"a@1", "c@1"}
