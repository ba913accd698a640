"""lm-evaluation-harness: the `difflm` model runs a local task YAML (generate_until + loglikelihood) on a tiny model."""

from __future__ import annotations

import json
import math
import runpy
import shutil
import string
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import difflm.eval.lm_eval_model as lm_eval_model  # noqa: E402  (registers "difflm")
from difflm.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "fixtures" / "eval" / "lm_eval"
TINY_ARGS = {"steps": 4, "gen_length": 8, "mc_num": 4, "mc_batch_size": 4}


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    """Task YAMLs name their data relative to the repo root; datasets' cache goes to tmp."""
    import datasets

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm(tiny_llada_dir):
    return lm_eval_model.DifflmLM(pretrained=str(tiny_llada_dir), batch_size=2, **TINY_ARGS)


RUNPY_WARNING = "ignore:'difflm.eval.lm_eval_model' found in sys.modules:RuntimeWarning"


@pytest.mark.filterwarnings(RUNPY_WARNING)
def test_registered_under_difflm():
    from lm_eval.api.registry import get_model

    assert get_model("difflm") is lm_eval_model.DifflmLM
    # running the module as a script (python -m) registers nothing new and resolves to the same class
    runpy.run_module("difflm.eval.lm_eval_model", run_name="not_main")
    assert get_model("difflm") is lm_eval_model.DifflmLM


