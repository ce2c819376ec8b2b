"""The lean runner and the HF-module runner give identical tokens; other families run on the HF-module path."""
from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import published_latent_generate
from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import (
    END_MARKER,
    EOS,
    LAT_END,
    LAT_PAD,
    LAT_START,
    START_MARKER,
    make_batch,
    make_text_batch,
    tiny_text_lm,
)

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]


@pytest.mark.parametrize("N,K,markers,position_mode,padding", [
    (3, 4, True, "mrope", "left"), (1, 4, False, "arange", "right"), (3, 0, True, "mrope", "right"),
    (0, 0, False, "mrope", "left"),
])
@pytest.mark.parametrize("family", ["qwen2", "qwen25"])
def test_lean_and_hf_runner_identical(vlm_qwen2, vlm_qwen25, family, N, K, markers, position_mode, padding):
    model = vlm_qwen2 if family == "qwen2" else vlm_qwen25
    cfg = LatentConfig(num_latent_steps=N, num_selected_patches=K, position_mode=position_mode,
                       start_marker_id=START_MARKER if markers else None,
                       end_marker_id=END_MARKER if markers else None)
    batch, _ = make_batch(ROWS, padding_side=padding, seed=21)
    lean = LatentGenerator(model, cfg, runner="lean").generate(**batch, max_new_tokens=8)
    hf = LatentGenerator(model, cfg, runner="hf").generate(**batch, max_new_tokens=8)
    assert torch.equal(lean.sequences, hf.sequences)
    assert torch.equal(lean.selected, hf.selected)


def test_lean_and_hf_runner_identical_mirage():
    from test_engine_mirage import _mirage_model

    model = _mirage_model(5.0, 2.5)
    cfg = LatentConfig.mirage(latent_start_id=LAT_START, latent_end_id=LAT_END, latent_pad_id=LAT_PAD,
                              max_latent_steps=4)
    batch, _ = make_batch(ROWS, seed=1)
    a = LatentGenerator(model, cfg, runner="lean").generate(**batch, max_new_tokens=16).sequences
    b = LatentGenerator(model, cfg, runner="hf").generate(**batch, max_new_tokens=16).sequences
    assert torch.equal(a, b)
    assert (a == LAT_PAD).any()


def test_text_model_runners_identical():
    model = tiny_text_lm("llama", seed=4)
    cfg = LatentConfig.coconut(start_marker_id=START_MARKER, end_marker_id=END_MARKER)
    batch, _ = make_text_batch([5, 11, 8], padding_side="left", seed=2)
    a = LatentGenerator(model, cfg, runner="lean").generate(**batch, max_new_tokens=8).sequences
    b = LatentGenerator(model, cfg, runner="hf").generate(**batch, max_new_tokens=8).sequences
    assert torch.equal(a, b)


def test_other_family_runs_on_hf_module_runner():
    """Qwen3 (q/k norms: no lean runner) goes through its own layers and matches the published loop."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   initializer_range=0.08, eos_token_id=EOS, pad_token_id=0, bos_token_id=1)
    model = transformers.Qwen3ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    gen = LatentGenerator(model, LatentConfig.coconut(start_marker_id=START_MARKER, end_marker_id=END_MARKER))
    assert type(gen.runner).__name__ == "HFModuleRunner"
    with pytest.raises(ValueError, match="no lean runner"):
        LatentGenerator(model, LatentConfig(num_selected_patches=0), runner="lean")
    batch, rows = make_text_batch([6, 10], padding_side="right", seed=3)
    out = gen.generate(**batch, max_new_tokens=6, eos_token_id=EOS)
    for b, ids in enumerate(rows):
        ref, _ = published_latent_generate(model, ids, num_latent_steps=3, num_selected_patches=0,
                                           start_marker_id=START_MARKER, end_marker_id=END_MARKER,
                                           max_new_tokens=6, eos_token_id=EOS)
        assert out.sequences[b].tolist()[: len(ref)] == ref
