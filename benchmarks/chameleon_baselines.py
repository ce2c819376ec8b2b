"""IVT-LR on Chameleon: the baselines the engine is measured against (benchmarks/test_chameleon.py), written on
plain transformers, independently of the engine.

Both take one question in the official layout (``ChameleonProcessor`` output of the prompt + ``<|latent|>`` x N: BOS,
image markers around the image placeholders, the text, the N placeholders, the separator) and return
``(answer tokens, selections (N, K))``, greedy, ``max_new_tokens`` tokens (no early stop when ``eos_token_id`` is
None; the first token is never checked, as the official loop).

* :func:`published_chameleon_generate` is the published algorithm as FYYDCC/IVT-LR ``chameleon/chameleon_ivtlr.py``
  runs it: the image's VQ tokens replace its placeholders and everything is token-embedded; every latent pass re-runs
  the whole sequence up to the next placeholder with eager attention and ``output_attentions=True``, the scores are
  the last query's attention averaged over all layers and heads (in the model's dtype), ``topk(K, sorted=False)``
  (CUDA's order) picks K not chosen before; the patches go in before the placeholder, whose embedding becomes the
  last hidden state; one more whole-sequence pass (through the separator) gives the first answer token; decoding
  re-runs the whole sequence once, then continues on the KV cache (as the official ``generate`` does).
* :func:`cached_eager_chameleon_generate` is the same computation done carefully: one prefill into a
  ``DynamicCache``, each latent step one forward of its K+1 positions on the cache (attentions only where a selection
  follows), the separator with the last step, cached decoding.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def _cuda_topk_order(scores: torch.Tensor, k: int) -> list[int]:
    """The indices CUDA's ``topk(k, sorted=False)`` returns, in its order: those above the k-th value ascending,
    then those equal to it from the lowest index."""
    values = scores.tolist()
    kth = sorted(values, reverse=True)[k - 1]
    above = [i for i, v in enumerate(values) if v > kth]
    return above + [i for i, v in enumerate(values) if v == kth][: k - len(above)]


def _layout(model, ids, pixel_values, latent_id, image_id):
    """(embeddings (S,h) with the image's VQ tokens embedded, image positions (T,), placeholder positions (N,))."""
    ids = ids.clone()
    vq = model.model.get_image_tokens(pixel_values.to(model.dtype))[0].long()
    img = (ids == image_id).nonzero().flatten()
    if img.numel() != vq.numel():
        raise ValueError(f"{img.numel()} image placeholders for {vq.numel()} VQ tokens")
    ids[img] = vq
    lat = (ids == latent_id).nonzero().flatten()
    return model.get_input_embeddings()(ids), img, lat


def _cache_kw(model):
    """The model's keyword for a KV cache (``cache`` in transformers >= 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def published_chameleon_generate(model, ids, pixel_values, *, latent_id: int, image_id: int,
                                 num_selected_patches: int = 64, max_new_tokens: int = 8, eos_token_id=None):
    """The official algorithm on one unpadded row ``ids`` (S,) with N >= 1 placeholders (eager attention)."""
    embeds, img, lat = _layout(model, ids, pixel_values, latent_id, image_id)
    image_embeds = embeds[img]
    K, N = num_selected_patches, lat.numel()
    end = int(lat[0])
    taken = torch.zeros(img.numel(), dtype=torch.bool)
    selected = []

    def full(e, attn):
        return model(inputs_embeds=e[None], position_ids=torch.arange(e.shape[0])[None], output_attentions=attn,
                     output_hidden_states=attn, use_cache=False)

    for p in range(N):
        out = full(embeds[:end], True)
        mean = torch.cat(out.attentions, dim=1).mean(dim=1)[0, end - 1]     # (end,) in the model's dtype
        scores = mean[img].float().masked_fill(taken, float("-inf"))
        idx = _cuda_topk_order(scores, K)
        taken[idx] = True
        selected.append(torch.tensor(idx))
        embeds = embeds.clone()
        embeds[end] = out.hidden_states[-1][0, end - 1]
        embeds = torch.cat([embeds[:end], image_embeds[idx], embeds[end:]])
        end = end + K + 1 if p + 1 < N else embeds.shape[0]
    tokens = [int(full(embeds[:end], False).logits[0, -1].argmax())]
    emb = model.get_input_embeddings()
    seq = torch.cat([embeds[:end], emb(torch.tensor([tokens[-1]]))])
    kw = _cache_kw(model)
    cache = None
    while len(tokens) < max_new_tokens:
        if cache is None:  # the official loop: one whole re-run, then the cache
            cache = DynamicCache(config=model.config)
            out = model(inputs_embeds=seq[None], position_ids=torch.arange(seq.shape[0])[None], use_cache=True,
                        **{kw: cache})
        else:
            out = model(inputs_embeds=emb(torch.tensor([[tokens[-1]]])), use_cache=True,
                        position_ids=torch.tensor([[seq.shape[0] - 1]]), **{kw: cache})
        tokens.append(int(out.logits[0, -1].argmax()))
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        seq = torch.cat([seq, emb(torch.tensor([tokens[-1]]))])
    return tokens, torch.stack(selected)


@torch.no_grad()
def cached_eager_chameleon_generate(model, ids, pixel_values, *, latent_id: int, image_id: int,
                                    num_selected_patches: int = 64, max_new_tokens: int = 8, eos_token_id=None):
    """The same algorithm (same arguments and results as :func:`published_chameleon_generate`) on a KV cache."""
    embeds, img, lat = _layout(model, ids, pixel_values, latent_id, image_id)
    K, N = num_selected_patches, lat.numel()
    prompt, sep = embeds[: int(lat[0])], embeds[int(lat[-1]) + 1:]          # the separator after the placeholders
    kw = _cache_kw(model)
    cache = DynamicCache(config=model.config)
    pos = [0]

    def run(e, attn):
        n = e.shape[0]
        out = model(inputs_embeds=e[None], position_ids=torch.arange(pos[0], pos[0] + n)[None], use_cache=True,
                    output_attentions=attn, output_hidden_states=True, **{kw: cache})
        pos[0] += n
        return out

    out = run(prompt, True)
    taken = torch.zeros(img.numel(), dtype=torch.bool)
    selected = []
    for t in range(N):
        mean = torch.cat([a[:, :, -1] for a in out.attentions], dim=1).mean(dim=1)[0]   # (S,) in the model's dtype
        scores = mean[img].float().masked_fill(taken, float("-inf"))
        idx = _cuda_topk_order(scores, K)
        taken[idx] = True
        selected.append(torch.tensor(idx))
        chunk = torch.cat([embeds[img][idx], out.hidden_states[-1][0, -1:]] + ([sep] if t == N - 1 else []))
        out = run(chunk, t < N - 1)
    emb = model.get_input_embeddings()
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens:
        out = run(emb(torch.tensor([tokens[-1]])), False)
        tokens.append(int(out.logits[0, -1].argmax()))
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
    return tokens, torch.stack(selected)
