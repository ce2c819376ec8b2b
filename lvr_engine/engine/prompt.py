"""Turning a validated batch into decoder inputs: embeddings with images, positions, start marker.

Shared by the generator and the trainer so both see exactly the same prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import ModelAdapter
from .inputs import PromptBatch


@dataclass
class PreparedPrompt:
    """Shapes: B rows, S compact prompt width (incl. the start marker), I image tokens, h hidden size."""

    embeds: torch.Tensor              # (B, S, h) row b valid on [0, lens[b])
    positions: torch.Tensor           # (3, B, S) rotary positions
    offset: torch.Tensor              # (B,) position of any appended slot s is s + offset[b]
    lens: torch.Tensor                # (B,) int64
    image_slots: torch.Tensor         # (B, I) int32 compact slot of each image token, -1 pad
    image_embeds: torch.Tensor        # (B, I, h) the row's image embeddings in prompt order (zeros at pads)


def prepare_prompt(adapter: ModelAdapter, embed, batch: PromptBatch, input_ids, pixel_values, image_grid_thw,
                   mm_token_type_ids, position_mode: str, start_marker_id: int | None, device,
                   dtype) -> PreparedPrompt:
    """Embeddings of the compact prompts with the vision tower's output scattered into the image slots,
    their positions ("mrope": the model's own; "arange": slot index) and, if given, the start marker
    appended as one more prompt token at the next text position."""
    ids = batch.ids.to(device)
    lens = batch.lens.to(device)
    order = batch.order.to(device)
    image_slots = batch.image_slots.to(device)
    B = ids.shape[0]
    embeds = embed(ids)
    hdim = embeds.shape[-1]
    if sum(batch.image_counts) > 0:
        grid = image_grid_thw.to(device) if image_grid_thw is not None else None  # None: Chameleon (images)
        per_image = adapter.encode_images(pixel_values.to(device), grid, compute_dtype=dtype)
        image_embeds = _rows_of_images(per_image, batch.images_per_row, image_slots.shape[1], hdim, dtype)
        del per_image
        rows, cols = torch.nonzero(image_slots >= 0, as_tuple=True)
        # in place: embeds is this call's own tensor (a second (B,S,h) copy was the prompt's largest transient)
        embeds.index_put_((rows, image_slots[rows, cols].long()), image_embeds[rows, cols])
    else:
        image_embeds = embeds.new_zeros(B, image_slots.shape[1], hdim)
    positions, offset = _prompt_positions(adapter, position_mode, input_ids, batch.mask, mm_token_type_ids,
                                          image_grid_thw, order, lens)
    if start_marker_id is not None:
        ar = torch.arange(B, device=device)
        embeds = torch.cat([embeds, embeds.new_zeros(B, 1, hdim)], 1)
        positions = torch.cat([positions, positions.new_zeros(3, B, 1)], 2)
        marker = embed(torch.tensor([start_marker_id], device=device))[0]
        embeds = embeds.index_put((ar, lens), marker.expand(B, -1))
        positions[:, ar, lens] = (lens + offset)[None]
        lens = lens + 1
    return PreparedPrompt(embeds, positions, offset, lens, image_slots, image_embeds)


def next_positions(lens: torch.Tensor, offset: torch.Tensor, chunk: int) -> torch.Tensor:
    """(3, B, C) positions of the next ``chunk`` tokens appended after slot lens[b]-1: next text positions."""
    p = lens[:, None] + torch.arange(chunk, device=lens.device)[None, :] + offset[:, None]
    return p[None].expand(3, -1, -1)


def _rows_of_images(per_image, images_per_row, width, hdim, dtype):
    """(B, I, h): each row's image embeddings in prompt order, zero-padded."""
    rows = []
    i = 0
    for n in images_per_row:
        row = (torch.cat(per_image[i:i + n], 0) if n else per_image[0].new_zeros(0, hdim)).to(dtype)
        rows.append(torch.nn.functional.pad(row, (0, 0, 0, width - row.shape[0])))
        i += n
    return torch.stack(rows)


def _prompt_positions(adapter, position_mode, input_ids, attention_mask, mm_token_type_ids, image_grid_thw,
                      order, lens):
    """(3, B, S) compact prompt positions and (B,) offset: position of slot s >= len is s + offset."""
    dev = order.device
    B, S = order.shape
    slot = torch.arange(S, device=dev)[None].expand(B, -1)
    if position_mode == "arange" or not adapter.is_multimodal:
        return slot[None].expand(3, -1, -1).clone(), torch.zeros(B, dtype=torch.long, device=dev)
    ids = input_ids.to(dev)
    mask = attention_mask.to(dev)
    if mm_token_type_ids is None:
        mm_token_type_ids = (ids == adapter.image_token_id).int()
    pos = adapter.prompt_positions(ids, mask, mm_token_type_ids.to(dev),
                                   image_grid_thw.to(dev) if image_grid_thw is not None else None)
    pos = torch.gather(pos.to(dev), 2, order[None].expand(3, -1, -1))
    valid = slot < lens[:, None]
    top = pos.masked_fill(~valid[None], -1).amax(dim=(0, 2))  # (B,) max prompt position
    return pos, top + 1 - lens
