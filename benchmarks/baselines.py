"""Baselines the engine is measured (and tested) against, written independently of the engine.

``published_latent_generate`` is the published IVT-LR / Coconut inference algorithm as the official code
runs it: one question at a time, and for every latent step the *whole* sequence is re-run through the
HF model with eager attention and ``output_attentions=True``; the patch scores are the last query's
attention row averaged over all layers and heads. Decoding re-runs the whole sequence per token too.
``published_mirage_generate`` is Mirage's token-triggered loop, one row at a time, same re-run style.

The engine benchmarks (benchmarks/test_engine.py) also use two stronger plain-transformers contenders:
``cached_eager_latent_generate`` (the same algorithm done carefully: KV cache, attentions only where a
selection needs them; tests/test_baselines.py checks it against ``published_latent_generate``) and
``explicit_cot_generate`` (a fixed-length ``model.generate``: what explicit text reasoning costs).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def _decoder(model):
    """(text decoder returning final-norm hidden states, lm_head, is_multimodal)."""
    if hasattr(model.model, "language_model"):
        return model.model.language_model, model.lm_head, True
    return model.model, model.lm_head, False


def _prompt_embeds(model, ids, pixel_values, image_grid_thw, mm_token_type_ids, position_mode):
    """ids (S,) unpadded -> embeds (S,h), positions (3,S), image token positions (I,), next position."""
    text, _, mm = _decoder(model)
    embeds = text.get_input_embeddings()(ids[None])[0]
    img_pos = torch.empty(0, dtype=torch.long)
    if mm and pixel_values is not None:
        feats = torch.cat(list(model.model.get_image_features(pixel_values, image_grid_thw,
                                                              return_dict=True).pooler_output))
        img_pos = torch.nonzero(ids == model.config.image_token_id).flatten()
        embeds = embeds.clone()
        embeds[img_pos] = feats.to(embeds.dtype)
    S = ids.shape[0]
    if position_mode == "mrope" and mm and pixel_values is not None:
        if mm_token_type_ids is None:
            mm_token_type_ids = (ids == model.config.image_token_id).int()
        pos, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=mm_token_type_ids[None],
                                            image_grid_thw=image_grid_thw)
        pos = pos[:, 0]
        nxt = int(pos.max()) + 1
    else:
        pos = torch.arange(S)[None].expand(3, -1)
        nxt = S
    return embeds, pos, img_pos, nxt


def _run(model, embeds, pos, want_attn):
    text, head, mm = _decoder(model)
    position_ids = pos[:, None] if mm else pos[0][None]
    out = text(inputs_embeds=embeds[None], position_ids=position_ids, output_attentions=want_attn, use_cache=False)
    return out


@torch.no_grad()
def published_latent_generate(model, ids, *, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None,
                              num_latent_steps=3, num_selected_patches=4, start_marker_id=None, end_marker_id=None,
                              position_mode="mrope", max_new_tokens=8, eos_token_id=None):
    """One unpadded row ``ids`` (S,). Returns (new token list, selected (N,K) tensor). The model must use eager
    attention (``attn_implementation="eager"``) so ``output_attentions`` returns the probabilities."""
    embeds, pos, img_pos, nxt = _prompt_embeds(model, ids, pixel_values, image_grid_thw, mm_token_type_ids,
                                               position_mode)
    _, head, _ = _decoder(model)
    seq, positions = [embeds], [pos]

    def append(vecs):
        nonlocal nxt
        n = vecs.shape[0]
        seq.append(vecs)
        positions.append(torch.arange(nxt, nxt + n)[None].expand(3, -1))
        nxt += n

    emb = _decoder(model)[0].get_input_embeddings()
    N, K = num_latent_steps, num_selected_patches
    if N > 0 and start_marker_id is not None:
        append(emb(torch.tensor([start_marker_id])))
    chosen = torch.zeros(img_pos.numel(), dtype=torch.bool)
    selected = []
    for _ in range(N):
        out = _run(model, torch.cat(seq), torch.cat(positions, 1), want_attn=K > 0)
        h = out.last_hidden_state[0, -1]
        z = embeds[:0]
        if K > 0:
            att = torch.stack([a[0, :, -1, :] for a in out.attentions])  # (L, H, S)
            row = att.float().mean(dim=(0, 1))[img_pos]
            row = row.masked_fill(chosen, float("-inf"))
            # highest score first; among equal scores the lower image-token index first
            ranked = sorted(range(row.numel()), key=lambda i: (-row[i].item(), i))[:K]
            idx = torch.tensor(sorted(ranked))
            chosen[idx] = True
            selected.append(idx)
            z = embeds[img_pos[idx]]
        append(torch.cat([z, h[None]]))
    if N > 0 and end_marker_id is not None:
        append(emb(torch.tensor([end_marker_id])))
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    tokens = []
    for _ in range(max_new_tokens):
        out = _run(model, torch.cat(seq), torch.cat(positions, 1), want_attn=False)
        tok = int(head(out.last_hidden_state[0, -1]).argmax())
        tokens.append(tok)
        if tok in eos:
            break
        append(emb(torch.tensor([tok])))
    sel = torch.stack(selected) if selected else torch.empty(N, K, dtype=torch.long)
    return tokens, sel


@torch.no_grad()
def published_mirage_generate(model, ids, *, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None,
                              latent_start_id, latent_end_id, latent_pad_id, max_latent_steps=8,
                              position_mode="mrope", max_new_tokens=16, eos_token_id=None):
    """Mirage's loop for one unpadded row: after ``latent_start_id`` feed back the last hidden state until the
    model emits ``latent_end_id`` or ``max_latent_steps`` latents were fed. Returns the new token list with
    latent steps shown as ``latent_pad_id``."""
    embeds, pos, _, nxt = _prompt_embeds(model, ids, pixel_values, image_grid_thw, mm_token_type_ids, position_mode)
    emb = _decoder(model)[0].get_input_embeddings()
    _, head, _ = _decoder(model)
    seq, positions = [embeds], [pos]
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    tokens, in_latent, fed = [], False, 0
    for _ in range(max_new_tokens):
        out = _run(model, torch.cat(seq), torch.cat(positions, 1), want_attn=False)
        h = out.last_hidden_state[0, -1]
        tok = int(head(h).argmax())
        if in_latent:
            if tok == latent_end_id or fed >= max_latent_steps:
                tokens.append(latent_end_id)
                in_latent = False
                nxt_in = emb(torch.tensor([latent_end_id]))
            else:
                tokens.append(latent_pad_id)
                fed += 1
                nxt_in = h[None]
        else:
            tokens.append(tok)
            if tok in eos:
                break
            if tok == latent_start_id:
                in_latent, fed = True, 0
            nxt_in = emb(torch.tensor([tok]))
        seq.append(nxt_in)
        positions.append(torch.tensor([[nxt]] * 3))
        nxt += 1
    return tokens


# ------------------------------------------------------------------------------------------------------------
# Baseline (b): a careful plain-transformers implementation of the same algorithm.
# ------------------------------------------------------------------------------------------------------------
def _run_cached(model, embeds, pos, cache, want_attn):
    """Run ``embeds`` (C,h) at positions ``pos`` (3,C) on top of ``cache`` (a DynamicCache, extended in place)."""
    text, _, mm = _decoder(model)
    position_ids = pos[:, None] if mm else pos[0][None]
    return text(inputs_embeds=embeds[None], position_ids=position_ids, past_key_values=cache, use_cache=True,
                output_attentions=want_attn)


@torch.no_grad()
def cached_eager_latent_generate(model, ids, *, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None,
                                 num_latent_steps=3, num_selected_patches=4, start_marker_id=None,
                                 end_marker_id=None, position_mode="mrope", max_new_tokens=8, eos_token_id=None):
    """Baseline (b): the published algorithm (same semantics, same signature and return value as
    ``published_latent_generate``) written carefully with plain transformers, one question at a time.

    One prefill of the prompt into a ``DynamicCache``; each latent step is one forward of its K+1 new
    positions on the cache. Attentions (eager, ``output_attentions=True``) are requested only where a
    selection needs them: the prefill and every latent chunk except the last (the last chunk's scores would
    choose nothing). The score of image token i is the last query's attention probability on key i averaged
    over all layers and heads. Decoding is cached greedy decoding without attentions."""
    embeds, pos, img_pos, nxt = _prompt_embeds(model, ids, pixel_values, image_grid_thw, mm_token_type_ids,
                                               position_mode)
    text, head, _ = _decoder(model)
    emb = text.get_input_embeddings()
    N, K = num_latent_steps, num_selected_patches
    cache = DynamicCache(config=text.config)

    def step(vecs, want_attn):
        """Append vecs (C,h) at the next text positions; returns the model output."""
        nonlocal nxt
        n = vecs.shape[0]
        p = torch.arange(nxt, nxt + n)[None].expand(3, -1)
        nxt += n
        return _run_cached(model, vecs, p, cache, want_attn)

    prompt = embeds
    if N > 0 and start_marker_id is not None:
        marker = emb(torch.tensor([start_marker_id]))
        prompt = torch.cat([embeds, marker])
        pos = torch.cat([pos, torch.full((3, 1), nxt, dtype=pos.dtype)], 1)
        nxt += 1
    out = _run_cached(model, prompt, pos, cache, want_attn=N > 0 and K > 0)
    chosen = torch.zeros(img_pos.numel(), dtype=torch.bool)
    selected = []
    for t in range(N):
        h = out.last_hidden_state[0, -1]
        z = embeds[:0]
        if K > 0:
            # (L, H, S_total) -> mean over layers and heads -> the image keys
            row = torch.stack([a[0, :, -1, :].float() for a in out.attentions]).mean(dim=(0, 1))[img_pos]
            row = row.masked_fill(chosen, float("-inf"))
            # stable sort: among equal scores the lower image-token index first
            idx = torch.sort(torch.argsort(-row, stable=True)[:K]).values
            chosen[idx] = True
            selected.append(idx)
            z = embeds[img_pos[idx]]
        chunk = torch.cat([z, h[None]])
        if t == N - 1 and end_marker_id is not None:
            chunk = torch.cat([chunk, emb(torch.tensor([end_marker_id]))])
        out = step(chunk, want_attn=K > 0 and t < N - 1)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    tokens = []
    for t in range(max_new_tokens):
        tok = int(head(out.last_hidden_state[0, -1]).argmax())
        tokens.append(tok)
        if tok in eos or t == max_new_tokens - 1:
            break
        out = step(emb(torch.tensor([tok])), want_attn=False)
    sel = torch.stack(selected) if selected else torch.empty(N, K, dtype=torch.long)
    return tokens, sel


# ------------------------------------------------------------------------------------------------------------
# Baseline (c): explicit chain of thought (CapImagine / Chain-of-Focus style): plain ``model.generate``.
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def explicit_cot_generate(model, batch, num_tokens):
    """Greedy ``model.generate`` of exactly ``num_tokens`` new tokens per row (``min_new_tokens`` =
    ``max_new_tokens`` so EOS cannot stop it early). ``batch`` is a processor-shaped dict (input_ids,
    attention_mask, and for a VLM pixel_values, image_grid_thw, mm_token_type_ids). Returns (B, num_tokens)."""
    kwargs = {k: v for k, v in batch.items() if v is not None}
    out = model.generate(**kwargs, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False,
                         num_beams=1)
    return out[:, batch["input_ids"].shape[1]:]


def published_latent_train_loss(model, ids, target_ids, *, pixel_values=None, image_grid_thw=None,
                                mm_token_type_ids=None, num_latent_steps=3, num_selected_patches=4,
                                start_marker_id=None, end_marker_id=None, position_mode="mrope",
                                detach_latents=False, supervise_markers=False):
    """The published IVT-LR training forward for one unpadded row: every latent pass re-runs the whole prefix
    with eager attention and ``output_attentions=True``; the final pass runs the whole sequence with the target
    text. Returns (summed cross-entropy over the target tokens (+ markers), number of labelled tokens)."""
    embeds, pos, img_pos, nxt = _prompt_embeds(model, ids, pixel_values, image_grid_thw, mm_token_type_ids,
                                               position_mode)
    text, head, _ = _decoder(model)
    emb = text.get_input_embeddings()
    seq, positions = [embeds], [pos]

    def append(vecs):
        nonlocal nxt
        seq.append(vecs)
        positions.append(torch.arange(nxt, nxt + vecs.shape[0])[None].expand(3, -1))
        nxt += vecs.shape[0]

    s, K = num_latent_steps, num_selected_patches if num_latent_steps > 0 else 0
    labels = [torch.full((ids.shape[0],), -100)]
    if s > 0 and start_marker_id is not None:
        append(emb(torch.tensor([start_marker_id])))
        labels.append(torch.tensor([start_marker_id if supervise_markers else -100]))
    chosen = torch.zeros(img_pos.numel(), dtype=torch.bool)
    for _ in range(s):
        out = _run(model, torch.cat(seq), torch.cat(positions, 1), want_attn=K > 0)
        h = out.last_hidden_state[0, -1]
        if detach_latents:
            h = h.detach()
        z = embeds[:0]
        if K > 0:
            att = torch.stack([a[0, :, -1, :] for a in out.attentions]).float().mean(dim=(0, 1))[img_pos]
            att = att.detach().masked_fill(chosen, float("-inf"))
            ranked = sorted(range(att.numel()), key=lambda i: (-att[i].item(), i))[:K]
            idx = torch.tensor(sorted(ranked))
            chosen[idx] = True
            z = embeds[img_pos[idx]]
        append(torch.cat([z, h[None]]))
        labels.append(torch.full((K + 1,), -100))
    if s > 0 and end_marker_id is not None:
        append(emb(torch.tensor([end_marker_id])))
        labels.append(torch.tensor([end_marker_id if supervise_markers else -100]))
    append(emb(target_ids))
    labels.append(target_ids)
    out = _run(model, torch.cat(seq), torch.cat(positions, 1), want_attn=False)
    logits = head(out.last_hidden_state[0])
    lab = torch.cat(labels)
    # position i predicts the token at i + 1; a labelled marker is predicted by the position before it
    shift_logits, shift_labels = logits[:-1], lab[1:]
    wide = shift_logits.to(torch.promote_types(shift_logits.dtype, torch.float32))
    ce = torch.nn.functional.cross_entropy(wide, shift_labels, ignore_index=-100, reduction="sum")
    return ce, int((shift_labels != -100).sum())
