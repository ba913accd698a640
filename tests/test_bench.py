"""bench/: the reference loops agree with difflm where they must, and bench.py runs end to end.

- greedy LLaDA (temperature 0, low_confidence): LLaDA's published loop and difflm `llada` commit the same
  tokens on the same model and prompts (batch 1, batch 2, left padding);
- conv: the reference step's [V + 1] distribution equals difflm's step formulas exactly, and both samplers'
  first steps reproduce it (4000 independent rows each);
- bench.py writes a complete JSON for the tiny preset (subprocess), and the llada-8b code path runs on CPU
  with --scale-down (capped steps, matmul rate, GSM8K estimate, time budget).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflm.decoding import DecodeConfig, generate
from difflm.decoding import steps as S

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bench = _load("difflm_bench_main", BENCH_DIR / "bench.py")
ref = bench.ref  # the reference module bench.py times against


@pytest.fixture(scope="module")
def tiny():
    """In float64: LLaDA's loop runs the output head over every position, difflm over the generated ones
    (logits_to_keep), and both compare confidences between positions; in float32 the two GEMMs differ by
    ~1e-7 and a near-tie of random weights can commit another position. In float64 a flip needs two
    candidates within ~1e-12 (the decoders round the logits to float32 the same way)."""
    p = bench.PRESETS["tiny"]
    model = bench.build_model(p, torch.device("cpu"), torch.float64, seed=0)
    ids = dict(mask_id=p.vocab - 1, eos_id=p.vocab - 2)
    return bench.TimedModel(model, ids["mask_id"], torch.device("cpu")), ids, p


@pytest.mark.parametrize(
    "batch,steps,block,pad",
    [(1, 64, 32, False), (2, 16, 32, False), (2, 8, 64, False), (2, 32, 32, True)],
)
@pytest.mark.numerics
def test_greedy_llada_reference_equals_difflm(tiny, batch, steps, block, pad):
    model, ids, p = tiny
    g = torch.Generator().manual_seed(batch * 100 + steps)
    prompt = torch.randint(0, p.vocab - 2, (batch, 16), generator=g)
    am = None
    if pad:  # row 0 left-padded by 5 (pad = eos), as a batched prompt list would be
        am = torch.ones_like(prompt)
        am[0, :5] = 0
        prompt[0, :5] = ids["eos_id"]
    x_ref, nfe_ref = ref.llada_generate(
        model, prompt, steps=steps, gen_length=64, block_length=block, mask_id=ids["mask_id"], attention_mask=am
    )
    cfg = DecodeConfig(method="llada", gen_length=64, steps=steps, block_length=block, temperature=0.0)
    out = generate(model, prompt, cfg, mask_id=ids["mask_id"], eos_id=ids["eos_id"], attention_mask=am)
    assert nfe_ref == out.nfe == steps
    assert not (x_ref == ids["mask_id"]).any()
    assert torch.equal(out.sequences, x_ref)


# ------------------------------------------------------------------------------------------------
# conv: one step from fixed logits
V, MASK, EOS, P, L = 7, 6, 5, 3, 10


class FixedLogits(torch.nn.Module):
    """Logits at absolute position i are table[i], whatever the input."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x, attention_mask=None):
        return self.table[None, : x.shape[1]].expand(x.shape[0], -1, -1).clone()


