"""Causal mediation analysis of latent reasoning, CapImagine style, on the engine.

The chain is input (treatment) -> latent steps (mediator) -> answer (outcome). Two measurements:

- **input -> latent** (:func:`latent_sensitivity`): run a batch as is and with perturbed inputs (pixel noise,
  a blank image, another row's image) and compare, per latent step, the latent text ``h_t`` (cosine,
  relative L2 change), the pooled latent vision ``z_t`` (cosine) and the selected patch sets (Jaccard). The
  reference scale is the same change measured on the ordinary prompt's last hidden state (the model with
  no latent segment): latents that move much less than it barely react to the input.
- **latent -> answer** (:func:`answer_sensitivity`): intervene on the latent blocks through the engine's
  ``latent_hook`` (zero ``h_t``, matched-norm noise for ``h_t``, another row's block, random image patches for
  ``z_t``) and count how many answers change; the first answer token's KL divergence and the drop of the
  clean top token's probability give a graded effect.

:func:`mediation_readout` condenses the set into the handful of numbers CapImagine's argument turns on (answer
flip rates under zeroed / swapped / random-patch latents with the swap's ceiling, the latents' change when the image
is swapped, and their collapse: :func:`pairwise_cosine` across questions), each next to its reference scale.

Everything runs batched through :meth:`LatentGenerator.generate` (``latent_hook`` / ``return_latents``); the
latent step itself is never re-implemented here. The only extra observation is the hidden state that
produces the first answer token and its logits, read by wrapping ``generator.runner.logits`` for the
duration of one call.

Needs ``trigger="prompt"`` with ``num_latent_steps >= 1`` (IVT-LR / Coconut). Answers are greedy
(``do_sample=False``).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "RunRecord",
    "record_run",
    "Perturbation",
    "identity",
    "pixel_noise",
    "blank_image",
    "swap_images",
    "Intervention",
    "InterventionContext",
    "no_intervention",
    "zero_hidden",
    "noise_hidden",
    "swap_blocks",
    "shuffle_patches",
    "LatentSensitivity",
    "AnswerSensitivity",
    "MediationReport",
    "latent_sensitivity",
    "answer_sensitivity",
    "run_mediation",
    "pairwise_cosine",
    "mediation_readout",
    "first_token_answer",
    "letter_answer",
]

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


# --------------------------------------------------------------------------------------------------
# one observed run


@dataclass
class RunRecord:
    """One greedy generate() call, observed. Tensors on CPU; float ones in float32.

    sequences (B, T); selected (B, N, K); latents (B, N, K+1, h) each step's fed block [z_t; h_t] (after any
    hook); final_hidden (B, h) the hidden state that produces the first answer token (after the latent
    segment and end marker; the prompt's last hidden state when N = 0); first_logits (B, V) its logits.
    """

    sequences: torch.Tensor
    selected: torch.Tensor
    latents: torch.Tensor | None
    final_hidden: torch.Tensor
    first_logits: torch.Tensor


def _batch_args(batch) -> dict:
    missing = [k for k in ("input_ids",) if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}")
    return {k: batch[k] for k in BATCH_KEYS if k in batch and batch[k] is not None}


def record_run(generator, batch, latent_hook=None, max_new_tokens: int = 1, **generate_kwargs) -> RunRecord:
    """Run ``generator.generate(**batch, latent_hook=..., return_latents=True)`` greedily and keep what the
    mediation measures need (see :class:`RunRecord`)."""
    runner = generator.runner
    had = "logits" in vars(runner)
    prev = vars(runner).get("logits")
    inner = runner.logits
    seen: list = []

    def logits(hidden, *args, **kwargs):
        out = inner(hidden, *args, **kwargs)
        if not seen:
            seen.append((hidden.detach().float().cpu(), out.detach().float().cpu()))
        return out

    runner.logits = logits
    try:
        out = generator.generate(**_batch_args(batch), max_new_tokens=max_new_tokens, do_sample=False,
                                 latent_hook=latent_hook, return_latents=True, **generate_kwargs)
    finally:
        if had:
            runner.logits = prev
        else:
            del runner.logits
    lat = out.latents.detach().float().cpu() if out.latents is not None else None
    return RunRecord(out.sequences.cpu(), out.selected.cpu(), lat, seen[0][0], seen[0][1])


def _plain_generator(generator):
    """The same model and runner with no latent segment (the ordinary prompt; shares all weights)."""
    g = copy.copy(generator)
    g.config = generator.config.replace(num_latent_steps=0)
    return g


def _check_generator(generator) -> tuple[int, int]:
    cfg = generator.config
    if cfg.trigger != "prompt" or cfg.num_latent_steps < 1:
        raise ValueError("mediation analysis needs trigger='prompt' and num_latent_steps >= 1 (IVT-LR / Coconut); "
                         f"got trigger={cfg.trigger!r}, num_latent_steps={cfg.num_latent_steps}")
    return cfg.num_latent_steps, cfg.num_selected_patches


# --------------------------------------------------------------------------------------------------
# answers


def first_token_answer(sequences: torch.Tensor) -> list:
    """The default answer: each row's first generated token id."""
    return sequences[:, 0].tolist()


def letter_answer(processor, letters: Sequence[str] = ("A", "B", "C", "D")) -> Callable[[torch.Tensor], list]:
    """An ``answer_fn`` that decodes each row (``processor`` or tokenizer) and returns the first standalone
    answer letter (``None`` when there is none). Use with ``max_new_tokens`` large enough to reach it."""
    tok = getattr(processor, "tokenizer", processor)
    pat = re.compile(r"(?<![A-Za-z])(" + "|".join(re.escape(x) for x in letters) + r")(?![A-Za-z])")

    def answer(sequences):
        texts = tok.batch_decode(sequences, skip_special_tokens=True)
        out = []
        for t in texts:
            m = pat.search(t)
            out.append(m.group(1) if m else None)
        return out

    return answer


def _answers(rec: RunRecord, answer_fn) -> list:
    return (answer_fn or first_token_answer)(rec.sequences)


def _changed(a: list, b: list) -> torch.Tensor:
    return torch.tensor([x != y for x, y in zip(a, b, strict=True)], dtype=torch.bool)


# --------------------------------------------------------------------------------------------------
# input perturbations


@dataclass(frozen=True)
class Perturbation:
    """A named input perturbation: ``fn(batch) -> perturbed batch`` (a new dict; the input is not modified).
    Any callable works; the factories below cover the CapImagine set."""

    name: str
    fn: Callable[[dict], dict]

    def __call__(self, batch: dict) -> dict:
        return self.fn(batch)


def identity() -> Perturbation:
    """No change (a control: every measure must read "unchanged")."""
    return Perturbation("identity", lambda batch: dict(batch))


def pixel_noise(std: float = 1.0, seed: int = 0, relative: bool = True) -> Perturbation:
    """Gaussian noise on ``pixel_values``: ``std`` times the batch's pixel standard deviation (``relative``)
    or in absolute normalised units."""

    def fn(batch):
        pv = batch["pixel_values"]
        g = torch.Generator().manual_seed(seed)
        scale = float(pv.float().std()) * std if relative else std
        noise = torch.randn(pv.shape, generator=g, dtype=torch.float32).to(pv.device)
        return {**batch, "pixel_values": (pv.float() + scale * noise).to(pv.dtype)}

    return Perturbation(f"pixel_noise({std:g})", fn)


def blank_image(fill: float = 0.0) -> Perturbation:
    """Every image replaced by a constant one (``fill`` in normalised units: 0 = the normalisation mean, a
    flat grey)."""
    return Perturbation("blank_image",
                        lambda batch: {**batch, "pixel_values": torch.full_like(batch["pixel_values"], fill)})


def _image_groups(grid: torch.Tensor) -> dict:
    groups: dict = {}
    for j, thw in enumerate(grid.tolist()):
        groups.setdefault(tuple(thw), []).append(j)
    return groups


def swap_images(shift: int = 1) -> Perturbation:
    """Each image replaced by another image of the batch with the same ``image_grid_thw`` (the one ``shift``
    places later among the same-size images, cyclically), so the token layout is unchanged. With one
    image per row this is "the image of another row". ValueError if some image has no same-size partner."""

    def fn(batch):
        pv, grid = batch["pixel_values"], torch.as_tensor(batch["image_grid_thw"]).cpu()
        n_patch = grid.prod(-1).tolist()
        starts = [0]
        for n in n_patch:
            starts.append(starts[-1] + n)
        src = list(range(len(n_patch)))
        for thw, members in _image_groups(grid).items():
            if len(members) < 2:
                raise ValueError(f"swap_images: image {members[0]} (grid {list(thw)}) has no other image of the "
                                 "same size in the batch to swap with")
            for i, j in enumerate(members):
                src[j] = members[(i + shift) % len(members)]
        pieces = [pv[starts[s]:starts[s + 1]] for s in src]
        return {**batch, "pixel_values": torch.cat(pieces, 0)}

    return Perturbation("swap_images", fn)


def _can_swap_images(batch) -> bool:
    grid = batch.get("image_grid_thw")
    if grid is None or batch.get("pixel_values") is None:
        return False
    return all(len(m) >= 2 for m in _image_groups(torch.as_tensor(grid).cpu()).values())


# --------------------------------------------------------------------------------------------------
# latent interventions


@dataclass
class InterventionContext:
    """What a hook factory may use: the generator, the batch, the clean (unmodified) run of it."""

    generator: object
    batch: dict
    clean: RunRecord
    _row_images: list | None = field(default=None, repr=False)

    def row_image_embeds(self) -> list[torch.Tensor]:
        """Per row, its (n_b, h) image embeddings (vision tower + merger, every image of the row in prompt
        order: the vectors ``selected`` indexes), on the model's device."""
        if self._row_images is None:
            adapter = self.generator.adapter
            dev = self.generator.device
            grid = torch.as_tensor(self.batch["image_grid_thw"])
            per_image = adapter.encode_images(self.batch["pixel_values"].to(dev), grid.to(dev))
            ids = self.batch["input_ids"].cpu()
            mask = self.batch.get("attention_mask")
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
            img = ((ids == adapter.image_token_id) & mask).int()
            rows, i = [], 0
            for b in range(ids.shape[0]):
                starts = int(((img[b, 1:] - img[b, :-1]) == 1).sum()) + int(img[b, 0])
                rows.append(torch.cat(per_image[i:i + starts], 0) if starts
                            else per_image[0].new_zeros(0, per_image[0].shape[-1]))
                i += starts
            self._row_images = rows
        return self._row_images


@dataclass(frozen=True)
class Intervention:
    """A named latent intervention: ``make_hook(ctx) -> latent_hook(t, block)`` (see ``generate``'s
    ``latent_hook``: block (B, K+1, h) = [z_t; h_t], modify in place or return a replacement)."""

    name: str
    make_hook: Callable[[InterventionContext], Callable]

    @classmethod
    def from_hook(cls, name: str, hook: Callable) -> "Intervention":
        """Wrap a ready ``latent_hook`` (called anew for each run; keep it stateless or seeded)."""
        return cls(name, lambda ctx: hook)


def no_intervention() -> Intervention:
    """Control: the hook leaves the block as is."""
    return Intervention("none", lambda ctx: (lambda t, block: None))


def zero_hidden() -> Intervention:
    """``h_t`` replaced by zeros at every step."""

    def hook(t, block):
        block[:, -1] = 0

    return Intervention("zero_hidden", lambda ctx: hook)


def noise_hidden(seed: int = 0) -> Intervention:
    """``h_t`` replaced by Gaussian noise with the same L2 norm (per row and step)."""

    def make(ctx):
        g = torch.Generator().manual_seed(seed)

        def hook(t, block):
            h = block[:, -1].float()
            n = torch.randn(h.shape, generator=g, dtype=torch.float32).to(h.device)
            n = n * (h.norm(dim=-1, keepdim=True) / n.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            block[:, -1] = n.to(block.dtype)

        return hook

    return Intervention("noise_hidden", make)


def swap_blocks(shift: int = 1, part: str = "block") -> Intervention:
    """Row b's step-t input replaced by row ``(b + shift) % B``'s step-t input from the clean run: the whole
    block (``part="block"``), only ``h_t`` ("hidden") or only ``z_t`` ("patches"). Needs B >= 2."""
    if part not in ("block", "hidden", "patches"):
        raise ValueError(f"part must be 'block', 'hidden' or 'patches', got {part!r}")

    def make(ctx):
        lat = ctx.clean.latents
        B = lat.shape[0]
        if B < 2:
            raise ValueError("swap_blocks needs a batch of at least 2 rows")
        donor = lat[(torch.arange(B) + shift) % B]  # (B, N, K+1, h)

        def hook(t, block):
            d = donor[:, t].to(block.device, block.dtype)
            if part == "block":
                block.copy_(d)
            elif part == "hidden":
                block[:, -1] = d[:, -1]
            else:
                block[:, :-1] = d[:, :-1]

        return hook

    return Intervention("swap_blocks" if part == "block" else f"swap_{part}", make)


def shuffle_patches(seed: int = 0) -> Intervention:
    """``z_t`` replaced by K image embeddings of the row drawn uniformly at random (without replacement,
    ascending order) at every step, instead of the highest-attention ones. Needs K >= 1."""

    def make(ctx):
        K = ctx.generator.config.num_selected_patches
        if K < 1:
            raise ValueError("shuffle_patches needs num_selected_patches >= 1")
        rows = ctx.row_image_embeds()
        g = torch.Generator().manual_seed(seed)

        def hook(t, block):
            for b, emb in enumerate(rows):
                idx = torch.randperm(emb.shape[0], generator=g)[:K].sort().values.to(emb.device)
                block[b, :K] = emb[idx].to(block.device, block.dtype)

        return hook

    return Intervention("shuffle_patches", make)


# --------------------------------------------------------------------------------------------------
# measures


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||b - a|| / ||a|| over the last dim (a = original)."""
    return (b.float() - a.float()).norm(dim=-1) / a.float().norm(dim=-1).clamp_min(1e-12)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, N) Jaccard index of the per-step index sets (B, N, K) (each set has distinct members)."""
    K = a.shape[-1]
    if K == 0:
        return torch.ones(a.shape[:-1])
    inter = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1).float()
    return inter / (2 * K - inter)


def _mean(x: torch.Tensor | None):
    return None if x is None else float(x.float().mean())


def _tolist(x):
    return x.tolist() if isinstance(x, torch.Tensor) else x


@dataclass
class LatentSensitivity:
    """Input -> latent: how much the latents move when the input is perturbed. Per row (B) and step (N).

    h_cos / h_rel_l2 (B, N): cosine and ||h' - h|| / ||h|| of the latent text h_t; z_cos (B, N): cosine of the
    mean-pooled latent vision z_t (None when K = 0); jaccard (B, N): overlap of the selected patch sets (None
    when K = 0); final_cos / final_rel_l2 (B,): the hidden state that produces the answer; ref_cos /
    ref_rel_l2 (B,): the ordinary prompt's last hidden state (no latent segment) under the same perturbation,
    the reference scale; answer_changed / ref_answer_changed (B,): the answer with / without latent steps.
    """

    name: str
    h_cos: torch.Tensor
    h_rel_l2: torch.Tensor
    z_cos: torch.Tensor | None
    jaccard: torch.Tensor | None
    final_cos: torch.Tensor
    final_rel_l2: torch.Tensor
    ref_cos: torch.Tensor | None
    ref_rel_l2: torch.Tensor | None
    answer_changed: torch.Tensor
    ref_answer_changed: torch.Tensor | None

    def summary(self) -> dict:
        """Batch means: per-step lists for the (B, N) measures, scalars for the (B,) ones."""
        step = lambda x: None if x is None else x.float().mean(0).tolist()  # noqa: E731
        return dict(name=self.name, h_cos=step(self.h_cos), h_rel_l2=step(self.h_rel_l2), z_cos=step(self.z_cos),
                    jaccard=step(self.jaccard), final_cos=_mean(self.final_cos),
                    final_rel_l2=_mean(self.final_rel_l2), ref_cos=_mean(self.ref_cos),
                    ref_rel_l2=_mean(self.ref_rel_l2), answer_change_rate=_mean(self.answer_changed),
                    ref_answer_change_rate=_mean(self.ref_answer_changed))

    def to_dict(self) -> dict:
        per_row = {k: _tolist(getattr(self, k)) for k in ("h_cos", "h_rel_l2", "z_cos", "jaccard", "final_cos",
                                                          "final_rel_l2", "ref_cos", "ref_rel_l2",
                                                          "answer_changed", "ref_answer_changed")}
        return {**self.summary(), "per_row": per_row}


@dataclass
class AnswerSensitivity:
    """Latent -> answer: how much the answer moves under a latent intervention. Per row (B,).

    answer_changed: the answer (``answer_fn``, default the first token) differs from the clean run's;
    first_token_changed: the first generated token differs; kl: KL(p_clean || p_intervened) of the first
    answer token's distribution (nats); top_prob_drop: p_clean(t*) - p_intervened(t*) for the clean greedy
    token t*; final_cos: cosine of the answer-producing hidden state to the clean one.
    """

    name: str
    answers: list
    clean_answers: list
    answer_changed: torch.Tensor
    first_token_changed: torch.Tensor
    kl: torch.Tensor
    top_prob_drop: torch.Tensor
    final_cos: torch.Tensor

    @property
    def flip_rate(self) -> float:
        return _mean(self.answer_changed)

    def summary(self) -> dict:
        return dict(name=self.name, flip_rate=self.flip_rate, first_token_flip_rate=_mean(self.first_token_changed),
                    kl=_mean(self.kl), top_prob_drop=_mean(self.top_prob_drop), final_cos=_mean(self.final_cos))

    def to_dict(self) -> dict:
        per_row = dict(answers=list(self.answers), clean_answers=list(self.clean_answers),
                       **{k: _tolist(getattr(self, k)) for k in ("answer_changed", "first_token_changed", "kl",
                                                                 "top_prob_drop", "final_cos")})
        return {**self.summary(), "per_row": per_row}


def latent_sensitivity(generator, batch, perturb: Callable[[dict], dict], *, reference: bool = True,
                       answer_fn=None, max_new_tokens: int = 1, clean: RunRecord | None = None,
                       clean_plain: RunRecord | None = None, name: str | None = None) -> LatentSensitivity:
    """Input -> latent. Runs ``batch`` and ``perturb(batch)`` through the generator (greedy) and compares the
    latents step by step (:class:`LatentSensitivity`). With ``reference`` the same comparison is made on the
    ordinary prompt's last hidden state (the model with no latent segment). ``clean`` / ``clean_plain``:
    already recorded runs of the unperturbed batch (latent / no-latent) to reuse."""
    N, K = _check_generator(generator)
    name = name or getattr(perturb, "name", None) or getattr(perturb, "__name__", "perturbation")
    clean = clean or record_run(generator, batch, max_new_tokens=max_new_tokens)
    pbatch = perturb(batch)
    pert = record_run(generator, pbatch, max_new_tokens=max_new_tokens)
    a, b = clean.latents, pert.latents           # (B, N, K+1, h)
    h_cos, h_rel = _cos(a[:, :, -1], b[:, :, -1]), _rel_l2(a[:, :, -1], b[:, :, -1])
    z_cos = _cos(a[:, :, :K].mean(2), b[:, :, :K].mean(2)) if K > 0 else None
    jac = _jaccard(clean.selected, pert.selected) if K > 0 else None
    ref_cos = ref_rel = ref_changed = None
    if reference:
        plain = _plain_generator(generator)
        clean_plain = clean_plain or record_run(plain, batch, max_new_tokens=max_new_tokens)
        pert_plain = record_run(plain, pbatch, max_new_tokens=max_new_tokens)
        ref_cos = _cos(clean_plain.final_hidden, pert_plain.final_hidden)
        ref_rel = _rel_l2(clean_plain.final_hidden, pert_plain.final_hidden)
        ref_changed = _changed(_answers(clean_plain, answer_fn), _answers(pert_plain, answer_fn))
    return LatentSensitivity(
        name=name, h_cos=h_cos, h_rel_l2=h_rel, z_cos=z_cos, jaccard=jac,
        final_cos=_cos(clean.final_hidden, pert.final_hidden),
        final_rel_l2=_rel_l2(clean.final_hidden, pert.final_hidden),
        ref_cos=ref_cos, ref_rel_l2=ref_rel,
        answer_changed=_changed(_answers(clean, answer_fn), _answers(pert, answer_fn)), ref_answer_changed=ref_changed)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def answer_sensitivity(generator, batch, intervention, *, answer_fn=None, max_new_tokens: int = 1,
                       clean: RunRecord | None = None, name: str | None = None) -> AnswerSensitivity:
    """Latent -> answer. Runs ``batch`` clean and with ``intervention`` (an :class:`Intervention`, or a plain
    ``latent_hook(t, block)``) and compares the answers (:class:`AnswerSensitivity`). ``answer_fn(sequences)
    -> list`` turns generated tokens into answers (default: the first token; see :func:`letter_answer`).
    ``clean``: an already recorded clean run to reuse."""
    _check_generator(generator)
    if not isinstance(intervention, Intervention):
        intervention = Intervention.from_hook(name or getattr(intervention, "__name__", "hook"), intervention)
    clean = clean or record_run(generator, batch, max_new_tokens=max_new_tokens)
    hook = intervention.make_hook(InterventionContext(generator, batch, clean))
    run = record_run(generator, batch, latent_hook=hook, max_new_tokens=max_new_tokens)
    ca, ra = _answers(clean, answer_fn), _answers(run, answer_fn)
    top = clean.first_logits.argmax(-1, keepdim=True)
    p_clean = F.softmax(clean.first_logits, -1).gather(-1, top)[:, 0]
    p_run = F.softmax(run.first_logits, -1).gather(-1, top)[:, 0]
    return AnswerSensitivity(
        name=name or intervention.name, answers=ra, clean_answers=ca, answer_changed=_changed(ca, ra),
        first_token_changed=clean.sequences[:, 0] != run.sequences[:, 0],
        kl=_kl(clean.first_logits, run.first_logits), top_prob_drop=p_clean - p_run,
        final_cos=_cos(clean.final_hidden, run.final_hidden))


# --------------------------------------------------------------------------------------------------
# the standard set


@dataclass
class MediationReport:
    """The standard mediation measurements on one batch (see :func:`run_mediation`)."""

    num_latent_steps: int
    num_selected_patches: int
    batch_size: int
    latent: list[LatentSensitivity] = field(default_factory=list)
    answer: list[AnswerSensitivity] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)   # name -> why it was not run

    def to_dict(self) -> dict:
        return dict(num_latent_steps=self.num_latent_steps, num_selected_patches=self.num_selected_patches,
                    batch_size=self.batch_size, input_to_latent=[x.to_dict() for x in self.latent],
                    latent_to_answer=[x.to_dict() for x in self.answer], skipped=dict(self.skipped))

    def format_table(self, digits: int = 3) -> str:
        f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"  # noqa: E731
        steps = lambda xs: "-" if xs is None else " ".join(f(x) for x in xs)  # noqa: E731
        lines = [f"input -> latent  (B={self.batch_size}, N={self.num_latent_steps}, K={self.num_selected_patches}; "
                 "per-step values are steps 1..N; ref = the ordinary prompt's last hidden state)"]
        head = ["perturbation", "h_t cos", "h_t relL2", "z_t cos", "jaccard", "final cos", "ref cos", "ref relL2",
                "ans chg", "ref ans chg"]
        rows = []
        for x in self.latent:
            s = x.summary()
            rows.append([s["name"], steps(s["h_cos"]), steps(s["h_rel_l2"]), steps(s["z_cos"]), steps(s["jaccard"]),
                         f(s["final_cos"]), f(s["ref_cos"]), f(s["ref_rel_l2"]), f(s["answer_change_rate"]),
                         f(s["ref_answer_change_rate"])])
        lines += _table(head, rows)
        lines.append("")
        lines.append("latent -> answer  (flip = answer changed; KL / top-p drop of the first answer token)")
        head = ["intervention", "flip rate", "1st tok flip", "KL", "top-p drop", "final cos"]
        rows = [[s["name"], f(s["flip_rate"]), f(s["first_token_flip_rate"]), f(s["kl"]), f(s["top_prob_drop"]),
                 f(s["final_cos"])] for s in (x.summary() for x in self.answer)]
        lines += _table(head, rows)
        if self.skipped:
            lines.append("")
            lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return [fmt(head), "  ".join("-" * x for x in w)] + [fmt(r) for r in rows]


