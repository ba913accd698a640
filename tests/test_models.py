"""difflm.models: loading every family, the LLaDA -> bidirectional Llama mapping, ids, errors."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from difflm.errors import ConfigError
from difflm.models import (
    BidirectionalityError,
    DiffusionLM,
    TokenIds,
    detect_family,
    save_native,
)
from difflm.models import load_model as _load_model
from difflm.models import hub, loading
from difflm.testing import (
    LLADA_CHAT_TEMPLATE,
    TINY_SPECIAL_TOKENS,
    TinyDream,
    TinyMDLM,
    build_tiny_ar,
    build_tiny_llada_checkpoint,
    build_tiny_mlm,
    build_tiny_tokenizer,
    network_attempts,
    tiny_token_ids,
)


def load_model(*args, **kwargs):
    """load_model pinned to the CPU (unless a test names a device), so results compare exactly."""
    kwargs.setdefault("device", "cpu")
    return _load_model(*args, **kwargs)


def _one_line_config_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


def _ids(n=9, batch=2, high=190, seed=0):
    return torch.randint(0, high, (batch, n), generator=torch.Generator().manual_seed(seed))


# -- the reference checkpoint made with LLaDA's own code ---------------------------------------------
LLADA_REFERENCE = Path(__file__).parent / "fixtures" / "llada-tiny-reference"  # provenance: its README.md

# LLaDA's own attention and ours (float32 SDPA through the key mapping) are different kernels. Measured: max abs
# difference 0.0 on an AMD EPYC (1 and 2 threads); the reference's own float32 rounding error (our model run in
# float64 against it) is 3.1e-6, logits up to 4.3. 1e-4 leaves 30x for another CPU's kernels, and is far below
# what a real mapping bug gives: rms_norm_eps 1e-6 instead of 1e-5 moves the logits by 3.4e-3, rope_theta 1e4
# instead of 5e5 by 2.2.
REFERENCE_ATOL = 1e-4


@pytest.mark.numerics
def test_llada_reference_logits():
    from safetensors.torch import load_file

    ref = load_file(str(LLADA_REFERENCE / "reference.safetensors"))
    m = load_model(str(LLADA_REFERENCE), dtype="float32", device="cpu")
    assert m.family == "llada" and m.tokenizer is None
    assert m.ids == TokenIds(mask_id=296, eos_id=295, eot_id=None, pad_id=295, bos_id=None)
    assert m.max_length == 64
    with torch.no_grad():
        logits = m(ref["input_ids"])
        assert logits.shape == ref["logits"].shape
        assert (logits - ref["logits"]).abs().max() <= REFERENCE_ATOL
        keep = ref["padded_attention_mask"].bool()
        assert not keep.all()  # the second row is padded: the key mask is exercised
        padded = m(ref["padded_input_ids"], attention_mask=ref["padded_attention_mask"])
        assert (padded - ref["padded_logits"])[keep].abs().max() <= REFERENCE_ATOL


# -- the tiny LLaDA-format checkpoint ----------------------------------------------------------------
def test_tiny_llada_format_loads(tiny_llada_dir):
    m = load_model(str(tiny_llada_dir), dtype="float32", device="cpu")
    expected = tiny_token_ids(m.tokenizer)
    assert m.family == "llada" and m.is_diffusion
    assert m.ids == TokenIds(
        mask_id=expected["mask_token_id"],
        eos_id=expected["eos_token_id"],
        eot_id=expected["eot_token_id"],
        pad_id=expected["pad_token_id"],
        bos_id=expected["bos_token_id"],
    )
    assert m.ids.stop_ids == (m.ids.eos_id, m.ids.eot_id)
    assert m.max_length == 256 and m.device == torch.device("cpu") and m.dtype == torch.float32
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert not m.module.training
    assert type(m.module).__name__ == "LlamaForCausalLM" and m.module.config.is_causal is False
    x = _ids()
    with torch.no_grad():
        logits = m(x)
        assert logits.shape == (2, 9, m.module.config.vocab_size) and logits.dtype == torch.float32
        # bidirectional: changing the LAST token moves position 0
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 190
        assert (m(y)[:, 0] - logits[:, 0]).abs().max() > 1e-4


@pytest.mark.numerics
def test_left_padding_matches_unpadded(tiny_llada_dir):
    """Key-padding mask + relative RoPE: a left-padded row scores its real tokens as if unpadded."""
    m = load_model(str(tiny_llada_dir), dtype="float32", device="cpu")
    x = _ids(n=7, batch=1)
    pad = torch.full((1, 3), m.ids.pad_id)
    padded = torch.cat([pad, x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        # masked vs unmasked attention: measured max difference 1.5e-7 (logits up to 0.55), a wrong mask gives O(0.1)
        assert torch.allclose(m(padded, attention_mask=mask)[:, 3:], m(x), atol=1e-5)


def test_native_round_trip(tiny_llada_dir, tiny_native_llada_dir, tmp_path):
    a = load_model(str(tiny_llada_dir), dtype="float32", device="cpu")
    config = json.loads((tiny_native_llada_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["is_causal"] is False and config["use_cache"] is False
    assert config["mask_token_id"] == a.ids.mask_id and config["eot_token_id"] == a.ids.eot_id
    b = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    assert b.family == "llada" and b.ids == a.ids and b.max_length == a.max_length
    x = _ids()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # a plain module.save_pretrained also writes the native format (the key mapping is forgotten)
    a.module.save_pretrained(str(tmp_path / "plain"))
    c = load_model(str(tmp_path / "plain"), tokenizer=a.tokenizer)
    assert c.ids == a.ids
    with torch.no_grad():
        assert torch.equal(a(x), c(x))


def test_native_round_trip_without_tokenizer(tmp_path):
    """Ids survive in config.json alone (eot and bos included) when no tokenizer is saved."""
    from difflm.testing import build_tiny_native_llada

    folder = build_tiny_native_llada(tmp_path / "n", with_tokenizer=False)
    m = load_model(str(folder))
    expected = tiny_token_ids()
    assert m.tokenizer is None
    assert (m.ids.mask_id, m.ids.eos_id, m.ids.pad_id, m.ids.bos_id, m.ids.eot_id) == (
        expected["mask_token_id"], expected["eos_token_id"], expected["pad_token_id"],
        expected["bos_token_id"], expected["eot_token_id"],
    )


@pytest.mark.numerics
def test_bfloat16_loads_with_fp32_rope(tiny_llada_dir):
    m32 = load_model(str(tiny_llada_dir), dtype="float32", device="cpu")
    m16 = load_model(str(tiny_llada_dir), dtype="bfloat16", device="cpu")
    assert m16.dtype == torch.bfloat16
    assert m16.module.model.rotary_emb.inv_freq.dtype == torch.float32
    x = _ids()
    with torch.no_grad():
        assert (m16(x).float() - m32(x)).abs().max() < 0.05  # measured 3.8e-3 (logits up to ~0.5)


def test_causal_llama_is_rejected_as_llada(tmp_path):
    folder = build_tiny_ar(tmp_path / "ar")
    assert load_model(str(folder)).family == "ar"
    with pytest.raises(BidirectionalityError) as excinfo:
        load_model(str(folder), family="llada")
    _one_line_config_error(excinfo, "CAUSAL")
    assert isinstance(excinfo.value, ConfigError)
    # a mask id alone does not make a Llama bidirectional: is_causal false is required
    config = json.loads((folder / "config.json").read_text())
    config["mask_token_id"] = tiny_token_ids()["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    assert detect_family(config) == "ar"
    config["is_causal"] = True
    assert detect_family(config) == "ar"


def test_incomplete_key_mapping_fails_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = build_tiny_llada_checkpoint(tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.transformer.blocks.0.att_proj.weight"] = tensors.pop("model.transformer.blocks.0.q_proj.weight")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(folder))
    _one_line_config_error(excinfo, "missing keys", "q_proj", "unexpected keys", "att_proj")


def test_unsupported_llada_config_field(tmp_path):
    folder = build_tiny_llada_checkpoint(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["alibi"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(folder))
    _one_line_config_error(excinfo, "alibi")


# -- ids ---------------------------------------------------------------------------------------------
def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_pad_equal_to_mask_is_rejected(tmp_path):
    folder = build_tiny_llada_checkpoint(tmp_path / "m")
    _edit_config(folder, pad_token_id=tiny_token_ids()["mask_token_id"])
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(folder))
    _one_line_config_error(excinfo, "pad id equals the mask id")
    assert excinfo.value.key == "pad_id"


def test_mask_outside_vocabulary_is_rejected(tmp_path):
    folder = build_tiny_llada_checkpoint(tmp_path / "m", with_tokenizer=False)
    _edit_config(folder, mask_token_id=100_000)
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(folder))
    _one_line_config_error(excinfo, "100000", "outside the vocabulary")


def test_missing_mask_id_is_rejected(tmp_path):
    folder = build_tiny_llada_checkpoint(tmp_path / "m", with_tokenizer=False)
    _edit_config(folder, mask_token_id=None)
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(folder))
    _one_line_config_error(excinfo, "no mask token id")
    assert excinfo.value.key == "mask_id"


def test_eot_id_comes_from_the_token_not_from_encoding(tiny_llada_dir):
    m = load_model(str(tiny_llada_dir))
    assert m.ids.eot_id == m.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert loading.token_id(m.tokenizer, "<|not_a_token|>") is None  # no unk fallback


# -- family detection and argument errors ----------------------------------------------------------------
@pytest.mark.parametrize(
    "config, family",
    [
        ({"model_type": "llada", "architectures": ["LLaDAModelLM"]}, "llada"),
        ({"model_type": "llama", "is_causal": False, "mask_token_id": 5}, "llada"),
        ({"model_type": "qwen2", "is_causal": False, "mask_token_id": 5}, "llada"),
        ({"model_type": "Dream", "architectures": ["DreamModel"]}, "dream"),
        ({"model_type": "mdlm", "architectures": ["MDLM"]}, "mdlm"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "mlm"),
        ({"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"]}, "mlm"),
        ({"model_type": "bert"}, "mlm"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "ar"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "ar"),
        ({"model_type": "llama", "is_causal": True, "mask_token_id": 5}, "ar"),
        ({"model_type": "qwen2"}, "ar"),
    ],
)
def test_detect_family(config, family):
    assert detect_family(config) == family


def test_detect_family_unknown():
    with pytest.raises(ConfigError) as excinfo:
        detect_family({"model_type": "my_vision_thing", "architectures": ["VisionNet"]}, "x")
    _one_line_config_error(excinfo, "my_vision_thing", "llada, dream, mdlm, mlm, ar")


def test_auto_detects_every_local_family(tmp_path, tiny_llada_dir, tiny_native_llada_dir):
    assert load_model(str(tiny_llada_dir)).family == "llada"
    assert load_model(str(tiny_native_llada_dir)).family == "llada"
    assert load_model(str(build_tiny_mlm(tmp_path / "mlm"))).family == "mlm"
    assert load_model(str(build_tiny_ar(tmp_path / "ar"))).family == "ar"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"family": "gpt"}, ["'gpt'", "auto, llada, dream, mdlm, mlm, ar"]),
        ({"dtype": "float8"}, ["'float8'", "auto, float32, bfloat16, float16"]),
        ({"dtype": torch.int8}, ["torch.int8"]),
        ({"quantization": "4bit", "device": "cpu"}, ["quantization needs a CUDA GPU"]),
        ({"quantization": "3bit"}, ["'3bit'", "none, 4bit, 8bit"]),
        ({"device": "gpu"}, ["'gpu'"]),
        ({"adapter": "/nonexistent/adapter"}, ["/nonexistent/adapter"]),
    ],
)
def test_bad_arguments(tiny_llada_dir, kwargs, words):
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(tiny_llada_dir), **kwargs)
    _one_line_config_error(excinfo, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_requested_without_gpu(tiny_llada_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(tiny_llada_dir), device="cuda")
    _one_line_config_error(excinfo, "no CUDA GPU")


def test_missing_path_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(tmp_path / "nope"))
    _one_line_config_error(excinfo, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(tmp_path / "empty"))
    _one_line_config_error(excinfo, "no config.json")

    # offline: only the local cache is looked up. Not one connection is tried (each try would enter
    # huggingface_hub's retry loop, ~25 s per file), so the error is immediate.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with network_attempts() as attempts, pytest.raises(ConfigError) as excinfo:
        load_model("difflm-test-org/no-such-model-xyz")
    assert attempts == []
    _one_line_config_error(excinfo, "no-such-model-xyz", "offline")

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with network_attempts() as attempts, pytest.raises(ConfigError) as excinfo:
        load_model("difflm-test-org/no-such-model-xyz")
    assert attempts == []  # an unreachable Hub is not tried again by the download
    _one_line_config_error(excinfo, "unreachable")


def test_quantization_config():
    q4 = loading.bnb_config("4bit")
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    assert loading.bnb_config("8bit").load_in_8bit


def test_trust_remote_code_plumbing(tiny_llada_dir, tiny_native_llada_dir, monkeypatch):
    """With trust_remote_code the LLaDA folder goes to AutoModel (LLaDA's own code)."""
    import transformers

    calls = []
    native = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_native_llada_dir))

    def fake_from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        return native

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    m = load_model(str(tiny_llada_dir), trust_remote_code=True, dtype="bfloat16", device="cpu")
    assert calls == [(str(tiny_llada_dir), {"trust_remote_code": True, "dtype": torch.bfloat16})]
    assert m.family == "llada" and m.ids.mask_id == tiny_token_ids()["mask_token_id"]


