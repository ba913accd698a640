"""A synthetic instruction set difflm generates itself: GSM8K-style arithmetic word problems.

Each item is `{"id", "instruction", "output"}` where the output is a short worked solution ending in
`#### N` (GSM8K's answer convention, so `difflm eval gsm8k` scores it). Templates cover one- and two-step
problems with +, -, x and exact division. Generation is seeded; the held-out split never repeats a
question of the training split. No network, no external data: tests and the embedded tiny-math model use it.
"""

from __future__ import annotations

import random

NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia", "Omar", "Pia"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles", "eggs", "cups", "boxes", "stickers"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked solution without the final line, answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return (f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?",
                f"{name} has {a} + {b} = {a + b} {item}.", a + b)
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        return (f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
                f"{a} - {b} = {a - b} {item} are left.", a - b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
                f"{a} * {b} = {a * b} {item}.", a * b)
    if kind == 3:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        a = b * q
        return (f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
                f"{a} / {b} = {q} {item} each.", q)
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        return (f"{name} has {a} boxes of {b} {item} and loses {c}. How many {item} are left?",
                f"{a} * {b} = {a * b} {item}. {a * b} - {c} = {a * b - c} left.", a * b - c)
    a, b, c = rng.randint(5, 50), rng.randint(2, 30), rng.randint(2, 30)
    return (f"{name} has {a} {item}, buys {b} more and then buys {c} more. How many {item} does {name} have?",
            f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c} {item}.", a + b + c)


def math_problems(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` problems of `split` ("train" or "test"). The two splits come from different seeds and the
    test split drops any question that the first 100k training questions contain."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = random.Random(f"difflm-math-{split}-{seed}")
    seen: set[str] = set()
    if split == "test":
        train_rng = random.Random(f"difflm-math-train-{seed}")
        seen = {_problem(train_rng)[0] for _ in range(100_000)}
    out: list[dict] = []
    while len(out) < n:
        q, sol, ans = _problem(rng)
        if q in seen:
            continue
        seen.add(q)
        out.append({"id": f"math-{split}-{len(out)}", "instruction": q, "output": f"{sol}\n#### {ans}",
                    "answer": f"{sol}\n#### {ans}", "question": q})
    return out
