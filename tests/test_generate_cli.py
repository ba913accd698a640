"""`difflm generate` end to end on a tiny LLaDA-format checkpoint: files, resume, errors, ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from difflm.config import load_recipe
from difflm.errors import ConfigError
from difflm.generation import GenerateRecipe, run_generate
from difflm.testing import free_port

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _gen_args(model_dir, out, *extra):
    return ["generate", "-m", str(model_dir), "--eval-set", "gsm8k", "--data-path", str(FIX / "gsm8k.jsonl"),
            "--limit", "5", "--gen-length", "16", "--steps", "4", "--decode", "conv", "--top-k", "2",
            "-o", str(out), "-q", *extra]


def test_generate_writes_alpaca_eval_records_manifest_and_config(tiny_llada_dir, tmp_path):
    out = tmp_path / "run" / "out.json"
    res = runner.invoke(app, _gen_args(tiny_llada_dir, out, "--batch-size", "2"))
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())
    assert [r["id"] for r in recs] == [f"gsm8k-{i}" for i in range(5)]  # item order, not batch order
    for r in recs:
        assert {"instruction", "output", "generator", "dataset", "id", "answer"} <= set(r)
        assert isinstance(r["output"], str) and r["generator"] == f"{tiny_llada_dir.name}-conv"
        assert 0 <= r["content_tokens"] <= 16 and r["nfe"] == 4
    man = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert man["decode"]["method"] == "conv" and man["decode"]["steps"] == 4 and man["items"] == 5
    assert man["content_tokens"] == sum(r["content_tokens"] for r in recs)
    assert "torch" in man["versions"] and man["device"].startswith("cpu")
    cfg = load_recipe(GenerateRecipe, str(out) + ".config.yaml")
    assert cfg.decode.top_k == 2 and cfg.data.limit == 5
    assert not list(out.parent.glob("*.partial.jsonl"))
    # an existing output is not overwritten without --overwrite: one line, exit 2
    again = runner.invoke(app, _gen_args(tiny_llada_dir, out))
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output


@pytest.mark.numerics
def test_outputs_do_not_depend_on_batch_size(tiny_llada_dir, tmp_path):
    """Batch 1 and batch 3 (left-padded prompts: masked attention) are different kernel paths, so the model
    runs in float64 here: a token can only flip where two candidates are within ~1e-12 (in float32 they
    differ by ~1e-7 between the paths, and random weights give near-ties)."""
    from difflm.models import load_model

    model = load_model(str(tiny_llada_dir), dtype="float32", device="cpu")
    model.module.double()
    outs = []
    for b in (1, 3):
        recipe = _recipe(tiny_llada_dir, tmp_path / f"b{b}.json", method="conv", top_k=2, temperature=0.0)
        recipe.batch_size, recipe.data.limit = b, 5
        recs, _ = run_generate(recipe, model=model)
        outs.append([r["output"] for r in recs])
    assert outs[0] == outs[1]
    assert len(set(outs[0])) > 1  # the prompts matter (not one constant answer)


def _recipe(model_dir, out, **decode):
    return load_recipe(GenerateRecipe, None, [], {
        "model.name": str(model_dir), "output": str(out), "batch_size": 2,
        "data.eval_set": "gsm8k", "data.data_path": str(FIX / "gsm8k.jsonl"), "data.limit": 6,
        "decode.gen_length": 16, "decode.steps": 4, **{f"decode.{k}": v for k, v in decode.items()},
    })


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(tiny_llada_dir, tmp_path):
    full, _ = run_generate(_recipe(tiny_llada_dir, tmp_path / "full.json"))
    out = tmp_path / "cut.json"
    calls = []

    def stop_after_first(recs):
        calls.append(len(recs))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_generate(_recipe(tiny_llada_dir, out), on_batch=stop_after_first)
    partial = list(tmp_path.glob("cut.json.rank0.partial.jsonl"))
    assert partial and not out.exists()
    # a kill -9 in the middle of a write leaves half a line: it is dropped on resume
    with open(partial[0], "a") as f:
        f.write('{"id": "gsm8k-5", "outp')
    seen = {}
    recs, man = run_generate(_recipe(tiny_llada_dir, out), on_start=lambda total, done: seen.update(total=total, done=done))
    assert seen == {"total": 6, "done": 2}
    # exact: the resumed batches ([2, 3], [4, 5]) are the uninterrupted run's, the same kernel path
    assert [r["output"] for r in recs] == [r["output"] for r in full]
    assert json.loads(out.read_text()) == recs and man["items"] == 6


def test_resume_with_other_settings_is_refused(tiny_llada_dir, tmp_path):
    out = tmp_path / "o.json"
    with pytest.raises(KeyboardInterrupt):
        run_generate(_recipe(tiny_llada_dir, out), on_batch=lambda r: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(ConfigError, match="steps"):
        run_generate(_recipe(tiny_llada_dir, out, steps=8))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--decode", "beam"], "decode.method"),
        (["--steps", "0"], "decode.steps"),
        (["--decode", "llada", "--block-length", "5"], "block_length"),
        (["--decode", "remdm", "--t-on", "0.2", "--t-off", "0.5"], "t_off"),
        (["--prompt-format", "xml"], "data.prompt_format"),
        (["decode.stpes=3"], "decode.steps"),
        (["--eval-set", "mmlu"], "data.eval_set"),
    ],
)
def test_bad_options_exit_2_with_one_line(tiny_llada_dir, tmp_path, args, needle):
    base = ["generate", "-m", str(tiny_llada_dir), "-p", "hello", "--gen-length", "16", "--steps", "4", "-q"]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_missing_model_and_input_file_exit_2(tmp_path):
    res = runner.invoke(app, ["generate", "-m", str(tmp_path / "nope"), "-p", "hi", "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = runner.invoke(app, ["generate", "-m", str(tmp_path), "--input", str(tmp_path / "none.jsonl"), "-q"])
    assert res.exit_code == 2 and "none.jsonl" in res.output


def test_recipes_in_the_repo_load():
    for path in sorted((REPO / "recipes").glob("generate-*.yaml")) + [REPO / "recipes" / "reference-nucleus.yaml"]:
        text = path.read_text()
        assert text.startswith("# difflm "), f"{path.name} must open with the command that runs it"
        cfg = load_recipe(GenerateRecipe, str(path))
        cfg.decode.validate()


def test_live_view_and_prompt_printing(tiny_llada_dir):
    res = runner.invoke(app, ["generate", "-m", str(tiny_llada_dir), "-p", "the cat", "--gen-length", "8",
                              "--steps", "4", "--live", "-q"])
    assert res.exit_code == 0, res.output
    assert "prompt-0" in res.output


_LAUNCHERS = {
    "torchrun": lambda port: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)],
    # On a CPU-only machine accelerate needs `--multi_gpu` (accelerate 1.x then starts the ranks with torch's
    # elastic launcher; difflm uses gloo): `accelerate launch --cpu --num_processes 2` starts ONE process
    # (accelerate's plain launcher; multi-CPU runs go through mpirun), hence the world_size check.
    "accelerate": lambda port: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port)],
}


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(_LAUNCHERS))
def test_two_ranks_merge_to_the_single_process_output(tiny_llada_dir, tmp_path, launcher):
    """README: `torchrun --nproc_per_node 2 -m cli.main generate ...` and `accelerate launch -m cli.main
    generate ...` on 2 processes give the 1-process file (each rank takes every 2nd item, rank 0 merges)."""
    pytest.importorskip({"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.launch"}[launcher])
    common = ["-m", str(tiny_llada_dir), "--eval-set", "gsm8k", "--data-path", str(FIX / "gsm8k.jsonl"),
              "--limit", "5", "--gen-length", "16", "--steps", "4", "--decode", "topk", "--top-k", "3",
              "--batch-size", "1", "-q"]
    # Token equality across processes is exact here: the same kernel path on both sides (batch size 1, so no
    # padding and the same shapes; one thread in this process (conftest) and in each rank (OMP_NUM_THREADS=1)).
    assert torch.get_num_threads() == 1
    single = tmp_path / "single.json"
    assert runner.invoke(app, ["generate", *common, "-o", str(single)]).exit_code == 0
    multi = tmp_path / "multi.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, *_LAUNCHERS[launcher](free_port()), "-m", "cli.main", "generate", *common, "-o", str(multi)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(Path(str(multi) + ".manifest.json").read_text())["world_size"] == 2
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["output"] for r in a] == [r["output"] for r in b]


def test_nucleus_reference_answers_from_an_ar_model(tmp_path):
    """--decode nucleus on a causal model (difflm's own KV-cached sampling loop): reproducible, cut at EOS."""
    from difflm.testing import build_tiny_ar

    ar = build_tiny_ar(tmp_path / "ar")
    outs = []
    for name in ("a.json", "b.json"):
        res = runner.invoke(app, ["generate", "-m", str(ar), "--family", "ar", "--decode", "nucleus", "--top-p", "0.9",
                                  "--gen-length", "12", "--input", str(FIX / "instructions.jsonl"), "-o",
                                  str(tmp_path / name), "-q"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads((tmp_path / name).read_text()))
    assert [r["output"] for r in outs[0]] == [r["output"] for r in outs[1]]  # same seed, same batch: same text
    assert all(0 <= r["content_tokens"] <= 12 and r["nfe"] <= 12 for r in outs[0])
    man = json.loads((tmp_path / "a.json.manifest.json").read_text())
    assert man["family"] == "ar" and man["decode"]["method"] == "nucleus"


def test_decoder_and_model_family_must_match(tiny_llada_dir, tmp_path, monkeypatch):
    """A diffusion decoder on an AR model, or nucleus on a diffusion model: one line, exit 2, before loading."""
    import difflm.generation as generation
    from difflm.testing import build_tiny_ar

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generation, "load_recipe_model", no_load)
    ar = build_tiny_ar(tmp_path / "ar")
    for model, decode, words in ((ar, "llada", ("autoregressive", "nucleus")), (tiny_llada_dir, "nucleus", ("diffusion",))):
        res = runner.invoke(app, ["generate", "-m", str(model), "--decode", decode, "-p", "Hi", "-q"])
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: decode.method:") and "Traceback" not in res.output
        assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("tau", ["1.5", "0", "-1"])
def test_threshold_outside_zero_one_fails_with_one_line_before_loading(tmp_path, tau):
    # the model folder does not exist: the threshold must be refused before the model is looked at
    res = runner.invoke(app, ["generate", "-m", str(tmp_path / "no-model"), "-p", "hi", "--decode", "threshold",
                              "--threshold", tau, "-o", str(tmp_path / "o.json"), "-q"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "decode.threshold" in lines[0] and "(0, 1]" in lines[0], lines
    assert str(float(tau)) in lines[0] and not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------------------------------------
# README promises: output cutting, resume refusal, manifest contents, batching order, recipes
@pytest.fixture(scope="module")
def tiny_llada_model(tiny_llada_dir):
    from difflm.models import load_model

    return load_model(str(tiny_llada_dir), dtype="float32", device="cpu")


def test_outputs_are_cut_at_the_first_eos_or_eot_and_decoded_without_special_tokens(tiny_llada_model):
    from difflm.generation import decode_output

    m = tiny_llada_model
    tok, ids = m.tokenizer, m.ids
    assert ids.eos_id != ids.eot_id and ids.eot_id is not None and ids.bos_id is not None
    w1, w2, w3 = tok.encode("the cat", add_special_tokens=False)[:3]
    words = tok.decode([w1, w2])
    assert words and words != tok.decode([w1, w2, w3])
    # cut at EOT (the first stop), even with an EOS further on
    assert decode_output(m, [w1, w2, ids.eot_id, w3, ids.eos_id]) == (words, 2)
    # cut at EOS
    assert decode_output(m, [w1, ids.eos_id, w2]) == (tok.decode([w1]), 1)
    # no stop id: everything is content
    assert decode_output(m, [w1, w2, w3]) == (tok.decode([w1, w2, w3]), 3)
    # a special token inside the content is dropped from the text (it still counts as a generated token)
    text, n = decode_output(m, [w1, ids.bos_id, w2, ids.eos_id])
    assert text == words and "<|bos|>" not in text and n == 3


@pytest.mark.parametrize(
    "section,key,value",
    [("model", "dtype", "float32"), ("data", "prompt_format", "raw"), ("data", "limit", 4)],
)
def test_resume_with_other_model_or_data_settings_is_refused(tiny_llada_dir, tmp_path, section, key, value):
    out = tmp_path / "o.json"
    with pytest.raises(KeyboardInterrupt):
        run_generate(_recipe(tiny_llada_dir, out), on_batch=lambda r: (_ for _ in ()).throw(KeyboardInterrupt))
    other = _recipe(tiny_llada_dir, out)
    setattr(getattr(other, section), key, value)
    with pytest.raises(ConfigError, match=rf"other {section} settings \({key}\)") as e:
        run_generate(other)
    assert "\n" not in str(e.value)


def test_manifest_records_every_promised_field(tiny_llada_dir, tmp_path):
    from difflm.config import to_dict

    out = tmp_path / "m.json"
    res = runner.invoke(app, _gen_args(tiny_llada_dir, out, "--batch-size", "2", "--seed", "7"))
    assert res.exit_code == 0, res.output
    man = json.loads(Path(str(out) + ".manifest.json").read_text())
    promised = {"model", "adapter", "dtype", "decode", "seed", "prompt_format", "versions", "device",
                "nfe_per_item_mean", "content_tokens", "content_tokens_per_nfe", "decode_seconds", "tokens_per_second"}
    assert promised <= set(man), promised - set(man)
    resolved = load_recipe(GenerateRecipe, str(out) + ".config.yaml")
    assert man["decode"] == to_dict(resolved.decode)  # every decode setting, as resolved
    assert man["decode"]["top_k"] == 2 and man["decode"]["kernel_size"] is None and man["seed"] == 7
    assert man["model"] == str(tiny_llada_dir) and man["adapter"] is None and man["dtype"] == "float32"
    assert man["prompt_format"] == resolved.data.prompt_format
    assert man["nfe_per_item_mean"] == 4
    assert man["content_tokens_per_nfe"] == pytest.approx(man["content_tokens"] / (4 * 5))
    assert man["decode_seconds"] > 0 and {"difflm", "torch", "transformers", "python"} <= set(man["versions"])
    for r in json.loads(out.read_text()):
        assert {"content_tokens", "nfe", "filled", "seconds"} <= set(r), r
        assert r["nfe"] == 4 and 0 <= r["filled"] <= 16 and r["seconds"] > 0


def test_batches_are_sorted_by_prompt_length_and_records_return_in_item_order(tiny_llada_model):
    from difflm.data.prompts import encode_prompt
    from difflm.decoding import DecodeConfig
    from difflm.generation import iter_batches

    m = tiny_llada_model
    texts = ["Paris a", "a", "a a a", "cat"]
    assert [len(encode_prompt(m, t, None, "raw")) for t in texts] == [5, 1, 3, 2]
    items = [{"id": f"it{i}", "instruction": t} for i, t in enumerate(texts)]
    cfg = DecodeConfig(method="llada", gen_length=4, steps=2)
    plens = []
    batches = list(iter_batches(m, items, cfg, prompt_format="raw", batch_size=2,
                                step_callback=lambda ev: plens.append(ev["x"].shape[1] - 4)))
    assert [[r["id"] for r in b] for b in batches] == [["it1", "it3"], ["it2", "it0"]]  # lengths 1, 2 | 3, 5
    assert plens == [2, 2, 5, 5]  # each batch is padded to its longest prompt only
    recipe = load_recipe(GenerateRecipe, None, [], {"model.name": "x", "batch_size": 2, "data.prompt_format": "raw",
                                                    "decode.method": "llada", "decode.gen_length": 4, "decode.steps": 2})
    recs, _ = run_generate(recipe, model=m, items=items)
    assert [r["id"] for r in recs] == ["it0", "it1", "it2", "it3"]


def test_recipes_carry_the_papers_settings():
    def load(name):
        return load_recipe(GenerateRecipe, str(REPO / "recipes" / name))

    g = load("generate-gsm8k.yaml")
    assert (g.decode.method, g.decode.gen_length, g.decode.steps, g.decode.kernel_size, g.decode.top_k) == (
        "conv", 512, 64, 128, 1)
    assert g.data.prompt_format == "chat" and g.data.eval_set == "gsm8k"
    a = load("generate-alpaca-eval.yaml")
    assert (a.decode.method, a.decode.gen_length, a.decode.steps, a.decode.kernel_size, a.decode.top_k) == (
        "conv", 1024, 128, 512, 20)
    assert a.data.prompt_format == "chat" and a.data.eval_set == "alpaca_eval"
    b = load("generate-llada-baseline.yaml")
    assert (b.decode.method, b.decode.gen_length, b.decode.steps, b.decode.block_length) == ("llada", 512, 64, 32)
    assert b.decode.remasking == "low_confidence" and b.decode.effective_temperature() == 0.0
    n = load("reference-nucleus.yaml")
    assert n.decode.method == "nucleus" and n.decode.top_p == 0.95 and n.model.family == "ar"
    assert n.data.eval_set == "alpaca_eval"


@pytest.mark.parametrize("args,key", [(["--repetition-penalty", "1.3"], "decode.repetition_penalty"),
                                      (["--cfg-scale", "1"], "decode.cfg_scale")])
def test_nucleus_refuses_penalty_and_guidance_with_one_line_before_loading(tmp_path, args, key):
    res = runner.invoke(app, ["generate", "-m", str(tmp_path / "no-model"), "--family", "ar", "--decode", "nucleus",
                              "-p", "hi", "-o", str(tmp_path / "o.json"), "-q", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "nucleus" in lines[0], lines
    assert not (tmp_path / "o.json").exists()


def test_left_pad_puts_the_padding_on_the_left_with_a_zero_mask():
    from difflm.generation import left_pad

    ids, am = left_pad([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert am.tolist() == [[1, 1, 1], [0, 0, 1]]
