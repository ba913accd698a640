"""FSDP2 for `difflm sft` / `difflm r2ft` full fine-tunes: torch's `fully_shard`, applied here directly.

Why not accelerate's FSDP plugin: accelerate turns FSDP on only for GPU processes (its CPU state is
always plain DDP), so the same code could not be run and tested on a CPU with gloo. Here the model is
sharded with `torch.distributed.fsdp.fully_shard` on every launcher (torchrun, `accelerate launch` with
`recipes/accelerate/fsdp2.yaml`), on CUDA (nccl) and CPU (gloo) alike; accelerate still starts the
process group and keeps the RNG/scheduler state.

- wrap units (`wrap_classes`): `fsdp.wrap` if given, else the model's `_no_split_modules` (Llama/LLaDA:
  LlamaDecoderLayer, Dream: Qwen2DecoderLayer, MDLM: MDLMBlock), else the class of the blocks in the
  model's largest `nn.ModuleList` (BERT: BertLayer). A unit that shares a parameter with the rest of
  the model (tied embeddings) is left to the root unit, which holds everything not in a block.
- mixed precision: `train.precision: bf16` -> `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`
  (the sharded fp32 weights are the master copy); fp32 -> none.
- `fsdp.cpu_offload`: `CPUOffloadPolicy` (sharded parameters, gradients and the optimizer step on the CPU).
- `fsdp.reshard_after_forward`: ZeRO-3-like (True, less memory) or ZeRO-2-like (False, no re-gather in
  backward).
- activation checkpointing: `train.gradient_checkpointing` (transformers' non-reentrant checkpointing of
  the same blocks), applied before sharding.
- checkpoints: `sharded_save`/`sharded_load` write and read model + optimizer in torch's distributed
  checkpoint format (DCP; one file per rank plus `.metadata`), so no rank ever holds the full model;
  `full_state_dict` gathers the full weights on rank 0 (CPU) for `final/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from difflm.errors import ConfigError

__all__ = ["wrap_classes", "shard_model", "full_state_dict", "sharded_save", "sharded_load", "set_gradient_sync"]


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _no_split_names(module: nn.Module) -> list[str]:
    for m in module.modules():  # the transformers PreTrainedModel, also inside a peft wrapper
        names = getattr(m, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def _largest_module_list_class(module: nn.Module) -> list[str]:
    best: nn.ModuleList | None = None
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) and (best is None or len(m) > len(best)):
            best = m
    return [type(best[0]).__name__] if best is not None else []


def wrap_classes(module: nn.Module, explicit: Iterable[str] | None = None) -> list[str]:
    """The class names whose instances become FSDP units (see the module doc for the order of sources)."""
    if explicit:
        names = list(explicit)
        present = {type(m).__name__ for m in module.modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(
                f"fsdp.wrap classes {missing} are not in the model (it has e.g. {sorted(present)[:8]})", key="fsdp.wrap"
            )
        return names
    names = [n for n in _no_split_names(module) if any(type(m).__name__ == n for m in module.modules())]
    return names or _largest_module_list_class(module)


def _units(module: nn.Module, classes: list[str]) -> list[nn.Module]:
    """The instances of `classes`, outermost first removed of nested ones, without those sharing a parameter
    with a module outside them (tied weights must stay in one unit: the root)."""
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    units: list[nn.Module] = []
    for m in module.modules():
        if type(m).__name__ not in classes or any(m is u or _contains(u, m) for u in units):
            continue
        inside: dict[int, int] = {}
        for _, p in m.named_parameters(remove_duplicate=False):
            inside[id(p)] = inside.get(id(p), 0) + 1
        if all(owners[k] == v for k, v in inside.items()):
            units.append(m)
    return units


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(inner is m for m in outer.modules())


def shard_model(
    module: nn.Module,
    *,
    precision: str = "fp32",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    wrap: Iterable[str] | None = None,
) -> tuple[nn.Module, list[str], int]:
    """`fully_shard` every wrap unit, then the root; returns (the sharded module (the same object), the
    wrap class names, the number of units). Needs an initialised process group (any launcher)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cpu_offload and not torch.cuda.is_available():  # CPUOffloadPolicy pins host memory for a GPU
        raise ConfigError("fsdp.cpu_offload moves shards between a GPU and the CPU: it needs a CUDA GPU", key="fsdp.cpu_offload")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "train.strategy fsdp2 needs torch.distributed: launch with torchrun --nproc_per_node N or "
            "accelerate launch (also for one process)",
            key="train.strategy",
        )
    classes = wrap_classes(module, wrap)
    if not classes:
        raise ConfigError("no block class found to shard: set fsdp.wrap to the model's layer class name", key="fsdp.wrap")
    units = _units(module, classes)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    kwargs: dict[str, Any] = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    return module, classes, len(units)


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """FSDP2's `no_sync`: skip the reduce-scatter of gradients on micro-batches before the last of a step."""
    module.set_requires_gradient_sync(sync)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0, on the CPU; an empty dict on the other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_save(module: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Model and optimizer state in DCP format under `path` (every rank writes its shards). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def sharded_load(module: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load `sharded_save`'s files into the sharded module and its optimizer (any world size). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(module, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
