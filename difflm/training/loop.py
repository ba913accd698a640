"""The training loop behind `difflm sft` and `difflm r2ft`, on Hugging Face accelerate.

`train(recipe, kind)` runs four parts, each a function here (the split of torchtune's recipes):

- setup (`_setup`, `_setup_model`): accelerate (one process or many: `accelerate launch` / `torchrun`,
  DDP, FSDP2 sharding via `fsdp.py` (`train.strategy: fsdp2` or `recipes/accelerate/fsdp2.yaml`), DeepSpeed
  ZeRO through accelerate (`recipes/accelerate/zero*.yaml`); autocast for bf16/fp16, a gradient scaler for fp16);
  the tokenized folder (`difflm tokenize`) checked against the recipe and the model; the model
  (`build_model`: `difflm.models.load_model`, QLoRA in 4-bit nf4 with double quantisation, LoRA via peft
  or the given adapter, gradient checkpointing); AdamW (or bitsandbytes 8-bit AdamW; no decay on vectors)
  with linear warm-up then constant or cosine; the data order (`DataStream`); a resumed checkpoint.
- step (`_train_step`): a global batch of `train.global_batch` sequences = micro-batches x accumulation
  x ranks. Forward passes go through the *wrapped* (DDP) module, and only the last micro-batch of a step
  synchronises gradients (`no_sync` before it), so the all-reduce happens exactly once per step; then
  clipping, the optimiser and the scheduler step. Its statistics are a `StepSums` (named sums over the
  sequences), all-reduced in one call on the steps that are logged (`log_every`): loss averaged over the
  global batch and all ranks, lr, gradient norm, tokens/s; R2FT adds LW, LL and their margin.
- evaluate (`_evaluate`, every `eval_every`): the held-out loss with fixed noise.
- checkpoint (`_save_checkpoint` every `save_every`, `_resume`, `_save_final`): at the end `final/` (the
  adapter alone for LoRA/QLoRA; a full checkpoint otherwise, in difflm's native format for LLaDA) and a
  last checkpoint.

Determinism: the data order is a fresh permutation per epoch from (seed, epoch); step s takes the
stream positions [s G, (s+1) G). Every sequence's noise (mask pattern, t, R2FT corruption) is
seeded by (seed, stream position), dropout by (seed, step, rank, micro-batch). So a run does not
depend on how the global batch is split, and a resumed run replays exactly what an uninterrupted
one does. A checkpoint (`checkpoints/step-N/`) holds the weights (`model/`), accelerate's state
(optimizer, scheduler, scaler, every rank's RNG states) and `trainer_state.json` (the step, hence
the data position); it is written to a temporary folder and renamed, so `kill -9` at any moment
leaves only complete checkpoints, and `--resume` continues from the newest one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from difflm.config import load_yaml, save_resolved, to_dict
from difflm.errors import ConfigError
from difflm.io import atomic_directory
from difflm.seeding import seed_for

from .losses import sft_batch_loss, weight_decay_groups
from .recipes import TrainRecipe

__all__ = ["TrainResult", "train", "latest_checkpoint", "build_model", "enable_gradient_checkpointing", "add_lora"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SHARDED = "sharded"  #: FSDP2 checkpoints: model + optimizer in torch's distributed checkpoint format
METRICS_FILE = "metrics.jsonl"
# recipe keys a resumed run must share with the interrupted one (others, e.g. max_steps, may change)
_RESUME_KEYS = {
    "model": None,
    "data": ("path", "eos_policy"),
    "train": ("objective", "mode", "global_batch", "seed", "eps"),
    "lora": None,
    "r2ft": None,
}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    model: Any = None  #: the trained `DiffusionLM` (module unwrapped from DDP), for the Python API


# -- model ------------------------------------------------------------------------------------------
def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing on the (peft-wrapped) transformers model; works with
    frozen inputs (LoRA) and DDP. Raises ConfigError for models without support (remote code)."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(base).__name__} does not support gradient checkpointing; set train.gradient_checkpointing: false",
            key="train.gradient_checkpointing",
        )
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(base, "config", None) is not None and hasattr(base.config, "use_cache"):
        base.config.use_cache = False


def add_lora(module: torch.nn.Module, lora, default_targets: list[str], seed: int = 0) -> torch.nn.Module:
    """peft LoRA on `module` (bnb 4-bit layers get peft's 4-bit LoRA layers). The adapter weights
    are kept in float32 even on a bf16/4-bit base; the initialisation is seeded."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora.target_modules or default_targets)
    if not targets:
        raise ConfigError("no LoRA target modules known for this model: set lora.target_modules", key="lora.target_modules")
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"LoRA target modules {missing} are not in the model (e.g. {sorted(names)[:8]})", key="lora.target_modules"
        )
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
    torch.manual_seed(seed_for(seed, "lora-init"))
    with quiet_peft():
        return get_peft_model(module, config)


