"""A stand-in OpenAI-compatible judge for the tests (FastAPI on uvicorn, loopback, port 0).

    python tests/judge_server.py --p-longer 0.9 [--log FILE] [--die-after N]

Prints its port on the first line of stdout, then serves ``POST /v1/chat/completions`` the way alpaca_eval's
``weighted_alpaca_eval_gpt4_turbo`` annotator asks (one token, ``logprobs: true``, ``top_logprobs``): it finds
the two outputs labelled ``m`` and ``M`` in the prompt and answers the label of the LONGER one (characters),
with top logprobs log(P) for it and log(1 - P) for the other (P = --p-longer). So the annotator's preference
for a pair is exactly P for the longer output (`preference`): a rule a test can compute on its own. Two
outputs of the same length, or a prompt it cannot read, get 0.5 for each label.

Each answered request appends one JSON line to --log (instruction, model, Authorization header). With
--die-after N the process exits abruptly (os._exit) on the request after the N-th answer: a judge killed
half-way. A request without logprobs gets HTTP 400; with --no-logprobs the answers carry none.

In-process use (tests/test_paper_tables.py, `bench/paper_tables.py --judge local`): ``serve_judge()`` runs
the same app in a thread and yields its base URL (ending in /v1). tests/test_eval_judge.py runs the script.
"""

import argparse
import json
import math
import os
import re
import socket
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

OUTPUTS = re.compile(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', re.S)
INSTRUCTION = re.compile(r'"instruction": """(.*?)""",', re.S)


def preference(output_1: str, output_2: str, p_longer: float = 0.9) -> float:
    """P(the judge prefers output_1, label "m"): `p_longer` when it is the longer one, 0.5 on a tie."""
    if len(output_1) == len(output_2):
        return 0.5
    return p_longer if len(output_1) > len(output_2) else 1.0 - p_longer


def make_app(p_longer: float = 0.9, log_path: str | None = None, die_after: int | None = None,
             no_logprobs: bool = False):
    app = FastAPI()
    lock = threading.Lock()
    state = {"answered": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if not body.get("logprobs") or (body.get("top_logprobs") or 0) < 2:
            return JSONResponse({"error": {"message": "this judge answers with logprobs only"}}, status_code=400)
        text = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
        outs = dict(OUTPUTS.findall(text))
        p_m = preference(outs["m"], outs["M"], p_longer) if {"m", "M"} <= set(outs) else 0.5
        best = "m" if p_m >= 0.5 else "M"
        other = "M" if best == "m" else "m"
        p_best = max(p_m, 1.0 - p_m)
        with lock:
            if die_after is not None and state["answered"] >= die_after:
                os._exit(3)  # killed half-way: no answer, the connection drops
            state["answered"] += 1
            if log_path:
                instruction = INSTRUCTION.search(text)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"instruction": instruction.group(1) if instruction else None,
                                        "model": body["model"],
                                        "authorization": request.headers.get("authorization")}) + "\n")
        if no_logprobs:  # a server that ignores the logprobs request
            return {"id": "judge", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                                 "message": {"role": "assistant", "content": best}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        top = [{"token": best, "logprob": math.log(p_best), "bytes": None},
               {"token": other, "logprob": math.log(1 - p_best), "bytes": None}]
        return {
            "id": f"judge-{state['answered']}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{
                "index": 0, "finish_reason": "length",
                "message": {"role": "assistant", "content": best},
                "logprobs": {"content": [{"token": best, "logprob": top[0]["logprob"], "bytes": None,
                                          "top_logprobs": top}]},
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


def serve_judge(p_longer: float = 0.9, log_path: str | None = None):
    """Context manager: the judge in a thread on 127.0.0.1 (a free port); yields its base URL ending in /v1."""
    import contextlib

    from difflm.testing import app_in_thread

    @contextlib.contextmanager
    def cm():
        with app_in_thread(make_app(p_longer, log_path)) as url:
            yield url + "/v1"

    return cm()


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--p-longer", type=float, default=0.9)
    ap.add_argument("--log", default=None)
    ap.add_argument("--die-after", type=int, default=None)
    ap.add_argument("--no-logprobs", action="store_true")
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(make_app(args.p_longer, args.log, args.die_after, args.no_logprobs), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
