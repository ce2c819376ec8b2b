"""The Chameleon benchmark baselines (benchmarks/chameleon_baselines.py) against the official inference re-implemented
for the tests (official_ivtlr_chameleon.py) and the engine: the same answer tokens and selections on tiny random
Chameleons, so the benchmark's (a) and (b) compute what the engine computes."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.chameleon_baselines import cached_eager_chameleon_generate, published_chameleon_generate
from official_ivtlr_chameleon import official_chameleon_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("seed", [0, 1])
def test_baselines_agree_with_official_and_engine(seed):
    from PIL import Image

    from lvr_engine import LatentConfig, LatentGenerator
    from lvr_engine.models.tiny_chameleon import (
        build_tiny_chameleon_processor,
        build_tiny_chameleon_tokenizer,
        tiny_chameleon_config,
        tiny_chameleon_model,
    )

    tok = build_tiny_chameleon_tokenizer()
    proc = build_tiny_chameleon_processor(tok, image_size=64)
    model = tiny_chameleon_model(tiny_chameleon_config(tok, image_size=64, initializer_range=0.08), seed=seed,
                                 attn_implementation="eager")
    img = Image.fromarray((np.random.default_rng(seed).random((70, 90, 3)) * 255).astype("uint8"))
    enc = proc(images=img, text="<image>[Question]:{Which?}\n[Options]:\n(A).{a}\n(B).{b}\nAnswer:" + "<|latent|>" * 3,
               return_tensors="pt")
    ids = {"latent_id": tok.convert_tokens_to_ids("<|latent|>"), "image_id": tok.convert_tokens_to_ids("<image>")}
    K, T = 16, 8
    want = official_chameleon_generate(model, enc["input_ids"][0], enc["pixel_values"],
                                       latent_token_id=ids["latent_id"], image_token_id=ids["image_id"],
                                       num_selected_patches=K, max_new_tokens=T)
    for fn in (published_chameleon_generate, cached_eager_chameleon_generate):
        toks, sel = fn(model, enc["input_ids"][0], enc["pixel_values"], num_selected_patches=K, max_new_tokens=T,
                       **ids)
        assert toks == want.tokens and sel.tolist() == want.selected, fn.__name__
    out = LatentGenerator(model, LatentConfig.ivtlr_chameleon(num_selected_patches=K), processor=tok).generate(
        **enc, max_new_tokens=T, eos_token_id=[])
    assert out.sequences[0].tolist() == want.tokens and out.selected[0].tolist() == want.selected
