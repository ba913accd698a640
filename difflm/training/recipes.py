"""Training recipes: one dataclass read by `difflm tokenize`, `difflm sft` and `difflm r2ft`.

A recipe file has up to six sections; each command reads the ones it needs::

    model:  which checkpoint (and optionally which LoRA adapter to start from)
    data:   where the examples come from, how they are formatted and tokenized, where the
            tokenized folder lives (`data.path`: written by tokenize, read by sft/r2ft)
    train:  objective, full/LoRA/QLoRA, batch sizes, length, precision, checkpoints, output
    optim:  AdamW (or 8-bit AdamW), learning rate, warm-up, schedule, clipping
    lora:   r, alpha, dropout, target modules (LoRA and QLoRA)
    r2ft:   the R2FT loss weights and the corruption rule's ranges

Every field has a default, so `difflm sft model.name=DIR data.path=DIR` is a complete recipe;
`validate()` checks the combinations (one line per problem, naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from difflm.errors import ConfigError
from difflm.model_families import FAMILY_CHOICES

__all__ = [
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "R2FTConfig",
    "FsdpConfig",
    "TrainConfig",
    "TrainDataConfig",
    "TrainModelConfig",
    "TrainRecipe",
    "DATA_FORMATS",
    "EOS_POLICIES",
]

DATA_FORMATS = ("alpaca", "alpaca-cot", "raw", "chat", "text")
EOS_POLICIES = ("all", "first", "none")


@dataclass
class TrainModelConfig:
    """The `model:` section of a training recipe. (Generation's `model:` section is
    `difflm.generation.GenerateModelConfig`: other keys, e.g. device and quantization, which training takes
    from `train.device` and `train.mode`, and other defaults.)"""

    name: str | None = field(default=None, metadata={"help": "Hub name or local model folder"})
    family: str = field(
        default="auto", metadata={"choices": list(FAMILY_CHOICES), "help": "model family"}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "choices": ["auto", "float32", "bfloat16", "float16"],
            "help": "dtype of the loaded weights (the frozen base for LoRA; QLoRA computes in bfloat16)",
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "llada/dream/mdlm: their own code instead of the native path"})
    adapter: str | None = field(
        default=None,
        metadata={"help": "start from this LoRA adapter (LoRA/QLoRA: train it further; full: merge it first)"},
    )


@dataclass
class TrainDataConfig:
    """The `data:` section of a training recipe: the examples and how `difflm tokenize` turns them into
    token ids (generation's `data:` section, the prompts, is `difflm.generation.GenerateDataConfig`)."""

    source: str = field(
        default="tatsu-lab/alpaca",
        metadata={"help": "Hub dataset name, or a local .json/.jsonl/.parquet/.csv file, folder or glob"},
    )
    split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    format: str = field(
        default="alpaca",
        metadata={
            "choices": list(DATA_FORMATS),
            "help": "alpaca | alpaca-cot | raw (instruction data), chat (the tokenizer's chat template), "
            "text (raw text packed into max_length chunks)",
        },
    )
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str | None = field(
        default=None, metadata={"help": "chat data: a list of {role, content}; the last turn is the answer"}
    )
    text_field: str = field(default="text", metadata={"help": "format text: the field with the raw text"})
    max_length: int = field(default=1024, metadata={"min": 8, "help": "tokens per example (padded with EOS)"})
    eos_policy: str = field(
        default="first",
        metadata={
            "choices": list(EOS_POLICIES),
            "help": "which EOS tokens are part of the answer: all (LLaDA: the EOS padding is trained), "
            "first (only the first EOS), none",
        },
    )
    overflow: str = field(
        default="drop",
        metadata={
            "choices": ["drop", "truncate"],
            "help": "examples longer than max_length: drop them, or cut the answer (and keep the prompt's end)",
        },
    )
    eval_size: float = field(
        default=0.0, metadata={"min": 0, "help": "held-out examples: a count (>= 1) or a fraction (< 1)"}
    )
    limit: int | None = field(default=None, metadata={"min": 1, "help": "use only the first N rows"})
    seed: int = field(default=42, metadata={"help": "seed of the held-out split"})
    path: str = field(default="runs/data/alpaca", metadata={"help": "the tokenized folder (tokenize writes it)"})

    def validate(self) -> None:
        if self.eval_size >= 1 and self.eval_size != int(self.eval_size):
            raise ConfigError(f"a count must be a whole number, got {self.eval_size}", key="eval_size")


# the names before the split (still importable; `ModelConfig`/`DataConfig` meant another class in generation)
ModelConfig = TrainModelConfig
DataConfig = TrainDataConfig


@dataclass
class LoraConfig:
    r: int = field(default=64, metadata={"min": 1})
    alpha: float = field(default=16, metadata={"min": 0})
    dropout: float = field(default=0.1, metadata={"min": 0, "max": 1})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "module names; default: the family's (LLaDA: q_proj, k_proj, v_proj)"}
    )


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata={"choices": ["adamw", "adamw_8bit"], "help": "adamw_8bit: bitsandbytes"})
    lr: float = field(default=2.5e-5, metadata={"min": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata={"min": 0})
    warmup_steps: int = field(default=500, metadata={"min": 0, "help": "linear warm-up from 0"})
    schedule: str = field(default="constant", metadata={"choices": ["constant", "cosine"]})
    min_lr_ratio: float = field(default=0.0, metadata={"min": 0, "max": 1, "help": "cosine: final lr / lr"})
    grad_clip: float | None = field(default=1.0, metadata={"min": 0, "help": "max gradient norm; null = off"})


@dataclass
class R2FTConfig:
    beta_w: float = 1.0
    beta_l: float = 1.0
    beta_a: float = field(default=0.1, metadata={"help": "weight of the plain likelihood term -b_a * LW"})
    gamma: float = 0.0
    phrase_min: int = field(default=1, metadata={"min": 1, "help": "g ~ U{phrase_min..phrase_max}"})
    phrase_max: int = field(default=14, metadata={"min": 1})
    span_min: int = field(default=30, metadata={"min": 1, "help": "z ~ U{span_min..span_max}"})
    span_max: int = field(default=49, metadata={"min": 1})

    def validate(self) -> None:
        if self.phrase_max < self.phrase_min:
            raise ConfigError(f"must be >= phrase_min ({self.phrase_min}), got {self.phrase_max}", key="phrase_max")
        if self.span_max < self.span_min:
            raise ConfigError(f"must be >= span_min ({self.span_min}), got {self.span_max}", key="span_max")


@dataclass
class FsdpConfig:
    """The `fsdp:` section (used when `train.strategy` is fsdp2; `difflm/training/fsdp.py`). Launched with
    `accelerate launch --config_file recipes/accelerate/fsdp2.yaml`, that file's fsdp_offload_params,
    fsdp_reshard_after_forward, fsdp_transformer_layer_cls_to_wrap and fsdp_activation_checkpointing win."""

    cpu_offload: bool = field(default=False, metadata={"help": "sharded weights, gradients and AdamW on the CPU"})
    reshard_after_forward: bool = field(
        default=True, metadata={"help": "free gathered weights after forward (ZeRO-3-like); false: ZeRO-2-like"}
    )
    wrap: list[str] | None = field(
        default=None, metadata={"help": "block class names to shard (default: the model's _no_split_modules)"}
    )


@dataclass
class TrainConfig:
    objective: str = field(
        default="diffusion",
        metadata={
            "choices": ["diffusion", "pretrain", "ar"],
            "help": "diffusion (masked-diffusion SFT on the answer), pretrain (the same loss on every "
            "token), ar (next-token loss on the answer, for AR reference models)",
        },
    )
    mode: str = field(default="full", metadata={"choices": ["full", "lora", "qlora"]})
    strategy: str = field(
        default="auto",
        metadata={
            "choices": ["auto", "ddp", "fsdp2"],
            "help": "ddp (replicated weights), fsdp2 (sharded full fine-tune), auto (fsdp2 when launched "
            "with an accelerate FSDP config, else ddp)",
        },
    )
    output_dir: str = field(default="runs/sft", metadata={"help": "checkpoints, metrics.jsonl and final/"})
    global_batch: int = field(default=256, metadata={"min": 1, "help": "sequences per optimiser step, all ranks"})
    micro_batch: int = field(default=1, metadata={"min": 1, "help": "sequences per forward pass and rank"})
    max_steps: int | None = field(default=None, metadata={"min": 1, "help": "optimiser steps (wins over epochs)"})
    epochs: float = field(default=1.0, metadata={"min": 0, "help": "passes over the data when max_steps is null"})
    precision: str = field(default="bf16", metadata={"choices": ["fp32", "bf16", "fp16"], "help": "autocast dtype"})
    gradient_checkpointing: bool = False
    eps: float = field(default=1e-3, metadata={"min": 0, "max": 1, "help": "t ~ U(eps, 1)"})
    seed: int = 0
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    log_every: int = field(default=1, metadata={"min": 1})
    eval_every: int | None = field(default=None, metadata={"min": 1, "help": "held-out loss every N steps"})
    eval_examples: int | None = field(default=None, metadata={"min": 1, "help": "held-out examples used (all)"})
    save_every: int | None = field(default=None, metadata={"min": 1, "help": "checkpoint every N steps"})
    keep_last: int = field(default=2, metadata={"min": 1, "help": "checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing output_dir first"})

    def validate(self) -> None:
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"must be a multiple of micro_batch ({self.micro_batch}), got {self.global_batch}", key="global_batch"
            )
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other", key="resume")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("give max_steps or epochs > 0", key="epochs")


@dataclass
class TrainRecipe:
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    r2ft: R2FTConfig = field(default_factory=R2FTConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)

    def validate(self) -> None:
        if self.train.mode == "qlora" and self.model.dtype not in ("auto", "bfloat16"):
            raise ConfigError(
                f"QLoRA keeps the non-quantized weights in bfloat16; set model.dtype: bfloat16 (got {self.model.dtype})",
                key="model.dtype",
            )
        if self.train.mode == "qlora" and self.train.precision == "fp16":
            raise ConfigError("QLoRA computes in bfloat16: use precision bf16", key="train.precision")