# -- other families --------------------------------------------------------------------------------
MDLM_IDS = TokenIds(mask_id=63, eos_id=62, pad_id=62, bos_id=62)


def test_mdlm_adapter_passes_zero_timesteps():
    module = TinyMDLM(vocab_size=64)
    m = DiffusionLM.from_module(module, "mdlm", MDLM_IDS, vocab_size=64, name="tiny-mdlm")
    assert m.lora_target_modules == ["attn_qkv", "attn_out"]  # the family default (MDLM's DiT names)
    x = _ids(high=64)
    with torch.no_grad():
        logits = m(x)
        assert torch.equal(module.seen_timesteps, torch.zeros(2))
        assert torch.equal(logits, module(x, torch.zeros(2)))
        assert torch.equal(m(x, attention_mask=torch.ones_like(x)), logits)
    with pytest.raises(ValueError, match="no attention mask"):
        m(x, attention_mask=torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], 1))
    with pytest.raises(ConfigError):
        DiffusionLM.from_module(module, "mdlm", TokenIds(mask_id=63, eos_id=62, pad_id=63), vocab_size=64)
    with pytest.raises(ConfigError):
        DiffusionLM.from_module(module, "mdlm", TokenIds(mask_id=64, eos_id=62), vocab_size=64)


def test_mdlm_default_ids_follow_gpt2_convention():
    ids = loading.resolve_ids("mdlm", {"model_type": "mdlm", "vocab_size": 50258}, None, vocab_size=50258)
    assert ids == TokenIds(mask_id=50257, eos_id=50256, eot_id=None, pad_id=50256, bos_id=50256)


