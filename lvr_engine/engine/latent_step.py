"""The latent step, defined once for generation (engine/generator.py) and training (training/latent_forward.py).

docs/semantics.md pins what it does. Step t of a row, after the prompt (and the optional start marker):
choose the K image tokens with the highest accumulated last-query attention score that the row has not
used yet, assemble the block ``[z_t; h_t]`` (K image embeddings in ``patch_order``, then the fed-back
final-norm hidden state), append the end marker after the last step, and run the block as one chunk on
the KV cache; the chunk's forward accumulates the scores the next step chooses by.

Generation runs without autograd: the fused op ``ops.select_and_feedback`` picks the patches and writes the
block into a reusable buffer. Training runs with autograd: the same selection rule picks the patches and
the block is one differentiable gather, so gradients reach the image embeddings and the fed-back hidden
states (unless ``detach_latents``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from .prompt import PreparedPrompt


@dataclass
class LatentSegment:
    """A batch's latent segment: what the steps choose from and how. Shapes: B rows, I image tokens, h hidden.

    ``scores`` (B,I) float32 is the accumulator the forwards add the last query's attention into (summed over
    layers and heads); selection resets it. ``available`` (B,I) bool: image tokens not chosen yet (False at
    pads). ``score_mean``: (layers x heads, model dtype) when ``score_precision="model"``: the mean is rounded
    to the model's dtype before choosing, as the official code's ``torch.mean`` in bf16 does.
    """

    num_steps: int
    k: int
    image_embeds: torch.Tensor           # (B, I, h) input-level image embeddings in prompt order
    image_slots: torch.Tensor            # (B, I) int32 cache slot of each image token, -1 pad
    scores: torch.Tensor                 # (B, I) float32
    available: torch.Tensor              # (B, I) bool
    patch_order: str = "ascending"
    score_mean: tuple[int, torch.dtype] | None = None
    end_embed: torch.Tensor | None = None  # (h,) the end marker's embedding, appended after the last step
    backend: str | None = None
    selected: list[torch.Tensor] = field(default_factory=list)  # per step (B, K) in fed order

    @property
    def prob_dtype(self) -> torch.dtype | None:
        """Round each attention probability to this dtype before scoring (score_precision="model"), or None."""
        return self.score_mean[1] if self.score_mean is not None else None

    def selected_tensor(self) -> torch.Tensor:
        """(B, steps run, K) int64 chosen image-token indices in fed order."""
        B = self.scores.shape[0]
        if not self.selected:
            return torch.empty(B, 0, self.k, dtype=torch.long, device=self.scores.device)
        return torch.stack(self.selected, 1)


def begin_segment(p: PreparedPrompt, num_steps: int, k: int, *, patch_order: str = "ascending",
                  score_precision: str = "fp32", model_dtype: torch.dtype = torch.float32, num_score_terms: int = 1,
                  end_embed: torch.Tensor | None = None, backend: str | None = None,
                  scores: torch.Tensor | None = None) -> LatentSegment:
    """The segment state of a prepared prompt. ``num_score_terms`` = decoder layers x attention heads (the mean's
    divisor under ``score_precision="model"``); ``scores`` may be a persistent (B,I) buffer (CUDA graphs)."""
    if patch_order not in ("ascending", "official"):
        raise ValueError(f"patch_order must be 'ascending' or 'official', got {patch_order!r}")
    if score_precision not in ("fp32", "model"):
        raise ValueError(f"score_precision must be 'fp32' or 'model', got {score_precision!r}")
    rounds = score_precision == "model" and model_dtype in (torch.bfloat16, torch.float16)
    if scores is None:
        scores = torch.zeros(p.image_slots.shape, dtype=torch.float32, device=p.image_slots.device)
    return LatentSegment(num_steps, k, p.image_embeds, p.image_slots, scores, p.image_slots >= 0, patch_order,
                         (num_score_terms, model_dtype) if rounds else None, end_embed, backend)


def latent_block(seg: LatentSegment, h_last: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The next step's input block (B, K+1, h) = [z_t; h_t] from h_last (B, h); records the choice in
    ``seg.selected``, marks it used and resets the scores.

    Without autograd the fused op fills ``out`` (B, K+1, h) (allocated if None). With autograd (training) the
    block is a differentiable gather of the image embeddings plus h_last, and ``out`` is not used.
    """
    if seg.score_mean is not None and seg.k > 0:  # the official mean over layers x heads, in the model's dtype
        seg.scores.copy_(ops.mean_scores_in_dtype(seg.scores, *seg.score_mean))
    grad = torch.is_grad_enabled() and (h_last.requires_grad or seg.image_embeds.requires_grad)
    if not grad:
        if out is None:
            out = h_last.new_empty(h_last.shape[0], seg.k + 1, h_last.shape[-1])
        idx = ops.select_and_feedback(seg.scores, seg.available, seg.image_embeds, h_last, seg.k, out,
                                      patch_order=seg.patch_order, backend=seg.backend)
        seg.selected.append(idx)
        return out
    idx = ops.select_patches(seg.scores, seg.available, seg.k, patch_order=seg.patch_order)
    seg.selected.append(idx)
    emb = seg.image_embeds
    z = torch.gather(emb, 1, idx[..., None].expand(-1, -1, emb.shape[-1])).to(h_last.dtype)
    return torch.cat([z, h_last[:, None]], 1)


