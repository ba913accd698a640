"""`difflm tokenize | sft | r2ft | merge` end to end on the tiny model, bad recipes, the shipped recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from difflm.config import load_recipe
from difflm.training import TrainRecipe

ROOT = Path(__file__).resolve().parents[1]
TRAIN_RECIPES = ["alpaca", "r2ft-alpaca", "mdlm-alpaca", "ar-reference", "qlora-llada-24gb",
                 "tiny-sft", "tiny-lora", "tiny-r2ft", "tiny-pretrain"]



@pytest.fixture
def runner():
    return CliRunner()


def ok(result):
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


@pytest.mark.parametrize("cmd", ["tokenize", "sft", "r2ft", "merge"])
def test_help_has_an_example(runner, cmd):
    result = ok(runner.invoke(app, [cmd, "--help"], terminal_width=200))
    assert f"Example: difflm {cmd}" in result.output


@pytest.mark.numerics
def test_pipeline_tokenize_sft_r2ft_merge(runner, tiny_native_llada_dir, tmp_path):
    model = f"model.name={tiny_native_llada_dir}"
    data = f"data.path={tmp_path / 'data'}"
    res = ok(runner.invoke(app, ["tokenize", "-r", "recipes/tiny-lora.yaml", model, data, "--quiet"], terminal_width=200))
    assert "kept" in res.stdout and "16" in res.stdout and "p90" in res.stdout
    again = runner.invoke(app, ["tokenize", "-r", "recipes/tiny-lora.yaml", model, data, "--quiet"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr

    # LoRA SFT with the live view (not --quiet): progress, the metrics table, the summary line
    sft_dir = tmp_path / "sft"
    res = ok(runner.invoke(app, ["sft", "-r", "recipes/tiny-lora.yaml", model, data, "-o", str(sft_dir), "--max-steps", "3",
                                 "train.eval_every=3"], terminal_width=200))
    assert "done: 3 steps" in res.stderr and "held-out loss" in res.stderr
    assert (sft_dir / "final" / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3] and lines[-1]["split"] == "eval"

    # resume a finished run with more steps
    res = ok(runner.invoke(app, ["sft", "-r", "recipes/tiny-lora.yaml", model, data, "-o", str(sft_dir), "--max-steps", "4",
                                 "--resume", "-q"]))
    assert [json.loads(x)["step"] for x in (sft_dir / "metrics.jsonl").read_text().splitlines()][-1] == 4

    # R2FT continuing the adapter
    r2_dir = tmp_path / "r2ft"
    res = ok(runner.invoke(app, ["r2ft", "-r", "recipes/tiny-r2ft.yaml", model, data, "--adapter", str(sft_dir / "final"),
                                 "--mode", "lora", "-o", str(r2_dir), "--max-steps", "2", "--beta-a", "0.2", "lora.r=8",
                                 "lora.alpha=16", "lora.dropout=0.0"], terminal_width=200))
    assert "LW" in res.stderr and "done: 2 steps" in res.stderr
    rec = json.loads((r2_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"lw", "ll", "margin"} <= set(rec)
    assert "beta_a: 0.2" in (r2_dir / "recipe.yaml").read_text()

    # merge the R2FT adapter into the base
    merged = tmp_path / "merged"
    ok(runner.invoke(app, ["merge", "--adapter", str(r2_dir / "final"), "-o", str(merged)]))
    assert (merged / "model.safetensors").is_file() and json.loads((merged / "config.json").read_text())["is_causal"] is False
    # the merged weights compute what base + adapter computes (other arithmetic, W + BA folded: measured
    # 2e-7 apart), and not what the base alone does (the adapter moved the logits by 6e-2)
    from difflm.models import load_model

    x = torch.randint(0, 150, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = load_model(str(merged), dtype="float32", device="cpu")(x)
        want = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu", adapter=str(r2_dir / "final"))(x)
        base = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")(x)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-3)


BAD = [
    (["sft", "train.global_batch=3", "train.micro_batch=2"], "train.global_batch: must be a multiple of micro_batch"),
    (["sft", "train.mode=lorax"], "train.mode: must be one of"),
    (["sft", "optim.lr=-1"], "optim.lr: must be >= 0"),
    (["sft", "trian.mode=lora"], "unknown key 'trian'"),
    (["r2ft", "r2ft.span_max=3"], "r2ft.span_max: must be >= span_min"),
    (["sft", "train.resume=true", "train.overwrite=true"], "train.resume: resume and overwrite exclude each other"),
    (["sft", "train.mode=qlora", "model.dtype=float32"], "model.dtype: QLoRA keeps"),
    (["merge"], "adapter: no adapter given"),
    (["tokenize", "data.format=xml"], "data.format: must be one of"),
    (["sft", "--max-steps", "0"], "train.max_steps: must be >= 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_recipes_fail_with_one_line(runner, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_runtime_input_errors_fail_with_one_line(runner, tiny_native_llada_dir, tmp_path):
    base = ["-q", f"model.name={tiny_native_llada_dir}", f"train.output_dir={tmp_path / 'run'}", "train.device=cpu"]
    cases = [
        (["sft", *base, f"data.path={tmp_path / 'nowhere'}"], "no tokenized data"),
        (["tokenize", *base, f"data.source={tmp_path / 'missing.jsonl'}", f"data.path={tmp_path / 'd'}"], "does not exist"),
        (["sft", "-q", "model.name=" + str(tmp_path / "no-model"), f"data.path={tmp_path / 'nowhere'}"], "no tokenized data"),
        (["tokenize", "-q", "model.name=" + str(tmp_path / "no-model")], "model: model folder"),
        (["merge", "--adapter", str(tmp_path), "-o", str(tmp_path / "m")], "not a LoRA adapter folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)


def test_data_tokenized_for_another_policy_or_model_fails(runner, tiny_native_llada_dir, tmp_path):
    model = f"model.name={tiny_native_llada_dir}"
    data = f"data.path={tmp_path / 'd'}"
    ok(runner.invoke(app, ["tokenize", "-r", "recipes/tiny-sft.yaml", model, data, "-q"]))
    res = runner.invoke(app, ["sft", "-r", "recipes/tiny-sft.yaml", model, data, "data.eos_policy=all", "-o", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 2 and "eos_policy" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["sft", "-r", "recipes/tiny-sft.yaml", model, data, "-o", str(tmp_path / "r"), "-q",
                              "train.precision=fp16"])
    if not torch.cuda.is_available():
        assert res.exit_code == 2 and "fp16 mixed precision needs a CUDA GPU" in res.stderr


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_shipped_recipes_load_and_open_with_their_command(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(rf"# difflm (tokenize|sft|r2ft) --recipe recipes/{re.escape(name)}\.yaml", first), first
    cfg = load_recipe(TrainRecipe, path)
    if name in ("alpaca", "r2ft-alpaca", "ar-reference", "qlora-llada-24gb"):  # the paper's settings
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.schedule) == (2.5e-5, 0.1, 500, "constant")
        assert (cfg.train.global_batch, cfg.data.max_length, cfg.data.format) == (256, 1024, "alpaca")
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
        assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    if name == "r2ft-alpaca":
        assert (cfg.r2ft.beta_w, cfg.r2ft.beta_l, cfg.r2ft.beta_a, cfg.r2ft.gamma, cfg.train.max_steps) == (1, 1, 0.1, 0, 300)
    if name == "qlora-llada-24gb":
        assert cfg.train.mode == "qlora" and cfg.train.gradient_checkpointing and cfg.train.micro_batch == 1


ACCELERATE_CONFIGS = {  # name: (distributed_type, FSDP version or ZeRO stage, offload)
    "ddp": ("MULTI_GPU", None, False), "fsdp2": ("FSDP", 2, False), "fsdp2-offload": ("FSDP", 2, True),
    "zero2": ("DEEPSPEED", 2, False), "zero2-offload": ("DEEPSPEED", 2, True),
    "zero3": ("DEEPSPEED", 3, False), "zero3-offload": ("DEEPSPEED", 3, True),
}


def test_accelerate_configs_are_shipped_and_load():
    """Every launcher config opens with its own command and loads with accelerate's config reader as it says."""
    from accelerate.commands.config.config_args import ClusterConfig

    folder = ROOT / "recipes" / "accelerate"
    assert {p.stem for p in folder.glob("*.yaml")} == set(ACCELERATE_CONFIGS)
    for name, (kind, level, offload) in ACCELERATE_CONFIGS.items():
        path = folder / f"{name}.yaml"
        assert path.read_text().startswith(f"# accelerate launch --config_file recipes/accelerate/{name}.yaml -m cli.main ")
        cfg = ClusterConfig.from_yaml_file(str(path))
        assert str(cfg.distributed_type).split(".")[-1] == kind
        if kind == "FSDP":
            assert cfg.fsdp_config["fsdp_version"] == level and cfg.fsdp_config["fsdp_offload_params"] is offload
        if kind == "DEEPSPEED":
            ds = cfg.deepspeed_config
            assert ds["zero_stage"] == level and (ds["offload_optimizer_device"] == "cpu") is offload


