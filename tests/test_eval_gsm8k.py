"""GSM8K scoring: the answer extractor on hard cases, is_correct, accuracy ± stderr, the CLI, `make eval-gsm8k`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from difflm.errors import ConfigError
from difflm.eval.gsm8k import accuracy_stderr, extract_answer, gold_answer, is_correct, score_records

FIX = Path(__file__).parent / "fixtures"
EVAL_FIX = FIX / "eval"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

EXTRACT_CASES = [
    # plain, trailing punctuation
    ("The answer is 42", "42"),
    ("The answer is 42.", "42"),
    ("So 7 apples!", "7"),
    ("(answer: 13)", "13"),
    # currency
    ("She pays $18.", "18"),
    ("Total: $ 5", "5"),
    ("It costs €7 or £8", "8"),
    ("US$5", "5"),
    # thousands separators
    ("She needs 2,000 grams.", "2000"),
    ("The city has 1,234,567 people", "1234567"),
    ("It costs $1,234.50.", "1234.50"),
    ("lists 12,34", "34"),  # not a thousands group: two numbers
    # decimals
    ("That is 18.00", "18.00"),
    ("about .5 of it", "0.5"),
    ("version 1.2.3", "1.2"),
    # negatives
    ("The temperature is -5.", "-5"),
    ("x = -4", "-4"),
    ("a change of (-3)", "-3"),
    ("she lost -$5", "-5"),
    ("she lost $-5", "-5"),
    ("minus \u22127", "-7"),
    ("5-3", "3"),  # binary minus
    ("10 - 4", "4"),
    # numbers inside words: skipped; units/ordinals after a number: kept
    ("In Q3 we sold 40 units in Q4", "40"),
    ("an mp3 file", None),
    ("H2O", None),
    ("COVID-19", None),
    ("He ran 5km", "5"),
    ("She came 3rd", "3"),
    ("at 10am", "10"),
    ("20% of them", "20"),
    # GSM8K style and LaTeX boxed (boxed preferred, last boxed wins)
    ("48 / 6 = 8\n#### 8", "8"),
    ("So \\boxed{42}. Check: 6 * 7 = 42 and 43 - 1", "42"),
    ("\\boxed{1,234}", "1234"),
    ("\\boxed{\\$18.00} dollars, not 19", "18.00"),
    ("first \\boxed{3} then \\boxed{-5}, then 9", "-5"),
    ("\\boxed{x} but 7", "7"),  # a box without a number is ignored
    ("\\boxed{\\frac{1}{2}}", "2"),  # fractions are not evaluated
    # nothing
    ("no number here", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES, ids=[repr(c[0])[:40] for c in EXTRACT_CASES])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


IS_CORRECT_CASES = [
    ("So she pays $18.", "Cost is 9*2 = <<9*2=18>>18\n#### 18", True),
    ("18.00", "#### 18", True),
    ("The answer is 1,000", "#### 1000", True),
    ("It is 2000", "#### 2,000", True),
    ("-5", "#### -5", True),
    ("5", "#### -5", False),
    ("\\boxed{12}, since 3 * 4 = 12 and 4 more", "#### 12", True),
    ("12.5", "#### 12", False),
    ("no idea", "#### 7", False),
    ("7", "no gold number", False),
    ("7", None, False),
    ("Q7", "#### 7", False),
]


@pytest.mark.parametrize("output,gold,expected", IS_CORRECT_CASES)
def test_is_correct(output, gold, expected):
    assert is_correct(output, gold) is expected


def test_gold_answer():
    assert gold_answer("a <<3*4=12>>12\n#### 12") == "12"
    assert gold_answer("#### 1,234") == "1234"
    assert gold_answer("#### -3") == "-3"
    assert gold_answer("the answer is 5") == "5"
    assert gold_answer(None) is None


def test_accuracy_stderr():
    assert accuracy_stderr(7, 11) == pytest.approx(math.sqrt((7 / 11) * (4 / 11) / 11))
    assert accuracy_stderr(0, 0) == 0.0
    assert accuracy_stderr(5, 5) == 0.0


def test_score_records_on_the_fixture():
    recs = json.loads((EVAL_FIX / "gsm8k_outputs.json").read_text())
    res = score_records(recs)
    assert (res["n"], res["correct"], res["no_answer"]) == (11, 7, 1)
    assert res["accuracy"] == 7 / 11
    wrong = {it["id"] for it in res["items"] if not it["correct"]}
    assert wrong == {"gsm8k-5", "gsm8k-6", "gsm8k-7", "gsm8k-8"}


def _copy_fixture(tmp_path: Path) -> Path:
    out = tmp_path / "gsm8k_outputs.json"
    shutil.copy(EVAL_FIX / "gsm8k_outputs.json", out)
    shutil.copy(EVAL_FIX / "gsm8k_outputs.json.manifest.json", tmp_path / "gsm8k_outputs.json.manifest.json")
    return out


def test_eval_gsm8k_cli_exact_accuracy(tmp_path):
    out = _copy_fixture(tmp_path)
    res = runner.invoke(app, ["eval", "gsm8k", "--outputs", str(out), "--show", "2"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "GSM8K accuracy 63.64% ± 14.50 (7/11 correct, 1 without a number)" in res.stdout
    saved = json.loads((tmp_path / "gsm8k_outputs.json.gsm8k.json").read_text())
    assert saved["accuracy"] == 7 / 11 and saved["correct"] == 7 and saved["n"] == 11
    assert saved["stderr"] == pytest.approx(math.sqrt((7 / 11) * (4 / 11) / 11))
    assert saved["manifest"].endswith("gsm8k_outputs.json.manifest.json")
    assert saved["settings"]["method"] == "conv" and saved["settings"]["prompt_format"] == "chat"
    assert len(saved["items"]) == 11 and saved["gold_source"] == "records"


def test_eval_gsm8k_gold_from_data_path(tmp_path):
    recs = json.loads((EVAL_FIX / "gsm8k_outputs.json").read_text())
    for r in recs:
        del r["answer"]
    out = tmp_path / "no_gold.json"
    out.write_text(json.dumps(recs))
    # no gold anywhere: one line, exit 2
    res = runner.invoke(app, ["eval", "gsm8k", "--outputs", str(out)])
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--data-path" in res.stderr
    res = runner.invoke(app, ["eval", "gsm8k", "--outputs", str(out), "--data-path", str(FIX / "gsm8k.jsonl"), "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("GSM8K accuracy 63.64%")
    assert json.loads((tmp_path / "no_gold.json.gsm8k.json").read_text())["manifest"] is None


def test_eval_gsm8k_bad_inputs_exit_2(tmp_path):
    res = runner.invoke(app, ["eval", "gsm8k", "--outputs", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "no such file" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    res = runner.invoke(app, ["eval", "gsm8k", "--outputs", str(bad)])
    assert res.exit_code == 2 and "JSON list" in res.stderr
    with pytest.raises(ConfigError):
        score_records([{"id": "x", "output": "1"}])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_eval_gsm8k_on_a_tiny_model(tiny_llada_dir, tmp_path):
    """eval.mk end to end: difflm generate with recipes/generate-gsm8k.yaml, then difflm eval gsm8k."""
    makefile = tmp_path / "Makefile"
    makefile.write_text(f"VENV := {REPO / '.venv'}\ninclude {REPO / 'eval.mk'}\n")
    out = tmp_path / "gsm8k.json"
    args = ["make", "-s", "-f", str(makefile), "-C", str(REPO), "eval-gsm8k", f"MODEL={tiny_llada_dir}", "LIMIT=3",
            f"DATA_PATH={FIX / 'gsm8k.jsonl'}", "GEN_LENGTH=16", "STEPS=4", "KERNEL=4", f"OUT={out}"]
    dry = subprocess.run([*args, "-n"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "generate --recipe recipes/generate-gsm8k.yaml" in dry.stdout and "--limit 3" in dry.stdout
    assert "--decode conv" in dry.stdout and "--top-k 1" in dry.stdout and "eval gsm8k --outputs" in dry.stdout
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GSM8K accuracy" in done.stdout
    man = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert man["prompt_format"] == "chat" and man["decode"]["kernel_size"] == 4 and man["items"] == 3
    assert json.loads(Path(str(out) + ".gsm8k.json").read_text())["n"] == 3
    # README: an existing OUT is only rescored (not generated again)
    before = out.read_bytes()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{out} exists: scoring it" in again.stdout and "GSM8K accuracy" in again.stdout
    assert out.read_bytes() == before
