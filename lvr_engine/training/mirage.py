"""Mirage's two training stages (UMass-Embodied-AGI/Mirage, ``src/main.py``, ``src/trainer.py`` and its
Qwen2.5-VL training forward), on the engine's runner.

Every row is Mirage's training sequence (the ``"mirage"`` template: ``pre`` starts with the newline after
``<|im_start|>assistant``; ``post`` ends with the end-of-turn token and the newline after it)::

    prompt | pre | <|latent_start|> | L latent slots | <|latent_end|> | post
    pre  = target_prefix + the target text before <output_image> (all of the target's text when it has none:
           then the latents come right after the prompt)
    post = the target text after <output_image> + end-of-turn + target_suffix

Labels: every token after the prompt except the latent slots (pre, both markers, post), one cross-entropy over
all of them (a mean over the labelled tokens, as Mirage's ``CrossEntropyLoss``).

- **Stage 1** (``mirage_stage1``), as published: ONE teacher-forced pass (the prompt's prefill and the rest as one
  chunk on the KV cache: the same causal attention as one pass over the whole sequence). The L latent slots hold
  the helper image's merged vision tokens pooled to L (:func:`pool_image_embeddings`), and the loss is
  ``text_weight * CE + mean over latent slots p of (1 - cos(hidden at p-1, input at p))`` (``text_weight`` 0.1).
  This is the one training forward that does not run the engine's latent step (docs/semantics.md).
- **Stage 2** (``mirage_stage2``): the latent slots are the engine's latent step with K = 0 (each feeds back the
  previous position's final-norm hidden state, gradients through the chain unless ``detach_latents``); CE only.

Shapes: B rows, S the prompt (+ pre + start marker) width, L latent slots, T tail (post) tokens, h hidden, V vocab.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.example import ReasoningExample
from ..data.mirage import OUTPUT_IMAGE, MirageExample
from ..data.prompts import format_target, get_template
from ..engine.inputs import validate_and_layout
from ..engine.kv_cache import FunctionalKVCache
from ..engine.latent_step import begin_segment, run_latent_steps
from ..engine.prompt import next_positions, prepare_prompt
from ..engine.runner import DecoderRunner
from ..models.base import ModelAdapter
from .collate import encode_images, encode_prompts, end_of_turn_id

__all__ = ["MirageBatch", "MirageForwardOutput", "collate_mirage", "mirage_forward", "pool_image_embeddings",
           "mirage_latent_loss", "split_target", "vision_tower", "freeze_vision"]


def pool_image_embeddings(embeds: torch.Tensor, k: int) -> torch.Tensor:
    """(n, h) merged image tokens of one image -> (k, h), Mirage's "average" compression: drop the last
    ``n mod k`` tokens, cut the rest into ``k`` equal contiguous groups and average each (in ``embeds``' dtype).
    ``ValueError`` when ``n < k``."""
    n = embeds.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"cannot pool {n} image tokens into {k} latents: Mirage averages {k} equal groups of the "
                         f"helper image's merged tokens, so it needs at least {max(k, 1)} (use a larger image)")
    g = n // k
    return embeds[: g * k].reshape(k, g, embeds.shape[-1]).mean(1)


def mirage_latent_loss(latent_hidden: torch.Tensor, helper_embeds: torch.Tensor) -> torch.Tensor:
    """Mirage's latent term: mean over (B, s) of 1 - cos(latent_hidden, helper_embeds), both (B, s, h); computed in
    at least float32."""
    a, b = _at_least_fp32(latent_hidden), _at_least_fp32(helper_embeds)
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def vision_tower(model) -> torch.nn.Module | None:
    """The vision tower of a transformers VLM (``model.model.visual`` or ``model.visual``), None for a text model."""
    inner = getattr(model, "model", None)
    return getattr(inner, "visual", None) or getattr(model, "visual", None)


def freeze_vision(model) -> int:
    """``requires_grad=False`` on every vision-tower parameter (Mirage trains the language model only); returns
    how many parameters were frozen (0 for a text model)."""
    tower = vision_tower(model)
    if tower is None:
        return 0
    params = list(tower.parameters())
    for p in params:
        p.requires_grad_(False)
    return len(params)


def split_target(text: str, example_id: str = "?") -> tuple[str, str]:
    """``(before, after)`` the ``<output_image>`` placeholder of a target text; ``("", text)`` when it has none
    (the latents then come right after the prompt). ``ValueError`` for more than one placeholder."""
    n = text.count(OUTPUT_IMAGE)
    if n > 1:
        raise ValueError(f"example {example_id!r}: the target has {n} {OUTPUT_IMAGE} placeholders; Mirage has one "
                         "latent segment per answer")
    if n == 0:
        return "", text
    before, after = text.split(OUTPUT_IMAGE)
    return before, after


@dataclass
class MirageBatch:
    """A Mirage training batch (see the module docstring for the sequence).

    ``input_ids``/``attention_mask``/``mm_token_type_ids`` (B, S): left-padded prompt + pre + start marker;
    ``pixel_values``/``image_grid_thw``: the input images as the processor returns them. ``num_pre`` (B,) int64:
    the labelled tokens at the end of each row's ``input_ids`` (pre and the start marker). ``tail_ids``/
    ``tail_mask`` (B, T): right-padded post tokens (the tokens after the end marker). ``helper_pixel_values``/
    ``helper_image_grid_thw``: one helper image per row (stage 1; None otherwise). ``latent_size``: L.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_pre: torch.Tensor
    tail_ids: torch.Tensor
    tail_mask: torch.Tensor
    latent_size: int
    start_id: int
    end_id: int
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    helper_pixel_values: torch.Tensor | None = None
    helper_image_grid_thw: torch.Tensor | None = None
    ids: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        """Labelled tokens: pre + start marker per row, the end marker per row, the post tokens."""
        return int(self.num_pre.sum()) + self.input_ids.shape[0] + int(self.tail_mask.sum())

    @property
    def num_positions(self) -> int:
        """Positions the forward runs (prompt, L latents, end marker, post)."""
        B = self.input_ids.shape[0]
        return int(self.attention_mask.sum()) + B * (self.latent_size + 1) + int(self.tail_mask.sum())

    def to(self, device) -> "MirageBatch":
        """A copy with every tensor on ``device``."""
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in fields(self)}
        return MirageBatch(**moved)


