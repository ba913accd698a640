"""The `difflm` model for EleutherAI's lm-evaluation-harness (lm-eval 0.4.x).

Importing this module registers the model name ``difflm`` with lm-eval, next to lm-eval's own models
(``hf``, ``vllm``, ``dummy``, ...: a baseline can run in the same process). lm-eval 0.4 has no plugin
entry point for models, so its own ``lm_eval`` command cannot see it; run lm-eval through the
``difflm-lm-eval`` console script (installed with difflm) or this module instead, with the same
arguments as ``lm_eval``::

    difflm-lm-eval --model difflm \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,dtype=bfloat16,decode=conv,steps=64,gen_length=512,kernel_size=128,top_k=1 \\
        --tasks gsm8k --batch_size 8

    # the same without the console script; offline smoke test on the tiny tasks shipped with the tests
    # (the tasks find their data next to their YAML: any working directory, given the --include_path)
    python -m difflm.eval.lm_eval_model --model difflm --model_args pretrained=DIR,steps=8,gen_length=16,mc_num=8 \\
        --include_path tests/fixtures/eval/lm_eval --tasks difflm_tiny_gen,difflm_tiny_choice --limit 3

or from Python: ``import difflm.eval.lm_eval_model`` then ``lm_eval.simple_evaluate(model="difflm",
model_args={...})``, or pass ``DifflmLM(model=<a loaded DiffusionLM>, ...)`` as the model.

model_args:
  model loading: ``pretrained`` (folder or Hub name), ``family``, ``dtype``, ``device``, ``adapter``,
  ``quantization``, ``trust_remote_code``, ``tokenizer`` (as `difflm.load_model`).
  decoding (generate_until): ``decode`` (the method; alias ``method``) and every `DecodeConfig` field
  (``steps``, ``gen_length``, ``block_length``, ``kernel_size``, ``top_k``, ``temperature``, ...).
  ``gen_length`` defaults to the task's ``max_gen_toks``. Other generation kwargs of a task
  (``do_sample``, ``temperature``) are ignored: decoding is what model_args say. Outputs are cut at the
  first EOS/EOT (by id) and then at the first of the task's ``until`` strings. Each request's noise is
  seeded from (``seed``, context); the k-th identical request of a call (a task with ``repeats: N``,
  e.g. self-consistency or pass@k, sends each request N times) from (``seed``, context, k), so with a
  sampling decode the N samples differ and are still the same on every run. lm-eval's response cache
  (``use_cache``) keeps one answer per distinct request unless the task's generation kwargs say
  ``do_sample: true`` (as the repeats tasks do): with ``use_cache``, a repeats task without it would get
  one cached sample N times.
  likelihood (loglikelihood requests): ``mc_num`` (Monte-Carlo samples, default 128 as LLaDA),
  ``mc_batch_size`` (samples per forward pass, default 32), ``check_greedy`` (default True). The
  estimator is `difflm.eval.likelihood.mc_loglikelihood` (LLaDA's bound; formula there).
  ``batch_size`` (lm-eval's option): prompts per generate_until batch.
  ``max_length``: context limit (default: the model's).

Data-parallel: under ``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N`` each process
loads the model on its own device (``cuda:LOCAL_RANK``; CPU processes use gloo) and lm-eval splits the documents
over the ranks and gathers samples and metrics on rank 0, as with its own ``hf`` model (``rank``/``world_size``,
``all_gather``, ``gather_object``, ``barrier`` below). Each request's seed depends on the request only, so the
results equal one process's (with ``batch_size=1``; larger batches group other prompts together)::

    torchrun --nproc_per_node 8 -m difflm.eval.lm_eval_model --model difflm \
        --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,dtype=bfloat16,decode=conv,steps=64,gen_length=512 \
        --tasks gsm8k --batch_size 8 --output_path runs/lm-eval

``loglikelihood_rolling`` (perplexity tasks) uses the same bound over windows of the text, each
conditioned on BOS and the preceding tokens: it is a bound, not an exact log-likelihood.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from difflm.data.prompts import encode_text, render_chat
from difflm.decoding import DecodeConfig
from difflm.errors import ConfigError

__all__ = ["DifflmLM", "main", "register"]

log = logging.getLogger(__name__)

_LOAD_KEYS = ("family", "dtype", "adapter", "quantization", "trust_remote_code", "tokenizer")
_DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)}


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default  # lm-eval's "auto" / "auto:4"


class DifflmLM(LM):
    """lm-eval's LM interface over a difflm `DiffusionLM` (see the module doc for model_args)."""

    def __init__(
        self,
        pretrained: Any = None,
        model: Any = None,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        check_greedy: bool = True,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from difflm.config import from_dict
        from difflm.models import load_model

        load_kwargs = {k: kwargs.pop(k) for k in _LOAD_KEYS if k in kwargs}
        decode = {}
        if "decode" in kwargs:
            decode["method"] = kwargs.pop("decode")
        for k in list(kwargs):
            if k in _DECODE_FIELDS:
                decode[k] = kwargs.pop(k)
        if kwargs:
            raise ConfigError(
                f"unknown difflm model_args: {', '.join(sorted(kwargs))} (see difflm.eval.lm_eval_model)",
                key="model_args",
            )
        from difflm.generation import init_distributed

        dist = init_distributed()  # torchrun / accelerate launch: one process per device, lm-eval splits the docs
        self._rank, self._world_size = dist.rank, dist.world
        self._gen_length_given = "gen_length" in decode
        self.decode_base = from_dict(DecodeConfig, decode, prefix="model_args.")
        if model is None and not isinstance(pretrained, (str, type(None))):
            model, pretrained = pretrained, None  # a loaded DiffusionLM passed as `pretrained`
        if model is None:
            if pretrained is None:
                raise ConfigError("pass pretrained=MODEL (folder or Hub name)", key="model_args.pretrained")
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("device %s requested (lm_eval's default is cuda:0) but no GPU is visible: using cpu", device)
                device = "cpu"
            if dist.world > 1 and torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
                device = f"cuda:{dist.local_rank}"  # each rank its own GPU
                torch.cuda.set_device(device)
            model = load_model(str(pretrained), device=device, **load_kwargs)
        if model.tokenizer is None:
            raise ConfigError(f"model {model.name} has no tokenizer: pass tokenizer=DIR", key="model_args.tokenizer")
        if not model.is_diffusion:
            raise ConfigError("the difflm lm-eval model needs a diffusion LM (use lm-eval's hf model for AR models)",
                              key="model_args.pretrained")
        self.model = model
        self.tokenizer = model.tokenizer
        self.mc_num = int(mc_num)
        self.mc_batch_size = int(mc_batch_size)
        self.check_greedy = bool(check_greedy)
        self.batch_size = max(1, _int_or(batch_size, 1))
        self._max_length = int(max_length) if max_length else model.max_length
        self._device = model.device

    # -- lm-eval plumbing --------------------------------------------------------------------------
    # rank / world_size (lm.api.model.LM's properties over _rank/_world_size) and these three are what
    # lm-eval's evaluator calls in a multi-process run (as its hf model does it through accelerate)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        import torch.distributed as tdist

        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as tdist

        out = [None] * self.world_size if self.rank == dst else None
        tdist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.model.name)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # lm-eval wants the prompt as text and hands it back to generate_until: the same rendering and
        # encoding as `difflm.data.prompts.encode_prompt` (prompt format "chat")
        return render_chat(self.tokenizer, chat_history, add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def _seed(self, *parts: str) -> torch.Generator:
        from difflm.seeding import item_generator

        return item_generator(self.decode_base.seed, *parts)

    # -- generate_until ----------------------------------------------------------------------------
    def _decode_config(self, gen_kwargs: dict) -> DecodeConfig:
        cfg = dataclasses.replace(self.decode_base)
        if not self._gen_length_given and gen_kwargs.get("max_gen_toks"):
            cfg.gen_length = int(gen_kwargs["max_gen_toks"])
        return cfg

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from difflm.decoding import generate
        from difflm.generation import decode_output, left_pad
        from difflm.seeding import item_seed

        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        prepared = []
        seen: dict[str, int] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            # lm-eval hands a task with `repeats: N` (self-consistency, pass@k) the same request N times:
            # the k-th identical request gets its own seed (k = 0 keeps the plain context seed), so the N
            # samples differ, yet stay the same across runs and batch orders (identical requests are
            # interchangeable, so which of them gets which k does not matter).
            args_key = json.dumps([context, gen_kwargs], sort_keys=True, default=str)
            repeat = seen.get(args_key, 0)
            seen[args_key] = repeat + 1
            seed_key = context if repeat == 0 else f"{context}\x1frepeat:{repeat}"
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = self._decode_config(gen_kwargs)
            ids = self._encode(context)
            if self._max_length:
                keep = max(1, self._max_length - cfg.gen_length)
                ids = ids[-keep:]
            if not ids:
                ids = [self.model.ids.bos_id if self.model.ids.bos_id is not None else self.model.ids.eos_id]
            prepared.append((context, gen_kwargs, until, ids, seed_key))
            groups.setdefault(tuple(sorted(dataclasses.asdict(cfg).items())), []).append(i)
        pad = self.model.ids.pad_or_eos
        for key, idxs in groups.items():
            cfg = DecodeConfig(**dict(key))
            idxs = sorted(idxs, key=lambda j: (len(prepared[j][3]), j))
            for start in range(0, len(idxs), self.batch_size):
                batch = idxs[start : start + self.batch_size]
                x, am = left_pad([prepared[j][3] for j in batch], pad, self.model.device)
                seeds = [item_seed(cfg.seed, prepared[j][4]) for j in batch]
                out = generate(self.model, x, cfg, attention_mask=am, row_seeds=seeds)
                for row, j in enumerate(batch):
                    text, _ = decode_output(self.model, out.sequences[row, out.prompt_length :].tolist())
                    for stop in prepared[j][2]:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[j] = text
                    self.cache_hook.add_partial("generate_until", (prepared[j][0], prepared[j][1]), text)
        return [r if r is not None else "" for r in results]

    # -- loglikelihood -----------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation; the
        continuation's tokens are those of context+continuation after the context's tokens."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else self._encode(continuation)
        return ctx, cont

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        if not ctx and self.model.ids.bos_id is not None:
            ctx = [self.model.ids.bos_id]
        if self._max_length and len(ctx) + len(cont) > self._max_length:
            cont = cont[-self._max_length :]
            ctx = ctx[-max(0, self._max_length - len(cont)) :] if self._max_length > len(cont) else []
        return ctx, cont

    def _score(self, ctx: list[int], cont: list[int], key: tuple[str, ...]) -> tuple[float, bool]:
        from difflm.eval.likelihood import mc_loglikelihood

        ctx, cont = self._fit(ctx, cont)
        return mc_loglikelihood(
            self.model, ctx, cont, mc_num=self.mc_num, batch_size=self.mc_batch_size,
            generator=self._seed(*key), check_greedy=self.check_greedy,
        )

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            ll, greedy = self._score(ctx, cont, (context, continuation))
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        out = []
        window = max(1, (self._max_length or 1024) - 1)
        for req in requests:
            (text,) = req.args[:1]
            ids = self._encode(text)
            total = 0.0
            for start in range(0, len(ids), window):
                chunk = ids[start : start + window]
                ctx = ids[max(0, start - (window - len(chunk))) : start]
                ll, _ = self._score(ctx, chunk, (text, str(start)))
                total += ll
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out


def register() -> None:
    """Register the name ``difflm`` with lm-eval's model registry (idempotent; runs on import).

    A lazy "module:Class" placeholder, so that ``python -m difflm.eval.lm_eval_model`` (where this file
    runs as ``__main__``) and a normal import resolve to the same class.

    lm-eval fills its registry with its own models (``hf``, ``vllm``, ``dummy``, ... as lazy placeholders)
    only when `get_model` finds the registry empty; registering ``difflm`` first would leave it non-empty
    and hide them all. So ``lm_eval.models`` (cheap: it imports no model code) registers them first."""
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models)

    if "difflm" not in model_registry:
        model_registry.register("difflm", target="difflm.eval.lm_eval_model:DifflmLM")


register()


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the difflm model registered (same arguments as the ``lm_eval`` command)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():  # a data-parallel run: every rank leaves together
        tdist.barrier()
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
