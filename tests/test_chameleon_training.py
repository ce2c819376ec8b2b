"""Training on Chameleon in the official inference layout (issue #16): the curriculum batch of stage s is the official
prompt with s ``<|latent|>`` placeholders and the processor's separator after them, plus the target; the trainer's
latent forward consumes the placeholders and the separator as inference does and runs prompt | s latent steps |
separator | target. Its loss must equal an independent whole-sequence computation on transformers' own modules (the
published algorithm: every latent pass re-runs the prefix with eager attention and ``output_attentions=True``).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lvr_engine.data.example import ReasoningExample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    model = tiny_chameleon_model(tiny_chameleon_config(tok, initializer_range=0.08), seed=4,
                                 attn_implementation="eager")
    return tok, proc, model


def _examples(n=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray((rng.random((40 + 8 * i, 36, 3)) * 255).astype("uint8"))
        k = 2 + i
        out.append(ReasoningExample(id=f"q{i}", image=img, question=f"Which square is red {'really ' * i}?",
                                    choices=[f"choice {j}" for j in range(k)], answer="AB"[i % 2],
                                    answer_index=i % 2, steps=[f"Step one of {i}.", "Step two.", "Step three."]))
    return out


def _official_text(ex, n_latent):
    options = "\n".join(f"({chr(65 + i)}).{{{c}}}" for i, c in enumerate(ex.choices))
    return f"<image>[Question]:{{{ex.question}}}\n[Options]:\n{options}\nAnswer:" + "<|latent|>" * n_latent


def test_collate_is_the_official_prompt():
    """Each row of a stage-s batch is what the official script's processor call gives for the prompt with s
    placeholders (left padding aside), and its target is the official target."""
    from lvr_engine.training.collate import collate

    tok, proc, _ = _setup()
    exs = _examples()
    for s in (0, 1, 2):
        batch = collate(exs, proc, stage=s, latent_steps=s, template="ivtlr_chameleon")
        for b, ex in enumerate(exs):
            want = proc(images=ex.image, text=_official_text(ex, s), return_tensors="pt")["input_ids"][0]
            got = batch.input_ids[b][batch.attention_mask[b].bool()]
            assert torch.equal(got, want), (s, b)
            target = tok.decode(batch.target_ids[b][batch.target_mask[b]])
            assert target == "".join(st + "\n" for st in ex.steps[s:]) + f"Therefore, the answer is {b % 2}</s>"


def _reference_ce(model, ids, pv, target, s, K, latent_id, image_id, sep_id):
    """CE sum over ``target`` of the sequence prompt | s latent steps | separator | target, computed by re-running
    the whole prefix for every latent pass (eager attention, mean attention over layers and heads, ascending
    order, lowest index first among equal scores)."""
    ids = ids.clone()
    vq = model.model.get_image_tokens(pv)[0].long()
    img = (ids == image_id).nonzero().flatten()
    ids[img] = vq
    assert ids[-1] == sep_id and bool((ids[-1 - s:-1] == latent_id).all())
    embed = model.get_input_embeddings()
    seq = embed(ids[:len(ids) - s - 1])
    image_embeds = seq[img]
    taken = torch.zeros(len(img), dtype=torch.bool)
    for _ in range(s):
        out = model(inputs_embeds=seq[None], position_ids=torch.arange(len(seq))[None], output_attentions=True,
                    output_hidden_states=True, use_cache=False)
        score = torch.stack([a[0, :, -1] for a in out.attentions]).mean(dim=(0, 1))[img].masked_fill(taken, -1.0)
        idx = sorted(sorted(range(len(img)), key=lambda i: (-float(score[i]), i))[:K])
        taken[idx] = True
        seq = torch.cat([seq, image_embeds[idx], out.hidden_states[-1][0, -1:]])
    first = len(seq)  # the separator's position predicts target[0]
    seq = torch.cat([seq, embed(torch.tensor([sep_id])), embed(target[:-1])])
    logits = model(inputs_embeds=seq[None], position_ids=torch.arange(len(seq))[None], use_cache=False).logits[0]
    return torch.nn.functional.cross_entropy(logits[first:first + len(target)], target, reduction="sum")


@pytest.mark.parametrize("runner", ["lean", "hf"])
@pytest.mark.parametrize("s", [0, 2])
def test_latent_forward_matches_whole_sequence(runner, s):
    from lvr_engine.engine.hf_runner import HFModuleRunner
    from lvr_engine.engine.runner import DecoderRunner
    from lvr_engine.models import adapter_for
    from lvr_engine.training.collate import collate
    from lvr_engine.training.latent_forward import latent_forward

    tok, proc, model = _setup()
    K = 4
    ids = {n: tok.convert_tokens_to_ids(n) for n in ("<|latent|>", "<image>", "<reserved08706>")}
    exs = _examples()
    batch = collate(exs, proc, stage=s, latent_steps=s, template="ivtlr_chameleon")
    adapter = adapter_for(model)
    r = (DecoderRunner if runner == "lean" else HFModuleRunner)(adapter.decoder_weights())
    out = latent_forward(r, adapter, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, target_ids=batch.target_ids, target_mask=batch.target_mask,
                         num_latent_steps=s, num_selected_patches=K, end_marker_id=ids["<reserved08706>"],
                         position_mode="arange", placeholder_id=ids["<|latent|>"])
    want = 0.0
    with torch.no_grad():
        for b in range(len(exs)):
            row = batch.input_ids[b][batch.attention_mask[b].bool()]
            target = batch.target_ids[b][batch.target_mask[b]]
            pv = batch.pixel_values[b:b + 1]
            if s:
                want += float(_reference_ce(model, row, pv, target, s, K, ids["<|latent|>"], ids["<image>"],
                                            ids["<reserved08706>"]))
            else:  # no latent segment: the prompt keeps its separator and the target follows it
                embed = model.get_input_embeddings()
                seq = torch.cat([embed(_with_vq(model, row, pv, ids["<image>"])), embed(target[:-1])])
                logits = model(inputs_embeds=seq[None], position_ids=torch.arange(len(seq))[None]).logits[0]
                first = len(row) - 1
                want += float(torch.nn.functional.cross_entropy(logits[first:first + len(target)], target,
                                                                reduction="sum"))
    assert float(out.ce_sum) == pytest.approx(want, rel=1e-4)
    assert out.num_tokens == int(batch.target_mask.sum())
    assert tuple(out.selected.shape) == (len(exs), s, K if s else 0)


def _with_vq(model, ids, pv, image_id):
    ids = ids.clone()
    ids[ids == image_id] = model.model.get_image_tokens(pv)[0].long()
    return ids


def test_vq_frozen_by_the_trainer_module():
    """The trainer's module freezes the VQ-VAE (no gradient reaches its discrete codes) and nothing else."""
    import copy

    from lvr_engine.training.trainer import LatentLossModule

    _, _, model = _setup()
    m = copy.deepcopy(model)
    module = LatentLossModule(m)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith("model.vqmodel.")}
    assert type(module.runner).__name__ == "DecoderRunner"
