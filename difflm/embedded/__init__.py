"""The trained tiny models that ship inside the package (built by `make tiny-models`, see README.md here).

`load_model("tiny-shakespeare")`, `"tiny-math"` and `"tiny-math-r2ft"` resolve to the folders next to
this file (`difflm.models.named.EMBEDDED_MODELS`); a local folder of the same name wins.

`heldout_loss` is the fixed-noise masked-diffusion loss the tests and the model cards use to compare a
trained model with its untrained version (and fp32 with fp16 weights).
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
NAMES = ("tiny-shakespeare", "tiny-math", "tiny-math-r2ft")

# A few lines of Julius Caesar (held out of tiny-shakespeare's training data; public domain text).
JULIUS_CAESAR_LINES = [
    "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n"
    "The evil that men do lives after them;\nThe good is oft interred with their bones;\nSo let it be with Caesar.",
    "Cowards die many times before their deaths;\nThe valiant never taste of death but once.\n"
    "Of all the wonders that I yet have heard,\nIt seems to me most strange that men should fear;",
    "The fault, dear Brutus, is not in our stars,\nBut in ourselves, that we are underlings.",
    "There is a tide in the affairs of men,\nWhich, taken at the flood, leads on to fortune;\n"
    "Omitted, all the voyage of their life\nIs bound in shallows and in miseries.",
]


def heldout_loss(model, rows: list[tuple[list[int], int]], ts=(0.15, 0.5, 0.85), seed: int = 0) -> float:
    """Mean -log p(x0_i | x_t) over masked positions, for each row (ids, prompt_len) and each mask
    ratio t in `ts`; positions before prompt_len are never masked. Fixed noise (seeded); log-probabilities as
    in training (`difflm.subs`: float32, the MASK logit at -inf)."""
    import torch

    from difflm.subs import log_probs

    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    mask_id = model.ids.mask_id
    with torch.no_grad():
        for ids, prompt_len in rows:
            x0 = torch.tensor(ids, dtype=torch.long)
            for t in ts:
                m = torch.rand(len(ids), generator=gen) < t
                m[:prompt_len] = False
                if not m.any():
                    m[prompt_len] = True
                xt = torch.where(m, torch.full_like(x0, mask_id), x0)
                logits = model(xt[None].to(model.device))[0]
                logp = log_probs(logits, mask_id)[m.to(logits.device)]
                total += -logp.gather(1, x0[m].to(logits.device)[:, None]).sum().item()
                count += int(m.sum())
    return total / max(count, 1)


def text_rows(tokenizer, texts: list[str]) -> list[tuple[list[int], int]]:
    return [(tokenizer(t, add_special_tokens=False)["input_ids"], 0) for t in texts]


def math_rows(tokenizer, problems: list[dict], eos_id: int) -> list[tuple[list[int], int]]:
    """(question + answer + EOS, question length): the raw prompt format tiny-math is trained with."""
    rows = []
    for p in problems:
        q = tokenizer(p["instruction"], add_special_tokens=False)["input_ids"]
        a = tokenizer(p["output"], add_special_tokens=False)["input_ids"]
        rows.append((q + a + [eos_id], len(q)))
    return rows
