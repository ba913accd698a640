"""The length-controlled win rate on any set (difflm.eval.lc) against independent float64 computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("alpaca_eval", reason="the eval extra (alpaca-eval) is not installed")

from difflm.eval.lc import MIN_LC_PAIRS, group_winrates, lc_without_difficulty, length_controlled, sandwich_se  # noqa: E402


def annotations(ref_lens, model_lens, prefs) -> pd.DataFrame:
    """alpaca_eval-shaped annotations: output_1 the reference, output_2 the model, preference in [1, 2]."""
    return pd.DataFrame({
        "instruction": [f"q{i}" for i in range(len(prefs))],
        "output_1": ["r" * n for n in ref_lens], "output_2": ["m" * n for n in model_lens],
        "preference": [float(p) for p in prefs], "generator_1": "ref", "generator_2": "mine", "annotator": "a",
    })


def newton_logistic(X, y, iters=100):
    """Unpenalized logistic regression on soft targets y in [0, 1] (float64 Newton): the GLM's MLE."""
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        H = (X * (p * (1 - p))[:, None]).T @ X
        w = w + np.linalg.solve(H, X.T @ (y - p))
    return w


def test_sandwich_se_of_an_intercept_only_fit_is_the_closed_form():
    """One column of ones: b = logit(mean y), and SE(logistic(b)) = sqrt(sum (y - y_bar)^2) / n exactly."""
    y = np.array([0.9, 0.1, 0.9, 0.9, 0.5, 0.2, 1.0, 0.0])
    X = np.ones((len(y), 1))
    b = math.log(y.mean() / (1 - y.mean()))
    assert sandwich_se(X, y, [b], [1.0]) == pytest.approx(100 * np.sqrt(((y - y.mean()) ** 2).sum()) / len(y), rel=1e-10)


def test_lc_matches_an_independent_unpenalized_fit():
    """The GLM tanh(z) + 1 on soft preferences: the intercept's logistic from a float64 Newton fit of the same
    design. alpaca_eval's fit is L1-penalized with C chosen by 5-fold CV from 1e-4..1e4; with a clear signal the CV
    picks a large C, so the two agree to well under a point (tolerance 0.5)."""
    rng = np.random.default_rng(0)
    n = 40
    ref = rng.integers(50, 400, n)
    model = rng.integers(50, 400, n)
    d = (ref - model).astype(float)
    z = d / d.std(ddof=1)
    p_true = 1 / (1 + np.exp(-(-1.5 * np.tanh(z) + 0.6)))  # shorter reference -> the model wins more
    prefs = 1 + np.clip(p_true + rng.normal(0, 0.05, n), 0.01, 0.99)
    got = lc_without_difficulty(annotations(ref, model, prefs))
    X = np.column_stack([np.tanh(z), np.ones(n)])
    w = newton_logistic(X, prefs - 1)
    assert got["length_controlled_winrate"] == pytest.approx(100 / (1 + math.exp(-w[1])), abs=0.5)
    assert got["lc_standard_error"] == pytest.approx(sandwich_se(X, prefs - 1, w, [0.0, 1.0]), rel=0.1)
    assert got["lc_method"] == "length_controlled_minimal" and got["lc_note"] is None


def test_lc_equals_win_rate_when_length_says_nothing():
    """Preferences that do not depend on length: pairs 2k and 2k+1 get the same preference, one with a longer and
    one with an equally shorter model output, so the MLE's length term is exactly 0 and its intercept is
    logit(mean preference): LC is the win rate, up to alpaca_eval's L1 penalty, which can only pull the
    intercept towards 0, i.e. LC towards 50% (measured here: 1.5 points at n = 24; bound 3)."""
    rng = np.random.default_rng(2)
    n = 24
    ref = [200] * n
    model = [200 + (1 if i % 2 == 0 else -1) * (30 + 20 * (i // 2 % 4)) for i in range(n)]
    prefs = np.repeat(rng.uniform(1.5, 1.9, n // 2), 2)  # the same on the longer and the shorter output
    got = lc_without_difficulty(annotations(ref, model, prefs))
    wr = 100 * (prefs - 1).mean()
    assert 50 < got["length_controlled_winrate"] <= wr + 1e-6 and wr - got["length_controlled_winrate"] < 3


def test_lc_is_not_computed_with_a_reason():
    few = annotations([10] * 5, [20] * 5, [2] * 5)
    r = lc_without_difficulty(few)
    assert r["length_controlled_winrate"] is None and f"at least {MIN_LC_PAIRS}" in r["lc_note"]
    same = annotations([10] * 12, [20] * 12, [1.9] * 12)  # every length difference -10: no length variation
    r = lc_without_difficulty(same)
    assert r["length_controlled_winrate"] is None and "same length difference" in r["lc_note"]


def test_full_alpaca_eval_offline_falls_back_with_a_note(monkeypatch):
    """length_controlled_v1 needs df_gamed.csv from the Hub; offline, the minimal GLM and a one-line note."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(1)
    ann = annotations(rng.integers(50, 400, 30), rng.integers(50, 400, 30), 1 + rng.uniform(0.05, 0.95, 30))
    r = length_controlled(ann, full_alpaca_eval=True)
    if r["lc_method"] == "length_controlled_v1":
        pytest.skip("df_gamed.csv is in the Hugging Face cache here")
    assert r["lc_method"] == "length_controlled_minimal" and r["length_controlled_winrate"] is not None
    assert "length_controlled_v1 unavailable" in r["lc_note"] and "\n" not in r["lc_note"]


def test_group_winrates_per_set_category_turn():
    n = 24
    ann = annotations([100] * n, [50 + 10 * i for i in range(n)], [1.9 if 50 + 10 * i > 100 else 1.1 for i in range(n)])
    labels = {f"q{i}": {"eval_set": "wiki", "category": "music" if i < 12 else "books", "turn": None}
              for i in range(n)}
    g = group_winrates(ann, labels)
    assert set(g) == {"eval_set", "category"}  # no record says its turn
    assert g["eval_set"]["wiki"]["n"] == n
    music = [0.9 if 50 + 10 * i > 100 else 0.1 for i in range(12)]
    assert g["category"]["wiki/music"]["win_rate"] == pytest.approx(100 * sum(music) / 12, abs=1e-9)
    assert g["category"]["wiki/books"]["win_rate"] == pytest.approx(90.0, abs=1e-9)
    assert g["category"]["wiki/music"]["n"] == 12 and g["category"]["wiki/music"]["lc_win_rate"] is not None
