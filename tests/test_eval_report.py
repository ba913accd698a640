"""`difflm eval report` with two runs: a tiny-model generate run and the hand-made GSM8K fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from difflm.config import load_recipe
from difflm.errors import ConfigError
from difflm.generation import GenerateRecipe, run_generate

pytest.importorskip("matplotlib", reason="the eval extra (matplotlib) is not installed")

FIX = Path(__file__).parent / "fixtures"
runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_runs(tiny_llada_dir, tmp_path) -> Path:
    runs = tmp_path / "runs"
    # run 1: difflm generate on the tiny model (records carry gsm8k answers; no eval files)
    recipe = load_recipe(GenerateRecipe, None, [], {
        "model.name": str(tiny_llada_dir), "output": str(runs / "tiny" / "tiny-s4.json"), "batch_size": 4,
        "data.eval_set": "gsm8k", "data.data_path": str(FIX / "gsm8k.jsonl"), "data.limit": 4,
        "decode.gen_length": 16, "decode.steps": 4, "decode.top_k": 2,
    })
    run_generate(recipe)
    # run 2: the hand-made fixture, scored by `difflm eval gsm8k`, with an AlpacaEval summary beside it
    hand = runs / "hand" / "hand.json"
    hand.parent.mkdir(parents=True)
    shutil.copy(FIX / "eval" / "gsm8k_outputs.json", hand)
    shutil.copy(FIX / "eval" / "gsm8k_outputs.json.manifest.json", str(hand) + ".manifest.json")
    assert runner.invoke(app, ["eval", "gsm8k", "--outputs", str(hand), "-q"]).exit_code == 0
    Path(str(hand) + ".alpaca.json").write_text(json.dumps({
        "task": "alpaca", "win_rate": 55.0, "standard_error": 2.5, "length_controlled_winrate": 50.0,
        "lc_standard_error": 1.5, "n_total": 805,
    }))
    return runs


def test_report_renders_two_runs(two_runs, tmp_path):
    out = tmp_path / "report"
    res = runner.invoke(app, ["eval", "report", str(two_runs / "tiny"), str(two_runs / "hand" / "hand.json"),
                              "--out", str(out), "--title", "two runs"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    for name in ("score_vs_steps.png", "repetition_vs_position.png", "tokens_per_nfe.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    md = (out / "report.md").read_text()
    assert md.startswith("# two runs")
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [f"{Path(r['model']).name}-conv" if r["model"] != "hand-made" else "hand-made-conv"
                                          for r in rows]
    tiny, hand = rows
    # every number traces to its files
    assert tiny["manifest"].endswith("tiny-s4.json.manifest.json") and tiny["sources"]["speed"] == tiny["manifest"]
    assert tiny["sources"]["accuracy"].startswith("computed from") and tiny["accuracy_n"] == 4
    assert hand["sources"]["accuracy"].endswith("hand.json.gsm8k.json") and hand["accuracy"] == 7 / 11
    assert hand["sources"]["win_rate"].endswith("hand.json.alpaca.json") and hand["lc_win_rate"] == 50.0
    man = json.loads(Path(tiny["manifest"]).read_text())
    assert tiny["content_tokens_per_nfe"] == man["content_tokens_per_nfe"] and tiny["device"] == man["device"]
    assert tiny["steps"] == 4 and tiny["effective_kernel"] == 5 and hand["steps"] == 64
    for r in rows:
        assert f"manifest `{r['manifest']}`" in md and f"| {r['label']} |" in md
    assert "63.6 ± 14.5" in md and "50.0 ± 1.5" in md and "![tokens_per_nfe](tokens_per_nfe.png)" in md
    assert "hand-made-conv" in res.stdout  # the terminal table


def test_report_finds_runs_in_folders_and_rejects_empty_input(two_runs, tmp_path):
    from difflm.eval.report import build_report

    rep = build_report([two_runs], out_dir=tmp_path / "r")
    assert len(rep["rows"]) == 2 and Path(rep["files"]["report.md"]).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["eval", "report", str(empty), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "no difflm generate outputs" in res.stderr
    with pytest.raises(ConfigError):
        build_report([], out_dir=tmp_path / "r3")


def test_results_of_another_version_of_the_outputs_are_ignored(two_runs, tmp_path):
    from difflm.eval.report import build_report

    hand = two_runs / "hand" / "hand.json"
    recs = json.loads(hand.read_text())
    for r in recs:
        r["output"] = "no number"
    hand.write_text(json.dumps(recs))  # the outputs changed after `difflm eval gsm8k` scored them
    (row,) = build_report([hand], out_dir=tmp_path / "r")["rows"]
    assert row["accuracy"] == 0.0 and row["sources"]["accuracy"].startswith("computed from")
    assert "rerun difflm eval gsm8k" in row["sources"]["gsm8k (ignored)"]