_warned_fallback = False


def _helper(ex: ReasoningExample):
    """The helper image of ``ex``: a Mirage row's ``image_output`` (``ValueError`` naming the row when it has none);
    for other examples (no helper image in their data) the input image, with a warning."""
    global _warned_fallback
    if isinstance(ex, MirageExample):
        if ex.helper_image is None:
            md = ex.metadata if isinstance(ex.metadata, dict) else {}
            where = f" ({md.get('dataset')} {md.get('split')} row {md.get('row')})" if md else ""
            raise ValueError(f"example {ex.id!r}{where} has no image_output: Mirage stage 1 supervises the latents "
                             "with the helper image")
        return ex.helper_image
    img = getattr(ex, "helper_image", None)
    if img is None and isinstance(ex.metadata, dict):
        img = ex.metadata.get("helper_image")
    if img is not None:
        return img
    if ex.image is None:
        raise ValueError(f"example {ex.id!r} has no image and no helper image: Mirage stage 1 needs one")
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn("Mirage stage 1: these examples carry no helper image (Mirage's data has image_output); "
                      "each row's input image stands in for it", stacklevel=3)
    return ex.image


def collate_mirage(examples: Sequence[ReasoningExample], processor, latent_size: int, *, start_id: int, end_id: int,
                   template="mirage", image_size=None, helper_images: bool = False) -> MirageBatch:
    """The :class:`MirageBatch` of ``examples`` with ``latent_size`` latent slots.

    The prompt is :func:`~lvr_engine.training.collate.encode_prompts` (``template``); the target is
    ``format_target(example)`` (a Mirage row's ``text_output`` verbatim) split at ``<output_image>``
    (:func:`split_target`), between the template's ``target_prefix`` and end-of-turn + ``target_suffix``.
    ``helper_images=True`` (stage 1) adds each row's helper image (:func:`_helper`).
    """
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(f"latent_size must be a positive int, got {latent_size!r}")
    prompt = encode_prompts(examples, processor, template=template, image_size=image_size)
    t = get_template(template)
    tok = getattr(processor, "tokenizer", processor)
    eot = end_of_turn_id(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []

    heads, tails, num_pre, types = [], [], [], []
    for b, ex in enumerate(examples):
        before, after = split_target(format_target(ex, 0, mode="cot", template=template).text, ex.id)
        pre = ids(t.target_prefix + before) + [start_id]
        real = prompt.attention_mask[b].bool()
        heads.append(prompt.input_ids[b][real].tolist() + pre)
        if prompt.mm_token_type_ids is not None:
            types.append(prompt.mm_token_type_ids[b][real].tolist() + [0] * len(pre))
        num_pre.append(len(pre))
        tails.append(ids(after) + [eot] + ids(t.target_suffix))
    B, S, T = len(examples), max(map(len, heads)), max(map(len, tails))
    input_ids = torch.full((B, S), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    mm = torch.zeros((B, S), dtype=prompt.mm_token_type_ids.dtype) if types else None
    tail_ids = torch.full((B, T), pad, dtype=torch.long)
    tail_mask = torch.zeros((B, T), dtype=torch.bool)
    for b in range(B):
        n = len(heads[b])
        input_ids[b, S - n:] = torch.tensor(heads[b])
        attention_mask[b, S - n:] = 1
        if mm is not None:
            mm[b, S - n:] = torch.tensor(types[b], dtype=mm.dtype)
        tail_ids[b, :len(tails[b])] = torch.tensor(tails[b])
        tail_mask[b, :len(tails[b])] = True
    helper_pv = helper_thw = None
    if helper_images:
        helper_pv, helper_thw = encode_images([_helper(ex) for ex in examples], processor, image_size)
    return MirageBatch(input_ids=input_ids, attention_mask=attention_mask, num_pre=torch.tensor(num_pre),
                       tail_ids=tail_ids, tail_mask=tail_mask, latent_size=latent_size, start_id=int(start_id),
                       end_id=int(end_id), mm_token_type_ids=mm, pixel_values=prompt.pixel_values,
                       image_grid_thw=prompt.image_grid_thw, helper_pixel_values=helper_pv,
                       helper_image_grid_thw=helper_thw, ids=[ex.id for ex in examples])


@dataclass
class MirageForwardOutput:
    """``ce_sum``: summed token cross-entropy over ``num_tokens`` labels; ``cos_sum``: stage 1, the sum over the
    B*L latent slots of 1 - cos (0 in stage 2); ``latent_pred`` (B, L, h): the hidden state at the position before
    each latent slot; ``latent_inputs`` (B, L, h): what the slots held (stage 1: the pooled helper embeddings,
    stage 2: the fed-back hidden states); ``text_logits`` (B, T+1, V): the logits predicting the end marker and
    the post tokens."""

    ce_sum: torch.Tensor
    num_tokens: int
    cos_sum: torch.Tensor
    num_latents: int
    latent_pred: torch.Tensor
    latent_inputs: torch.Tensor
    text_logits: torch.Tensor

    def loss(self, text_weight: float = 1.0) -> torch.Tensor:
        """``text_weight * ce_sum / num_tokens + cos_sum / num_latents`` (Mirage stage 1: text_weight 0.1)."""
        return text_weight * self.ce_sum / max(self.num_tokens, 1) + self.cos_sum / max(self.num_latents, 1)


def mirage_forward(runner: DecoderRunner, adapter: ModelAdapter, batch: MirageBatch, *, stage: int,
                   position_mode: str = "mrope", detach_latents: bool = False,
                   detach_targets: bool = False) -> MirageForwardOutput:
    """Loss terms of a :class:`MirageBatch` under Mirage ``stage`` 1 (teacher-forced, pooled helper embeddings in
    the latent slots, cosine term) or 2 (hidden-state feedback through the engine's latent step, CE only).

    Gradients reach the vision tower only through parameters that require them (the trainer freezes it unless
    ``train_vision``); in stage 1 the pooled targets are not detached, as in Mirage's code, unless
    ``detach_targets`` (for a training tower: the targets then stay fixed for the step, as a frozen tower's are).
    """
    if stage not in (1, 2):
        raise ValueError(f"Mirage stage must be 1 or 2, got {stage!r}")
    L = batch.latent_size
    if stage == 1 and batch.helper_pixel_values is None:
        raise ValueError("Mirage stage 1 needs the helper images (collate_mirage(..., helper_images=True))")
    cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x  # noqa: E731
    lay = validate_and_layout(adapter, cpu(batch.input_ids), cpu(batch.attention_mask), batch.pixel_values,
                              cpu(batch.image_grid_thw), batch.mm_token_type_ids, 1, L, 0)
    dev, dtype = adapter.device, adapter.dtype
    p = prepare_prompt(adapter, runner.embed, lay, batch.input_ids, batch.pixel_values, batch.image_grid_thw,
                       batch.mm_token_type_ids, position_mode, None, dev, dtype)
    w = runner.w
    B, S = p.embeds.shape[:2]
    tail_ids, tail_mask = batch.tail_ids.to(dev), batch.tail_mask.to(dev)
    T = tail_ids.shape[1]
    cache = FunctionalKVCache(len(w.layers), B, w.num_kv_heads, S + L + T, w.head_dim, dtype, dev)
    hidden = runner.prefill(p.embeds, p.positions, p.lens, cache)                   # (B, S, h)
    rows = torch.arange(B, device=dev)

    # pre tokens and the start marker: the last num_pre tokens of each prompt row, predicted from the slot before
    num_pre = batch.num_pre.to(dev)
    P = int(num_pre.max())
    j = torch.arange(P, device=dev)
    pre_mask = j[None] < num_pre[:, None]                                           # (B, P)
    slot = ((p.lens - num_pre - 1)[:, None] + j[None]).clamp(0, S - 2)
    pre_logits = runner.logits(hidden[rows[:, None], slot])                         # (B, P, V)
    pre_labels = lay.ids.to(dev)[rows[:, None], slot + 1]
    h_start = hidden[rows, p.lens - 1]                                              # (B, h) the start marker's

    end_embed = runner.embed(torch.tensor([batch.end_id], device=dev))[0]
    tail_in = runner.embed(tail_ids[:, :-1])                                        # (B, T-1, h)
    if stage == 1:
        per_image = adapter.encode_images(batch.helper_pixel_values.to(dev), batch.helper_image_grid_thw.to(dev))
        if len(per_image) != B:
            raise ValueError(f"{len(per_image)} helper images for {B} rows: Mirage stage 1 needs one per row")
        targets = torch.stack([pool_image_embeddings(e, L) for e in per_image]).to(dtype)    # (B, L, h)
        if detach_targets:
            targets = targets.detach()
        chunk = torch.cat([targets, end_embed.expand(B, 1, -1), tail_in], 1)         # (B, L + T, h)
        out = runner.step(chunk, next_positions(cache.lens, p.offset, L + T), cache)
        latent_pred = torch.cat([h_start[:, None], out[:, :L - 1]], 1)               # hidden at p-1, (B, L, h)
        latent_inputs = targets
        text_hidden = out[:, L - 1:]                                                 # (B, T + 1, h)
        cos = F.cosine_similarity(_at_least_fp32(latent_pred), _at_least_fp32(targets), dim=-1)
        cos_sum = (1 - cos).sum()
    else:
        seg = begin_segment(p, L, 0, model_dtype=dtype, end_embed=end_embed, backend=runner.backend)

        def forward(chunk, _with_scores, _last):
            return runner.step(chunk, next_positions(cache.lens, p.offset, chunk.shape[1]), cache)

        text_hidden, fed = run_latent_steps(seg, h_start, forward, tail=tail_in, detach_latents=detach_latents)
        latent_inputs = torch.stack(fed, 1)                                          # (B, L, h)
        latent_pred = latent_inputs
        cos_sum = hidden.new_zeros((), dtype=torch.promote_types(dtype, torch.float32))
    text_logits = runner.logits(text_hidden)                                         # (B, T + 1, V)
    text_labels = torch.cat([torch.full((B, 1), batch.end_id, device=dev), tail_ids], 1)
    text_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), tail_mask], 1)
    ce_pre = F.cross_entropy(_at_least_fp32(pre_logits).flatten(0, 1), pre_labels.flatten(), reduction="none")
    ce_txt = F.cross_entropy(_at_least_fp32(text_logits).flatten(0, 1), text_labels.flatten(), reduction="none")
    ce_sum = (ce_pre * pre_mask.flatten()).sum() + (ce_txt * text_mask.flatten()).sum()
    n = int(pre_mask.sum()) + int(text_mask.sum())
    return MirageForwardOutput(ce_sum=ce_sum, num_tokens=n, cos_sum=cos_sum, num_latents=B * L,
                               latent_pred=latent_pred, latent_inputs=latent_inputs, text_logits=text_logits)
