"""Chameleon requests are validated through its adapter before any compute (issue #16): its pixel_values are whole
images (num_images, 3, H, W), not patch rows, and there is no image_grid_thw. Each bad request is a clear error
naming the problem, raised before the VQ-VAE or the decoder runs; good requests with the official layout or plain
prompts, several images per row, are accepted."""
from __future__ import annotations

import functools

import pytest
import torch

N, K = 3, 4


@functools.lru_cache(maxsize=None)
def _setup():
    from lvr_engine.models.tiny_chameleon import (
        build_tiny_chameleon_processor,
        build_tiny_chameleon_tokenizer,
        tiny_chameleon_config,
        tiny_chameleon_model,
    )

    tok = build_tiny_chameleon_tokenizer()
    proc = build_tiny_chameleon_processor(tok)
    return tok, proc, tiny_chameleon_model(tiny_chameleon_config(tok), seed=0)


@pytest.fixture
def gen(monkeypatch):
    """A generator whose VQ-VAE and decoder must not run (every case here fails validation first)."""
    from lvr_engine import LatentConfig, LatentGenerator

    tok, _, model = _setup()
    g = LatentGenerator(model, LatentConfig.ivtlr_chameleon(num_selected_patches=K), processor=tok)

    def boom(*a, **k):
        raise AssertionError("computed before validation finished")

    monkeypatch.setattr(g.adapter, "image_tokens", boom)
    monkeypatch.setattr(g.runner, "prefill", boom)
    return g


def _batch(texts, n_images=None):
    from PIL import Image

    _, proc, _ = _setup()
    n = sum(t.count("<image>") for t in texts) if n_images is None else n_images
    images = [Image.new("RGB", (40, 36), (10 * i, 80, 160)) for i in range(n)] or None
    proc.tokenizer.padding_side = "left"
    enc = proc(images=images, text=texts, return_tensors="pt", padding=True)
    return {k: enc[k] for k in enc if k in ("input_ids", "attention_mask", "pixel_values")}


OFFICIAL = "<image>[Question]:{Which?}\nAnswer:" + "<|latent|>" * N


def _err(gen, batch, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gen.generate(**batch, max_new_tokens=2)


def test_pixel_values_are_images(gen):
    b = _batch([OFFICIAL])
    _err(gen, dict(b, image_grid_thw=torch.tensor([[1, 8, 8]])), ValueError, "image_grid_thw given to a Chameleon")
    _err(gen, dict(b, pixel_values=b["pixel_values"].flatten(1)), ValueError, r"pixel_values must be 4-D")
    _err(gen, dict(b, pixel_values=b["pixel_values"][:, :2]), ValueError, "2 channels per image")
    _err(gen, dict(b, pixel_values=b["pixel_values"][..., :30]), ValueError, r"32x30 pixels.*multiples of .* 4")
    _err(gen, dict(b, pixel_values=b["pixel_values"].long()), TypeError, "floating point")
    bad = b["pixel_values"].clone()
    bad[0, 1, 2, 3] = float("nan")
    _err(gen, dict(b, pixel_values=bad), ValueError, r"NaN or Inf in 1 image\(s\), first image 0")


def test_image_tokens_must_match_the_images(gen):
    b = _batch([OFFICIAL])
    big = torch.nn.functional.interpolate(b["pixel_values"], size=(64, 64))
    _err(gen, dict(b, pixel_values=big), ValueError,
         r"input_ids hold 64 image tokens, the 1 image\(s\) of 64x64 pixels fill 256")
    two = torch.cat([b["pixel_values"], b["pixel_values"]])
    _err(gen, dict(b, pixel_values=two), ValueError, "image tokens do not match pixel_values")
    _err(gen, {k: v for k, v in b.items() if k != "pixel_values"}, ValueError, "pixel_values is None")


def test_placeholders_before_the_separator_must_be_n(gen):
    b = _batch(["<image>[Question]:{Which?}\nAnswer:<|latent|><|latent|>"])
    _err(gen, b, ValueError, r"ends with 2 latent placeholder tokens .* before the end marker but num_latent_steps=3")


def test_too_few_image_tokens_for_the_steps():
    from lvr_engine import LatentConfig, LatentGenerator

    tok, _, model = _setup()
    g = LatentGenerator(model, LatentConfig.ivtlr_chameleon(num_selected_patches=22), processor=tok)
    with pytest.raises(ValueError, match=r"row 0 has 64 image tokens but 3 latent steps x 22 patches need 66"):
        g.generate(**_batch([OFFICIAL]), max_new_tokens=2)


def test_good_requests_run():
    """The official layout and plain prompts in one batch, and a row with two images (its 128 image tokens are
    all selectable); selections index the row's image tokens in prompt order."""
    from lvr_engine import LatentConfig, LatentGenerator

    tok, _, model = _setup()
    g = LatentGenerator(model, LatentConfig.ivtlr_chameleon(num_selected_patches=K), processor=tok)
    b = _batch([OFFICIAL, "<image>[Question]:{Which of the two?}\n<image>\nAnswer:"])
    out = g.generate(**b, max_new_tokens=3)
    assert out.sequences.shape == (2, 3) and out.selected.shape == (2, N, K)
    assert int(out.selected[0].max()) < 64 and int(out.selected[1].max()) < 128
    assert len(set(out.selected[1].flatten().tolist())) == N * K
