"""The web page at `/` in a real browser: headless Debian Chromium driven by Playwright, against the real
server (uvicorn in a thread, loopback, a free port) on the embedded tiny model.

The page's figures and text are checked against the server's own answer to the very request the page sent
(replayed over HTTP), so a page that drops events, misplaces tokens or shows the wrong NFE fails. Screenshots
go to $DIFFLM_TEST_ARTIFACTS (else test-artifacts/ at the repo root) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = os.environ.get("DIFFLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; `make test` installs it where root)",
        allow_module_level=True,
    )

KEY = "page-test-key"
GEN, STEPS = 32, 16
# Offline and quiet: no component updates, sync, QUIC or other background traffic from the browser.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 120_000  # an upper bound for one answer on a loaded 2-core machine, not a timing assertion
ARTIFACTS = Path(os.environ.get("DIFFLM_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")


@pytest.fixture(scope="module")
def server():
    """The real app (create_app) on tiny-math, served by uvicorn in a background thread; stopped after."""
    import uvicorn

    from difflm.decoding.config import DecodeConfig
    from difflm.models import load_model
    from difflm.serve.app import ServeSettings, create_app
    from difflm.testing import free_port

    model = load_model("tiny-math", device="cpu")
    settings = ServeSettings(decode=DecodeConfig(gen_length=GEN, steps=STEPS), model_id="tiny-math", api_key=KEY,
                             prompt_format="raw")  # tiny-math was trained on raw questions
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(model, settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn-page-test", daemon=True)
    thread.start()
    for _ in range(1200):  # bounded: at most ~60 s for the server to come up
        if srv.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the server's `/`, with the API key typed in; fails the test on any script error."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server + "/")
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    ctx.close()
    assert not errors, f"script errors on the page: {errors}"


def _login(pg, key=KEY):
    """Type the key; the page reloads /v1/difflm/config with it (on change)."""
    pg.fill("#api-key", key)
    pg.press("#api-key", "Tab")


def _set(pg, **knobs):
    for name, value in knobs.items():
        pg.fill(f"#{name.replace('_', '-')}", str(value))


def _replay(server: str, body: dict, key: str = KEY) -> tuple[dict, list]:
    """Send the page's request body again; return the stream's final `difflm` done event and the canvas its
    step events build (token id per position, None where still masked)."""
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    done, canvas = None, [None] * body["max_tokens"]
    with urllib.request.urlopen(req, timeout=WAIT_MS / 1000) as res:
        for raw in res:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:]).get("difflm") or {}
            if ev.get("type") == "step":
                for pos in ev["remasked"]:
                    canvas[pos] = None
                for pos, token, _ in ev["committed"]:
                    canvas[pos] = token
            elif ev.get("type") == "done":
                done = ev
    assert done is not None, "the replayed stream had no done event"
    return done, canvas


def _send(pg, prompt: str, n_requests: int = 1) -> list[dict]:
    """Type the prompt, click Send, return the JSON bodies of the chat requests the page made."""
    pg.fill("#prompt", prompt)
    bodies: list[dict] = []
    listener = lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(json.loads(r.post_data))  # noqa: E731
    pg.on("request", listener)
    pg.click("#send")
    pg.wait_for_function(f"document.querySelectorAll('.msg.assistant:last-child .panel').length === {n_requests}")
    pg.wait_for_function("document.querySelectorAll(\".msg.assistant:last-child .panel[data-state='running']\").length === 0")
    pg.remove_listener("request", listener)
    assert len(bodies) == n_requests, bodies
    return bodies


def _watch_masks(pg):
    """Record, in the page, every count of masked cells the answer canvases go through."""
    pg.evaluate("""() => {
        window.maskCounts = [];
        new MutationObserver(() => {
            for (const c of document.querySelectorAll('.msg.assistant:last-child .canvas'))
                window.maskCounts.push(c.querySelectorAll('.cell.masked').length);
        }).observe(document.querySelector('#conversation'), {subtree: true, childList: true, attributes: true});
    }""")


def _panel_state(panel) -> dict:
    figs = {dd.get_attribute("data-fig"): dd.get_attribute("data-value") for dd in panel.query_selector_all(".figures dd")}
    return {
        "state": panel.get_attribute("data-state"),
        "method": panel.get_attribute("data-method"),
        "answer": panel.query_selector(".answer").inner_text(),
        "cells": len(panel.query_selector_all(".canvas .cell")),
        "masked": len(panel.query_selector_all(".canvas .cell.masked")),
        "tokens": [None if c.get_attribute("data-token") is None else int(c.get_attribute("data-token"))
                   for c in panel.query_selector_all(".canvas .cell")],
        "figures": figs,
        "error": panel.query_selector(".panel-error").inner_text(),
    }


def _check_done(server, panel, body):
    """A finished panel shows what the server answers to the same request: text, tokens in place, NFE."""
    got = _panel_state(panel)
    want, canvas = _replay(server, body)
    assert got["state"] == "done", got
    assert got["cells"] == body["max_tokens"] and got["masked"] == 0, got
    assert got["answer"].strip() and got["answer"] == want["text"], (got, want)
    assert None not in canvas and got["tokens"] == canvas, (got, canvas)
    assert int(got["figures"]["nfe"]) == want["nfe"], (got, want)
    assert int(got["figures"]["seed"]) == want["seed"], (got, want)  # the page shows the seed it was decoded with
    assert float(got["figures"]["tokens_per_second"]) > 0, got
    if want["rep4"] is None:
        assert got["figures"]["rep4"] == "", got
    else:
        assert float(got["figures"]["rep4"]) == want["rep4"], (got, want)
    return got


# (16, 8): fewer steps than tokens, so generate's last pass fills positions after the last step
@pytest.mark.parametrize("gen,steps", [(GEN, STEPS), (16, 8)])
def test_answer_decodes_in_place_with_the_figures(page, server, gen, steps):
    _login(page)
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('tiny-math')")
    assert "conv" in page.eval_on_selector_all("#decoder option", "os => os.map(o => o.value)")
    page.select_option("#decoder", "conv")
    _set(page, max_tokens=gen, steps=steps, seed=3)
    _watch_masks(page)
    (body,) = _send(page, "Ana has 12 apples. Ana gets 7 more. How many apples does Ana have now?")
    assert body["stream"] is True and body["denoise"] is True and body["decode"] == "conv"
    assert body["max_tokens"] == gen and body["steps"] == steps and body["seed"] == 3
    _check_done(server, page.query_selector(".msg.assistant .panel"), body)
    counts = page.evaluate("window.maskCounts")
    assert gen in counts and any(0 < c < gen for c in counts), f"no pending cells seen while decoding: {counts}"
    assert page.is_hidden("#error")
    if gen == GEN:
        _screenshot(page, "serve-page.png")


def test_side_by_side_panels_finish_with_their_figures(page, server):
    _login(page)
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('tiny-math')")
    page.select_option("#decoder", "conv")
    page.check("#compare")
    page.check("#cmp-topk")
    page.check("#cmp-llada")
    _set(page, max_tokens=GEN, steps=STEPS, block_length=8, seed=5)
    bodies = _send(page, "Ben has 30 pens. Ben gives away 8. How many pens does Ben have now?", n_requests=3)
    assert sorted(b["decode"] for b in bodies) == ["conv", "llada", "topk"]
    assert len({json.dumps([b["messages"], b["seed"], b["steps"], b["max_tokens"]]) for b in bodies}) == 1
    by_method = {b["decode"]: b for b in bodies}
    assert "block_length" in by_method["llada"] and "block_length" not in by_method["conv"]
    panels = page.query_selector_all(".msg.assistant:last-child .panel")
    assert [p.get_attribute("data-method") for p in panels] == ["conv", "topk", "llada"]
    for panel in panels:
        _check_done(server, panel, by_method[panel.get_attribute("data-method")])
    _screenshot(page, "serve-page-compare.png")


def _screenshot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.evaluate("document.querySelector('#settings').scrollTop = 0")
    pg.screenshot(path=str(ARTIFACTS / name))


def _server_error(server: str, body: dict, key: str) -> str:
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=WAIT_MS / 1000)
    return json.loads(info.value.read())["error"]["message"]


def test_errors_are_shown(page, server):
    # a wrong key: the settings load fails visibly, and so does a message
    _login(page, "not-the-key")
    page.wait_for_function("!document.querySelector('#error').hidden")
    _set(page, max_tokens=GEN, steps=STEPS)
    (body,) = _send(page, "Hello?")
    want = _server_error(server, body, "not-the-key")
    got = _panel_state(page.query_selector(".msg.assistant:last-child .panel"))
    assert got["state"] == "error" and got["error"] == want, (got, want)
    assert want in page.inner_text("#error")
    # the right key, then steps that do not divide into LLaDA's blocks: the server's one-line message
    _login(page)
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('tiny-math')")
    page.select_option("#decoder", "llada")
    _set(page, max_tokens=GEN, steps=10, block_length=8)
    (body,) = _send(page, "Hello again?")
    want = _server_error(server, body, KEY)
    assert "divisible" in want
    got = _panel_state(page.query_selector(".msg.assistant:last-child .panel"))
    assert got["state"] == "error" and got["error"] == want, (got, want)
    assert page.is_visible("#error") and want in page.inner_text("#error")
    _screenshot(page, "serve-page-error.png")
