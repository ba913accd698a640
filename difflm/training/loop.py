"""The training loop behind `difflm sft` and `difflm r2ft`, on Hugging Face accelerate.

One function, `train(recipe, kind)`, in the order it runs:

1. accelerate: one process or many (`accelerate launch` / `torchrun`: DDP; an FSDP config is in
   `recipes/accelerate/`), autocast for bf16/fp16, a gradient scaler for fp16.
2. data: the tokenized folder (`difflm tokenize`), checked against the model's ids.
3. model: `difflm.models.load_model` (QLoRA: 4-bit nf4 with double quantisation), then LoRA via
   peft (or the given adapter, trainable), gradient checkpointing (non-reentrant), `.train()`.
4. AdamW (or bitsandbytes 8-bit AdamW; no decay on vectors), linear warm-up then constant or cosine.
5. steps: a global batch of `train.global_batch` sequences = micro-batches x accumulation x ranks.
   Forward passes go through the *wrapped* (DDP) module, and only the last micro-batch of a step
   synchronises gradients (`no_sync` before it), so the all-reduce happens exactly once per step.
   Then clipping, the optimiser and the scheduler step.
6. every `log_every`: metrics (loss averaged over the global batch and all ranks, lr, gradient norm,
   tokens/s; R2FT adds LW, LL and their margin) to `metrics.jsonl` and the callback;
   every `eval_every`: the held-out loss with fixed noise; every `save_every`: a checkpoint.
7. the end: `final/` (the adapter alone for LoRA/QLoRA; a full checkpoint otherwise, in difflm's
   native format for LLaDA) and a last checkpoint.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from difflm.config import dump_yaml, load_yaml, to_dict
from difflm.errors import ConfigError
from difflm.io import atomic_directory

from .losses import seed_for, sft_batch_loss, weight_decay_groups
from .recipes import TrainRecipe

__all__ = ["TrainResult", "train", "latest_checkpoint", "build_model", "enable_gradient_checkpointing", "add_lora"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
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
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)", key="model.adapter")
    return str(path)


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


# -- checkpoints -------------------------------------------------------------------------------------
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


def _save_model(accelerator, model, out_dir: Path, dlm) -> None:
    """The weights a user loads: the adapter alone (LoRA/QLoRA) or a full checkpoint (LLaDA: the
    native bidirectional-Llama format) with the tokenizer. Called on every rank (FSDP gathers)."""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    state = accelerator.get_state_dict(model) if fsdp else None
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_peft(unwrapped):
        unwrapped.save_pretrained(str(out_dir), state_dict=state)
        return
    if dlm.family == "llada" and state is None:
        from difflm.models import save_native

        save_native(unwrapped, out_dir, dlm.tokenizer, dlm.ids)
        return
    unwrapped.save_pretrained(str(out_dir), state_dict=state, save_original_format=False)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(str(out_dir))


# -- the loop ------------------------------------------------------------------------------------------
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
        from difflm.io import atomic_write_text

        def write(folder: Path) -> None:
            atomic_write_text(folder / "recipe.yaml", dump_yaml(recipe))
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


def train(
    recipe: TrainRecipe,
    kind: str = "sft",
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Run `difflm sft` (kind "sft") or `difflm r2ft` (kind "r2ft") as the recipe says.

    `callback(event)` receives dicts on the main process: {"event": "start", ...}, "step" (the
    logged metrics), "eval", "save" and "done". Returns a `TrainResult` (on every rank).
    """
    from .data import load_tokenized

    if kind not in ("sft", "r2ft"):
        raise ValueError(f"unknown training kind {kind!r}")
    t, optim = recipe.train, recipe.optim
    acc = _accelerator(t)
    emit = (callback if acc.is_main_process and callback else (lambda e: None))
    world, rank = acc.num_processes, acc.process_index
    if t.global_batch % (t.micro_batch * world):
        raise ConfigError(
            f"global_batch {t.global_batch} is not a multiple of micro_batch {t.micro_batch} x {world} processes",
            key="train.global_batch",
        )
    accum = t.global_batch // (t.micro_batch * world)
    dsd, meta = load_tokenized(recipe.data.path)
    _check_meta(meta, recipe, kind)
    resume_from = _check_output(recipe)
    out = Path(t.output_dir)

    dlm = build_model(recipe, acc.device)
    _check_model(meta, dlm, kind, recipe)
    _create_output(recipe, acc, kind, resume_from)
    causal = not dlm.is_diffusion
    train_ds = dsd["train"]
    eval_ds = dsd["eval"] if "eval" in dsd else None
    n_train = len(train_ds)
    total = t.max_steps or max(1, math.ceil(t.epochs * n_train / t.global_batch))

    module = dlm.module
    optimizer = build_optimizer(module, optim, acc.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim.warmup_steps, total, optim.schedule, optim.min_lr_ratio)
    )
    model, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    dlm.module = model  # every training forward goes through the wrapper (DDP all-reduce, autocast)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in acc.unwrap_model(model).parameters())

    start = 0
    metrics_path = out / METRICS_FILE
    if resume_from is not None:
        from accelerate.utils import DistributedType

        if acc.distributed_type != DistributedType.FSDP:  # FSDP: accelerate loads its own shards
            _load_weights(acc.unwrap_model(model), resume_from / "model")
        acc.load_state(str(resume_from / "state"))
        start = int(json.loads((resume_from / STATE_FILE).read_text())["step"])
        if acc.is_main_process:
            _truncate_metrics(metrics_path, start)
    acc.wait_for_everyone()

    stream = DataStream(n_train, t.seed)
    ids = dlm.ids

    def loss_on(batch, positions, tag="train"):
        if kind == "r2ft":
            from .r2ft import r2ft_batch_loss

            return r2ft_batch_loss(
                dlm, batch, positions, seed=t.seed, mask_id=ids.mask_id, eos_id=ids.eos_id, cfg=recipe.r2ft,
                causal=causal, tag=tag,
            )
        return sft_batch_loss(dlm, batch, positions, seed=t.seed, objective=t.objective, mask_id=ids.mask_id, eps=t.eps, tag=tag)

    def evaluate(step: int) -> dict | None:
        if eval_ds is None:
            return None
        n = min(len(eval_ds), t.eval_examples or len(eval_ds))
        mine = list(range(rank, n, world))
        unwrapped = acc.unwrap_model(model)  # no DDP: ranks may run different numbers of batches
        dlm.module = unwrapped
        unwrapped.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        try:
            with torch.no_grad():
                for i in range(0, len(mine), t.micro_batch):
                    idx = mine[i : i + t.micro_batch]
                    _, st = loss_on(eval_ds[idx], idx, tag="eval")
                    sums += torch.tensor([
                        float(st["loss"].sum()), len(idx),
                        float(st["lw"].sum()) if "lw" in st else 0.0,
                        float(st["ll"].sum()) if "ll" in st else 0.0,
                        float(st["tokens"].sum()),
                    ], dtype=torch.float64)
        finally:
            unwrapped.train()
            dlm.module = model
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        rec = {"step": step, "split": "eval", "eval_loss": float(sums[0] / max(1, sums[1])), "eval_examples": int(sums[1])}
        if kind == "r2ft":
            rec.update(eval_lw=float(sums[2] / max(1, sums[1])), eval_ll=float(sums[3] / max(1, sums[1])))
        return rec

    def log(rec: dict) -> None:
        if acc.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def save_checkpoint(step: int) -> Path:
        root = out / CHECKPOINTS
        final = root / f"step-{step:07d}"
        # every rank writes into checkpoints/.step-N.tmp (accelerate's state: one RNG file per rank)
        with atomic_directory(final, sync=acc.wait_for_everyone, owner=acc.is_main_process) as tmp:
            _save_model(acc, model, tmp / "model", dlm)
            acc.save_state(str(tmp / "state"))
            if acc.is_main_process:
                state = {
                    "step": step, "total_steps": total, "consumed_sequences": step * t.global_batch,
                    "epoch": step * t.global_batch / n_train, "world_size": world, "accumulation": accum,
                    "kind": kind, "time": time.time(),
                }
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if acc.is_main_process:
            done = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("-")[1]))
            for old in done[: -t.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        emit({"event": "save", "step": step, "path": str(final)})
        return final

    emit({
        "event": "start", "kind": kind, "start_step": start, "total_steps": total, "world_size": world,
        "accumulation": accum, "micro_batch": t.micro_batch, "global_batch": t.global_batch,
        "train_examples": n_train, "eval_examples": len(eval_ds) if eval_ds is not None else 0,
        "trainable_params": n_trainable, "total_params": n_total, "device": str(acc.device),
        "resumed_from": str(resume_from) if resume_from else None, "max_length": meta.get("max_length"),
    })

    model.train()
    last: dict[str, Any] = {}
    last_eval = None
    seq_len = int(meta.get("max_length", 0))
    t_run = time.perf_counter()
    window = {"t": time.perf_counter(), "tokens": 0}
    for step in range(start, total):
        sums = torch.zeros(6, dtype=torch.float64)  # loss, seqs, lw, ll, margin, answer tokens
        for a in range(accum):
            base = step * t.global_batch + (a * world + rank) * t.micro_batch
            positions = list(range(base, base + t.micro_batch))
            batch = train_ds[[stream.index(k) for k in positions]]
            torch.manual_seed(seed_for(t.seed, "dropout", step, rank, a))
            sync = a == accum - 1
            with (nullcontext() if sync else acc.no_sync(model)):
                loss, st = loss_on(batch, positions)
                acc.backward(loss / accum)
            sums += torch.tensor([
                float(st["loss"].sum()), len(positions),
                float(st["lw"].sum()) if "lw" in st else 0.0,
                float(st["ll"].sum()) if "ll" in st else 0.0,
                float(st["margin"].sum()) if "margin" in st else 0.0,
                float(st["tokens"].sum()),
            ], dtype=torch.float64)
        grad_norm = None
        if optim.grad_clip is not None and optim.grad_clip > 0:
            grad_norm = acc.clip_grad_norm_(trainable, optim.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done_steps = step + 1
        window["tokens"] += t.global_batch * seq_len

        if done_steps % t.log_every == 0 or done_steps == total:
            sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
            n = max(1.0, float(sums[1]))
            loss_value = float(sums[0] / n)
            if not math.isfinite(loss_value):
                raise RuntimeError(f"the loss is {loss_value} at step {done_steps}; lower optim.lr or check the data")
            now = time.perf_counter()
            rec = {
                "step": done_steps, "split": "train", "loss": loss_value, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "epoch": done_steps * t.global_batch / n_train,
                "tokens_per_s": window["tokens"] / max(1e-9, now - window["t"]),
                "answer_tokens": float(sums[5]), "elapsed_s": now - t_run,
            }
            if kind == "r2ft":
                rec.update(lw=float(sums[2] / n), ll=float(sums[3] / n), margin=float(sums[4] / n))
            window = {"t": now, "tokens": 0}
            last = rec
            log(rec)
            emit({"event": "step", "total_steps": total, **rec})
        if t.eval_every and (done_steps % t.eval_every == 0 or done_steps == total):
            last_eval = evaluate(done_steps)
            if last_eval is not None:
                log(last_eval)
                emit({"event": "eval", **last_eval})
        if t.save_every and done_steps % t.save_every == 0 and done_steps != total:
            save_checkpoint(done_steps)

    # the end: a last checkpoint (so --resume with a larger max_steps continues) and final/
    final_dir = out / "final"
    if start < total or latest_checkpoint(out) is None:
        save_checkpoint(total)
    # the previous final/ stays until the new one is complete (only the main rank writes; FSDP gathers on all)
    with atomic_directory(final_dir) if acc.is_main_process else nullcontext(final_dir) as tmp:
        _save_model(acc, model, tmp, dlm)
        if acc.is_main_process:
            summary = {"kind": kind, "steps": total, "last": last, "eval": last_eval, "recipe": to_dict(recipe)}
            (tmp / "difflm_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc.wait_for_everyone()
    emit({"event": "done", "steps": total, "final": str(final_dir), "output_dir": str(out)})
    dlm.module = acc.unwrap_model(model)
    return TrainResult(out, final_dir, total, last, last_eval, dlm)
