"""The official IVT-LR Qwen2-VL inference, re-written for the tests (independent of lvr_engine).

This follows what FYYDCC/IVT-LR ``qwen_vl/qwen_ivtlr.py`` (``IVTLR.generate`` -> ``IVTLR.forward``) and
``qwen_vl/infer.py`` do at inference, one question at a time, on a transformers
``Qwen2VLForConditionalGeneration`` loaded with ``attn_implementation="eager"``:

* the prompt is the chat template with the image, followed by N ``<|latent|>`` placeholders;
  positions are ``0 .. S-1`` over the whole sequence (2-D ``position_ids``, the model expands them
  to its three rotary axes);
* pass t = 0 .. N-1 re-runs the whole embedding sequence up to (not including) the first placeholder
  not yet consumed, with ``output_attentions=True`` and no cache reuse.  The score of each image token
  is the last query's attention probability averaged over every layer and head
  (``torch.cat(attentions, 1).mean(1)``, in the model's dtype).  Among the image tokens (between
  ``<|vision_start|>`` and ``<|vision_end|>``) not chosen in an earlier pass, ``topk(K, sorted=False)``
  picks K; their input-level embeddings (vision tower output scattered into the prompt) are inserted
  before the placeholder, in the order CUDA's ``topk(sorted=False)`` returns them (see
  :func:`cuda_topk_unsorted`), and the placeholder's embedding becomes the final-norm hidden state
  (``hidden_states[-1]``) of the position just before the inserted patches;
* after the last pass one more forward of the whole sequence gives the first answer token (argmax at
  the last position); then greedy decoding, positions continuing ``arange``; decoding stops after a
  token equal to the tokenizer's EOS id, except that the first answer token is never checked; at most
  ``max_new_tokens`` tokens.

Decoding here re-runs the whole sequence for every token (the official loop re-runs it once, then uses
the KV cache: the same computation in exact arithmetic).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def cuda_topk_unsorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest of ``scores`` (1-D) in the order CUDA's ``topk(k, sorted=False)`` returns.

    The CUDA kernel finds the k-th largest value v, then writes every index whose score is strictly
    greater than v in ascending index order, then indices whose score equals v, lowest index first,
    until k are written.  (CPU ``torch.topk(sorted=False)`` returns another order.)
    """
    values = [float(s) for s in scores.tolist()]
    if not 0 < k <= len(values):
        raise ValueError(f"k={k} out of range for {len(values)} scores")
    kth = sorted(values, reverse=True)[k - 1]
    above = [i for i, v in enumerate(values) if v > kth]
    tied = [i for i, v in enumerate(values) if v == kth]
    return above + tied[: k - len(above)]


@dataclass
class OfficialResult:
    tokens: list[int]                    # generated tokens (EOS included when it stopped there)
    selected: list[list[int]]            # per pass: chosen image-token indices (0-based), in fed order
    scores: list[torch.Tensor] = field(default_factory=list)  # per pass: (num_image_tokens,) scores, -inf = taken


def _forward(model, embeds, want_attentions):
    """One full forward of one row's embedding sequence (S, h) at positions 0..S-1."""
    S = embeds.shape[0]
    return model(
        inputs_embeds=embeds[None],
        attention_mask=torch.ones(1, S, dtype=torch.long, device=embeds.device),
        position_ids=torch.arange(S, device=embeds.device)[None],
        output_attentions=want_attentions,
        output_hidden_states=want_attentions,
        use_cache=False,
    )


