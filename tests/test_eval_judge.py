"""`difflm eval alpaca` with any OpenAI-compatible judge, through the real alpaca_eval -> openai client path.

The judge is `tests/judge_server.py`, a FastAPI server this module starts on loopback (port 0): it answers the
default annotator (weighted_alpaca_eval_gpt4_turbo) with logprobs, preferring the longer output with
probability P_LONGER. So each pair's preference is P_LONGER or 1 - P_LONGER by the lengths alone, and the win rate
the test computes from the lengths is exact up to float rounding (log/exp of 0.9: ~1e-15), hence abs=1e-6."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

pytest.importorskip("alpaca_eval", reason="the eval extra (alpaca-eval) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

SERVER = Path(__file__).parent / "judge_server.py"
P_LONGER = 0.9
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
runner = CliRunner()


class Judge:
    """A judge server process (started here, stopped by its own pid)."""

    def __init__(self, tmp: Path, die_after: int | None = None, *extra: str):
        self.log = tmp / f"judge-{id(self)}.jsonl"
        cmd = [sys.executable, str(SERVER), "--p-longer", str(P_LONGER), "--log", str(self.log)]
        if die_after is not None:
            cmd += ["--die-after", str(die_after)]
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        port = self.proc.stdout.readline().strip()
        assert port.isdigit(), f"judge server did not start ({port!r})"
        self.url = f"http://127.0.0.1:{port}/v1"

    def judged(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def judge(tmp_path):
    j = Judge(tmp_path)
    yield j
    j.stop()


def mt_bench_shaped(tmp_path: Path, longer: list[bool], name="mine") -> tuple[Path, Path]:
    """20 MT-Bench-shaped first-turn records (question_id, category, turn) for the model and the reference;
    the model's output is longer where `longer` says so, by a length difference that varies pair to pair."""
    ref, mine = [], []
    for i, is_longer in enumerate(longer):
        base = {"id": str(81 + i), "question_id": str(81 + i), "category": CATEGORIES[i % 8], "turn": 1,
                "eval_set": "mt_bench", "dataset": "mt_bench", "turns": [f"Question {i}: explain topic {i}.", "More?"],
                "instruction": f"Question {i}: explain topic {i}."}
        r_len = 40 + 7 * i
        m_len = r_len + (1 if is_longer else -1) * (10 + 13 * (i % 5))
        ref.append(dict(base, output="r" * r_len, generator="reference"))
        mine.append(dict(base, output="m" * m_len, generator=name))
    rp, mp = tmp_path / "ref.json", tmp_path / f"{name}.json"
    rp.write_text(json.dumps(ref))
    mp.write_text(json.dumps(mine))
    return mp, rp


def expected_win_rate(longer: list[bool]) -> float:
    return 100 * sum(P_LONGER if x else 1 - P_LONGER for x in longer) / len(longer)


LONGER = [i % 4 != 3 for i in range(20)]  # 15 of 20 longer: the wins come from length alone


def _judge_args(out, ref, url, *extra):
    return ["eval", "alpaca", "--outputs", str(out), "--reference", str(ref), "--judge-base-url", url,
            "--judge-model", "local-judge", *extra]


