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


# -- the `dream` decode method against Dream's own diffusion_generate -------------------------------------
def _prompts(ref):
    return [ref[f"prompt_{i}"].tolist() for i in range(3)]


def _left_padded(prompts, pad=0):
    from difflm.generation import left_pad

    return left_pad(prompts, pad)


@pytest.mark.slow
def test_dream_greedy_equals_dreams_own_diffusion_generate(dream, ref, settings):
    """All 18 greedy sequences (3 algorithms x 2 step counts x 3 prompts) with Dream's own softmax; the three prompts
    of different lengths decode as ONE left-padded batch, so each row also equals its run alone (Dream's own outputs
    were made one prompt at a time). Under SUBS (the default) 17 of 18 are identical (see difflm/decoding/dream.py)."""
    assert len(settings) == 18
    prompts = _prompts(ref)
    ids, mask = _left_padded(prompts, dream.ids.pad_id)
    assert len({len(p) for p in prompts}) == 3 and not mask.bool().all()
    same_subs = 0
    for alg in ("maskgit_plus", "entropy", "topk_margin"):
        for steps in (8, 16):
            s = settings[f"dream_{alg}_steps{steps}_prompt_0"]
            assert (s["temperature"], s["alg_temp"], s["top_p"], s["max_new_tokens"]) == (0.0, 0.0, None, 16)
            for subs in (False, True):
                cfg = DecodeConfig(method="dream", alg=alg, steps=steps, gen_length=16, eps=s["eps"],
                                   mask_in_softmax=not subs)
                out = generate(dream, ids, cfg, attention_mask=mask)
                # a step whose int() count is 0 commits nothing: the next one reuses its logits (forward_reuse)
                assert out.nfe == out.forward_steps and out.forward_steps + out.reused_steps == steps
                # r*: every answer position is committed by a step, once (no remasking, no final fill)
                assert out.unmask_events.tolist() == [16, 16, 16], (alg, steps, out.unmask_events)
                for i in range(3):
                    want = ref[f"dream_{alg}_steps{steps}_prompt_{i}"]
                    got = out.sequences[i, ids.shape[1]:]
                    if subs:
                        same_subs += int(torch.equal(got, want))
                    else:
                        assert torch.equal(got, want), (alg, steps, i, got.tolist(), want.tolist())
    assert same_subs >= 17


@pytest.mark.numerics
def test_dream_batch_rows_equal_rows_alone(dream, ref):
    """Logits of a left-padded batch of prompts of different lengths equal each row alone at every real slot
    (measured max difference 0.0 here; 1e-4 as DREAM_ATOL), plus 16 masked answer slots."""
    prompts = _prompts(ref)
    ids, mask = _left_padded(prompts, dream.ids.pad_id)
    answer = torch.full((3, 16), dream.ids.mask_id)
    x = torch.cat([ids, answer], 1)
    am = torch.cat([mask, torch.ones_like(answer)], 1)
    with torch.no_grad():
        batch = dream(x, attention_mask=am)
        for i, p in enumerate(prompts):
            alone = dream(torch.tensor([p + [dream.ids.mask_id] * 16]))
            n = len(p) + 16
            # slot 0 of a row alone reads itself; in the batch the first real slot reads a pad: compare from 1
            assert (batch[i, -n + 1 :] - alone[0, 1:]).abs().max() <= DREAM_ATOL


def test_dream_schedule_against_exact_arithmetic():
    """Dream's per-step count int(n (1 - s/t)) on linspace(1, eps, S + 1), against exact rational arithmetic away
    from integer boundaries, and every answer position committed by the last step."""
    from fractions import Fraction

    from difflm.decoding.dream import dream_timesteps, transfer_count

    for steps, n0, eps in ((8, 16, 1e-3), (16, 16, 1e-3), (5, 37, 0.2)):
        ts = dream_timesteps(steps, eps)
        assert ts.dtype == torch.float32 and ts[0] == 1 and abs(float(ts[-1]) - eps) < 1e-7
        n = n0
        for i in range(steps):
            k = transfer_count(n, ts[i], ts[i + 1], i == steps - 1)
            t, s = Fraction(float(ts[i])), Fraction(float(ts[i + 1]))
            exact = n * (1 - s / t)
            if i < steps - 1 and abs(exact - round(exact)) > Fraction(1, 1000):
                assert k == int(exact)
            n -= k
        assert n == 0


