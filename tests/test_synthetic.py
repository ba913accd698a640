"""The synthetic arithmetic set: worked solutions are right, splits are disjoint, generation is seeded."""

import re

from difflm.data.synthetic import math_problems


def test_answers_are_correct_and_in_gsm8k_format():
    for item in math_problems(300, seed=0):
        *work, last = item["output"].split("\n")
        ans = int(last.removeprefix("#### "))
        # every "a op b = c" in the worked solution is true, and the last result is the answer
        results = []
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", " ".join(work)):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, item
            results.append(c)
        assert results and results[-1] == ans


def test_splits_disjoint_and_seeded():
    train = math_problems(2000, seed=0)
    test = math_problems(200, seed=0, split="test")
    assert not {t["instruction"] for t in train} & {t["instruction"] for t in test}
    assert math_problems(50, seed=0) == train[:50]
    assert math_problems(50, seed=1) != train[:50]
    assert len({t["id"] for t in test}) == 200
