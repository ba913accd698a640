"""Dynamic batching for `difflm serve`: requests that arrive close together and share their decode settings
run as the rows of one `difflm.decoding.generate` call.

Why this is exact: every row is seeded from its own generator (`row_seeds`), and a row that finishes or is
cancelled leaves the forward pass and draws no more noise, so a row's tokens depend only on its prompt, seed
and settings, never on its batch-mates (up to the last bits of the logits, which batch-size dependent float
kernels may change; in float64 the tokens are identical, which the tests check).

One worker thread runs the model (torch releases the GIL, the event loop stays free); requests queue as rows.
The worker takes the oldest row, waits at most `window_ms` from its arrival for more rows with the same
settings, up to `max_batch` rows, and decodes them together. Rows beyond `max_queue` are refused
(`QueueFull`: the server answers 429 with Retry-After). A cancelled row (client gone, timeout) is dropped from
the queue, or stopped mid-run through `generate(cancelled=...)`.

Events go to each request's `sink(event)` from the worker thread, as plain dicts:
  step  {"type": "step", "index", "step", "nfe", "length", "masked", "committed": [[pos, id, text]], "remasked", "text",
         "fill"} (fill: true on the one extra event for the positions generate's final argmax pass filled, after
         its last step; same step and nfe)
  done  {"type": "done", "index", "text", "token_ids", "content_tokens", "finish_reason", "nfe", "steps",
         "seconds", "tokens_per_second", "rep4", "seed" (the request's), "choice_seed" (the row's)}
  error {"type": "error", "index", "status", "message"}
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from difflm.config import to_dict
from difflm.decoding.config import DecodeConfig
from difflm.errors import ConfigError, first_line
from difflm.eval.fluency import rep_n
from difflm.generation import decode_output, left_pad, prompt_id
from difflm.seeding import item_seed

Sink = Callable[[dict], None]


class QueueFull(Exception):
    """The queue holds `max_queue` rows already; `retry_after` is a guess in whole seconds."""

    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the server's queue is full; retry in {retry_after} s")


class ShuttingDown(Exception):
    """The engine is stopping and takes no new requests."""


def settings_key(cfg: DecodeConfig) -> str:
    """Requests with equal keys can share a batch: every setting but the seed (each row has its own)."""
    d = to_dict(cfg)
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True)


@dataclass(eq=False)
class Job:
    """One request: `n` rows (choices) of one prompt under one DecodeConfig."""

    prompt_ids: list[int]
    config: DecodeConfig
    n: int
    events: bool
    sink: Sink
    seeds: list[int]
    deadline: float | None
    key: str = ""
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop this request's rows (queued rows are dropped, running ones stop at the next step)."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    arrival: float

    @property
    def seed(self) -> int:
        return self.job.seeds[self.index]


@dataclass
class EngineStats:
    queued_rows: int
    running_rows: int
    live_jobs: int
    batches: int
    rows_done: int
    max_batch_seen: int


class _Tokens:
    """Token id -> text for the step events, cached (a step names every newly committed token)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, tid: int) -> str:
        text = self.cache.get(tid)
        if text is None:
            text = self.cache[tid] = self.tok.decode([tid]) if self.tok is not None else str(tid)
        return text