@contextmanager
def quiet_peft():
    """peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`: hide that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _check_adapter_dir(adapter: str) -> str:
    """The adapter folder (ConfigError on model.adapter when it has no adapter_config.json)."""
    from difflm.models.checks import adapter_config_file

    return str(adapter_config_file(adapter, key="model.adapter").parent)


def build_model(recipe: TrainRecipe, device: torch.device | str):
    """Load the recipe's model for training: a `DiffusionLM` whose `.module` is in train mode with
    exactly the parameters to train requiring gradients."""
    from difflm.models import load_model

    m, t = recipe.model, recipe.train
    if m.name is None:
        raise ConfigError("no model given: set model.name", key="model.name")
    if m.adapter is not None:
        _check_adapter_dir(m.adapter)
    quant = "4bit" if t.mode == "qlora" else None
    dtype = "bfloat16" if quant else m.dtype
    dlm = load_model(
        m.name, family=m.family, dtype=dtype, device=str(device), quantization=quant,
        trust_remote_code=m.trust_remote_code, tokenizer=m.tokenizer,
    )
    module = dlm.module
    if t.mode == "full":
        if m.adapter is not None:
            from peft import PeftModel

            with quiet_peft():
                module = PeftModel.from_pretrained(module, m.adapter).merge_and_unload()
        module.requires_grad_(True)
    else:
        module.requires_grad_(False)
        if m.adapter is not None:
            from peft import PeftModel

            with quiet_peft():
                module = PeftModel.from_pretrained(module, m.adapter, is_trainable=True)
        else:
            module = add_lora(module, recipe.lora, dlm.lora_target_modules, t.seed)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    module.train()
    dlm.module = module
    return dlm


# -- schedule and optimiser --------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for the optimiser step `step` (0-based): linear warm-up reaching 1 at
    step warmup - 1, then 1 (constant) or a cosine down to `min_ratio` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup - 1)
    progress = min(1.0, max(0, step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: torch.nn.Module, optim, device: torch.device):
    groups = weight_decay_groups(module.named_parameters(), optim.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters", key="train.mode")
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if optim.name == "adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("8-bit AdamW (bitsandbytes) needs a CUDA GPU; use optim.name: adamw", key="optim.name")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


# -- data order ------------------------------------------------------------------------------------
class DataStream:
    """Epoch after epoch of the training set, each in its own order: stream position k is example
    perm_e[k mod N] of epoch e = k // N, perm_e a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, k: int) -> int:
        epoch = k // self.n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][k % self.n])