def test_dream_confidences_against_float64_by_hand():
    from difflm.decoding.dream import filter_logits, propose

    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 0.2, 3.0]])
    p = torch.softmax(z.double(), -1)
    top2 = p.topk(2, -1).values
    tok, conf = propose(z, "maskgit_plus", 0.0, None, None, None)
    assert tok.tolist() == [0, 3] and torch.allclose(conf, top2[:, 0], rtol=1e-12)
    _, conf = propose(z, "topk_margin", 0.0, None, None, None)
    assert torch.allclose(conf, top2[:, 0] - top2[:, 1], rtol=1e-12)
    _, conf = propose(z, "entropy", 0.0, None, None, None)
    assert torch.allclose(conf, (p * torch.log(p + 1e-10)).sum(-1), rtol=1e-12)
    # top-p keeps the smallest sorted prefix whose mass exceeds p (the first token always); top-k the k largest
    row = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    q = torch.softmax(row, -1)[0]  # 0.644, 0.237, 0.087, 0.032
    assert torch.isfinite(filter_logits(row, 0.5, None)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(row, float(q[0] + q[1]) + 1e-3, None)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(row, None, 2)).tolist() == [[True, True, False, False]]
    # with top-k at temperature 0 the confidence is renormalised over the kept tokens, as in Dream's code
    _, conf = propose(row, "maskgit_plus", 0.0, None, 2, None)
    assert torch.allclose(conf, (q[0] / (q[0] + q[1])).double()[None], rtol=1e-6)


def test_dream_sampling_is_seeded_per_row(dream, ref):
    """temperature > 0 and alg_temp > 0: a row's tokens depend on its seed, not on its batch."""
    p = ref["prompt_1"].tolist()
    x = torch.tensor([p, p])
    for alg in ("origin", "entropy"):
        cfg = DecodeConfig(method="dream", alg=alg, steps=8, gen_length=16, temperature=0.8, top_p=0.9, alg_temp=0.5)
        both = generate(dream, x, cfg, row_seeds=[11, 12]).sequences
        alone = generate(dream, x[:1], cfg, row_seeds=[12]).sequences
        assert torch.equal(both[1], alone[0])
        assert not torch.equal(both[0], both[1])  # different seeds, different draws
        assert (both[:, len(p):] != dream.ids.mask_id).all()


def test_dream_method_on_another_family(tiny_llada_dir):
    """`dream` decodes any diffusion family (here a LLaDA-format model)."""
    m = _load_model(str(tiny_llada_dir), device="cpu")
    out = generate(m, torch.tensor([[5, 6, 7]]), DecodeConfig(method="dream", alg="maskgit_plus", steps=4, gen_length=8))
    assert (out.sequences[:, 3:] != m.ids.mask_id).all() and out.nfe == 4


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"method": "dream", "alg": "greedy"}, "alg"),
        ({"method": "dream", "eps": 0.0}, "eps"),
        ({"method": "dream", "eps": 1.0}, "eps"),
        ({"method": "dream", "alg_temp": -1.0}, "alg_temp"),
        ({"method": "llada", "mask_in_softmax": True}, "mask_in_softmax"),
        ({"method": "conv", "suppress_tokens": [1]}, "suppress_tokens"),
        ({"method": "llada", "suppress_tokens": [-1]}, "suppress_tokens[0]"),
    ],
)
def test_dream_options_are_validated(kwargs, key):
    with pytest.raises(ConfigError) as excinfo:
        DecodeConfig(gen_length=16, steps=8, **kwargs).validate()
    assert excinfo.value.key == key and "\n" not in str(excinfo.value)


