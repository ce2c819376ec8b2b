"""The official IVT-LR prompt layout and stop rule on the engine: trailing <|latent|> placeholders consumed as the
latent steps, and no EOS check on the first generated token (docs/semantics.md)."""
from __future__ import annotations

import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import make_batch

PLACEHOLDER = 245  # an id the tiny models' prompts never contain otherwise
ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]


def _append_placeholders(batch, n_per_row, padding_side):
    """The same prompts with n_per_row[b] placeholder tokens appended to row b's valid tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mm = batch.get("mm_token_type_ids")
    B, S = ids.shape
    width = S + max(n_per_row)
    new_ids = torch.zeros(B, width, dtype=ids.dtype)
    new_mask = torch.zeros(B, width, dtype=mask.dtype)
    new_mm = torch.zeros(B, width, dtype=mm.dtype) if mm is not None else None
    for b in range(B):
        valid = torch.nonzero(mask[b]).flatten()
        row = torch.cat([ids[b, valid], torch.full((n_per_row[b],), PLACEHOLDER, dtype=ids.dtype)])
        start = 0 if padding_side == "right" else width - row.numel()
        new_ids[b, start:start + row.numel()] = row
        new_mask[b, start:start + row.numel()] = 1
        if mm is not None:
            new_mm[b, start:start + valid.numel()] = mm[b, valid]
    out = dict(batch, input_ids=new_ids, attention_mask=new_mask)
    if mm is not None:
        out["mm_token_type_ids"] = new_mm
    return out


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("position_mode", ["arange", "mrope"])
def test_trailing_placeholders_are_the_latent_steps(vlm_qwen2, padding, position_mode):
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4, position_mode=position_mode,
                       placeholder_id=PLACEHOLDER)
    batch, _ = make_batch(ROWS, padding_side=padding, seed=11)
    gen = LatentGenerator(vlm_qwen2, cfg)
    plain = gen.generate(**batch, max_new_tokens=6, return_latents=True)
    # every row with its 3 placeholders, and a mix (row 1 without): the same request
    for counts in ([3, 3, 3], [3, 0, 3]):
        with_ph = gen.generate(**_append_placeholders(batch, counts, padding), max_new_tokens=6, return_latents=True)
        assert torch.equal(with_ph.sequences, plain.sequences)
        assert torch.equal(with_ph.selected, plain.selected)
        torch.testing.assert_close(with_ph.latents, plain.latents, rtol=1e-5, atol=1e-5)


def test_wrong_number_of_placeholders_is_an_error(vlm_qwen2):
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4, placeholder_id=PLACEHOLDER)
    batch, _ = make_batch(ROWS, seed=11)
    gen = LatentGenerator(vlm_qwen2, cfg)
    with pytest.raises(ValueError, match=r"row 1 .* ends with 2 latent placeholder.*num_latent_steps=3"):
        gen.generate(**_append_placeholders(batch, [3, 2, 3], "left"), max_new_tokens=2)
    # without placeholder_id the token is an ordinary prompt token: a different request, not an error
    other = LatentGenerator(vlm_qwen2, cfg.replace(placeholder_id=None))
    a = other.generate(**_append_placeholders(batch, [3, 3, 3], "left"), max_new_tokens=4)
    b = gen.generate(**_append_placeholders(batch, [3, 3, 3], "left"), max_new_tokens=4)
    assert not torch.equal(a.sequences, b.sequences)


def test_first_token_eos_is_ignored_only_when_asked(vlm_qwen2):
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    batch, _ = make_batch(ROWS, seed=4)
    free = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6, eos_token_id=[])
    first = free.sequences[:, 0]
    # make every row's first token its EOS: the ordinary rule stops there, the official loop decodes on
    eos = sorted(set(first.tolist()))
    stopped = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6, eos_token_id=eos)
    assert stopped.sequences.shape[1] == 1 and torch.equal(stopped.sequences[:, 0], first)
    official = LatentGenerator(vlm_qwen2, cfg.replace(ignore_first_eos=True)).generate(
        **batch, max_new_tokens=6, eos_token_id=eos)
    # identical to the free run up to each row's first EOS after position 0, padded after it
    for b in range(first.numel()):
        row = free.sequences[b].tolist()
        later = [t for t in range(1, len(row)) if row[t] in eos]
        end = later[0] + 1 if later else len(row)
        got = official.sequences[b].tolist()
        assert got[:end] == row[:end] and all(x == 0 for x in got[end:]), (b, got, row)