def run_mediation(generator, batch, perturbations: Sequence | None = None, interventions: Sequence | None = None, *,
                  answer_fn=None, max_new_tokens: int = 1, seed: int = 0, reference: bool = True,
                  progress: bool = False) -> MediationReport:
    """The standard CapImagine-style set on one batch, sharing the clean runs.

    Defaults: perturbations ``pixel_noise(1.0)``, ``blank_image()``, ``swap_images()`` (when every image has a
    same-size partner); interventions ``zero_hidden()``, ``noise_hidden()``, ``swap_blocks()`` (B >= 2),
    ``shuffle_patches()`` (K >= 1). Defaults that cannot run on this batch are listed in ``skipped``.
    ``progress=True`` shows the runs done (:func:`~lvr_engine.progress.progress_bar`)."""
    from ..progress import progress_bar

    N, K = _check_generator(generator)
    B = int(batch["input_ids"].shape[0])
    skipped = {}
    if perturbations is None:
        perturbations = [pixel_noise(1.0, seed=seed), blank_image()]
        if _can_swap_images(batch):
            perturbations.append(swap_images())
        else:
            skipped["swap_images"] = "some image has no same-size image in the batch to swap with"
    if interventions is None:
        interventions = [zero_hidden(), noise_hidden(seed)]
        if B >= 2:
            interventions.append(swap_blocks())
        else:
            skipped["swap_blocks"] = "batch has one row"
        if K >= 1:
            interventions.append(shuffle_patches(seed))
        else:
            skipped["shuffle_patches"] = "K = 0 (no latent vision)"
    bar = progress_bar(total=1 + reference + len(perturbations) + len(interventions), desc="mediation",
                       unit="condition", disable=not progress)
    clean = record_run(generator, batch, max_new_tokens=max_new_tokens)
    bar.update(1)
    clean_plain = None
    if reference:
        clean_plain = record_run(_plain_generator(generator), batch, max_new_tokens=max_new_tokens)
        bar.update(1)
    report = MediationReport(N, K, B, skipped=skipped)
    for p in perturbations:
        report.latent.append(latent_sensitivity(generator, batch, p, reference=reference, answer_fn=answer_fn,
                                                max_new_tokens=max_new_tokens, clean=clean, clean_plain=clean_plain))
        bar.update(1)
    for iv in interventions:
        report.answer.append(answer_sensitivity(generator, batch, iv, answer_fn=answer_fn,
                                                max_new_tokens=max_new_tokens, clean=clean))
        bar.update(1)
    bar.close()
    return report


