"""Shared pytest fixtures: tiny checkpoints built once per session (each in well under a second)."""

import os
import re
from pathlib import Path

import pytest

# Never reach for the Hub in tests (a miss otherwise costs ~50 s of retries), even when pytest runs bare.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tests use tiny matrices: one thread is as fast, and far faster when other processes load the CPUs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory) -> Path:
    """A random tiny checkpoint in LLaDA's own format, with the tiny tokenizer."""
    from difflm.testing import build_tiny_llada_checkpoint

    return build_tiny_llada_checkpoint(tmp_path_factory.mktemp("tiny_llada"))


@pytest.fixture(scope="session")
def tiny_native_llada_dir(tmp_path_factory) -> Path:
    """The same model in difflm's native bidirectional-Llama format."""
    from difflm.testing import build_tiny_native_llada

    return build_tiny_native_llada(tmp_path_factory.mktemp("tiny_native_llada"))


# -- AlpacaEval without an API: a fake judge (tests/test_eval_alpaca.py, tests/test_smollm2.py) -------------
_OUTPUTS = re.compile(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', re.S)


def _fake_openai_completions(prompts, model_name, **kwargs):
    """A judge that prefers the longer output (answers 'm' for output_1, 'M' for output_2, with logprobs)."""
    comps = []
    for p in prompts:
        outs = dict(_OUTPUTS.findall(p))
        best = "m" if len(outs["m"]) > len(outs["M"]) else "M"
        other = "M" if best == "m" else "m"
        top = [{"token": best, "logprob": 0.0}, {"token": other, "logprob": -30.0}]
        comps.append({"text": best, "total_tokens": 1, "logprobs": {"content": [{"token": best, "logprob": 0.0,
                                                                                  "top_logprobs": top}]}})
    n = len(prompts)
    return {"completions": [c["text"] for c in comps], "completions_all": comps,
            "price_per_example": [0.0] * n, "time_per_example": [0.0] * n}


@pytest.fixture
def fake_judge(monkeypatch):
    """alpaca_eval's OpenAI judge replaced by `_fake_openai_completions` (no network, no key)."""
    import alpaca_eval.decoders.openai as openai_decoder

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    monkeypatch.setattr(openai_decoder, "openai_completions", _fake_openai_completions)