@torch.no_grad()
def official_ivtlr_generate(model, input_ids, pixel_values, image_grid_thw, *, latent_token_id: int,
                            num_selected_patches: int = 32, eos_token_id: int | None = None,
                            max_new_tokens: int = 16, patch_order: str = "official") -> OfficialResult:
    """Run the official IVT-LR inference on one question.

    ``input_ids`` (S,) is the unpadded prompt ending with the N ``<|latent|>`` placeholders (N >= 1);
    ``pixel_values`` / ``image_grid_thw`` are the processor's for its single image.
    ``eos_token_id=None`` never stops early.  ``patch_order="ascending"`` feeds each pass's K patches in
    image-token order instead of the CUDA order (not the official behaviour; a control for the tests).
    """
    cfg = model.config
    ids = input_ids.to(model.device)
    K = num_selected_patches

    # -- the official prompt layout: one image between vision_start and vision_end, N trailing placeholders
    latent_at = (ids == latent_token_id).nonzero().flatten().tolist()
    N = len(latent_at)
    if N == 0 or latent_at != list(range(len(ids) - N, len(ids))):
        raise ValueError("the prompt must end with the <|latent|> placeholders (and hold no others)")
    starts = (ids == cfg.vision_start_token_id).nonzero().flatten().tolist()
    ends = (ids == cfg.vision_end_token_id).nonzero().flatten().tolist()
    if len(starts) != 1 or len(ends) != 1:
        raise ValueError("the official inference handles exactly one image per question")
    first_image, end_image = starts[0] + 1, ends[0]          # image tokens: [first_image, end_image)
    if not bool((ids[first_image:end_image] == cfg.image_token_id).all()):
        raise ValueError("expected only image tokens between vision_start and vision_end")
    num_image_tokens = end_image - first_image
    if N * K > num_image_tokens:
        raise ValueError(f"{N} passes of {K} patches need {N * K} image tokens, the image has {num_image_tokens}")

    # -- input-level embeddings: token embeddings with the vision tower's output at the image tokens
    embeds = model.get_input_embeddings()(ids).clone()
    vision = model.model.visual(pixel_values.to(model.device, model.model.visual.dtype), grid_thw=image_grid_thw)
    image_embeds = vision.pooler_output.to(embeds.dtype)
    if image_embeds.shape[0] != num_image_tokens:
        raise ValueError(f"{num_image_tokens} image tokens but {image_embeds.shape[0]} image features")
    embeds[first_image:end_image] = image_embeds

    # -- the latent passes: each consumes the first remaining placeholder
    sequence = embeds[: latent_at[0]]                        # everything before the first placeholder
    taken = torch.zeros(num_image_tokens, dtype=torch.bool)
    result = OfficialResult(tokens=[], selected=[])
    for _ in range(N):
        out = _forward(model, sequence, want_attentions=True)
        # mean over all layers and heads of the attention rows, in the model's dtype (as the official code)
        mean_attention = torch.cat(out.attentions, dim=1).mean(dim=1)[0]    # (S, S)
        last_row = mean_attention[-1]                                        # the last query's row
        scores = last_row[first_image:end_image].float().cpu()
        scores[taken] = float("-inf")
        if patch_order == "official":
            chosen = cuda_topk_unsorted(scores, K)
        elif patch_order == "ascending":
            chosen = sorted(cuda_topk_unsorted(scores, K))
        else:
            raise ValueError(f"patch_order must be 'official' or 'ascending', got {patch_order!r}")
        taken[chosen] = True
        result.selected.append(chosen)
        result.scores.append(scores)
        last_hidden = out.hidden_states[-1][0, -1]                           # after the final norm
        patches = embeds[first_image + torch.tensor(chosen, dtype=torch.long, device=embeds.device)]
        sequence = torch.cat([sequence, patches, last_hidden[None].to(sequence.dtype)])

    # -- answer: first token from one more full forward, then greedy decoding
    embed_tokens = model.get_input_embeddings()
    for step in range(max_new_tokens):
        logits = _forward(model, sequence, want_attentions=False).logits[0, -1]
        token = int(torch.argmax(logits))
        result.tokens.append(token)
        if step > 0 and eos_token_id is not None and token == eos_token_id:
            break
        sequence = torch.cat([sequence, embed_tokens(torch.tensor([token], device=sequence.device))])
    return result
