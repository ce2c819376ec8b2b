"""Adversarial inputs to generate / LatentConfig: each is a clear error naming the argument, raised before the
vision tower or the prefill runs (both are patched to fail here), and concurrent generate calls stay exact."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import VOCAB, make_batch

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3)]
CFG = LatentConfig(num_latent_steps=2, num_selected_patches=4)


@pytest.fixture
def gen(vlm_qwen2):
    return LatentGenerator(vlm_qwen2, CFG)


@pytest.fixture
def nothing_computed(gen, monkeypatch):
    """The generator with its vision tower and prefill replaced by functions that fail the test if reached."""
    def reached(*a, **k):
        raise AssertionError("compute started before the bad input was rejected")

    monkeypatch.setattr(gen.adapter, "encode_images", reached)
    monkeypatch.setattr(gen.runner, "prefill", reached)
    return gen


def _batch(**changes):
    batch, _ = make_batch(ROWS, seed=1)
    batch.update(changes)
    return batch


BAD_BATCHES = {
    "nan_pixels": (lambda b: dict(pixel_values=b["pixel_values"].index_put_((torch.tensor([3]),), torch.tensor(
        float("nan")))), ValueError, r"pixel_values holds NaN or Inf .* first row 3"),
    "inf_pixels": (lambda b: dict(pixel_values=torch.where(torch.arange(b["pixel_values"].shape[0])[:, None] == 7,
                                                            float("inf"), b["pixel_values"])),
                   ValueError, "pixel_values holds NaN or Inf"),
    "mm_types_contradict_ids": (lambda b: dict(mm_token_type_ids=torch.roll(b["mm_token_type_ids"], 1, dims=1)),
                                ValueError, r"mm_token_type_ids row 0 .* input_ids"),
    "id_beyond_vocab_under_pad": (lambda b: dict(input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, VOCAB)),
                                  ValueError, rf"input_ids\[1, 0\] = {VOCAB} .*vocabulary size {VOCAB}"),
    "negative_id": (lambda b: dict(input_ids=b["input_ids"].index_put((torch.tensor([0]), torch.tensor([-1])),
                                                                     torch.tensor(-5))),
                    ValueError, r"input_ids\[0, \d+\] = -5"),
    "pixel_width": (lambda b: dict(pixel_values=b["pixel_values"][:, :-1]), ValueError,
                    r"pixel_values rows have 1175 values, this model's patches have 1176"),
    "float_grid": (lambda b: dict(image_grid_thw=b["image_grid_thw"].float()), TypeError, "image_grid_thw"),
    "negative_grid": (lambda b: dict(image_grid_thw=b["image_grid_thw"] * torch.tensor([[1, -1, 1]])),
                      ValueError, r"image_grid_thw\[0\] = \[1, -8, 8\]"),
    "grid_not_mergeable": (lambda b: dict(image_grid_thw=b["image_grid_thw"] + torch.tensor([[0, 1, 0]])),
                           ValueError, "multiples of the spatial merge size 2"),
    "grid_inconsistent": (lambda b: dict(image_grid_thw=b["image_grid_thw"].flip(0)), ValueError,
                          "image tokens do not match image_grid_thw"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batch_rejected_before_compute(nothing_computed, case):
    change, exc, pattern = BAD_BATCHES[case]
    batch = _batch()
    with pytest.raises(exc, match=pattern):
        nothing_computed.generate(**_batch(**change(batch)), max_new_tokens=2)


BAD_KWARGS = {
    "eos_beyond_vocab": (dict(eos_token_id=VOCAB + 3), ValueError, r"eos_token_id must be in \[0, 256\)"),
    "eos_negative": (dict(eos_token_id=-1), ValueError, "eos_token_id must be in"),
    "eos_string": (dict(eos_token_id="</s>"), TypeError, "eos_token_id must be token ids, got the string"),
    "pad_beyond_vocab": (dict(pad_token_id=10**6), ValueError, "pad_token_id must be in"),
    "temperature_inf": (dict(do_sample=True, temperature=float("inf")), ValueError, "temperature must be a finite"),
    "temperature_nan": (dict(temperature=float("nan")), ValueError, "temperature must be a finite"),
    "top_k_float": (dict(do_sample=True, top_k=2.5), TypeError, "top_k must be an int, got 2.5"),
    "seed_string": (dict(do_sample=True, seed="abc"), TypeError, "seed must be an int, got 'abc'"),
    "top_p_zero": (dict(do_sample=True, top_p=0.0), ValueError, "top_p must be in"),
    "max_new_tokens_beyond_positions": (dict(max_new_tokens=10**9), ValueError,
                                        r"needs \d+ positions .*max_position_embeddings=4096"),
    "max_new_tokens_no_eos": (dict(max_new_tokens=10**6, eos_token_id=[]), ValueError, "max_position_embeddings"),
    "max_new_tokens_float": (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be a positive int"),
}


@pytest.mark.parametrize("case", sorted(BAD_KWARGS))
def test_bad_argument_rejected_before_compute(nothing_computed, case):
    kwargs, exc, pattern = BAD_KWARGS[case]
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(exc, match=pattern):
        nothing_computed.generate(**_batch(), **kwargs)


def test_kv_cache_larger_than_memory_names_both_numbers(nothing_computed, monkeypatch):
    monkeypatch.setattr(nothing_computed.adapter.text_config, "max_position_embeddings", 10**12)
    with pytest.raises(ValueError, match=r"KV cache for 2 rows x \d+ positions needs [\d.]+ GiB, but only [\d.]+ GiB"):
        nothing_computed.generate(**_batch(), max_new_tokens=10**9)


@pytest.mark.parametrize("field,value,pattern", [
    ("position_mode", "bogus", "position_mode must be"),
    ("start_marker_id", 10**6, r"LatentConfig.start_marker_id must be in \[0, 256\)"),
    ("num_selected_patches", -1, "num_selected_patches must be a non-negative int"),
    ("patch_order", "sorted", "patch_order must be"),
    ("backend", "torch", "backend changed"),
])
def test_config_mutated_after_build_is_revalidated(nothing_computed, field, value, pattern):
    setattr(nothing_computed.config, field, value)
    with pytest.raises(ValueError, match=pattern):
        nothing_computed.generate(**_batch(), max_new_tokens=2)


def test_natural_inputs_accepted(gen):
    """numpy arrays and numpy integers, and a temperature a greedy call ignores, give the tensor call's result."""
    batch = _batch()
    ref = gen.generate(**batch, max_new_tokens=3)
    as_np = {k: v.numpy() for k, v in batch.items()}
    out = gen.generate(**as_np, max_new_tokens=np.int64(3), temperature=0.0, top_k=np.int32(0),
                       eos_token_id=np.int64(ref.sequences.max() + 1) % VOCAB)
    assert torch.equal(out.sequences[:, :1], ref.sequences[:, :1]) and torch.equal(out.selected, ref.selected)


