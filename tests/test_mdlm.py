"""MDLM natively (difflm.models.mdlm) against MDLM's own code: tests/fixtures/mdlm-tiny-reference (provenance:
its README.md) holds a tiny random checkpoint in mdlm-owt's format with logits and SUBS log-probs computed by
MDLM's own DiT. Also: padding (which MDLM's code cannot do), loading, remote code opt-in, the CLI."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from difflm import subs
from difflm.decoding import DecodeConfig, generate
from difflm.errors import ConfigError
from difflm.generation import left_pad
from difflm.models import TokenIds, load_model
from difflm.models import tokenizer as tokenizer_module
from difflm.models.mdlm import MDLMConfig, MDLMForMaskedLM, MDLMTimestepEmbedder

REFERENCE = Path(__file__).parent / "fixtures" / "mdlm-tiny-reference"
MASK = 300  # the fixture's [MASK]: the last id, as 50257 is mdlm-owt's

# Measured (float32, CPU, 1 thread): our logits vs MDLM's own 1.1e-5 (logits up to 41; a float32 ulp there is
# 3.8e-6); the reference's own float32 rounding error (our model in float64 against it) is 4.6e-5. A bug moves
# them by more: LayerNorm eps 1e-6 instead of 1e-5: 2.0e-4; exact instead of tanh GELU: 3.0e-4; interleaved
# instead of half-split rotary: 7.7; sigma not zeroed without time conditioning: 13.7.
REFERENCE_ATOL = 1e-4
# SUBS log-probs at masked positions: measured 1.5e-5 (values down to -81).
SUBS_ATOL = 1e-4
# A left-padded batch vs each row alone (masked vs unmasked SDPA, other GEMM shapes): measured 6.3e-5 with
# logits up to 42 (absolute or mask-counted positions alike); without the attention mask the difference is 3.5.
PADDING_ATOL = 5e-4


@pytest.fixture(scope="module")
def ref():
    return load_file(str(REFERENCE / "reference.safetensors"))


@pytest.fixture(scope="module")
def mdlm():
    return load_model(str(REFERENCE), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def mdlm64():
    """The fixture in float64: for comparisons across kernel paths where tokens must match (see below)."""
    return load_model(str(REFERENCE), dtype=torch.float64, device="cpu")


def _rows(lengths, gen=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(1, MASK - 1, (n,), generator=g), torch.full((gen,), MASK)]) for n in lengths]


# -- against MDLM's own code ---------------------------------------------------------------------------
@pytest.mark.numerics
def test_loads_natively_and_logits_equal_mdlms_own(mdlm, ref):
    m = mdlm
    assert m.family == "mdlm" and isinstance(m.module, MDLMForMaskedLM)  # no remote code
    assert type(m.module).__module__ == "difflm.models.mdlm"
    assert m.ids == TokenIds(mask_id=MASK, eos_id=0, eot_id=None, pad_id=0, bos_id=0)  # [MASK] last, eos = bos
    assert m.max_length == 128 and m.vocab_size == 301 and m.lora_target_modules == ["attn_qkv", "attn_out"]
    assert m.module.config.time_conditioning is False and not m.module.training
    with torch.no_grad():
        logits = m(ref["input_ids"])
        assert logits.shape == ref["logits"].shape and logits.dtype == torch.float32
        assert (logits - ref["logits"]).abs().max() <= REFERENCE_ATOL
        # MDLM's forward takes sigma; without time conditioning it is replaced by 0 (MDLM's rule), as is None
        with_sigma = m.module(ref["input_ids"], timesteps=ref["sigma"]).logits
        assert (with_sigma - ref["logits_sigma"]).abs().max() <= REFERENCE_ATOL
        assert torch.equal(with_sigma, logits)


@pytest.mark.numerics
def test_subs_log_probs_equal_mdlms_own_at_masked_positions(mdlm, ref):
    """difflm's SUBS (MASK logit -inf, float32 log-softmax) vs MDLM's `_subs_parameterization` (MASK logit
    -1e6, log-softmax, unmasked positions one-hot on their token)."""
    x, theirs = ref["input_ids"], ref["subs_log_probs"]
    masked = x == MASK
    assert masked.any() and (~masked).any()
    with torch.no_grad():
        ours = subs.log_probs(mdlm(x), MASK)
    real = torch.arange(ours.shape[-1]) != MASK
    assert (ours[masked][:, real] - theirs[masked][:, real]).abs().max() <= SUBS_ATOL
    assert torch.isneginf(ours[..., MASK]).all() and (theirs[masked][:, MASK] <= -1e5).all()
    # unmasked positions: MDLM's is one-hot on the token there (log-prob 0, everything else <= -1e5). difflm's
    # decoders never change a decoded token and its losses count masked positions only, so they never read these.
    rows = theirs[~masked]
    assert torch.equal(rows.argmax(-1), x[~masked]) and (rows.max(-1).values == 0).all()
    assert (rows.topk(2, dim=-1).values[:, 1] <= -1e5).all()


def test_checkpoint_names_are_mdlm_owts_and_save_round_trips(mdlm, ref, tmp_path):
    theirs = set(load_file(str(REFERENCE / "model.safetensors")))
    assert set(mdlm.module.state_dict()) == theirs  # no renaming: the same names, rotary buffer included
    inv_freq = load_file(str(REFERENCE / "model.safetensors"))["backbone.rotary_emb.inv_freq"]
    head_dim = 64 // 4
    expected = torch.tensor([1.0 / 10_000 ** (2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)
    assert torch.allclose(inv_freq.double(), expected, rtol=1e-6)  # the formula difflm recomputes in float32
    mdlm.module.save_pretrained(str(tmp_path))
    assert set(load_file(str(tmp_path / "model.safetensors"))) == theirs
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mdlm" and "auto_map" not in config  # no claim of remote code
    shutil.copy(REFERENCE / "tokenizer.json", tmp_path)
    shutil.copy(REFERENCE / "tokenizer_config.json", tmp_path)
    again = load_model(str(tmp_path), device="cpu")
    assert again.family == "mdlm" and again.ids == mdlm.ids
    with torch.no_grad():
        assert torch.equal(again(ref["input_ids"]), mdlm(ref["input_ids"]))  # same weights, same kernels


@pytest.mark.numerics
def test_time_conditioning_path(tmp_path, caplog):
    """The sigma path MDLM keeps even where the checkpoint turns it off: sinusoidal features against a float64
    hand computation, and with time_conditioning on, sigma changes the logits (and 0 gives the off model's)."""
    sigma = torch.tensor([0.0, 0.3, 2.5])
    feats = MDLMTimestepEmbedder.features(sigma, 6)
    half = 3
    for b, s in enumerate(sigma.double().tolist()):
        freqs = [math.exp(-math.log(10_000) * i / half) for i in range(half)]
        want = [math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs]
        assert torch.allclose(feats[b].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    assert MDLMTimestepEmbedder.features(sigma, 7).shape == (3, 7)  # odd size: a zero column appended

    torch.manual_seed(0)
    config = MDLMConfig(vocab_size=40, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=2)
    off = MDLMForMaskedLM(config).eval()
    x = torch.randint(0, 39, (2, 10))
    with torch.no_grad():  # MDLM's init: adaLN and the output layer zero, so a fresh model predicts uniformly
        assert not off(x).logits.any() and off.backbone.blocks[0].attn_qkv.weight.std() > 0.05
        for p in off.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    on = MDLMForMaskedLM(MDLMConfig(**{**config.to_dict(), "time_conditioning": True})).eval()
    on.load_state_dict(off.state_dict())
    with torch.no_grad():
        base = off(x).logits
        assert torch.equal(on(x).logits, base) and torch.equal(on(x, timesteps=torch.zeros(2)).logits, base)
        assert torch.equal(off(x, timesteps=torch.tensor([0.5, 1.0])).logits, base)
        moved = on(x, timesteps=torch.tensor([0.5, 1.0])).logits
        assert (moved - base).abs().amax(dim=(1, 2)).min() > 1e-3
    on.save_pretrained(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        load_model(str(tmp_path), device="cpu", tokenizer=str(REFERENCE))
    assert "time-conditioned" in caplog.text and "sigma = 0" in caplog.text  # what the decoders give it, said


# -- what MDLM's own code cannot do: a padded batch ------------------------------------------------------
@pytest.mark.numerics
def test_batch_of_different_prompt_lengths_equals_each_row_alone(mdlm):
    rows = _rows((3, 7, 11))
    ids, am = left_pad([r.tolist() for r in rows], pad_id=mdlm.ids.pad_id)
    assert not am.bool().all()
    with torch.no_grad():
        batch = mdlm(ids, attention_mask=am)
        unmasked = mdlm(ids)
        for i, row in enumerate(rows):
            alone = mdlm(row[None])[0]
            real = batch[i, ids.shape[1] - len(row):]
            assert (real - alone).abs().max() <= PADDING_ATOL
            if i < 2:  # padded rows: without the mask they attend to the padding (O(1) apart)
                assert (unmasked[i, ids.shape[1] - len(row):] - alone).abs().max() > 100 * PADDING_ATOL
        # logits_to_keep runs the output head on the last positions only
        assert torch.allclose(mdlm(ids, attention_mask=am, logits_to_keep=12), batch[:, -12:], atol=1e-5)


@pytest.mark.numerics
@pytest.mark.parametrize("method, extra", [("conv", {"top_k": 3}), ("llada", {"temperature": 0.0, "block_length": 8})])
def test_decoding_a_padded_batch_equals_each_prompt_alone(mdlm64, method, extra):
    """Decoders on a batch of prompts of different lengths (one call) vs each prompt alone, noise seeded per row.
    In float64: padded vs unpadded passes are different kernels, and a token could flip only where two candidates
    are within ~1e-12 (in float32 ~1e-5 apart, and random weights give near-ties)."""
    m = mdlm64
    prompts = [r[r != MASK].tolist() for r in _rows((2, 5, 9), gen=0, seed=3)]
    ids, am = left_pad(prompts, pad_id=m.ids.pad_id)
    cfg = DecodeConfig(method=method, gen_length=16, steps=16, seed=7, eos_fill=False, **extra)
    seeds = [11, 12, 13]
    batch = generate(m, ids, cfg, attention_mask=am, row_seeds=seeds).sequences[:, ids.shape[1]:]
    for i, p in enumerate(prompts):
        alone = generate(m, torch.tensor([p]), cfg, row_seeds=[seeds[i]]).sequences[0, len(p):]
        assert torch.equal(batch[i], alone)
    assert not (batch == MASK).any() and len({tuple(r) for r in batch.tolist()}) == 3


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_kv_cache_window_equals_the_full_pass_right_after_a_refresh(mdlm64, mode):
    """Fast-dLLM's block caches apply to MDLM as to LLaDA (no time conditioning: a pass depends on the tokens
    only): right after a refresh the window attending to cached keys scores as the full pass does."""
    from difflm.decoding.cache import BlockCache

    rows = _rows((4, 8), gen=12)
    x, am = left_pad([r.tolist() for r in rows], pad_id=0)
    kv = BlockCache(mdlm64, mode)
    lo, hi = 10, (14 if mode == "dual" else x.shape[1])
    with torch.no_grad():
        full = kv.full(x, am, lo, hi)
        part = kv.step(x)
        # float64: measured difference 0.0; window positions shifted by the padding give 5.8
        assert torch.allclose(part, full[:, lo:hi], atol=1e-10, rtol=0)
        assert torch.allclose(kv.step(x), part, atol=1e-12, rtol=0)  # the cache was cropped back


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_kv_cache_refreshed_every_step_decodes_as_without(mdlm64, mode):
    import dataclasses

    prompts = [r[r != MASK].tolist() for r in _rows((3, 6), gen=0, seed=5)]
    ids, am = left_pad(prompts, pad_id=0)
    base = DecodeConfig(method="llada", gen_length=16, steps=16, block_length=8, temperature=0.0, eos_fill=False)
    plain = generate(mdlm64, ids, base, attention_mask=am)
    every = generate(mdlm64, ids, dataclasses.replace(base, cache=mode, cache_refresh=1), attention_mask=am)
    assert torch.equal(plain.sequences, every.sequences) and plain.nfe == every.nfe
    fast = generate(mdlm64, ids, dataclasses.replace(base, cache=mode), attention_mask=am)
    assert not (fast.sequences == MASK).any() and fast.nfe == plain.nfe


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft reads the old name
def test_bfloat16_and_training_features(mdlm, ref):
    """bf16 runs (norms, modulation and rotary in float32 inside); gradient checkpointing gives the same
    gradients; LoRA attaches to MDLM's attention projections; MDLMBlock is the FSDP wrap unit."""
    bf16 = load_model(str(REFERENCE), dtype="bfloat16", device="cpu")
    with torch.no_grad():
        low, full = bf16(ref["input_ids"]), mdlm(ref["input_ids"])
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    # measured: mean |bf16 - fp32| 0.074 (max 0.80) with logits up to 41; a wrong rotary gives O(1) means
    assert (low.float() - full).abs().mean() <= 0.3

    assert MDLMForMaskedLM._no_split_modules == ["MDLMBlock"]
    module = MDLMForMaskedLM.from_pretrained(str(REFERENCE), dtype=torch.float32)
    module.config.dropout = 0.0
    for block in module.backbone.blocks:
        block.dropout = 0.0
    module.train()
    x = ref["input_ids"][:2]

    def grads():
        module.zero_grad()
        module(x).logits.float().logsumexp(-1).mean().backward()
        return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])

    plain = grads()
    module.activation_checkpointing_enable()  # transformers' new name of gradient_checkpointing_enable
    assert all(b.gradient_checkpointing for b in module.backbone.blocks)
    assert torch.allclose(grads(), plain, atol=1e-6)

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(module, LoraConfig(r=4, target_modules=["attn_qkv", "attn_out"]))
    assert peft_model.handles_padding  # DiffusionLM passes the attention mask through a peft wrapper too
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


# -- loading: remote code opt-in, tokenizer --------------------------------------------------------------
_REMOTE_CONFIG = """
from transformers import PretrainedConfig

class MDLMConfig(PretrainedConfig):
    model_type = "mdlm"
"""
# The two ways MDLM's own modeling_mdlm.py fails on difflm's stack, reproduced by the real transformers loader:
_REMOTE_MODELS = {
    "flash_attn": "import flash_attn\n",  # its first import (a CUDA-only package)
    "all_tied_weights_keys": (  # a PreTrainedModel that never calls post_init(), as MDLM's
        "import torch\nfrom transformers import PreTrainedModel\nfrom .configuration_mdlm import MDLMConfig\n\n"
        "class MDLM(PreTrainedModel):\n    config_class = MDLMConfig\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n"
        "        self.backbone = torch.nn.Linear(2, 2)\n"
    ),
}


@pytest.mark.parametrize("failure", sorted(_REMOTE_MODELS))
def test_forced_remote_code_fails_in_one_line_that_says_to_drop_the_flag(tmp_path, failure):
    folder = tmp_path / f"mdlm_{failure}"  # transformers caches remote modules by folder name: one each
    shutil.copytree(REFERENCE, folder)
    (folder / "configuration_mdlm.py").write_text(_REMOTE_CONFIG)
    (folder / "modeling_mdlm.py").write_text(_REMOTE_MODELS[failure])
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(folder), device="cpu", trust_remote_code=True)
    message = str(excinfo.value)
    assert "\n" not in message and failure in message and "drop --trust-remote-code" in message
    assert load_model(str(folder), device="cpu").family == "mdlm"  # native by default, remote files or not

    res = CliRunner().invoke(app, ["generate", "-m", str(folder), "-p", "Hi", "--gen-length", "4", "--steps", "2",
                                   "-o", str(tmp_path / "o.json"), "-q", "--trust-remote-code"])
    assert res.exit_code == 2 and "drop --trust-remote-code" in res.output and "Traceback" not in res.output


