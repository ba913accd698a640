"""Tiny, deterministic models and tokenizers for tests, demos and examples.

Everything here runs on a CPU in well under a second and needs no network. The helpers write real
checkpoint folders (config.json + safetensors + tokenizer files), so the code under test goes
through exactly the same loading path as it does for LLaDA-8B:

- `build_tiny_tokenizer(dir)`: a ~200-token BPE tokenizer with LLaDA's special tokens and chat
  template; any short ASCII English prompt tokenizes (unknown characters map to `<|unk|>`).
- `build_tiny_llada_checkpoint(dir)`: random weights in LLaDA's OWN format (LLaDA config field
  names and parameter names), as `GSAI-ML/LLaDA-8B-*` ships them, scaled down.
- `build_tiny_native_llada(dir)`: the same model in difflm's native format (a bidirectional
  `LlamaForCausalLM` checkpoint with `is_causal: false` and the token ids in its config).
- `build_tiny_mlm(dir)` / `build_tiny_ar(dir)`: a tiny BERT masked LM / causal Llama.
- `TinyMDLM` / `TinyDream`: small stand-ins with the call signatures of the MDLM and Dream remote
  code (which cannot be downloaded offline), for testing the adapters and the samplers.
- `free_port()`: a free TCP port for torchrun; `network_attempts()`: a block in which every connection
  attempt fails at once and is recorded (offline code paths are checked by "tried nothing", not by a clock).

All random weights come from a seeded `torch.Generator`, so a given set of arguments always gives
the same checkpoint (and the same logits).
"""

from __future__ import annotations

import contextlib
import json
import socket
import string
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LLADA_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "TinyDream",
    "TinyMDLM",
    "build_tiny_ar",
    "build_tiny_llada_checkpoint",
    "build_tiny_mlm",
    "build_tiny_native_llada",
    "build_tiny_tokenizer",
    "free_port",
    "network_attempts",
    "tiny_token_ids",
]

#: LLaDA-8B-Instruct's chat template (the Llama-3 one): `bos_token` before the first turn only,
#: each turn `<|start_header_id|>{role}<|end_header_id|>\n\n{content stripped}<|eot_id|>`, and the
#: assistant header appended when `add_generation_prompt` is set.
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

#: Special tokens of the tiny tokenizer, appended after the learned vocabulary in this order (as in
#: LLaDA, where the specials sit at the top of the id range: bos 126080, eos 126081, mask 126336,
#: headers 126346/126347, eot 126348). `<|unk|>` is id 0.
TINY_SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

_UNK = "<|unk|>"
_TINY_BPE_VOCAB = 192  # learned part (alphabet + merges), before the specials

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short story about a robot who learns to paint.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Response:\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Hello, world! How are you today? I am fine, thank you.",
    "Tell me a joke. Explain why the sky is blue. List three fruits: apple, banana, cherry.",
    "Answer: 1 + 2 = 3; 10 - 4 = 6; 3 * 5 = 15; 8 / 2 = 4.",
    "user assistant system",
    string.ascii_lowercase,
    string.ascii_uppercase,
    string.digits,
    string.punctuation,
    " \n\t",
]


def _build_tokenizer_object():
    """Train the tiny BPE model (deterministic: same corpus, same merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=_UNK))
    # Metaspace with prepend_scheme="never": spaces become "▁" inside tokens, so decoding restores
    # the text exactly, and no space is invented at the start of a chat turn.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r") | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_BPE_VOCAB,
        special_tokens=[_UNK],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def build_tiny_tokenizer(dir: str | Path | None = None):
    """Build (and save into `dir`, when given) a tiny LLaDA-style fast tokenizer.

    About 200 tokens: a character-level BPE alphabet (printable ASCII) plus merges learned from a
    few sentences, then `TINY_SPECIAL_TOKENS`. Like LLaDA's tokenizer it adds no special tokens
    when encoding (the chat template writes `<|bos|>` itself); `bos/eos/pad/mask/unk` are set on
    the tokenizer, and `<|eot_id|>` and the header tokens are extra special tokens.

    Returns a `transformers.PreTrainedTokenizerFast`.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer_object(),
        unk_token=_UNK,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        mask_token="<|mask|>",
        extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        model_max_length=1024,
        padding_side="left",
    )
    # The special tokens above were appended in the order of the constructor's processing; make the
    # ids follow TINY_SPECIAL_TOKENS exactly, whatever that order is.
    ids = [tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS]
    if ids != list(range(min(ids), min(ids) + len(ids))):  # pragma: no cover - defensive
        raise RuntimeError(f"unexpected special-token ids {ids}")
    tok.chat_template = LLADA_CHAT_TEMPLATE
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(dir))
    return tok


