"""The official IVT-LR Chameleon inference, re-written for the tests (independent of lvr_engine).

This follows what FYYDCC/IVT-LR ``chameleon/chameleon_ivtlr.py`` (``IVTLR.generate`` -> ``IVTLR.forward``) and
``chameleon/infer_chameleon_scienceqa.py`` do at inference, one question at a time, on a transformers
``ChameleonForConditionalGeneration`` loaded with ``attn_implementation="eager"``:

* the prompt is what ``ChameleonProcessor`` makes of ``"<image>[Question]:{...}...Answer:" + "<|latent|>" * 3``:
  BOS, ``<racm3:break>``, the image placeholder tokens, ``<eoss>``, the text, the three placeholders, and the
  separator ``<reserved08706>`` appended by the processor;
* the image's VQ codes (``model.model.get_image_tokens`` on the pixels cast to the model's dtype) replace the run
  of image placeholder tokens that starts at the first one (the official code takes 1,024 tokens from there; the
  tiny models here have ``image_seq_length`` tokens per image), and every position is embedded with the token
  embedding: the image embeddings are the embeddings of the image tokens; positions are ``0 .. S-1``;
* pass t = 0 .. N-1 re-runs the whole embedding sequence up to (not including) the first placeholder not yet
  consumed, with ``output_attentions=True``, attention mask all ones and no cache reuse.  The score of each image
  token is the last query's attention probability averaged over every layer and head
  (``torch.cat(attentions, 1).mean(1)``, in the model's dtype); image tokens chosen in an earlier pass score
  ``-inf``; ``topk(K, sorted=False)`` over the image's positions picks K, in the order CUDA returns them
  (:func:`official_ivtlr.cuda_topk_unsorted`); their embeddings are inserted before the placeholder, whose own
  embedding becomes the final-norm hidden state (``hidden_states[-1]``) of the position just before them;
* after the last pass one more forward of the whole sequence — which now ends with the separator — gives the first
  answer token (argmax of the model's logits, image-token logits at the dtype's minimum as its forward sets them);
  then greedy decoding at positions continuing ``arange``; decoding stops after a token equal to the EOS id,
  except that the first answer token is never checked; at most ``max_new_tokens`` tokens.

Decoding here re-runs the whole sequence for every token (the official loop re-runs it once, then uses the KV
cache: the same computation in exact arithmetic).
"""
from __future__ import annotations

import torch

from official_ivtlr import OfficialResult, _forward, cuda_topk_unsorted


@torch.no_grad()
def official_chameleon_generate(model, input_ids, pixel_values, *, latent_token_id: int, image_token_id: int,
                                num_selected_patches: int = 64, eos_token_id: int | None = None,
                                max_new_tokens: int = 16, patch_order: str = "official") -> OfficialResult:
    """Run the official IVT-LR Chameleon inference on one question.

    ``input_ids`` (S,) is the processor's prompt for one image: the image placeholders, the N ``<|latent|>``
    placeholders (N >= 1) and, after them, the separator; ``pixel_values`` (1, 3, H, W) its image.
    ``eos_token_id=None`` never stops early; ``patch_order="ascending"`` feeds each pass's K patches in image-token
    order (not the official behaviour; a control for the tests).
    """
    ids = input_ids.to(model.device).clone()
    K = num_selected_patches
    dtype = model.get_input_embeddings().weight.dtype

    # -- the image's VQ codes replace its placeholder run (same length, so the placeholders keep their places)
    vokens = model.model.get_image_tokens(pixel_values.to(model.device, dtype))[0].long()
    T = vokens.numel()
    image_at = (ids == image_token_id).nonzero().flatten().tolist()
    if not image_at:
        raise ValueError("the official inference needs one image in the prompt")
    start = image_at[0]
    if image_at != list(range(start, start + T)):
        raise ValueError(f"expected one run of {T} image tokens (the image's VQ codes), got {len(image_at)}")
    ids[start:start + T] = vokens

    latent_at = (ids == latent_token_id).nonzero().flatten().tolist()
    N = len(latent_at)
    if N == 0 or latent_at != list(range(latent_at[0], latent_at[0] + N)):
        raise ValueError("the prompt must hold its <|latent|> placeholders in one run")
    if N * K > T:
        raise ValueError(f"{N} passes of {K} patches need {N * K} image tokens, the image has {T}")

    embed_tokens = model.get_input_embeddings()
    embeds = embed_tokens(ids).clone()                       # (S, h): the image embeddings are token embeddings
    image_embeds = embeds[start:start + T].clone()

    # -- the latent passes: each consumes the first remaining placeholder
    end = latent_at[0]
    taken = torch.zeros(T, dtype=torch.bool)
    result = OfficialResult(tokens=[], selected=[])
    for p in range(N):
        out = _forward(model, embeds[:end], want_attentions=True)
        # mean over all layers and heads of the attention rows, in the model's dtype (as the official code)
        mean_attention = torch.cat(out.attentions, dim=1).mean(dim=1)[0]    # (end, end)
        scores = mean_attention[end - 1, start:start + T].clone()
        scores[taken.to(scores.device)] = float("-inf")
        scores = scores.float().cpu()
        if patch_order == "official":
            chosen = cuda_topk_unsorted(scores, K)
        elif patch_order == "ascending":
            chosen = sorted(cuda_topk_unsorted(scores, K))
        else:
            raise ValueError(f"patch_order must be 'official' or 'ascending', got {patch_order!r}")
        taken[chosen] = True
        result.selected.append(chosen)
        result.scores.append(scores)
        hidden = out.hidden_states[-1][0, end - 1]            # after the final norm
        patches = image_embeds[torch.tensor(chosen, dtype=torch.long, device=embeds.device)]
        embeds[end] = hidden.to(embeds.dtype)                 # the placeholder becomes the hidden state ...
        embeds = torch.cat([embeds[:end], patches, embeds[end:]])  # ... and the patches go in before it
        end = end + K + 1 if p + 1 < N else embeds.shape[0]   # after the last pass: everything (the separator)

    # -- answer: first token from one more full forward, then greedy decoding
    sequence = embeds[:end]
    for step in range(max_new_tokens):
        logits = _forward(model, sequence, want_attentions=False).logits[0, -1]
        token = int(torch.argmax(logits))
        result.tokens.append(token)
        if step > 0 and eos_token_id is not None and token == eos_token_id:
            break
        sequence = torch.cat([sequence, embed_tokens(torch.tensor([token], device=sequence.device))])
    return result
