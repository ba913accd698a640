"""`difflm generate` on the paper's open-ended sets (mt_bench, wiki, wikitext) with an embedded model: the
records' fields, MT-Bench's second turn after the model's own first answer, the old `wiki` name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

FIX = Path(__file__).parent / "fixtures"
runner = CliRunner()
BASE = ["generate", "-m", "tiny-math", "--gen-length", "8", "--steps", "2", "--decode", "conv", "--top-k", "2", "-q"]


def _generate(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    res = runner.invoke(app, [*BASE, "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), json.loads(Path(str(out) + ".manifest.json").read_text())


@pytest.mark.slow
def test_mt_bench_first_turn_fastchat_and_hub_files(tmp_path):
    recs, man = _generate(tmp_path, "mt1", "--eval-set", "mt_bench", "--data-path", str(FIX / "mt_bench_question.jsonl"))
    assert [r["id"] for r in recs] == ["81", "91", "111", "121"] and man["items"] == 4
    for r, cat in zip(recs, ["writing", "roleplay", "math", "coding"]):
        assert r["question_id"] == r["id"] and r["category"] == cat and r["turn"] == 1
        assert r["eval_set"] == r["dataset"] == "mt_bench" and r["instruction"] == r["turns"][0]
        assert isinstance(r["output"], str) and r["generator"] == "tiny-math-conv"
    hub, _ = _generate(tmp_path, "mth", "--eval-set", "mt_bench", "--data-path", str(FIX / "mt_bench_prompts.jsonl"),
                       "--limit", "2")
    assert [(r["id"], r["category"]) for r in hub] == [("30442153", "writing"), ("81720359", "math")]


def test_mt_bench_second_turn_sees_the_models_own_first_answer(tmp_path):
    recs, man = _generate(tmp_path, "mt2", "--eval-set", "mt_bench", "--data-path", str(FIX / "mt_bench_question.jsonl"),
                          "--limit", "2", "--turns", "2")
    assert [(r["id"], r["turn"]) for r in recs] == [("81", 1), ("81-turn2", 2), ("91", 1), ("91-turn2", 2)]
    assert man["items"] == 4 and man["data"]["turns"] == 2
    for first, second in zip(recs[::2], recs[1::2]):
        assert second["question_id"] == first["question_id"] and second["category"] == first["category"]
        assert second["instruction"] == first["turns"][1]
        assert second["messages"] == [{"role": "user", "content": first["turns"][0]},
                                      {"role": "assistant", "content": first["output"]},
                                      {"role": "user", "content": first["turns"][1]}]
    # the second turn's prompt holds the first answer: the same as encoding that conversation by hand
    from difflm.data.prompts import conversation_ids
    from difflm.models import load_model

    model = load_model("tiny-math", device="cpu")
    ids = conversation_ids(model, recs[1]["messages"], "alpaca")
    assert model.tokenizer.decode(ids).count(recs[0]["turns"][0][:20]) == 1


def test_second_turn_run_resumes(tmp_path):
    """Interrupted during the second turn, the rerun decodes only the missing second turns and writes what an
    uninterrupted run writes."""
    from difflm.config import load_recipe
    from difflm.generation import GenerateRecipe, run_generate

    def recipe(out):
        return load_recipe(GenerateRecipe, None, [], {
            "model.name": "tiny-math", "output": str(out), "batch_size": 2, "data.eval_set": "mt_bench",
            "data.data_path": str(FIX / "mt_bench_question.jsonl"), "data.turns": 2,
            "decode.gen_length": 8, "decode.steps": 2, "decode.top_k": 2})

    full, _ = run_generate(recipe(tmp_path / "full.json"))

    first_run = []

    def stop_in_turn_2(recs):  # the batch is saved before this is called
        first_run.extend(r["id"] for r in recs)
        if any(r["turn"] == 2 for r in recs):
            raise KeyboardInterrupt

    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        run_generate(recipe(out), on_batch=stop_in_turn_2)
    seen, decoded = {}, []
    recs, _ = run_generate(recipe(out), on_start=lambda total, done: seen.update(total=total, done=done),
                           on_batch=lambda rs: decoded.extend(r["id"] for r in rs))
    assert seen == {"total": 8, "done": 6} and len(first_run) == 6
    assert sorted(decoded) == sorted({r["id"] for r in full} - set(first_run)) and len(decoded) == 2
    assert [(r["id"], r["output"]) for r in recs] == [(r["id"], r["output"]) for r in full]


def test_turns_2_needs_mt_bench(tmp_path):
    res = runner.invoke(app, [*BASE, "-p", "hello", "--turns", "2"])
    assert res.exit_code == 2 and "data.turns" in res.output and len(res.output.strip().splitlines()) == 1


def test_paper_wiki_generates_from_the_shipped_set(tmp_path):
    recs, _ = _generate(tmp_path, "wiki", "--eval-set", "wiki", "--limit", "3")
    assert [r["id"] for r in recs] == ["fae46b21", "f0ab0e4a", "b534154a"]  # Mintaka ids, file order
    assert recs[0]["instruction"] == "Please give me an explanation about ``Mark Twain''."
    assert {r["category"] for r in recs} == {"history"} and recs[1]["entity"] == "Genghis Khan"
    assert {r["eval_set"] for r in recs} == {"wiki"}


def test_wikitext_keeps_working_and_old_wiki_recipes_are_told(tmp_path):
    recs, _ = _generate(tmp_path, "wt", "--eval-set", "wikitext", "--data-path", str(FIX / "wikitext.jsonl"), "--limit", "2")
    assert [r["id"] for r in recs] == ["wikitext-3", "wikitext-5"] and "reference" in recs[0]
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"model:\n  name: tiny-math\ndata:\n  eval_set: wiki\n  data_path: {FIX / 'wikitext.jsonl'}\n")
    res = runner.invoke(app, ["generate", "--recipe", str(recipe), "-o", str(tmp_path / "old.json"), "-q"])
    assert res.exit_code == 2 and "wikitext" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
