"""Length-controlled (LC) win rates on any set, offline, and win rates per set / category / turn.

alpaca_eval's LC win rate (AlpacaEval 2.0, Dubois et al. 2024) fits a logistic GLM to the judge's soft
preferences and predicts the preference with the length difference set to zero. Its default,
``length_controlled_v1``, has three terms: ``tanh(std_delta_len)``, the per-instruction
``instruction_difficulty`` (a number per AlpacaEval instruction, from ``df_gamed.csv`` on the Hub) and a
model term, regularized towards the annotations of two "gamed" baselines (also in ``df_gamed.csv``). So it
exists only for AlpacaEval's own 805 instructions, and needs the Hub.

On any other set (MT-Bench, the paper's Wiki, Arena-Hard-Auto, a subset), difflm fits alpaca_eval's own
``length_controlled_minimal`` GLM: ``tanh(std_delta_len) + model``, no difficulty, no regularization
(alpaca_eval's formula from ``GLM_INFO``, its ``make_dmatrix_for_model`` and its
``fit_LogisticRegressionCV``: L1, 5-fold grouped CV over C, soft targets). alpaca_eval's own
``get_length_controlled_winrate`` cannot run it offline: it downloads ``df_gamed.csv`` to read the
difficulty column even when the formula does not use it, so difflm builds the same design matrix itself:

    y_i      = preference_i - 1 in [0, 1] (draws 0.5), the judge's probability that the model's output wins
    d_i      = len(reference output_i) - len(model output_i), in characters (alpaca_eval's convention)
    z_i      = d_i / std(d)                                         (sample std over the judged pairs)
    P(win_i) = logistic(a * tanh(z_i) + b)
    LC       = 100 * logistic(b)        (the predicted win rate at zero length difference)

Standard error of LC: alpaca_eval reports the SEM of the per-instruction predictions, which is 0 when no
difficulty term makes them differ. difflm reports the delta-method standard error of logistic(b) with the
GLM's robust (sandwich) covariance, right for soft targets:

    H = sum_i p_i (1 - p_i) x_i x_i^T,   G = sum_i (y_i - p_i)^2 x_i x_i^T,   Cov = H^-1 G H^-1
    SE(LC) = 100 * q (1 - q) * sqrt(x0^T Cov x0),   x0 = (tanh(0), 1) = (0, 1),  q = logistic(b)

(for an intercept-only fit this is sqrt(sum_i (y_i - y_bar)^2) / n, the plain win rate's standard error up
to ddof). It ignores the L1 penalty, so it is approximate where the CV picks a small C.

alpaca_eval's L1 penalty (C chosen by CV) pulls the coefficients towards 0, so on small sets LC leans towards
50%: with preferences that do not depend on length at all, n = 24 pairs and a 65.6% win rate, LC is 64.1%
(tests/test_eval_lc.py). The pairs are sorted by instruction before the fit (the CV folds follow the order),
so the same annotations give the same LC whatever order they were judged in.

On the full 805-instruction AlpacaEval set, ``length_controlled_v1`` is used when ``df_gamed.csv`` can be had
(the Hub or its cache); otherwise the minimal GLM, and ``lc_note`` says so. An LC that cannot be fitted (fewer
than `MIN_LC_PAIRS` judged pairs, every pair with the same length difference, a failed fit) is None with the
reason in one line in ``lc_note``.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from difflm.errors import error_summary

__all__ = ["LC_GLM", "MIN_LC_PAIRS", "group_winrates", "lc_without_difficulty", "length_controlled", "sandwich_se"]

LC_GLM = "length_controlled_minimal"
#: fewest judged pairs an LC is fitted on (the GLM's 5-fold CV needs 5; 10 is MT-Bench's category size)
MIN_LC_PAIRS = 10


def _no_lc(note: str) -> dict[str, Any]:
    return {"length_controlled_winrate": None, "lc_standard_error": None, "lc_method": None, "lc_note": note}


def sandwich_se(X, y, w, x0) -> float:
    """Delta-method standard error (in %) of logistic(x0 . w) for a logistic GLM with coefficients `w` fitted to
    soft targets `y` on the design `X`, with the robust (sandwich) covariance H^-1 G H^-1 (module doc)."""
    import numpy as np

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    x0 = np.asarray(x0, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-(X @ w)))
    H = (X * (p * (1 - p))[:, None]).T @ X
    G = (X * ((y - p) ** 2)[:, None]).T @ X
    Hinv = np.linalg.pinv(H)
    var = float(x0 @ Hinv @ G @ Hinv @ x0)
    q = 1.0 / (1.0 + np.exp(-float(x0 @ w)))
    return 100.0 * q * (1 - q) * max(var, 0.0) ** 0.5


def lc_without_difficulty(annotations) -> dict[str, Any]:
    """LC win rate (%) and its standard error from alpaca_eval's ``length_controlled_minimal`` GLM, offline
    (module doc). `annotations`: alpaca_eval's annotations (output_1 = reference, output_2 = model,
    preference in [1, 2], 0 or 1.5 for draws)."""
    import numpy as np
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    info = GLM_INFO[LC_GLM]
    # one order whatever order the pairs were judged in (the CV folds follow it): a rerun gives the same LC
    keys = [c for c in ("instruction", "output_1", "output_2") if c in annotations.columns]
    df = annotations.sort_values(keys, kind="stable").reset_index(drop=True) if keys else annotations.reset_index(drop=True)
    pref = pd.to_numeric(df["preference"], errors="coerce")
    ok = pref.notna()
    n = int(ok.sum())
    if n < MIN_LC_PAIRS:
        return _no_lc(f"LC win rate not computed: the length-controlled GLM needs at least {MIN_LC_PAIRS} judged "
                      f"pairs, got {n}")
    delta = (df["output_1"].astype(str).str.len() - df["output_2"].astype(str).str.len()).astype(float)[ok]
    sd = float(delta.std())
    if not sd > 0:
        return _no_lc("LC win rate not computed: every pair has the same length difference, so length cannot be "
                      "told apart from quality")
    data = pd.DataFrame({
        "preference": (pref[ok].astype(float).replace({0.0: 1.5}) - 1).to_numpy(),
        "std_delta_len": (delta / sd).to_numpy(),
        "not_gamed_baseline": True,
    })
    test = pd.DataFrame({"std_delta_len": [0.0], "not_gamed_baseline": [True]})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train, x_test = make_dmatrix_for_model(data, test, formula=info["formula"])
            model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
            q = float(model.predict_proba(x_test)[:, 1][0])
    except Exception as e:  # noqa: BLE001 - a degenerate fit (e.g. one preference everywhere) is reported
        return _no_lc(f"LC win rate not computed: the length-controlled GLM failed ({error_summary(e)})"[:300])
    X = train.drop(columns=["preference"]).to_numpy(np.float64)
    se = sandwich_se(X, train["preference"].to_numpy(np.float64), model.coef_[0], x_test.to_numpy(np.float64)[0])
    return {"length_controlled_winrate": 100.0 * q, "lc_standard_error": se, "lc_method": LC_GLM, "lc_note": None}


def length_controlled(annotations, full_alpaca_eval: bool) -> dict[str, Any]:
    """The LC win rate of a judged set: ``length_controlled_v1`` on the full AlpacaEval set when its Hub file is
    available, else (and on every other set) the minimal GLM; the keys of `lc_without_difficulty`."""
    note = None
    if full_alpaca_eval:
        from alpaca_eval import metrics

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = metrics.get_length_controlled_winrate(annotations.copy(), save_weights_dir=None,
                                                          is_warn_extreme_changes=False)
            return {"length_controlled_winrate": float(m["length_controlled_winrate"]),
                    "lc_standard_error": float(m["lc_standard_error"]), "lc_method": "length_controlled_v1",
                    "lc_note": None}
        except Exception as e:  # noqa: BLE001 - offline (df_gamed.csv from the Hub) or a failed fit
            note = (f"length_controlled_v1 unavailable ({error_summary(e)[:120]}); "
                    f"LC from the GLM without instruction difficulty ({LC_GLM})")
    out = lc_without_difficulty(annotations)
    if note and out["lc_note"] is None:
        out["lc_note"] = note
    return out


def _metrics(sub) -> dict[str, Any]:
    from alpaca_eval import metrics

    m = metrics.get_winrate(sub)
    lc = lc_without_difficulty(sub)
    return {
        "win_rate": float(m["win_rate"]), "standard_error": float(m["standard_error"]),
        "lc_win_rate": lc["length_controlled_winrate"], "lc_standard_error": lc["lc_standard_error"],
        "lc_note": lc["lc_note"], "n": int(m["n_total"]),
    }


def group_winrates(annotations, labels: dict[str, dict[str, Any]], keys: Iterable[str] = ("eval_set", "category", "turn")):
    """Win rate, LC win rate, standard errors and n per value of each key in `keys` (e.g. per set, per category,
    per MT-Bench turn). `labels` maps an instruction to its record's fields; a key no record has is left out.
    Returns {key: {value: metrics}}; categories are keyed ``"<eval_set>/<category>"``."""
    df = annotations.reset_index(drop=True)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        def value(instr, key=key):
            rec = labels.get(instr) or {}
            v = rec.get(key)
            if v is None or v != v:  # missing or NaN
                return None
            if key == "category":
                return f"{rec.get('eval_set') or 'custom'}/{v}"
            return str(v)

        vals = df["instruction"].map(value)
        if vals.isna().all():
            continue
        out[key] = {str(v): _metrics(df[vals == v]) for v in sorted(vals.dropna().unique(), key=str)}
    return out