# -- checkpoint files (weights in the format users load) ------------------------------------------------
def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder (`checkpoints/step-N` with its trainer_state.json)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _load_weights(module: torch.nn.Module, model_dir: Path) -> None:
    """Put the weights saved in `model_dir` back into the live `module` (adapter or full)."""
    from safetensors.torch import load_file

    if _is_peft(module):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, load_file(str(model_dir / "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise RuntimeError(f"adapter checkpoint {model_dir} has unexpected keys: {unexpected[:3]}")
        return
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(model_dir / f)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {model_dir} has unexpected keys: {unexpected[:3]}")
    if missing:  # tied weights are saved once: fine when another name of the same tensor was loaded
        named = dict(module.named_parameters(remove_duplicate=False))
        aliases: dict[int, set[str]] = {}
        for name, p in named.items():
            aliases.setdefault(id(p), set()).add(name)
        bad = [k for k in missing if k in named and not (aliases[id(named[k])] & set(state))]
        if bad:
            raise RuntimeError(f"checkpoint {model_dir} lacks weights: {bad[:3]}")


def _save_model(accelerator, model, out_dir: Path, dlm, sharded: bool = False) -> None:
    """The weights a user loads: the adapter alone (LoRA/QLoRA) or a full checkpoint (LLaDA: the
    native bidirectional-Llama format) with the tokenizer. Called on every rank (FSDP2 gathers the full
    weights on rank 0: `sharded` = the model is FSDP2-sharded)."""
    from accelerate.utils import DistributedType

    if sharded:
        from .fsdp import full_state_dict

        state = full_state_dict(model)
    elif accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = accelerator.get_state_dict(model)  # ZeRO-3: gathered (zero3_save_16bit_model)
    else:
        state = None
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_peft(unwrapped):
        unwrapped.save_pretrained(str(out_dir), state_dict=state)
        return
    if dlm.family == "llada":
        from difflm.models import save_native

        save_native(unwrapped, out_dir, dlm.tokenizer, dlm.ids, state_dict=state)
        return
    unwrapped.save_pretrained(str(out_dir), state_dict=state, save_original_format=False)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(str(out_dir))


# -- accelerate, the output folder, the checks -----------------------------------------------------------
def _accelerator(t):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    AcceleratorState._reset_state(reset_partial_state=world <= 1)  # several runs in one process (tests)
    GradientState._reset_state()
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    if t.device not in (None, "cpu", "cuda") and not str(t.device).startswith("cuda"):
        raise ConfigError(f"unknown device {t.device!r}; use cpu or cuda", key="train.device")
    if t.device and str(t.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA GPU is visible", key="train.device")
    if t.precision == "fp16" and cpu:
        raise ConfigError("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on the CPU", key="train.precision")
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision]
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):  # accelerate turns DeepSpeed on only with cpu=False; DeepSpeed
        cpu = False  # then picks its own accelerator (its CPU one, gloo, where no GPU is visible)
    acc = Accelerator(cpu=cpu, mixed_precision=precision, step_scheduler_with_optimizer=False)

    # accelerate's own checkpoint files hold optimizer/scheduler/scaler/RNG; the weights are saved by
    # _save_model in the format users load, so keep them out of accelerate's files (both ways).
    def _no_weights_on_save(models, weights, output_dir):
        weights.clear()

    def _no_weights_on_load(models, input_dir):
        models.clear()

    acc.register_save_state_pre_hook(_no_weights_on_save)
    acc.register_load_state_pre_hook(_no_weights_on_load)
    return acc


def _check_output(recipe: TrainRecipe) -> Path | None:
    """Read-only checks of the output folder (every rank runs them, so all raise together); return
    the checkpoint to resume from, or None for a fresh start."""
    t = recipe.train
    out = Path(t.output_dir)
    existing = out.exists() and any(out.iterdir())
    if existing and not (t.overwrite or t.resume):
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to start over",
            key="train.output_dir",
        )
    ckpt = None if t.overwrite else latest_checkpoint(out)
    if ckpt is not None and (out / "recipe.yaml").is_file():
        old, new = load_yaml(out / "recipe.yaml"), to_dict(recipe)
        for section, keys in _RESUME_KEYS.items():
            a, b = old.get(section, {}), new.get(section, {})
            for key in keys or sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    raise ConfigError(
                        f"cannot resume {out}: {section}.{key} was {a.get(key)!r}, now {b.get(key)!r}",
                        key=f"{section}.{key}",
                    )
    return ckpt


def _create_output(recipe: TrainRecipe, acc, kind: str, ckpt: Path | None) -> None:
    """The main rank (re)creates the output folder and writes the resolved recipe."""
    t = recipe.train
    out = Path(t.output_dir)
    acc.wait_for_everyone()  # every rank has looked before the main rank changes anything
    if acc.is_main_process:

        def write(folder: Path) -> None:
            save_resolved(recipe, folder / "recipe.yaml")
            (folder / "command.txt").write_text(kind + "\n")

        if t.overwrite and out.exists():  # the old run goes in one swap, never half-deleted
            with atomic_directory(out) as tmp:
                write(tmp)
        else:
            out.mkdir(parents=True, exist_ok=True)
            if ckpt is None:  # a fresh start (also --resume before any checkpoint): no stale metrics
                (out / METRICS_FILE).unlink(missing_ok=True)
            write(out)
    acc.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (and any line cut by kill -9)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if int(rec.get("step", 0)) <= step:
            keep.append(line)
    from difflm.io import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _check_meta(meta: dict, recipe: TrainRecipe, kind: str) -> None:
    """What the tokenized folder must agree on with the recipe (before the model is loaded)."""
    if meta.get("eos_policy") != recipe.data.eos_policy:
        raise ConfigError(
            f"{recipe.data.path} was tokenized with eos_policy {meta.get('eos_policy')!r}, the recipe says "
            f"{recipe.data.eos_policy!r}: tokenize again (or fix the recipe)",
            key="data.eos_policy",
        )
    if kind == "r2ft" and meta.get("format") == "text":
        raise ConfigError("R2FT needs instruction data (prompt + answer), not packed text", key="data.format")


