"""Bad input is a clear ValueError/TypeError raised before any compute."""
from __future__ import annotations

import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import IMAGE_TOKEN, make_batch, make_text_batch, tiny_text_lm

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3)]  # 16 and 12 image tokens


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the decoder or the vision tower runs."""
    from lvr_engine.engine.runner import DecoderRunner
    from lvr_engine.models.qwen2_vl import Qwen2VLAdapter

    def boom(*a, **k):
        raise AssertionError("compute ran before validation")

    monkeypatch.setattr(DecoderRunner, "prefill", boom)
    monkeypatch.setattr(Qwen2VLAdapter, "encode_images", boom)


def test_too_few_image_tokens_for_n_times_k(vlm_qwen2, no_compute):
    batch, _ = make_batch(ROWS)
    gen = LatentGenerator(vlm_qwen2, LatentConfig(num_latent_steps=3, num_selected_patches=5))
    with pytest.raises(ValueError, match=r"row 1 has 12 image tokens .* need 15"):
        gen.generate(**batch, max_new_tokens=4)


def test_image_tokens_without_pixel_values(vlm_qwen2, no_compute):
    batch, _ = make_batch(ROWS)
    batch.pop("pixel_values")
    with pytest.raises(ValueError, match="pixel_values is None"):
        LatentGenerator(vlm_qwen2, LatentConfig(num_selected_patches=2)).generate(**batch, max_new_tokens=4)


def test_image_tokens_not_matching_grid(vlm_qwen2, no_compute):
    batch, _ = make_batch(ROWS)
    gen = LatentGenerator(vlm_qwen2, LatentConfig(num_selected_patches=2))
    bad = dict(batch, image_grid_thw=torch.tensor([[1, 8, 8], [1, 8, 8]]))
    with pytest.raises(ValueError, match="image tokens do not match image_grid_thw"):
        gen.generate(**bad, max_new_tokens=4)
    # same total, wrong split between images
    ids = batch["input_ids"].clone()
    row0 = torch.nonzero(ids[0] == IMAGE_TOKEN).flatten()
    ids[0, row0[-1]] = 7
    last_text = torch.nonzero(batch["attention_mask"][1] & (ids[1] != IMAGE_TOKEN)).flatten()[-1]
    ids[1, last_text] = IMAGE_TOKEN
    with pytest.raises(ValueError, match="image tokens do not match image_grid_thw"):
        mm = (ids == IMAGE_TOKEN).int() * batch["attention_mask"]
        gen.generate(**dict(batch, input_ids=ids, mm_token_type_ids=mm), max_new_tokens=4)


def test_unsupported_model_class():
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64)
    with pytest.raises(TypeError, match="unsupported model class GPT2LMHeadModel"):
        LatentGenerator(transformers.GPT2LMHeadModel(cfg), LatentConfig(num_selected_patches=0))


def test_k_on_text_only_model():
    with pytest.raises(ValueError, match="text-only"):
        LatentGenerator(tiny_text_lm(), LatentConfig(num_latent_steps=2, num_selected_patches=4))


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_max_new_tokens_must_be_positive(vlm_qwen2, no_compute, bad):
    batch, _ = make_batch(ROWS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        LatentGenerator(vlm_qwen2, LatentConfig(num_selected_patches=2)).generate(**batch, max_new_tokens=bad)


def test_shape_errors(vlm_qwen2, no_compute):
    batch, _ = make_batch(ROWS)
    gen = LatentGenerator(vlm_qwen2, LatentConfig(num_selected_patches=2))
    with pytest.raises(ValueError, match="attention_mask shape"):
        gen.generate(**dict(batch, attention_mask=batch["attention_mask"][:, 1:]), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        gen.generate(**dict(batch, input_ids=batch["input_ids"][0]), max_new_tokens=2)
    holes = batch["attention_mask"].clone()
    holes[0, -3] = 0
    with pytest.raises(ValueError, match="contiguous"):
        gen.generate(**dict(batch, attention_mask=holes), max_new_tokens=2)


def test_pixel_values_on_text_model():
    batch, _ = make_text_batch([4, 6])
    gen = LatentGenerator(tiny_text_lm(), LatentConfig(num_selected_patches=0))
    with pytest.raises(ValueError, match="text-only"):
        gen.generate(**batch, pixel_values=torch.zeros(4, 1176), image_grid_thw=torch.tensor([[1, 2, 2]]),
                     max_new_tokens=2)


@pytest.mark.parametrize("field,value", [
    ("num_latent_steps", -1), ("num_selected_patches", 1.5), ("position_mode", "rope"), ("trigger", "auto"),
    ("start_marker_id", -2), ("max_latent_steps", -1), ("backend", "opencl"),
])
def test_config_rejects_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        LatentConfig(**{field: value})


def test_config_token_trigger_rules():
    with pytest.raises(ValueError, match="num_selected_patches"):
        LatentConfig(trigger="token", num_selected_patches=4)
    with pytest.raises(ValueError, match="token names"):
        LatentGenerator(tiny_text_lm(), LatentConfig.mirage())


def test_presets():
    iv = LatentConfig.ivtlr()
    assert (iv.num_latent_steps, iv.num_selected_patches, iv.position_mode) == (3, 32, "arange")
    assert (iv.start_marker_id, iv.end_marker_id, iv.placeholder_id) == (None, None, "<|latent|>")
    assert (iv.patch_order, iv.score_precision, iv.ignore_first_eos) == ("official", "model", True)
    with pytest.raises(ValueError, match="patch_order"):
        LatentConfig(patch_order="descending")
    with pytest.raises(ValueError, match="score_precision"):
        LatentConfig(score_precision="bf16")
    mi = LatentConfig.mirage()
    assert (mi.trigger, mi.num_selected_patches, mi.max_latent_steps) == ("token", 0, 8)
    co = LatentConfig.coconut()
    assert co.num_selected_patches == 0 and co.start_marker_id is not None and co.end_marker_id is not None
    assert LatentConfig.ivtlr(num_selected_patches=8).num_selected_patches == 8
