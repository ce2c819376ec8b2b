"""Input validation and the compact (left-aligned) layout of a batch of prompts.

Everything here runs before any model compute, so bad input fails fast and loses nothing.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..models.base import ModelAdapter, require_tensor


@dataclass
class PromptBatch:
    """A batch in the engine's layout. Shapes: B rows, S = longest prompt, I = most image tokens in a row."""

    ids: torch.Tensor            # (B, S) token ids, row b left-aligned on [0, lens[b])
    lens: torch.Tensor           # (B,) int64 prompt lengths
    order: torch.Tensor          # (B, S) index into the caller's columns for each compact slot
    image_slots: torch.Tensor    # (B, I) int32 compact slot of each image token, -1 = pad
    image_counts: list[int]      # image tokens per row
    images_per_row: list[int]    # images per row
    mask: torch.Tensor           # (B, S_in) int64 attended tokens of the caller's layout (after placeholders)


def as_tensor(name, x):
    """numpy arrays (what users naturally pass) become tensors; anything else is returned as is."""
    if x is not None and not isinstance(x, torch.Tensor) and type(x).__module__ == "numpy":
        return torch.from_numpy(x)
    return x


def int_value(name, v, lo=None, hi=None):
    """An int argument (numpy integers accepted) within [lo, hi)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo if lo is not None else '-inf'}, {hi})"
        raise ValueError(f"{name} must be {bounds}, got {v}")
    return v


def token_ids(name, v, vocab: int, allow_empty: bool = False) -> list[int]:
    """One token id or a list of them (non-empty unless ``allow_empty``), each within the vocabulary [0, vocab)."""
    if isinstance(v, str) or (isinstance(v, (list, tuple)) and any(isinstance(x, str) for x in v)):
        raise TypeError(f"{name} must be token ids, got the string {v!r}; look it up with "
                        "tokenizer.convert_tokens_to_ids")
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if not items and not allow_empty:
        raise ValueError(f"{name} is empty; give at least one token id (or leave it None for the model's own)")
    return [int_value(name, x, 0, vocab) for x in items]


def check_sampling(do_sample, temperature, top_k, top_p, seed) -> None:
    """Types and ranges of the sampling arguments. ``temperature``/``top_p`` are only range-checked when
    sampling (a greedy call may carry ``temperature=0``) but must be finite numbers either way."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    int_value("top_k", top_k, 0)
    if seed is not None:
        int_value("seed", seed)
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_capacity(adapter: ModelAdapter, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   batch: int, prompt_len: int, latent_len: int, max_new_tokens: int) -> None:
    """The request's longest row must fit the model's positions, and its KV cache the device's free memory:
    say both numbers when it does not (before anything is allocated)."""
    total = prompt_len + latent_len + max_new_tokens
    limit = getattr(adapter.text_config, "max_position_embeddings", None)
    if limit is not None and total > int(limit):
        raise ValueError(f"the longest row needs {total} positions ({prompt_len} prompt + {latent_len} latent + "
                         f"max_new_tokens={max_new_tokens}), more than the model's max_position_embeddings={limit}")
    need = 2 * num_layers * batch * num_kv_heads * total * head_dim * torch.empty(0, dtype=dtype).element_size()
    free = _free_memory(adapter.device)
    if free is not None and need > free:
        raise ValueError(f"the KV cache for {batch} rows x {total} positions needs {need / 2**30:.2f} GiB, but only "
                         f"{free / 2**30:.2f} GiB are free on {adapter.device}; lower max_new_tokens or the batch size")


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors: the CUDA allocator's view, or MemAvailable on Linux hosts (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def consume_placeholders(input_ids: torch.Tensor, attention_mask, placeholder_id: int, num_latent_steps: int,
                         end_marker_id: int | None = None):
    """The official IVT-LR layout: a prompt that ends with ``num_latent_steps`` ``<|latent|>`` placeholders is the
    same request as the prompt without them (docs/semantics.md). With ``end_marker_id`` (Chameleon: the processor's
    separator, which follows the placeholders), a prompt ending with the placeholders and then that marker is the
    same request as the prompt without both: the marker is fed after the latent segment, as the config's end marker.
    Returns the attention mask (B, S) with each row's consumed tokens masked out; a row that ends with some other
    number of placeholders is a ValueError. input_ids (B, S); attention_mask (B, S) or None (all attended)."""
    require_tensor("input_ids", input_ids, 2, (torch.int64, torch.int32))
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).clone()
    require_tensor("attention_mask", mask, 2)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    for b in range(input_ids.shape[0]):
        valid = torch.nonzero(mask[b].bool()).flatten()
        row = input_ids[b, valid].tolist()
        # a trailing end marker counts only when placeholders precede it: a prompt may end with that token itself
        tail = 1 if end_marker_id is not None and len(row) > 1 and row[-1] == end_marker_id \
            and row[-2] == placeholder_id else 0
        n = 0
        while n < len(row) - tail and row[len(row) - 1 - tail - n] == placeholder_id:
            n += 1
        if n and n != num_latent_steps:
            after = " before the end marker" if tail else ""
            raise ValueError(f"row {b} of input_ids ends with {n} latent placeholder tokens (id {placeholder_id})"
                             f"{after} but num_latent_steps={num_latent_steps}; they must be equal")
        if n:
            mask[b, valid[len(row) - n - tail:]] = 0
    return mask