def _check_model(meta: dict, dlm, kind: str, recipe: TrainRecipe) -> None:
    """What the tokenized folder and the objective must agree on with the loaded model."""
    ids = dlm.ids
    if meta.get("eos_id") != ids.eos_id:
        raise ConfigError(
            f"{recipe.data.path} was tokenized with EOS id {meta.get('eos_id')}, the model's is {ids.eos_id}: "
            "tokenize again with this model",
            key="data.path",
        )
    if dlm.max_length and meta.get("max_length", 0) > dlm.max_length:
        raise ConfigError(
            f"examples have {meta['max_length']} tokens, the model's context is {dlm.max_length}", key="data.max_length"
        )
    objective = recipe.train.objective
    if objective == "ar" and dlm.is_diffusion:
        raise ConfigError(f"objective ar needs an AR model; {dlm.name} is family {dlm.family}", key="train.objective")
    if objective != "ar" and not dlm.is_diffusion:
        raise ConfigError(
            f"{dlm.name} is an AR model: use train.objective: ar" + (" (R2FT then uses its AR variant)" if kind == "r2ft" else ""),
            key="train.objective",
        )


# -- metrics --------------------------------------------------------------------------------------------
@dataclass
class StepSums:
    """Sums over the sequences of one optimiser step (or one held-out pass), by name. The loss functions
    return per-sequence stats (`loss`, `tokens`; R2FT adds `lw`, `ll`, `margin`); `add` sums a micro-batch's,
    `all_reduce` sums over the ranks in one collective call (float64), `mean` divides by the sequences."""

    loss: float = 0.0
    sequences: float = 0.0
    lw: float = 0.0
    ll: float = 0.0
    margin: float = 0.0
    tokens: float = 0.0  #: loss-region (answer) tokens

    def add(self, stats: dict[str, torch.Tensor], sequences: int) -> None:
        self.loss += float(stats["loss"].sum())
        self.sequences += sequences
        for name in ("lw", "ll", "margin"):
            if name in stats:
                setattr(self, name, getattr(self, name) + float(stats[name].sum()))
        self.tokens += float(stats["tokens"].sum())

    def all_reduce(self, acc) -> StepSums:
        names = [f.name for f in fields(self)]
        values = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64)
        values = acc.reduce(values.to(acc.device), reduction="sum").cpu()
        return StepSums(**{n: float(v) for n, v in zip(names, values.tolist())})

    def mean(self, name: str) -> float:
        return getattr(self, name) / max(1.0, self.sequences)


# -- setup ----------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What `_setup` builds and the step, evaluation and checkpoint functions share."""

    recipe: TrainRecipe
    kind: str  #: "sft" or "r2ft"
    acc: Any  #: the accelerate `Accelerator`
    emit: Callable[[dict], None]  #: the callback on the main process, a no-op elsewhere
    out: Path
    meta: dict  #: the tokenized folder's metadata
    train_ds: Any
    eval_ds: Any
    accum: int  #: micro-batches per optimiser step and rank
    total: int  #: optimiser steps of the whole run
    resume_from: Path | None
    dlm: Any = None  #: the `DiffusionLM`; its `.module` is the wrapped (DDP) model while training
    model: Any = None  #: the accelerate-prepared module
    optimizer: Any = None
    scheduler: Any = None
    stream: DataStream | None = None
    start: int = 0  #: the first step to run (the resumed checkpoint's step)
    strategy: str = "ddp"  #: "ddp" (replicated; also one process) or "fsdp2" (sharded, `fsdp.py`)
    fsdp: dict = field(default_factory=dict)  #: the FSDP2 settings in force (`_fsdp_settings`)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    @property
    def deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type == DistributedType.DEEPSPEED

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def n_train(self) -> int:
        return len(self.train_ds)