def _table(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(P + L, V, generator=g, dtype=torch.float64) * 1.5
    t[:, MASK] = float("-inf")
    return t


def _difflm_step_probs(logits, x, t, s, k, top_k):
    """difflm's step distribution [B, L, V + 1] (last column MASK) from its own step functions."""
    region = x[:, P:] == MASK
    scores, idx, q = S.candidates(logits, top_k, 1.0)
    if idx is None:  # all tokens: the scores are the logits
        p = torch.softmax(scores.double(), -1)
    else:  # the kept log-probabilities
        p = torch.zeros(logits.shape, dtype=torch.float64).scatter_(-1, idx, scores.double().exp())
    assert torch.allclose(q, p.sum(-1))
    s_conv = S.conv_scale(S.conv_counts(x != MASK, k)[:, P:], 1.0)
    pu = S.unmask_probability(t - s, s, S.position_scale(q, region, s_conv), q)
    out = torch.cat([pu[..., None] * p / q[..., None], (1 - pu)[..., None]], -1)
    return out, region


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.numerics
def test_conv_reference_weights_equal_difflm_step(top_k):
    table = _table()
    x = torch.full((2, P + L), MASK)
    x[:, :P] = torch.tensor([1, 2, 3])
    x[1, P + 4] = 0  # a decoded token in row 1 moves the window counts
    x[1, P + 8] = 2
    logits = table[None, P:].expand(2, -1, -1).clone()
    t, s = 0.75, 0.5
    w = ref.conv_weights(logits, x, P, t, s, kernel_size=4, mask_id=MASK, top_k=top_k)  # K 4 -> 5
    ref_probs = w / w.sum(-1, keepdim=True)
    ours, region = _difflm_step_probs(logits.float(), x, t, s, 5, top_k)
    assert torch.allclose(ref_probs[region], ours[region], atol=1e-6, rtol=0)
    # s_i = 0 (no known token within 2 positions) cannot unmask
    assert (ref_probs[0, 5:, -1] == 1).all()


def _freqs(gen: torch.Tensor) -> np.ndarray:
    """[L, V + 1] outcome frequencies (MASK in the last column)."""
    out = np.zeros((gen.shape[1], V + 1))
    g = gen.numpy()
    for i in range(gen.shape[1]):
        for v in range(V):
            out[i, V if v == MASK else v] = (g[:, i] == v).mean()
    return out


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.numerics
def test_conv_first_step_samplers_match_reference_distribution(top_k):
    n, steps, k = 4000, 4, 9
    table = _table(1)
    model = FixedLogits(table)
    prompt = torch.tensor([1, 2, 3])[None].repeat(n, 1)
    t, s = 1.0, 1.0 - (1.0 - 1e-5) / steps
    x0 = torch.cat([prompt[:1], torch.full((1, L), MASK)], 1)
    w = ref.conv_weights(table[None, P:], x0, P, t, s, kernel_size=k, mask_id=MASK, top_k=top_k)
    want = (w / w.sum(-1, keepdim=True))[0].numpy()  # column MASK has weight 0; column V is "stay masked"

    x_ref, nfe = ref.conv_generate(
        model, prompt, steps=steps, gen_length=L, kernel_size=k, mask_id=MASK, top_k=top_k,
        generator=torch.Generator().manual_seed(0), max_steps=1,
    )
    assert nfe == 1
    got = {}

    class FirstStep(Exception):
        pass

    def first(ev):
        got["x"] = ev["x"][:, P:].clone()
        raise FirstStep

    cfg = DecodeConfig(method="conv", gen_length=L, steps=steps, kernel_size=k, top_k=top_k, seed=3)
    with pytest.raises(FirstStep):
        generate(model, prompt, cfg, mask_id=MASK, eos_id=EOS, callback=first)
    for name, x in (("reference", x_ref[:, P:]), ("difflm", got["x"])):
        emp = _freqs(x)
        assert np.abs(emp - want).max() < 0.035, (name, np.abs(emp - want).max())


# ------------------------------------------------------------------------------------------------
# bench.py end to end
DECODER_KEYS = {
    "impl", "method", "nfe", "steps_timed", "extrapolated", "forward_s_per_step", "sampler_s_per_step",
    "total_s_per_step", "sampler_share", "seconds", "content_tokens", "content_tokens_per_nfe", "content_tokens_per_s",
}


@pytest.mark.numerics
@pytest.mark.slow
def test_bench_tiny_cli_writes_json(tmp_path):
    # float64: the greedy equivalence checks compare LLaDA's loop (head over all positions) with difflm's
    # (logits_to_keep), different GEMMs; in float32 a near-tie could flip a token (see the tiny fixture)
    cmd = [sys.executable, str(BENCH_DIR / "bench.py"), "--preset", "tiny", "--gen-length", "32", "--steps", "8",
           "--repeats", "1", "--name", "t", "--out-dir", str(tmp_path), "--plain", "--dtype", "float64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IDENTICAL" in r.stdout and "MISMATCH" not in r.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.json"], files  # no temporary file left behind
    rec = json.loads((tmp_path / "t.json").read_text())
    assert rec["machine"]["cpu_model"] and rec["machine"]["cpu_cores"]
    assert rec["versions"]["torch"] == torch.__version__ and rec["versions"]["transformers"]
    assert rec["model"]["dtype"] == "float64"
    assert rec["settings"]["gen_length"] == [32] and rec["settings"]["steps"] == 8
    (cell,) = rec["runs"]
    assert set(cell["decoders"]) == set(bench.ALL_METHODS)
    for name, d in cell["decoders"].items():
        assert DECODER_KEYS <= set(d), (name, DECODER_KEYS - set(d))
        assert d["nfe"] > 0 and d["forward_s_per_step"] > 0 and d["sampler_s_per_step"] >= 0
        assert not d["extrapolated"]
    assert cell["decoders"]["conv"]["nfe"] <= 8 and cell["decoders"]["llada"]["nfe"] == 32
    assert {c["difflm"] for c in cell["comparisons"]} == {"llada", "llada-fast", "conv"}
    assert all(e["identical"] and e["complete"] for e in cell["equivalence"]) and len(cell["equivalence"]) == 2


def test_bench_llada_8b_code_path_scaled_down(tmp_path, capsys):
    # float64, not the preset's bfloat16 (checked below): the equivalence of the first 3 steps compares two
    # kernel paths (see test_bench_tiny_cli_writes_json), and bfloat16 logits tie often
    base = ["--preset", "llada-8b", "--scale-down", "--device", "cpu", "--gen-length", "256", "--batch", "1", "2",
            "--prompt-length", "16", "--max-steps", "3", "--out-dir", str(tmp_path), "--plain"]
    argv = base + ["--matmul", "--matmul-size", "64", "--gsm8k", "--name", "g", "--dtype", "float64"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "extrapolated from 3 steps" in out and "compute floor" in out
    rec = json.loads((tmp_path / "g.json").read_text())
    assert rec["model"]["dtype"] == "float64" and rec["model"]["scale_down"]
    assert bench.PRESETS["llada-8b"].dtype == "bfloat16" and bench.SCALE_DOWN.get("dtype", "bfloat16") == "bfloat16"
    assert [(c["gen_length"], c["batch"]) for c in rec["runs"]] == [(256, 1), (256, 2)]
    for cell in rec["runs"]:
        assert list(cell["decoders"]) == list(bench.GPU_METHODS)
        d = cell["decoders"]["llada"]
        assert d["extrapolated"] and d["steps_timed"] == 3 and d["nfe"] == 256
        assert cell["decoders"]["conv"]["nfe"] == 64
        (eq,) = cell["equivalence"]
        assert eq["steps_compared"] == 3 and not eq["complete"] and eq["identical"]
    g = rec["gsm8k"]
    assert g["measured_batch"] == 2 and g["batches"] == 660 and g["floor_s"] > 0 and g["extrapolated_s"] > 0
    assert bench.main(["--summary", str(tmp_path / "g.json")]) == 0  # gpu.sh's compact table
    summary = capsys.readouterr().out
    assert "ref-conv" in summary and "GSM8K-shaped compute floor" in summary

    # a spent time budget skips every decoder; the 8B preset refuses the CPU without --scale-down
    assert bench.main(base + ["--budget-s", "0.001", "--name", "b"]) == 0
    rec = json.loads((tmp_path / "b.json").read_text())
    assert all("skipped" in d for c in rec["runs"] for d in c["decoders"].values())
    assert bench.main(["--preset", "llada-8b", "--device", "cpu"]) == 2


@pytest.mark.parametrize("method,steps,extra", [
    ("llada", 16, dict(block_length=32)), ("threshold", 64, dict(block_length=32, threshold=0.9)),
    ("llada_conv", 16, dict(kernel_size=17)),
])
def test_plain_confidence_loops_equal_difflm_greedy(tiny, method, steps, extra):
    """The sampler regime's plain per-row float64 loops commit what difflm's greedy decoders commit
    (float32 tiny Llama, batch 2, left padding on row 0)."""
    model, ids, p = tiny
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, p.vocab - 2, (2, 16), generator=g)
    am = torch.ones_like(prompt)
    am[0, :4] = 0
    prompt[0, :4] = ids["eos_id"]
    x_ref, nfe_ref = ref.plain_confidence_generate(
        model, prompt, method=method, steps=steps, gen_length=64, mask_id=ids["mask_id"], attention_mask=am,
        **{k: v for k, v in extra.items()},
    )
    cfg = DecodeConfig(method=method, gen_length=64, steps=steps, temperature=0.0, **extra)
    out = generate(model, prompt, cfg, mask_id=ids["mask_id"], eos_id=ids["eos_id"], attention_mask=am)
    assert nfe_ref == out.nfe
    assert not (x_ref == ids["mask_id"]).any()
    assert torch.equal(out.sequences, x_ref)


@pytest.mark.parametrize("method", ["categorical", "topk", "conv", "semi_ar", "remdm"])
def test_plain_mass_loops_decode_everything(tiny, method):
    """The plain mass loops run every method to the end: no MASK left, no MASK token drawn as a word."""
    model, ids, p = tiny
    prompt = torch.randint(0, p.vocab - 2, (2, 8), generator=torch.Generator().manual_seed(3))
    x, nfe = ref.plain_mass_generate(
        model, prompt, method=method, steps=8, gen_length=32, mask_id=ids["mask_id"], top_k=2, block_length=16,
        kernel_size=9, generator=torch.Generator().manual_seed(0),
    )
    assert 1 <= nfe <= 8 and x.shape == (2, 40) and not (x == ids["mask_id"]).any()
    assert torch.equal(x[:, :8], prompt)


def test_sampler_regime_runs_and_checks_greedy_tokens(tmp_path, capsys):
    mod = _load("difflm_bench_sampler", BENCH_DIR / "sampler_regime.py")
    argv = ["--vocab", "512", "--batch", "1", "2", "--gen-length", "32", "--steps", "8", "--repeats", "1",
            "--min-seconds", "0", "--name", "s", "--out-dir", str(tmp_path)]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("IDENTICAL") == 6 and "MISMATCH" not in out
    rec = json.loads((tmp_path / "s.json").read_text())
    assert {(r["method"], r["batch"]) for r in rec["rows"]} == {(m, b) for m in mod.METHODS for b in (1, 2)}
    assert all(r["difflm_s"] > 0 and r["plain_s"] > 0 and r["difflm_nfe"] >= 1 for r in rec["rows"])
    assert all(r["clock"] == "cpu" and r["calls"] == 1 and r["speedup_pairs_q1"] <= r["speedup_pairs_q3"]
               for r in rec["rows"]) and rec["machine"]["torch_threads"] == 1
    # more interleaved calls until each side has --min-seconds of them, at most --max-repeats (greedy methods)
    argv = ["--vocab", "512", "--batch", "1", "--gen-length", "32", "--steps", "8", "--methods", "llada", "topk",
            "--repeats", "2", "--max-repeats", "3", "--min-seconds", "100", "--clock", "wall", "--name", "w",
            "--out-dir", str(tmp_path)]
    assert mod.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "w.json").read_text())["rows"]}
    assert rows["llada"]["calls"] == 3 and len(rows["llada"]["plain_s_all"]) == 3 and rows["topk"]["calls"] == 1
    assert rows["llada"]["speedup"] == rows["llada"]["speedup_wall"]
    assert mod.main(["--threads", "2", "--out-dir", str(tmp_path)]) == 2  # CPU time of 2 threads is not wall time