@pytest.mark.numerics
def test_dream_adapter_shifts_logits():
    module = TinyDream(vocab_size=64)
    m = DiffusionLM.from_module(module, "dream", TokenIds(mask_id=63, eos_id=62, pad_id=61), vocab_size=64)
    x = _ids(high=60)
    with torch.no_grad():
        raw = module(x, "full", None).logits
        out = m(x)
        assert module.seen == ("full", None)
        assert torch.equal(out[:, 0], raw[:, 0])
        assert torch.equal(out[:, 1:], raw[:, :-1])
        # left padding: boolean [B, 1, L, L] key mask, positions from 0 at the first real token
        pad = torch.full((2, 2), 61)
        mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), torch.ones_like(x)], dim=1)
        padded = m(torch.cat([pad, x], dim=1), attention_mask=mask)
        mask4d, positions = module.seen
        assert mask4d.shape == (2, 1, 11, 11) and mask4d.dtype == torch.bool
        assert positions[0].tolist() == [1, 1] + list(range(9))
        # padded vs unpadded: measured max difference 1.9e-6 with logits up to 9.5 (float32 ulp there ~1e-6),
        # so 1e-4, not 1e-5; a wrong position or key mask moves them by O(1)
        assert torch.allclose(padded[:, 3:], out[:, 1:], atol=1e-4)


