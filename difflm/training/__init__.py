"""Training: tokenization, diffusion/AR SFT, R2FT, LoRA merging (the library behind
`difflm tokenize | sft | r2ft | merge`).

    from difflm.config import load_recipe
    from difflm.training import TrainRecipe, tokenize, sft, r2ft
    cfg = load_recipe(TrainRecipe, "recipes/tiny-sft.yaml", ["model.name=runs/tiny-llada"])
    tokenize(cfg)            # -> cfg.data.path
    result = sft(cfg)        # -> cfg.train.output_dir/final
    difflm.training.r2ft.corrupt(x0, prompt_len, answer_end, mask_id, eos_id, generator)

Modules: `recipes` (the dataclasses), `tokenized` (`difflm tokenize`: instruction data -> token ids on
disk, and `load_tokenized`; `data` is its deprecated old name), `losses` (diffusion/AR SFT losses),
`r2ft` (the corruption rule and the R2FT loss), `loop` (the accelerate training loop), `merge`.
Seeds come from `difflm.seeding`, the MASK-at--inf log-softmax from `difflm.subs`.
Importing this package is cheap (torch loads with the submodules).
"""

from __future__ import annotations

from .recipes import *  # noqa: F403 (the recipe dataclasses and choices, listed once in recipes.__all__)
from .recipes import __all__ as _recipe_names

__all__ = [*_recipe_names, "MergeRecipe", "TrainResult", "merge_adapter", "r2ft_train", "sft", "tokenize", "train"]


def tokenize(recipe, overwrite: bool = False, rows=None, status=None):
    """Tokenize `recipe.data` into `recipe.data.path` (see `difflm.training.tokenized.tokenize`)."""
    from .tokenized import tokenize as _tokenize

    return _tokenize(recipe, overwrite=overwrite, rows=rows, status=status)


def train(recipe, kind: str = "sft", callback=None):
    """Run the training loop (see `difflm.training.loop.train`)."""
    from .loop import train as _train

    return _train(recipe, kind, callback)


def sft(recipe, callback=None):
    """`difflm sft`: supervised fine-tuning with `recipe.train.objective` (diffusion, pretrain or ar)."""
    return train(recipe, "sft", callback)


def r2ft_train(recipe, callback=None):
    """`difflm r2ft`: R2FT from an SFT checkpoint or adapter (`recipe.model`)."""
    return train(recipe, "r2ft", callback)


def __getattr__(name):
    if name == "TrainResult":
        from .loop import TrainResult

        return TrainResult
    if name in ("MergeRecipe", "merge_adapter"):
        from . import merge as _merge

        return getattr(_merge, name)
    raise AttributeError(name)