def _setup(recipe: TrainRecipe, kind: str, callback: Callable[[dict], None] | None) -> _Run:
    """accelerate, the checks, the data and the output folder, then the model and optimiser (`_setup_model`)
    and a resumed checkpoint (`_resume`). Every check that can fail cheaply runs before the model loads."""
    from .tokenized import load_tokenized

    if kind not in ("sft", "r2ft"):
        raise ValueError(f"unknown training kind {kind!r}")
    t = recipe.train
    strategy, fsdp = _fsdp_settings(recipe)
    acc = _accelerator(t)
    emit = (callback if acc.is_main_process and callback else (lambda e: None))
    world = acc.num_processes
    if t.global_batch % (t.micro_batch * world):
        raise ConfigError(
            f"global_batch {t.global_batch} is not a multiple of micro_batch {t.micro_batch} x {world} processes",
            key="train.global_batch",
        )
    dsd, meta = load_tokenized(recipe.data.path)
    _check_meta(meta, recipe, kind)
    resume_from = _check_output(recipe)
    n_train = len(dsd["train"])
    run = _Run(
        recipe, kind, acc, emit, Path(t.output_dir), meta, dsd["train"], dsd["eval"] if "eval" in dsd else None,
        accum=t.global_batch // (t.micro_batch * world),
        total=t.max_steps or max(1, math.ceil(t.epochs * n_train / t.global_batch)),
        resume_from=resume_from, strategy=strategy, fsdp=fsdp,
    )
    _setup_model(run)
    if resume_from is not None:
        _resume(run, resume_from)
    acc.wait_for_everyone()
    run.stream = DataStream(n_train, t.seed)
    return run


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


def _fsdp_settings(recipe: TrainRecipe) -> tuple[str, dict]:
    """The strategy in force and its FSDP2 settings: the recipe's `train.strategy` and `fsdp:` section, and
    where `accelerate launch` was given an FSDP config (recipes/accelerate/fsdp2.yaml) the settings it passes
    to the processes in ACCELERATE_USE_FSDP / FSDP_* variables (they win over the recipe's)."""
    t, f = recipe.train, recipe.fsdp
    launched = bool(_env_flag("ACCELERATE_USE_FSDP"))
    if launched and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; difflm shards with "
            "FSDP2: use recipes/accelerate/fsdp2.yaml (fsdp_version: 2)",
            key="fsdp_version",
        )
    strategy = t.strategy if t.strategy != "auto" else ("fsdp2" if launched else "ddp")
    if launched and strategy != "fsdp2":
        raise ConfigError(f"launched with an accelerate FSDP config but train.strategy is {strategy}", key="train.strategy")
    settings = {"cpu_offload": f.cpu_offload, "reshard_after_forward": f.reshard_after_forward, "wrap": f.wrap,
                "activation_checkpointing": t.gradient_checkpointing}
    if launched:
        for key, var in (("cpu_offload", "FSDP_OFFLOAD_PARAMS"), ("reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD"),
                         ("activation_checkpointing", "FSDP_ACTIVATION_CHECKPOINTING")):
            if _env_flag(var) is not None:
                settings[key] = _env_flag(var)
        if os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
            settings["wrap"] = [c.strip() for c in os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",") if c.strip()]
    if strategy == "fsdp2":
        if t.mode != "full":
            raise ConfigError(f"fsdp2 shards full fine-tunes; mode {t.mode} trains an adapter: use ddp", key="train.mode")
        if t.precision == "fp16":
            raise ConfigError("fsdp2 runs fp32 or bf16 (no fp16 gradient scaler): use precision bf16", key="train.precision")
    return strategy, settings


