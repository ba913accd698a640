"""The generation loop: x = [prompt | MASK * gen_length] -> denoised sequences, for every method.

`generate` works with any callable `model(input_ids, attention_mask=...)` returning logits or an object with
`.logits` (a `difflm.models.DiffusionLM`, a bare Hugging Face module, a test double). It is batched
(left-padded prompts with an attention mask), counts model forward passes (NFE) and seeds every row
from its own generator, so a row's output depends only on its seed, prompt and settings.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from difflm.decoding import conv
from difflm.decoding import steps as S
from difflm.decoding.cache import BlockCache
from difflm.decoding.config import DecodeConfig, check_method_family
from difflm.decoding.dream import suppressed_confidence
from difflm.decoding.methods import REGISTRY
from difflm.errors import ConfigError
from difflm.models.base import logits_of
from difflm.models.ids import stop_ids_from
from difflm.seeding import item_seed, seeded_generator

_T_EPS = 1e-5  # the time grid ends at t = 1e-5 (MDLM/LLaDA convention)
#: greedy confidence decoding asks the model for the logits from the first masked position on, found every
#: step, when the window's logits are at least this many (B x positions x V); below, a few more kernels per
#: step cost more than the smaller head saves (measured at V 2048, batch 1), and the block's start is the bound
_NARROW_EACH_STEP_FROM = 1 << 20


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  #: LongTensor [B, prompt_len + gen_length]
    nfe: int  #: model forward passes (classifier-free guidance counts 2 per step)
    prompt_length: int  #: padded prompt length P: the answer is sequences[:, P:]
    filled: torch.Tensor  #: LongTensor [B]: positions still masked at the end, filled by argmax
    steps_run: int  #: denoising steps actually run (can be < steps with EOS fill)
    row_passes: int = 0  #: sequences run through the model, summed over passes (finished rows skip passes)
    #: LongTensor [B]: every MASK -> token change of the row's answer (re-unmasks after ReMDM's remasking
    #: included, the final argmax fill included, EOS fill's rule not): L* of the paper's r* = L*/S (Table 10)
    unmask_events: torch.Tensor | None = None
    forward_steps: int = 0  #: steps that called the model: the paper's S* (a cfg step counts once; nfe counts 2)
    reused_steps: int = 0  #: steps that reused the previous step's logits (nothing changed since: `forward_reuse`)


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, on `device`, seeded with that row's seed."""
    return [seeded_generator(s, device) for s in seeds]


def _remdm_alpha(t: float, cfg: DecodeConfig) -> float:
    """ReMDM-loop schedule of the unmasked share alpha(t): 0 -> alpha_on on [1, t_on], constant alpha_on
    on [t_off, t_on] (the loop), alpha_on -> 1 on [t_off, 0]."""
    if t >= cfg.t_on:
        return cfg.alpha_on * (1.0 - t) / (1.0 - cfg.t_on) if cfg.t_on < 1 else cfg.alpha_on
    if t >= cfg.t_off:
        return cfg.alpha_on
    return 1.0 - (1.0 - cfg.alpha_on) * t / cfg.t_off if cfg.t_off > 0 else 1.0


