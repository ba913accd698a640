"""The memory planner behind `difflm sft --plan`: per-GPU memory of a recipe under each training strategy.

The model is built on the meta device from its config (no weights are read or allocated), so the parameter
count is the model's own and an 8B plan takes a second. Notation: P parameters, Q of them in the decoder
blocks' linear layers (what QLoRA quantises), T LoRA parameters (r (in + out) per targeted linear), N GPUs,
w bytes per stored weight (`model.dtype`: 4 for float32, 2 for bfloat16/float16), o optimizer bytes per
trained parameter (AdamW: two states in the parameter's dtype, 2w; `adamw_8bit`: 2), c bytes of the compute
dtype (2 under bf16/fp16 autocast, else w), U the parameters of the largest FSDP unit (one block, or the
rest of the model: embeddings, head, final norm), b micro-batch, s sequence length (`data.max_length`),
h hidden size, n layers, V vocabulary. Per GPU:

| strategy | parameters | gradients | optimizer | on the CPU (per process) |
|---|---|---|---|---|
| ddp | w P | w P | o P | |
| zero2 | w P | w P / N | o P / N | |
| zero2-offload | w P | | | (w + o) P / N (gradients and AdamW on the CPU) |
| zero3, fsdp2 | w P / N + 2 c U (this unit + the prefetched one, gathered) | w P / N | o P / N | |
| zero3-offload, fsdp2-offload | 2 c U | | | (2 w + o) P / N |
| lora | w P + 4 T | 4 T | 8 T | |
| qlora | (0.5 + 1/64 + 1/4096) Q + 2 (P - Q) + 4 T (NF4 with double quantisation; the rest bf16) | 4 T | 8 T | |

Activations (every strategy; a rough estimate, SDPA attention so no s x s matrix is kept): a block keeps
about 17 s b h values of dtype c (Korthikanti et al. 2022: 34 s b h bytes at 16 bits); gradient
checkpointing keeps each block's input (s b h c) and recomputes one block at a time. The logits add
s b V (c + 4) (the compute-dtype logits and the float32 log-softmax). So
A = n 17 s b h c + L without checkpointing, A = n s b h c + 17 s b h c + L with it, L = s b V (c + 4).
Not counted: the CUDA context and allocator slack (~0.5-2 GiB per GPU), communication buffers, and
transient copies (the loss's float32 upcast of a micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difflm.errors import ConfigError

__all__ = ["ModelShape", "PlanRow", "model_shape", "meta_module", "plan", "STRATEGIES", "GIB"]

GIB = 1024**3
STRATEGIES = ("ddp", "zero2", "zero2-offload", "zero3", "fsdp2", "zero3-offload", "fsdp2-offload", "lora", "qlora")
ACTIVATION_VALUES_PER_BLOCK = 17  #: values of s b h one block keeps for backward (34 s b h bytes at 16 bits)
NF4_BYTES = 0.5 + 1 / 64 + 1 / 4096  #: 4 bits + an 8-bit absmax per 64 + a float32 per 256 absmaxes


@dataclass
class ModelShape:
    params: int  #: P
    block_linear_params: int  #: Q (the linear layers inside the blocks)
    largest_unit: int  #: U (parameters of the largest FSDP unit: a block or the rest)
    lora_params: int  #: T for the recipe's LoRA targets and r
    layers: int
    hidden: int
    vocab: int
    block_class: str


@dataclass
class PlanRow:
    strategy: str
    params: float  #: bytes per GPU
    grads: float
    optimizer: float
    activations: float
    cpu: float = 0.0  #: bytes per process kept on the CPU (offload)
    trained: int = 0  #: parameters trained
    notes: str = ""
    total: float = field(init=False)

    def __post_init__(self):
        self.total = self.params + self.grads + self.optimizer + self.activations


def meta_module(name: str, family: str = "auto", trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """The model built from its config on the meta device (no weights): (module, family)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, LlamaForCausalLM

    from difflm.models.families import detect_family
    from difflm.models.llada import is_llada_format, llama_config_from_llada
    from difflm.models.loading import resolve_source

    source, config, _ = resolve_source(name)
    if family == "auto":
        family = detect_family(config, name)
    with torch.device("meta"):
        if family == "llada" and is_llada_format(config):
            return LlamaForCausalLM(llama_config_from_llada(config)), family
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        cls = AutoModelForMaskedLM if family == "mlm" else AutoModelForCausalLM
        try:
            return cls.from_config(cfg, trust_remote_code=trust_remote_code), family
        except ValueError as e:  # remote-code models without an Auto class of this kind
            raise ConfigError(f"cannot build {name} from its config for the plan: {e}", key="model.name") from e


