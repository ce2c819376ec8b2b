"""`mediation_readout` gives the expected extremes on hand-built models whose mediation is known by construction.

The models are a tiny random Qwen2-VL with every attention output projection and every MLP down projection zeroed,
so each position's final hidden state is the final norm of its own input (nothing flows between positions), and the
LM head tied to the input embeddings. Without an end marker the first answer token is then read off the last latent
step's input h_N alone; with one, off the marker's embedding alone. On top of that:

- A, "a perfect latent reasoner": the model's own latent step writes h_t := E[answer of the row's image] (a lookup
  of the image's pixels); the answer follows the latents, the latents follow the image;
- B, "the answer ignores the latents": A plus an end marker (the answer is the same token for every question);
- C, "the latents ignore the input": no lookup, every prompt ends with the same token (all latents are equal).

Every expected number is computed here from the embedding table and the answer table, not by the readout's code.
"""
import itertools

import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator
from lvr_engine.analysis.mediation import mediation_readout, pairwise_cosine
from tiny_models import END_MARKER, make_batch, tiny_vlm

N, K = 2, 4
ANSWERS = [10, 10, 20, 30, 30, 40, 20, 10]   # answer token of row b's image; rows b, b+1 agree for b = 0, 3, 7
ROWS = [(3 + b % 3, (8, 8), 2 + b % 2) for b in range(len(ANSWERS))]


def _image_keys(pixel_values, grid) -> list[float]:
    sizes = [int(x) for x in torch.as_tensor(grid).prod(-1)]
    return [round(float(chunk.double().sum()), 4) for chunk in torch.split(pixel_values, sizes)]


class LookupLatents(LatentGenerator):
    """Model A's latent step: h_t := E[the answer of this row's image], before any analysis hook sees the block."""

    table: dict

    def generate(self, *args, latent_hook=None, **kwargs):
        emb = self.model.get_input_embeddings().weight.detach()
        ids = torch.tensor([self.table[k] for k in _image_keys(kwargs["pixel_values"], kwargs["image_grid_thw"])])

        def hook(t, block):
            block[:, -1] = emb[ids].to(block.dtype)
            return None if latent_hook is None else latent_hook(t, block)

        return super().generate(*args, latent_hook=hook, **kwargs)


@pytest.fixture(scope="module")
def parts():
    model = tiny_vlm("qwen2_vl", seed=3)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    batch, _ = make_batch(ROWS, seed=5)
    batch["input_ids"][:, -1] = 7   # left padding: every prompt ends with the same token (model C)
    table = dict(zip(_image_keys(batch["pixel_values"], batch["image_grid_thw"]), ANSWERS, strict=True))
    assert len(table) == len(ANSWERS)
    return model, batch, table


def _lookup(model, table, **cfg):
    gen = LookupLatents(model, LatentConfig(num_latent_steps=N, num_selected_patches=K, **cfg))
    gen.table = table
    return gen


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


def _first_tokens(gen, batch):
    return gen.generate(**batch, max_new_tokens=1).sequences[:, 0].tolist()


def test_pairwise_cosine_against_a_loop():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    pairs = [(i, j) for i, j in itertools.permutations(range(5), 2)]
    want = sum(_cos(x[i], x[j]) for i, j in pairs) / len(pairs)
    assert pairwise_cosine(x) == pytest.approx(want, abs=1e-12)
    assert pairwise_cosine(x[[0, 0, 0]] * torch.tensor([[1.0], [2.0], [3.0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pairwise_cosine(x[:1])


def test_latents_that_carry_the_answer(parts):
    model, batch, table = parts
    gen = _lookup(model, table)
    assert _first_tokens(gen, batch) == ANSWERS            # the construction works: answer = the latents' token
    r = mediation_readout(gen, batch)
    E = model.get_input_embeddings().weight.detach()
    B = len(ANSWERS)
    donor = [ANSWERS[(b + 1) % B] for b in range(B)]
    ceiling = sum(a != d for a, d in zip(ANSWERS, donor, strict=True)) / B
    assert ceiling == 5 / 8
    assert r["flip_rate"]["zero"] == 1.0                    # h_N = 0 -> logits 0 -> token 0, never an answer
    assert r["flip_rate"]["swap"] == r["swap_ceiling"] == ceiling
    assert r["flip_rate"]["random_patches"] == 0.0          # z_t never reaches the answer in this model
    im = r["image_swap"]
    rel = [float((E[d] - E[a]).double().norm() / E[a].double().norm()) for a, d in zip(ANSWERS, donor, strict=True)]
    assert im["latent_rel_l2"] == pytest.approx(sum(rel) / B, rel=1e-5)
    cos = [_cos(E[a], E[d]) for a, d in zip(ANSWERS, donor, strict=True)]
    assert im["latent_cos"] == pytest.approx(sum(cos) / B, rel=1e-5)
    assert im["answer_change_rate"] == ceiling
    assert im["ref_rel_l2"] == 0.0 and im["ref_cos"] == pytest.approx(1.0) and im["ref_answer_change_rate"] == 0.0
    pairs = list(itertools.permutations(range(B), 2))
    want = sum(_cos(E[ANSWERS[i]], E[ANSWERS[j]]) for i, j in pairs) / len(pairs)
    assert r["latent_pairwise_cos"] == pytest.approx(want, rel=1e-5)
    assert r["latent_pairwise_cos_per_step"] == pytest.approx([want] * N, rel=1e-5)
    assert r["ref_pairwise_cos"] == pytest.approx(1.0)      # every prompt ends with the same token
    assert r["questions"] == B and r["num_latent_steps"] == N and r["num_selected_patches"] == K


def test_answer_that_ignores_the_latents(parts):
    model, batch, table = parts
    gen = _lookup(model, table, end_marker_id=END_MARKER)
    clean = _first_tokens(gen, batch)
    assert len(set(clean)) == 1                              # read off the end marker alone
    r = mediation_readout(gen, batch)
    assert r["flip_rate"] == {"zero": 0.0, "swap": 0.0, "random_patches": 0.0}
    assert r["swap_ceiling"] == 0.0 and r["image_swap"]["answer_change_rate"] == 0.0
    # the latents still react to the image exactly as model A's do
    a = mediation_readout(_lookup(model, table), batch)
    assert r["image_swap"]["latent_rel_l2"] == pytest.approx(a["image_swap"]["latent_rel_l2"], rel=1e-6)
    assert r["image_swap"]["latent_rel_l2"] > 0.5


def test_latents_that_ignore_the_input(parts):
    model, batch, _ = parts
    gen = LatentGenerator(model, LatentConfig(num_latent_steps=N, num_selected_patches=K))
    r = mediation_readout(gen, batch)
    assert r["image_swap"]["latent_rel_l2"] == 0.0 and r["image_swap"]["latent_cos"] == pytest.approx(1.0)
    assert r["latent_pairwise_cos"] == pytest.approx(1.0)    # collapsed: one latent for every question
    assert r["flip_rate"]["swap"] == 0.0 and r["swap_ceiling"] == 0.0
    assert r["flip_rate"]["zero"] == 1.0                    # yet the answer is read off h_N


def test_readout_needs_two_questions(parts):
    model, batch, table = parts
    one = {k: v[:1] for k, v in batch.items() if k != "pixel_values"}
    one["pixel_values"] = batch["pixel_values"][:int(batch["image_grid_thw"][0].prod())]
    one["image_grid_thw"] = batch["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="at least 2"):
        mediation_readout(_lookup(model, table), one)
