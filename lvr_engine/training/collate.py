"""ReasoningExamples -> model batches for one curriculum stage (IVT-LR / Coconut / Mirage / no-CoT baseline).

A batch at stage ``s`` (``mode="cot"``) is, per row::

    prompt (chat template, image, left-padded) | s latent steps (the trainer's business) | steps[s:] + answer + EOS

- the prompt is ``processor.apply_chat_template(chat_messages(example, format_prompt(example)),
  add_generation_prompt=True)`` with the images through the processor, left padding;
- the target is the text of ``format_target(example, s)`` (the reasoning steps the latent segment did not
  replace, then the answer line) tokenized without special tokens, plus the end-of-turn token, right-padded.

IVT-LR stage semantics: stage ``s`` replaces the first ``s`` reasoning steps by ``s`` latent steps, so the
batch has ``num_latent_steps = s`` (capped by the caller: ``latent_steps=``); stage 0 is the full chain of
thought with no latent segment (and no markers). ``mode="direct"`` is the no-CoT baseline: the answer line
alone, no steps, no latent steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from ..data.example import ReasoningExample
from ..data.mirage import OUTPUT_IMAGE
from ..data.prompts import chat_messages, format_prompt, format_target, get_template

__all__ = ["Batch", "EncodedPrompts", "collate", "encode_prompts", "encode_images", "end_of_turn_id", "helper_image"]

MODES = ("cot", "direct")


@dataclass
class EncodedPrompts:
    """Prompts of B examples as the processor returns them (left-padded).

    Shapes: ``input_ids``/``attention_mask``/``mm_token_type_ids`` (B, S); ``pixel_values``
    (num_patches, C*T*P*P) and ``image_grid_thw`` (num_images, 3), or None when no row has an image.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """The keyword arguments of ``LatentGenerator.generate`` / ``latent_forward`` for the prompt."""
        return {f.name: getattr(self, f.name) for f in fields(EncodedPrompts)}


@dataclass
class Batch(EncodedPrompts):
    """A training batch: the prompt plus the supervised target of one curriculum stage.

    ``target_ids``/``target_mask`` (B, T): right-padded target token ids (remaining steps + answer line + the
    end-of-turn token) and which of them are real. ``num_latent_steps``: latent steps every row runs;
    ``replaced_steps``: reasoning steps dropped from the front of each target (the stage number).
    ``helper_pixel_values``/``helper_image_grid_thw``: Mirage stage-1 helper images, one per row (None
    unless asked for). ``ids``: the examples' ids, in row order.
    """

    target_ids: torch.Tensor = None
    target_mask: torch.Tensor = None
    num_latent_steps: int = 0
    replaced_steps: int = 0
    helper_pixel_values: torch.Tensor | None = None
    helper_image_grid_thw: torch.Tensor | None = None
    ids: list[str] = field(default_factory=list)

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_mask.sum())

    def to(self, device) -> "Batch":
        """A copy with every tensor on ``device``."""
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in fields(self)}
        return Batch(**moved)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def end_of_turn_id(processor) -> int:
    """The token that ends an assistant turn: ``<|im_end|>`` when the vocabulary has it (Qwen chat
    models stop on it), else the tokenizer's EOS. ``ValueError`` when there is neither."""
    tok = _tokenizer(processor)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    unk = getattr(tok, "unk_token_id", None)
    if im_end is not None and im_end != unk:
        return int(im_end)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tok).__name__} has neither <|im_end|> nor an EOS token")
    return int(tok.eos_token_id)


def helper_image(example: ReasoningExample):
    """The Mirage helper image of ``example``: an ``example.helper_image`` attribute or
    ``metadata["helper_image"]`` when present, else the example's own image (None when it has none)."""
    img = getattr(example, "helper_image", None)
    if img is None:
        img = example.metadata.get("helper_image") if isinstance(example.metadata, dict) else None
    return example.image if img is None else img


def _resize(image, image_size):
    if image is None or image_size is None:
        return image
    from PIL import Image

    w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
    return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BICUBIC)


