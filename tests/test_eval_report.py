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


LM_EVAL_FIX = FIX / "eval" / "lm_eval_results"  # real lm-eval results files (tiny-math, kernel_size 3 and 9)


@pytest.fixture(scope="module")
def kernel_sweep(tmp_path_factory) -> Path:
    """A 2-point `difflm sweep` over decode.kernel_size on the embedded tiny-math model (GSM8K items with gold
    answers), one point scored by `difflm eval fluency` for gen-PPL under a tiny AR scorer."""
    from difflm.sweep import plan_sweep, run_sweep
    from difflm.testing import build_tiny_ar

    tmp = tmp_path_factory.mktemp("ksweep")
    out = tmp / "sweep"
    args = ["decode.kernel_size=3,5", "decode.gen_length=12", "decode.steps=4", "model.name=tiny-math",
            "data.eval_set=gsm8k", f"data.data_path={FIX / 'gsm8k.jsonl'}", "data.limit=3", "batch_size=3"]
    run_sweep(plan_sweep(None, args, out), out)
    scorer = build_tiny_ar(tmp / "scorer")
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(out / "kernel_size=5.json"), "--scorer", str(scorer),
                              "-q"])
    assert res.exit_code == 0, res.output
    return out


def test_report_tables_and_plots_scores_against_a_swept_key_with_lm_eval_results(kernel_sweep, tmp_path):
    from difflm.eval.gsm8k import score_records

    out = tmp_path / "report"
    files = sorted(str(p) for p in kernel_sweep.glob("*.json"))  # what `DIR/*.json` gives: manifests and results too
    res = runner.invoke(app, ["eval", "report", *files, str(LM_EVAL_FIX), "--x", "decode.kernel_size",
                              "--out", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["rows"]) == 4  # 2 sweep points + 2 lm-eval files; the side files were skipped
    vs = rep["x"]
    assert vs["key"] == "decode.kernel_size"
    by_label = {t["label"]: t for t in vs["rows"]}
    lm = {t["x"]: t for t in vs["rows"] if t["group"].startswith("lm-eval")}
    assert sorted(lm) == [3, 9]
    for k, t in lm.items():  # the numbers are those in the lm-eval files
        path = next(LM_EVAL_FIX.glob(f"k{k}/tiny-math/results_*.json"))
        data = json.loads(path.read_text())["results"]
        assert t["difflm_tiny_choice/acc"] == data["difflm_tiny_choice"]["acc,none"]
        assert t["difflm_tiny_gen/exact_match"] == data["difflm_tiny_gen"]["exact_match,none"]
    gen_rows = [t for t in vs["rows"] if not t["group"].startswith("lm-eval")]
    assert [t["x"] for t in gen_rows] == [3, 5]
    for t in gen_rows:
        recs = json.loads((kernel_sweep / f"kernel_size={t['x']}.json").read_text())
        assert t["gsm8k_accuracy"] == pytest.approx(100 * score_records(recs)["accuracy"])
        man = json.loads((kernel_sweep / f"kernel_size={t['x']}.json.manifest.json").read_text())
        assert t["tokens_per_nfe"] == pytest.approx(man["content_tokens_per_nfe"])
    flu = json.loads((kernel_sweep / "kernel_size=5.json.fluency.json").read_text())
    assert gen_rows[1]["gen_ppl_mean"] == pytest.approx(flu["aggregate"]["gen_ppl_mean"])
    assert gen_rows[0]["gen_ppl_mean"] is None  # not scored: no number invented
    png = (out / "score_vs_kernel_size.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    md = (out / "report.md").read_text()
    assert "## Scores vs decode.kernel_size" in md and "## lm-eval results" in md and "difflm_tiny_choice/acc" in md
    assert "scores vs decode.kernel_size" in res.output and len(by_label) == 4
    # --score picks columns; an unknown score or a key no run has: exit 2, one line
    res = runner.invoke(app, ["eval", "report", str(kernel_sweep), "--x", "decode.kernel_size", "--score", "rep_4",
                              "--out", str(tmp_path / "r2")])
    assert res.exit_code == 0 and json.loads((tmp_path / "r2" / "report.json").read_text())["x"]["scores"] == ["rep_4"]
    for args, needle in ((["--x", "decode.kernel_size", "--score", "nope"], "no run has the score 'nope'; available:"),
                         (["--x", "decode.no_such_key"], "no run has a value for decode.no_such_key")):
        res = runner.invoke(app, ["eval", "report", str(kernel_sweep), *args, "--out", str(tmp_path / "r3")])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
