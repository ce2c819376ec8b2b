"""Analysis tools: selection heat maps (exact pixel geometry) and causal mediation on a tiny random VLM."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lvr_engine import LatentConfig, LatentGenerator
from lvr_engine.analysis import (
    Intervention,
    answer_sensitivity,
    blank_image,
    draw_frequency_heatmap,
    draw_selection_heatmap,
    identity,
    latent_sensitivity,
    letter_answer,
    no_intervention,
    noise_hidden,
    pixel_noise,
    record_run,
    run_mediation,
    selection_frequency_map,
    selection_overlay,
    shuffle_patches,
    step_colors,
    swap_blocks,
    swap_images,
    zero_hidden,
)
from lvr_engine.data.synthetic import image_token_boxes
from tiny_models import make_batch

GREY = (128, 128, 128)


# --------------------------------------------------------------------------------------------------
# heat maps


def _expected_overlay(size, boxes_by_step, colors, lw, base=GREY):
    """Independent rendering: solid base, a lw-px ring just inside every selected 28x28 box."""
    W, H = size
    arr = np.empty((H, W, 3), np.uint8)
    arr[:] = base
    for t, boxes in boxes_by_step.items():
        for x0, y0, x1, y1 in boxes:
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
            ring = np.zeros((H, W), bool)
            ring[y0:y1, x0:x1] = True
            ring[y0 + lw:y1 - lw, x0 + lw:x1 - lw] = False
            arr[ring] = colors[t]
    return arr


def test_overlay_outlines_exactly_the_selected_token_boxes():
    thw = (1, 8, 12)                                  # 4 x 6 tokens, resized image 168 x 112
    img = Image.new("RGB", (300, 200), GREY)          # solid: resizing keeps it solid
    sel = torch.tensor([[0, 7, 23], [1, 12, 17], [5, 6, 18]])
    ov = selection_overlay(img, sel, thw, fill_alpha=0.0, line_width=2)
    assert ov.size == (12 * 14, 8 * 14)
    boxes = image_token_boxes(thw)                    # the synthetic task's own geometry helper
    colors = step_colors(3)
    exp = _expected_overlay(ov.size, {t: [boxes[i] for i in sel[t].tolist()] for t in range(3)}, colors, 2)
    np.testing.assert_array_equal(np.asarray(ov), exp)
    # spot checks: border pixel coloured, interior and an unselected box untouched
    x0, y0, x1, y1 = (int(v) for v in boxes[23])     # token 23 = row 3, col 5
    assert (x0, y0) == (5 * 28, 3 * 28)
    a = np.asarray(ov)
    assert tuple(a[y0, x0]) == colors[0] and tuple(a[y1 - 1, x1 - 1]) == colors[0]
    assert tuple(a[y0 + 14, x0 + 14]) == GREY
    bx = [int(v) for v in boxes[2]]
    assert (a[bx[1]:bx[3], bx[0]:bx[2]] == GREY).all()


def test_overlay_fill_blends_and_step_colours_distinct():
    for n in (1, 3, 10, 17):
        cols = step_colors(n)
        assert len(set(cols)) == n
    thw = (1, 16, 16)
    img = Image.new("RGB", (224, 224), GREY)
    sel = torch.tensor([[3, 9], [40, 41]])
    ov = np.asarray(selection_overlay(img, sel, thw, fill_alpha=0.5, line_width=3))
    c = step_colors(2)
    for t, i in ((0, 3), (1, 41)):
        r, col = divmod(i, 8)
        x0, y0 = col * 28, r * 28
        assert tuple(ov[y0 + 2, x0 + 10]) == c[t]                         # 3-px ring
        inner = ov[y0 + 14, x0 + 14].astype(int)
        want = np.array([round(g + (cc - g) * 128 / 255) for g, cc in zip(GREY, c[t], strict=True)])
        assert np.abs(inner - want).max() <= 1
    assert tuple(ov[5 * 28 + 14, 5 * 28 + 14]) == GREY                    # token 45 never chosen


def test_selection_heatmap_figure_panels_and_png(tmp_path):
    thw = torch.tensor([1, 16, 16])
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    sel = torch.tensor([[0, 5, 9, 63], [1, 2, 30, 31], [10, 11, 12, 50]])
    out = tmp_path / "sel.png"
    fig = draw_selection_heatmap(img, sel, thw, out_path=out, title="q0")
    panels = fig.info["panels"]
    assert list(panels) == ["all steps", "step 1", "step 2", "step 3"]
    for name, box in panels.items():
        steps = None if name == "all steps" else [int(name.split()[1]) - 1]
        want = selection_overlay(img, sel, thw, steps=steps)
        assert want.size == (224, 224)
        np.testing.assert_array_equal(np.asarray(fig.crop(box)), np.asarray(want))
    # the per-step panel shows only its own step's colour
    c = step_colors(3)
    p2 = np.asarray(fig.crop(panels["step 2"]))
    assert tuple(p2[0, 28]) == c[1] and tuple(p2[0, 0]) != c[0]
    saved = Image.open(out)
    assert saved.format == "PNG" and saved.size == fig.size


def test_frequency_map_counts_and_drawing(tmp_path):
    grid = (1, 8, 8)                                   # 4 x 4 tokens
    sels = [torch.tensor([[0, 5], [6, 15]]), torch.tensor([[5, 6], [0, 1]]), torch.tensor([[5, 14], [2, 3]])]
    m = selection_frequency_map(sels, grid)
    want = torch.zeros(16, dtype=torch.long)
    for s in sels:
        for i in s.flatten().tolist():
            want[i] += 1
    assert m.shape == (4, 4) and m.dtype == torch.long
    assert torch.equal(m.flatten(), want) and m[1, 1] == 3
    assert torch.equal(selection_frequency_map(torch.stack(sels), grid), m)   # (Q, N, K) tensor
    first = selection_frequency_map(sels, grid, steps=[0])
    assert int(first.sum()) == 6 and first[1, 1] == 3 and first[0, 0] == 1
    # second image of a row: indices shifted by the first image's 16 tokens; others skipped
    shifted = selection_frequency_map([s + 16 for s in sels] + [torch.tensor([[0, 1]])], grid, token_offset=16)
    assert torch.equal(shifted, m)
    fig = draw_frequency_heatmap(m, Image.new("RGB", (112, 112), GREY), out_path=tmp_path / "f.png", title="all")
    box = fig.info["panels"]["map"]
    a = np.asarray(fig.crop(box))
    assert a.shape == (112, 112, 3)
    assert (a[3 * 28:4 * 28, 0:28] == GREY).all()                       # token 12 count 0: untouched
    hot, cool = a[28 + 20, 28 + 20].astype(int), a[20, 20].astype(int)  # token 5 count 3 (max) vs token 0 count 2
    assert hot.sum() < cool.sum()
    assert Image.open(tmp_path / "f.png").size == fig.size


# --------------------------------------------------------------------------------------------------
# mediation

ROWS = [(3, (8, 8), 2), (6, (8, 8), 1), (2, (8, 8), 4)]


@pytest.fixture(scope="module")
def setup(vlm_qwen2):
    gen = LatentGenerator(vlm_qwen2, LatentConfig(num_latent_steps=2, num_selected_patches=4))
    batch, pieces = make_batch(ROWS, seed=21)
    plain = gen.generate(**batch, max_new_tokens=1, return_latents=True)
    return gen, batch, pieces, plain


def test_identity_perturbation_changes_nothing(setup):
    gen, batch, _, _ = setup
    before = {k: v.clone() for k, v in batch.items()}
    r = latent_sensitivity(gen, batch, identity())
    for k in before:
        assert torch.equal(batch[k], before[k])
    torch.testing.assert_close(r.h_cos, torch.ones(3, 2))
    torch.testing.assert_close(r.z_cos, torch.ones(3, 2))
    assert torch.equal(r.h_rel_l2, torch.zeros(3, 2)) and torch.equal(r.jaccard, torch.ones(3, 2))
    assert torch.equal(r.ref_rel_l2, torch.zeros(3)) and torch.equal(r.final_rel_l2, torch.zeros(3))
    assert not r.answer_changed.any() and not r.ref_answer_changed.any()
    a = answer_sensitivity(gen, batch, no_intervention())
    assert a.flip_rate == 0.0 and torch.equal(a.kl, torch.zeros(3)) and torch.equal(a.top_prob_drop, torch.zeros(3))


def test_pixel_noise_report_equals_direct_computation(setup):
    gen, batch, _, plain = setup
    p = pixel_noise(0.5, seed=3)
    r = latent_sensitivity(gen, batch, p)
    noisy = gen.generate(**p(batch), max_new_tokens=1, return_latents=True)
    a, b = plain.latents[:, :, -1], noisy.latents[:, :, -1]
    torch.testing.assert_close(r.h_cos, F.cosine_similarity(a, b, dim=-1))
    torch.testing.assert_close(r.h_rel_l2, (a - b).norm(dim=-1) / a.norm(dim=-1))
    torch.testing.assert_close(r.z_cos, F.cosine_similarity(plain.latents[:, :, :4].mean(2),
                                                            noisy.latents[:, :, :4].mean(2), dim=-1))
    jac = torch.tensor([[len(set(plain.selected[i, t].tolist()) & set(noisy.selected[i, t].tolist()))
                         / len(set(plain.selected[i, t].tolist()) | set(noisy.selected[i, t].tolist()))
                         for t in range(2)] for i in range(3)])
    torch.testing.assert_close(r.jaccard, jac)
    assert (r.jaccard < 1).any() and (r.h_rel_l2 > 0).all()
    assert torch.equal(r.answer_changed, plain.sequences[:, 0] != noisy.sequences[:, 0])
    # reference = the ordinary prompt's last hidden state = step 1's h_t here (no start marker)
    torch.testing.assert_close(r.ref_cos, r.h_cos[:, 0])
    gen0 = LatentGenerator(gen.model, LatentConfig(num_latent_steps=0))
    ref_changed = gen0.generate(**batch, max_new_tokens=1).sequences[:, 0] != \
        gen0.generate(**p(batch), max_new_tokens=1).sequences[:, 0]
    assert torch.equal(r.ref_answer_changed, ref_changed)


def test_zero_hidden_matches_manual_hooked_run(setup, vlm_qwen2):
    gen, batch, _, plain = setup

    def zero(t, block):
        block[:, -1] = 0

    manual = gen.generate(**batch, max_new_tokens=1, latent_hook=zero, return_latents=True)
    assert (manual.latents[:, :, -1] == 0).all()
    r = answer_sensitivity(gen, batch, zero_hidden())
    assert torch.equal(r.first_token_changed, manual.sequences[:, 0] != plain.sequences[:, 0])
    assert torch.equal(r.answer_changed, r.first_token_changed)
    assert r.answers == manual.sequences[:, 0].tolist() and r.clean_answers == plain.sequences[:, 0].tolist()
    # the observed first-token logits are the model's own head on the observed hidden state
    rec = record_run(gen, batch, latent_hook=zero)
    assert "logits" not in vars(gen.runner)                     # the observation wrapper is removed
    with torch.no_grad():
        torch.testing.assert_close(rec.first_logits, vlm_qwen2.lm_head(rec.final_hidden))
    assert torch.equal(rec.first_logits.argmax(-1), manual.sequences[:, 0])
    clean = record_run(gen, batch)
    kl = F.kl_div(F.log_softmax(rec.first_logits, -1), F.log_softmax(clean.first_logits, -1),
                  log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(r.kl, kl, atol=1e-6, rtol=1e-5)
    top = clean.first_logits.argmax(-1)
    rows = torch.arange(3)
    drop = F.softmax(clean.first_logits, -1)[rows, top] - F.softmax(rec.first_logits, -1)[rows, top]
    torch.testing.assert_close(r.top_prob_drop, drop)
    # a plain hook works too
    r2 = answer_sensitivity(gen, batch, zero, name="zero")
    assert r2.name == "zero" and torch.equal(r2.answer_changed, r.answer_changed)


def test_swap_blocks_flips_answers_as_directly_computed(setup):
    gen, batch, _, plain = setup
    donor = plain.latents.roll(-1, 0)                             # row b gets row b+1's blocks

    def swap(t, block):
        return donor[:, t].clone()

    manual = gen.generate(**batch, max_new_tokens=1, latent_hook=swap, return_latents=True)
    torch.testing.assert_close(manual.latents, donor)
    r = answer_sensitivity(gen, batch, swap_blocks())
    direct = manual.sequences[:, 0] != plain.sequences[:, 0]
    assert torch.equal(r.answer_changed, direct)
    assert r.flip_rate == pytest.approx(direct.float().mean().item())
    assert r.flip_rate > 0, "swapping latent blocks between rows changed no answer on a peaky random model"
    assert (r.kl > 0).all()


def test_noise_and_shuffle_interventions_do_what_they_say(setup, vlm_qwen2):
    gen, batch, pieces, plain = setup
    clean = record_run(gen, batch)
    ctx_hook = noise_hidden(seed=1).make_hook
    from lvr_engine.analysis.mediation import InterventionContext
    rec = record_run(gen, batch, latent_hook=ctx_hook(InterventionContext(gen, batch, clean)))
    # step 1's h_t is the prompt's, so the matched-norm noise has exactly its norm
    torch.testing.assert_close(rec.latents[:, 0, -1].norm(dim=-1), clean.latents[:, 0, -1].norm(dim=-1))
    assert (F.cosine_similarity(rec.latents[:, :, -1], clean.latents[:, :, -1], dim=-1).abs() < 0.5).all()
    rec = record_run(gen, batch, latent_hook=shuffle_patches(seed=2).make_hook(InterventionContext(gen, batch, clean)))
    for b, (_, pv, thw) in enumerate(pieces):
        feats = torch.cat(list(vlm_qwen2.model.get_image_features(pv, thw, return_dict=True).pooler_output))
        for t in range(2):
            z = rec.latents[b, t, :4]
            d = torch.cdist(z, feats)                             # every fed patch is one of the row's own
            assert (d.min(1).values < 1e-5).all()
    assert not torch.equal(rec.latents[:, :, :4], clean.latents[:, :, :4])


def test_run_mediation_report(setup):
    gen, batch, _, _ = setup
    rep = run_mediation(gen, batch, perturbations=[identity(), blank_image(), swap_images()],
                        interventions=[zero_hidden(), swap_blocks(part="hidden"),
                                       Intervention.from_hook("noop", lambda t, b: None)])
    d = rep.to_dict()
    json.dumps(d)
    assert d["num_latent_steps"] == 2 and d["num_selected_patches"] == 4 and d["batch_size"] == 3
    assert [x["name"] for x in d["input_to_latent"]] == ["identity", "blank_image", "swap_images"]
    assert [x["name"] for x in d["latent_to_answer"]] == ["zero_hidden", "swap_hidden", "noop"]
    assert d["input_to_latent"][0]["h_rel_l2"] == [0.0, 0.0] and d["latent_to_answer"][2]["flip_rate"] == 0.0
    assert len(d["input_to_latent"][1]["per_row"]["h_cos"]) == 3
    table = rep.format_table()
    for word in ("input -> latent", "latent -> answer", "blank_image", "swap_hidden", "jaccard", "flip rate"):
        assert word in table
    # standalone zero_hidden equals the report's row (shared clean run changes nothing)
    alone = answer_sensitivity(gen, batch, zero_hidden())
    assert alone.to_dict() == d["latent_to_answer"][0]


def test_defaults_skip_what_cannot_run_and_errors(setup):
    gen, batch, _, _ = setup
    one, _ = make_batch([(2, (8, 8), 2)], seed=5)
    rep = run_mediation(gen, one, perturbations=[identity()])
    assert set(rep.skipped) == {"swap_blocks"}
    assert [a.name for a in rep.answer] == ["zero_hidden", "noise_hidden", "shuffle_patches"]
    mixed, _ = make_batch([(2, (8, 8), 2), (2, (8, 10), 2)], seed=5)
    with pytest.raises(ValueError, match="no other image of the same size"):
        swap_images()(mixed)
    swapped = swap_images()(batch)
    n = 64
    assert torch.equal(swapped["pixel_values"][:n], batch["pixel_values"][n:2 * n])
    assert torch.equal(swapped["pixel_values"][2 * n:], batch["pixel_values"][:n])
    with pytest.raises(ValueError, match="num_latent_steps >= 1"):
        run_mediation(LatentGenerator(gen.model, LatentConfig(num_latent_steps=0)), batch)
    with pytest.raises(ValueError, match="at least 2 rows"):
        answer_sensitivity(gen, one, swap_blocks())


def test_letter_answer():
    class Tok:
        def batch_decode(self, seqs, skip_special_tokens=True):
            return ["The answer is (B).", "Answer: none", "C because A"][: len(seqs)]

    fn = letter_answer(Tok())
    assert fn(torch.zeros(3, 4, dtype=torch.long)) == ["B", None, "C"]
