"""The embedded models (difflm/embedded/tiny-*): they load by name, beat their untrained versions on
held-out data, tiny-math solves held-out problems well above chance, and `make demo` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflm.data.synthetic import math_problems
from difflm.decoding.config import DecodeConfig
from difflm.embedded import EMBEDDED_DIR, JULIUS_CAESAR_LINES, NAMES, heldout_loss, math_rows, text_rows
from difflm.eval.gsm8k import is_correct
from difflm.generation import GenerateRecipe, generate_text
from difflm.models import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name, device="cpu") for name in NAMES}


def _untrained(model, seed: int = 0):
    """A randomly initialised model of the same config, ids and tokenizer."""
    from transformers import LlamaForCausalLM

    from difflm.models import DiffusionLM

    torch.manual_seed(seed)
    module = LlamaForCausalLM(model.module.config).float().eval()
    return DiffusionLM(module, "llada", model.ids, tokenizer=model.tokenizer, name="random")


def test_embedded_files_are_small_and_complete():
    total = 0
    for name in NAMES:
        d = EMBEDDED_DIR / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
            assert (d / f).is_file(), f"{name}/{f}"
        config = json.loads((d / "config.json").read_text())
        assert config["is_causal"] is False and config["mask_token_id"] is not None
        total += (d / "model.safetensors").stat().st_size
    assert total < 25e6


def test_load_by_name(models):
    for name, m in models.items():
        assert m.family == "llada" and m.is_diffusion
        assert m.dtype == torch.float32  # stored fp16, computed in fp32
        assert m.ids.mask_id is not None and m.ids.eos_id is not None
        assert Path(m.name) == EMBEDDED_DIR / name or m.name == name


def test_local_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    from difflm.testing import build_tiny_native_llada

    build_tiny_native_llada(tmp_path / "tiny-math")
    monkeypatch.chdir(tmp_path)
    m = load_model("tiny-math", device="cpu")
    assert m.module.config.hidden_size != load_model(str(EMBEDDED_DIR / "tiny-math"), device="cpu").module.config.hidden_size


def test_generate_defaults_to_the_embedded_model():
    assert GenerateRecipe().model.name == "tiny-shakespeare"


def test_tiny_shakespeare_beats_untrained(models):
    m = models["tiny-shakespeare"]
    rows = text_rows(m.tokenizer, JULIUS_CAESAR_LINES)
    trained, untrained = heldout_loss(m, rows), heldout_loss(_untrained(m), rows)
    assert trained < untrained - 1.5, (trained, untrained)


def test_tiny_math_beats_untrained(models):
    for name in ("tiny-math", "tiny-math-r2ft"):
        m = models[name]
        rows = math_rows(m.tokenizer, math_problems(32, seed=0, split="test"), m.ids.eos_id)
        trained, untrained = heldout_loss(m, rows), heldout_loss(_untrained(m), rows)
        assert trained < untrained - 3.0, (name, trained, untrained)


def test_tiny_math_accuracy_above_chance(models):
    problems = math_problems(50, seed=1, split="test")
    cfg = DecodeConfig(method="llada", gen_length=32, steps=32, temperature=0.0)
    outs = generate_text(models["tiny-math"], [p["instruction"] for p in problems], cfg, prompt_format="raw", batch_size=50)
    acc = sum(is_correct(o, p["output"]) for o, p in zip(outs, problems)) / len(problems)
    assert acc >= ACCURACY_FLOOR, (acc, outs[:3])


# Measured on the shipped weights: 4 of these 50 (0.08; 4.4% on 500 problems); chance is ~0.01 (integer answers
# 1..~150) and the untrained model scores 0. A weak model: the floor only guards against a broken load or decoder.
ACCURACY_FLOOR = 0.04


def test_demo_runs():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "difflm.demo", "--no-live", "--gen-length", "16", "--steps", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "conv decoding" in proc.stdout and "rep-4" in proc.stdout and "distinct-2" in proc.stdout


def test_a_failed_export_keeps_the_previous_export(tiny_native_llada_dir, tmp_path, monkeypatch):
    """`build.py export` fails after writing the new weights: the previous export stays, nothing is left over;
    a good export then replaces it, its weights as readable as its config (not safetensors' 0600)."""
    import shutil
    import stat

    import difflm.embedded
    from difflm.embedded import build

    run = tmp_path / "run"
    shutil.copytree(tiny_native_llada_dir, run / "final")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "eval_loss": 2.5, "elapsed_s": 3.0}) + "\n")
    dest = tmp_path / "embedded"
    (dest / "tiny-shakespeare").mkdir(parents=True)
    (dest / "tiny-shakespeare" / "SENTINEL").write_text("the previous export")
    real_loss, calls = difflm.embedded.heldout_loss, []

    def fails_on_the_exported_copy(model, rows, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the fp16 copy, loaded back from the folder being written
            raise OSError(28, "No space left on device")
        return real_loss(model, rows, *a, **k)

    monkeypatch.setattr(difflm.embedded, "heldout_loss", fails_on_the_exported_copy)
    argv = ["export", "--run", str(run), "--name", "tiny-shakespeare", "--dest", str(dest)]
    with pytest.raises(OSError, match="No space left"):
        build.main(argv)
    assert len(calls) == 2 and sorted(os.listdir(dest)) == ["tiny-shakespeare"]
    assert os.listdir(dest / "tiny-shakespeare") == ["SENTINEL"]
    monkeypatch.setattr(difflm.embedded, "heldout_loss", real_loss)
    old = os.umask(0o022)
    try:
        assert build.main(argv) == 0
    finally:
        os.umask(old)
    out = dest / "tiny-shakespeare"
    assert sorted(os.listdir(dest)) == ["tiny-shakespeare"] and not (out / "SENTINEL").exists()
    assert "MODEL_CARD.md" in os.listdir(out)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