def test_simple_evaluate_runs_the_local_tasks_end_to_end(tiny_llada_dir, in_repo, tmp_path):
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    assert {"difflm_tiny_gen", "difflm_tiny_choice"} <= set(tm.all_tasks)
    # float64, so that the outputs of the harness's padded batches and of one prompt at a time (below) cannot
    # differ by a float accident (a flip needs a top-1/top-2 tie to ~1e-15)
    args = {"pretrained": str(tiny_llada_dir), "dtype": torch.float64, **TINY_ARGS}
    res = lm_eval.simple_evaluate(
        model="difflm", model_args=args,
        tasks=["difflm_tiny_gen", "difflm_tiny_choice"], task_manager=tm, limit=3, batch_size=2,
        bootstrap_iters=0, log_samples=True,
    )
    gens = sorted(res["samples"]["difflm_tiny_gen"], key=lambda s: s["doc_id"])
    assert len(gens) == 3
    for s in gens:
        text = s["resps"][0][0]
        assert isinstance(text, str) and "\n" not in text and "Question:" not in text  # cut at the stops
    # the harness's score is the task's rule applied to what the model produced, doc by doc
    outputs = [s["filtered_resps"][0] for s in gens]
    docs = [json.loads(x) for x in (TASKS / "tiny_qa.jsonl").read_text().splitlines()][:3]
    alone = lm_eval_model.DifflmLM(pretrained=str(tiny_llada_dir), dtype=torch.float64, batch_size=1, **TINY_ARGS)
    kwargs = {"until": ["\n", "Question:"], "max_gen_toks": 16, "do_sample": False}  # the task's
    assert outputs == [alone.generate_until([Instance("generate_until", {}, (f"Question: {d['question']}\nAnswer:", kwargs), 0)])[0]
                       for d in docs]
    assert [s["target"] for s in gens] == ["3", "Paris", "blue"]
    want = sum(_norm(o) == _norm(t) for o, t in zip(outputs, ["3", "Paris", "blue"])) / 3
    assert res["results"]["difflm_tiny_gen"]["exact_match,none"] == pytest.approx(want, abs=1e-12)
    choices = sorted(res["samples"]["difflm_tiny_choice"], key=lambda s: s["doc_id"])
    assert len(choices) == 3
    for s in choices:
        for (ll, greedy), in s["resps"]:
            assert math.isfinite(ll) and ll < 0 and isinstance(greedy, bool)
    picked = [max(range(3), key=lambda i: s["resps"][i][0][0]) for s in choices]
    want = sum(p == label for p, label in zip(picked, [0, 1, 2])) / 3
    assert res["results"]["difflm_tiny_choice"]["acc,none"] == pytest.approx(want, abs=1e-12)

    # A random model answers nothing right, so the score above is 0 whatever the plumbing does: rerun the
    # same prompts with doc 0's answer set to what the model said (case changed, punctuation added). The
    # same prompts in the same batches on the same machine give the same outputs, so exactly doc 0 now
    # scores (the task ignores case and punctuation): 1/3, which a scorer that applied another rule, or
    # outputs that changed between runs, would not give.
    task_dir = tmp_path / "echo_task"
    task_dir.mkdir()
    docs[0]["answer"] = outputs[0].swapcase() + "!"
    docs[1]["answer"] = outputs[1] + "x"
    # the task's loader (tiny_qa.py) reads tiny_qa.jsonl from beside itself: a copy of both, the rows edited
    (task_dir / "tiny_qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    shutil.copy(TASKS / "tiny_qa.py", task_dir / "tiny_qa.py")
    yaml_text = (TASKS / "difflm_tiny_gen.yaml").read_text().replace("task: difflm_tiny_gen", "task: difflm_tiny_echo")
    assert "task: difflm_tiny_echo" in yaml_text and "!function tiny_qa.load" in yaml_text
    (task_dir / "difflm_tiny_echo.yaml").write_text(yaml_text)
    again = lm_eval.simple_evaluate(
        model="difflm", model_args=args, tasks=["difflm_tiny_echo"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), limit=3, batch_size=2,
        bootstrap_iters=0, log_samples=True,
    )
    echo = sorted(again["samples"]["difflm_tiny_echo"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in echo] == outputs
    matches = [_norm(s["filtered_resps"][0]) == _norm(d["answer"]) for s, d in zip(echo, docs)]
    assert matches == [True, False, _norm(outputs[2]) == "blue"]
    assert again["results"]["difflm_tiny_echo"]["exact_match,none"] == pytest.approx(sum(matches) / 3, abs=1e-12)


def _norm(text: str) -> str:
    """The tiny gen task's exact_match rule (ignore_case, ignore_punctuation), written out."""
    return "".join(c for c in text.lower() if c not in string.punctuation)


def test_loglikelihood_is_seeded_per_request(lm):
    reqs = [Instance("loglikelihood", {}, ("Question: What is 1 + 2?\nAnswer:", " 3"), i) for i in range(2)]
    a = lm.loglikelihood(reqs)
    b = lm.loglikelihood(list(reversed(reqs)))
    # same request, same score, whatever the order: each request is scored alone, with MC masks seeded by
    # its text, so the same arithmetic runs each time and equality is exact
    assert a[0] == a[1] == b[0]
    other = lm.loglikelihood([Instance("loglikelihood", {}, ("Question: What is 1 + 2?\nAnswer:", " 4"), 0)])
    assert other[0][0] != a[0][0]


def test_generate_until_stops_and_batches(lm):
    reqs = [Instance("generate_until", {}, (f"Question: What is {i} + 1?\nAnswer:", {"until": ["e"], "max_gen_toks": 8}), i)
            for i in range(3)]
    outs = lm.generate_until(reqs)
    assert len(outs) == 3 and all(isinstance(o, str) and "e" not in o for o in outs)
    again = lm.generate_until(list(reversed(reqs)))
    # seeded from the context, and batched after sorting by length: reversed requests form the same batches,
    # so the same kernels run and the outputs are equal exactly
    assert list(reversed(again)) == outs


def test_loglikelihood_rolling_and_chat_template(lm):
    (score,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The quick brown fox.",), 0)])
    assert math.isfinite(score) and score < 0
    text = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and lm.tokenizer_name


def test_model_args_are_checked(tiny_llada_dir):
    with pytest.raises(ConfigError, match="unknown difflm model_args: bogus"):
        lm_eval_model.DifflmLM(pretrained=str(tiny_llada_dir), bogus=1)
    with pytest.raises(ConfigError, match="model_args.method: must be one of"):
        lm_eval_model.DifflmLM(pretrained=str(tiny_llada_dir), decode="nope")
    with pytest.raises(ConfigError, match="pretrained"):
        lm_eval_model.DifflmLM()


@pytest.mark.filterwarnings(RUNPY_WARNING)
def test_module_cli_runs_lm_eval(tiny_llada_dir, in_repo, monkeypatch, tmp_path, capsys):
    """`python -m difflm.eval.lm_eval_model --model difflm ...`, in process (built-in task index skipped)."""
    real_init = TaskManager.__init__

    def no_builtin_tasks(self, *args, **kwargs):
        kwargs["include_defaults"] = False  # lm_eval's CLI always indexes its ~10k built-in tasks (8 s)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "__init__", no_builtin_tasks)
    args = ["--model", "difflm", "--model_args", f"pretrained={tiny_llada_dir},steps=4,gen_length=8,mc_num=2",
            "--include_path", str(TASKS), "--tasks", "difflm_tiny_gen,difflm_tiny_choice", "--limit", "2",
            "--device", "cpu", "--output_path", str(tmp_path / "lm_eval_out")]
    monkeypatch.setattr(sys, "argv", ["lm_eval_model", *args])
    runpy.run_module("difflm.eval.lm_eval_model", run_name="__main__")
    out = capsys.readouterr().out
    assert "difflm_tiny_gen" in out and "difflm_tiny_choice" in out and "exact_match" in out
    assert list((tmp_path / "lm_eval_out").rglob("results_*.json"))


# -- repeats: the k-th identical request gets its own seed ---------------------------------------------
SAMPLING_ARGS = {**TINY_ARGS, "decode": "conv", "temperature": 1.0}


def _repeat_samples(tiny_llada_dir, **kwargs):
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="difflm", model_args={"pretrained": str(tiny_llada_dir), **SAMPLING_ARGS},
        tasks=["difflm_tiny_repeats"], task_manager=tm, limit=3, batch_size=3, bootstrap_iters=0,
        log_samples=True, **kwargs,
    )
    samples = sorted(res["samples"]["difflm_tiny_repeats"], key=lambda s: s["doc_id"])
    return [list(s["resps"][0]) for s in samples]  # one request per doc, its 4 responses


def test_repeated_requests_are_sampled_independently(tiny_llada_dir, monkeypatch, tmp_path):
    """`repeats: 4` + sampling (self-consistency, pass@k): lm-eval sends the same request 4 times; seeding
    from (seed, context) alone made the 4 samples identical, so maj@k / pass@k scored one sample."""
    import lm_eval.caching.cache as request_cache

    monkeypatch.setattr(request_cache, "PATH", str(tmp_path / "request_cache"))  # cache_requests' folder
    first = _repeat_samples(tiny_llada_dir)
    assert len(first) == 3 and all(len(doc) == 4 for doc in first)
    for doc in first:
        assert len(set(doc)) > 1, doc  # the 4 samples of a doc are not all equal
    assert _repeat_samples(tiny_llada_dir) == first  # deterministic across runs
    # lm-eval's response cache (use_cache) and request cache (cache_requests), written then read back,
    # give the same 4 samples per doc
    for _ in range(2):
        cached = _repeat_samples(tiny_llada_dir, use_cache=str(tmp_path / "responses"), cache_requests=True)
        assert cached == first
    assert list((tmp_path / "request_cache").iterdir())  # the request cache was really used


def test_repeat_seeds_do_not_depend_on_order_or_batch(lm):
    """The k-th copy of a request gets the k-th seed whatever its place; other requests are unaffected."""
    sampling = lm_eval_model.DifflmLM(model=lm.model, batch_size=2, **SAMPLING_ARGS)
    kw = {"until": ["Question:"], "max_gen_toks": 8, "do_sample": True}
    a = Instance("generate_until", {}, ("Question: What is 1 + 2?\nAnswer:", kw), 0)
    b = Instance("generate_until", {}, ("Question: Name a colour.\nAnswer:", kw), 1)
    outs = sampling.generate_until([a, a, b, a])
    mixed = sampling.generate_until([b, a, a, a])
    assert sorted(outs[:2] + outs[3:]) == sorted(mixed[1:]) and outs[2] == mixed[0]
    assert sampling.generate_until([a])[0] in outs  # the first copy keeps the plain (seed, context) seed
    assert len({outs[0], outs[1], outs[3]}) > 1


# -- registry: lm-eval's own models stay available; the tasks run from any directory --------------------
def _subprocess_env():
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


REGISTRY_SCRIPT = r"""
import json, sys
import difflm.eval.lm_eval_model  # registers difflm: lm-eval's own models must stay registered
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

ar, llada, tasks = sys.argv[1:4]
tm = TaskManager(include_path=tasks, include_defaults=False)
names = ["difflm_tiny_gen", "difflm_tiny_choice"]
out = {"dummy": get_model("dummy").__name__}
for model, args in (("hf", {"pretrained": ar, "dtype": "float32"}),
                    ("difflm", {"pretrained": llada, "steps": 4, "gen_length": 8, "mc_num": 2})):
    res = lm_eval.simple_evaluate(model=model, model_args=args, tasks=names, task_manager=tm, limit=2,
                                  batch_size=1, device="cpu", bootstrap_iters=0)
    out[model] = {t: sorted(res["results"][t]) for t in names}
print("RESULT " + json.dumps(out))
"""


def test_lm_eval_builtin_models_stay_registered(tiny_llada_dir, tmp_path):
    """Importing difflm's module, then `hf` (a baseline) and `difflm` in one process, from another cwd.
    Registering difflm into lm-eval's empty lazy registry used to hide hf, dummy, vllm, ... (a fresh
    process: in this one another test may have filled the registry already)."""
    import json
    import subprocess

    from difflm.testing import build_tiny_ar

    ar = build_tiny_ar(tmp_path / "ar")  # a causal LM folder with its tokenizer
    proc = subprocess.run([sys.executable, "-c", REGISTRY_SCRIPT, str(ar), str(tiny_llada_dir), str(TASKS)],
                          cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    assert out["dummy"] == "DummyLM"
    for model in ("hf", "difflm"):
        assert "exact_match,none" in out[model]["difflm_tiny_gen"], out
        assert "acc,none" in out[model]["difflm_tiny_choice"], out


def test_module_cli_runs_the_fixture_tasks_from_any_cwd(tiny_llada_dir, tmp_path):
    """The README's command (`python -m difflm.eval.lm_eval_model`, the same `main` as the
    `difflm-lm-eval` console script) from a directory outside the repo: the task YAMLs find their data
    next to themselves, not relative to the working directory."""
    import subprocess

    args = ["--model", "difflm", "--model_args", f"pretrained={tiny_llada_dir},steps=4,gen_length=8,mc_num=2",
            "--include_path", str(TASKS), "--tasks", "difflm_tiny_gen,difflm_tiny_choice", "--limit", "2",
            "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "difflm.eval.lm_eval_model", *args], cwd=tmp_path,
                          env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "difflm_tiny_gen" in proc.stdout and "difflm_tiny_choice" in proc.stdout and "exact_match" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


# -- data-parallel: 2 processes (torchrun, gloo) give what 1 process gives ---------------------------------
@pytest.mark.slow
def test_two_processes_give_the_same_metrics_and_samples_as_one(tiny_llada_dir, in_repo, tmp_path):
    """lm-eval splits the documents over the ranks (its own multi-process mode: rank/world_size, all_gather,
    gather_object on rank 0); 5 documents over 2 ranks also exercise its padding of the shorter rank. The one
    process is this one (simple_evaluate, the CLI's defaults), the two are `torchrun ... -m difflm.eval.lm_eval_model`."""
    import subprocess

    from difflm.testing import free_port

    names = ["difflm_tiny_gen", "difflm_tiny_choice"]
    model_args = {"pretrained": str(tiny_llada_dir), "steps": 4, "gen_length": 8, "mc_num": 4}
    one = lm_eval.simple_evaluate(model="difflm", model_args=model_args, tasks=names, limit=5, batch_size=1, device="cpu",
                                  task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), log_samples=True)
    samples1 = {t: sorted(json.loads(json.dumps(one["samples"][t], default=str)), key=lambda r: r["doc_id"]) for t in names}
    args = ["--model", "difflm", "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--include_path", str(TASKS), "--tasks", ",".join(names), "--limit", "5", "--device", "cpu",
            "--batch_size", "1", "--log_samples", "--output_path", str(tmp_path / "two")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "difflm.eval.lm_eval_model", *args],
        cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the documents were split: rank 1 built its own share (a model without rank/world_size runs every document
    # on each process, all as "rank 0")
    assert "Building contexts for difflm_tiny_gen on rank 1" in proc.stderr, proc.stderr[-3000:]
    (results,) = list((tmp_path / "two").rglob("results_*.json"))
    two = json.loads(results.read_text())
    samples2 = {}
    for f in (tmp_path / "two").rglob("samples_*.jsonl"):
        task = f.name.split("_20")[0][len("samples_"):]
        samples2[task] = sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda r: r["doc_id"])
    # every request's noise is seeded by the request alone and both runs use the same kernels and shapes (batch 1,
    # one thread), so the outputs are equal; the log-likelihoods get a tolerance all the same
    for task in names:
        assert two["n-samples"][task] == one["n-samples"][task] == {"original": 6, "effective": 5}
        m1, m2 = one["results"][task], two["results"][task]
        assert m1.keys() == m2.keys()
        for key in m1:
            if isinstance(m1[key], float):
                assert m2[key] == pytest.approx(m1[key], abs=1e-9), key
        assert [r["doc_id"] for r in samples2[task]] == [r["doc_id"] for r in samples1[task]] == list(range(5))
        for a, b in zip(samples1[task], samples2[task]):
            assert (a["doc"], str(a["target"]), a["prompt_hash"]) == (b["doc"], str(b["target"]), b["prompt_hash"])
            # resps: lm-eval appends the response to its padding copy of a rank's last request to that request's
            # list, so a 2-rank run may hold one more there; the first is the request's own (its filtered_resps)
            if task == "difflm_tiny_gen":
                assert a["filtered_resps"] == b["filtered_resps"] and a["exact_match"] == b["exact_match"]
                assert [r[0] for r in a["resps"]] == [r[0] for r in b["resps"]]
            else:
                lls1 = [float(r[0][0]) for r in a["resps"]]  # (the samples file holds them as strings)
                lls2 = [float(r[0][0]) for r in b["resps"]]
                assert lls2 == pytest.approx(lls1, abs=1e-5) and a["acc"] == b["acc"]
