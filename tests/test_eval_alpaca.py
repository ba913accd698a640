"""AlpacaEval: alpaca_eval's own loader accepts `difflm generate` files; judge keys; the full path with a fake judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from difflm.config import load_recipe
from difflm.errors import ConfigError
from difflm.generation import GenerateRecipe, run_generate

pytest.importorskip("alpaca_eval", reason="the eval extra (alpaca-eval) is not installed")

FIX = Path(__file__).parent / "fixtures"
REFERENCE = FIX / "alpaca_eval.json"
runner = CliRunner()
KEY_VARS = ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH")


@pytest.fixture(scope="module")
def generated(tiny_llada_dir, tmp_path_factory) -> Path:
    """`difflm generate --eval-set alpaca_eval` on the tiny model (5 fixture instructions)."""
    out = tmp_path_factory.mktemp("alpaca") / "tiny-conv.json"
    recipe = load_recipe(GenerateRecipe, None, [], {
        "model.name": str(tiny_llada_dir), "output": str(out), "batch_size": 5,
        "data.eval_set": "alpaca_eval", "data.data_path": str(REFERENCE),
        "decode.gen_length": 16, "decode.steps": 4, "decode.top_k": 5,
    })
    run_generate(recipe)
    return out


def test_alpaca_eval_loader_accepts_generate_outputs(generated):
    from alpaca_eval import utils

    from difflm.eval.alpaca import load_outputs

    df = utils.load_or_convert_to_dataframe(generated)  # alpaca_eval's own loading code
    assert len(df) == 5
    assert {"instruction", "output", "generator", "dataset"} <= set(df.columns)
    assert utils.get_generator_name(None, df) == f"{Path(df.generator[0]).name}"  # one generator: the leaderboard name
    assert df.generator[0].endswith("-conv")
    ref = utils.load_or_convert_to_dataframe(REFERENCE)
    assert set(df["instruction"]) == set(ref["instruction"])  # pairs with the reference by instruction
    assert list(df["dataset"]) == list(ref["dataset"])
    assert load_outputs(generated)["output"].map(type).eq(str).all()


def test_missing_judge_key_is_one_line_exit_2(generated, monkeypatch):
    for v in KEY_VARS:
        monkeypatch.delenv(v, raising=False)
    res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(generated), "--reference", str(REFERENCE)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0] and "Traceback" not in res.output
    assert not Path(str(generated) + ".alpaca_eval").exists()  # checked before anything was written


def test_check_judge_key_per_backend(tmp_path):
    from difflm.eval.alpaca import annotator_backends, check_judge_key

    assert annotator_backends("weighted_alpaca_eval_gpt4_turbo") == {"openai_completions"}
    check_judge_key("weighted_alpaca_eval_gpt4_turbo", {"OPENAI_API_KEY": "sk-x"})
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        check_judge_key("claude", {"OPENAI_API_KEY": "sk-x"})
    cfg = tmp_path / "client.yaml"
    cfg.write_text("default: []\n")
    check_judge_key("weighted_alpaca_eval_gpt4_turbo", {"OPENAI_CLIENT_CONFIG_PATH": str(cfg)})
    with pytest.raises(ConfigError, match="unknown alpaca_eval annotator"):
        check_judge_key("no_such_annotator", {})


def test_eval_alpaca_end_to_end_with_a_fake_judge(tmp_path, fake_judge):
    ref = json.loads(REFERENCE.read_text())
    mine = [dict(r, id=f"alpaca_eval-{i}", generator="mine", output=r["output"] + (" and more" if i < 3 else "")[:99])
            for i, r in enumerate(ref)]
    for r in mine[3:]:
        r["output"] = "short"
    out = tmp_path / "mine.json"
    out.write_text(json.dumps(mine))
    res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(out), "--reference", str(REFERENCE)],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    assert summary["n_total"] == 5 and summary["n_wins"] == 3 and summary["n_draws"] == 0
    assert summary["win_rate"] == pytest.approx(60.0, abs=1e-6)  # 3 longer outputs of 5
    # the standard error of the mean of the per-pair wins [1, 1, 1, 0, 0] (sample std, ddof 1), in percent
    assert summary["standard_error"] == pytest.approx(100 * (0.3 / 5) ** 0.5, rel=1e-6)
    # 5 pairs: too few for the length-controlled GLM, said in one line
    assert summary["length_controlled_winrate"] is None and "at least 10 judged pairs, got 5" in summary["lc_note"]
    assert summary["n"] == 5 and summary["lc_win_rate"] is None
    assert summary["annotator"] == "weighted_alpaca_eval_gpt4_turbo"
    assert "win rate 60.00" in res.stdout
    cache = json.loads((tmp_path / "mine.json.alpaca_eval" / "annotations_cache.json").read_text())
    # the judge's annotations are cached, one per pair: the reference as output_1, ours as output_2
    assert sorted((a["instruction"], a["output_1"], a["output_2"]) for a in cache) == sorted(
        (r["instruction"], r["output"], m["output"]) for r, m in zip(ref, mine))
    assert sorted(a["preference"] for a in cache) == pytest.approx([1, 1, 2, 2, 2])


def test_eval_alpaca_accepts_generate_outputs_end_to_end(generated, tmp_path, fake_judge):
    from difflm.eval.alpaca import evaluate_files

    res = evaluate_files(generated, REFERENCE, output_dir=tmp_path / "ae", results=tmp_path / "s.json")
    # the fake judge prefers the longer output: the win rate follows from the lengths alone (an equal
    # length goes either way, by alpaca_eval's seeded swap of the pair)
    ref = {r["instruction"]: r["output"] for r in json.loads(REFERENCE.read_text())}
    mine = {r["instruction"]: r["output"] for r in json.loads(generated.read_text())}
    assert mine.keys() == ref.keys()
    longer = sum(len(mine[k]) > len(ref[k]) for k in ref)
    ties = sum(len(mine[k]) == len(ref[k]) for k in ref)
    assert res["n_total"] == 5 and res["n_draws"] == 0
    assert longer <= res["n_wins"] <= longer + ties
    assert res["win_rate"] == pytest.approx(100 * res["n_wins"] / 5, abs=1e-6)
    assert res["manifest"] == str(generated) + ".manifest.json"
    assert res["settings"]["method"] == "conv" and res["settings"]["steps"] == 4
    assert json.loads((tmp_path / "s.json").read_text())["generator"].endswith("-conv")


def test_eval_alpaca_rejects_unrelated_files(tmp_path, fake_judge):
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": "something else", "output": "x", "generator": "g"}]))
    res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(other), "--reference", str(REFERENCE)])
    assert res.exit_code == 2 and "share no instruction" in res.stderr


def _count_judge_calls(monkeypatch) -> list[int]:
    """Wrap the (fake) judge so the test sees how many prompts alpaca_eval sent it, call by call."""
    import alpaca_eval.decoders.openai as openai_decoder

    judge, judged = openai_decoder.openai_completions, []

    def counting_judge(prompts, *args, **kwargs):
        judged.append(len(prompts))
        return judge(prompts, *args, **kwargs)

    monkeypatch.setattr(openai_decoder, "openai_completions", counting_judge)
    return judged


def test_eval_alpaca_reruns_over_its_cached_annotations(tmp_path, fake_judge, monkeypatch):
    """The second `difflm eval alpaca` over the same outputs reads the judge's cached annotations: it used to
    crash (alpaca_eval 0.6.6 reads whole-number preferences back as int64, then sets draws to 1.5, which
    pandas 3 refuses). Now it gives the same summary without asking the judge again."""
    judged = _count_judge_calls(monkeypatch)
    ref = json.loads(REFERENCE.read_text())
    mine = [dict(r, id=f"alpaca_eval-{i}", generator="mine", output=(r["output"] + " and more") if i < 3 else "short")
            for i, r in enumerate(ref)]
    out = tmp_path / "mine.json"
    out.write_text(json.dumps(mine))
    summaries = []
    for _ in range(2):
        res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(out), "--reference", str(REFERENCE)],
                            terminal_width=200)
        assert res.exit_code == 0, res.output
        summaries.append(json.loads((tmp_path / "mine.json.alpaca.json").read_text()))
    assert sum(judged) == 5  # all 5 pairs judged in the first run, none in the second (cache)
    first, second = summaries
    assert first["n_total"] == second["n_total"] == 5 and first["n_wins"] == second["n_wins"] == 3
    assert second["win_rate"] == pytest.approx(first["win_rate"]) and first["win_rate"] == pytest.approx(60.0)
    # a draw (identical outputs) next to the cached whole-number preferences: judged as 1.5 without the judge
    mine[4]["output"] = ref[4]["output"]
    out.write_text(json.dumps(mine))
    res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(out), "--reference", str(REFERENCE)],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    third = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    assert third["n_draws"] == 1 and third["n_wins"] == 3 and third["win_rate"] == pytest.approx(70.0)
    assert sum(judged) == 5


def test_max_instances_judges_only_that_many_pairs(tmp_path, fake_judge, monkeypatch):
    """README: `--max-instances N` judges only N pairs (the judge sees 2 prompts, the summary and the cache 2)."""
    judged = _count_judge_calls(monkeypatch)
    ref = json.loads(REFERENCE.read_text())
    mine = [dict(r, id=f"alpaca_eval-{i}", generator="mine", output=r["output"] + " and more") for i, r in enumerate(ref)]
    out = tmp_path / "mine.json"
    out.write_text(json.dumps(mine))
    res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(out), "--reference", str(REFERENCE),
                              "--max-instances", "2"], terminal_width=200)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    assert summary["n_total"] == 2 and summary["n_wins"] == 2 and sum(judged) == 2
    cache = json.loads((tmp_path / "mine.json.alpaca_eval" / "annotations_cache.json").read_text())
    assert len(cache) == 2