@pytest.mark.slow
def test_local_judge_win_rate_lc_and_categories(tmp_path, judge, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # loopback: no key needed
    out, ref = mt_bench_shaped(tmp_path, LONGER)
    res = runner.invoke(app, _judge_args(out, ref, judge.url), terminal_width=200)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    wr = expected_win_rate(LONGER)
    assert wr == pytest.approx(70.0)
    assert s["win_rate"] == pytest.approx(wr, abs=1e-6) and s["n"] == s["n_total"] == 20
    # alpaca_eval's standard error: the SEM (ddof 1) of the per-pair preferences, in %
    vals = [P_LONGER if x else 1 - P_LONGER for x in LONGER]
    mean = sum(vals) / 20
    sem = (sum((v - mean) ** 2 for v in vals) / 19 / 20) ** 0.5
    assert s["standard_error"] == pytest.approx(100 * sem, rel=1e-6)
    # LC: reported, and much nearer 50% than the win rate (the wins come from length alone)
    assert s["lc_win_rate"] is not None and s["lc_method"] == "length_controlled_minimal" and s["lc_note"] is None
    assert abs(s["lc_win_rate"] - 50) < 0.5 * abs(s["win_rate"] - 50), s["lc_win_rate"]
    assert 0 < s["lc_standard_error"] < 25
    # per set and per category: the rule's value on each category's pairs
    assert s["by_eval_set"]["mt_bench"]["win_rate"] == pytest.approx(wr, abs=1e-6)
    assert set(s["by_category"]) == {f"mt_bench/{c}" for c in CATEGORIES}
    for i, c in enumerate(CATEGORIES):
        mine = [LONGER[j] for j in range(20) if j % 8 == i]
        got = s["by_category"][f"mt_bench/{c}"]
        assert got["n"] == len(mine) and got["win_rate"] == pytest.approx(expected_win_rate(mine), abs=1e-6)
        assert got["lc_win_rate"] is None and "at least 10" in got["lc_note"]  # 2-3 pairs: said, not guessed
    assert s["by_turn"]["1"]["n"] == 20
    # the judge was asked by model name, once per pair, with the placeholder key of a keyless loopback judge
    asked = judge.judged()
    assert len(asked) == 20 and {a["model"] for a in asked} == {"local-judge"}
    assert {a["authorization"] for a in asked} == {"Bearer no-key-needed"}
    assert s["judge"] == {"annotator": "weighted_alpaca_eval_gpt4_turbo@local-judge", "model": "local-judge",
                          "base_url": judge.url, "api_key_env": "OPENAI_API_KEY"}
    assert "win rate 70.00" in res.stdout and "mt_bench/math" in res.stdout
    # the key comes from the variable --judge-api-key-env names, and is never written to disk
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-local-123")
    out2, _ = mt_bench_shaped(tmp_path, LONGER, name="other")
    res = runner.invoke(app, _judge_args(out2, ref, judge.url, "--judge-api-key-env", "MY_JUDGE_KEY"))
    assert res.exit_code == 0, res.output
    assert {a["authorization"] for a in judge.judged()[20:]} == {"Bearer sk-local-123"}
    assert not any("sk-local-123" in p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p != judge.log)


@pytest.mark.slow
def test_killed_judge_rerun_judges_only_the_rest(tmp_path, judge):
    """The judge dies after 8 answers (chunks of 4): one line naming its URL, exit 1; the 8 judged pairs stay in
    the cache; a rerun against a fresh judge asks only for the other 12, and the final numbers are those of an
    uninterrupted run."""
    out, ref = mt_bench_shaped(tmp_path, LONGER)
    dying = Judge(tmp_path, die_after=8)
    try:
        res = runner.invoke(app, _judge_args(out, ref, dying.url, "--chunk-size", "4", "--judge-timeout", "10"))
    finally:
        dying.stop()
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()[-1]
    assert dying.url in err and "rerun" in err and "Traceback" not in res.stderr, res.stderr
    first = {a["instruction"] for a in dying.judged()}
    assert len(first) == 8
    cache = json.loads((tmp_path / "mine.json.alpaca_eval" / "annotations_cache.json").read_text())
    assert {a["instruction"] for a in cache} == first
    res = runner.invoke(app, _judge_args(out, ref, judge.url, "--chunk-size", "4"))
    assert res.exit_code == 0, res.output
    second = [a["instruction"] for a in judge.judged()]
    assert len(second) == 12 and not first & set(second)  # nothing judged twice
    resumed = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    # an uninterrupted run of the same pairs, in another folder
    res = runner.invoke(app, _judge_args(out, ref, judge.url, "--out", str(tmp_path / "fresh"),
                                         "--results", str(tmp_path / "fresh.json")))
    assert res.exit_code == 0, res.output
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    for key in ("win_rate", "standard_error", "lc_win_rate", "lc_standard_error", "n"):
        assert resumed[key] == pytest.approx(fresh[key], abs=1e-9), key
    assert resumed["win_rate"] == pytest.approx(expected_win_rate(LONGER), abs=1e-6)


@pytest.mark.slow
def test_refused_and_silent_judges_fail_in_one_line(tmp_path):
    out, ref = mt_bench_shaped(tmp_path, LONGER)
    with socket.socket() as s:  # a port nobody listens on: refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    res = runner.invoke(app, _judge_args(out, ref, refused))
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and refused in errors[0] and "did not answer" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    from difflm.eval.alpaca import JudgeError, evaluate_files
    from difflm.eval.judge import JudgeEndpoint

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers: a timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(JudgeError, match="timed out") as e:
            evaluate_files(out, ref, judge=JudgeEndpoint(base_url=url, model="x", timeout=0.5, max_retries=0),
                           output_dir=tmp_path / "silent")
    assert url in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_judge_without_logprobs_is_named_in_one_line(tmp_path, judge):
    """A server that ignores the logprobs request: one line saying so; its unparsable answers are not kept as
    judged, so a rerun against a proper judge asks for every pair and gets the rule's numbers."""
    out, ref = mt_bench_shaped(tmp_path, LONGER)
    j = Judge(tmp_path, None, "--no-logprobs")
    try:
        res = runner.invoke(app, _judge_args(out, ref, j.url))
    finally:
        j.stop()
    assert res.exit_code == 1, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert j.url in line and "logprobs" in line and "Traceback" not in res.stderr
    assert "0 judged pairs are kept" in line
    res = runner.invoke(app, _judge_args(out, ref, judge.url))
    assert res.exit_code == 0, res.output
    assert len(judge.judged()) == 20
    s = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    assert s["n"] == 20 and s["win_rate"] == pytest.approx(expected_win_rate(LONGER), abs=1e-6)


@pytest.mark.parametrize(
    "extra,env,needle",
    [
        (["--judge-base-url", "ftp://judge"], {}, "judge_base_url"),
        (["--judge-base-url", "localhost:8000"], {}, "judge_base_url"),
        (["--judge-base-url", "https://judge.example.org/v1"], {}, "OPENAI_API_KEY"),
        (["--judge-base-url", "https://judge.example.org/v1", "--judge-api-key-env", "NO_SUCH_VAR_X"], {}, "NO_SUCH_VAR_X"),
        (["--judge-model", "m", "--judge-api-key-env", "bad name"], {"OPENAI_API_KEY": "k"}, "judge_api_key_env"),
        (["--judge-base-url", "http://127.0.0.1:1/v1", "--annotator", "claude"], {}, "openai_completions"),
        (["--judge-base-url", "http://127.0.0.1:1/v1", "--judge-timeout", "0"], {}, "judge_timeout"),
        (["--chunk-size", "0"], {"OPENAI_API_KEY": "k"}, "chunk_size"),
    ],
)
def test_bad_judge_settings_exit_2_with_one_line(tmp_path, monkeypatch, extra, env, needle):
    for v in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(v, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out, ref = mt_bench_shaped(tmp_path, LONGER)
    res = runner.invoke(app, ["eval", "alpaca", "--outputs", str(out), "--reference", str(ref), *extra])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "mine.json.alpaca_eval").exists()  # checked before anything was written


@pytest.mark.slow
def test_recipe_holds_the_judge_settings(tmp_path, judge):
    out, ref = mt_bench_shaped(tmp_path, LONGER)
    recipe = tmp_path / "judge.yaml"
    recipe.write_text(f"judge_base_url: {judge.url}\njudge_model: from-recipe\nchunk_size: 5\nmax_instances: 10\n")
    res = runner.invoke(app, ["eval", "pairwise", "--outputs", str(out), "--reference", str(ref), "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "mine.json.alpaca.json").read_text())
    assert s["n"] == 10 and {a["model"] for a in judge.judged()} == {"from-recipe"}
    assert s["lc_win_rate"] is not None  # 10 pairs: the fewest the GLM is fitted on


def test_derived_annotator_keeps_the_prompt_and_parser(tmp_path):
    import yaml

    from difflm.eval.alpaca import annotator_config_path
    from difflm.eval.judge import JudgeEndpoint

    orig = annotator_config_path("weighted_alpaca_eval_gpt4_turbo")
    path, name = JudgeEndpoint(base_url="http://127.0.0.1:9/v1", model="qwen").annotator_config(orig, tmp_path)
    (oname, o), = yaml.safe_load(orig.read_text()).items()
    (nname, n), = yaml.safe_load(path.read_text()).items()
    assert name == nname == "weighted_alpaca_eval_gpt4_turbo@qwen"
    assert Path(n["prompt_template"]).read_text() == (orig.parent.parent / o["prompt_template"]).read_text()
    assert n["completions_kwargs"] == dict(o["completions_kwargs"], model_name="qwen")  # logprobs etc. kept
    assert {k: v for k, v in n.items() if k not in ("prompt_template", "completions_kwargs")} == {
        k: v for k, v in o.items() if k not in ("prompt_template", "completions_kwargs")}


def test_judge_files_are_absolute_for_a_relative_output_folder(tmp_path, monkeypatch):
    """alpaca_eval reads a relative annotator config inside its own evaluators_configs/ folder: the derived
    config (and the client config) must be absolute when the outputs are given relative to the working folder."""
    from difflm.eval.alpaca import annotator_config_path
    from difflm.eval.judge import JudgeEndpoint

    monkeypatch.chdir(tmp_path)
    ep = JudgeEndpoint(base_url="http://127.0.0.1:9/v1", model="qwen")
    path, _ = ep.annotator_config(annotator_config_path("weighted_alpaca_eval_gpt4_turbo"), Path("runs/x.json.alpaca_eval"))
    client = ep.write_client_config(Path("runs/x.json.alpaca_eval/judge_client.yaml"))
    assert path.is_absolute() and path.is_file() and path.is_relative_to(tmp_path)
    assert client.is_absolute() and client.is_file()