def test_bench_exit_status_1_when_a_decoder_fails(tmp_path, monkeypatch, capsys):
    """README: exit status 1 if a decoder failed, its row saying why; the other decoders still run."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(more lines)")

    monkeypatch.setattr(bench.ref, "llada_generate", out_of_memory)
    argv = ["--preset", "tiny", "--gen-length", "16", "--steps", "4", "--repeats", "1", "--dtype", "float64",
            "--methods", "llada", "ref-llada", "conv", "--name", "f", "--out-dir", str(tmp_path), "--plain"]
    assert bench.main(argv) == 1
    assert "ref-llada: RuntimeError: CUDA out of memory" in capsys.readouterr().err
    (cell,) = json.loads((tmp_path / "f.json").read_text())["runs"]
    dec = cell["decoders"]
    assert dec["ref-llada"] == {"impl": "reference", "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert dec["llada"]["nfe"] == 16 and dec["conv"]["nfe"] > 0  # the others ran
    assert cell["equivalence"] == [] and cell["comparisons"] == []  # nothing to compare the failed one with


@pytest.mark.slow
def test_serve_throughput_runs_both_servers(tmp_path):
    """bench/serve_throughput.py end to end in a tiny configuration (two real servers as subprocesses): exit
    status 0, every request answered, one-at-a-time really ran batches of one, the streamed probes saw a step
    event, and the JSON has what the README names. Speed is not checked."""
    cmd = [sys.executable, str(BENCH_DIR / "serve_throughput.py"), "--clients", "3", "--requests", "2",
           "--rounds", "2", "--gen-length", "8", "--steps", "4", "--probes", "1", "--max-batch", "4", "--name", "q",
           "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batched / one-at-a-time:" in done.stdout
    rec = json.loads((tmp_path / "q.json").read_text())
    assert set(rec["modes"]) == {"batched", "one-at-a-time"}
    assert set(rec["ratio"]) == {"requests_per_s", "tokens_per_s", "requests_per_s_per_round",
                                 "requests_per_s_median_round", "server_cpu_per_request"}
    assert rec["ratio"]["requests_per_s"] > 0 and len(rec["ratio"]["requests_per_s_per_round"]) == 2
    for label, m in rec["modes"].items():
        assert m["requests"] == m["ok"] == 12 and m["errors"] == [] and len(m["rounds"]) == 2
        assert m["engine_rows"] >= 12 and 1 <= m["max_batch_seen"] <= (4 if label == "batched" else 1)
        assert m["tokens_per_s"] == pytest.approx(m["completion_tokens"] / m["wall_s"])
        assert 0 < m["latency_p50_s"] <= m["latency_p95_s"] and m["server_cpu_s_per_request"] > 0
        idle = m["ttfe_idle"]
        assert idle["n"] == 1 and idle["samples"][0]["error"] is None
        assert 0 < idle["first_step_s"] <= idle["total_s"]
    assert rec["modes"]["one-at-a-time"]["mean_batch"] == 1.0


def test_serve_throughput_exit_status(tmp_path):
    """Bad options: 2 (argparse); a server that refuses its options: 1, with the reason in the JSON."""
    script = str(BENCH_DIR / "serve_throughput.py")
    bad = subprocess.run([sys.executable, script, "--clients", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--clients must be >= 1" in bad.stderr
    cmd = [sys.executable, script, "--decode", "no-such-method", "--name", "e", "--out-dir", str(tmp_path),
           "--startup-s", "120"]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert failed.returncode == 1, failed.stderr[-2000:]
    rec = json.loads((tmp_path / "e.json").read_text())
    assert "the server (--max-batch 32) exited (2)" in rec["error"] and rec["modes"] == {}


def test_compile_effect_runs_and_records_each_variant(tmp_path, capsys):
    """bench/compile_effect.py at tiny sizes (one method, one compiled variant: the compile is the cost): exit 0
    with greedy tokens unchanged, the JSON rows and fields the README reads, the library's functions restored."""
    mod = _load("difflm_bench_compile", BENCH_DIR / "compile_effect.py")
    eager = S._max_prob
    argv = ["--methods", "llada", "--vocab", "512", "--batch", "1", "--variants", "kernels", "--gen-length", "16",
            "--steps", "4", "--block-length", "16", "--repeats", "1", "--min-seconds", "0", "--name", "c",
            "--out-dir", str(tmp_path)]
    assert mod.main(argv) == 0
    assert S._max_prob is eager  # the wrapping lasts one call only
    rec = json.loads((tmp_path / "c.json").read_text())
    (row,) = rec["rows"]
    assert (row["method"], row["vocab"], row["batch"], row["calls"]) == ("llada", 512, 1, 1)
    d = row["variants"]["kernels"]
    assert d["identical_tokens"] == 1.0 and d["s"] > 0 and d["first_call_wall_s"] > 0 and d["first_call_graphs"] >= 1
    assert d["graph_breaks"] == 0 and rec["machine"]["torch_threads"] == 1 and "elapsed_s" in rec
    # the eager alternative the README measures: candidates' logsumexp in chunks of rows, the same values bit for bit
    z = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0))
    for got, want in zip(mod.chunked_candidates(z, 3, 0.7, rows=3), S.candidates(z, 3, 0.7)):
        assert torch.equal(got, want)
