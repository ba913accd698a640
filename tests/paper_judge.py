"""A loopback OpenAI-compatible judge for the paper tables' CPU smoke runs (tests/test_paper_tables.py,
`bench/paper_tables.py --judge local`).

It speaks `POST /v1/chat/completions` with `logprobs` / `top_logprobs`, as alpaca_eval's default annotator
(`weighted_alpaca_eval_gpt4_turbo`: one token, "m" or "M", read from the top log-probabilities) asks, and
decides by a fixed rule: the longer of the two outputs is preferred with probability `p_longer` (0.9), the
same length gives 0.5. So a test can compute the expected preference without it.

Note for the integrator: branch i17 writes a judge server of the same kind for its own tests; the two can
become one helper (e.g. in difflm.testing).
"""

import math
import re
import time

__all__ = ["judge_app", "preference", "serve_judge"]

_OUTPUT = re.compile(r'"model_identifier":\s*"(m|M)",\s*"output":\s*"""(.*?)"""\s*\}', re.S)


def preference(output_1: str, output_2: str, p_longer: float = 0.9) -> float:
    """P(the judge prefers output_1, identifier "m"): `p_longer` when it is longer (characters), 0.5 on a tie."""
    if len(output_1) == len(output_2):
        return 0.5
    return p_longer if len(output_1) > len(output_2) else 1.0 - p_longer


def judge_app(p_longer: float = 0.9):
    """The FastAPI app. Requests it cannot parse get the 0.5 answer (never an error: the annotator retries)."""
    from fastapi import FastAPI, Request  # (no `from __future__ import annotations` here: FastAPI reads the types)

    app = FastAPI()
    app.state.calls = 0

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        app.state.calls += 1
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user")
        found = dict((ident, out) for ident, out in _OUTPUT.findall(text))
        p = preference(found["m"], found["M"], p_longer) if {"m", "M"} <= set(found) else 0.5
        token = "m" if p >= 0.5 else "M"
        top = [{"token": "m", "logprob": math.log(p), "bytes": [109]},
               {"token": "M", "logprob": math.log(1.0 - p), "bytes": [77]}]
        top.sort(key=lambda t: -t["logprob"])
        return {
            "id": f"judge-{app.state.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test-judge"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": token},
                "logprobs": {"content": [{"token": token, "logprob": max(t["logprob"] for t in top),
                                          "bytes": [ord(token)], "top_logprobs": top}]},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 1, "total_tokens": len(text) // 4 + 1},
        }

    return app


def serve_judge(p_longer: float = 0.9):
    """Context manager: the judge on 127.0.0.1 (a free port); yields its base URL ending in /v1."""
    import contextlib

    from difflm.testing import app_in_thread

    @contextlib.contextmanager
    def cm():
        with app_in_thread(judge_app(p_longer)) as url:
            yield url + "/v1"

    return cm()