class Engine:
    """The batching worker around one loaded model (a `difflm.models.DiffusionLM`). No global state:
    several engines can run in one process."""

    def __init__(self, model, *, max_batch: int = 16, window_ms: float = 10.0, max_queue: int = 256,
                 timeout_s: float | None = 600.0):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1), ("window_ms", window_ms, 0)):
            if v < lo:
                raise ConfigError(f"must be >= {lo}, got {v}", key=name)
        self.model, self.max_batch, self.window_s, self.max_queue = model, max_batch, window_ms / 1000.0, max_queue
        self.timeout_s = timeout_s
        self._pending: list[_Row] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: list[_Row] = []
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()
        self._batch_s = 1.0  # moving average of a batch's wall time, for Retry-After
        self._batches = self._rows_done = self._max_seen = 0
        self._text = _Tokens(getattr(model, "tokenizer", None))

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="difflm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, fail the queued ones (503), stop the running batch at its next step, join."""
        with self._cv:
            self._stopping = True
            dropped, self._pending = self._pending, []
            for r in self._running:
                r.job.cancel()
            self._cv.notify_all()
        for r in dropped:
            _emit(r.job, _shutdown_event(r))
        if self._thread is not None:
            self._thread.join(timeout)

    def tokens_of_prefix(self, content_ids: list[int], text: str) -> int:
        """How many of an answer's content tokens its prefix `text` (the answer cut at a stop string) holds: the
        fewest whose decoding is at least as long as `text` (a binary search; decoded lengths grow with the
        tokens)."""
        lo, hi = 0, len(content_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode_output(self.model, content_ids[:mid])[0]) >= len(text):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(len(self._pending), len(self._running), len(self._jobs), self._batches,
                               self._rows_done, self._max_seen)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], config: DecodeConfig, *, n: int = 1, events: bool = False,
               sink: Sink, timeout_s: float | None = None, first: int = 0) -> Job:
        """Queue a request of `n` rows; row k is choice `first + k` of its request, seeded
        item_seed(config.seed, prompt_id(first + k)) as `difflm generate` seeds its (first + k)-th `--prompt`:
        the answer equals `difflm generate` on n copies of the prompt with that seed."""
        now = time.monotonic()
        limit = self.timeout_s if timeout_s is None else timeout_s
        seeds = [item_seed(config.seed, prompt_id(first + k)) for k in range(n)]
        job = Job(list(prompt_ids), config, n, events, sink, seeds, None if limit is None else now + limit,
                  key=settings_key(config))
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) + n > self.max_queue:
                waves = (len(self._pending) + len(self._running)) / self.max_batch + 1
                raise QueueFull(max(1, round(self._batch_s * waves)))
            self._pending.extend(_Row(job, k, now) for k in range(n))
            self._jobs.add(job)
            self._cv.notify_all()
        return job

    def run(self, prompt_ids: list[int], config: DecodeConfig, *, n: int = 1,
            on_event: Sink | None = None) -> list[dict]:
        """Submit and wait (in-process use): the `done` events by choice index; an error event raises."""
        done: dict[int, dict] = {}
        finished = threading.Event()
        failure: list[dict] = []

        def sink(ev: dict) -> None:
            if on_event is not None:
                on_event(ev)
            if ev["type"] == "done":
                done[ev["index"]] = ev
            elif ev["type"] == "error":
                failure.append(ev)
            if len(done) + len(failure) == n:
                finished.set()

        self.submit(prompt_ids, config, n=n, events=on_event is not None, sink=sink)
        finished.wait()
        if failure:
            raise RuntimeError(failure[0]["message"])
        return [done[k] for k in range(n)]

    # -- the worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                rows = self._collect()
                self._running = rows
            try:
                if rows:
                    self._run_batch(rows)
            finally:
                with self._cv:
                    self._running = []
                rows = []  # no reference to a finished request outlives its batch

    def _collect(self) -> list[_Row]:
        """(Under the lock.) The rows of the next batch: the oldest row's settings, up to max_batch rows,
        waiting until `window_s` after the oldest row arrived for more to come. Rows of cancelled or
        expired requests leave the queue here."""
        while True:
            now = time.monotonic()
            self._drop_dead(now)
            if not self._pending:
                return []
            key = self._pending[0].job.key
            close_at = self._pending[0].arrival + self.window_s
            rows = [r for r in self._pending if r.job.key == key][: self.max_batch]
            if len(rows) >= self.max_batch or now >= close_at or self._stopping:
                taken = set(map(id, rows))
                self._pending = [r for r in self._pending if id(r) not in taken]
                return rows
            self._cv.wait(close_at - now)

    def _drop_dead(self, now: float) -> None:
        dead = [r for r in self._pending if r.job.cancelled or r.job.expired(now)]
        if dead:
            gone = set(map(id, dead))
            self._pending = [r for r in self._pending if id(r) not in gone]
            for r in dead:
                if not r.job.cancelled:
                    _emit(r.job, _timeout_event(r))

    def _run_batch(self, rows: list[_Row]) -> None:
        from difflm.decoding import generate

        model, cfg = self.model, rows[0].job.config
        ids, am = left_pad([r.job.prompt_ids for r in rows], model.ids.pad_or_eos, model.device)
        watch = _StepWatch(self, rows, ids.shape[1]) if any(r.job.events for r in rows) else None
        t0 = time.perf_counter()
        try:
            out = generate(
                model, ids, cfg, attention_mask=am, row_seeds=[r.seed for r in rows],
                callback=watch, cancelled=lambda: [r.job.cancelled or r.job.expired(time.monotonic()) for r in rows],
            )
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            if watch is not None:  # generate's last pass fills what is still masked after the last step, without
                # a callback: one more step event for those rows, so a client's canvas ends equal to the answer
                watch({"step": out.steps_run, "nfe": out.nfe, "x": out.sequences}, only_changed=True)
        except Exception as err:  # one bad batch must not stop the server: its requests get the error
            for r in rows:
                _emit(r.job, {"type": "error", "index": r.index, "status": 500, "message": first_line(err)})
            return
        seconds = time.perf_counter() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        self._batches += 1
        self._max_seen = max(self._max_seen, len(rows))
        gen = out.sequences[:, out.prompt_length :].tolist()
        now = time.monotonic()
        for b, r in enumerate(rows):
            self._rows_done += 1
            if r.job.cancelled:
                if self._stopping:  # stopped by stop(), not by its client: say so, or a waiter never wakes
                    _emit(r.job, _shutdown_event(r))
                continue
            if r.job.expired(now):
                _emit(r.job, _timeout_event(r))
                continue
            _emit(r.job, self._done_event(r, gen[b], out, seconds))

    def _done_event(self, r: _Row, gen_ids: list[int], out, seconds: float) -> dict:
        text, n = decode_output(self.model, gen_ids)
        return {
            "type": "done", "index": r.index, "text": text, "token_ids": gen_ids, "content_tokens": n,
            "finish_reason": "stop" if n < len(gen_ids) else "length", "nfe": out.nfe, "steps": out.steps_run,
            "seconds": seconds, "tokens_per_second": n / seconds if seconds > 0 else 0.0,
            "rep4": rep_n(gen_ids[:n], 4), "seed": r.job.config.seed, "choice_seed": r.seed,
        }


