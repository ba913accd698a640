"""FSDP2 (`train.strategy: fsdp2`, difflm/training/fsdp.py) on 2 CPU processes (torchrun, gloo): full SFT and
R2FT equal one process, kill -9 + --resume from the sharded (DCP) checkpoint equals an uninterrupted run, the
consolidated final/ loads with `load_model` and equals the trained weights; the wrap units per family."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from difflm.config import to_dict
from difflm.errors import ConfigError
from difflm.testing import free_port
from difflm.training import sft, train
from difflm.training.fsdp import wrap_classes

from test_training_loop import ENV, ROOT, recipe, relative_update_gap, start_weights, tiny_data, weights  # noqa: F401

# Every job of a launch runs in the same 2 processes, one after the other; `kill_at` SIGKILLs rank 0 when it
# logs that step (torchrun then ends rank 1): what a crashed node does to a run.
_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from difflm.config import from_dict
    from difflm.training import TrainRecipe, train
    from difflm.training.fsdp import full_state_dict

    for job in json.loads(open(sys.argv[1]).read()):
        cfg = from_dict(TrainRecipe, job["cfg"])
        def on_event(ev, kill_at=job.get("kill_at")):
            if ev["event"] == "step" and ev["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        result = train(cfg, job["kind"], callback=on_event)
        module = result.model.module
        local = sum(p.to_local().numel() for p in module.parameters())
        full = full_state_dict(module)  # collective: every rank calls it
        rank = int(os.environ["RANK"])
        torch.save({"local_numel": local, "total_numel": sum(p.numel() for p in module.parameters())},
                   job["out"] + f".numel{rank}")
        if rank == 0:
            torch.save(full, job["out"])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def _launch(jobs: list[dict], tmp_path: Path, name: str, accelerate_config: Path | None = None) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node 2, or `accelerate launch --config_file F --num_processes 2` (the recipe's command)."""
    script = tmp_path / "fsdp_jobs.py"
    script.write_text(_SCRIPT)
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    if accelerate_config is None:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
    else:
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), "--num_processes", "2",
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    return subprocess.run([sys.executable, *launcher, str(script), str(spec)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _job(cfg, kind: str, out: Path, **extra) -> dict:
    return {"cfg": to_dict(cfg), "kind": kind, "out": str(out), **extra}


FSDP = {"strategy": "fsdp2", "micro_batch": 1}  # 2 ranks x micro-batch 1 x accumulation 2 = global batch 4


@pytest.mark.numerics
@pytest.mark.slow
def test_fsdp2_two_processes_sft_r2ft_resume_and_final(tiny_native_llada_dir, tiny_data, tmp_path):
    model = tiny_native_llada_dir
    r2 = {"span_min": 8, "span_max": 12}
    a = recipe(model, tiny_data, tmp_path / "a", train={**FSDP, "max_steps": 4, "save_every": 2})
    r = recipe(model, tiny_data, tmp_path / "r", train={**FSDP, "max_steps": 3}, r2ft=r2)
    k = recipe(model, tiny_data, tmp_path / "k", train={**FSDP, "max_steps": 4, "save_every": 2})
    first = _launch([_job(a, "sft", tmp_path / "a.pt"), _job(r, "r2ft", tmp_path / "r.pt"),
                     _job(k, "sft", tmp_path / "k.pt", kill_at=3)], tmp_path, "first")
    assert first.returncode != 0 and (tmp_path / "r.pt").is_file(), first.stderr[-3000:]  # the killed job ended it
    assert not (tmp_path / "k" / "final").exists()
    ck = tmp_path / "k" / "checkpoints" / "step-0000002"
    # the sharded checkpoint: DCP files of both ranks, no full copy of the weights
    assert {p.name for p in (ck / "sharded").iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not (ck / "model").exists()
    assert json.loads((ck / "trainer_state.json").read_text())["strategy"] == "fsdp2"
    # the resume runs under `accelerate launch` with recipes/accelerate/fsdp2.yaml (train.strategy auto -> fsdp2 from
    # the launcher; the file also turns on activation checkpointing, which reruns the same kernels)
    k2 = recipe(model, tiny_data, tmp_path / "k", train={"micro_batch": 1, "max_steps": 4, "save_every": 2, "resume": True})
    second = _launch([_job(k2, "sft", tmp_path / "k.pt")], tmp_path, "second", ROOT / "recipes" / "accelerate" / "fsdp2.yaml")
    assert second.returncode == 0, second.stderr[-3000:]

    wa, wk, wr = (torch.load(tmp_path / f"{n}.pt") for n in "akr")
    # really sharded: each rank held about half of the parameters (each tensor split by rows over 2 ranks)
    n0, n1 = (torch.load(f"{tmp_path / 'a.pt'}.numel{i}") for i in (0, 1))
    assert n0["local_numel"] + n1["local_numel"] == n0["total_numel"] and n0["local_numel"] < 0.6 * n0["total_numel"]

    # 1. 2 ranks (FSDP2, gloo reduce-scatter, micro-batch 1 x 2) == one plain process with micro-batch 4: other
    # kernels and summation orders, so the stated tolerance of the DDP tests (a lost micro-batch gives ~1)
    one = sft(recipe(model, tiny_data, tmp_path / "one", train={"micro_batch": 4, "max_steps": 4}))
    gap = relative_update_gap(wa, weights(one), start_weights(model))
    assert gap < 2e-2, gap
    # 2. kill -9 at step 3 + --resume from the step-2 shards == the uninterrupted run: the same 2 processes and
    # kernels, the shards hold the fp32 weights and AdamW states exactly, the RNG comes back: bit-equal
    assert wk.keys() == wa.keys()
    for name in wa:
        assert torch.equal(wk[name], wa[name]), (name, float((wk[name] - wa[name]).abs().max()))
    steps = [json.loads(x)["step"] for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = json.loads((tmp_path / "k" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["strategy"] == "fsdp2" and state["world_size"] == 2
    # 3. the consolidated final/ loads with load_model (native LLaDA format) and holds the trained weights
    from difflm.models import load_model

    final = load_model(str(tmp_path / "a" / "final"), dtype="float32", device="cpu")
    assert final.family == "llada"
    loaded = final.module.state_dict()
    for name, value in wa.items():
        assert torch.equal(loaded[name], value), name
    # 4. R2FT the same: 2 FSDP2 ranks == one process, within the tolerance above
    r_one = train(recipe(model, tiny_data, tmp_path / "r_one", train={"micro_batch": 4, "max_steps": 3}, r2ft=r2), "r2ft")
    gap = relative_update_gap(wr, weights(r_one), start_weights(model))
    assert gap < 2e-2, gap
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all({"lw", "ll", "margin"} <= set(x) for x in lines)


# -- in-process checks (no launcher) ----------------------------------------------------------------------
def test_fsdp2_refuses_adapters_fp16_and_a_missing_launcher(tiny_native_llada_dir, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="mode lora"):
        sft(recipe(tiny_native_llada_dir, tiny_data, tmp_path / "l", train={"strategy": "fsdp2", "mode": "lora"}))
    with pytest.raises(ConfigError, match="precision bf16"):
        sft(recipe(tiny_native_llada_dir, tiny_data, tmp_path / "f", train={"strategy": "fsdp2", "precision": "fp16"}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fsdp.cpu_offload"):
            sft(recipe(tiny_native_llada_dir, tiny_data, tmp_path / "o", train={"strategy": "fsdp2"}, fsdp={"cpu_offload": True}))
    with pytest.raises(ConfigError, match="torchrun"):  # one process without torch.distributed
        sft(recipe(tiny_native_llada_dir, tiny_data, tmp_path / "n", train={"strategy": "fsdp2"}))


def test_fsdp2_accelerate_config_selects_and_configures_fsdp2(tiny_native_llada_dir, tiny_data, tmp_path, monkeypatch):
    from difflm.training.loop import _fsdp_settings

    cfg = recipe(tiny_native_llada_dir, tiny_data, tmp_path / "x")
    assert _fsdp_settings(cfg)[0] == "ddp"  # no launcher config: auto = ddp
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp2.yaml"):
        _fsdp_settings(cfg)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    strategy, settings = _fsdp_settings(cfg)
    assert strategy == "fsdp2" and settings["cpu_offload"] is True and settings["wrap"] == ["LlamaDecoderLayer"]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


class _Tied(nn.Module):
    """Blocks in a ModuleList (no _no_split_modules), the embedding a block of its own class tied to the head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_wrap_units_per_family(tiny_native_llada_dir):
    from transformers import BertConfig, BertForMaskedLM, Qwen2Config, Qwen2ForCausalLM

    from difflm.models import load_model
    from difflm.training.fsdp import _units

    llada = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu").module
    assert wrap_classes(llada) == ["LlamaDecoderLayer"]
    assert len(_units(llada, ["LlamaDecoderLayer"])) == llada.config.num_hidden_layers
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=64))
    assert wrap_classes(qwen) == ["Qwen2DecoderLayer"]  # Dream's blocks
    bert = BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=64))
    assert set(wrap_classes(bert)) == {"BertLayer", "BertEmbeddings"}  # BertModel's _no_split_modules
    # the word embeddings are tied to the MLM head: BertEmbeddings stays in the root unit, the layers are units
    assert [type(u).__name__ for u in _units(bert, wrap_classes(bert))] == ["BertLayer", "BertLayer"]
    tied = _Tied()
    assert wrap_classes(tied) == ["_Block"]  # no _no_split_modules: the blocks of the largest ModuleList
    assert len(_units(tied, ["_Block"])) == 3
    assert _units(tied, ["Embedding"]) == []  # tied to the head: stays in the root unit
    with pytest.raises(ConfigError, match="fsdp.wrap"):
        wrap_classes(tied, ["MDLMBlock"])
