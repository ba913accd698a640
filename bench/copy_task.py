"""Can the embedded architecture learn to copy under masked diffusion in a few hundred steps? A diagnostic for
tiny-math's weak accuracy (it under-uses the prompt), run two ways on the same data and initial weights:
difflm's own `difflm tokenize` + `difflm sft`, and an independent ~25-line masked-diffusion loop written here
from the formulas (no difflm training code), so a failure of both is the model/budget, not difflm's loop.

    python bench/copy_task.py [--steps 400] [--init build/tiny/init] [--out runs/copy-task]

Needs `make tiny-models` (or its `prepare` step) for build/tiny/init. Task: "Copy: w1 w2 w3 w4." -> "w1 w2 w3 w4."
with 4 of 20 words; scored by exact copies of 100 held-out word lists, llada greedy.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

WORDS = "apples coins pens stamps cards cups boxes eggs marbles stickers Fay Hana Kai Lea Max Ivo Jun Pia Ben Ana".split()


def independent_sft(tok_dir: Path, init: Path, out: Path, steps: int, lr: float) -> None:
    from datasets import load_from_disk
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ds = load_from_disk(str(tok_dir))["train"]
    ids, plen = torch.tensor(ds["input_ids"]).long(), torch.tensor(ds["prompt_len"])
    model = LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32).train()
    mask_id = model.config.mask_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(ids), (32,))
        x0, p = ids[idx], plen[idx]
        t = (1 - 1e-3) * torch.rand(len(idx), 1) + 1e-3  # t ~ U(eps, 1); the prompt is never masked
        masked = (torch.rand(x0.shape) < t) & (torch.arange(x0.shape[1])[None] >= p[:, None])
        logits = model(input_ids=torch.where(masked, mask_id, x0)).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
        loss = ((nll * masked / t).sum(1) / (x0.shape[1] - p)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval().save_pretrained(str(out))
    for f in init.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())


def exact_copies(model_dir: Path) -> int:
    from difflm.decoding.config import DecodeConfig
    from difflm.generation import generate_text
    from difflm.models import load_model

    rng = random.Random(1)
    tests = [rng.sample(WORDS, 4) for _ in range(100)]
    m = load_model(str(model_dir), device="cpu")
    cfg = DecodeConfig(method="llada", gen_length=12, steps=12, temperature=0.0)
    outs = generate_text(m, ["Copy: " + " ".join(w) + "." for w in tests], cfg, prompt_format="raw", batch_size=100)
    return sum(o.strip() == " ".join(w) + "." for o, w in zip(outs, tests))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--init", default="build/tiny/init")
    ap.add_argument("--out", default="runs/copy-task")
    args = ap.parse_args()
    out, init = Path(args.out), Path(args.init)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "copy.jsonl", "w") as f:
        for _ in range(8000):
            w = rng.sample(WORDS, 4)
            f.write(json.dumps({"instruction": "Copy: " + " ".join(w) + ".", "output": " ".join(w) + "."}) + "\n")
    over = [f"model.name={init}", f"data.source={out / 'copy.jsonl'}", f"data.path={out / 'tok'}", "data.max_length=32",
            "data.eval_size=64", f"train.output_dir={out / 'difflm-run'}", f"train.max_steps={args.steps}",
            f"train.eval_every={args.steps}", f"train.save_every={args.steps}", "train.eval_examples=64",
            f"optim.lr={args.lr}"]
    difflm = [sys.executable, "-m", "cli.main"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for cmd in ("tokenize", "sft"):
        subprocess.run(difflm + [cmd, "--recipe", "recipes/tiny-math.yaml", "--overwrite", "--quiet", *over],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    independent_sft(out / "tok", init, out / "independent", args.steps, args.lr)
    print(f"{args.steps} steps x 32, lr {args.lr}, exact copies of 100 held-out word lists (llada greedy):")
    print(f"  difflm sft:           {exact_copies(out / 'difflm-run' / 'final')}")
    print(f"  independent loop:     {exact_copies(out / 'independent')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
