"""`difflm serve` under hostile and careful use (issue 20): every bad request a one-line OpenAI 400, answers that
`difflm generate` reproduces, a shutdown that answers every client, and idle sockets that do not pile up.

The server is the one `difflm serve` runs (`build_server`: its uvicorn protocol and shutdown), in a thread on a
port the OS picks, with the embedded tiny-math model. Comparisons with `difflm generate` are of the same
computation (one prompt length, the same batch shape, float32 on both sides), so they are exact.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")

from fastapi.routing import APIRoute  # noqa: E402

from difflm.decoding.config import DecodeConfig  # noqa: E402
from difflm.serve.app import ServeSettings, build_server, create_app  # noqa: E402
from difflm.serve.protocol import Limits  # noqa: E402
from difflm.testing import server_in_thread  # noqa: E402

ROOT = Path(__file__).parents[1]
KEY = "sk-hostile"
T = 60.0  # every client call is bounded: a hang fails the test instead of stalling the suite
DEFAULTS = DecodeConfig(method="conv", gen_length=16, steps=8, seed=5)
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "What is 2 plus 2?"}]
AUTH = {"Authorization": f"Bearer {KEY}"}
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:\n")  # written out here, not taken from difflm


@pytest.fixture(scope="module")
def model():
    from difflm.models import load_model

    return load_model("tiny-math", device="cpu")  # float32, as `difflm generate` loads it


@contextlib.contextmanager
def served(model, **kw):
    settings = ServeSettings(decode=kw.pop("decode", DEFAULTS), model_id="tiny-math", **kw)
    server = build_server(model, settings, port=0, log_level="warning")
    with server_in_thread(server) as url:
        yield url, server


@pytest.fixture(scope="module")
def srv(model):
    with served(model, api_key=KEY, header_timeout_s=0.5, limits=Limits(max_tokens=64)) as (url, server):
        yield url, server


def post(url, path, body, *, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                       timeout=T, **kw)


def error_of(r, status: int, param="any") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"], err
    if param != "any":
        assert err["param"] == param, err
    return err


def client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=T, max_retries=0)


def stream_events(r) -> list:
    """The SSE `data:` payloads of a finished response (parsed JSON, or the string "[DONE]")."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in r.text.splitlines() if line.startswith("data: ")]


