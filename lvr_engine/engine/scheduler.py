"""Continuous batching on the latent engine: a fixed pool of rows over one preallocated KV cache.

A :class:`Scheduler` owns a pool of ``max_batch`` rows, each ``max_len`` cache slots long (a
:class:`StaticKVCache` of shape (L, max_batch, Hkv, max_len, D), allocated once). Requests wait in a FIFO
queue; every :meth:`Scheduler.step` is one iteration:

1. **sample**: every row in its decoding phase whose last forward produced a hidden state gets its next token
   (one LM-head call over those rows, then each row's own sampler); rows that hit EOS or ``max_new_tokens``
   leave the pool, and cancelled requests leave it too;
2. **layout**: the rows that run a forward this iteration are grouped by what the forward is: decoding (a chunk
   of C = 1 per row) or latent step t of a request with K patches (C = K+1, or K+2 on the last step when the
   config has an end marker). ``runner.step`` appends the same C positions to every row of the cache it is
   given, so each group must occupy a contiguous range of pool rows: the groups are laid out one after another
   from row 0 (in the order of their rows' current mean position, so most rows stay put) and a row that is
   outside its group's range is *moved*: its K/V (only its ``lens`` valid slots), cache length and per-row state
   (position offset, last hidden state, next token, image slots/embeddings, accumulated scores, used patches)
   are copied to a row inside the range, all moves of an iteration in one gather/scatter per tensor. A request
   moves about twice in its life (when it is admitted and when its latent segment ends), and once more when a
   row before it leaves;
3. **admit**: waiting requests take the free rows after the groups and are prefilled there (the vision tower, the
   prompt and the first image scores: ``prepare_prompt`` + ``runner.prefill`` on ``cache.rows``), within a
   prompt-token budget per iteration, one request per prefill (see :meth:`Scheduler._prefill` for why);
4. **forward**: one ``runner.step`` per group on its rows (``cache.rows(r0, r1)``): a latent group builds its
   blocks with the engine's one latent step (``latent_block`` + ``segment_chunk`` of engine/latent_step.py) and
   accumulates the next step's scores, a decode group feeds the sampled tokens (Mirage rows inside a latent
   segment feed their hidden state instead).

So rows at different phases share an iteration (a prefill, a latent step of one request, a decode step of another)
in one forward per chunk width instead of one per request, and every request's tokens and selections are what
``LatentGenerator.generate`` gives it alone (docs/semantics.md, "Batching"): the same prompt preparation, the same
latent step and the same forwards, on its own cache row.

Per-request options: sampling (greedy or temperature / top-k / top-p with a seed), stop tokens,
``max_new_tokens``, and for ``trigger="prompt"`` models the number of latent steps N and patches K. Markers,
positions, patch order and score precision are the loaded model's (its ``LatentConfig``). A request that can
never fit a row (prompt + latent positions + ``max_new_tokens`` > ``max_len``) or is invalid is a ``ValueError``
at :meth:`Scheduler.submit`, before it touches the pool. CUDA graphs are not used here (the groups' shapes change
every iteration).

:class:`BackgroundScheduler` runs the iterations on a thread of its own (the server's engine thread).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .inputs import as_tensor, consume_placeholders, int_value, validate_and_layout
from .kv_cache import StaticKVCache
from .latent_step import begin_segment, latent_block, mirage_switch, segment_chunk
from .prompt import PreparedPrompt, next_positions, prepare_prompt
from .sampler import Sampler, SamplingParams

log = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class Request:
    """One prompt for the scheduler, in the processor's layout for a single row.

    Shapes: ``input_ids``/``attention_mask``/``mm_token_type_ids`` (S,) or (1, S); ``pixel_values``
    (num_patches, C*T*P*P) and ``image_grid_thw`` (num_images, 3) as the processor returns them (None without
    images). ``num_latent_steps``/``num_selected_patches``: None takes the generator's config (``trigger="prompt"``
    models only). ``eos_token_id``: None is the model's EOS ids, ``[]`` no stop token.
    """

    input_ids: object
    attention_mask: object = None
    pixel_values: object = None
    image_grid_thw: object = None
    mm_token_type_ids: object = None
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_latent_steps: int | None = None
    num_selected_patches: int | None = None
    eos_token_id: object = None


# listener(seq, new_tokens, finished): called on the scheduler's thread after each iteration that changed seq
Listener = Callable[["Sequence", list, bool], None]


@dataclass(eq=False)
class Sequence:
    """A request's life in the pool. ``tokens``: generated ids so far (up to and including EOS, latent steps of a
    Mirage row as ``latent_pad_id``, as ``generate`` returns them); ``selected``: per latent step the K chosen
    image-token indices in fed order. ``finish_reason``: "stop" (EOS), "length" (``max_new_tokens``),
    "cancelled", "error" (``error`` says why). Times are ``time.perf_counter()`` seconds."""

    id: int
    num_latent_steps: int
    num_selected_patches: int
    max_new_tokens: int
    prompt_tokens: int                 # attended prompt tokens (trailing latent placeholders excluded)
    status: str = WAITING
    tokens: list = field(default_factory=list)
    selected: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    # -- scheduler state --------------------------------------------------------------------------------------
    row: int | None = None             # pool row while running
    phase: str = "latent"              # "latent" (prompt-trigger segment) or "decode"
    step_index: int = 0                # latent steps done
    pending: bool = False              # decode phase: the last forward's hidden state awaits sampling
    length: int = 0                    # cache slots the row holds (host copy of cache.lens[row])
    mirage_latent: bool = False        # trigger="token": inside a latent segment
    mirage_count: int = 0              # latent steps fed in the current segment
    use_start: bool = False            # the prompt ends with the start marker (N > 0 and the config has one)
    use_end: bool = False              # the last latent step carries the end marker
    inputs: dict = field(default_factory=dict, repr=False)
    eos: list = field(default_factory=list, repr=False)
    sampler: Sampler | None = field(default=None, repr=False)
    listener: Listener | None = field(default=None, repr=False)
    cancel_requested: bool = False
    cancel_reason: str = "cancelled"
    _sent: int = 0                     # tokens already passed to the listener

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


@dataclass
class StepReport:
    """What one iteration did: the requests admitted (prefilled), each forward as (kind, chunk width C, request
    ids in row order) with kind "prefill", "latent" or "decode", the requests that finished, and rows moved."""

    admitted: list = field(default_factory=list)
    forwards: list = field(default_factory=list)
    finished: list = field(default_factory=list)
    moved_rows: int = 0


@dataclass
class SchedulerStats:
    """Counters since start (monotonic), read by the server's /metrics."""

    submitted: int = 0
    finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    latent_steps: int = 0             # per row: one per latent step (prompt-trigger) or fed hidden state (Mirage)
    forward_passes: int = 0
    iterations: int = 0
    moved_rows: int = 0


