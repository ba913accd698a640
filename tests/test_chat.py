"""`difflm chat` as a user drives it: piped turns and commands, against a local model and against a running
`difflm serve` (in-process, loopback, free port), plus the session in-process (history, cancel, bad values)
and, where tmux exists, a real terminal (the live canvas, Ctrl-C during an answer)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from difflm.decoding.config import DecodeConfig
from difflm.errors import ConfigError
from difflm.testing import free_port

REPO = Path(__file__).resolve().parents[1]
CHAT = [sys.executable, "-m", "cli.main", "chat"]
TINY = ["-m", "tiny-math", "--device", "cpu", "--gen-length", "32", "--steps", "8"]
Q1, Q2 = "What is 2+3?", "And what is 4+4?"


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("DIFFLM_API_KEY", None)
    env.update(extra)
    return env


def _chat(args: list[str], lines: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([*CHAT, *args], input="".join(line + "\n" for line in lines), capture_output=True,
                          text=True, cwd=REPO, env=_env(**env), timeout=300)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny():
    from difflm.models import load_model

    return load_model("tiny-math", device="cpu")


def _local(tiny, **cfg):
    from difflm.serve.chat import ChatSession, LocalBackend

    return ChatSession(LocalBackend(tiny, name="tiny-math"), DecodeConfig(**{"gen_length": 32, "steps": 8, **cfg}))


# -- the real command, piped ---------------------------------------------------------------------------
def test_piped_local_chat_turns_commands_and_a_bad_value(tiny):
    script = [Q1, "/steps 16", "/decode llada", "/set block_length=16", "/steps 7", "/show", Q2, "/show",
              "/reset", "/show", "/quit", "never answered"]
    res = _chat([*TINY, "--seed", "3"], script)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    # the first answer is what the session decodes in-process with the same settings and seed
    session = _local(tiny, seed=3)
    first = session.ask(Q1).text
    assert first.strip() and first in out
    assert out.index(first) < out.index("set steps=16")
    assert "set decode=llada" in out and "set block_length=16" in out
    # the bad value: one error line, the REPL went on and kept the previous settings
    errs = _errors(res.stderr)
    assert len(errs) == 1 and "steps 7 is not divisible by the number of blocks 2" in errs[0], res.stderr
    shows = [line for line in out.splitlines() if line.startswith(("settings:", "history:"))]
    assert "decode=llada" in shows[0] and " steps=16 " in shows[0] and "block_length=16" in shows[0]
    assert shows[1] == "history: 1 turn"
    assert shows[3] == "history: 2 turns" and shows[5] == "history: 0 turns"
    # the second answer, under llada with blocks of 16 and 16 steps, continuing the conversation
    for cmd in ("/steps 16", "/decode llada", "/set block_length=16"):
        session.command(cmd)
    second = session.ask(Q2).text
    assert second.strip() and second in out[out.index(shows[1]):]
    assert res.stderr.count(" NFE, ") == 2  # two answers; nothing after /quit
    assert "never answered" not in out


def test_startup_errors_are_one_line_and_exit_2():
    res = _chat(["-m", "no-such-model-here", "--device", "cpu"], [Q1])
    assert res.returncode == 2 and len(_errors(res.stderr)) == 1, res.stderr
    res = _chat(["--url", f"http://127.0.0.1:{free_port()}"], [Q1])
    assert res.returncode == 2, res.stderr
    assert len(_errors(res.stderr)) == 1 and "cannot reach" in res.stderr and "Traceback" not in res.stderr


# -- the session in-process ----------------------------------------------------------------------------
def test_history_reaches_the_model(tiny):
    from difflm.data.prompts import conversation_ids

    session = _local(tiny, seed=1)
    a1 = session.ask(Q1)
    assert a1.text.strip()
    session.ask(Q2)
    ids = session.backend.last_prompt_ids
    convo = [{"role": "user", "content": Q1}, {"role": "assistant", "content": a1.text}, {"role": "user", "content": Q2}]
    assert ids == conversation_ids(tiny, convo)
    assert a1.text.strip() in tiny.tokenizer.decode(ids)
    session.command("/reset")
    session.ask(Q2)
    assert session.backend.last_prompt_ids == conversation_ids(tiny, [{"role": "user", "content": Q2}])


@pytest.mark.parametrize("line, words", [
    ("/steps 0", "steps"), ("/steps abc", "steps"), ("/set foo=1", "unknown decode setting"),
    ("/decode nope", "must be one of"), ("/decode nucleus", "nucleus"), ("/set kernel_size", "KEY=VALUE"),
    ("/set temperature=-1", "temperature"), ("/frobnicate", "unknown command"), ("/steps", "needs one value"),
])
def test_bad_commands_raise_one_line_and_change_nothing(tiny, line, words):
    session = _local(tiny)
    before = session.config
    with pytest.raises(ConfigError) as err:
        session.command(line)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert session.config == before


def test_set_changes_any_decode_field_and_aliases(tiny):
    session = _local(tiny)
    assert session.command("/set kernel_size=16 top_k=1 decode=topk") == "set decode=topk kernel_size=16 top_k=1"
    assert (session.config.method, session.config.kernel_size, session.config.top_k) == ("topk", 16, 1)
    session.command("/set max_tokens=64")
    assert session.config.gen_length == 64


def test_a_cancelled_answer_leaves_the_history_and_the_engine_usable(tiny):
    from difflm.serve.chat import Cancelled

    session = _local(tiny, gen_length=64, steps=64)
    stop, seen, cancelled, forwards = threading.Event(), [], threading.Event(), []

    def on_event(ev):
        seen.append(ev)
        stop.set()

    def on_forward(*_):  # from the second step on, the model waits until the answer was cancelled (bounded)
        forwards.append(1)
        if len(forwards) == 2:
            assert cancelled.wait(60)

    handle = tiny.module.register_forward_hook(on_forward)
    try:
        with pytest.raises(Cancelled):
            session.ask(Q1, on_event, stop)
        cancelled.set()
        engine = session.backend.engine
        for _ in range(600):  # bounded: until the engine has let the row go
            if engine.stats().running_rows == 0 and engine.stats().queued_rows == 0:
                break
            time.sleep(0.05)
        assert engine.stats().running_rows == 0 and engine.stats().queued_rows == 0
        n = len(forwards)
    finally:
        handle.remove()
    assert n < 8, n  # the row stopped at its next step (not the 64 steps; 8 is plenty for a step in flight)
    assert seen and session.messages == []
    assert session.ask(Q1).text == _local(tiny, gen_length=64, steps=64).ask(Q1).text


# -- against a running server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    from difflm.serve.app import ServeSettings, build_server
    from difflm.serve.protocol import Limits
    from difflm.testing import server_in_thread

    # steps_per_token: the terminal test's long decode (--steps 20000 for 64 tokens) is over the default cap of 4
    settings = ServeSettings(decode=DecodeConfig(gen_length=32, steps=8), model_id="tiny-math", api_key="sekret",
                             limits=Limits(steps_per_token=1000))
    with server_in_thread(build_server(tiny, settings, port=0, log_level="warning")) as url:
        yield url


def _server_answer(url: str, question: str, seed: int, **extra) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    r = client.chat.completions.create(model="tiny-math", messages=[{"role": "user", "content": question}], seed=seed,
                                       extra_body=extra)
    return r.choices[0].message.content


def test_url_chat_answers_as_the_server_does(server):
    expected = _server_answer(server, Q1, seed=5)
    expected_conv16 = _server_answer(server, Q1, seed=5, steps=16, kernel_size=8)
    res = _chat(["--url", server, "--seed", "5"], [Q1, "/show", "/reset", "/steps 16", "/set kernel_size=8", Q1,
                                                   "/decode nucleus", "/quit"], DIFFLM_API_KEY="sekret")
    assert res.returncode == 0, res.stderr
    assert expected.strip() and res.stdout.startswith(expected + "\n")
    assert f"backend: tiny-math at {server}/v1" in res.stdout
    assert res.stdout.count(expected_conv16) >= 1 and res.stdout.index("set kernel_size=8") < res.stdout.rindex(expected_conv16)
    errs = _errors(res.stderr)
    assert len(errs) == 1 and "nucleus" in errs[0], res.stderr


def test_url_chat_without_the_key_exits_2(server):
    res = _chat(["--url", server], [Q1])
    assert res.returncode == 2 and len(_errors(res.stderr)) == 1 and "API key" in res.stderr, res.stderr


def test_remote_backend_streams_the_canvas_and_keeps_the_history(server):
    from difflm.serve.chat import Canvas, ChatSession, RemoteBackend, apply_settings

    backend = RemoteBackend(server, api_key="sekret")
    session = ChatSession(backend, apply_settings(backend.defaults, {"seed": 5}))
    canvas, events = Canvas(), []

    def on_event(ev):
        events.append(ev)
        canvas.update(ev)

    answer = session.ask(Q1, on_event)
    assert answer.text == _server_answer(server, Q1, seed=5)
    assert all(ev["type"] == "step" for ev in events)
    assert len([ev for ev in events if not ev["fill"]]) == 8  # + at most one for the final argmax fill
    assert canvas.length == 32 and canvas.masked == 0 and answer.nfe == 8  # the canvas ends complete
    session.ask(Q2)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    backend.close()


# -- a real terminal (tmux) -------------------------------------------------------------------------------
def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def _wait_for(pane: str, needle: str, seconds: float = 120) -> str:
    screen = ""
    for _ in range(int(seconds / 0.1)):  # bounded: at most `seconds`
        screen = _tmux("capture-pane", "-p", "-t", pane)
        if needle in screen:
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared; screen:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
@pytest.mark.parametrize("where", ["local", "url"])
def test_tty_live_canvas_and_ctrl_c_cancels_the_answer(where, request):
    """On a terminal: the canvas is drawn while the answer decodes; Ctrl-C cancels that answer (remotely: the
    stream closes and the server drops the row), the chat goes on, Ctrl-D leaves with exit 0."""
    env = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": 1, "HF_HUB_OFFLINE": 1}
    if where == "url":
        url = request.getfixturevalue("server")
        env["DIFFLM_API_KEY"] = "sekret"
        target = f"--url {url}"
    else:
        target = "-m tiny-math --device cpu"
    session = f"difflm-chat-{os.getpid()}-{where}"
    # a long decode (steps >> gen_length) so that the canvas is on screen when Ctrl-C comes
    cmd = (f"cd {REPO} && env {' '.join(f'{k}={v}' for k, v in env.items())} {sys.executable} -m cli.main chat "
           f"{target} --gen-length 64 --steps 20000; echo CHAT-EXITED-$?; sleep 30")
    _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", cmd)
    try:
        _wait_for(session, "you>")
        _tmux("send-keys", "-t", session, Q1, "Enter")
        screen = _wait_for(session, "NFE")
        assert "masked" in screen and "░" in screen
        _tmux("send-keys", "-t", session, "C-c")
        _wait_for(session, "answer cancelled")
        _tmux("send-keys", "-t", session, "/show", "Enter")
        assert "history: 0 turns" in _wait_for(session, "history:")
        _tmux("send-keys", "-t", session, "C-d")
        _wait_for(session, "CHAT-EXITED-0")
        if where == "url":
            _wait_until_idle(url)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)


def _wait_until_idle(url: str) -> None:
    """The server dropped the cancelled row: nothing running or queued (bounded wait)."""
    import httpx2

    health = {}
    for _ in range(300):
        health = httpx2.get(url + "/health").json()
        if health["running_rows"] == 0 and health["queued_rows"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the server still decodes the cancelled answer: {health}")


@pytest.mark.parametrize("key", ["total_length", "leading_eos"])
def test_chat_refuses_generates_whole_canvas_settings(key):
    """`/set total_length=...` would decode a canvas the server refuses (a request's length is max_tokens): one
    line naming the key, as for any setting a request cannot carry; `/set steps=...` still works."""
    from difflm.decoding.config import DecodeConfig
    from difflm.errors import ConfigError
    from difflm.serve.chat import apply_settings

    with pytest.raises(ConfigError) as err:
        apply_settings(DecodeConfig(), {key: 48 if key == "total_length" else True})
    assert key in str(err.value) and "\n" not in str(err.value)
    assert apply_settings(DecodeConfig(), {"steps": 16}).steps == 16
