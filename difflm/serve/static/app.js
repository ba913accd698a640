// difflm's chat page: plain JS, no framework, no build step (the machines it runs on are offline).
// It POSTs to /v1/chat/completions with stream + denoise and reads the SSE stream with fetch and a
// ReadableStream parser (EventSource cannot POST). Each answer is a row of gen_length cells that the
// stream's `difflm` step events fill in (committed [[pos, token_id, text]]) and empty again (remasked [pos]).
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  // What each decoder reads, so the page sends only the knobs a method uses (the server may refuse the
  // others, e.g. threshold) and greys out the rest. Mirrors difflm.decoding.methods.
  const USES = {
    conv: new Set(["conv", "remdm_conv", "llada_conv"]),
    blocks: new Set(["semi_ar", "llada", "threshold"]),
    threshold: new Set(["threshold", "llada_conv"]),
    topk: { has: (m) => m !== "categorical" && m !== "nucleus" },
  };
  // name -> [short description, what it does] for the menu, the panel titles and the hint
  const LABELS = {
    conv: ["convolutional window", "Samples from the reverse process, weighted by a window that favours positions near the decoded text."],
    topk: ["full-window top-k", "Samples from the reverse process over the whole answer at once (top-k tokens)."],
    categorical: ["full window", "Samples from the reverse process over the whole answer, every token allowed."],
    semi_ar: ["semi-AR blocks", "Samples block by block, left to right."],
    llada: ["LLaDA blocks", "Commits the most confident tokens, block by block (LLaDA's low-confidence remasking)."],
    llada_conv: ["LLaDA + conv window", "Commits the most confident tokens, confidence scaled by the conv window."],
    threshold: ["confidence threshold", "Commits every token above the threshold, block by block (Fast-dLLM)."],
    remdm: ["ReMDM", "Samples, then remasks some tokens in a loop (ReMDM)."],
    remdm_conv: ["ReMDM + conv window", "ReMDM's remasking loop with the conv window."],
    nucleus: ["autoregressive", "Left-to-right nucleus sampling (AR models)."],
  };
  const label = (m) => (LABELS[m] ? LABELS[m][0] : "");
  const FALLBACK_METHODS = ["conv", "topk", "llada"];
  const KNOBS = ["max_tokens", "steps", "kernel_size", "top_k", "block_length", "threshold", "temperature", "seed"];

  const state = { config: null, history: [], controllers: [], busy: false };

  // ---------------------------------------------------------------------------------------------
  // server access
  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("#api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // The OpenAI-style error body's message ({"error": {"message": ...}}), else the status line.
  async function errorMessage(res) {
    let msg = `HTTP ${res.status} ${res.statusText || ""}`.trim();
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) msg = body.error.message;
      else if (body && typeof body.detail === "string") msg = body.detail;
    } catch (_) { /* not JSON: keep the status line */ }
    const retry = res.headers.get("Retry-After");
    if (retry) msg += ` (retry after ${retry} s)`;
    return msg;
  }

  // Yields the data of each SSE event ("data:" lines joined by \n) as the bytes arrive.
  async function* sseData(stream) {
    const reader = stream.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
        // normalise line ends, but keep a trailing \r: its \n may be in the next chunk
        const tail = buf.endsWith("\r") && !done ? "\r" : "";
        buf = buf.slice(0, buf.length - tail.length).replace(/\r\n?/g, "\n") + tail;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) yield data;
        }
        if (done) break;
      }
    } finally {
      reader.releaseLock();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // settings
  function showError(msg) {
    const el = $("#error");
    el.textContent = msg;
    el.hidden = !msg;
  }

  function fillMethods(methods) {
    const sel = $("#decoder");
    const keep = sel.value || (state.config && state.config.decode && state.config.decode.method) || "conv";
    sel.replaceChildren(...methods.map((m) => new Option(label(m) ? `${m} · ${label(m)}` : m, m)));
    sel.value = methods.includes(keep) ? keep : methods[0];
    for (const box of $$("#compare-with input")) {
      box.closest("label").hidden = !methods.includes(box.value);
    }
  }

  function applyDefaults(cfg) {
    const d = cfg.decode || {};
    const placeholders = { ...d, max_tokens: d.gen_length };
    for (const name of KNOBS) {
      const input = $(`#settings [name="${name}"]`);
      const v = placeholders[name];
      input.placeholder = v === null || v === undefined ? "auto" : String(v);
    }
    if (cfg.limits && cfg.limits.max_tokens) $("#max-tokens").max = cfg.limits.max_tokens;
    $("#model-info").textContent = `model ${cfg.model}` + (cfg.prompt_format ? ` · ${cfg.prompt_format} prompts` : "");
  }

  async function loadConfig() {
    let res;
    try {
      res = await fetch("/v1/difflm/config", { headers: headers(false) });
    } catch (e) {
      $("#model-info").textContent = "server unreachable";
      showError(`Cannot reach the server: ${e.message}`);
      return;
    }
    if (!res.ok) {
      const msg = await errorMessage(res);
      $("#model-info").textContent = res.status === 401 ? "API key needed" : "settings unavailable";
      showError(res.status === 401 ? `${msg} (type the server's API key in the settings)` : msg);
      if (!$("#decoder").options.length) fillMethods(FALLBACK_METHODS);
      return;
    }
    state.config = await res.json();
    applyDefaults(state.config);
    fillMethods(state.config.methods && state.config.methods.length ? state.config.methods : FALLBACK_METHODS);
    showError("");
    updateKnobs();
  }

  function methodsToRun() {
    const primary = $("#decoder").value;
    if (!$("#compare").checked) return [primary];
    const others = $$("#compare-with input").filter((b) => b.checked && !b.closest("label").hidden).map((b) => b.value);
    return [primary, ...others.filter((m) => m !== primary)];
  }

  function uses(method, what) {
    return !what || USES[what].has(method);
  }

  // Grey out the knobs none of the methods about to run reads.
  function updateKnobs() {
    const methods = methodsToRun();
    for (const input of $$("#settings .grid input")) {
      const used = methods.some((m) => uses(m, input.dataset.for));
      input.disabled = !used;
      input.title = used ? "" : `not read by ${methods.join(", ")}`;
    }
    $("#compare-with").classList.toggle("off", !$("#compare").checked);
    const m = $("#decoder").value;
    $("#decoder-hint").textContent = LABELS[m] ? LABELS[m][1] : "";
  }

  function requestBody(method, messages) {
    const body = { messages, stream: true, denoise: true, decode: method };
    for (const input of $$("#settings .grid input")) {
      if (input.value.trim() === "" || !uses(method, input.dataset.for)) continue;
      body[input.name] = Number(input.value);
    }
    return body;
  }

  // ---------------------------------------------------------------------------------------------
  // one answer panel: a canvas of cells, the final text, the figures
  function newPanel(method, length) {
    const node = $("#turn-panel").content.firstElementChild.cloneNode(true);
    node.dataset.method = method;
    $(".panel-title .name", node).textContent = method;
    $(".panel-title .desc", node).textContent = label(method);
    node.cells = [];
    resizeCanvas(node, length);
    return node;
  }

  function resizeCanvas(panel, length) {
    const canvas = $(".canvas", panel);
    while (panel.cells.length < length) {
      const cell = document.createElement("span");
      cell.className = "cell masked";
      cell.textContent = " ";
      canvas.append(cell);
      panel.cells.push(cell);
    }
    while (panel.cells.length > length) panel.cells.pop().remove();
  }

  function showToken(cell, pos, id, text) {
    cell.className = "cell committed fresh";
    cell.dataset.token = String(id);
    const stops = (state.config && state.config.stop_token_ids) || [];
    const special = text === "" || stops.includes(id);
    cell.classList.toggle("special", special);
    const blank = !special && text.trim() === "" && !text.includes("\n");
    cell.classList.toggle("blank", blank);
    cell.textContent = special ? "∅" : blank ? "␣".repeat(Math.min(text.length, 3)) : text.replace(/\n/g, "↵");
    cell.title = `position ${pos} · token ${id}` + (special ? ` (${text || "special"}: end of text)` : "");
  }

  function applyStep(panel, ev) {
    if (ev.length && ev.length !== panel.cells.length) resizeCanvas(panel, ev.length);
    for (const cell of $$(".fresh", panel)) cell.classList.remove("fresh");
    for (const pos of ev.remasked || []) {
      const cell = panel.cells[pos];
      if (cell) { cell.className = "cell masked remasked"; cell.textContent = " "; cell.title = ""; delete cell.dataset.token; }
    }
    for (const [pos, id, text] of ev.committed || []) {
      if (panel.cells[pos]) showToken(panel.cells[pos], pos, id, String(text));
    }
    const total = panel.totalSteps ? `/${panel.totalSteps}` : "";
    $(".progress", panel).textContent = `step ${ev.step}${total} · ${ev.masked} masked · NFE ${ev.nfe}`;
    const answer = $(".answer", panel);
    answer.classList.add("partial");
    answer.textContent = ev.text || "";
  }

  const FORMAT = {
    nfe: (v) => String(v),
    tokens_per_second: (v) => v.toFixed(1),
    rep4: (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3)),
    steps: (v) => String(v),
    seconds: (v) => v.toFixed(2),
    finish_reason: (v) => String(v),
    seed: (v) => String(v),
  };

  function finish(panel, ev) {
    for (const cell of $$(".fresh", panel)) cell.classList.remove("fresh");
    // the answer ends at the first end-of-text: dim what the decoder committed after it
    const end = panel.cells.findIndex((c) => c.classList.contains("special"));
    if (end >= 0) panel.cells.slice(end + 1).forEach((c) => c.classList.add("cut"));
    const answer = $(".answer", panel);
    answer.classList.remove("partial");
    answer.classList.toggle("blank", !ev.text);
    answer.textContent = ev.text || "(empty answer)";
    for (const dd of $$(".figures dd", panel)) {
      const key = dd.dataset.fig;
      const v = ev[key];
      dd.dataset.value = v === null || v === undefined ? "" : String(v);
      dd.textContent = v === undefined || (v === null && key !== "rep4") ? "–" : FORMAT[key](v);
    }
    $(".progress", panel).textContent = `done · ${ev.content_tokens ?? "?"} tokens`;
    $(".canvas", panel).setAttribute("aria-label", `denoising canvas, ${panel.cells.length} positions, all decoded`);
    panel.result = ev;
    panel.dataset.state = "done";
    $("#announce").textContent = `${panel.dataset.method} answered: ${ev.text || "nothing"}`;
  }

  function fail(panel, msg, stateName = "error") {
    const el = $(".panel-error", panel);
    el.textContent = msg;
    el.hidden = false;
    panel.dataset.state = stateName;
    $(".progress", panel).textContent = stateName === "stopped" ? "stopped" : "failed";
    if (stateName === "error") showError(`${panel.dataset.method}: ${msg}`);
  }

  function handleChunk(panel, chunk) {
    if (chunk.error) { fail(panel, chunk.error.message || String(chunk.error)); return; }
    const choice = chunk.choices && chunk.choices[0];
    const ev = chunk.difflm;
    if (ev && ev.type === "step") applyStep(panel, ev);
    else if (ev && ev.type === "done") finish(panel, { finish_reason: choice && choice.finish_reason, ...ev });
    else if (ev && ev.type === "error") fail(panel, ev.message);
    const piece = choice && choice.delta && choice.delta.content;
    if (piece && panel.dataset.state === "running") {
      panel.streamed = (panel.streamed || "") + piece;
      if (!panel.cells.some((c) => c.classList.contains("committed"))) $(".answer", panel).textContent = panel.streamed;
    }
  }

  async function runPanel(panel, body, signal) {
    let res;
    try {
      res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
      if (!res.ok) { fail(panel, await errorMessage(res)); return; }
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") break;
        let chunk;
        try { chunk = JSON.parse(data); } catch (_) { fail(panel, `unreadable event from the server: ${data.slice(0, 80)}`); return; }
        handleChunk(panel, chunk);
        if (panel.dataset.state === "error") return;
      }
      if (panel.dataset.state === "running") fail(panel, "the stream ended before the answer was done");
    } catch (e) {
      if (signal.aborted) fail(panel, "stopped", "stopped");
      else fail(panel, `connection failed: ${e.message}`);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // the conversation
  function addUserTurn(text) {
    const node = $("#turn-user").content.firstElementChild.cloneNode(true);
    $(".text", node).textContent = text;
    $("#conversation").append(node);
  }

  function setBusy(busy) {
    state.busy = busy;
    $("#send").disabled = busy;
    $("#stop").disabled = !busy;
    document.body.dataset.busy = busy ? "1" : "";
  }

  async function send() {
    const prompt = $("#prompt").value.trim();
    if (!prompt || state.busy) return;
    showError("");
    $("#empty-note").hidden = true;
    const messages = [...state.history, { role: "user", content: prompt }];
    const methods = methodsToRun();
    addUserTurn(prompt);
    const turn = document.createElement("article");
    turn.className = `msg assistant panels-${methods.length}`;
    const defaults = (state.config && state.config.decode) || {};
    const runs = methods.map((method) => {
      const body = requestBody(method, messages);
      const panel = newPanel(method, body.max_tokens || defaults.gen_length || 0);
      panel.totalSteps = body.steps || defaults.steps;
      turn.append(panel);
      return { panel, body };
    });
    $("#conversation").append(turn);
    turn.scrollIntoView({ block: "end", behavior: "smooth" });
    $("#prompt").value = "";
    setBusy(true);
    const ctl = new AbortController();
    state.controllers = [ctl];
    await Promise.all(runs.map(({ panel, body }) => runPanel(panel, body, ctl.signal)));
    const first = runs[0].panel;
    if (first.dataset.state === "done") state.history = [...messages, { role: "assistant", content: first.result.text }];
    setBusy(false);
    $("#prompt").focus();
  }

  function stop() {
    for (const ctl of state.controllers) ctl.abort();
  }

  function reset() {
    stop();
    state.history = [];
    $$("#conversation .msg").forEach((n) => n.remove());
    $("#empty-note").hidden = false;
    showError("");
  }

  function init() {
    $("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("#prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    $("#settings").addEventListener("submit", (e) => e.preventDefault());
    $("#stop").addEventListener("click", stop);
    $("#reset").addEventListener("click", reset);
    $("#decoder").addEventListener("change", updateKnobs);
    $("#compare").addEventListener("change", updateKnobs);
    for (const box of $$("#compare-with input")) box.addEventListener("change", updateKnobs);
    $("#api-key").addEventListener("change", loadConfig);
    fillMethods(FALLBACK_METHODS);
    updateKnobs();
    loadConfig().finally(() => { document.body.dataset.ready = "1"; });
  }

  init();
})();