def tiny_token_ids(tokenizer=None) -> dict[str, int]:
    """The ids of the tiny tokenizer's special tokens, keyed like a config (`mask_token_id`, ...)."""
    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    c = tok.convert_tokens_to_ids
    return {
        "bos_token_id": c("<|bos|>"),
        "eos_token_id": c("<|eos|>"),
        "pad_token_id": c("<|pad|>"),
        "mask_token_id": c("<|mask|>"),
        "eot_token_id": c("<|eot_id|>"),
        "vocab_size": len(tok),
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it), e.g. for torchrun's --master_port:
    a fixed port collides with another test run or service on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def network_attempts():
    """Inside the block every DNS lookup and every TCP/UDP connect fails at once with OSError, as on a machine
    without network, and is recorded in the yielded list (so a test can assert that an offline code path did
    not try the network at all, instead of timing it). Local (AF_UNIX) sockets are left alone."""
    attempts: list = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo, real_create = socket.getaddrinfo, socket.create_connection

    def _refuse(what, address):
        attempts.append((what, address))
        raise OSError(f"network_attempts: {what} {address!r} refused")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse("connect", address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse("connect", address)
        return real_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)
    socket.create_connection = lambda address, *a, **k: _refuse("create_connection", address)
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex
        socket.getaddrinfo, socket.create_connection = real_getaddrinfo, real_create


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_tiny_llada_checkpoint(
    dir: str | Path,
    vocab_size: int | None = None,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    mlp: int = 128,
    seed: int = 0,
    with_tokenizer: bool = True,
    max_sequence_length: int = 256,
) -> Path:
    """Write a random tiny checkpoint in LLaDA's own format into `dir` and return the path.

    The config has every field of LLaDA-8B-Instruct's `config.json` (model_type "llada", `d_model`,
    `embedding_size`, ...), scaled down; the weights use LLaDA's parameter names
    (`model.transformer.blocks.{i}.q_proj.weight`, ...). The ids match the tiny tokenizer (mask id =
    `<|mask|>`'s id, eos = `<|eos|>`, pad = `<|pad|>`), which is saved alongside when
    `with_tokenizer` (without it the folder looks like `tests/fixtures/llada-tiny-reference`).

    `vocab_size` defaults to the tokenizer's size rounded up to a multiple of 8 (LLaDA's embedding
    is also larger than its tokenizer). The norm weights are random too (around 1), so a swapped
    `attn_norm`/`ff_norm` mapping changes the logits.
    """
    from safetensors.torch import save_file

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(dir if with_tokenizer else None)
    ids = tiny_token_ids(tok)
    if vocab_size is None:
        vocab_size = _round_up(ids["vocab_size"], 8)
    if vocab_size < ids["vocab_size"]:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer ({ids['vocab_size']})")
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
    _write_llada_configs(dir, ids, vocab_size, d_model, n_layers, n_heads, mlp, max_sequence_length)
    tensors = _random_llada_weights(vocab_size, d_model, n_layers, mlp, seed)
    save_file(tensors, str(dir / "model.safetensors"), metadata={"format": "pt"})
    return dir


