"""Tiny random-init models and processor-shaped inputs for the engine tests (no downloads).

Weights use std 0.08 so attention is peaky and top-k has clear winners.
"""
from __future__ import annotations

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253
START_MARKER, END_MARKER = 254, 255
LAT_START, LAT_END, LAT_PAD = 246, 247, 248
EOS = 249
VOCAB = 256


def _text_cfg(hidden=64, layers=2, heads=4, kv_heads=2, mrope=True):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if mrope:
        half = hidden // heads // 2
        a = half // 4
        rope["mrope_section"] = [a, (half - a) // 2, half - a - (half - a) // 2]
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rope_parameters=rope,
                max_position_embeddings=4096, initializer_range=0.08, eos_token_id=EOS, pad_token_id=0,
                bos_token_id=1)


def tiny_vlm(family="qwen2_vl", seed=0, dtype=torch.float32, hidden=64, layers=2, heads=4, kv_heads=2):
    """A random Qwen2-VL / Qwen2.5-VL ForConditionalGeneration with eager attention (for the reference)."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3, initializer_range=0.08)
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=_text_cfg(hidden, layers, heads, kv_heads), vision_config=vision,
                                         **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision = dict(vision, intermediate_size=64, out_hidden_size=hidden, hidden_size=32, window_size=56,
                      fullatt_block_indexes=[1])
        vision.pop("embed_dim")
        cfg = transformers.Qwen2_5_VLConfig(text_config=_text_cfg(hidden, layers, heads, kv_heads),
                                            vision_config=vision, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(family)
    cfg.initializer_range = 0.08
    cfg.text_config.initializer_range = 0.08
    model = cls._from_config(cfg, attn_implementation="eager", dtype=dtype)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny_text_lm(family="qwen2", seed=0, dtype=torch.float32):
    import transformers

    torch.manual_seed(seed)
    kw = _text_cfg(mrope=False)
    if family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    model = cls._from_config(cfg, attn_implementation="eager", dtype=dtype)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model.eval()


def image_row(gen, n_text_before, grid_hw, n_text_after):
    """One prompt with one image: returns (ids (S,), grid (1,3)). grid_hw in 14-px patches (even numbers)."""
    h, w = grid_hw
    n_img = h * w // 4
    txt = lambda n: torch.randint(1, 240, (n,), generator=gen)  # noqa: E731
    ids = torch.cat([txt(n_text_before), torch.tensor([VISION_START]), torch.full((n_img,), IMAGE_TOKEN),
                     torch.tensor([VISION_END]), txt(n_text_after)])
    return ids, torch.tensor([[1, h, w]])


def make_batch(rows, padding_side="left", seed=0, patch_dim=3 * 2 * 14 * 14):
    """rows: list of (n_text_before, (gh, gw), n_text_after). Returns a processor-shaped dict plus the
    unpadded per-row pieces (ids, pixel_values, grid) for solo runs."""
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for before, grid, after in rows:
        ids, thw = image_row(gen, before, grid, after)
        pv = torch.randn(int(thw.prod()), patch_dim, generator=gen)
        pieces.append((ids, pv, thw))
    S = max(p[0].numel() for p in pieces)
    B = len(pieces)
    input_ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, (ids, _, _) in enumerate(pieces):
        n = ids.numel()
        sl = slice(S - n, S) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = ids
        mask[b, sl] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask,
                 pixel_values=torch.cat([p[1] for p in pieces]),
                 image_grid_thw=torch.cat([p[2] for p in pieces]),
                 mm_token_type_ids=(input_ids == IMAGE_TOKEN).int() * mask.int())
    return batch, pieces


def make_text_batch(lengths, padding_side="left", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 240, (n,), generator=gen) for n in lengths]
    S, B = max(lengths), len(lengths)
    input_ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, ids in enumerate(rows):
        n = ids.numel()
        sl = slice(S - n, S) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = ids
        mask[b, sl] = 1
    return dict(input_ids=input_ids, attention_mask=mask), rows
