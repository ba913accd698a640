"""Text in, text out: prompts -> batches -> `difflm.decoding.generate` -> alpaca_eval records + manifest.

`run_generate(recipe)` is what `difflm generate` runs (the CLI only parses and prints): it loads the model,
reads the items, decodes them in length-sorted batches, appends finished records to a side file after
every batch (so an interrupted run resumes and skips finished ids), shards items across ranks under
`torchrun` / `accelerate launch`, and finally writes the output JSON and its manifest atomically.
`generate_text(model, prompts, cfg)` is the small Python API for notebooks.
"""

from __future__ import annotations

import datetime
import glob
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from difflm.config import load_yaml, save_resolved, to_dict
from difflm.data.evalsets import EVAL_SETS, load_eval_set, read_inputs, second_turn_item
from difflm.data.prompts import PROMPT_FORMATS, chat_messages, conversation_ids, encode_prompt
from difflm.decoding.config import DecodeConfig
from difflm.errors import ConfigError
from difflm.io import PartialResults, atomic_write_json, write_alpaca_eval_json
from difflm.model_families import FAMILY_CHOICES


@dataclass
class GenerateModelConfig:
    """The `model:` section of a generation recipe (training's is `difflm.training.TrainModelConfig`)."""

    name: str | None = field(
        default="tiny-shakespeare",
        metadata={"help": "hub name, local folder, an embedded model (tiny-shakespeare, tiny-math, tiny-math-r2ft) "
                          "or smollm2-135m-instruct (AR; optional extra)"},
    )
    family: str = field(
        default="auto", metadata={"choices": list(FAMILY_CHOICES), "help": "model family"}
    )
    dtype: str = field(
        default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"], "help": "weights dtype"}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 (default: cuda if available)"})
    adapter: str | None = field(default=None, metadata={"help": "peft LoRA adapter folder"})
    quantization: str | None = field(default=None, metadata={"choices": [None, "4bit", "8bit"]})
    trust_remote_code: bool = False
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})


@dataclass
class GenerateDataConfig:
    """The `data:` section of a generation recipe: where the prompts come from (training's `data:` section,
    the training examples, is `difflm.training.TrainDataConfig`)."""

    prompts: list[str] = field(default_factory=list, metadata={"help": "prompt texts"})
    input: str | None = field(default=None, metadata={"help": "JSON list / JSONL with an instruction field"})
    eval_set: str | None = field(default=None, metadata={"choices": [None, *EVAL_SETS]})
    data_path: str | None = field(default=None, metadata={"help": "local copy of the eval set"})
    limit: int | None = field(default=None, metadata={"min": 1})
    prompt_format: str = field(default="alpaca", metadata={"choices": list(PROMPT_FORMATS)})
    turns: int = field(
        default=1, metadata={"choices": [1, 2], "help": "mt_bench: 2 also answers the second question, after the "
                                                        "model's own first answer"}
    )

    def validate(self) -> None:
        given = [n for n, v in (("prompts", self.prompts), ("input", self.input), ("eval_set", self.eval_set)) if v]
        if len(given) > 1:
            raise ConfigError(f"give one source of prompts, got {', '.join(given)}", key="prompts")
        if self.data_path and not self.eval_set:
            raise ConfigError("data_path needs eval_set (the schema to read it with)", key="data_path")
        if self.turns != 1 and self.eval_set != "mt_bench":
            raise ConfigError(f"{self.turns} needs eval_set mt_bench (got {self.eval_set})", key="data.turns")


# the names before the split (still importable; `ModelConfig`/`DataConfig` meant another class in training)
ModelConfig = GenerateModelConfig
DataConfig = GenerateDataConfig