def segment_chunk(seg: LatentSegment, block: torch.Tensor, last: bool,
                  tail: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk a latent step feeds: its block (B, K+1, h), and after the segment's last step the end marker
    (when the segment has one) and ``tail`` (B, T, h) behind it: (B, K+1 [+1] [+T], h). The continuous-batching
    scheduler (engine/scheduler.py) runs rows at different steps of their segments through this and
    ``latent_block``, a group of rows at a time."""
    if not last:
        return block
    B = block.shape[0]
    extra = ([seg.end_embed.to(block.dtype).expand(B, 1, -1)] if seg.end_embed is not None else []) + (
        [tail] if tail is not None else [])
    return torch.cat([block, *extra], 1) if extra else block


# forward(chunk (B,C,h), with_scores, last_step) -> hidden (B,C',h) whose last row is the chunk's last position
Forward = Callable[[torch.Tensor, bool, bool], torch.Tensor]


def run_latent_steps(seg: LatentSegment, h_last: torch.Tensor, forward: Forward, *, tail: torch.Tensor | None = None,
                     detach_latents: bool = False, hook=None, keep: list | None = None,
                     buf: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the segment's N steps from h_last (B, h), the final-norm hidden state of each row's last position.

    Step t builds [z_t; h_t] (``latent_block``), lets ``hook(t, block)`` modify or replace it, keeps a copy in
    ``keep`` if given, appends the end marker and ``tail`` (B,T,h) (training: the target text, in the same pass)
    after the last step, and calls ``forward``; scores are accumulated for every step but the last (nothing
    is chosen after it). Returns the last forward's hidden states and the fed-back hidden states h_1..h_N
    (each (B, h)).
    """
    fed_hidden = []
    out = None
    for t in range(seg.num_steps):
        fed = h_last.detach() if detach_latents else h_last
        fed_hidden.append(fed)
        block = latent_block(seg, fed, buf)
        if hook is not None:
            replaced = hook(t, block)
            block = block if replaced is None else replaced
        if keep is not None:
            keep.append(block.clone())
        last = t == seg.num_steps - 1
        out = forward(segment_chunk(seg, block, last, tail), seg.k > 0 and not last, last)
        h_last = out[:, -1]
    return out, fed_hidden


def mirage_switch(cfg, tok: torch.Tensor, latent: torch.Tensor, count: torch.Tensor):
    """One decoding step of Mirage's per-row switching (docs/semantics.md, ``trigger="token"``), for generate and
    the continuous-batching scheduler alike. tok (B,) the sampled ids; latent (B,) bool: the row is inside a latent
    segment; count (B,) int64: latent steps fed in that segment. A row inside a segment ends it when it samples
    ``latent_end_id`` or reaches ``max_latent_steps`` (``latent_end_id`` is then fed), else feeds back its hidden
    state (shown as ``latent_pad_id``); a row outside enters one when it samples ``latent_start_id``.
    Returns (tok shown (B,), feed_hidden (B,) bool, latent after (B,), count after (B,))."""
    def full(v):
        return torch.full_like(tok, v)

    end_now = latent & ((tok == cfg.latent_end_id) | (count >= cfg.max_latent_steps))
    feed = latent & ~end_now
    tok = torch.where(feed, full(cfg.latent_pad_id), torch.where(end_now, full(cfg.latent_end_id), tok))
    enter = ~latent & (tok == cfg.latent_start_id)
    count = torch.where(feed, count + 1, torch.where(enter, torch.zeros_like(count), count))
    return tok, feed, feed | enter, count
