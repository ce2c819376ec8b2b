"""LatentGenerator.from_pretrained on a local checkpoint written by write_tiny_model (no downloads)."""
from __future__ import annotations

import pytest

from lvr_engine import LatentConfig, LatentGenerator
from lvr_engine.models.tiny import TINY_TOKEN_IDS, write_tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), initializer_range=0.08, seed=3)


def _inputs(processor, n=2):
    from PIL import Image

    texts, images = [], []
    for i in range(n):
        img = Image.new("RGB", (224, 224), (40 * i, 120, 200))
        msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What color is the shape?" + " red" * i}]}]
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        images.append(img)
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def test_from_pretrained_resolves_token_names_and_generates(ckpt):
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4, start_marker_id="<|start-latent|>",
                       end_marker_id="<|end-latent|>", placeholder_id="<|latent|>")
    gen = LatentGenerator.from_pretrained(ckpt, cfg)
    assert gen.config.start_marker_id == TINY_TOKEN_IDS["<|start-latent|>"]
    assert gen.config.end_marker_id == TINY_TOKEN_IDS["<|end-latent|>"]
    assert gen.config.placeholder_id == TINY_TOKEN_IDS["<|latent|>"]
    # the official preset resolves its placeholder name too (and has no markers)
    iv = LatentGenerator.from_pretrained(ckpt, LatentConfig.ivtlr(num_selected_patches=4)).config
    assert (iv.placeholder_id, iv.start_marker_id, iv.end_marker_id) == (TINY_TOKEN_IDS["<|latent|>"], None, None)
    batch = _inputs(gen.processor)
    out = gen.generate(**batch, max_new_tokens=5)
    assert out.selected.shape == (2, 3, 4) and out.sequences.shape[0] == 2
    text = gen.processor.batch_decode(out.sequences)
    assert len(text) == 2


def test_from_pretrained_mirage_tokens(ckpt):
    gen = LatentGenerator.from_pretrained(ckpt, LatentConfig.mirage())
    assert (gen.config.latent_start_id, gen.config.latent_end_id, gen.config.latent_pad_id) == (
        TINY_TOKEN_IDS["<|latent_start|>"], TINY_TOKEN_IDS["<|latent_end|>"], TINY_TOKEN_IDS["<|latent_pad|>"])


def test_missing_and_corrupt_checkpoints(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentGenerator.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LatentGenerator.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        LatentGenerator.from_pretrained(bad)
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentGenerator.from_pretrained(bad)


def test_unknown_token_name_is_clear(ckpt):
    with pytest.raises(ValueError, match="not a token of this tokenizer"):
        LatentGenerator.from_pretrained(ckpt, LatentConfig(start_marker_id="<|no-such-token|>"))
