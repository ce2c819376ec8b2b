"""Mirage stage 1 with ``detach_targets`` (TrainConfig.mirage_detach_targets): with a training vision tower the pooled
helper-image targets pass no gradient to the tower, and nothing else about the step changes."""
import dataclasses

import pytest
import torch

from lvr_engine.models import adapter_for
from lvr_engine.models.loading import load_checkpoint
from lvr_engine.models.tiny import TINY_TOKEN_IDS, write_tiny_model
from lvr_engine.training.mirage import collate_mirage, mirage_forward


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lvr_engine.demo import QUICK, _examples, method_examples
    from lvr_engine.engine.runner import DecoderRunner

    path = write_tiny_model(tmp_path_factory.mktemp("m") / "m", hidden_size=64, num_layers=1, vision_depth=1,
                            vision_embed_dim=32, image_size=84, seed=2, initializer_range=0.1)
    model, processor = load_checkpoint(path, dtype=torch.float64)
    model.train()
    # text-only prompts: the helper image is the only way into the vision tower
    rows = [dataclasses.replace(ex, image=None) for ex in method_examples("mirage", _examples(QUICK, 4, 0, "train"))]
    batch = collate_mirage(rows, processor, 3, start_id=TINY_TOKEN_IDS["<|latent_start|>"],
                           end_id=TINY_TOKEN_IDS["<|latent_end|>"], template="ivtlr", image_size=84,
                           helper_images=True)
    adapter = adapter_for(model)
    return model, adapter, DecoderRunner(adapter.decoder_weights()), batch


def _step(setup, detach: bool):
    model, adapter, runner, batch = setup
    model.zero_grad(set_to_none=True)
    out = mirage_forward(runner, adapter, batch, stage=1, detach_targets=detach)
    loss = out.loss(0.1)
    loss.backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return float(loss.detach()), grads


def test_detached_targets_stop_only_the_towers_gradient(setup):
    model = setup[0]
    loss_a, a = _step(setup, detach=False)
    loss_b, b = _step(setup, detach=True)
    assert loss_a == loss_b                                   # the forward is the same
    vision = [n for n in a if ".visual." in f".{n}"]
    assert vision and len(vision) < len(a)
    assert any(a[n] is not None and a[n].abs().sum() > 0 for n in vision)        # Mirage as published: it trains
    assert all(b[n] is None or b[n].abs().sum() == 0 for n in vision)            # detached: no gradient reaches it
    for n in a:
        if n not in vision and a[n] is not None:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=0)
    model.zero_grad(set_to_none=True)


def test_trainer_passes_the_flag(tmp_path, monkeypatch):
    import lvr_engine.training.trainer as trainer_mod
    from lvr_engine.demo import QUICK, _examples, method_examples
    from lvr_engine.training.trainer import TrainConfig, Trainer

    base = write_tiny_model(tmp_path / "base", hidden_size=32, num_layers=1, vision_depth=1, vision_embed_dim=32,
                            image_size=84, seed=0)
    seen = []
    real = trainer_mod.mirage_forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("detach_targets"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "mirage_forward", spy)
    rows = method_examples("mirage", _examples(QUICK, 4, 0, "train"))
    for flag in (True, False):
        cfg = TrainConfig(model=str(base), output_dir=str(tmp_path / f"out{flag}"), dataset=rows,
                          objective="mirage_stage1", num_latent_steps=3, train_vision=True, batch_size=4,
                          mirage_detach_targets=flag, image_size=84, progress=False, log_every=100)
        Trainer(cfg).train()
        assert seen and set(seen) == {flag}
        seen.clear()