def _schedule_weights(cfg: DecodeConfig, t: float, s: float) -> tuple[float, float, float]:
    """(a, b, remask probability) for the step t -> s: token weights a * p, MASK weight b."""
    if not REGISTRY[cfg.method].remdm:
        return t - s, s, 0.0
    at, as_ = _remdm_alpha(t, cfg), _remdm_alpha(s, cfg)
    if as_ > at + 1e-12:  # unmasking phase: q(unmask) = (alpha_s - alpha_t) / (1 - alpha_t)
        return as_ - at, 1.0 - as_, 0.0
    # loop phase: remask decoded tokens with prob eta; masked ones unmask with eta*alpha/(1-alpha), which
    # keeps the expected number of unmasked tokens constant
    p = min(1.0, cfg.eta * cfg.alpha_on / max(1e-12, 1.0 - cfg.alpha_on))
    return p, 1.0 - p, cfg.eta


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    config: DecodeConfig,
    *,
    mask_id: int | None = None,
    eos_id: int | None = None,
    eot_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    row_seeds: list[int] | None = None,
    callback: Callable[[dict], None] | None = None,
    max_length: int | None = None,
    cancelled: Callable[[], Sequence[bool]] | None = None,
) -> GenerateOutput:
    """Decode `config.gen_length` tokens after each (left-padded) prompt.

    mask_id / eos_id / eot_id default to `model.ids` when the model is a `DiffusionLM`. `row_seeds` gives
    each row its own noise (default: derived from `config.seed` and the row index). `callback(event)` is
    called after every step with {"step", "nfe", "x", "prompt_length"} (x: the full current sequences, its answers
    from column prompt_length on), e.g. for a live view.
    `cancelled()`, asked before every step, gives one flag per row: a flagged row stops decoding (it leaves
    the forward pass and draws no more noise, as a finished row does, so the other rows' outputs do not
    change); its remaining masked positions become EOS. Diffusion decoders only.
    """
    check_method_family(config.method, getattr(model, "family", None), getattr(model, "name", None))
    ids = getattr(model, "ids", None)
    mask_id = mask_id if mask_id is not None else getattr(ids, "mask_id", None)
    eos_id = eos_id if eos_id is not None else getattr(ids, "eos_id", None)
    eot_id = eot_id if eot_id is not None else getattr(ids, "eot_id", None)
    if eos_id is None:
        raise ConfigError("eos_id is required (not given, and the model has no ids)", key="eos_id")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask)[None]
    if config.leading_eos:  # x_T = [EOS] + prompt (+ masks): the EOS goes right before each row's first real token
        input_ids, attention_mask = _prepend_eos(input_ids, attention_mask, eos_id)
    bsz, plen = input_ids.shape
    config.validate(prompt_length=plen, max_length=max_length or getattr(model, "max_length", None))
    device = input_ids.device
    if row_seeds is None:
        row_seeds = [item_seed(config.seed, i) for i in range(bsz)]
    if len(row_seeds) != bsz:
        raise ConfigError(f"{len(row_seeds)} row seeds for a batch of {bsz}", key="row_seeds")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device).long()
        if bool((attention_mask == 1).all()):
            attention_mask = None
    if config.total_length is not None:
        return _generate_total(model, input_ids, attention_mask, config, mask_id, eos_id, eot_id, row_seeds, callback,
                               cancelled)
    return _generate_rows(model, input_ids, attention_mask, config, mask_id, eos_id, eot_id, row_seeds, callback,
                          cancelled)


def _generate_rows(model, input_ids, attention_mask, config, mask_id, eos_id, eot_id, row_seeds, callback, cancelled):
    """One batch, one answer length (`config.gen_length`) for every row."""
    if REGISTRY[config.method].kind == "ar":
        return _generate_ar(model, input_ids, attention_mask, config, eos_id, eot_id, row_seeds)
    if mask_id is None:
        raise ConfigError("mask_id is required for diffusion decoding", key="mask_id")
    return _Decoder(model, input_ids, attention_mask, config, mask_id, eos_id, eot_id, row_seeds, callback,
                    cancelled).run()