def _write_llada_configs(
    dir: Path, ids: dict, vocab_size: int, d_model: int, n_layers: int, n_heads: int, mlp: int,
    max_sequence_length: int,
) -> None:
    """LLaDA-8B-Instruct's `config.json` scaled down (the tiny tokenizer's ids), and `generation_config.json`."""
    config = json.loads(_LLADA_CONFIG_TEMPLATE)
    config.update(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        n_layers=n_layers,
        mlp_hidden_size=mlp,
        embedding_size=vocab_size,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        mask_token_id=ids["mask_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    (dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"eos_token_id": ids["eos_token_id"], "pad_token_id": ids["pad_token_id"], "use_cache": False}
    (dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _random_llada_weights(vocab_size: int, d_model: int, n_layers: int, mlp: int, seed: int) -> dict:
    """Seeded random weights under LLaDA's parameter names (norm weights around 1, the rest N(0, 0.02))."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm_weight():
        return 1.0 + normal(d_model, std=0.1)

    p = "model.transformer."
    tensors = {
        p + "wte.weight": normal(vocab_size, d_model),
        p + "ln_f.weight": norm_weight(),
        p + "ff_out.weight": normal(vocab_size, d_model),
    }
    for i in range(n_layers):
        b = f"{p}blocks.{i}."
        tensors.update({
            b + "attn_norm.weight": norm_weight(),
            b + "ff_norm.weight": norm_weight(),
            b + "q_proj.weight": normal(d_model, d_model),
            b + "k_proj.weight": normal(d_model, d_model),
            b + "v_proj.weight": normal(d_model, d_model),
            b + "attn_out.weight": normal(d_model, d_model),
            b + "ff_proj.weight": normal(mlp, d_model),
            b + "up_proj.weight": normal(mlp, d_model),
            b + "ff_out.weight": normal(d_model, mlp),
        })
    return {k: v.contiguous() for k, v in tensors.items()}


def build_tiny_native_llada(dir: str | Path, **kwargs) -> Path:
    """The model of `build_tiny_llada_checkpoint(**kwargs)`, saved in difflm's native format.

    All ids (bos and eot included) are in config.json, also with `with_tokenizer=False`. Built by
    loading the LLaDA-format folder with `difflm.models.load_model` and writing it with
    `difflm.models.save_native`, i.e. exactly what a difflm fine-tune produces.
    """
    import tempfile

    from difflm.models import load_model, save_native

    with_tokenizer = kwargs.pop("with_tokenizer", True)
    with tempfile.TemporaryDirectory() as tmp:
        # always load WITH the tokenizer, so bos and eot ids are known and land in config.json
        src = build_tiny_llada_checkpoint(tmp, with_tokenizer=True, **kwargs)
        model = load_model(str(src), family="llada", dtype="float32", device="cpu")
        if not with_tokenizer:
            model.tokenizer = None
        return save_native(model, dir)


def build_tiny_mlm(dir: str | Path, hidden: int = 32, n_layers: int = 2, n_heads: int = 2, seed: int = 0) -> Path:
    """A tiny random `BertForMaskedLM` with a small WordPiece tokenizer ([MASK], [SEP], [PAD]...)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(string.punctuation).lower() for line in _CORPUS for w in line.split()} - {""})
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    suffixes = ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + suffixes
    vocab += [w for w in words if w not in vocab]
    # transformers 5 takes the vocabulary itself (`vocab=`); `vocab_file=` is silently ignored there
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(dir))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    BertForMaskedLM(config).save_pretrained(str(dir))
    return dir