def test_mlm_family(tmp_path):
    folder = build_tiny_mlm(tmp_path / "bert")
    m = load_model(str(folder), dtype="float32", device="cpu")
    tok = m.tokenizer
    assert m.family == "mlm" and m.is_diffusion
    assert m.ids == TokenIds(
        mask_id=tok.mask_token_id,
        eos_id=tok.sep_token_id,
        eot_id=None,
        pad_id=tok.pad_token_id,
        bos_id=tok.cls_token_id,
    )
    assert m.lora_target_modules == ["query", "key", "value"]
    enc = tok(["what is the capital of france?", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = m(enc["input_ids"], enc["attention_mask"])
        expected = m.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape == (*enc["input_ids"].shape, len(tok)) and torch.equal(logits, expected)


def test_ar_family(tmp_path):
    folder = build_tiny_ar(tmp_path / "ar")
    m = load_model(str(folder), dtype="float32", device="cpu")
    expected = tiny_token_ids(m.tokenizer)
    assert m.family == "ar" and not m.is_diffusion
    assert m.ids == TokenIds(
        mask_id=None,
        eos_id=expected["eos_token_id"],
        eot_id=expected["eot_token_id"],
        pad_id=expected["pad_token_id"],
        bos_id=expected["bos_token_id"],
    )
    x = _ids()
    with torch.no_grad():
        assert torch.equal(m(x), m.module(input_ids=x).logits)
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 190
        assert torch.equal(m(y)[:, 0], m(x)[:, 0])  # causal


# -- chat template -------------------------------------------------------------------------------------
def test_chat_ids(tiny_llada_dir):
    m = load_model(str(tiny_llada_dir))
    tok = m.tokenizer
    ids = m.chat_ids("  What is 2+2? ")
    assert ids == m.chat_ids([{"role": "user", "content": "What is 2+2?"}])
    text = tok.decode(ids)
    assert text == (
        "<|bos|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids[0] == m.ids.bos_id and ids.count(m.ids.bos_id) == 1
    two_turns = m.chat_ids([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ])
    assert two_turns.count(m.ids.bos_id) == 1 and two_turns.count(m.ids.eot_id) == 2


def test_chat_ids_without_tokenizer(tmp_path):
    m = load_model(str(build_tiny_llada_checkpoint(tmp_path / "m", with_tokenizer=False)))
    assert m.tokenizer is None
    with pytest.raises(ConfigError) as excinfo:
        m.chat_ids("hello")
    _one_line_config_error(excinfo, "no tokenizer")
    # a tokenizer given at load time fills in the text side
    m2 = load_model(str(tmp_path / "m"), tokenizer=build_tiny_tokenizer())
    assert m2.chat_ids("hello")[0] == m2.ids.bos_id and m2.ids.eot_id is not None


# -- LoRA and training -----------------------------------------------------------------------------------
@pytest.mark.numerics
def test_lora_adapter_loading(tiny_llada_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_model(str(tiny_llada_dir), dtype="float32", device="cpu")
    x = _ids()
    with torch.no_grad():
        base_logits = base(x)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=base.lora_target_modules, init_lora_weights=False)
    peft_model = get_peft_model(base.module, config)
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=x).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    m = load_model(str(tiny_llada_dir), dtype="float32", device="cpu", adapter=str(tmp_path / "adapter"))
    assert isinstance(m.module, PeftModel) and not m.module.training
    with torch.no_grad():
        logits = m(x)
    assert (logits - base_logits).abs().max() > 1e-4
    assert torch.allclose(logits, adapted_logits, atol=1e-6)  # the same modules and kernels: measured 0.0
    with pytest.raises(ConfigError, match="merge"):
        save_native(m, tmp_path / "merged")


def test_gradient_checkpointing_backward(tiny_native_llada_dir):
    m = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        m.module.gradient_checkpointing_enable()
        assert m.module.is_gradient_checkpointing
    m.module.train()
    x = _ids()
    logits = m(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
    loss.backward()
    grads = [p.grad for p in m.module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.module.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# -- the tiny tokenizer ------------------------------------------------------------------------------
def test_tiny_tokenizer(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "tok")
    assert len(tok) < 300
    assert tok.convert_ids_to_tokens(list(range(len(tok) - 7, len(tok)))) == list(TINY_SPECIAL_TOKENS)
    assert tok.mask_token == "<|mask|>" and tok.pad_token_id != tok.mask_token_id
    assert tok.chat_template == LLADA_CHAT_TEMPLATE
    text = "Write a poem about 42 cats, please! (Quickly.)"
    ids = tok.encode(text)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok.encode("Hi") == tok.encode("Hi", add_special_tokens=True)  # no automatic specials
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()  # deterministic
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded.encode(text) == ids
    assert reloaded.convert_tokens_to_ids("<|eot_id|>") == tok.convert_tokens_to_ids("<|eot_id|>")


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = build_tiny_llada_checkpoint(tmp_path / "a", seed=3)
    b = build_tiny_llada_checkpoint(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    # every field of a config written by LLaDA's own code (the same fields as LLaDA-8B-Instruct's), no more
    assert set(config) == set(json.loads((LLADA_REFERENCE / "config.json").read_text()))
    assert config["embedding_size"] % 8 == 0 and config["embedding_size"] >= len(build_tiny_tokenizer())
    shutil.rmtree(b)


# -- CUDA only (skipped on CPU machines) ---------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.numerics
def test_cuda_load_matches_cpu(tiny_llada_dir):
    ref_model = load_model(str(tiny_llada_dir), dtype="float32")
    gpu = _load_model(str(tiny_llada_dir), dtype="float32", device=None)  # None -> cuda
    assert gpu.device.type == "cuda" and gpu.ids == ref_model.ids
    x = _ids()
    with torch.no_grad():
        ref = ref_model(x)
        assert torch.allclose(gpu(x).cpu(), ref, atol=1e-4)  # inputs are moved to the model's device
        bf16 = _load_model(str(tiny_llada_dir), dtype="bfloat16", device="cuda")
        assert bf16.dtype == torch.bfloat16 and bf16.module.model.rotary_emb.inv_freq.dtype == torch.float32
        assert (bf16(x).float().cpu() - ref).abs().max() < 0.05
        pad = torch.full((2, 3), gpu.ids.pad_id)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(x)], dim=1)
        padded = gpu(torch.cat([pad, x], dim=1), attention_mask=mask)
        assert torch.allclose(padded[:, 3:].cpu(), ref, atol=1e-4)


@cuda
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.numerics
def test_quantized_llada_on_cuda(tiny_llada_dir, quantization):
    pytest.importorskip("bitsandbytes")
    ref_model = load_model(str(tiny_llada_dir), dtype="float32")
    m = _load_model(str(tiny_llada_dir), device="cuda", quantization=quantization)
    q_proj = m.module.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear4bit" if quantization == "4bit" else "Linear8bitLt")
    assert type(m.module.lm_head).__name__ == "Linear"  # the head stays in full precision
    assert m.dtype == torch.bfloat16 and m.device.type == "cuda"
    x = _ids()
    with torch.no_grad():
        out = m(x).float().cpu()
        ref = ref_model(x)
    assert torch.isfinite(out).all()
    corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.8, corr


@cuda
def test_qlora_backward_with_checkpointing_on_cuda(tiny_llada_dir):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    m = _load_model(str(tiny_llada_dir), device="cuda", quantization="4bit")
    module = get_peft_model(m.module, LoraConfig(r=4, lora_alpha=8, target_modules=m.lora_target_modules))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.train()
    x = _ids().cuda()
    logits = module(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1))
    loss.backward()
    grads = [p.grad for n, p in module.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# -- non-finite weights (a corrupted download) ------------------------------------------------------------
def _poisoned_copy(src, dst, tensor, value):
    """A copy of the checkpoint folder `src` with `value` (nan/inf) written into one element of `tensor`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights[tensor] = weights[tensor].clone()
    weights[tensor].view(-1)[3] = value
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_weights_are_named_not_reported_as_causal(tiny_llada_dir, tmp_path, value, word):
    bad = _poisoned_copy(tiny_llada_dir, tmp_path / "bad", "model.transformer.blocks.1.ff_out.weight", value)
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(bad), dtype="float32")
    assert not isinstance(excinfo.value, BidirectionalityError)
    _one_line_config_error(excinfo, "model.layers.1.mlp.down_proj.weight", word, "finite")
    assert "CAUSAL" not in str(excinfo.value)


def test_non_finite_native_weights_fail_generate_with_one_line(tiny_native_llada_dir, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    bad = _poisoned_copy(tiny_native_llada_dir, tmp_path / "bad", "model.layers.0.self_attn.q_proj.weight", float("nan"))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds NaN"):
        load_model(str(bad), dtype="float32")
    res = CliRunner().invoke(app, ["generate", "-m", str(bad), "--prompt", "hi", "--gen-length", "8", "--steps", "2",
                                   "-q"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layers.0.self_attn.q_proj.weight holds NaN" in lines[0], lines
    assert "Traceback" not in res.output and "CAUSAL" not in res.output


def test_non_finite_adapter_weights_are_named(tiny_native_llada_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    m = load_model(str(tiny_native_llada_dir), dtype="float32")
    peft = get_peft_model(m.module, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(path))
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(path), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as excinfo:
        load_model(str(tiny_native_llada_dir), dtype="float32", adapter=str(tmp_path / "adapter"))
    _one_line_config_error(excinfo, "adapter", "lora_B", "inf")


def test_check_finite_reads_parameters_and_loaded_buffers_only():
    from difflm.models.checks import check_finite

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    m[1].register_buffer("causal_mask", torch.full((2,), float("-inf")), persistent=False)  # computed, not loaded
    m[1].register_buffer("steps", torch.zeros(2, dtype=torch.long))
    check_finite(m)
    m[1].running_var[1] = float("nan")  # a persistent (saved and loaded) buffer
    with pytest.raises(ConfigError, match=r"tensor 1\.running_var holds NaN"):
        check_finite(m, "m")
    m[1].running_var[1] = 1.0
    with torch.no_grad():
        m[0].bias[0] = float("-inf")
    with pytest.raises(ConfigError, match=r"tensor 0\.bias holds inf"):
        check_finite(m, "m")


def test_check_finite_does_not_mistake_an_fp16_sum_overflow_for_corruption():
    from difflm.models.checks import check_finite

    m = torch.nn.Linear(256, 256).half()
    with torch.no_grad():
        m.weight.fill_(60000.0)  # finite, but its fp16 sum overflows to inf
    assert not torch.isfinite(m.weight.sum())
    check_finite(m)
    with torch.no_grad():
        m.weight[5, 7] = float("nan")
    with pytest.raises(ConfigError, match=r"tensor weight holds NaN"):
        check_finite(m)


def test_stop_ids_and_the_padding_fallback():
    """The one copy of "what ends an answer" and "what left-pads a prompt batch" the package uses."""
    from difflm.models.ids import stop_ids_from

    ids = TokenIds(mask_id=5, eos_id=2, eot_id=3)
    assert ids.stop_ids == (2, 3) and ids.pad_or_eos == 2  # no pad: eos pads
    assert TokenIds(mask_id=5, eos_id=2, eot_id=2, pad_id=4).stop_ids == (2,)  # eot == eos: once
    assert TokenIds(mask_id=5, eos_id=2, pad_id=4).pad_or_eos == 4
    assert stop_ids_from(None, 7) == (7,) and stop_ids_from(None, None) == ()
