"""The latent forward for training, on the engine's runner and ops (no output_attentions, no eager attention).

For a batch at curriculum stage s (s latent steps), per row:
    prompt [+ start marker] | z_1 h_1 | ... | z_s h_s [+ end marker] | target text (remaining steps + answer)
computed as one prefill over the prompts, one (K+1)-position pass per latent step on an out-of-place KV
cache (so autograd flows through every fed-back hidden state), and the final pass of the last latent step
+ end marker + target text. The patch scores come from the same fused score op as inference; the chosen
patches from the same selection op. Loss: cross-entropy on the target text only (prompt, markers and
latent positions are unlabelled), unless ``supervise_markers`` (Mirage) also labels the start marker
(predicted from the prompt) and the end marker (predicted from the last latent position).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.inputs import consume_placeholders, validate_and_layout
from ..engine.kv_cache import FunctionalKVCache
from ..engine.latent_step import begin_segment, run_latent_steps
from ..engine.prompt import next_positions, prepare_prompt
from ..engine.runner import DecoderRunner
from ..models.base import ModelAdapter
from .mirage import mirage_latent_loss, pool_image_embeddings  # noqa: F401  (Mirage's; importable here as before)


@dataclass
class LatentForwardOutput:
    loss: torch.Tensor            # scalar: ce_sum / num_tokens
    ce_sum: torch.Tensor          # scalar: summed token cross-entropy (for exact global normalisation)
    num_tokens: int               # labelled tokens in this batch
    latent_hidden: torch.Tensor   # (B, s, h) the hidden states fed back as h_1..h_s
    selected: torch.Tensor        # (B, s, K) chosen image-token indices
    target_logits: torch.Tensor   # (B, T, V) logits predicting each target token


def latent_forward(runner: DecoderRunner, adapter: ModelAdapter, *, input_ids, attention_mask=None,
                   pixel_values=None, image_grid_thw=None, mm_token_type_ids=None, target_ids, target_mask=None,
                   num_latent_steps: int, num_selected_patches: int, start_marker_id=None, end_marker_id=None,
                   position_mode: str = "mrope", detach_latents: bool = False,
                   supervise_markers: bool = False, patch_order: str = "ascending",
                   score_precision: str = "fp32", placeholder_id: int | None = None) -> LatentForwardOutput:
    """Loss and latents of a batch at stage ``num_latent_steps`` (shapes: input_ids (B,S) prompt with either
    padding side; target_ids/target_mask (B,T) right-padded target text incl. EOS).

    ``detach_latents=True`` feeds back h_t without gradient (the official IVT-LR behaviour); by default the
    gradient flows through every fed-back hidden state as in Coconut. The latent steps are the engine's
    (engine/latent_step.py), run with autograd; ``patch_order``/``score_precision`` as in LatentConfig.
    ``placeholder_id``: prompts in the official IVT-LR layout end with ``num_latent_steps`` of these (then the end
    marker, when there is one), consumed as at inference (``LatentConfig.placeholder_id``).
    """
    s, K = num_latent_steps, (num_selected_patches if num_latent_steps > 0 else 0)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    if placeholder_id is not None:  # the official layout: the same request as the prompt without them
        attention_mask = consume_placeholders(cpu(input_ids), cpu(attention_mask), placeholder_id, s,
                                              end_marker_id if s > 0 else None)
    batch = validate_and_layout(adapter, cpu(input_ids), cpu(attention_mask), pixel_values, cpu(image_grid_thw),
                                mm_token_type_ids, 1, s, K)
    if target_ids.ndim != 2 or target_ids.shape[0] != batch.ids.shape[0]:
        raise ValueError(f"target_ids must be (B, T) with B={batch.ids.shape[0]}, got {tuple(target_ids.shape)}")
    dev, dtype = adapter.device, adapter.dtype
    target_ids = target_ids.to(dev)
    target_mask = (torch.ones_like(target_ids, dtype=torch.bool) if target_mask is None else target_mask.to(dev).bool())
    B, T = target_ids.shape
    use_start = s > 0 and start_marker_id is not None
    use_end = s > 0 and end_marker_id is not None
    p = prepare_prompt(adapter, runner.embed, batch, input_ids, pixel_values, image_grid_thw, mm_token_type_ids,
                       position_mode, start_marker_id if use_start else None, dev, dtype)
    w = runner.w
    S = p.embeds.shape[1]
    cache = FunctionalKVCache(len(w.layers), B, w.num_kv_heads, S + s * (K + 1) + 1 + T, w.head_dim, dtype, dev)
    rows = torch.arange(B, device=dev)
    end_embed = runner.embed(torch.tensor([end_marker_id], device=dev))[0] if use_end else None
    seg = begin_segment(p, s, K, patch_order=patch_order, score_precision=score_precision, model_dtype=dtype,
                        num_score_terms=len(w.layers) * w.num_heads, end_embed=end_embed, backend=runner.backend)
    select = K > 0 and s > 0
    hidden = runner.prefill(p.embeds, p.positions, p.lens, cache, p.image_slots if select else None,
                            seg.scores if select else None, prob_dtype=seg.prob_dtype)
    h_last = hidden[rows, p.lens - 1]
    extra_logits, extra_labels = [], []
    if supervise_markers and use_start:  # the prompt's last real token predicts the start marker
        extra_logits.append(runner.logits(hidden[rows, p.lens - 2]))
        extra_labels.append(torch.full((B,), start_marker_id, device=dev))

    target_embeds = runner.embed(target_ids)
    latent_hidden = []
    if s == 0:
        first_logits = runner.logits(h_last)[:, None]                      # predicts target[0]
        out = runner.step(target_embeds[:, :-1], next_positions(cache.lens, p.offset, T - 1), cache) if T > 1 else None
        logits = first_logits if out is None else torch.cat([first_logits, runner.logits(out)], 1)
    else:
        def forward(chunk, with_scores, _last):
            return runner.step(chunk, next_positions(cache.lens, p.offset, chunk.shape[1]), cache,
                               p.image_slots if with_scores else None, seg.scores if with_scores else None,
                               prob_dtype=seg.prob_dtype)

        # the last step's pass also runs the end marker and the target text (teacher forcing, one pass)
        out, latent_hidden = run_latent_steps(seg, h_last, forward, tail=target_embeds[:, :-1],
                                              detach_latents=detach_latents)
        first = K + (1 if use_end else 0)  # chunk position whose output predicts target[0]
        logits = runner.logits(out[:, first:first + T])
        if supervise_markers and use_end:  # the last latent position predicts the end marker
            extra_logits.append(runner.logits(out[:, K]))
            extra_labels.append(torch.full((B,), end_marker_id, device=dev))

    ce = F.cross_entropy(_at_least_fp32(logits).reshape(B * T, -1), target_ids.reshape(-1), reduction="none").view(B, T)
    ce_sum = (ce * target_mask).sum()
    n = int(target_mask.sum())
    for lg, lb in zip(extra_logits, extra_labels, strict=True):
        ce_sum = ce_sum + F.cross_entropy(_at_least_fp32(lg), lb, reduction="sum")
        n += B
    h = hidden.shape[-1]
    return LatentForwardOutput(
        loss=ce_sum / max(n, 1), ce_sum=ce_sum, num_tokens=n,
        latent_hidden=torch.stack(latent_hidden, 1) if latent_hidden else hidden.new_zeros(B, 0, h),
        selected=seg.selected_tensor(),
        target_logits=logits,
    )


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32 for half-precision logits, in fp64 for fp64 checks."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