# -- items 1-5: bodies that once gave a 500, or were wrongly accepted --------------------------------------
HOSTILE = [
    # 1. steps unbounded: 4 x max_tokens by default (--max-steps-per-token)
    ("steps ten million", CHAT, {"messages": MSG, "max_tokens": 8, "steps": 10_000_000}, "steps"),
    ("steps 10**12", CHAT, {"messages": MSG, "max_tokens": 8, "steps": 10**12}, "steps"),
    ("steps just over the cap", COMP, {"prompt": "hi", "max_tokens": 8, "steps": 33}, "steps"),
    # 2. nesting deeper than Python's stack: a RecursionError, once a 500
    ("deep array", CHAT, b"[" * 100_000 + b"]" * 100_000, None),
    ("deep in a field", CHAT, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
    # 3. lone surrogates: valid JSON, not text (the tokenizer raised)
    ("lone surrogate in a message", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("lone surrogate in a prompt", COMP, b'{"prompt": ["ok", "a\\udfffb"]}', "prompt[1]"),
    ("lone surrogate in a stop string", COMP, b'{"prompt": "hi", "stop": "\\ud800"}', "stop"),
    # 4. max_completion_tokens 0 was read as "absent" (an `or`)
    ("max_completion_tokens 0", CHAT, {"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    # 5. non-finite numbers anywhere
    ("temperature 1e400", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
     "temperature"),
    ("-1e400 in stream_options", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], '
                                       b'"stream_options": {"include_usage": -1e400}}', "stream_options.include_usage"),
    # 6. top_p only where a decoder reads it (nucleus); conv draws from every token
    ("top_p with conv", CHAT, {"messages": MSG, "top_p": 0.5}, "top_p"),
    ("top_p with llada", CHAT, {"messages": MSG, "decode": "llada", "top_p": 0.05}, "top_p"),
]


@pytest.mark.parametrize("name,path,body,param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_is_a_one_line_400(srv, name, path, body, param):
    url, _ = srv
    error_of(post(url, path, body), 400, param)


def test_a_body_as_deep_as_the_parser_takes_is_served(srv):
    """Nesting the JSON parser still takes (in an ignored field): the checks after parsing must not recurse."""
    url, _ = srv
    deep = next(d for d in range(2000, 0, -10) if _parses(b"[" * d + b"]" * d))
    body = b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * deep + b"]" * deep + b"}"
    r = post(url, CHAT, body)
    assert r.status_code == 200, r.text[:300]


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except RecursionError:
        return False


def test_limits_hold_at_their_edge(srv):
    """Right at the caps the requests are served: steps = 4 x max_tokens, max_completion_tokens 4, top_p 1."""
    url, _ = srv
    r = post(url, COMP, {"prompt": "hi", "max_tokens": 8, "steps": 32})
    assert r.status_code == 200 and r.json()["choices"][0]["difflm"]["steps"] <= 32, r.text  # may end early
    r = post(url, CHAT, {"messages": MSG, "max_completion_tokens": 4, "top_p": 1.0, "stream": True, "denoise": True})
    steps = [e["difflm"] for e in stream_events(r) if isinstance(e, dict) and (e.get("difflm") or {}).get("type") == "step"]
    assert steps and {s["length"] for s in steps} == {4}  # max_completion_tokens is the canvas length


@pytest.mark.parametrize("key,value", [("total_length", 48), ("leading_eos", True)])
def test_a_whole_canvas_setting_is_not_a_request_field(srv, key, value):
    """total_length / leading_eos are generate's batch canvas; a request sets its answer length by max_tokens."""
    url, _ = srv
    r = post(url, COMP, {"prompt": "hi", "max_tokens": 8, key: value})
    assert r.status_code == 400 and key in r.json()["error"]["message"], r.text


def test_top_p_is_refused_by_generate_as_by_serve(tmp_path):
    """One rule (DecodeConfig.validate): `generate --top-p 0.5 --decode conv` exits 2 with one line."""
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["generate", "-m", "tiny-math", "-p", "hi", "--decode", "conv", "--top-p", "0.5",
                                   "-o", str(tmp_path / "o.json")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "top_p" in lines[0], res.output


@pytest.mark.parametrize("method", sorted(__import__("difflm.decoding.methods", fromlist=["REGISTRY"]).REGISTRY))
def test_top_p_applies_only_where_a_decoder_reads_it(method):
    """Over the registry (a new decoder is covered): a decoder that reads top_p takes any p and defaults to 0.95
    (nucleus) or off (dream, as Dream's own code); every other one takes only 1 or unset and refuses the rest,
    naming top_p."""
    from difflm.decoding.methods import REGISTRY
    from difflm.errors import ConfigError

    DecodeConfig(method=method, top_p=1.0).validate()
    if REGISTRY[method].top_p:
        DecodeConfig(method=method, top_p=0.3).validate()
        assert DecodeConfig(method=method).effective_top_p() == (0.95 if REGISTRY[method].kind == "ar" else 1.0)
    else:
        with pytest.raises(ConfigError) as err:
            DecodeConfig(method=method, top_p=0.3).validate()
        assert err.value.key == "top_p"
        assert DecodeConfig(method=method).effective_top_p() == 1.0


# -- the key on every route: parametrised over the app's route table ---------------------------------------
PUBLIC = {"/", "/health"}  #: the page and the health check need no key (README); everything else does
ROUTES = sorted((r.path, m) for r in create_app(types.SimpleNamespace(), ServeSettings()).routes
                if isinstance(r, APIRoute) for m in r.methods)


@pytest.mark.parametrize("path,method", ROUTES, ids=[f"{m} {p}" for p, m in ROUTES])
def test_every_route_but_the_page_and_health_needs_the_key(srv, path, method):
    url, _ = srv
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx2.request(method, url + path, headers=headers, timeout=T)
        if path in PUBLIC:
            assert r.status_code == 200, (path, method, r.status_code)
        else:
            assert error_of(r, 401)["type"] == "authentication_error"
    r = httpx2.request(method, url + path, headers=AUTH, timeout=T, json={})
    assert r.status_code != 401, (path, method)


def test_head_of_the_page_and_health(srv):
    url, _ = srv
    assert httpx2.head(url + "/", timeout=T).status_code == 200  # curl -I
    assert httpx2.head(url + "/health", timeout=T).status_code == 200


# -- item 8 and the stop strings: the earliest match, streamed and not, and usage counts what is returned -----
def _answer(url: str, **body) -> tuple[str, list[int], dict]:
    """(text, token ids, usage) of a streamed completion, from its done event and its usage chunk."""
    body = {"prompt": "Tom has 5 apples and buys 7 more. How many?", "seed": 7, "max_tokens": 32, "stream": True,
            "stream_options": {"include_usage": True}, **body}
    r = post(url, COMP, body)
    assert r.status_code == 200, r.text
    events = stream_events(r)
    assert events[-1] == "[DONE]"
    done = next(e["difflm"] for e in events if isinstance(e, dict) and (e.get("difflm") or {}).get("type") == "done")
    text = "".join(c["text"] for e in events if isinstance(e, dict) for c in e["choices"])
    usage = next(e["usage"] for e in events if isinstance(e, dict) and e.get("usage"))
    return text, done["token_ids"][: done["content_tokens"]], usage


def test_several_stop_strings_cut_at_the_earliest_match_streamed_and_not(srv, model):
    url, _ = srv
    full, ids, usage = _answer(url)
    assert usage["completion_tokens"] == len(ids) and len(full) >= 8, full
    early = full[1:3]
    at = full.find(early)
    late = next(full[k : k + 2] for k in range(len(full) - 2, 2, -1) if full.find(full[k : k + 2]) > at)
    stops = [late, early]  # the later match listed first: the cut is at the earliest match, not the first listed
    want = full[: min(full.find(s) for s in stops)]
    assert len(want) < full.find(late)
    streamed, _, usage = _answer(url, stop=stops)
    plain = post(url, COMP, {"prompt": "Tom has 5 apples and buys 7 more. How many?", "seed": 7, "max_tokens": 32,
                             "stop": stops}).json()
    assert streamed == want == plain["choices"][0]["text"]
    assert plain["choices"][0]["finish_reason"] == "stop"
    # usage: the fewest answer tokens whose text covers what was returned (a linear scan here)
    tok = model.tokenizer
    m = next(k for k in range(len(ids) + 1) if len(tok.decode(ids[:k], skip_special_tokens=True)) >= len(want))
    assert usage["completion_tokens"] == plain["usage"]["completion_tokens"] == m < len(ids)


# -- items 11-13: seeds, and the same answer as `difflm generate` --------------------------------------------
def _generate_cli(tmp_path, *args) -> list[str]:
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / f"gen-{len(list(tmp_path.iterdir()))}.json"
    res = CliRunner().invoke(app, ["generate", "-m", "tiny-math", "--decode", "conv", "--gen-length", "16",
                                   "--steps", "8", "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return [r["output"] for r in json.loads(out.read_text())]


def test_a_request_without_seed_uses_the_servers_and_reports_it(srv):
    url, _ = srv
    c = client(url)
    unseeded = c.chat.completions.create(model="tiny-math", messages=MSG, n=2)
    seeded = c.chat.completions.create(model="tiny-math", messages=MSG, n=2, seed=DEFAULTS.seed)
    assert [ch.model_extra["difflm"]["seed"] for ch in unseeded.choices] == [DEFAULTS.seed] * 2
    assert [ch.message.content for ch in unseeded.choices] == [ch.message.content for ch in seeded.choices]
    other = c.chat.completions.create(model="tiny-math", messages=MSG, n=2, seed=DEFAULTS.seed + 1)
    assert [ch.message.content for ch in other.choices] != [ch.message.content for ch in seeded.choices]


def test_generate_p_and_the_server_agree_on_prompt_and_seed(srv, tmp_path):
    """`generate -p Q -p Q --seed 9` (alpaca; and chat, which is alpaca on a model without a template) equals the
    server's chat answer to Q with n=2, seed 9; `--prompt-format raw` equals /v1/completions."""
    url, _ = srv
    q = "Ana has 3 pens and buys 4 more. How many pens?"
    c = client(url)
    chat = [ch.message.content for ch in c.chat.completions.create(model="tiny-math", n=2, seed=9,
                                                                     messages=[{"role": "user", "content": q}]).choices]
    assert chat[0] != chat[1]  # the two choices have their own seeds, as generate's two prompts do
    assert _generate_cli(tmp_path, "-p", q, "-p", q, "--seed", "9") == chat
    assert _generate_cli(tmp_path, "-p", q, "-p", q, "--seed", "9", "--prompt-format", "chat") == chat  # item 13
    comp = [ch.text for ch in c.completions.create(model="tiny-math", prompt=q, n=2, seed=9).choices]
    assert _generate_cli(tmp_path, "-p", q, "-p", q, "--seed", "9", "--prompt-format", "raw") == comp


def test_a_multi_turn_chat_is_decoded_from_every_message(srv, model):
    """The whole conversation reaches the model (system message and history): the server's answer equals
    `generate` on the transcript prompt written out by hand, and differs from the answer without them."""
    import torch

    from difflm.decoding import generate
    from difflm.data.prompts import encode_text
    from difflm.generation import decode_output
    from difflm.seeding import item_seed

    url, _ = srv
    convo = [{"role": "system", "content": "Answer with a number."},
             {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "And 4 more?"}]
    instruction = "System: Answer with a number.\nUser: What is 2 plus 3?\nAssistant: 5\nAnd 4 more?"
    ids = encode_text(model.tokenizer, ALPACA.format(instruction))
    cfg = DecodeConfig(method="conv", gen_length=16, steps=8, seed=3)
    out = generate(model, torch.tensor([ids]), cfg, row_seeds=[item_seed(3, "prompt-0")])
    want = decode_output(model, out.sequences[0, out.prompt_length:].tolist())[0]

    def ask(messages):
        r = post(url, CHAT, {"messages": messages, "seed": 3})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    got = ask(convo)
    assert got == want
    assert ask(convo[-1:]) != got and ask(convo[1:]) != got  # the history and the system message matter


# -- item 7: shutdown past the grace period --------------------------------------------------------------
def test_shutdown_answers_every_client_with_an_openai_error(model):
    """In-flight (a whole answer and a stream) and queued requests when the grace period runs out: the first and
    the queued get a 503 JSON error, the stream an error event and then [DONE]; no plain-text 500, no cut."""
    settings = ServeSettings(decode=DEFAULTS, model_id="tiny-math", max_batch=4, window_ms=300)
    server = build_server(model, settings, port=0, log_level="critical", graceful_s=0.2, drain_s=30)
    entered = threading.Event()
    engine = server.config.app.state.engine

    def hold():  # the running batch waits for the engine's stop (bounded), as a slow model would
        entered.set()
        for _ in range(600):
            if engine._stopping:
                return
            time.sleep(0.05)

    handle = model.module.register_forward_hook(lambda *a: hold())
    try:
        with server_in_thread(server) as url, ThreadPoolExecutor(3) as pool:
            body = {"messages": MSG, "seed": 1}
            whole = pool.submit(post, url, CHAT, body, key=None)
            streamed = pool.submit(post, url, CHAT, {**body, "stream": True}, key=None)
            assert entered.wait(T)
            queued = pool.submit(post, url, CHAT, {**body, "steps": 4}, key=None)  # other settings: queued
            for _ in range(600):
                if engine.stats().queued_rows:
                    break
                time.sleep(0.02)
            assert engine.stats().queued_rows == 1 and engine.stats().running_rows == 2
            server.should_exit = True
            w, s, q = (f.result(timeout=T) for f in (whole, streamed, queued))
    finally:
        handle.remove()
    assert error_of(w, 503)["type"] == "server_error"
    assert error_of(q, 503)["type"] == "server_error"
    assert s.status_code == 200  # the stream had begun: its error is an event
    events = stream_events(s)
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "the server is shutting down", events[-3:]


# -- item 9: connections that never finish their headers ---------------------------------------------------
def _closed_by_server(url: str, send: bytes, then: bytes = b"") -> bool:
    """Connect, send `send`, read its answer if it is a whole request, send `then` (part of a request), and
    wait (socket timeout 20 s) for the server to close the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        if send:
            s.sendall(send)
            if send.endswith(b"\r\n\r\n"):
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(65536)
                assert data.startswith(b"HTTP/1.1 200"), data[:80]
        if then:
            s.sendall(then)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return True
        except socket.timeout:
            return False


def test_connections_without_complete_headers_are_closed(srv):
    url, _ = srv  # header_timeout_s = 0.5
    assert _closed_by_server(url, b"")  # connected, sends nothing
    assert _closed_by_server(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")  # headers never end
    # a keep-alive connection: answered once, then part of a second request's headers
    assert _closed_by_server(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /health HTTP/1.1\r\nHo")
    assert httpx2.get(url + "/health", timeout=T).status_code == 200  # and the server serves on


# -- item 10: `chat --url` with only the serve extra -----------------------------------------------------
def test_the_serve_extra_brings_what_serve_and_chat_import():
    """Every third-party module that difflm/serve, cli/serve.py and cli/chat.py import is a core requirement or
    in the `serve` extra (a venv with `difflm[serve]` runs `serve` and `chat --url`)."""
    import ast
    import configparser
    import sys

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def names(text: str) -> set[str]:
        reqs = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("!")[0].split("~")[0]
                .strip().lower().replace("-", "_") for r in reqs}

    have = names(cfg["options"]["install_requires"]) | names(cfg["options.extras_require"]["serve"])
    files = [*sorted((ROOT / "difflm" / "serve").glob("*.py")), ROOT / "cli" / "serve.py", ROOT / "cli" / "chat.py"]
    imported = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third = {m for m in imported if m not in sys.stdlib_module_names and m not in ("difflm", "cli", "__future__")}
    alias = {"yaml": "pyyaml"}
    missing = sorted(m for m in third if alias.get(m, m).lower() not in have)
    assert not missing, f"imported by serve/chat but in neither install_requires nor the serve extra: {missing}"
    assert {"openai", "httpx2", "fastapi", "uvicorn", "h11"} <= third  # what the check above is about


def test_a_missing_optional_module_is_one_line_naming_pip(monkeypatch):
    """`chat --url` without openai: one line with the pip command, no traceback."""
    import sys

    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ModuleNotFoundError
    res = CliRunner().invoke(app, ["chat", "--url", "http://127.0.0.1:9"], input="hi\n")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "openai" in lines[0] and "pip install 'difflm[serve]'" in lines[0] and "Traceback" not in res.output
