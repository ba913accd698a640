"""Evaluation of `difflm generate` outputs (see difflm/eval/README.md for formulas and paper settings).

- `difflm.eval.gsm8k`: `extract_answer`, `is_correct`, `score_records`, `evaluate_file` (GSM8K accuracy ± stderr)
- `difflm.eval.alpaca`: `evaluate_files` (alpaca_eval win rate / LC win rate), `check_judge_key`, `load_outputs`
- `difflm.eval.fluency`: `fluency_metrics` (rep-n, distinct-n, longest repeat, frequent tokens, position curve)
- `difflm.eval.likelihood`: `mc_loglikelihood` (LLaDA's Monte-Carlo bound on log p(answer | prompt))
- `difflm.eval.lm_eval_model`: the `difflm` model for lm-evaluation-harness (`python -m difflm.eval.lm_eval_model`)
- `difflm.eval.report`: `build_report` (table, Markdown, PNG plots, every number traced to its manifest)
- `difflm.eval.runs`: `load_run`, `find_runs` (OUT.json + OUT.json.manifest.json + eval results)

Submodules are imported on demand: `import difflm.eval` loads nothing heavy (no torch, pandas, lm_eval).
"""
