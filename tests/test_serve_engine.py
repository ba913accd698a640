"""The batching engine of `difflm serve` and the `cancelled=` hook of `generate` it relies on.

Exact token comparisons across batch and single runs use the embedded tiny model in float64 (`module.double()`):
a row's noise comes from its own seed, so in float64 only a tie to ~1e-13 could flip a token."""

import threading

import pytest
import torch

from difflm.decoding import generate
from difflm.decoding.config import DecodeConfig
from difflm.errors import ConfigError


@pytest.fixture(scope="module")
def model64():
    from difflm.models import load_model

    m = load_model("tiny-math", device="cpu")
    m.module.double()
    return m


def _prompts(m, texts):
    from difflm.data.prompts import conversation_ids

    return [conversation_ids(m, [{"role": "user", "content": t}]) for t in texts]


def _padded(m, prompts):
    from difflm.generation import left_pad

    return left_pad(prompts, m.ids.pad_or_eos)


_METHODS = {
    "conv": dict(method="conv"),
    "llada": dict(method="llada", block_length=16),
    "threshold": dict(method="threshold", block_length=16, threshold=0.5),
    "semi_ar": dict(method="semi_ar", block_length=16),
    "remdm": dict(method="remdm"),
}


@pytest.mark.parametrize("name", list(_METHODS))
def test_cancelled_row_stops_and_leaves_the_others_unchanged(model64, name):
    """Row 1 is cancelled after step 3: rows 0 and 2 decode exactly as without the cancel, row 1 leaves the
    forward pass (fewer sequences run) and keeps no MASK."""
    m = model64
    cfg = DecodeConfig(gen_length=32, steps=16, seed=3, **_METHODS[name])
    ids, am = _padded(m, _prompts(m, ["What is 2 + 3?", "What is 12 - 4?", "Tom has 5 apples. How many?"]))
    seeds = [11, 22, 33]
    base = generate(m, ids, cfg, attention_mask=am, row_seeds=seeds)
    steps = {"n": 0}

    def count(ev):
        steps["n"] = ev["step"]

    out = generate(m, ids, cfg, attention_mask=am, row_seeds=seeds, callback=count,
                   cancelled=lambda: [False, steps["n"] >= 3, False])
    p = base.prompt_length
    assert torch.equal(out.sequences[[0, 2]], base.sequences[[0, 2]])
    assert not bool((out.sequences[1, p:] == m.ids.mask_id).any())
    assert out.row_passes < base.row_passes
    # a cancel that never fires changes nothing, and cancelling every row ends the run early
    same = generate(m, ids, cfg, attention_mask=am, row_seeds=seeds, cancelled=lambda: [False] * 3)
    assert torch.equal(same.sequences, base.sequences)
    none = generate(m, ids, cfg, attention_mask=am, row_seeds=seeds, cancelled=lambda: [True] * 3)
    assert none.nfe < base.nfe


def test_engine_batches_and_each_answer_equals_it_alone(model64):
    """Three concurrent requests of two choices each, one settings key: one batch of 6 rows; every choice
    equals `generate` on that request alone (n copies of its prompt, its seed)."""
    from difflm.generation import prompt_id
    from difflm.seeding import item_seed
    from difflm.serve import Engine

    m = model64
    engine = Engine(m, max_batch=8, window_ms=300).start()
    try:
        prompts = _prompts(m, ["What is 3 + 4?", "What is 9 - 2?", "What is 6 * 7?"])
        cfgs = [DecodeConfig(method="conv", gen_length=32, steps=16, seed=s) for s in (1, 2, 3)]
        res = {}
        threads = [threading.Thread(target=lambda i=i: res.__setitem__(i, engine.run(prompts[i], cfgs[i], n=2)))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = engine.stats()
        assert stats.max_batch_seen == 6 and stats.batches == 1
        for i, p in enumerate(prompts):
            # choice k is seeded as `difflm generate` seeds its k-th --prompt
            seeds = [item_seed(cfgs[i].seed, prompt_id(k)) for k in range(2)]
            alone = generate(m, torch.tensor([p, p]), cfgs[i], row_seeds=seeds)
            assert [r["token_ids"] for r in res[i]] == alone.sequences[:, alone.prompt_length :].tolist()
            assert res[i][0]["token_ids"] != res[i][1]["token_ids"]  # the two choices have their own seeds
            assert [r["seed"] for r in res[i]] == [cfgs[i].seed] * 2
    finally:
        engine.stop()
    assert engine.stats().queued_rows == 0 and engine.stats().running_rows == 0


def test_engine_keeps_settings_apart_and_bounds_its_queue(model64):
    from difflm.serve import Engine, QueueFull
    from difflm.serve.engine import settings_key

    a = DecodeConfig(method="conv", gen_length=16, steps=8, seed=1)
    assert settings_key(a) == settings_key(DecodeConfig(method="conv", gen_length=16, steps=8, seed=99))
    assert settings_key(a) != settings_key(DecodeConfig(method="conv", gen_length=16, steps=4, seed=1))
    engine = Engine(model64, max_batch=4, max_queue=3)  # not started: rows stay queued
    p = _prompts(model64, ["hi"])[0]
    engine.submit(p, a, n=2, sink=lambda ev: None)
    with pytest.raises(QueueFull) as e:
        engine.submit(p, a, n=2, sink=lambda ev: None)
    assert e.value.retry_after >= 1
    assert engine.stats().queued_rows == 2
    engine.stop()  # queued rows are failed with 503, not dropped silently
    with pytest.raises(ConfigError):
        Engine(model64, max_batch=0)


def test_engine_fails_queued_rows_on_stop_and_drops_cancelled_ones(model64):
    from difflm.serve import Engine, ShuttingDown

    engine = Engine(model64, max_batch=4)
    p = _prompts(model64, ["hi"])[0]
    cfg = DecodeConfig(method="conv", gen_length=16, steps=8)
    events = []
    engine.submit(p, cfg, n=2, sink=events.append)
    engine.stop()
    assert [(e["type"], e["status"]) for e in events] == [("error", 503)] * 2
    with pytest.raises(ShuttingDown):
        engine.submit(p, cfg, sink=events.append)
    # a cancelled request never runs; the next one does
    engine = Engine(model64, max_batch=4, window_ms=0)
    quiet = []
    job = engine.submit(p, cfg, sink=quiet.append)
    job.cancel()
    engine.start()
    try:
        done = engine.run(p, cfg)
        assert done[0]["type"] == "done" and quiet == []
        assert engine.stats().rows_done == 1
    finally:
        engine.stop()


def test_engine_step_events_describe_the_canvas(model64):
    """The step events' committed positions, replayed, give the final answer; nothing is committed twice
    for a decoder that never remasks; the text is the answer's decoded prefix."""
    from difflm.serve import Engine

    engine = Engine(model64, window_ms=0).start()
    try:
        p = _prompts(model64, ["What is 5 + 5?"])[0]
        events = []
        cfg = DecodeConfig(method="llada", block_length=16, gen_length=32, steps=16, seed=4)
        done = engine.run(p, cfg, on_event=events.append)[0]
    finally:
        engine.stop()
    steps = [e for e in events if e["type"] == "step"]
    assert len(steps) == done["steps"] == 16
    canvas = [None] * 32
    for e in steps:
        for pos, tid, _text in e["committed"]:
            assert canvas[pos] is None
            canvas[pos] = tid
        assert e["masked"] == canvas.count(None)
    assert canvas == done["token_ids"]
    assert steps[-1]["text"] == done["text"]  # nothing masked at the last step: the prefix is the answer