@contextmanager
def _whole_weights(acc):
    """Load without DeepSpeed ZeRO-3 partitioning: accelerate registers its DeepSpeed config with transformers,
    whose from_pretrained then partitions every weight (whatever zero3_init_flag says)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        acc.state.deepspeed_plugin.set_deepspeed_weakref()


def _setup_model(run: _Run) -> None:
    """The model (checked against the data), the output folder, AdamW and the lr schedule, `accelerate.prepare`
    (DDP) or FSDP2's `fully_shard` (`fsdp.shard_model`; accelerate then keeps only the RNG and scheduler state)."""
    recipe, acc, optim = run.recipe, run.acc, run.recipe.optim
    if run.sharded:
        import dataclasses

        from .fsdp import shard_model

        # each rank loads on the CPU; fully_shard moves its own shard of each block to the device
        cfg = dataclasses.replace(recipe, train=dataclasses.replace(
            recipe.train, gradient_checkpointing=run.fsdp["activation_checkpointing"]))
        dlm = build_model(cfg, "cpu")
        _check_model(run.meta, dlm, run.kind, recipe)
        _create_output(recipe, acc, run.kind, run.resume_from)
        _, classes, units = shard_model(
            dlm.module, precision=recipe.train.precision, cpu_offload=run.fsdp["cpu_offload"],
            reshard_after_forward=run.fsdp["reshard_after_forward"], wrap=run.fsdp["wrap"],
        )
        run.fsdp.update(wrap=classes, units=units)
        run.model = dlm.module
        run.optimizer = build_optimizer(dlm.module, optim, acc.device)
    else:
        # DeepSpeed ZeRO-3: load whole (transformers would partition the weights while loading, and the loader's
        # checks run a forward pass outside the engine); the engine partitions them in prepare
        with _whole_weights(acc) if run.deepspeed else nullcontext():
            dlm = build_model(recipe, acc.device)
        _check_model(run.meta, dlm, run.kind, recipe)
        _create_output(recipe, acc, run.kind, run.resume_from)
        run.optimizer = build_optimizer(dlm.module, optim, acc.device)
        if run.deepspeed:  # the batch geometry and clipping DeepSpeed's engine runs with (it steps and clips itself)
            t = recipe.train
            acc.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=t.micro_batch, gradient_accumulation_steps=run.accum,
                train_batch_size=t.global_batch, gradient_clipping=float(optim.grad_clip or 0.0),
            )
    total = run.total
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: lr_factor(s, optim.warmup_steps, total, optim.schedule, optim.min_lr_ratio)
    )
    if run.sharded:
        run.scheduler = scheduler
        acc.register_for_checkpointing(scheduler)  # saved/loaded by accelerate's save_state/load_state
    else:
        run.model, run.optimizer, run.scheduler = acc.prepare(dlm.module, run.optimizer, scheduler)
        dlm.module = run.model  # every training forward goes through the wrapper (DDP all-reduce, autocast)
    run.dlm = dlm


def _start_event(run: _Run) -> dict:
    t, model = run.recipe.train, run.model
    return {
        "event": "start", "kind": run.kind, "start_step": run.start, "total_steps": run.total,
        "world_size": run.world, "accumulation": run.accum, "micro_batch": t.micro_batch,
        "global_batch": t.global_batch, "train_examples": run.n_train,
        "eval_examples": len(run.eval_ds) if run.eval_ds is not None else 0,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in run.acc.unwrap_model(model).parameters()),
        "device": str(run.acc.device), "resumed_from": str(run.resume_from) if run.resume_from else None,
        "max_length": run.meta.get("max_length"), "strategy": run.strategy,
        **({"fsdp": run.fsdp} if run.sharded else {}),
    }


# -- step -----------------------------------------------------------------------------------------------
def _loss(run: _Run, batch: dict, positions: list[int], tag: str = "train"):
    """(mean loss, per-sequence stats) of one micro-batch: SFT's objective or R2FT's."""
    t, dlm = run.recipe.train, run.dlm
    ids = dlm.ids
    if run.kind == "r2ft":
        from .r2ft import r2ft_batch_loss

        return r2ft_batch_loss(
            dlm, batch, positions, seed=t.seed, mask_id=ids.mask_id, eos_id=ids.eos_id, cfg=run.recipe.r2ft,
            causal=not dlm.is_diffusion, tag=tag,
        )
    return sft_batch_loss(dlm, batch, positions, seed=t.seed, objective=t.objective, mask_id=ids.mask_id, eps=t.eps, tag=tag)


def _train_step(run: _Run, step: int, trainable: list[torch.Tensor]) -> tuple[StepSums, Any, float]:
    """One optimiser step over this rank's micro-batches of global batch `step`: (this rank's sums, the
    gradient norm before clipping or None, the lr used). Gradients are all-reduced once, at the last one."""
    t, optim, acc, model = run.recipe.train, run.recipe.optim, run.acc, run.model
    sums = StepSums()
    lr = run.scheduler.get_last_lr()[0]
    for a in range(run.accum):
        base = step * t.global_batch + (a * run.world + run.rank) * t.micro_batch
        positions = list(range(base, base + t.micro_batch))
        batch = run.train_ds[[run.stream.index(k) for k in positions]]
        torch.manual_seed(seed_for(t.seed, "dropout", step, run.rank, a))
        sync = a == run.accum - 1
        if run.sharded:  # FSDP2: reduce-scatter the gradients at the last micro-batch only
            from .fsdp import set_gradient_sync

            set_gradient_sync(model, sync)
        if run.deepspeed:  # the engine reduces, clips and steps at the boundary, and divides by the accumulation
            acc.gradient_state._set_sync_gradients(sync)
            loss, stats = _loss(run, batch, positions)
            acc.backward(loss)
            sums.add(stats, len(positions))
            continue
        with (nullcontext() if sync or run.sharded else acc.no_sync(model)):
            loss, stats = _loss(run, batch, positions)
            acc.backward(loss / run.accum)
        sums.add(stats, len(positions))
    grad_norm = None
    if optim.grad_clip is not None and optim.grad_clip > 0:
        if run.sharded:  # the norm over every rank's shards (a DTensor)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        else:
            grad_norm = acc.clip_grad_norm_(trainable, optim.grad_clip)  # DeepSpeed: the norm it clipped with
    run.optimizer.step()  # DeepSpeed: no-ops (the engine stepped in the last backward)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, lr