# -- the LLaDA KV caches and threshold decoding on Dream ---------------------------------------------------
def test_llada_caches_work_on_dream(dream, ref):
    """Right after a refresh the cached window's logits equal the full pass's (measured 0.0; 1e-4), and refreshing
    every step reproduces uncached decoding token for token (the same logits each step), for prefix and dual, on a
    left-padded batch (Dream's positions from each row's first real token, its shift at the window's start)."""
    from difflm.decoding.cache import BlockCache

    ids, mask = _left_padded(_prompts(ref), dream.ids.pad_id)
    plen = ids.shape[1]
    x = torch.cat([ids, torch.full((3, 16), dream.ids.mask_id)], 1)
    x[:, plen + 2] = 50  # a decoded token in the first block
    am = torch.cat([mask, torch.ones(3, 16, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = dream(x, attention_mask=am)[:, -16:]
        for mode in ("prefix", "dual"):
            kv = BlockCache(dream, mode)
            assert (kv.full(x, am, plen + 8, plen + 16, logits_to_keep=16) - full).abs().max() <= DREAM_ATOL
            assert (kv.step(x) - full[:, 8:]).abs().max() <= DREAM_ATOL
    base = dict(method="llada", gen_length=16, steps=16, block_length=8)
    plain = generate(dream, ids, DecodeConfig(**base), attention_mask=mask).sequences
    for mode in ("prefix", "dual"):
        cached = generate(dream, ids, DecodeConfig(**base, cache=mode, cache_refresh=1), attention_mask=mask)
        assert torch.equal(cached.sequences, plain)
    th = generate(dream, ids, DecodeConfig(method="threshold", gen_length=16, steps=16, block_length=8, cache="dual"),
                  attention_mask=mask)
    assert (th.sequences[:, plen:] != dream.ids.mask_id).all()


# -- real checkpoint names: LLaDA-1.5 and Dream by name, from the Hugging Face cache ------------------------
def _cache_as(monkeypatch, tmp_path, repo_id, folder):
    """Put `folder` into a Hugging Face cache under `repo_id` (the layout hf_hub_download reads offline)."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hub"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "repo_id, folder, family",
    [
        ("GSAI-ML/LLaDA-1.5", Path(__file__).parent / "fixtures" / "llada-tiny-reference", "llada"),
        ("Dream-org/Dream-v0-Instruct-7B", DREAM_REFERENCE, "dream"),
    ],
)
def test_real_checkpoint_names(monkeypatch, tmp_path, repo_id, folder, family):
    """The name alone gives the family before any download; a cached copy (here the fixture in the real format)
    loads by that name through from_pretrained, natively, with no remote code."""
    from difflm.models.loading import known_family

    assert known_family(repo_id) == family
    _cache_as(monkeypatch, tmp_path, repo_id, folder)
    m = _load_model(repo_id, device="cpu", dtype="float32")
    assert m.family == family and m.name == repo_id
    assert type(m.module).__name__ == {"llada": "LlamaForCausalLM", "dream": "Qwen2ForCausalLM"}[family]


def test_suppressed_confidence_by_hand():
    """LLaDA's confidence_eos_eot_inf: the proposal stays the argmax over every token; its confidence is the softmax
    with the suppressed ids at -inf (0 when the proposal itself is suppressed), float64 by hand."""
    from difflm.decoding.dream import suppressed_confidence

    logits = torch.tensor([[[3.0, 1.0, 0.5, 0.0], [0.0, 2.0, 1.0, 0.5], [1.0, 0.0, 4.0, 0.0]]])
    region = torch.tensor([[True, True, False]])
    x0 = logits.argmax(-1)  # [0, 1, 2]
    conf = suppressed_confidence(logits, x0, region, [0, 3])
    z = logits[0, 1].double().clone()
    z[[0, 3]] = float("-inf")
    assert conf[0, 0] == 0.0  # proposes a suppressed id: ranks last
    assert torch.isclose(conf[0, 1], torch.softmax(z, -1)[1], rtol=1e-12)
    assert conf[0, 2] == 0.0  # outside the region
    with pytest.raises(ConfigError):
        suppressed_confidence(logits, x0, region, [4])


def test_suppress_tokens_delays_eos_in_llada_decoding(dream):
    """A model that proposes EOS with high confidence at the even answer positions: plain greedy llada (one commit per
    step) commits those EOS first; with the stop ids suppressed, every other position commits before any of them."""
    stop = list(dream.ids.stop_ids)

    class Boost:  # Dream's fixture model with the EOS logit raised by 20 at the even answer positions
        family, ids, max_length, name = "dream", dream.ids, None, "boost"

        def __call__(self, x, attention_mask=None, logits_to_keep=None):
            out = dream(x, attention_mask=attention_mask).clone()
            out[:, 4::2, stop[0]] += 20.0
            return out[:, -logits_to_keep:] if logits_to_keep else out

    def commit_order(cfg):
        order, before = [], None

        def record(event):
            nonlocal before
            now = event["x"][0, 4:].clone()
            prev = before if before is not None else torch.full_like(now, dream.ids.mask_id)
            order.extend(((prev == dream.ids.mask_id) & (now != dream.ids.mask_id)).nonzero().squeeze(1).tolist())
            before = now

        out = generate(Boost(), torch.tensor([[5, 6, 7, 8]]), cfg, callback=record)
        return order, out.sequences[0, 4:]

    base = dict(method="llada", gen_length=16, steps=16, block_length=16)
    order, seq = commit_order(DecodeConfig(**base))
    assert sorted(order[:8]) == list(range(0, 16, 2)) and (seq[0::2] == stop[0]).all()  # EOS first
    order, seq = commit_order(DecodeConfig(**base, suppress_tokens=stop))
    assert len(order) == 16 and (seq[0::2] == stop[0]).all()  # still EOS there, committed last
    assert sorted(order[:8]) == list(range(1, 16, 2)) and sorted(order[8:]) == list(range(0, 16, 2))


def test_dream_origin_one_step_is_the_argmax(dream, ref):
    """origin with one step unmasks every position at once (p_transfer 1 at the last step) with the argmax of the
    first forward pass, MASK excluded (SUBS); an independent computation."""
    p = ref["prompt_2"].tolist()
    x = torch.tensor([p + [dream.ids.mask_id] * 16])
    with torch.no_grad():
        logits = dream(x)[0, len(p):].double()
    logits[:, dream.ids.mask_id] = float("-inf")
    out = generate(dream, torch.tensor([p]), DecodeConfig(method="dream", alg="origin", steps=1, gen_length=16))
    assert torch.equal(out.sequences[0, len(p):], logits.argmax(-1))


def test_dream_chat_prompt_uses_the_tokenizers_template(dream):
    """Dream's chat format is its tokenizer's own (ChatML in the real model; set here, the fixture has none):
    the prompt ends with the assistant header, and `<|im_end|>` (a stop id) closes the user turn."""
    tok = dream.tokenizer
    template = tok.chat_template
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        ids = dream.chat_ids("hi")
    finally:
        tok.chat_template = template
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(dream.ids.eot_id) == 1
    assert dream.ids.eot_id in dream.ids.stop_ids