class _StepWatch:
    """The generate callback of a batch with event-wanting rows: per row, what changed since the last step."""

    def __init__(self, engine: Engine, rows: list[_Row], plen: int):
        self.engine, self.rows, self.plen = engine, rows, plen
        self.mask = engine.model.ids.mask_id
        L = rows[0].job.config.gen_length
        self.prev = [[self.mask] * L for _ in rows]
        self.prefix_at = [0] * len(rows)  # first masked position when the text was last decoded
        self.text = [""] * len(rows)

    def __call__(self, ev: dict, only_changed: bool = False) -> None:
        gen = ev["x"][:, self.plen :].tolist()
        for b, r in enumerate(self.rows):
            if not r.job.events or r.job.cancelled:
                continue
            cur, prev = gen[b], self.prev[b]
            if only_changed and cur == prev:
                continue
            word = self.engine._text
            committed = [[p, t, word(t)] for p, (a, t) in enumerate(zip(prev, cur)) if t != a and t != self.mask]
            remasked = [p for p, (a, t) in enumerate(zip(prev, cur)) if t == self.mask and a != self.mask]
            self.prev[b] = cur
            _emit(r.job, {
                "type": "step", "index": r.index, "step": ev["step"], "nfe": ev["nfe"], "length": len(cur),
                "masked": cur.count(self.mask), "committed": committed, "remasked": remasked,
                "text": self._prefix_text(b, cur), "fill": only_changed,
            })

    def _prefix_text(self, b: int, cur: list[int]) -> str:
        """The answer decoded up to its first MASK (cut at the first stop token): text that can only grow
        for decoders that never remask."""
        first = cur.index(self.mask) if self.mask in cur else len(cur)
        if first != self.prefix_at[b]:
            self.prefix_at[b] = first
            self.text[b] = decode_output(self.engine.model, cur[:first])[0]
        return self.text[b]


def _shutdown_event(r: _Row) -> dict:
    return {"type": "error", "index": r.index, "status": 503, "message": "the server is shutting down"}


def _timeout_event(r: _Row) -> dict:
    return {"type": "error", "index": r.index, "status": 504, "message": "the request timed out"}


def _emit(job: Job, event: dict) -> None:
    """Give `event` to the job's sink; a sink that fails (its client is gone) cancels the job."""
    try:
        job.sink(event)
    except Exception:
        job.cancel()


__all__ = ["Engine", "EngineStats", "Job", "QueueFull", "ShuttingDown", "settings_key"]