# -- merge never loses the existing output ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tiny_native_llada_dir, tmp_path_factory):
    """A LoRA adapter (random, non-zero B) on the tiny native model, made with peft directly."""
    from peft import LoraConfig, get_peft_model

    from difflm.models import load_model

    m = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    module = get_peft_model(m.module, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    module.save_pretrained(str(out))
    return out


def _existing_output(tmp_path):
    out = tmp_path / "merged"
    out.mkdir(parents=True)
    (out / "SENTINEL").write_text("the previous merge")
    return out


def _assert_untouched(out):
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp or .old folder left
    assert sorted(p.name for p in out.iterdir()) == ["SENTINEL"] and (out / "SENTINEL").read_text() == "the previous merge"


def test_failed_merge_leaves_the_existing_output_untouched(runner, tiny_adapter, tmp_path, tmp_path_factory):
    import shutil

    from difflm.testing import build_tiny_native_llada

    out = _existing_output(tmp_path / "o")
    # a corrupted (truncated) adapter file
    bad = tmp_path / "bad-adapter"
    shutil.copytree(tiny_adapter, bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    res = runner.invoke(app, ["merge", "--adapter", str(bad), "-o", str(out), "--overwrite"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read adapter" in lines[0] and str(bad) in lines[0], lines
    _assert_untouched(out)
    # an adapter for another base model (hidden size 32, not 64)
    other = build_tiny_native_llada(tmp_path_factory.mktemp("other") / "m", d_model=32)
    res = runner.invoke(app, ["merge", "--adapter", str(tiny_adapter), "-m", str(other), "-o", str(out), "--overwrite"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit this base model" in lines[0] and "size mismatch" in lines[0], lines
    _assert_untouched(out)
    # and a successful merge replaces it
    ok(runner.invoke(app, ["merge", "--adapter", str(tiny_adapter), "-o", str(out), "--overwrite"]))
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert not (out / "SENTINEL").exists() and (out / "model.safetensors").is_file()


def test_merge_failing_while_saving_leaves_the_output_untouched(tiny_adapter, tiny_native_llada_dir, tmp_path,
                                                                 monkeypatch):
    """The disk fills up half-way through writing the merged model (Python API)."""
    import difflm.models
    from difflm.models import load_model
    from difflm.training.merge import MergeRecipe, merge_adapter

    out = _existing_output(tmp_path)
    real_save = difflm.models.save_native

    def disk_full(model, dir, *a, **k):
        real_save(model, dir, *a, **k)  # the files are written (into the temporary folder) ...
        raise OSError(28, "No space left on device")  # ... and then the disk is full

    monkeypatch.setattr(difflm.models, "save_native", disk_full)
    with pytest.raises(OSError, match="No space left"):
        merge_adapter(MergeRecipe(adapter=str(tiny_adapter), output=str(out), overwrite=True))
    _assert_untouched(out)
    monkeypatch.setattr(difflm.models, "save_native", real_save)
    assert merge_adapter(MergeRecipe(adapter=str(tiny_adapter), output=str(out), overwrite=True)) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name] and not (out / "SENTINEL").exists()
    merged = load_model(str(out), dtype="float32", device="cpu")
    assert merged.family == "llada" and not hasattr(merged.module, "peft_config")
    x = torch.randint(0, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu", adapter=str(tiny_adapter))(x)
        base = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")(x)
        got = merged(x)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-3)


def test_merge_refuses_to_write_over_its_own_adapter_or_base(runner, tiny_adapter, tiny_native_llada_dir):
    for folder, what in ((tiny_adapter, "adapter"), (tiny_native_llada_dir, "base model")):
        before = sorted(p.name for p in folder.iterdir())
        res = runner.invoke(app, ["merge", "--adapter", str(tiny_adapter), "-o", str(folder), "--overwrite"])
        assert res.exit_code == 2, (res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is the {what} folder" in lines[0], lines
        assert sorted(p.name for p in folder.iterdir()) == before


def test_merge_refuses_a_file_or_link_as_output_before_loading(runner, tmp_path):
    # an adapter folder whose base does not exist: the output must be refused before any load is tried
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "%s"}' % (tmp_path / "nowhere"))
    target = _existing_output(tmp_path / "t")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    for out, kind in ((tmp_path / "link", "link"), (tmp_path / "file", "file")):
        res = runner.invoke(app, ["merge", "--adapter", str(tmp_path), "-o", str(out), "--overwrite"])
        assert res.exit_code == 2, (res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is a {kind}" in lines[0], lines
    _assert_untouched(target)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "file").read_text() == "x"


def _recipe_files() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_opens_with_the_command_that_runs_it(path):
    """README: each recipe opens with the command that runs it -- every file under recipes/, so a new one is
    covered too: the command is a difflm subcommand (or accelerate launch of one) given this very file."""
    from difflm.generation import GenerateRecipe

    rel = path.relative_to(ROOT).as_posix()
    first = path.read_text().splitlines()[0]
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    if path.parent.name == "accelerate":
        m = re.fullmatch(rf"# accelerate launch --config_file {re.escape(rel)} -m cli\.main (\w+) --recipe (\S+)( .*)?", first)
        assert m, first
        assert m.group(1) in commands and (ROOT / m.group(2)).is_file(), first
        return
    m = re.fullmatch(rf"# difflm (\w+) --recipe {re.escape(rel)}( .*)?", first)
    assert m and m.group(1) in commands, first
    cfg = load_recipe(GenerateRecipe if m.group(1) == "generate" else TrainRecipe, path)
    assert cfg is not None
