"""The training latent forward (cached passes on the engine's ops) vs an independent recompute of the published
algorithm (whole prefix re-run with eager attention per latent pass), in float64: loss and gradients."""
from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import published_latent_train_loss
from lvr_engine.engine.runner import DecoderRunner
from lvr_engine.models import adapter_for
from lvr_engine.training.latent_forward import latent_forward
from tiny_models import END_MARKER, EOS, START_MARKER, make_batch, tiny_vlm

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]


def _targets(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.cat([torch.randint(1, 240, (n - 1,), generator=g), torch.tensor([EOS])])
        mask[b, :n] = True
    return ids, mask


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def model64():
    return tiny_vlm("qwen2_vl", seed=5, dtype=torch.float64).train()


@pytest.mark.parametrize("s,K,detach,markers,position_mode,supervise", [
    (3, 4, False, True, "mrope", False),
    (3, 4, True, True, "arange", False),
    (1, 0, False, False, "mrope", False),
    (2, 4, False, True, "mrope", True),
    (0, 4, False, True, "mrope", False),
])
def test_loss_and_grads_match_recompute(model64, s, K, detach, markers, position_mode, supervise):
    torch.manual_seed(0)
    batch, pieces = make_batch(ROWS, padding_side="left", seed=s + K)
    for k in ("pixel_values",):
        batch[k] = batch[k].double()
    tgt, tmask = _targets([4, 7, 2], seed=s)
    start = START_MARKER if markers else None
    end = END_MARKER if markers else None

    model64.zero_grad()
    ce_ref, n_ref = 0.0, 0
    for b, (ids, pv, thw) in enumerate(pieces):
        ce, n = published_latent_train_loss(
            model64, ids, tgt[b, : int(tmask[b].sum())], pixel_values=pv.double(), image_grid_thw=thw,
            num_latent_steps=s, num_selected_patches=K, start_marker_id=start, end_marker_id=end,
            position_mode=position_mode, detach_latents=detach, supervise_markers=supervise)
        ce_ref = ce_ref + ce
        n_ref += n
    (ce_ref / n_ref).backward()
    ref_grads = _grads(model64)

    model64.zero_grad()
    adapter = adapter_for(model64)
    runner = DecoderRunner(adapter.decoder_weights())
    out = latent_forward(runner, adapter, **batch, target_ids=tgt, target_mask=tmask, num_latent_steps=s,
                         num_selected_patches=K, start_marker_id=start, end_marker_id=end,
                         position_mode=position_mode, detach_latents=detach, supervise_markers=supervise)
    assert out.num_tokens == n_ref
    # HF and we both normalise in fp32
    torch.testing.assert_close(out.loss, (ce_ref / n_ref).detach(), rtol=1e-7, atol=1e-9)
    out.loss.backward()
    got = _grads(model64)
    assert set(got) == set(ref_grads)
    for name, g in ref_grads.items():
        err, scale = (got[name] - g).abs().max().item(), g.abs().max().item()
        assert err <= 1e-5 * scale + 1e-9, f"gradient of {name}: max err {err:.3e}, max |g| {scale:.3e}"
    assert out.selected.shape == (3, s, K if s > 0 else 0)


def test_detach_changes_gradients(model64):
    """With detach_latents the gradient no longer flows through fed-back hidden states (it must differ)."""
    batch, _ = make_batch(ROWS, seed=9)
    batch["pixel_values"] = batch["pixel_values"].double()
    tgt, tmask = _targets([3, 3, 3], seed=1)
    adapter = adapter_for(model64)
    runner = DecoderRunner(adapter.decoder_weights())
    grads = []
    for detach in (False, True):
        model64.zero_grad()
        latent_forward(runner, adapter, **batch, target_ids=tgt, target_mask=tmask, num_latent_steps=2,
                       num_selected_patches=4, detach_latents=detach).loss.backward()
        grads.append(_grads(model64))
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(grads[0][name], grads[1][name])


def test_labels_mask_prompt_and_latents(model64):
    """Only target tokens carry loss. Against the published recompute (float64, loss on the row's target tokens
    only): the same CE sum and token count; changing a labelled target token moves the CE sum by exactly what it
    moves the recompute's (and by something); changing tokens at masked (padding) positions changes nothing."""
    batch, pieces = make_batch(ROWS, seed=2)
    batch["pixel_values"] = batch["pixel_values"].double()
    tgt, tmask = _targets([4, 1, 6], seed=3)
    adapter = adapter_for(model64)
    runner = DecoderRunner(adapter.decoder_weights())
    kw = dict(num_latent_steps=3, num_selected_patches=4, start_marker_id=START_MARKER, end_marker_id=END_MARKER)

    def ours(target_ids):
        with torch.no_grad():
            return latent_forward(runner, adapter, **batch, target_ids=target_ids, target_mask=tmask, **kw)

    def published(target_ids, b):
        ids, pv, thw = pieces[b]
        with torch.no_grad():
            ce, n = published_latent_train_loss(model64, ids, target_ids[b, : int(tmask[b].sum())],
                                                pixel_values=pv.double(), image_grid_thw=thw, **kw)
        return torch.as_tensor(ce, dtype=torch.float64), n

    out = ours(tgt)
    ref = [published(tgt, b) for b in range(3)]
    assert out.num_tokens == sum(n for _, n in ref) == 11
    torch.testing.assert_close(out.ce_sum.double(), sum(ce for ce, _ in ref), rtol=1e-7, atol=1e-9)  # as above

    for b, t in [(0, 1), (2, 5)]:  # a middle token and a row's final (EOS) label
        assert tmask[b, t]
        changed = tgt.clone()
        changed[b, t] = 17 if tgt[b, t] != 17 else 18
        delta = ours(changed).ce_sum.double() - out.ce_sum.double()
        want = published(changed, b)[0] - ref[b][0]
        assert abs(want) > 1e-3, "the recompute's loss did not react to the label: pick another token"
        torch.testing.assert_close(delta, want, rtol=1e-6, atol=1e-6)

    padded = tgt.clone()
    padded[0, 4:] = 17  # row 0 has 4 target tokens, row 1 one: the rest are masked
    padded[1, 1:] = 33
    assert not tmask[0, 4:].any() and not tmask[1, 1:].any()
    same = ours(padded)
    assert torch.equal(out.ce_sum, same.ce_sum) and same.num_tokens == out.num_tokens


def test_gradient_checkpointing_gives_same_gradients(model64):
    batch, _ = make_batch(ROWS, seed=4)
    batch["pixel_values"] = batch["pixel_values"].double()
    tgt, tmask = _targets([3, 5, 2], seed=2)
    adapter = adapter_for(model64)
    grads, selected = [], []
    for ckpt in (False, True):
        runner = DecoderRunner(adapter.decoder_weights())
        runner.gradient_checkpointing = ckpt
        model64.zero_grad()
        out = latent_forward(runner, adapter, **batch, target_ids=tgt, target_mask=tmask, num_latent_steps=3,
                             num_selected_patches=4, start_marker_id=START_MARKER, end_marker_id=END_MARKER)
        out.loss.backward()
        grads.append(_grads(model64))
        selected.append(out.selected)
    assert torch.equal(selected[0], selected[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_lora_training_forward_reaches_adapters():
    peft = pytest.importorskip("peft")
    model = tiny_vlm("qwen2_vl", seed=6).train()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    adapter = adapter_for(lora)
    runner = DecoderRunner(adapter.decoder_weights())
    batch, _ = make_batch(ROWS, seed=4)
    tgt, tmask = _targets([3, 5, 2], seed=2)
    out = latent_forward(runner, adapter, **batch, target_ids=tgt, target_mask=tmask, num_latent_steps=2,
                         num_selected_patches=4)
    out.loss.backward()
    lora_grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)