def build_tiny_ar(dir: str | Path, hidden: int = 32, n_layers: int = 2, n_heads: int = 2, seed: int = 0) -> Path:
    """A tiny random causal `LlamaForCausalLM` (a stand-in AR reference model) with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    tok = build_tiny_tokenizer(dir)
    ids = tiny_token_ids(tok)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        max_position_embeddings=256,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    LlamaForCausalLM(config).save_pretrained(str(dir))
    return dir


class _TinyBidirectional(nn.Module):
    """Embedding -> one bidirectional self-attention layer -> vocabulary projection."""

    def __init__(self, vocab_size: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def body(self, input_ids, key_padding=None, extra=None):
        x = self.embed(input_ids)
        if extra is not None:
            x = x + extra
        h, _ = self.attn(x, x, x, key_padding_mask=key_padding, need_weights=False)
        return self.head(x + h)


class TinyMDLM(_TinyBidirectional):
    """Stand-in for MDLM's remote code (`kuleshov-group/mdlm-owt`): `forward(input_ids, timesteps)`.

    Like MDLM it has no attention mask and conditions on the timestep (here: added to every
    embedding), so a test can see which timestep the adapter passed. Returns raw logits.
    """

    def __init__(self, vocab_size: int = 64, dim: int = 16, seed: int = 0):
        super().__init__(vocab_size, dim, seed)
        self.seen_timesteps = None

    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        self.seen_timesteps = timesteps
        return self.body(input_ids, extra=timesteps.to(self.embed.weight.dtype)[:, None, None])


class TinyDream(_TinyBidirectional):
    """Stand-in for Dream's remote code: `forward(input_ids, attention_mask, position_ids)`.

    Dream's own sampler passes `attention_mask="full"` without padding, else a boolean
    [B, 1, L, L] mask plus position ids; this module accepts both and returns an object with
    `.logits` that are NOT yet shifted (the adapter shifts them).
    """

    def __init__(self, vocab_size: int = 64, dim: int = 16, seed: int = 0):
        super().__init__(vocab_size, dim, seed)
        self.seen = None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        from types import SimpleNamespace

        self.seen = (attention_mask, position_ids)
        key_padding = None
        if isinstance(attention_mask, torch.Tensor):
            key_padding = ~attention_mask[:, 0].any(dim=1)  # [B, L]: True = ignored key
        return SimpleNamespace(logits=self.body(input_ids, key_padding=key_padding))


# LLaDA-8B-Instruct's config.json (the same fields as tests/fixtures/llada-tiny-reference/config.json); the size fields and
# ids are overwritten by build_tiny_llada_checkpoint.
_LLADA_CONFIG_TEMPLATE = r"""
{
  "activation_type": "silu",
  "alibi": false,
  "alibi_bias_max": 8.0,
  "architectures": ["LLaDAModelLM"],
  "attention_dropout": 0.0,
  "attention_layer_norm": false,
  "attention_layer_norm_with_affine": true,
  "auto_map": {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM"
  },
  "bias_for_layer_norm": false,
  "block_group_size": 1,
  "block_type": "llama",
  "d_model": 4096,
  "embedding_dropout": 0.0,
  "embedding_size": 126464,
  "eos_token_id": 126081,
  "flash_attention": false,
  "include_bias": false,
  "include_qkv_bias": false,
  "init_cutoff_factor": null,
  "init_device": "meta",
  "init_fn": "mitchell",
  "init_std": 0.02,
  "input_emb_norm": false,
  "layer_norm_type": "rms",
  "layer_norm_with_affine": true,
  "mask_token_id": 126336,
  "max_sequence_length": 4096,
  "mlp_hidden_size": 12288,
  "mlp_ratio": 4,
  "model_type": "llada",
  "multi_query_attention": null,
  "n_heads": 32,
  "n_kv_heads": 32,
  "n_layers": 32,
  "pad_token_id": 126081,
  "precision": "amp_bf16",
  "residual_dropout": 0.0,
  "rms_norm_eps": 1e-05,
  "rope": true,
  "rope_full_precision": true,
  "rope_theta": 500000.0,
  "scale_logits": false,
  "transformers_version": "4.46.3",
  "use_cache": false,
  "vocab_size": 126464,
  "weight_tying": false
}
"""


@contextlib.contextmanager
def app_in_thread(app, host: str = "127.0.0.1"):
    """Serve an ASGI app with uvicorn in a background thread on a free port (port 0: the OS picks it); yields its
    base URL ("http://127.0.0.1:PORT") once it accepts connections, and shuts it down (lifespan included) on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on"))
    with server_in_thread(server, host) as url:
        yield url


@contextlib.contextmanager
def server_in_thread(server, host: str = "127.0.0.1"):
    """Run a `uvicorn.Server` (e.g. `difflm.serve.app.build_server(..., port=0)`: the OS picks a free port) in
    a background thread; yields its base URL once it accepts connections, and shuts it down on exit."""
    import threading
    import time

    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
