"""Dream natively (a bidirectional Qwen2 with Dream's shift) against values computed by Dream's own code, the
`dream` decode method against Dream's own `diffusion_generate`, and the opt-in remote-code path's messages.

The fixture (tests/fixtures/dream-tiny-reference, provenance in its README.md) is a tiny random checkpoint in Dream's
own format without its modeling files, with logits and greedy `diffusion_generate` outputs of Dream's own code.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from difflm.decoding import DecodeConfig, generate
from difflm.errors import ConfigError
from difflm.models import TokenIds, detect_family
from difflm.models import load_model as _load_model

DREAM_REFERENCE = Path(__file__).parent / "fixtures" / "dream-tiny-reference"

# Measured (2-core AMD EPYC, torch 2.13, float32): max |difference| 0.0 against Dream's own logits, unpadded and
# left-padded at every slot whose source position is real (logits up to 10.9); the reference's own float32 rounding
# error (our model run in float64 against it) is 2.3e-5. 1e-4 leaves room for another CPU's kernels and is far below
# a mapping bug: a missing shift moves the logits by O(1), positions counted from the padding by O(0.1-1).
DREAM_ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    return load_file(str(DREAM_REFERENCE / "reference.safetensors"))


@pytest.fixture(scope="module")
def settings():
    from safetensors import safe_open

    with safe_open(str(DREAM_REFERENCE / "reference.safetensors"), "pt") as f:
        return json.loads(f.metadata()["settings"])


@pytest.fixture(scope="module")
def dream():
    return _load_model(str(DREAM_REFERENCE), dtype="float32", device="cpu")


# -- loading -----------------------------------------------------------------------------------------
def test_dream_loads_natively_with_its_ids(dream):
    m = dream
    assert m.family == "dream" and m.is_diffusion
    assert type(m.module).__name__ == "Qwen2ForCausalLM" and m.module.config.is_causal is False
    assert set(m.module._no_split_modules) == {"Qwen2DecoderLayer"}  # what the FSDP wrap policy reads
    tok = m.tokenizer
    # ids from config.json (mask 3, eos = pad 0) and the tokenizer's vocabulary (<|im_end|>), never by encoding text
    assert m.ids.mask_id == 3 and m.ids.eos_id == 0 and m.ids.pad_id == 0
    assert m.ids.eot_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert m.ids.stop_ids == (0, 2)
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj"]


def test_dream_detected_from_config():
    assert detect_family({"model_type": "Dream", "architectures": ["DreamModel"]}) == "dream"
    assert detect_family({"architectures": ["DreamModel"]}) == "dream"
    # difflm's native Dream (a qwen2 config, is_causal false) stays Dream: it needs the shift, unlike native LLaDA
    assert detect_family({"model_type": "qwen2", "is_causal": False, "mask_token_id": 5, "difflm_family": "dream"}) == "dream"
    assert detect_family({"model_type": "qwen2", "is_causal": False, "mask_token_id": 5}) == "llada"


@pytest.mark.numerics
def test_dream_logits_equal_dreams_own(dream, ref):
    with torch.no_grad():
        out = dream(ref["input_ids_unpadded"])
        assert out.shape == ref["logits_unpadded"].shape
        assert (out - ref["logits_unpadded"]).abs().max() <= DREAM_ATOL
        keep = ref["attention_mask"].bool()
        assert not keep.all()  # row 0 has 5 pads on the left: the key mask and the positions are exercised
        padded = dream(ref["input_ids"], attention_mask=ref["attention_mask"])
        # slot i is comparable where token i and its source position i-1 are real (the first real slot of a
        # padded row is fed by a pad position, which Dream's code masks as a query: not comparable)
        source = torch.cat([keep[:, :1], keep[:, :-1]], 1) & keep
        assert (padded - ref["logits"])[source].abs().max() <= DREAM_ATOL
        # logits_to_keep runs the head on one slot more and shifts: the same values
        tail = dream(ref["input_ids"], attention_mask=ref["attention_mask"], logits_to_keep=7)
        assert torch.allclose(tail, padded[:, -7:], atol=1e-6)


def test_dream_is_bidirectional_and_checked(dream):
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        y = x.clone()
        y[0, -1] = 10
        # slot 1 reads position 0's output, which sees the last token only through bidirectional attention
        assert (dream(x)[0, 1] - dream(y)[0, 1]).abs().max() > 1e-4


def test_native_dream_round_trip(dream, tmp_path, ref):
    """A natively loaded Dream saved with save_pretrained (a qwen2 config with the marker) loads back as Dream."""
    out = tmp_path / "native"
    dream.module.save_pretrained(str(out))
    dream.tokenizer.save_pretrained(str(out))
    assert json.loads((out / "config.json").read_text())["difflm_family"] == "dream"
    m = _load_model(str(out), dtype="float32", device="cpu")
    assert m.family == "dream" and m.ids == dream.ids
    with torch.no_grad():
        assert torch.equal(m(ref["input_ids_unpadded"]), dream(ref["input_ids_unpadded"]))


def test_missing_or_unexpected_dream_keys_fail_the_load(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(DREAM_REFERENCE, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_bias_renamed"] = weights.pop("model.layers.0.self_attn.q_proj.bias")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as excinfo:
        _load_model(str(folder), device="cpu")
    message = str(excinfo.value)
    assert "\n" not in message and "q_proj.bias" in message and "q_bias_renamed" in message


def test_unsupported_dream_config_is_refused(tmp_path):
    folder = tmp_path / "sliding"
    shutil.copytree(DREAM_REFERENCE, folder)
    config = json.loads((folder / "config.json").read_text())
    config["use_sliding_window"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as excinfo:
        _load_model(str(folder), device="cpu")
    assert "use_sliding_window" in str(excinfo.value) and "\n" not in str(excinfo.value)


# -- remote code: opt-in, never silently wrong --------------------------------------------------------
@pytest.mark.parametrize(
    "error, words",
    [
        (KeyError("default"), ["ROPE_INIT_FUNCTIONS['default']", "drop --trust-remote-code"]),
        (TypeError("DreamGenerationConfig.validate() got an unexpected keyword argument 'user_set_attributes'"),
         ["user_set_attributes", "drop --trust-remote-code"]),
    ],
)
def test_known_remote_code_failures_are_one_line(monkeypatch, error, words):
    import transformers

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail)
    with pytest.raises(ConfigError) as excinfo:
        _load_model(str(DREAM_REFERENCE), trust_remote_code=True, device="cpu")
    message = str(excinfo.value)
    assert "\n" not in message and transformers.__version__ in message
    for w in words:
        assert w in message


def test_remote_code_rope_buffers_are_rebuilt_or_refused(monkeypatch):
    """Dream's remote code leaves inv_freq uninitialised: load_model rebuilds it with the module's own
    reset_rope_parameters(), and refuses a module that holds inv_freq without that method."""
    import transformers

    from difflm.models.dream import rebuild_rope

    class Rotary(torch.nn.Module):
        def __init__(self, resettable=True):
            super().__init__()
            self.register_buffer("inv_freq", torch.full((4,), float("nan")), persistent=False)
            if resettable:
                self.reset_rope_parameters = lambda: self.inv_freq.copy_(1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))

    good = torch.nn.Sequential(Rotary())
    assert rebuild_rope(good, "x") == 1 and torch.isfinite(good[0].inv_freq).all()
    with pytest.raises(ConfigError) as excinfo:
        rebuild_rope(torch.nn.Sequential(Rotary(resettable=False)), "x")
    assert "drop --trust-remote-code" in str(excinfo.value)

    # through load_model: the remote module comes back with its buffer rebuilt
    remote = torch.nn.Sequential(Rotary())
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: remote)
    m = _load_model(str(DREAM_REFERENCE), trust_remote_code=True, device="cpu")
    assert m.module is remote and torch.isfinite(remote[0].inv_freq).all()
