"""Every decoder, one registry line each: name -> `Method` (what kind of step, blocks, conv window, runner).

Adding a decoder: write its runner (a function of the `_Decoder` of `difflm.decoding.loop`, usually one
of the loops there over a window) and add one `Method` line to `_REGISTRY`; `DecodeConfig`'s choices,
validation and the CLI's `--decode` help follow from it. Torch-free (config.py imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    #: "mass" (draws from the masked-diffusion reverse process), "confidence" (commits the most confident
    #: tokens per step) or "ar" (autoregressive reference decoding, `_generate_ar`; no runner)
    kind: str
    #: runner(decoder): runs every step of a diffusion decoding (None for "ar")
    runner: Callable | None = None
    blocks: bool = False  #: decodes left-to-right blocks of `block_length`
    conv: bool = False  #: scales unmasking / confidence by the conv window (`difflm.decoding.conv`)
    remdm: bool = False  #: ReMDM loop schedule (alpha_on, t_on, t_off, eta)
    top_k: bool = True  #: reads `top_k` (categorical draws from every token)
    top_p: bool = False  #: reads `top_p` (nucleus filtering); the others refuse a top_p other than 1


def _whole_mass(d) -> None:
    d.run_mass(d.whole(), d.cfg.steps)


def _whole_confidence(d) -> None:
    d.run_confidence(d.whole(), d.cfg.steps)


def _block_mass(d) -> None:
    d.run_blocks(d.run_mass)


def _block_confidence(d) -> None:
    d.run_blocks(d.run_confidence)


def _dream(d) -> None:
    from difflm.decoding.dream import run_dream  # torch: imported when the method runs

    run_dream(d)


_REGISTRY = (
    Method("categorical", "mass", _whole_mass, top_k=False),
    Method("topk", "mass", _whole_mass),
    Method("conv", "mass", _whole_mass, conv=True),
    Method("semi_ar", "mass", _block_mass, blocks=True),
    Method("remdm", "mass", _whole_mass, remdm=True),
    Method("remdm_conv", "mass", _whole_mass, conv=True, remdm=True),
    Method("llada", "confidence", _block_confidence, blocks=True),
    Method("llada_conv", "confidence", _whole_confidence, conv=True),
    Method("threshold", "confidence", _block_confidence, blocks=True),
    Method("dream", "confidence", _dream, top_p=True),
    Method("nucleus", "ar", top_p=True),
)

#: name -> Method, in the order of `METHODS`
REGISTRY: dict[str, Method] = {m.name: m for m in _REGISTRY}


def names(**where) -> tuple[str, ...]:
    """Names of the methods whose attributes equal `where` (e.g. names(kind="mass"), names(conv=True))."""
    return tuple(m.name for m in _REGISTRY if all(getattr(m, k) == v for k, v in where.items()))