def model_shape(module: nn.Module, lora_r: int = 64, lora_targets: list[str] | None = None) -> ModelShape:
    """P, Q, U, T and the dimensions the formulas need, counted on `module` (meta or real)."""
    from .fsdp import _units, wrap_classes

    classes = wrap_classes(module)
    units = _units(module, classes) if classes else []
    seen: set[int] = set()
    params = 0
    for p in module.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    in_units = {id(p) for u in units for p in u.parameters()}
    rest = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values() if id(p) not in in_units)
    largest = max([sum(p.numel() for p in u.parameters()) for u in units] + [rest])
    q = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            for u in units for m in u.modules() if isinstance(m, nn.Linear))
    targets = set(lora_targets or [])
    t = sum(lora_r * (m.in_features + m.out_features) for u in units for name, m in u.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    cfg = getattr(module, "config", None)
    get = (lambda *keys: next((getattr(cfg, k) for k in keys if getattr(cfg, k, None)), 0)) if cfg is not None else (lambda *k: 0)
    return ModelShape(
        params=params, block_linear_params=q, largest_unit=largest, lora_params=t, layers=len(units) or get("num_hidden_layers", "n_layers"),
        hidden=get("hidden_size", "d_model", "hidden_dim"), vocab=get("vocab_size"), block_class=",".join(classes),
    )


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "auto") else 2


def activations(shape: ModelShape, *, seq: int, micro_batch: int, compute_bytes: int, checkpointing: bool) -> float:
    sbh = seq * micro_batch * shape.hidden * compute_bytes
    logits = seq * micro_batch * shape.vocab * (compute_bytes + 4)
    blocks = shape.layers * sbh + ACTIVATION_VALUES_PER_BLOCK * sbh if checkpointing else (
        shape.layers * ACTIVATION_VALUES_PER_BLOCK * sbh)
    return float(blocks + logits)


def plan(
    shape: ModelShape, *, gpus: int, seq: int, micro_batch: int, dtype: str = "float32", precision: str = "bf16",
    checkpointing: bool = False, optim: str = "adamw",
) -> list[PlanRow]:
    """One `PlanRow` per strategy (`STRATEGIES`) with the formulas of the module doc (bytes)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}", key="gpus")
    P, Q, U, T, N = shape.params, shape.block_linear_params, shape.largest_unit, shape.lora_params, gpus
    w = _dtype_bytes(dtype)
    c = 2 if precision in ("bf16", "fp16") else w
    o = 2 if optim == "adamw_8bit" else 2 * w
    act = activations(shape, seq=seq, micro_batch=micro_batch, compute_bytes=c, checkpointing=checkpointing)
    act_lora = activations(shape, seq=seq, micro_batch=micro_batch, compute_bytes=2 if precision != "fp32" else w,
                           checkpointing=checkpointing)
    gathered = 2 * c * U
    rows = [
        PlanRow("ddp", w * P, w * P, o * P, act, trained=P, notes="replicated weights"),
        PlanRow("zero2", w * P, w * P / N, o * P / N, act, trained=P, notes="DeepSpeed: grads + optimizer sharded"),
        PlanRow("zero2-offload", w * P, 0, 0, act, cpu=(w + o) * P / N, trained=P, notes="DeepSpeed: optimizer on CPU"),
        PlanRow("zero3", w * P / N + gathered, w * P / N, o * P / N, act, trained=P, notes="DeepSpeed: all sharded"),
        PlanRow("fsdp2", w * P / N + gathered, w * P / N, o * P / N, act, trained=P, notes="torch fully_shard"),
        PlanRow("zero3-offload", gathered, 0, 0, act, cpu=(2 * w + o) * P / N, trained=P, notes="DeepSpeed: params + optimizer on CPU"),
        PlanRow("fsdp2-offload", gathered, 0, 0, act, cpu=(2 * w + o) * P / N, trained=P, notes="CPUOffloadPolicy"),
        PlanRow("lora", w * P + 4 * T, 4 * T, 8 * T, act_lora, trained=T, notes="frozen base, fp32 adapter"),
        PlanRow("qlora", NF4_BYTES * Q + 2 * (P - Q) + 4 * T, 4 * T, 8 * T, act_lora, trained=T,
                notes="NF4 blocks, bf16 rest"),
    ]
    return rows


def plan_recipe(recipe: Any, gpus: int) -> tuple[ModelShape, list[PlanRow], dict]:
    """The plan of a `TrainRecipe` (its model, lora, data.max_length, micro_batch, dtype, precision,
    gradient checkpointing, optimizer): (shape, rows, the settings used)."""
    m, t = recipe.model, recipe.train
    if m.name is None:
        raise ConfigError("no model given: set model.name", key="model.name")
    module, family = meta_module(m.name, m.family, m.trust_remote_code)
    targets = recipe.lora.target_modules
    if not targets:
        from difflm.models.base import default_lora_targets

        targets = default_lora_targets(module, family)
    shape = model_shape(module, recipe.lora.r, targets)
    settings = dict(model=m.name, family=family, gpus=gpus, seq=recipe.data.max_length, micro_batch=t.micro_batch,
                    dtype=m.dtype, precision=t.precision, checkpointing=t.gradient_checkpointing, optim=recipe.optim.name,
                    lora_r=recipe.lora.r, lora_targets=list(targets))
    rows = plan(shape, gpus=gpus, seq=recipe.data.max_length, micro_batch=t.micro_batch, dtype=m.dtype,
                precision=t.precision, checkpointing=t.gradient_checkpointing, optim=recipe.optim.name)
    return shape, rows, settings
