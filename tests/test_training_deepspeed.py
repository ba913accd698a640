"""DeepSpeed through accelerate (`recipes/accelerate/zero*.yaml`): what runs on this CPU-only machine.

accelerate enables DeepSpeed only in GPU processes or, with no GPU, in a single process on DeepSpeed's CPU
accelerator (with several CPU processes accelerate counts one process and DeepSpeed two, so its batch check
fails): the test runs the recipe files' own command with `--num_processes 1` -- ZeRO-2 and ZeRO-3 each for 2
optimiser steps (accumulation 2, so DeepSpeed's own accumulation and clipping are exercised), a checkpoint, a
--resume to step 3, equal to the plain loop within the stated tolerance; final/ loads with load_model.
Sharding over several GPUs is left to a GPU machine (difflm/training/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from difflm.config import to_dict
from difflm.testing import free_port
from difflm.training import sft

from test_training_loop import ENV, ROOT, recipe, relative_update_gap, start_weights, tiny_data, weights  # noqa: F401

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')")

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate.utils import DistributedType
    from difflm.config import from_dict
    from difflm.training import TrainRecipe, train

    for job in json.loads(open(sys.argv[1]).read()):
        result = train(from_dict(TrainRecipe, job["cfg"]), "sft")
        engine = result.model.module
        torch.save({k: v.detach().float().clone() for k, v in engine.state_dict().items()}, job["out"])
    """
)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_single_cpu_process_trains_resumes_and_equals_the_plain_loop(config, tiny_native_llada_dir, tiny_data,
                                                                               tmp_path):
    model = tiny_native_llada_dir
    ds = recipe(model, tiny_data, tmp_path / "ds", train={"max_steps": 2, "save_every": 1, "micro_batch": 2})
    more = recipe(model, tiny_data, tmp_path / "ds", train={"max_steps": 3, "save_every": 1, "micro_batch": 2, "resume": True})
    script = tmp_path / "ds_jobs.py"
    script.write_text(_SCRIPT)
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([{"cfg": to_dict(ds), "out": str(tmp_path / "a.pt")},
                                {"cfg": to_dict(more), "out": str(tmp_path / "b.pt")}]))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"),
         "--num_processes", "1", "--main_process_port", str(free_port()), str(script), str(spec)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = tmp_path / "ds" / "checkpoints" / "step-0000002" / "state"
    assert any(p.name.startswith("pytorch_model") for p in state.iterdir()), sorted(p.name for p in state.iterdir())
    # the plain loop (no DeepSpeed) with the same data, noise and global batch: the engine's own accumulation
    # (it divides by the accumulation itself) and clipping must give the same update. fp32 (the recipe's
    # precision) but other kernels: the stated tolerance of the multi-process tests (a lost micro-batch gives ~1)
    plain = sft(recipe(model, tiny_data, tmp_path / "plain", train={"max_steps": 3, "micro_batch": 2}))
    resumed = torch.load(tmp_path / "b.pt")
    gap = relative_update_gap(resumed, weights(plain), start_weights(model))
    assert gap < 2e-2, gap
    lines = [json.loads(x) for x in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert [r["loss"] for r in lines] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
    # a gradient accumulated twice as large (the loss divided twice, or not at all) shows in the norm
    assert [r["grad_norm"] for r in lines] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-3)
    from difflm.models import load_model

    final = load_model(str(tmp_path / "ds" / "final"), dtype="float32", device="cpu")
    for name, value in final.module.state_dict().items():
        assert torch.allclose(value, resumed[name], atol=1e-6), name