def encode_prompts(examples: Sequence[ReasoningExample], processor, *, template="ivtlr",
                   image_size: int | tuple[int, int] | None = None,
                   prompt_texts: Sequence[str] | None = None, latent_steps: int = 0) -> EncodedPrompts:
    """Chat-formatted, left-padded prompts of ``examples`` with their images through ``processor``.

    ``image_size`` resizes every image first (IVT-LR: 280); None: the template's ``image_size``, else the
    processor's own resizing. The template's ``generation_suffix`` follows the rendered chat text; its
    ``image_placeholder`` places the images in the text (Mirage's ``<image>``). A template with ``chat=False``
    (Chameleon) gives the user text to the processor as it is (the processor expands each ``image_placeholder``
    into the image's tokens; rows without an image lose theirs). A template's ``latent_placeholder`` follows the
    text ``latent_steps`` times (the official IVT-LR layout of a request that runs that many latent steps).
    Rows without an image get a text-only prompt (the others' images still go through the processor).
    ``prompt_texts`` replaces ``format_prompt(example, template)`` as the user text of each row.
    """
    if not examples:
        raise ValueError("encode_prompts needs at least one example")
    if prompt_texts is not None and len(prompt_texts) != len(examples):
        raise ValueError(f"{len(prompt_texts)} prompt_texts for {len(examples)} examples")
    t = get_template(template)
    if t.chat and not hasattr(processor, "apply_chat_template"):
        raise TypeError(f"{type(processor).__name__} has no chat template (pass the checkpoint's processor)")
    if t.chat and _no_chat_template(processor):  # what transformers would raise, saying what to do
        raise ValueError(f"{type(processor).__name__} has no chat template to render template {t.name!r}; a "
                         "Chameleon model takes a template without one (template='ivtlr_chameleon')")
    if isinstance(latent_steps, bool) or not isinstance(latent_steps, int) or latent_steps < 0:
        raise ValueError(f"latent_steps must be a non-negative int, got {latent_steps!r}")
    latent_suffix = (t.latent_placeholder or "") * latent_steps
    image_size = t.image_size if image_size is None else image_size
    texts, images = [], []
    for i, ex in enumerate(examples):
        user = format_prompt(ex, template) if prompt_texts is None else prompt_texts[i]
        row_images = getattr(ex, "images", None) or ([ex.image] if ex.image is not None else [])
        if not t.chat:  # the processor expands the image placeholders itself (the images first if the text has none)
            if t.image_placeholder and not row_images:
                user = user.replace(t.image_placeholder, "")
            elif t.image_placeholder and t.image_placeholder not in user:
                user = t.image_placeholder * len(row_images) + user
            texts.append(user + t.generation_suffix + latent_suffix)
        else:
            messages = chat_messages(ex, user, image_size=image_size, image_placeholder=t.image_placeholder)
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=t.add_generation_prompt,
                                                       tokenize=False) + t.generation_suffix + latent_suffix)
        images.extend(_resize(im, image_size) for im in row_images)
    tok = _tokenizer(processor)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        if images:
            enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        elif tok is processor:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            enc = processor(text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return EncodedPrompts(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
        mm_token_type_ids=enc.get("mm_token_type_ids"), pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
    )


def _no_chat_template(processor) -> bool:
    """True for a processor that has no chat template to render (ChameleonProcessor); a bare tokenizer counts as
    having one when it carries a template."""
    return getattr(processor, "chat_template", None) is None and \
        getattr(getattr(processor, "tokenizer", None), "chat_template", None) is None


def encode_images(images, processor, image_size=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values (num_patches, C*T*P*P), image_grid_thw (len(images), 3))`` of ``images`` through the
    processor's image processor (the Mirage helper images)."""
    proc = getattr(processor, "image_processor", None)
    if proc is None:
        raise TypeError(f"{type(processor).__name__} has no image processor; Mirage stage 1 needs a VLM processor")
    out = proc(images=[_resize(im, image_size) for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def collate(examples: Sequence[ReasoningExample], processor, stage: int = 0, *, mode: str = "cot",
            latent_steps: int | None = None, template="ivtlr", image_size=None,
            helper_images: bool = False) -> Batch:
    """The batch of ``examples`` at curriculum stage ``stage``.

    ``mode="cot"``: the target is ``steps[stage:]`` + the answer line + end-of-turn (between the template's
    ``target_prefix`` and ``target_suffix``; a free-form target's ``<output_image>`` dropped); the batch runs
    ``latent_steps`` latent steps (default: ``stage``; the trainer passes ``min(stage, cap)``, or for
    Mirage a fixed count with ``stage=0``). ``mode="direct"``: the answer line alone, no latent steps.
    ``helper_images=True`` adds the Mirage helper image of every row (:func:`helper_image`;
    ``ValueError`` naming the example when a row has none).

    Returns a :class:`Batch`: prompt tensors as :func:`encode_prompts`, ``target_ids``/``target_mask``
    (B, T) right-padded with the tokenizer's pad id.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
        raise ValueError(f"stage must be a non-negative int, got {stage!r}")
    n_latent = 0 if mode == "direct" else (stage if latent_steps is None else int(latent_steps))
    if n_latent < 0:
        raise ValueError(f"latent_steps must be >= 0, got {latent_steps}")
    prompt = encode_prompts(examples, processor, template=template, image_size=image_size, latent_steps=n_latent)
    tok = _tokenizer(processor)
    eot = end_of_turn_id(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    rows = []
    t = get_template(template)
    for ex in examples:
        text = format_target(ex, stage if mode == "cot" else 0, mode=mode, template=template).text
        text = t.target_prefix + text.replace(OUTPUT_IMAGE, "")  # latents at <output_image>: training/mirage.py
        suffix = list(tok(t.target_suffix, add_special_tokens=False)["input_ids"]) if t.target_suffix else []
        rows.append(list(tok(text, add_special_tokens=False)["input_ids"]) + [eot] + suffix)
    T = max(len(r) for r in rows)
    target_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    target_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, r in enumerate(rows):
        target_ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        target_mask[b, :len(r)] = True
    helper_pv = helper_thw = None
    if helper_images:
        imgs = []
        for ex in examples:
            img = helper_image(ex)
            if img is None:
                raise ValueError(f"example {ex.id!r} has no image and no helper image: Mirage stage 1 needs one")
            imgs.append(img)
        helper_pv, helper_thw = encode_images(imgs, processor, image_size)
    return Batch(**prompt.model_inputs(), target_ids=target_ids, target_mask=target_mask,
                 num_latent_steps=n_latent, replaced_steps=stage if mode == "cot" else 0,
                 helper_pixel_values=helper_pv, helper_image_grid_thw=helper_thw, ids=[ex.id for ex in examples])