def _prepend_eos(input_ids: torch.Tensor, attention_mask, eos_id: int):
    """[pad | prompt] -> [pad | EOS prompt], one column wider: the EOS right before each row's first real token
    (left padding), so x_T = [EOS] + prompt + masks as the paper's code builds it."""
    bsz, plen = input_ids.shape
    if attention_mask is None:
        col = torch.full((bsz, 1), eos_id, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([col, input_ids], 1), None
    am = torch.as_tensor(attention_mask, device=input_ids.device).long()
    ids = torch.cat([input_ids[:, :1], input_ids], 1)  # the padding moves one column left (its first column copied)
    am = torch.cat([torch.zeros_like(am[:, :1]), am], 1)
    at = (plen - am.sum(1)).unsqueeze(1)  # the column of the EOS: the row's padding count
    ids.scatter_(1, at, eos_id)
    am.scatter_(1, at, 1)
    return ids, am


def check_total_length(config: DecodeConfig, prompt_lengths: Sequence[int], max_length: int | None = None) -> None:
    """With `total_length`: raise ConfigError (one line) unless every prompt (its length with the leading EOS when
    `leading_eos`) leaves room in the canvas and a block method has a step per block of each answer length
    (the answer of a p-token prompt has total_length - p positions). `difflm generate` checks every item before
    decoding any; `generate` checks its batch."""
    if config.total_length is None or not prompt_lengths:
        return
    config.validate(prompt_length=max(prompt_lengths), max_length=max_length)
    if REGISTRY[config.method].blocks and config.method != "threshold":
        prompt = min(prompt_lengths)  # the longest answer has the most blocks
        answer = config.total_length - prompt
        n_blocks = config.answer_blocks(answer)
        if config.steps < n_blocks:
            raise ConfigError(
                f"steps {config.steps} < the {n_blocks} blocks of the answer of a {prompt}-token prompt "
                f"(total_length {config.total_length} - {prompt} = {answer} positions, block_length "
                f"{config.block_length or answer}); allowed: steps >= {n_blocks}",
                key="steps",
            )


def _generate_total(model, input_ids, attention_mask, config, mask_id, eos_id, eot_id, row_seeds, callback, cancelled):
    """`total_length` L: each row's canvas is L positions including its prompt, so its answer has L - p_i positions.

    Rows are decoded in groups of equal prompt length, each group as its own batch without padding, so a row decodes
    as it would alone (its noise, its answer length and its blocks do not depend on the other prompts of the batch).
    The merged output keeps the left-padded layout of a plain batch: row i is [padding | prompt_i | answer_i (L - p_i) |
    EOS x (p_i - p_min)], `prompt_length` is the padded prompt width P, so `sequences[:, P:]` is each answer followed
    by EOS (cut at the first EOS like every answer). nfe, row_passes, forward and reused steps are summed over the
    groups; steps_run is the largest. The callback sees the merged canvas; `step` restarts with each group."""
    L = config.total_length
    bsz, plen = input_ids.shape
    lengths = [plen] * bsz if attention_mask is None else [int(n) for n in attention_mask.sum(1).tolist()]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    check_total_length(config, list(groups))  # every group's settings, before any decoding
    width = plen + L - min(groups)
    device = input_ids.device
    seq = torch.full((bsz, width), eos_id, dtype=input_ids.dtype, device=device)
    seq[:, :plen] = input_ids
    for n, rows in groups.items():
        seq[rows, plen : plen + L - n] = mask_id if mask_id is not None else eos_id
    filled = torch.zeros(bsz, dtype=torch.long, device=device)
    events = torch.zeros(bsz, dtype=torch.long, device=device)
    nfe = passes = steps_run = forward_steps = reused = 0
    for n, rows in sorted(groups.items()):
        idx = torch.tensor(rows, device=device)
        span = slice(plen - n, plen - n + L)

        def show(ev, idx=idx, span=span):
            seq[idx, span] = ev["x"]
            callback({**ev, "x": seq, "prompt_length": plen})

        def stop(rows=rows):
            flags = cancelled()
            return [flags[i] for i in rows]

        cfg = dataclasses.replace(config, gen_length=L - n, total_length=None, leading_eos=False)
        out = _generate_rows(model, input_ids[idx, plen - n :], None, cfg, mask_id, eos_id, eot_id,
                             [row_seeds[i] for i in rows], None if callback is None else show,
                             None if cancelled is None else stop)
        seq[idx, span] = out.sequences
        filled[idx] = out.filled
        if out.unmask_events is not None:
            events[idx] = out.unmask_events
        nfe, passes, steps_run = nfe + out.nfe, passes + out.row_passes, max(steps_run, out.steps_run)
        forward_steps, reused = forward_steps + out.forward_steps, reused + out.reused_steps
    return GenerateOutput(seq, nfe, plen, filled, steps_run, passes, events, forward_steps, reused)


class _Decoder:
    """State of one batched diffusion decoding run (one object per `generate` call; no globals)."""

    def __init__(self, model, input_ids, attention_mask, cfg, mask_id, eos_id, eot_id, row_seeds, callback,
                 cancelled=None):
        self.model, self.cfg, self.callback = model, cfg, callback
        self.mask_id, self.eos_id = mask_id, eos_id
        self.method = REGISTRY[cfg.method]
        self.stop_ids = list(stop_ids_from(eos_id, eot_id))
        bsz, self.plen = input_ids.shape
        device = input_ids.device
        self.L = cfg.gen_length
        self.x = torch.cat([input_ids, torch.full((bsz, self.L), mask_id, dtype=input_ids.dtype, device=device)], 1)
        if attention_mask is None:
            self.attn = None
            self.valid = torch.ones_like(self.x, dtype=torch.bool)
        else:
            self.attn = torch.cat([attention_mask, torch.ones(bsz, self.L, dtype=attention_mask.dtype, device=device)], 1)
            self.valid = self.attn.bool()
        self.gens = _generators(row_seeds, device)
        self.temperature = cfg.effective_temperature()
        self.nfe = 0
        self.row_passes = 0
        self.step = 0
        self.rows: torch.Tensor | None = None  # indices of the rows still decoding; None: all of them
        self.active: list[bool] | None = None  # per row: still decoding in the current window
        self.last_logits: torch.Tensor | None = None
        self.kv = BlockCache(model, cfg.cache) if cfg.cache else None
        self.block = (0, self.L)  # the current block [start, end) in generated positions
        self.since_refresh: int | None = None  # None: the next forward refreshes the cache
        self.conv_bounds = None  # `conv.conv_bounds` of the sequence, made at the first `conv_scales`
        self.logits_from = 0  # `forward` returns the logits of generated positions logits_from.. only
        self.cancelled: Callable[[], Sequence[bool]] | None = cancelled  # see `generate`
        self.dropped: set[int] = set()  # rows stopped by `cancelled`
        self.unmask_events = torch.zeros(bsz, dtype=torch.long, device=device)  # per row, on the device (r*)
        # exact forward reuse: the model's input is the canvas (and the rows and positions asked for), never t; when
        # none of them changed since the last forward, its logits are what the model would return again
        self.reuse = cfg.forward_reuse and self.kv is None
        self.seen: torch.Tensor | None = None  # the canvas the last forward saw
        self.seen_key = None  # (rows run, logits_from) of the last forward
        self.same = False  # set before a step: the canvas equals `seen` (read in the step's one host sync)
        self.forward_steps = 0
        self.reused_steps = 0

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def gen(self) -> torch.Tensor:
        return self.x[:, self.plen :]

    def set_gen(self, new: torch.Tensor) -> None:
        self.same = False  # the canvas changes: a reuse check made before does not hold any more
        if self.cfg.eos_fill:
            new = S.eos_fill(new, self.mask_id, self.stop_ids, self.eos_id)
        self.x[:, self.plen :] = new

    def forward(self) -> torch.Tensor:
        """Logits over the generated region [B, L, V] in float32, MASK at -inf, penalties applied (over its
        positions `logits_from`.. only, [B, L - logits_from, V], when a loop set it: greedy block decoding
        reads nothing left of its block).

        Rows that have nothing left to decode in the current window (`self.rows` excludes them) are not run
        through the model: their logits rows keep the previous step's values, which nothing reads."""
        cfg, rows = self.cfg, self.rows
        if self.kv is not None:
            self.forward_steps += 1
            return self.forward_cached()
        key = (None if rows is None else tuple(self.active), self.logits_from)
        same, self.same = self.same, False
        if same and key == self.seen_key and self.last_logits is not None:
            self.reused_steps += 1  # nothing changed since the last forward: its logits, no model call
            return self.last_logits
        self.forward_steps += 1
        x = self.x if rows is None else self.x[rows]
        attn = self.attn if rows is None or self.attn is None else self.attn[rows]
        if cfg.cfg_scale > 0:
            valid = self.valid if rows is None else self.valid[rows]
            un = x.clone()
            prompt_real = valid[:, : self.plen]
            un[:, : self.plen] = torch.where(prompt_real, torch.full_like(un[:, : self.plen], self.mask_id), un[:, : self.plen])
            inp = torch.cat([x, un])
            am = None if attn is None else torch.cat([attn, attn])
            logits = self.call_model(inp, am).float()
            cond, uncond = logits.chunk(2)
            logits = uncond + (cfg.cfg_scale + 1.0) * (cond - uncond)
            self.nfe += 2
            self.row_passes += inp.shape[0]
        else:
            logits = self.call_model(x, attn).float()
            self.nfe += 1
            self.row_passes += x.shape[0]
        logits = self.postprocess(logits, rows)
        if rows is not None:
            buf = self.last_logits
            if buf is None or buf.shape[1:] != logits.shape[1:]:
                buf = logits.new_empty((self.x.shape[0],) + tuple(logits.shape[1:]))
            buf[rows] = logits
            logits = buf
        self.last_logits = logits
        if self.reuse:
            if self.seen is None or self.seen.shape != self.x.shape:
                self.seen = self.x.clone()
            else:
                self.seen.copy_(self.x)
            self.seen_key = key
        return logits

    def call_model(self, x: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
        """The model's logits over the generated positions; a DiffusionLM is asked for those alone."""
        keep = self.L - self.logits_from
        if getattr(self.model, "accepts_logits_to_keep", False):
            return logits_of(self.model(x, attention_mask=attn, logits_to_keep=keep))[:, -keep:]
        return logits_of(self.model(x, attention_mask=attn))[:, -keep:]

    def postprocess(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """MASK at -inf and the repetition penalty, on logits of all or a window of the positions
        (of the batch rows `rows`, or all of them)."""
        if not getattr(self, "keep_mask_logit", False):  # SUBS; `dream` with mask_in_softmax keeps it
            logits[..., self.mask_id] = float("-inf")
        if self.cfg.repetition_penalty != 1.0:
            x, valid = (self.x, self.valid) if rows is None else (self.x[rows], self.valid[rows])
            S.apply_repetition_penalty(logits, x, valid & (x != self.mask_id), self.cfg.repetition_penalty)
        return logits

    def select_rows(self, region: torch.Tensor, first: list[int] | None = None) -> bool:
        """Set `self.rows` to the rows with masked positions left in `region`; False when there are none.
        One host-device sync per step (it replaces the `region.any()` test every loop needs anyway).
        first: a list to receive each row's first region position (region.shape[1]: none), in the same sync."""
        if self.cancelled is not None:
            self.cancel_rows(region)
        # forward reuse: whether the canvas equals the last forward's, read in the same sync
        check = self.reuse and self.seen is not None
        if first is None:
            if check:
                has, same = torch.stack([region.any(1), (self.x == self.seen).all(1)]).tolist()
                self.active, self.same = has, all(same)
            else:
                self.active = S.active_rows(region)
        else:
            has = region.any(1)
            pos = torch.where(has, region.int().argmax(1), region.shape[1])
            if check:
                got, same = torch.stack([pos, (self.x == self.seen).all(1).long()]).tolist()
                self.same = all(same)
            else:
                got = pos.tolist()
            first[:] = got
            self.active = [f < region.shape[1] for f in first]
        n = sum(self.active)
        if n == len(self.active) or self.kv is not None:
            self.rows = None
        else:
            self.rows = torch.tensor([i for i, on in enumerate(self.active) if on], device=self.x.device)
        return n > 0

    def cancel_rows(self, region: torch.Tensor) -> None:
        """Rows newly flagged by `cancelled()` become finished rows: their masked answer positions turn EOS
        and leave `region` (in place), so they skip the forward pass and draw no noise from here on."""
        for i, c in enumerate(self.cancelled()):
            if c and i not in self.dropped:
                self.dropped.add(i)
                row = self.x[i, self.plen :]
                row[row == self.mask_id] = self.eos_id
                region[i] = False

    def forward_cached(self) -> torch.Tensor:
        """Block methods with `cache`: a full pass at each block start (and every `cache_refresh` steps),
        otherwise only the window (prefix: block + suffix; dual: block), into the same logits buffer."""
        bs, be = self.block
        lo, hi = self.plen + bs, self.plen + (be if self.cfg.cache == "dual" else self.L)
        refresh = self.since_refresh is None or (
            self.cfg.cache_refresh is not None and self.since_refresh >= self.cfg.cache_refresh
        )
        self.nfe += 1
        self.row_passes += self.x.shape[0]
        if refresh:
            logits = self.kv.full(self.x, self.attn, lo, hi, logits_to_keep=self.L)[:, -self.L :].float()
            self.last_logits = self.postprocess(logits)
            self.since_refresh = 1
        else:
            part = self.kv.step(self.x).float()
            self.last_logits[:, lo - self.plen : hi - self.plen] = self.postprocess(part)
            self.since_refresh += 1
        return self.last_logits

    def conv_scales(self) -> torch.Tensor | None:
        """The conv window's s_i [B, L] for the methods that use it (`difflm.decoding.conv`), else None."""
        if not self.method.conv:
            return None
        k = self.cfg.effective_kernel_size()
        if self.conv_bounds is None:  # the window's index bounds, once per generate call
            self.conv_bounds = conv.conv_bounds(self.x.shape[1], k, self.x.device)
        return conv.window_scales(self.x, self.valid, self.mask_id, self.plen, k, self.cfg.conv_mult, self.conv_bounds)

    def whole(self) -> torch.Tensor:
        """The window of every generated position (methods without blocks)."""
        return torch.ones_like(self.gen, dtype=torch.bool)

    def notify(self) -> None:
        self.step += 1
        if self.callback is not None:
            self.callback({"step": self.step, "nfe": self.nfe, "x": self.x, "prompt_length": self.plen})

    # -- methods -----------------------------------------------------------------------------------
    def run(self) -> GenerateOutput:
        if self.method.runner is None:  # validated before; kept as a guard for new methods
            raise ConfigError(f"method {self.method.name!r} has no decoder", key="method")
        self.method.runner(self)  # `difflm.decoding.methods`: one runner per method
        filled = self.fill(self.whole())
        return GenerateOutput(self.x, self.nfe, self.plen, filled, self.step, self.row_passes, self.unmask_events,
                              self.forward_steps, self.reused_steps)

    def fill(self, window: torch.Tensor) -> torch.Tensor:
        """Positions of `window` still masked take the argmax of the last prediction (no extra NFE)."""
        left = (self.gen == self.mask_id) & window
        if left.any():
            if self.last_logits is None or (self.logits_from and left[:, : self.logits_from].any()):
                self.rows, self.logits_from = None, 0
                self.forward()
            lo = self.logits_from
            self.put(lo, torch.where(left[:, lo:], self.last_logits.argmax(-1), self.gen[:, lo:]))
        n = left.sum(1)
        self.unmask_events += n
        return n

    def put(self, lo: int, part: torch.Tensor) -> None:
        """The generated positions lo.. become `part` (EOS fill applied to the whole answer)."""
        self.same = False
        if self.cfg.eos_fill or lo == 0:
            new = self.gen.clone() if lo else part
            if lo:
                new[:, lo:] = part
            self.set_gen(new)
        else:
            self.x[:, self.plen + lo :] = part

    def run_blocks(self, inner) -> None:
        block = self.cfg.effective_block_length()
        n_blocks = self.cfg.answer_blocks(self.L)  # L / block; with total_length the last block may be shorter
        per_block, extra = divmod(self.cfg.steps, n_blocks)  # extra > 0 only with total_length: to the first blocks
        for bi in range(n_blocks):
            lo, hi = bi * block, min((bi + 1) * block, self.L)
            self.block, self.since_refresh = (lo, hi), None
            window = torch.zeros_like(self.gen, dtype=torch.bool)
            window[:, lo:hi] = True
            inner(window, per_block + (1 if bi < extra else 0))
            if self.method.kind == "mass":  # semi_ar: a block is finished before the next starts
                self.fill(window)

    def run_mass(self, window: torch.Tensor, n_steps: int) -> None:
        cfg = self.cfg
        ts = torch.linspace(1.0, _T_EPS, n_steps + 1, dtype=torch.float64).tolist()
        top_k = cfg.top_k if self.method.top_k else None
        for i in range(n_steps):
            region = (self.gen == self.mask_id) & window
            if not self.select_rows(region):
                break
            logits = self.forward()
            a, b, remask = _schedule_weights(cfg, ts[i], ts[i + 1])
            s_conv = self.conv_scales()
            old = self.gen.clone()
            new, unmasked = S.mass_step(
                logits, old, region, a, b, top_k=top_k, temperature=self.temperature, gens=self.gens, s_conv=s_conv,
                active=self.active,
            )
            self.unmask_events += unmasked.sum(1)
            if remask > 0:  # ReMDM loop: decoded answer tokens go back to MASK with probability eta
                u = S._rand(self.gens, (self.L,), old.device, active=self.active)  # finished rows stay finished
                back = (old != self.mask_id) & window & (u < remask)
                new = torch.where(back, torch.full_like(new, self.mask_id), new)
            self.set_gen(new)
            self.notify()

    def run_confidence(self, window: torch.Tensor, n_steps: int) -> None:
        cfg = self.cfg
        tau = cfg.effective_threshold()
        suppress = list(cfg.suppress_tokens or ())  # LLaDA-1.5's EOS/EoT rule: the generic path below
        greedy = self.temperature == 0 and cfg.remasking == "low_confidence" and not suppress
        # greedy decoding reads the logits from the first masked position of the window on (the model's
        # head skips the rest; the block's start is the first bound); the sampled variants keep the whole
        # region, so their noise draws stay as they were
        can_narrow = greedy and self.kv is None
        lo0 = self.block[0] if can_narrow else 0
        bxl = self.x.shape[0] * (self.L - lo0)
        self.logits_from, win0 = lo0, window[:, lo0:]
        lo = lo0
        first: list[int] = []
        if tau is None:  # the schedule on the host (one sync per block): no per-step count reads
            n_host = ((self.gen[:, lo0:] == self.mask_id) & win0).sum(1).tolist()
            sched = [[n // n_steps + (1 if i < n % n_steps else 0) for i in range(n_steps)] for n in n_host]
            schedule = torch.tensor(sched, dtype=torch.long, device=self.x.device).view(len(n_host), n_steps)
            kmax = [max(col) for col in zip(*sched)] if sched else [0] * n_steps
            # every row has the same masked positions count and commits the same number each step (no EOS
            # fill changes the masks): the greedy commit sorts a [B, per_row] confidence
            uniform = not cfg.eos_fill and len(set(n_host)) == 1
        max_iter = n_steps if tau is None else int(win0.sum(1).max().item())
        for i in range(max_iter):
            region = (self.gen[:, lo0:] == self.mask_id) & win0
            # the vocabulary from the last forward (before the first one, everything is masked anyway)
            narrow = can_narrow and self.last_logits is not None and (
                bxl * self.last_logits.shape[-1] >= _NARROW_EACH_STEP_FROM)
            # every row commits the same count of the same number of masked positions: one ranked sort
            per_row = n_host[0] - sum(sched[0][:i]) if greedy and tau is None and uniform and not self.dropped else None
            if per_row is not None and not narrow and self.cancelled is None:
                if per_row == 0:  # every row's masked positions are known on the host: no sync
                    break
                self.rows, self.active = None, [True] * len(n_host)
            elif not self.select_rows(region, first if narrow else None):
                break
            if narrow:  # from the first masked position of any row still decoding
                f = min(f for f, on in zip(first, self.active) if on)
                lo, region = lo0 + f, region[:, f:]
                self.logits_from = lo
            logits = self.forward()
            k = kmax[i] if tau is None else None
            scale = self.conv_scales()
            if scale is not None and lo:
                scale = scale[:, lo:]
            if greedy:  # float32 first, float64 where it decides; float64 directly when the work is small
                rows, cols = region.nonzero(as_tuple=True)
                small = S.GREEDY_GATHER_BELOW if per_row is not None else S.GREEDY_EXACT_BELOW
                if rows.numel() * logits.shape[-1] < small:
                    counts = schedule[:, i] if tau is None else None
                    vals = S.greedy_commit_at(logits, rows, cols, self.mask_id, counts=counts, kmax=k, per_row=per_row,
                                              tau=tau, scale=scale)
                    self.unmask_events.index_add_(0, rows, (vals != self.mask_id).long())
                    if cfg.eos_fill:
                        new = self.gen.clone()
                        new[:, lo:][rows, cols] = vals
                        self.set_gen(new)
                    else:  # committing MASK at a masked position changes nothing
                        self.x[:, self.plen + lo :][rows, cols] = vals
                        self.same = False
                    self.notify()
                    continue
                counts = schedule[:, i] if tau is None else None
                x0, sel = S.greedy_commit(logits, region, counts=counts, tau=tau, scale=scale, kmax=k)
            else:
                counts = schedule[:, i] if tau is None else None
                x0, conf = S.propose(logits, region, self.temperature, cfg.remasking, self.gens, self.active)
                if suppress and cfg.remasking == "low_confidence":
                    conf = torch.where(region, suppressed_confidence(logits, x0, region, suppress), conf)
                if scale is not None:
                    conf = torch.where(region, conf * scale, conf)
                sel = S.commit_top(conf, counts, k) if tau is None else S.commit_threshold(conf, tau)
            self.unmask_events += sel.sum(1)
            self.put(lo, torch.where(sel, x0, self.gen[:, lo:]))
            self.notify()


def _generate_ar(model, input_ids, attention_mask, cfg: DecodeConfig, eos_id, eot_id, row_seeds) -> GenerateOutput:
    """Autoregressive nucleus sampling (reference answers) with one torch.Generator per row.

    A small KV-cached loop instead of transformers' `generate`, which samples every row from torch's one
    global RNG (a row's tokens then change with its batch and position). Temperature and top-p come from
    transformers' own logits warpers; each step draws one uniform per row from that row's generator and
    inverts the row's CDF, so a row's tokens depend only on its seed, prompt and settings (up to the last
    bits of the logits, which differ between batch and single kernel paths). Temperature 0 is greedy.
    Left padding is handled with position ids from the attention mask, as `generate` does. A row stops at
    EOS/EOT (the rest becomes EOS); the loop stops when every row has stopped. nfe counts forward passes.
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    module = getattr(model, "module", model)
    stop_ids = list(stop_ids_from(eos_id, eot_id))
    temperature = cfg.effective_temperature()
    device = input_ids.device
    bsz, plen = input_ids.shape
    warpers = LogitsProcessorList()
    if temperature > 0:
        warpers.append(TemperatureLogitsWarper(temperature))
        if cfg.effective_top_p() < 1.0:
            warpers.append(TopPLogitsWarper(cfg.effective_top_p()))
    gens = _generators(row_seeds, device)
    stops = torch.tensor(stop_ids, device=device)
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    position_ids = (am.cumsum(-1) - 1).clamp(min=0)
    seq, step_ids, past = input_ids, input_ids, None
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    produced = torch.zeros(bsz, dtype=torch.long, device=device)
    nfe = 0
    # transformers 5.x renames the forward's `past_key_values` to `cache` (the old name goes in 5.40)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft wraps the model
    params = inspect.signature(base.forward).parameters
    cache_key = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # not [B, P, V] prompt logits
    for _ in range(cfg.gen_length):
        cache_kw = {} if past is None else {cache_key: past}
        out = module(input_ids=step_ids, attention_mask=am, position_ids=position_ids, use_cache=True,
                     **cache_kw, **extra)
        nfe += 1
        past = getattr(out, "cache", None)
        past = out.past_key_values if past is None else past
        logits = out.logits[:, -1, :]
        # sample in at least float32, in the model's precision when it is higher (float64 in tests)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature > 0:
            probs = warpers(seq, logits).softmax(-1)
            cdf = probs.cumsum(-1)
            u = S._rand(gens, (1,), device, dtype=cdf.dtype).squeeze(1)  # one uniform per row, its own generator
            nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            nxt = nxt.clamp(max=cdf.shape[1] - 1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        produced += (~done).long()  # tokens the row drew (its stop included), not the EOS after it
        seq = torch.cat([seq, nxt[:, None]], 1)
        done = done | torch.isin(nxt, stops)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        position_ids = position_ids[:, -1:] + 1
    gen = seq[:, plen:]
    if gen.shape[1] < cfg.gen_length:
        pad = torch.full((bsz, cfg.gen_length - gen.shape[1]), eos_id, dtype=gen.dtype, device=gen.device)
        gen = torch.cat([gen, pad], 1)
    gen = S.eos_fill(gen, -1, stop_ids, eos_id)
    seq = torch.cat([input_ids, gen], 1)
    return GenerateOutput(seq, nfe, plen, torch.zeros(bsz, dtype=torch.long, device=device), nfe, nfe * bsz, produced,
                          nfe)
