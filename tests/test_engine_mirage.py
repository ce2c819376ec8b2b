"""trigger="token" (Mirage): per-row switching into and out of latent mode inside one batch."""
from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import published_mirage_generate
from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import EOS, LAT_END, LAT_PAD, LAT_START, make_batch, tiny_vlm

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]


def _mirage_model(start_gain, end_gain):
    """A tiny VLM whose head emits <latent_start>/<latent_end> for some hidden states (random directions)."""
    model = tiny_vlm(seed=3)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, model.lm_head.weight.shape[1], generator=g)
    with torch.no_grad():
        model.lm_head.weight[LAT_START] = start_gain * u / u.norm()
        model.lm_head.weight[LAT_END] = end_gain * v / v.norm()
    return model


def _segments(tokens):
    """[(start step, latents fed, exit kind)] of each latent segment in a token list."""
    segs, i = [], 0
    while i < len(tokens):
        if tokens[i] == LAT_START:
            j = i + 1
            while j < len(tokens) and tokens[j] == LAT_PAD:
                j += 1
            segs.append((i, j - i - 1, "end" if j < len(tokens) and tokens[j] == LAT_END else "open"))
            i = j
        i += 1
    return segs


@pytest.mark.parametrize("gains,cap,padding", [((5.0, 2.5), 4, "left"), ((4.0, 3.0), 3, "right")])
def test_mirage_matches_per_row_loop(gains, cap, padding):
    model = _mirage_model(*gains)
    cfg = LatentConfig.mirage(latent_start_id=LAT_START, latent_end_id=LAT_END, latent_pad_id=LAT_PAD,
                              max_latent_steps=cap)
    batch, pieces = make_batch(ROWS, padding_side=padding, seed=1)
    out = LatentGenerator(model, cfg).generate(**batch, max_new_tokens=20, eos_token_id=EOS)
    refs = [published_mirage_generate(model, ids, pixel_values=pv, image_grid_thw=thw, latent_start_id=LAT_START,
                                      latent_end_id=LAT_END, latent_pad_id=LAT_PAD, max_latent_steps=cap,
                                      max_new_tokens=20, eos_token_id=EOS) for ids, pv, thw in pieces]
    # The scenario must really exercise per-row switching: rows enter at different steps, and segments
    # end both by the model emitting <latent_end> and by the cap.
    segs = [_segments(r) for r in refs]
    firsts = {s[0][0] for s in segs if s}
    assert len(firsts) >= 2, f"rows should enter latent mode at different steps: {segs}"
    kinds = {(n == cap) for row in segs for (_, n, k) in row if k == "end"}
    assert kinds == {True, False}, f"need both capped and emitted exits: {segs}"
    for b, ref in enumerate(refs):
        assert out.sequences[b].tolist()[: len(ref)] == ref, f"row {b}"
    assert out.selected.shape == (3, 0, 0)