# --------------------------------------------------------------------------------------------------
# the condensed readout


def pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs of distinct rows of ``x`` (B, h), B >= 2: how alike the
    vectors of different questions are (1.0 = all point the same way, CapImagine's "collapse")."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"pairwise_cosine needs a (B >= 2, h) tensor, got shape {tuple(x.shape)}")
    u = F.normalize(x.double(), dim=-1, eps=1e-12)
    sim = u @ u.T
    B = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (B * (B - 1)))


def mediation_readout(generator, batch, *, answer_fn=None, max_new_tokens: int = 1, seed: int = 0,
                      shift: int = 1, progress: bool = False) -> dict:
    """CapImagine's causal-mediation questions on one batch, as plain numbers (a JSON-ready dict).

    Latent -> answer (answers by ``answer_fn``, default the first token): ``flip_rate`` under
    ``zero`` (:func:`zero_hidden`: the latent text ``h_t`` zeroed at every step), ``swap`` (:func:`swap_blocks`: each
    row's whole latent blocks replaced by those of the row ``shift`` later) and, when K >= 1, ``random_patches``
    (:func:`shuffle_patches`: random image patches as the latent vision ``z_t``). ``swap_ceiling`` is the share of
    rows whose donor row answers differently in the clean run: the swap flip rate of a model whose answer follows
    its latents entirely.

    Input -> latent (``image_swap``, :func:`swap_images` with the same ``shift``): the latent text's relative L2
    change and cosine to the clean one (mean over rows and steps), the patch sets' Jaccard overlap (K >= 1), and the
    answer change rate; ``ref_*`` are the same for the ordinary prompt's last hidden state (no latent segment), the
    scale of "reacts to the image".

    Collapse: ``latent_pairwise_cos`` the mean pairwise cosine of ``h_t`` across the batch's questions (mean over
    steps; ``latent_pairwise_cos_per_step``), ``ref_pairwise_cos`` the same for the ordinary prompt's last hidden
    state. Needs B >= 2 and every image with a same-size partner (ValueError otherwise).
    """
    from ..progress import progress_bar

    N, K = _check_generator(generator)
    B = int(batch["input_ids"].shape[0])
    if B < 2:
        raise ValueError("mediation_readout needs a batch of at least 2 questions (swaps and pairwise cosines)")
    if not _can_swap_images(batch):
        raise ValueError("mediation_readout swaps images between questions: every image needs a same-size image in "
                         "the batch")
    bar = progress_bar(total=6 + (K >= 1), desc="mediation", unit="run", disable=not progress)
    clean = record_run(generator, batch, max_new_tokens=max_new_tokens)
    bar.update(1)
    plain = record_run(_plain_generator(generator), batch, max_new_tokens=max_new_tokens)
    bar.update(1)
    flips = {}
    for key, iv in [("zero", zero_hidden()), ("swap", swap_blocks(shift))] + \
            ([("random_patches", shuffle_patches(seed))] if K >= 1 else []):
        flips[key] = answer_sensitivity(generator, batch, iv, answer_fn=answer_fn, max_new_tokens=max_new_tokens,
                                        clean=clean).flip_rate
        bar.update(1)
    answers = _answers(clean, answer_fn)
    donor = [(b + shift) % B for b in range(B)]
    ceiling = sum(answers[b] != answers[d] for b, d in enumerate(donor)) / B
    sens = latent_sensitivity(generator, batch, swap_images(shift), answer_fn=answer_fn,
                              max_new_tokens=max_new_tokens, clean=clean, clean_plain=plain)
    bar.update(2)  # the perturbed run with and without the latent segment
    bar.close()
    per_step = [pairwise_cosine(clean.latents[:, t, -1]) for t in range(N)]
    return {
        "questions": B, "num_latent_steps": N, "num_selected_patches": K,
        "flip_rate": flips, "swap_ceiling": ceiling,
        "clean_answer_none_rate": sum(a is None for a in answers) / B,
        "image_swap": {"latent_rel_l2": _mean(sens.h_rel_l2), "latent_cos": _mean(sens.h_cos),
                       "patch_jaccard": _mean(sens.jaccard), "answer_change_rate": _mean(sens.answer_changed),
                       "ref_rel_l2": _mean(sens.ref_rel_l2), "ref_cos": _mean(sens.ref_cos),
                       "ref_answer_change_rate": _mean(sens.ref_answer_changed)},
        "latent_pairwise_cos": sum(per_step) / N, "latent_pairwise_cos_per_step": per_step,
        "ref_pairwise_cos": pairwise_cosine(plain.final_hidden),
    }