@dataclass
class _Throughput:
    """Wall clock of the run and of the window since the last logged step (tokens/s)."""

    started: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0


def _train_record(run: _Run, step: int, sums: StepSums, grad_norm, lr: float, clock: _Throughput) -> dict:
    """The metrics.jsonl line of a logged step (`sums` all-reduced); restarts the throughput window."""
    loss = sums.mean("loss")
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss} at step {step}; lower optim.lr or check the data")
    now = time.perf_counter()
    rec = {
        "step": step, "split": "train", "loss": loss, "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "epoch": step * run.recipe.train.global_batch / run.n_train,
        "tokens_per_s": clock.window_tokens / max(1e-9, now - clock.window_start),
        "answer_tokens": sums.tokens, "elapsed_s": now - clock.started,
    }
    if run.kind == "r2ft":
        rec.update(lw=sums.mean("lw"), ll=sums.mean("ll"), margin=sums.mean("margin"))
    clock.window_start, clock.window_tokens = now, 0
    return rec


# -- evaluate -------------------------------------------------------------------------------------------
def _evaluate(run: _Run, step: int) -> dict | None:
    """The held-out loss (fixed noise per example: tag "eval") over the first `train.eval_examples`,
    split over the ranks; its metrics.jsonl line, or None without an eval split."""
    if run.eval_ds is None:
        return None
    t, acc, dlm = run.recipe.train, run.acc, run.dlm
    n = min(len(run.eval_ds), t.eval_examples or len(run.eval_ds))
    mine = list(range(run.rank, n, run.world))
    unwrapped = acc.unwrap_model(run.model)  # no DDP: ranks may run different numbers of batches
    dlm.module = unwrapped
    unwrapped.eval()
    sums = StepSums()
    # FSDP2 gathers weights in every forward, a collective: every rank runs the same number of batches
    # (a rank short of examples runs one of rank 0's again and drops its stats)
    # (and DeepSpeed ZeRO-3's); so with several ranks always: the result is the same
    batches = math.ceil(math.ceil(n / run.world) / t.micro_batch)
    try:
        with torch.no_grad():
            for b in range(batches):
                idx = mine[b * t.micro_batch : (b + 1) * t.micro_batch]
                if not idx:
                    _loss(run, run.eval_ds[[0]], [0], tag="eval")
                    continue
                _, stats = _loss(run, run.eval_ds[idx], idx, tag="eval")
                sums.add(stats, len(idx))
    finally:
        unwrapped.train()
        dlm.module = run.model
    sums = sums.all_reduce(acc)
    rec = {"step": step, "split": "eval", "eval_loss": sums.mean("loss"), "eval_examples": int(sums.sequences)}
    if run.kind == "r2ft":
        rec.update(eval_lw=sums.mean("lw"), eval_ll=sums.mean("ll"))
    return rec


# -- checkpoint -----------------------------------------------------------------------------------------
def _resume(run: _Run, ckpt: Path) -> None:
    """Load a checkpoint into the prepared run: weights, accelerate's state (optimizer, scheduler, scaler,
    RNG), the step; the main rank drops the metric lines logged after it."""
    from accelerate.utils import DistributedType

    acc = run.acc
    has_shards = (ckpt / SHARDED).is_dir()
    if has_shards != run.sharded:
        raise ConfigError(
            f"cannot resume {ckpt}: it was written by a {'fsdp2' if has_shards else 'ddp'} run, this one is {run.strategy}",
            key="train.strategy",
        )
    if run.sharded:  # model + optimizer from the DCP shards (any world size)
        from .fsdp import sharded_load

        sharded_load(run.model, run.optimizer, ckpt / SHARDED)
    elif acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # those load their own
        _load_weights(acc.unwrap_model(run.model), ckpt / "model")
    acc.load_state(str(ckpt / "state"))
    run.start = int(json.loads((ckpt / STATE_FILE).read_text())["step"])
    if acc.is_main_process:
        _truncate_metrics(run.out / METRICS_FILE, run.start)