class Scheduler:
    """Continuous batching over ``generator``'s model and runner (see the module docstring).

    ``max_batch``: rows in the pool; ``max_len``: cache slots per row (prompt + start marker + latent positions
    + generated tokens of one request must fit); ``max_prefill_tokens``: prompt tokens admitted per iteration
    (at least one request). Memory: the KV cache (2 x L x max_batch x Hkv x max_len x D in the compute dtype) is
    allocated here; the per-row image tensors grow with the widest admitted image (at most ``max_len``).
    :meth:`submit` may be called from any thread; :meth:`step` from one thread at a time.
    """

    def __init__(self, generator, max_batch: int = 16, max_len: int = 2048, max_prefill_tokens: int = 8192):
        self.gen = generator
        self.max_batch = int_value("max_batch", max_batch, 1)
        self.max_len = int_value("max_len", max_len, 2)
        self.max_prefill_tokens = int_value("max_prefill_tokens", max_prefill_tokens, 1)
        cfg = generator._checked_config()
        self.config = cfg
        self.adapter = generator.adapter
        self.runner = generator.runner
        w = self.runner.w
        limit = getattr(self.adapter.text_config, "max_position_embeddings", None)
        if limit is not None and self.max_len > int(limit):
            raise ValueError(f"max_len={self.max_len} is more than the model's max_position_embeddings={limit}")
        self.device, self.dtype = generator.device, self.runner.compute_dtype
        P, dev, dt = self.max_batch, self.device, self.dtype
        hidden = w.embed.weight.shape[1]
        self.cache = StaticKVCache(len(w.layers), P, w.num_kv_heads, self.max_len, w.head_dim, dt, dev)
        self.offset = torch.zeros(P, dtype=torch.long, device=dev)           # (P,) position offset per row
        self.h_last = torch.zeros(P, hidden, dtype=dt, device=dev)           # (P, h) last final-norm hidden state
        self.next_tok = torch.zeros(P, dtype=torch.long, device=dev)         # (P,) token the next decode step feeds
        self.feed_hidden = torch.zeros(P, dtype=torch.bool, device=dev)      # (P,) Mirage: feed h_last instead
        self.image_slots = torch.full((P, 0), -1, dtype=torch.int32, device=dev)  # (P, I) -1 = pad
        self.image_embeds = torch.zeros(P, 0, hidden, dtype=dt, device=dev)  # (P, I, h)
        self.scores = torch.zeros(P, 0, dtype=torch.float32, device=dev)     # (P, I) accumulated scores
        self.available = torch.zeros(P, 0, dtype=torch.bool, device=dev)     # (P, I) not chosen yet
        self._pool_tensors = ("offset", "h_last", "next_tok", "feed_hidden", "image_slots", "image_embeds", "scores",
                              "available")
        self.prompt_trigger = cfg.trigger == "prompt"
        self._end_embed = None
        if cfg.end_marker_id is not None:
            self._end_embed = self.runner.embed(torch.tensor([cfg.end_marker_id], device=dev))[0]
        # the segment settings every latent group shares (patch order, score rounding), from begin_segment
        empty = PreparedPrompt(None, None, None, None, torch.full((0, 0), -1, dtype=torch.int32, device=dev),
                               torch.zeros(0, 0, hidden, dtype=dt, device=dev))
        self._seg_proto = begin_segment(empty, 0, 0, patch_order=cfg.patch_order,
                                        score_precision=cfg.score_precision, model_dtype=self.adapter.dtype,
                                        num_score_terms=len(w.layers) * w.num_heads, backend=cfg.backend)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards waiting and the cancel flags (submit/cancel come from other threads)

    # ------------------------------------------------------------------------------------------------------------
    # submission
    # ------------------------------------------------------------------------------------------------------------
    def submit(self, request: Request, listener: Listener | None = None) -> Sequence:
        """Validate ``request`` (ValueError/TypeError naming the problem, before it touches the pool) and queue it.
        ``listener(seq, new_tokens, finished)`` is called on the scheduler's thread as tokens arrive."""
        seq = self.prepare(request)
        seq.listener = listener
        seq.submitted_at = time.perf_counter()
        with self._lock:
            self.waiting.append(seq)
            self.stats.submitted += 1
        return seq

    def prepare(self, r: Request) -> Sequence:
        """The checked :class:`Sequence` of a request (not queued)."""
        if not isinstance(r, Request):
            raise TypeError(f"submit takes a scheduler.Request, got {type(r).__name__}")
        cfg, ad = self.config, self.adapter
        if self.prompt_trigger:
            N = cfg.num_latent_steps if r.num_latent_steps is None else int_value("num_latent_steps",
                                                                                 r.num_latent_steps, 0)
            K = cfg.num_selected_patches if r.num_selected_patches is None else int_value(
                "num_selected_patches", r.num_selected_patches, 0)
            K = K if N > 0 else 0
        else:
            for name in ("num_latent_steps", "num_selected_patches"):
                if getattr(r, name) not in (None, 0):
                    raise ValueError(f"{name} does not apply: this model switches into latent mode by itself "
                                     "(trigger='token', Mirage)")
            N = K = 0
        if N > 0 and K > 0 and not ad.is_multimodal:
            raise ValueError(f"num_selected_patches={K} > 0 needs image tokens, but {type(ad.model).__name__} is a "
                             "text-only model; use num_selected_patches=0")
        max_new = r.max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r}")
        sampling = SamplingParams(r.do_sample, r.temperature, r.top_k, r.top_p, r.seed)
        eos = self.gen._eos_ids(r.eos_token_id, ad.vocab_size)
        ids = _one_row("input_ids", as_tensor("input_ids", r.input_ids), torch.long)
        mask = _one_row("attention_mask", as_tensor("attention_mask", r.attention_mask), torch.long)
        mm = _one_row("mm_token_type_ids", as_tensor("mm_token_type_ids", r.mm_token_type_ids), None)
        pv, grid = as_tensor("pixel_values", r.pixel_values), as_tensor("image_grid_thw", r.image_grid_thw)
        if isinstance(pv, torch.Tensor):
            pv = pv.detach().cpu()
        if isinstance(grid, torch.Tensor):
            grid = grid.cpu()
        if self.prompt_trigger and cfg.placeholder_id is not None:  # as generate: the official trailing placeholders
            mask = consume_placeholders(ids, mask, cfg.placeholder_id, N, cfg.end_marker_id if N > 0 else None)
        batch = validate_and_layout(ad, ids, mask, pv, grid, mm, max_new, N, K)
        use_start = N > 0 and cfg.start_marker_id is not None
        use_end = N > 0 and cfg.end_marker_id is not None
        prompt = int(batch.lens[0])
        latent_len = N * (K + 1) + int(use_start) + int(use_end)
        total = prompt + latent_len + max_new
        if total > self.max_len:
            raise ValueError(f"the request needs {total} positions ({prompt} prompt + {latent_len} latent + "
                             f"max_new_tokens={max_new}) but a pool row holds max_len={self.max_len}; "
                             "shorten the prompt or lower max_new_tokens")
        seq = Sequence(id=next(self._ids), num_latent_steps=N, num_selected_patches=K, max_new_tokens=max_new,
                       prompt_tokens=prompt)
        seq.use_start, seq.use_end = use_start, use_end
        seq.inputs = dict(input_ids=ids, attention_mask=batch.mask, pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=mm, image_tokens=batch.image_counts[0])
        seq.eos = eos
        seq.sampler = Sampler(sampling, self.device)
        seq.phase = "latent" if N > 0 else "decode"
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Ask for ``seq`` to leave: it is dropped (its row freed) at the start of the next iteration and finishes
        with ``reason`` ("cancelled": the client went away; "stop": a stop string the caller found)."""
        with self._lock:
            if not seq.cancel_requested:
                seq.cancel_requested, seq.cancel_reason = True, reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------------------------------------------------
    # one iteration
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepReport:
        """One iteration: sample, evict, lay out the groups, admit and prefill, one forward per group."""
        rep = StepReport()
        weights = self.runner.forward_weights()  # read once per iteration, passed to every forward
        self._drop_cancelled(rep)
        self._sample(weights, rep)
        groups = self._layout(rep)
        self._admit(weights, rep)
        for key, r0, seqs in groups:
            if key[0] == "latent":
                self._latent_forward(key[1], key[2], r0, seqs, weights)
            else:
                self._decode_forward(r0, seqs, weights)
            rep.forwards.append((key[0], key[-1], [s.id for s in seqs]))
        self.stats.forward_passes += len(groups)
        self.stats.iterations += 1
        self._notify(rep)
        return rep

    def _finish(self, seq: Sequence, reason: str, rep: StepReport | None, error: str | None = None) -> None:
        seq.status, seq.finish_reason, seq.error = FINISHED, reason, error
        seq.finished_at = time.perf_counter()
        if seq.row is not None:
            self.running.remove(seq)
            seq.row = None
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        seq.inputs = {}
        if rep is not None:
            rep.finished.append(seq)

    def _drop_cancelled(self, rep: StepReport) -> None:
        with self._lock:
            gone = [s for s in self.waiting if s.cancel_requested]
            for s in gone:
                self.waiting.remove(s)
        for s in gone + [s for s in self.running if s.cancel_requested]:
            self._finish(s, s.cancel_reason, rep)

    def _sample(self, weights, rep: StepReport) -> None:
        """Next token of every decode-phase row whose hidden state is fresh; rows that end leave the pool."""
        pend = [s for s in self.running if s.phase == "decode" and s.pending]
        if not pend:
            return
        rows = torch.tensor([s.row for s in pend], device=self.device)
        logits = self.runner.logits(self.h_last[rows], weights)  # (n, V)
        greedy = logits.argmax(dim=-1)
        toks = []
        for i, s in enumerate(pend):
            toks.append(greedy[i] if not s.sampler.p.do_sample else s.sampler(logits[i:i + 1])[0])
        toks = torch.stack(toks).tolist()
        cfg = self.config
        now = time.perf_counter()
        cont_rows, cont_toks, cont_feed = [], [], []
        if not self.prompt_trigger:  # Mirage (docs/semantics.md): the rows' switching, as generate's
            was = [s.mirage_latent for s in pend]
            shown, feeds, lat, cnt = (t.tolist() for t in mirage_switch(
                cfg, torch.tensor(toks), torch.tensor(was), torch.tensor([s.mirage_count for s in pend])))
        for i, (s, tok) in enumerate(zip(pend, toks, strict=True)):
            s.pending = False
            feed = False
            if self.prompt_trigger:
                first = not s.tokens
                stop = tok in s.eos and not (first and cfg.ignore_first_eos)  # official IVT-LR: no first-token check
            else:
                tok, feed = shown[i], feeds[i]
                stop = not was[i] and tok in s.eos
                s.mirage_latent, s.mirage_count = lat[i], cnt[i]
                self.stats.latent_steps += int(feed)
            s.tokens.append(tok)
            if s.first_token_at is None:
                s.first_token_at = now
            self.stats.generated_tokens += 1
            if stop:
                self._finish(s, "stop", rep)
            elif len(s.tokens) >= s.max_new_tokens:
                self._finish(s, "length", rep)
            else:
                cont_rows.append(s.row)
                cont_toks.append(tok)
                cont_feed.append(feed)
        if cont_rows:
            idx = torch.tensor(cont_rows, device=self.device)
            self.next_tok[idx] = torch.tensor(cont_toks, device=self.device)
            self.feed_hidden[idx] = torch.tensor(cont_feed, device=self.device)

    def _group_key(self, s: Sequence) -> tuple:
        if s.phase == "decode":
            return ("decode", 1)
        K = s.num_selected_patches
        last = s.step_index == s.num_latent_steps - 1
        return ("latent", K, K + 1 + int(last and s.use_end))

    def _layout(self, rep: StepReport) -> list[tuple[tuple, int, list[Sequence]]]:
        """Group the running rows by forward (key) and make each group a contiguous range of rows from 0, moving
        the rows that are outside their range. Returns [(key, first row, seqs in row order)]."""
        groups: dict[tuple, list[Sequence]] = {}
        for s in self.running:
            groups.setdefault(self._group_key(s), []).append(s)
        order = sorted(groups, key=lambda k: (sum(s.row for s in groups[k]) / len(groups[k]), k))
        out, src, dst, moved = [], [], [], []
        pos = 0
        for key in order:
            seqs = groups[key]
            r0, r1 = pos, pos + len(seqs)
            stay = {s.row for s in seqs if r0 <= s.row < r1}
            free = iter(r for r in range(r0, r1) if r not in stay)
            for s in seqs:
                if not r0 <= s.row < r1:
                    r = next(free)
                    src.append(s.row)
                    dst.append(r)
                    moved.append(s)
                    s.row = r
            out.append((key, r0, sorted(seqs, key=lambda s: s.row)))
            pos = r1
        if src:
            self._move_rows(src, dst, max(s.length for s in moved))
            rep.moved_rows += len(src)
            self.stats.moved_rows += len(src)
        return out

    def _move_rows(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy pool rows src -> dst (all at once: the sources are read before any write, so the moves may form
        chains and cycles): the first ``length`` K/V slots, the cache length and every per-row tensor."""
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        c = self.cache
        c.k[:, d, :, :length] = c.k[:, s, :, :length]
        c.v[:, d, :, :length] = c.v[:, s, :, :length]
        c.lens[d] = c.lens[s]
        for name in self._pool_tensors:
            t = getattr(self, name)
            t[d] = t[s]

    def _ensure_image_width(self, width: int) -> None:
        """Widen the per-row image tensors to at least ``width`` image tokens (in steps of 64, kept)."""
        have = self.image_slots.shape[1]
        if width <= have:
            return
        new = min(max(-(-width // 64) * 64, have), self.max_len)
        new = max(new, width)
        P = self.max_batch

        def widen(t, fill):
            out = t.new_full((P, new) + tuple(t.shape[2:]), fill)
            out[:, :have] = t
            return out

        self.image_slots = widen(self.image_slots, -1)
        self.image_embeds = widen(self.image_embeds, 0)
        self.scores = widen(self.scores, 0)
        self.available = widen(self.available, False)

    def _admit(self, weights, rep: StepReport) -> None:
        """Waiting requests (FIFO) into the free rows after the running ones, within the prompt-token budget
        (at least one request), each prefilled on its own row."""
        free = self.max_batch - len(self.running)
        take, budget = [], 0
        with self._lock:
            while self.waiting and len(take) < free:
                s = self.waiting[0]
                if take and budget + s.prompt_tokens > self.max_prefill_tokens:
                    break
                take.append(self.waiting.popleft())
                budget += s.prompt_tokens
        for s in take:
            try:
                self._prefill(s, len(self.running), weights)
            except Exception as e:  # noqa: BLE001 - a request that breaks its prefill fails alone; the pool goes on
                log.exception("prefill of request %d failed", s.id)
                self._finish(s, "error", rep, error=f"{type(e).__name__}: {e}")
                continue
            rep.admitted.append(s)
            rep.forwards.append(("prefill", None, [s.id]))
            self.stats.forward_passes += 1

    def _prefill(self, s: Sequence, row: int, weights) -> None:
        """The request's prompt (vision tower, image embeddings, positions, the start marker of a latent request
        when the config has one: ``prepare_prompt``) prefilled into pool row ``row`` with ``runner.prefill``, the
        first image scores accumulated when its latent steps select patches.

        One request per prefill: a batched prefill pads the prompts to a common width, and its rows can differ from
        a prefill of the prompt alone in the last bits (matmuls of other shapes), enough to change a bf16 model's
        greedy tokens; alone, the row is bitwise what ``generate`` computes for the request alone. The latent and
        decode steps are batched across rows without that effect (the tests check it)."""
        cfg, ad, x = self.config, self.adapter, s.inputs
        batch = validate_and_layout(ad, x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_grid_thw"],
                                    x["mm_token_type_ids"], 1, 0, 0)
        p = prepare_prompt(ad, self.runner.embed, batch, x["input_ids"], x["pixel_values"], x["image_grid_thw"],
                           x["mm_token_type_ids"], cfg.position_mode, cfg.start_marker_id if s.use_start else None,
                           self.device, self.dtype)
        rows = slice(row, row + 1)
        width = p.image_slots.shape[1]
        self._ensure_image_width(width)
        self.image_slots[rows] = -1
        self.image_slots[rows, :width] = p.image_slots
        self.image_embeds[rows, :width] = p.image_embeds
        self.available[rows] = self.image_slots[rows] >= 0
        self.scores[rows] = 0
        self.offset[rows] = p.offset
        self.feed_hidden[rows] = False
        select = s.num_latent_steps > 0 and s.num_selected_patches > 0
        s.row, s.status = row, RUNNING  # taken before the forward: a failure frees it
        self.running.append(s)
        h = self.runner.prefill(p.embeds, p.positions, p.lens, self.cache.rows(row, row + 1),
                                p.image_slots if select else None, self.scores[rows, :width] if select else None,
                                last_only=True, weights=weights, prob_dtype=self._seg_proto.prob_dtype)
        self.h_last[rows] = h[:, 0]
        s.length = int(p.lens[0])
        s.pending = s.phase == "decode"
        s.inputs = {}
        self.stats.prompt_tokens += s.prompt_tokens

    def _rows_view(self, r0: int, seqs: list[Sequence]) -> StaticKVCache:
        view = self.cache.rows(r0, r0 + len(seqs))
        view.filled = max(s.length for s in seqs)  # the overflow check of runner.step reads it
        return view

    def _latent_forward(self, K: int, C: int, r0: int, seqs: list[Sequence], weights) -> None:
        """One latent step of every row in the group (same K, same chunk width C): engine/latent_step.py's block,
        scores accumulated for the rows' next steps."""
        r1 = r0 + len(seqs)
        last = C == K + 2  # the chunk carries the end marker: the segment's last step for every row
        seg = dataclasses.replace(self._seg_proto, num_steps=0, k=K, image_embeds=self.image_embeds[r0:r1],
                                  image_slots=self.image_slots[r0:r1], scores=self.scores[r0:r1],
                                  available=self.available[r0:r1], end_embed=self._end_embed if last else None,
                                  selected=[])
        block = latent_block(seg, self.h_last[r0:r1])
        chunk = segment_chunk(seg, block, last)
        with_scores = K > 0 and any(s.step_index < s.num_latent_steps - 1 for s in seqs)
        view = self._rows_view(r0, seqs)
        out = self.runner.step(chunk, next_positions(view.lens, self.offset[r0:r1], C), view,
                               seg.image_slots if with_scores else None, seg.scores if with_scores else None,
                               last_only=True, weights=weights, prob_dtype=seg.prob_dtype)
        self.h_last[r0:r1] = out[:, -1]
        chosen = seg.selected[-1].tolist()
        for i, s in enumerate(seqs):
            s.selected.append(chosen[i])
            s.step_index += 1
            s.length += C
            if s.step_index == s.num_latent_steps:
                s.phase, s.pending = "decode", True
        self.stats.latent_steps += len(seqs)

    def _decode_forward(self, r0: int, seqs: list[Sequence], weights) -> None:
        """One decode step of every row in the group: the sampled token (or, for a Mirage row inside a latent
        segment, its last hidden state)."""
        r1 = r0 + len(seqs)
        x = self.runner.embed(self.next_tok[r0:r1])
        if not self.prompt_trigger:
            x = torch.where(self.feed_hidden[r0:r1, None], self.h_last[r0:r1], x)
        view = self._rows_view(r0, seqs)
        hidden = self.runner.step(x[:, None], next_positions(view.lens, self.offset[r0:r1], 1), view, None, None,
                                  weights=weights)
        self.h_last[r0:r1] = hidden[:, -1]
        for s in seqs:
            s.length += 1
            s.pending = True

    def _notify(self, rep: StepReport) -> None:
        done = {s.id for s in rep.finished}
        for s in itertools.chain(self.running, rep.finished):
            new = s.tokens[s._sent:]
            if s.listener is None or not (new or s.id in done):
                continue
            s._sent = len(s.tokens)
            try:
                s.listener(s, new, s.finished)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the pool
                log.exception("listener of request %d failed", s.id)

    def fail_all(self, error: str) -> list[Sequence]:
        """Finish every running request with ``error`` (after a forward failed: their rows are suspect)."""
        rep = StepReport()
        for s in list(self.running):
            self._finish(s, "error", rep, error=error)
        self._notify(rep)
        return rep.finished


def _one_row(name: str, x, dtype) -> torch.Tensor | None:
    """x as a (1, S) CPU tensor (a list, (S,) or (1, S) accepted); None stays None."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        x = torch.tensor(x, dtype=dtype or torch.long)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a list of ints, got {type(x).__name__}")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"{name} must be one row, (S,) or (1, S); got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    return x.to(dtype) if dtype is not None and x.dtype != dtype and not x.is_floating_point() else x


class BackgroundScheduler:
    """Runs a :class:`Scheduler`'s iterations while there is work: on a thread of its own (:meth:`start`), or on the
    calling thread (:meth:`run`, what ``lvr serve`` does with the main thread: on CPU, torch's OpenMP parallel
    regions started from any other thread than the process's first one run 1.3-1.5x slower here, with 2 threads).
    ``submit``/``cancel`` are thread-safe; listeners are called on the loop's thread. If an iteration raises, the
    running requests fail with the error and the pool keeps serving new ones."""

    def __init__(self, scheduler: Scheduler, rate_window_s: float = 10.0):
        self.scheduler = scheduler
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._window = rate_window_s
        self._samples: deque = deque()  # (time, generated tokens, latent steps) per iteration

    def start(self) -> "BackgroundScheduler":
        """Run the loop on a new thread (returns at once)."""
        self._thread = threading.Thread(target=self.run, name="lvr-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Make the loop return (after the iteration in progress); join the thread :meth:`start` made."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the loop runs (on any thread)."""
        return self._running

    def submit(self, request: Request, listener: Listener | None = None) -> Sequence:
        seq = self.scheduler.submit(request, listener)
        with self._cv:
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        self.scheduler.cancel(seq, reason)
        with self._cv:
            self._cv.notify_all()

    def wake(self) -> None:
        """Make an idle loop re-check its ``until`` condition now."""
        with self._cv:
            self._cv.notify_all()

    def rates(self) -> tuple[float, float]:
        """(generated tokens/s, latent steps/s) over the last ``rate_window_s`` seconds."""
        now = time.perf_counter()
        st = self.scheduler.stats
        samples = list(self._samples)
        old = [x for x in samples if x[0] >= now - self._window]
        if not old:
            return 0.0, 0.0
        t0, g0, l0 = old[0]
        span = max(now - t0, 1e-6)
        return (st.generated_tokens - g0) / span, (st.latent_steps - l0) / span

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The loop, on the calling thread: iterate while there is work, wait when there is none; return after
        :meth:`stop`, or when ``until()`` is true while the pool is idle (checked at least once a second)."""
        sched = self.scheduler
        self._running = True
        try:
            while True:
                with self._cv:
                    while not self._stop and not sched.has_work():
                        if until is not None and until():
                            return
                        self._cv.wait(timeout=1.0)
                    if self._stop:
                        return
                now = time.perf_counter()
                self._samples.append((now, sched.stats.generated_tokens, sched.stats.latent_steps))
                while self._samples and self._samples[0][0] < now - 2 * self._window:
                    self._samples.popleft()
                try:
                    sched.step()
                except Exception as e:  # noqa: BLE001 - fail the rows in flight, keep serving
                    log.exception("scheduler iteration failed")
                    sched.fail_all(f"{type(e).__name__}: {e}")
        finally:
            self._running = False