@pytest.mark.parametrize("bad,pattern", [
    (lambda blk: blk[:, :-1], r"latent_hook returned a block of shape \(2, 4, 64\).* at latent step 0"),
    (lambda blk: blk[:1], r"latent_hook returned a block of shape \(1, 5, 64\)"),
    (lambda blk: blk.double(), "torch.float64"),
    (lambda blk: blk.tolist(), "latent_hook returned list at latent step 0"),
])
def test_latent_hook_results_are_checked(gen, bad, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        gen.generate(**_batch(), max_new_tokens=2, latent_hook=lambda t, blk: bad(blk))


@pytest.mark.parametrize("graphs", [False, "emulate"])
def test_concurrent_generate_calls_equal_sequential(vlm_qwen2, graphs):
    """Two threads x 4 calls each on one generator, different batches per call: every result equals the same
    call made alone (the graph path serialises on its shared workspace, the eager path shares nothing)."""
    g = LatentGenerator(vlm_qwen2, CFG, cuda_graphs=graphs)
    batches = [make_batch(ROWS if i % 2 else ROWS[::-1], seed=20 + i)[0] for i in range(8)]
    expected = [g.generate(**b, max_new_tokens=4) for b in batches]
    results, errors = [None] * len(batches), []

    def worker(ids):
        try:
            for i in ids:
                results[i] = g.generate(**batches[i], max_new_tokens=4)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(range(k, 8, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert torch.equal(got.sequences, want.sequences), i
        assert torch.equal(got.selected, want.selected), i

