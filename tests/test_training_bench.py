"""bench/qlora_gpu.py: its --tiny CPU path runs, and the in-memory 4-bit route trains LoRA and reloads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("qlora_gpu", ROOT / "bench" / "qlora_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



def test_tiny_runs_and_writes_json(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    out = bench.main(["--tiny", "--steps", "2"])
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "qlora.json").read_text())
    assert printed == saved == json.loads(json.dumps(out))
    assert saved["mode"] == "lora-tiny-cpu" and saved["gradient_checkpointing"] is True
    assert saved["lora"]["layers"] == 3 * saved["dims"]["layers"] and len(saved["step_times_s"]) == 2
    assert saved["step_time_s"] > 0 and all(x > 0 for x in saved["losses"])


def test_tiny_with_4bit_layers_on_cpu(bench):
    pytest.importorskip("bitsandbytes")
    out = bench.main(["--tiny", "--bnb", "--steps", "1"])
    assert out["mode"] == "qlora-nf4-double-quant" and out["quantized_linear_layers"] == 7 * out["dims"]["layers"]


@pytest.mark.numerics
def test_4bit_base_lora_step_saves_and_reloads(bench, tiny_native_llada_dir, tmp_path):
    """QLoRA's pieces on the CPU (bitsandbytes' CPU backend): NF4 base + LoRA trains a step; the
    adapter alone reloads onto a freshly quantised base with the same logits."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from difflm.models import load_model
    from difflm.training.loop import add_lora, enable_gradient_checkpointing
    from difflm.training.losses import sft_batch_loss
    from difflm.training.recipes import LoraConfig

    def quantized_base():
        m = load_model(str(tiny_native_llada_dir), dtype="bfloat16", device="cpu")
        bench.quantize_4bit_(m.module, torch.device("cpu"))
        m.module.requires_grad_(False)
        return m

    m = quantized_base()
    m.module = add_lora(m.module, LoraConfig(r=4, alpha=8, dropout=0.0), m.lora_target_modules)
    enable_gradient_checkpointing(m.module)
    m.module.train()
    opt = torch.optim.AdamW([p for p in m.module.parameters() if p.requires_grad], lr=1e-2)
    x0 = torch.randint(0, 150, (2, 32))
    batch = {"input_ids": x0, "prompt_len": torch.tensor([4, 6]), "answer_len": torch.tensor([28, 26])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = sft_batch_loss(m, batch, [0, 1], seed=0, mask_id=m.ids.mask_id)
    loss.backward()
    opt.step()
    m.module.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    m.module.eval()
    again = quantized_base()
    again.module = PeftModel.from_pretrained(again.module, str(tmp_path / "adapter"))
    again.module.eval()
    fresh = quantized_base()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got, base = m(x0).float(), again(x0).float(), fresh(x0).float()
    assert torch.allclose(want, got, atol=1e-3)
    assert not torch.allclose(want, base, atol=1e-3)
