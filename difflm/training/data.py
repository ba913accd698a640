"""Deprecated name of `difflm.training.tokenized` (the `difflm tokenize` step: instruction data -> token ids on
disk, and `load_tokenized` for sft/r2ft). It was renamed so that `data` means one thing in difflm: the package
`difflm.data` (prompt formats, eval sets, synthetic problems). Import from `difflm.training.tokenized`."""

from __future__ import annotations

import warnings

from .tokenized import *  # noqa: F401,F403
from .tokenized import __all__  # noqa: F401

warnings.warn(
    "difflm.training.data is deprecated: import from difflm.training.tokenized", DeprecationWarning, stacklevel=2
)
