"""The benchmark baselines are themselves verified: (b) ``cached_eager_latent_generate`` gives exactly the
tokens and selections of (a) ``published_latent_generate``; (c) ``explicit_cot_generate`` gives exactly the
requested number of tokens."""
from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import cached_eager_latent_generate, explicit_cot_generate, published_latent_generate
from tiny_models import END_MARKER, EOS, START_MARKER, make_batch, make_text_batch, tiny_text_lm

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3)]  # 16 and 12 image tokens


def _both(model, ids, **kw):
    a = published_latent_generate(model, ids, **kw)
    b = cached_eager_latent_generate(model, ids, **kw)
    return a, b


@pytest.mark.parametrize("N,K,markers,position_mode", [(1, 4, False, "mrope"), (3, 4, True, "mrope"),
                                                       (3, 3, False, "arange"), (2, 0, True, "mrope"),
                                                       (0, 4, False, "mrope")])
def test_cached_eager_matches_published(vlm_qwen2, N, K, markers, position_mode):
    _, pieces = make_batch(ROWS, seed=N * 10 + K)
    for ids, pv, thw in pieces:
        kw = dict(pixel_values=pv, image_grid_thw=thw, num_latent_steps=N, num_selected_patches=K,
                  start_marker_id=START_MARKER if markers else None, end_marker_id=END_MARKER if markers else None,
                  position_mode=position_mode, max_new_tokens=6, eos_token_id=EOS)
        (ta, sa), (tb, sb) = _both(vlm_qwen2, ids, **kw)
        assert tb == ta, f"cached {tb} vs published {ta}"
        assert torch.equal(sb, sa), f"cached selected {sb.tolist()} vs published {sa.tolist()}"
        assert sb.shape == (N, K)


def test_cached_eager_matches_published_qwen25(vlm_qwen25):
    _, pieces = make_batch(ROWS, seed=7)
    for ids, pv, thw in pieces:
        kw = dict(pixel_values=pv, image_grid_thw=thw, num_latent_steps=3, num_selected_patches=4,
                  max_new_tokens=6, eos_token_id=EOS)
        (ta, sa), (tb, sb) = _both(vlm_qwen25, ids, **kw)
        assert tb == ta and torch.equal(sb, sa)


def test_cached_eager_fixed_length_without_eos(vlm_qwen2):
    """With no EOS both baselines produce exactly max_new_tokens tokens (the benchmarks rely on it)."""
    _, pieces = make_batch(ROWS[:1], seed=1)
    ids, pv, thw = pieces[0]
    kw = dict(pixel_values=pv, image_grid_thw=thw, num_latent_steps=2, num_selected_patches=4, max_new_tokens=9,
              eos_token_id=None)
    (ta, _), (tb, _) = _both(vlm_qwen2, ids, **kw)
    assert len(ta) == len(tb) == 9 and ta == tb


def test_cached_eager_coconut_text_model():
    model = tiny_text_lm("qwen2", seed=2)
    _, rows = make_text_batch([7, 12], seed=3)
    for ids in rows:
        kw = dict(num_latent_steps=3, num_selected_patches=0, start_marker_id=START_MARKER,
                  end_marker_id=END_MARKER, max_new_tokens=6, eos_token_id=EOS)
        (ta, _), (tb, _) = _both(model, ids, **kw)
        assert tb == ta


@pytest.mark.parametrize("n", [1, 12])
def test_explicit_cot_exact_length(vlm_qwen2, n):
    batch, _ = make_batch(ROWS, seed=4)
    out = explicit_cot_generate(vlm_qwen2, batch, n)
    assert out.shape == (2, n)
    assert not (out == EOS).any()  # min_new_tokens = n suppresses EOS throughout
