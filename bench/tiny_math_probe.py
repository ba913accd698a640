"""Where tiny-math fails: does it use the question? Two probes on the embedded model (CPU, ~30 s).

    python bench/tiny_math_probe.py

1. The answer's unit: "Fay has 14 <unit>. ... " with the worked answer given up to the unit and the unit masked;
   the model's top guesses should follow the question's unit.
2. The arithmetic with the operands given: the gold answer up to its first "=" is appended to the prompt, the
   model writes the rest; how often is the first result (and the final answer) right?
"""
import re

import torch

from difflm.data.synthetic import math_problems
from difflm.decoding.config import DecodeConfig
from difflm.eval.gsm8k import is_correct
from difflm.generation import generate_text
from difflm.models import load_model

m = load_model("tiny-math", device="cpu")
tok = m.tokenizer
print("1. top guesses for the masked unit in 'Fay has 14 + 22 = 36 <unit>.' by the question's unit:")
for unit in ("stamps", "coins", "pens", "apples"):
    q = tok(f"Fay has 14 {unit}. Fay gets 22 more. How many {unit} does Fay have now?", add_special_tokens=False)["input_ids"]
    a = tok("Fay has 14 + 22 = 36", add_special_tokens=False)["input_ids"]
    x = torch.tensor([q + a + [m.ids.mask_id] * 8])
    with torch.no_grad():
        probs = m(x)[0, len(q) + len(a)].softmax(-1)
    top = probs.topk(4)
    print(f"   {unit:>7}: " + ", ".join(f"{tok.decode([int(i)]).strip()} {p:.3f}" for p, i in zip(top.values, top.indices)))

ps = [p for p in math_problems(300, seed=1, split="test") if "=" in p["output"]]
items = [(p, p["output"][: p["output"].index("=") + 1]) for p in ps]
cfg = DecodeConfig(method="llada", gen_length=24, steps=24, temperature=0.0)
outs = generate_text(m, [p["instruction"] + pre for p, pre in items], cfg, prompt_format="raw", batch_size=100)
final = sum(is_correct(pre + o, p["output"]) for (p, pre), o in zip(items, outs))
first = sum(re.findall(r"\d+", o)[:1] == re.findall(r"\d+", p["output"][len(pre):])[:1] for (p, pre), o in zip(items, outs))
print(f"2. operands given ({len(items)} held-out problems): first result right {first}, final answer right {final}")
