"""`DecodeConfig`: every setting of every decoder, validated before any forward pass.

Field meanings and the paper's settings are documented in README.md ("Decoders"). Validation raises
`ConfigError` with the field name as key, so the CLI can name `decode.<field>` in its one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from difflm.config import check_field_metadata
from difflm.decoding.conv import effective_kernel_size
from difflm.decoding.methods import REGISTRY, names
from difflm.errors import ConfigError

#: Methods whose step draws from the masked-diffusion reverse process (weights for tokens and MASK).
MASS_METHODS = names(kind="mass")
#: Methods that commit a fixed (or thresholded) number of the most confident tokens per step.
CONFIDENCE_METHODS = names(kind="confidence")
#: Autoregressive reference decoding: difflm's own KV-cached sampling loop, one generator per row
#: (`difflm.decoding.loop._generate_ar`).
AR_METHODS = names(kind="ar")
#: Every method, in the registry's order (`difflm.decoding.methods`: one line per decoder).
METHODS = tuple(REGISTRY)
#: Methods that decode left-to-right blocks of `block_length`.
BLOCK_METHODS = names(blocks=True)
#: Methods that use the convolution window.
CONV_METHODS = names(conv=True)


@dataclass
class DecodeConfig:
    """Settings of one decoding run. `None` means "the method's default" (see `resolved()`).

    Each field is declared once: its metadata ("help", "choices", "min", "max") is the `difflm generate`
    option (`--field-name`; `--decode` for method) and the range `validate` checks."""

    #: the decoder (one registry line each in `difflm.decoding.methods`); the CLI help lists the choices
    method: str = field(default="conv", metadata={"help": "", "choices": list(METHODS)})
    gen_length: int = field(default=256, metadata={"help": "Tokens to generate.", "min": 1})
    steps: int = field(default=64, metadata={"help": "Denoising steps.", "min": 1})
    #: default gen_length (one block)
    block_length: int | None = field(default=None, metadata={"help": "Blocks (llada/semi_ar/threshold).", "min": 1})
    #: default block_length, else gen_length/4 (`difflm.decoding.conv.effective_kernel_size`)
    kernel_size: int | None = field(default=None, metadata={"help": "Conv window K (even: K+1).", "min": 1})
    top_k: int | None = field(default=None, metadata={"help": "Keep the k best tokens.", "min": 1})
    #: default 0.95 for nucleus, 1 (off) for dream (Dream's own default); the others take only 1 (refused, not ignored)
    top_p: float | None = field(
        default=None, metadata={"help": "Nucleus p (nucleus: 0.95; dream: off).", "min": 0.0, "max": 1.0}
    )
    #: default 1 for the mass methods, 0 for the confidence ones (`effective_temperature`)
    temperature: float | None = field(default=None, metadata={"help": "0 = argmax token.", "min": 0.0})
    remasking: str = field(
        default="low_confidence", metadata={"help": "(llada).", "choices": ["low_confidence", "random"]}
    )
    cfg_scale: float = field(default=0.0, metadata={"help": "Classifier-free guidance w.", "min": 0.0})
    conv_mult: float = field(default=1.0, metadata={"help": "s = tanh(conv_mult * u).", "min": 0.0})
    eos_fill: bool = field(default=False, metadata={"help": "EOS right of the first EOS."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "1 = off.", "min": 1.0})
    alpha_on: float = field(default=0.9, metadata={"help": "ReMDM loop.", "min": 0.0})
    t_on: float = field(default=0.55, metadata={"help": "ReMDM loop start.", "min": 0.0, "max": 1.0})
    t_off: float = field(default=0.05, metadata={"help": "ReMDM loop end (< t_on).", "min": 0.0, "max": 1.0})
    eta: float = field(default=0.02, metadata={"help": "ReMDM remasking probability.", "min": 0.0, "max": 1.0})
    #: 0 < tau <= 1, for threshold (default 0.9) and llada_conv (checked in `validate`: the bound is open)
    threshold: float | None = field(default=None, metadata={"help": "Confidence threshold."})
    #: Fast-dLLM's approximate KV cache (`difflm.decoding.cache`)
    cache: str | None = field(
        default=None, metadata={"help": "KV cache (block methods).", "choices": [None, "prefix", "dual"]}
    )
    #: default: once per block
    cache_refresh: int | None = field(
        default=None, metadata={"help": "Steps between cache refreshes in a block.", "min": 1}
    )
    seed: int = field(default=0, metadata={"help": "Base seed; per item: (seed, id)."})
    #: Dream's samplers (`difflm.decoding.dream`): the confidence rule, its selection temperature, the time floor
    alg: str = field(
        default="entropy",
        metadata={"help": "(dream).", "choices": ["origin", "maskgit_plus", "topk_margin", "entropy"]},
    )
    alg_temp: float = field(default=0.0, metadata={"help": "Dream: 0 = top-confidence commits.", "min": 0.0})
    eps: float = field(default=1e-3, metadata={"help": "Dream: time grid linspace(1, eps, S+1).", "min": 0.0})
    #: off: difflm's SUBS rule (MASK out of the softmax); on: Dream's own code exactly (`difflm.decoding.dream`)
    mask_in_softmax: bool = field(default=False, metadata={"help": "Dream: keep MASK in the softmax as Dream's code."})
    #: LLaDA-1.5's `confidence_eos_eot_inf`: these ids are never ranked above another proposal
    suppress_tokens: list[int] | None = field(
        default=None, metadata={"help": "Ids committed last by confidence decoders (e.g. EOS, EOT).", "min": 0}
    )
    #: the canvas length L including the prompt (the paper's main setting); None: prompt + gen_length
    total_length: int | None = field(
        default=None, metadata={"help": "Canvas incl. prompt (answer = L - prompt; overrides gen_length).", "min": 2}
    )
    #: x_T = [EOS] + prompt + masks, as the paper's code builds it (README.md, "Total length")
    leading_eos: bool = field(default=False, metadata={"help": "EOS before the prompt (the paper's x_T)."})
    #: reuse the last logits when the canvas did not change since the last forward (exact; README.md)
    forward_reuse: bool = field(default=True, metadata={"help": "Skip the forward when nothing changed (exact)."})

    # ----------------------------------------------------------------------------------------------
    def validate(self, prompt_length: int | None = None, max_length: int | None = None) -> None:
        """Raise `ConfigError` (key = field name) for any invalid combination: the ranges and choices of the
        field metadata (the same check `difflm.config.check` runs), then the rules across fields."""
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:  # also refuses NaN
            raise ConfigError(
                f"must be in (0, 1] (a token probability: commit tokens at least this confident), got {self.threshold}",
                key="threshold",
            )
        check_field_metadata(self)
        m = self.method
        block = self.block_length or self.gen_length
        total = self.total_length is not None  # the answer length is then each prompt's own (checked per prompt)
        if m in BLOCK_METHODS and not total:
            if self.gen_length % block:
                raise ConfigError(
                    f"gen_length {self.gen_length} is not a multiple of block_length {block}", key="block_length"
                )
            n_blocks = self.gen_length // block
            if m != "threshold" and self.steps % n_blocks:
                raise ConfigError(
                    f"steps {self.steps} is not divisible by the number of blocks {n_blocks} "
                    f"(gen_length {self.gen_length} / block_length {block})",
                    key="steps",
                )
        if m in ("llada", "llada_conv") and self.steps > self.gen_length and not total:
            raise ConfigError(
                f"steps {self.steps} > gen_length {self.gen_length}: {m} commits at least one token per step",
                key="steps",
            )
        if m == "semi_ar" and self.steps < self.gen_length // block and not total:
            raise ConfigError("semi_ar needs at least one step per block", key="steps")
        if REGISTRY[m].remdm:
            if not self.t_off < self.t_on:
                raise ConfigError(
                    f"t_off {self.t_off} must be < t_on {self.t_on} (else the ReMDM loop never runs)", key="t_off"
                )
            if not 0.0 < self.alpha_on < 1.0:
                raise ConfigError(f"alpha_on must be in (0, 1), got {self.alpha_on}", key="alpha_on")
        if m in AR_METHODS:  # the AR loop has no penalty and no guidance: refuse rather than ignore them
            if self.repetition_penalty != 1.0:
                raise ConfigError(
                    f"repetition_penalty applies to the diffusion methods, not {m} (allowed for {m}: 1, off), "
                    f"got {self.repetition_penalty}",
                    key="repetition_penalty",
                )
            if self.cfg_scale != 0.0:
                raise ConfigError(
                    f"cfg_scale applies to the diffusion methods, not {m} (allowed for {m}: 0, off), got {self.cfg_scale}",
                    key="cfg_scale",
                )
        if not 0.0 < self.eps < 1.0:  # also refuses NaN
            raise ConfigError(f"must be in (0, 1) (the last time of Dream's grid), got {self.eps}", key="eps")
        if self.mask_in_softmax and m != "dream":
            raise ConfigError(f"mask_in_softmax applies to method dream, not {m}", key="mask_in_softmax")
        if self.suppress_tokens and m not in CONFIDENCE_METHODS:
            raise ConfigError(
                f"suppress_tokens applies to the confidence decoders {', '.join(CONFIDENCE_METHODS)}, not {m}",
                key="suppress_tokens",
            )
        if self.top_p is not None and self.top_p != 1.0 and not REGISTRY[m].top_p:
            raise ConfigError(
                f"applies to {', '.join(names(top_p=True))} only; {m} draws from every token, so it takes "
                f"1 or unset, got {self.top_p}",
                key="top_p",
            )
        if self.threshold is not None and m not in ("threshold", "llada_conv"):
            raise ConfigError(f"threshold applies to methods threshold and llada_conv, not {m}", key="threshold")
        if self.cache is not None:
            if m not in BLOCK_METHODS:
                raise ConfigError(f"cache works with the block methods {', '.join(BLOCK_METHODS)}, not {m}", key="cache")
            if self.cfg_scale > 0:
                raise ConfigError("cache cannot be combined with cfg_scale > 0", key="cache")
        if total:
            if max_length is not None and self.total_length > max_length:
                raise ConfigError(
                    f"total_length {self.total_length} exceeds the model's context of {max_length} tokens",
                    key="total_length",
                )
            if prompt_length is not None and prompt_length >= self.total_length:
                raise ConfigError(
                    f"a prompt of {prompt_length} tokens leaves no room in total_length {self.total_length} "
                    f"(the canvas includes the prompt{' and the leading EOS' if self.leading_eos else ''}; "
                    "allowed: a total_length above the longest prompt)",
                    key="total_length",
                )
        elif prompt_length is not None and max_length is not None and prompt_length + self.gen_length > max_length:
            raise ConfigError(
                f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}) exceeds the model's context "
                f"of {max_length} tokens",
                key="gen_length",
            )

    # ----------------------------------------------------------------------------------------------
    def effective_temperature(self) -> float:
        if self.temperature is not None:
            return float(self.temperature)
        return 0.0 if self.method in CONFIDENCE_METHODS else 1.0

    def effective_top_p(self) -> float:
        """top_p, or the method's default: 0.95 for nucleus, 1 (off) otherwise (dream: as Dream's own)."""
        if self.top_p is not None:
            return float(self.top_p)
        return 0.95 if self.method in AR_METHODS else 1.0

    def answer_blocks(self, answer_length: int) -> int:
        """The blocks of an answer of `answer_length` positions (block methods): blocks of `block_length` from
        the answer's start, the last one shorter when the length is not a multiple (only with `total_length`)."""
        block = self.block_length or answer_length
        return -(-answer_length // block)

    def effective_block_length(self) -> int:
        return self.block_length or self.gen_length

    def effective_kernel_size(self) -> int:
        """K of the conv window (`difflm.decoding.conv.effective_kernel_size`)."""
        return effective_kernel_size(self.kernel_size, self.block_length, self.gen_length)

    def effective_threshold(self) -> float | None:
        if self.method == "threshold":
            return 0.9 if self.threshold is None else float(self.threshold)
        return None if self.threshold is None else float(self.threshold)


def check_method_family(method: str, family: str | None, name: str | None = None) -> None:
    """Raise ConfigError (one line) when the decoder cannot apply to the model family: an autoregressive
    model ("ar") decodes only with the AR methods (nucleus), a diffusion model only with the others.
    `family` None (unknown) passes."""
    if family is None or method not in METHODS:
        return
    what = name or "the model"
    if family == "ar" and method not in AR_METHODS:
        raise ConfigError(
            f"{what} is an autoregressive model (family ar): decode it with {' or '.join(AR_METHODS)}, "
            f"not {method} (a diffusion decoder)",
            key="decode.method",
        )
    if family != "ar" and method in AR_METHODS:
        raise ConfigError(
            f"{method} is autoregressive decoding (for AR models, family ar); {what} is a {family} diffusion model: "
            "use a diffusion decoder (conv, llada, topk, ...)",
            key="decode.method",
        )
