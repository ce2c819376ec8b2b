"""Baselines the engine is measured (and tested) against, written independently of the engine.

``published_latent_generate`` is the published IVT-LR / Coconut inference algorithm as the official code
runs it: one question at a time, and for every latent step the *whole* sequence is re-run through the
HF model with eager attention and ``output_attentions=True``; the patch scores are the last query's
attention row averaged over all layers and heads. Decoding re-runs the whole sequence per token too.
``published_mirage_generate`` is Mirage's token-triggered loop, one row at a time, same re-run style.
"""
from __future__ import annotations

import torch


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