def test_no_tokenizer_means_gpt2s_named_in_a_warning_or_a_one_line_error(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "mdlm-owt-like"  # mdlm-owt's layout: config and weights, no tokenizer files
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(REFERENCE / name, folder)
    assert tokenizer_module.MDLM_TOKENIZER == "gpt2"
    monkeypatch.setattr(tokenizer_module, "MDLM_TOKENIZER", "difflm-test-org/no-such-gpt2")  # never cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError) as excinfo:
        load_model(str(folder), device="cpu")
    message = str(excinfo.value)
    assert "\n" not in message and "no-such-gpt2" in message and "offline" in message and "--tokenizer" in message
    assert "ships no tokenizer: using GPT-2's" in caplog.text
    m = load_model(str(folder), device="cpu", tokenizer=str(REFERENCE))  # an explicit tokenizer needs no Hub
    assert m.tokenizer is not None and m.ids.mask_id == MASK


# -- end to end --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["conv", "topk"])
def test_difflm_generate_end_to_end(tmp_path, method):
    out = tmp_path / f"{method}.json"
    res = CliRunner().invoke(app, [
        "generate", "-m", str(REFERENCE), "-p", "Hi", "-p", "What is the capital of France?", "-p", "Name a colour.",
        "--prompt-format", "raw", "--gen-length", "16", "--steps", "8", "--decode", method, "--top-k", "3",
        "-o", str(out), "-q",
    ])
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())
    assert [r["id"] for r in recs] == ["prompt-0", "prompt-1", "prompt-2"]
    assert all(r["nfe"] == 8 and isinstance(r["output"], str) for r in recs)
    man = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert man["decode"]["method"] == method and man["items"] == 3
