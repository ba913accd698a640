"""difflm: fast and fluent diffusion language models.

Convolutional decoding and R2FT (Seo et al., NeurIPS 2025, arXiv 2509.15188) on any Hugging Face
diffusion LM. The library is importable without typer or rich; the CLI lives in the `cli` package.
"""

__version__ = "0.1.0"

from difflm.errors import ConfigError, DifflmError  # noqa: E402

__all__ = ["ConfigError", "DifflmError", "DecodeConfig", "generate", "load_model", "__version__"]


def __getattr__(name):  # lazy: importing difflm must stay cheap (no torch/transformers at import)
    if name in ("DecodeConfig", "generate"):
        from difflm import decoding

        return getattr(decoding, name)
    if name == "load_model":
        from difflm.models import load_model

        return load_model
    raise AttributeError(name)