def _save_checkpoint(run: _Run, step: int) -> Path:
    """checkpoints/step-N (weights, accelerate's state, trainer_state.json), built in a temporary folder by
    every rank and renamed when complete; then only the newest `train.keep_last` are kept."""
    t, acc = run.recipe.train, run.acc
    root = run.out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    # every rank writes into checkpoints/.step-N.tmp (accelerate's state: one RNG file per rank)
    with atomic_directory(final, sync=acc.wait_for_everyone, owner=acc.is_main_process) as tmp:
        if run.sharded:  # every rank writes its shards of the weights and AdamW states (no full copy)
            from .fsdp import sharded_save

            sharded_save(run.model, run.optimizer, tmp / SHARDED)
        else:
            _save_model(acc, run.model, tmp / "model", run.dlm)
        acc.save_state(str(tmp / "state"))
        if acc.is_main_process:
            state = {
                "step": step, "total_steps": run.total, "consumed_sequences": step * t.global_batch,
                "epoch": step * t.global_batch / run.n_train, "world_size": run.world, "accumulation": run.accum,
                "kind": run.kind, "strategy": run.strategy, "time": time.time(),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if acc.is_main_process:
        done = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -t.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    run.emit({"event": "save", "step": step, "path": str(final)})
    return final


def _save_final(run: _Run, last: dict, last_eval: dict | None) -> Path:
    """A last checkpoint (so --resume with a larger max_steps continues) and final/ with difflm_training.json."""
    acc, out = run.acc, run.out
    final_dir = out / "final"
    if run.start < run.total or latest_checkpoint(out) is None:
        _save_checkpoint(run, run.total)
    # the previous final/ stays until the new one is complete (only the main rank writes; FSDP gathers on all)
    with atomic_directory(final_dir) if acc.is_main_process else nullcontext(final_dir) as tmp:
        _save_model(acc, run.model, tmp, run.dlm, sharded=run.sharded)
        if acc.is_main_process:
            summary = {"kind": run.kind, "steps": run.total, "last": last, "eval": last_eval, "recipe": to_dict(run.recipe)}
            (tmp / "difflm_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc.wait_for_everyone()
    return final_dir


def _log(run: _Run, rec: dict) -> None:
    if run.acc.is_main_process:
        with open(run.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


# -- the loop -------------------------------------------------------------------------------------------
def train(
    recipe: TrainRecipe,
    kind: str = "sft",
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Run `difflm sft` (kind "sft") or `difflm r2ft` (kind "r2ft") as the recipe says.

    `callback(event)` receives dicts on the main process: {"event": "start", ...}, "step" (the
    logged metrics), "eval", "save" and "done". Returns a `TrainResult` (on every rank).
    """
    run = _setup(recipe, kind, callback)
    t = recipe.train
    run.emit(_start_event(run))
    run.model.train()
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    last: dict[str, Any] = {}
    last_eval = None
    seq_len = int(run.meta.get("max_length", 0))
    clock = _Throughput()
    for step in range(run.start, run.total):
        sums, grad_norm, lr = _train_step(run, step, trainable)
        done = step + 1
        clock.window_tokens += t.global_batch * seq_len
        if done % t.log_every == 0 or done == run.total:
            last = _train_record(run, done, sums.all_reduce(run.acc), grad_norm, lr, clock)
            _log(run, last)
            run.emit({"event": "step", "total_steps": run.total, **last})
        if t.eval_every and (done % t.eval_every == 0 or done == run.total):
            last_eval = _evaluate(run, done)
            if last_eval is not None:
                _log(run, last_eval)
                run.emit({"event": "eval", **last_eval})
        if t.save_every and done % t.save_every == 0 and done != run.total:
            _save_checkpoint(run, done)
    final_dir = _save_final(run, last, last_eval)
    run.emit({"event": "done", "steps": run.total, "final": str(final_dir), "output_dir": str(run.out)})
    run.dlm.module = run.acc.unwrap_model(run.model)
    return TrainResult(run.out, final_dir, run.total, last, last_eval, run.dlm)