@dataclass
class GenerateRecipe:
    model: GenerateModelConfig = field(default_factory=GenerateModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    data: GenerateDataConfig = field(default_factory=GenerateDataConfig)
    output: str | None = field(default=None, metadata={"help": "output JSON (alpaca_eval format)"})
    overwrite: bool = False
    batch_size: int = field(default=8, metadata={"min": 1})
    generator: str | None = field(default=None, metadata={"help": "the `generator` field (default: model+method)"})


# keys that change what is generated: a resumed run must match them exactly
_RESUME_KEYS = ("model", "decode", "data")


# ------------------------------------------------------------------------------------------------
@dataclass
class Item:
    index: int
    record: dict  #: id, instruction, dataset, carried fields
    prompt_ids: list[int]


def prompt_id(i: int) -> str:
    """The item id of the i-th `--prompt` (its noise is seeded `item_seed(seed, prompt_id(i))`); `difflm serve`
    seeds the i-th choice of a request the same way, so the two agree on the same prompt and seed."""
    return f"prompt-{i}"


def load_items(data: GenerateDataConfig) -> list[dict]:
    if data.prompts:
        items = [{"id": prompt_id(i), "instruction": p, "dataset": "prompts"} for i, p in enumerate(data.prompts)]
        return items[: data.limit] if data.limit else items
    if data.input:
        return read_inputs(data.input, limit=data.limit)
    if data.eval_set:
        return load_eval_set(data.eval_set, data_path=data.data_path, limit=data.limit)
    raise ConfigError("no prompts: give --prompt, --input FILE or --eval-set NAME", key="data")


def content_length(ids: list[int], stop_ids: set[int]) -> int:
    """Generated tokens before the first EOS/EOT (the content; padding and the stop excluded)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return i
    return len(ids)


def decode_output(model, gen_ids: list[int]) -> tuple[str, int]:
    """(text cut at the first EOS/EOT by id and decoded without special tokens, content token count)."""
    stop = set(model.ids.stop_ids)
    n = content_length(gen_ids, stop)
    return model.tokenizer.decode(gen_ids[:n], skip_special_tokens=True), n


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None):
    """(ids [B, P], attention_mask [B, P]) of prompts of different lengths, left-padded with `pad_id` to the
    longest (mask 0 on the padding): the batch layout `generate` takes."""
    import torch

    plen = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (plen - len(p)) + list(p) for p in prompts], device=device)
    am = torch.tensor([[0] * (plen - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, am


def iter_batches(
    model,
    items: list[dict],
    cfg: DecodeConfig,
    *,
    prompt_format: str = "alpaca",
    batch_size: int = 8,
    generator: str = "difflm",
    step_callback: Callable[[dict], None] | None = None,
) -> Iterator[list[dict]]:
    """Decode `items` in batches sorted by prompt length; yield each batch's finished records.

    Each record is the item (id, instruction, dataset, carried fields) plus `output`, `generator`,
    `content_tokens`, `nfe` (forward passes its batch took), `filled` and `seconds` (its share of the
    batch's wall time). Noise is seeded from (cfg.seed, id): a record does not depend on its batch.
    """
    import torch

    from difflm.decoding import generate
    from difflm.seeding import item_seed

    if model.tokenizer is None:
        raise ConfigError(f"model {model.name} has no tokenizer: pass model.tokenizer=DIR", key="model.tokenizer")
    encoded = []
    for i, it in enumerate(items):
        if it.get("messages"):  # a later turn: the conversation so far (mt_bench's second turn)
            ids = conversation_ids(model, it["messages"], prompt_format)
        elif prompt_format == "chat":  # one rule with serve and chat: the template, alpaca where the model has none
            ids = conversation_ids(model, chat_messages(it["instruction"], it.get("input")), "chat")
        else:
            ids = encode_prompt(model, it["instruction"], it.get("input"), prompt_format)
        if not ids:
            raise ConfigError(f"item {it['id']}: the prompt is empty", key="data")
        encoded.append(Item(i, it, ids))
    encoded.sort(key=lambda e: (len(e.prompt_ids), e.index))
    if cfg.total_length is not None:  # every prompt leaves room in the canvas: checked before any decoding
        from difflm.decoding.loop import check_total_length

        lengths = sorted({len(e.prompt_ids) + int(cfg.leading_eos) for e in encoded})
        check_total_length(cfg, lengths, getattr(model, "max_length", None))
    pad = model.ids.pad_or_eos
    for batch in _batches(encoded, batch_size, same_length=cfg.total_length is not None):
        ids, am = left_pad([e.prompt_ids for e in batch], pad, model.device)
        seeds = [item_seed(cfg.seed, str(e.record["id"])) for e in batch]
        t0 = time.perf_counter()
        out = generate(model, ids, cfg, attention_mask=am, row_seeds=seeds, callback=step_callback)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - t0
        records = []
        events = out.unmask_events.tolist() if out.unmask_events is not None else [None] * len(batch)
        for row, e in enumerate(batch):
            text, n = decode_output(model, out.sequences[row, out.prompt_length :].tolist())
            rec = dict(e.record)
            rec.setdefault("dataset", "custom")
            rec.update(
                output=text,
                generator=generator,
                content_tokens=n,
                nfe=out.nfe,
                filled=int(out.filled[row]),
                seconds=seconds / len(batch),
                **sample_rate(events[row], cfg, out.nfe),
                forward_steps=out.forward_steps,
                reused_steps=out.reused_steps,
            )
            records.append(rec)
        yield records


def _batches(encoded: list[Item], batch_size: int, same_length: bool) -> Iterator[list[Item]]:
    """Consecutive batches of the length-sorted items; with `total_length` (same_length) a batch also ends where the
    prompt length changes: each row's answer is total_length - its prompt, and `generate` decodes rows of different
    prompt lengths as separate batches anyway (`difflm.decoding.loop._generate_total`), so every item's nfe and
    forward steps are its own batch's."""
    batch: list[Item] = []
    for e in encoded:
        if batch and (len(batch) == batch_size or (same_length and len(e.prompt_ids) != len(batch[0].prompt_ids))):
            yield batch
            batch = []
        batch.append(e)
    if batch:
        yield batch


def sample_rate(events: int | None, cfg: DecodeConfig, nfe: int) -> dict:
    """A record's `unmask_events` (L*: every MASK -> token change, re-unmasks after remasking included) and the
    effective sample rate r* = L*/S of the paper's Table 10, with S = the steps (`effective_sample_rate`; for the
    autoregressive methods a step is a forward pass) and with S = the forward passes (`effective_sample_rate_nfe`)."""
    if events is None:
        return {}
    from difflm.decoding.config import AR_METHODS

    steps = nfe if cfg.method in AR_METHODS else cfg.steps
    return {
        "unmask_events": int(events),
        "effective_sample_rate": events / steps if steps else None,
        "effective_sample_rate_nfe": events / nfe if nfe else None,
    }


def generate_text(model, prompts: list[str], cfg: DecodeConfig, prompt_format: str = "raw", batch_size: int = 8) -> list[str]:
    """The small Python API: a list of prompt texts -> a list of output texts (same order)."""
    items = [{"id": str(i), "instruction": p} for i, p in enumerate(prompts)]
    done: dict[str, str] = {}
    for recs in iter_batches(model, items, cfg, prompt_format=prompt_format, batch_size=batch_size):
        done.update({r["id"]: r["output"] for r in recs})
    return [done[str(i)] for i in range(len(prompts))]


# ------------------------------------------------------------------------------------------------
# the whole `difflm generate` run: files, resume, ranks, manifest
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Rank info from torchrun / accelerate's environment; initialises torch.distributed when world > 1
    (gloo on CPU, nccl on CUDA). One process without a launcher is world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
    return Dist(rank, world, local)


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def output_paths(output: str) -> dict[str, Path]:
    out = Path(output)
    return {
        "output": out,
        "manifest": out.with_name(out.name + ".manifest.json"),
        "config": out.with_name(out.name + ".config.yaml"),
    }


def _partial_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.partial.jsonl")


def _all_partials(output: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(glob.escape(str(output)) + ".rank*.partial.jsonl"))


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def manifest(recipe: GenerateRecipe, model, records: list[dict], started: str) -> dict:
    import torch
    import transformers

    import difflm

    content = sum(r.get("content_tokens", 0) for r in records)
    nfe = sum(r.get("nfe", 0) for r in records)
    counted = [r for r in records if r.get("unmask_events") is not None]  # records of older versions have none
    seconds = sum(r.get("seconds", 0.0) for r in records)
    return {
        "model": recipe.model.name,
        "family": model.family,
        "adapter": recipe.model.adapter,
        "quantization": recipe.model.quantization,
        "dtype": str(model.dtype).replace("torch.", ""),
        "decode": to_dict(recipe.decode),
        "seed": recipe.decode.seed,
        "prompt_format": recipe.data.prompt_format,
        "data": to_dict(recipe.data),
        "items": len(records),
        "device": _device_name(model.device),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "batch_size": recipe.batch_size,
        "nfe_per_item_mean": nfe / max(1, len(records)),
        "content_tokens": content,
        "content_tokens_per_nfe": content / max(1, nfe),
        "filled_positions": sum(r.get("filled", 0) for r in records),
        # r* = L*/S (Table 10): L* = MASK -> token changes per item (remasked positions count again when re-unmasked)
        "unmask_events_mean": _mean([r["unmask_events"] for r in counted]),
        "effective_sample_rate": _mean([r["effective_sample_rate"] for r in counted]),  # S = steps
        "effective_sample_rate_nfe": (  # S = forward passes
            sum(r["unmask_events"] for r in counted) / max(1, sum(r.get("nfe", 0) for r in counted)) if counted else None
        ),
        # S* (Table 5): forward passes actually made per item; reused: steps whose input had not changed
        "s_star": _mean([r["forward_steps"] for r in records if "forward_steps" in r]),
        "reused_steps_mean": _mean([r["reused_steps"] for r in records if "reused_steps" in r]),
        "decode_seconds": seconds,
        "tokens_per_second": content / seconds if seconds > 0 else None,
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "difflm": difflm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def prepare_output(recipe: GenerateRecipe, dist: Dist) -> set[str]:
    """Check/prepare the output files; return the ids already finished by an interrupted run."""
    paths = output_paths(recipe.output)
    out = paths["output"]
    if dist.main:
        if out.exists() and not recipe.overwrite:
            raise ConfigError(f"{out} exists; pass --overwrite to replace it", key="output")
        partials = _all_partials(out)
        if recipe.overwrite:
            for p in partials:
                PartialResults(p).remove()
            partials = []
        if partials and paths["config"].exists():
            old = load_yaml(paths["config"])
            new = to_dict(recipe)
            for key in _RESUME_KEYS:
                if old.get(key) != new.get(key):
                    diff = [k for k in new[key] if old.get(key, {}).get(k) != new[key][k]]
                    raise ConfigError(
                        f"{out} has an unfinished run with other {key} settings ({', '.join(diff)}); "
                        "rerun with the same settings to resume, or pass --overwrite",
                        key="output",
                    )
        save_resolved(recipe, paths["config"])
    _barrier(dist)
    done: set[str] = set()
    for p in _all_partials(out):
        done |= PartialResults(p).done_ids()
    return done


def check_model_decoder(recipe: GenerateRecipe) -> None:
    """Refuse a decoder that cannot apply to the model's family (a diffusion decoder on an AR model,
    nucleus on a diffusion model) before the model is loaded, where the family can be told cheaply."""
    from difflm.decoding.config import check_method_family
    from difflm.models.loading import known_family
    from difflm.models.named import DEFAULT_MODEL

    name = recipe.model.name or DEFAULT_MODEL
    check_method_family(recipe.decode.method, known_family(name, recipe.model.family), name)


def load_recipe_model(m: GenerateModelConfig, dist: Dist | None = None):
    """Load the recipe's model; under a launcher each rank takes its own GPU (cuda:LOCAL_RANK)."""
    from difflm.models import load_model

    from difflm.models.named import DEFAULT_MODEL

    name = m.name or DEFAULT_MODEL  # no model given: the embedded default
    device = m.device
    if device is None and dist is not None and dist.world > 1:
        import torch

        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    return load_model(
        name, family=m.family, dtype=m.dtype, device=device, adapter=m.adapter, quantization=m.quantization,
        trust_remote_code=m.trust_remote_code, tokenizer=m.tokenizer,
    )


def run_generate(
    recipe: GenerateRecipe,
    *,
    model=None,
    items: list[dict] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_batch: Callable[[list[dict]], None] | None = None,
    step_callback: Callable[[dict], None] | None = None,
    manifest_extra: dict | None = None,
) -> tuple[list[dict], dict | None]:
    """Run `difflm generate`. Returns (records in item order, manifest) on rank 0; ([], None) elsewhere.

    `model` (a loaded DiffusionLM) and `items` (from `load_items`) may be passed in when already loaded.
    `manifest_extra` is added to the manifest (`difflm sweep`: the point's `sweep_point`).

    on_start(total_items, already_done) and on_batch(records) report progress (rank 0 only is typical).
    """
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dist = init_distributed()
    items = load_items(recipe.data) if items is None else items
    ids = [str(it["id"]) for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("item ids are not unique", key="data")
    if dist.world > 1 and not recipe.output:
        raise ConfigError("a multi-process run needs --output (ranks merge through it)", key="output")
    if model is None:
        check_model_decoder(recipe)  # before any file is written or the model loaded
    done = prepare_output(recipe, dist) if recipe.output else set()
    if model is None:
        model = load_recipe_model(recipe.model, dist)
    generator = recipe.generator or f"{Path(str(recipe.model.name)).name}-{recipe.decode.method}"
    turns = recipe.data.turns
    if on_start:
        on_start(len(items) * turns, len(done))
    partial = PartialResults(_partial_path(Path(recipe.output), dist.rank)) if recipe.output else None
    results: list[dict] = []

    def decode(pass_items: list[dict]) -> None:
        todo = [it for it in pass_items if str(it["id"]) not in done]
        for recs in iter_batches(
            model, todo[dist.rank :: dist.world], recipe.decode, prompt_format=recipe.data.prompt_format,
            batch_size=recipe.batch_size, generator=generator, step_callback=step_callback,
        ):
            if partial is not None:
                partial.append(recs)
            results.extend(recs)
            if on_batch:
                on_batch(recs)
        _barrier(dist)  # every rank has finished its share before the records are read back

    def finished() -> dict[str, dict]:
        if not recipe.output:
            return {str(r["id"]): r for r in results}
        by_id: dict[str, dict] = {}
        for p in _all_partials(Path(recipe.output)):
            by_id.update({str(r["id"]): r for r in PartialResults(p).load()})
        return by_id

    decode(items)
    if turns == 2:  # mt_bench: the second question after the model's own first answer
        first = finished()
        seconds = [second_turn_item(first[i], first[i]["output"]) for i in ids]
        decode(seconds)
        ids = [j for i, s in zip(ids, seconds) for j in (i, str(s["id"]))]  # question by question
    records: list[dict] = []
    man = None
    if dist.main:
        by_id = finished()
        records = [by_id[i] for i in ids if i in by_id]
        if len(records) != len(ids):
            missing = [i for i in ids if i not in by_id][:5]
            raise RuntimeError(f"{len(ids) - len(records)} items have no output (e.g. {missing}); rerun to resume")
        man = manifest(recipe, model, records, started)
        man.update(manifest_extra or {})
        if recipe.output:
            paths = output_paths(recipe.output)
            write_alpaca_eval_json(paths["output"], records)
            atomic_write_json(paths["manifest"], man)
            for p in _all_partials(paths["output"]):
                PartialResults(p).remove()
    _barrier(dist)
    return records, man