def validate_and_layout(adapter: ModelAdapter, input_ids, attention_mask, pixel_values, image_grid_thw,
                        mm_token_type_ids, max_new_tokens, num_latent_steps, num_selected_patches) -> PromptBatch:
    """Check the request against the model and the latent config; build the compact layout.

    Raises ValueError/TypeError naming the problem: shapes, image tokens without pixel values, image tokens
    not matching ``image_grid_thw``, too few image tokens for N*K selections, K > 0 on a text-only model,
    non-positive ``max_new_tokens``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    require_tensor("input_ids", input_ids, 2, (torch.int64, torch.int32))
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    vocab = adapter.vocab_size
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bad.any():  # every position, padding included: all of them are embedded
        b, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"input_ids[{b}, {j}] = {int(input_ids[b, j])} is not a token id of this model "
                         f"(vocabulary size {vocab}); {int(bad.sum())} position(s) out of range, padding included")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    require_tensor("attention_mask", attention_mask, 2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    lens = mask.sum(1)
    if (lens == 0).any():
        raise ValueError(f"rows {torch.nonzero(lens == 0).flatten().tolist()} have no attended tokens")
    # Valid tokens must be one contiguous run per row (left or right padding, not holes).
    first = mask.int().argmax(1)
    span = torch.arange(S)[None, :]
    contiguous = ((span >= first[:, None]) & (span < (first + lens)[:, None])) == mask.cpu()
    if not contiguous.all():
        raise ValueError("attention_mask must be one contiguous run of 1s per row (left or right padding)")
    if mm_token_type_ids is not None:
        require_tensor("mm_token_type_ids", mm_token_type_ids, 2)
        if mm_token_type_ids.shape != input_ids.shape:
            raise ValueError(f"mm_token_type_ids shape {tuple(mm_token_type_ids.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")

    K, N = num_selected_patches, num_latent_steps
    if not adapter.is_multimodal:
        if K > 0 and N > 0:
            raise ValueError(
                f"num_selected_patches={K} > 0 needs image tokens, but {type(adapter.model).__name__} is a "
                "text-only model; use num_selected_patches=0 (Coconut)"
            )
        if pixel_values is not None or image_grid_thw is not None:
            raise ValueError(f"pixel_values/image_grid_thw given to text-only model {type(adapter.model).__name__}")
        image_mask = torch.zeros_like(mask)
    else:
        image_mask = (input_ids == adapter.image_token_id) & mask
        if mm_token_type_ids is not None:  # positions follow mm_token_type_ids, the scatter follows input_ids
            typed = (mm_token_type_ids.to(mask.device) == 1) & mask
            if not torch.equal(typed, image_mask):
                b = int(torch.nonzero((typed != image_mask).any(1))[0])
                raise ValueError(f"mm_token_type_ids row {b} marks {int(typed[b].sum())} image tokens but input_ids "
                                 f"row {b} holds {int(image_mask[b].sum())} image tokens (id {adapter.image_token_id}) "
                                 "at other positions; they must agree")

    counts = image_mask.sum(1).tolist()
    images_per_row = [0] * B
    if sum(counts) > 0 or pixel_values is not None or image_grid_thw is not None:
        if pixel_values is None:
            raise ValueError(f"input_ids contain {sum(counts)} image tokens but pixel_values is None")
        per_image = adapter.check_images(pixel_values, image_grid_thw, sum(counts))  # the family's layout
        # Each contiguous run of image tokens is one image, in order through the batch.
        it = iter(per_image)
        for b in range(B):
            row = image_mask[b].int()
            runs = torch.nonzero(torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)])), as_tuple=False)
            run_lens = (runs[1::2] - runs[0::2]).flatten().tolist()
            for r in run_lens:
                n = next(it, None)
                if n != r:
                    raise ValueError(
                        f"image tokens do not match {adapter.image_source}: row {b} has a run of {r} image tokens "
                        f"where the next image in {adapter.image_source} has {n}"
                    )
            images_per_row[b] = len(run_lens)

    if N > 0 and K > 0:
        short = [(b, c) for b, c in enumerate(counts) if c < N * K]
        if short:
            b, c = short[0]
            raise ValueError(
                f"row {b} has {c} image tokens but {N} latent steps x {K} patches need {N * K} distinct ones "
                f"(rows short: {[r for r, _ in short]})"
            )

    # Compact layout: valid tokens first, in their original order (a stable sort on "is padding").
    order = torch.sort((~mask).int(), dim=1, stable=True).indices
    ids = torch.gather(input_ids.long(), 1, order)
    S_img = max(counts) if counts else 0
    image_slots = torch.full((B, S_img), -1, dtype=torch.int32)
    compact_img = torch.gather(image_mask, 1, order)
    for b in range(B):
        idx = torch.nonzero(compact_img[b]).flatten()
        image_slots[b, : idx.numel()] = idx.to(torch.int32)
    return PromptBatch(ids=ids, lens=lens.long(), order=order, image_slots=image_slots, image_counts=counts,
                       images_per_row=images_per_row, mask=mask.long())
