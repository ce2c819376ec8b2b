"""The curriculum trainer: DDP equality with one process, exact resume, atomic checkpoints, stage batches,
LoRA and gradient checkpointing. Tiny Qwen2-VL (hidden 64, 2 layers, 16 image tokens), a few examples."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvr_engine import LatentGenerator
from lvr_engine.data.prompts import format_target
from lvr_engine.data.synthetic import make_synthetic_dataset, task_corpus
from lvr_engine.models.tiny import TINY_TOKEN_IDS, write_tiny_model
from lvr_engine.training import trainer as trainer_mod
from lvr_engine.training.collate import collate
from lvr_engine.training.trainer import LoraSettings, TrainConfig, Trainer, stage_plan

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden_size=64, num_layers=2, vision_depth=1,
                            vision_embed_dim=32, image_size=112, corpus=task_corpus(20), seed=1)


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_dataset(4, seed=3, canvas=112)


def _cfg(tiny, out, examples, **kw):
    base = dict(model=str(tiny), output_dir=str(out), dataset=examples, max_stage=2, num_latent_steps=2,
                num_selected_patches=4, batch_size=4, lr=1e-3, progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "train_log.jsonl").read_text().splitlines()]


# -- (a) two processes == one process on the same global batch ----------------------------------------
def test_two_processes_match_one(tiny, tmp_path, monkeypatch, capfd):
    """`lvr train --num-processes 2` re-launches itself with `accelerate launch` (2 gloo processes, 2 examples
    each per step); the same 4-example global batches on one process give the same losses and weights."""
    from lvr_engine.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    two = tmp_path / "two"
    rc = main(["train", "--model", str(tiny), "--dataset", "synthetic", "--limit", "8", "--max-stage", "1",
               "--num-latent-steps", "1", "--num-selected-patches", "4", "--lr", "1e-3", "--seed", "5",
               "--no-progress", "--output", str(two), "--batch-size", "2", "--num-processes", "2"])
    out, err = capfd.readouterr()
    assert rc == 0, out[-3000:] + err[-3000:]
    state = json.loads((two / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch_size"] == 4

    one = tmp_path / "one"
    cfg = TrainConfig(model=str(tiny), output_dir=str(one), dataset="synthetic", limit=8, max_stage=1,
                      num_latent_steps=1, num_selected_patches=4, lr=1e-3, seed=5, batch_size=4, progress=False)
    res = Trainer(cfg).train()
    assert res.completed and res.global_step == 4

    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:  # Adam normalises updates: float-level gradient differences stay at ~lr * 1e-2
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)


# -- (b) stop after stage 1 + resume == uninterrupted ---------------------------------------------------
@pytest.mark.parametrize("keep_optimizer", [False, True])
def test_resume_is_exact(tiny, examples, tmp_path, keep_optimizer):
    kw = dict(reset_optimizer_per_stage=not keep_optimizer, warmup_steps=2)
    full = Trainer(_cfg(tiny, tmp_path / "full", examples, **kw)).train()
    assert full.completed
    part = Trainer(_cfg(tiny, tmp_path / "part", examples, stop_after_stage=1, **kw)).train()
    assert not part.completed and part.global_step == 2
    assert not (tmp_path / "part" / "checkpoints" / "stage-2").exists()
    # the interrupted run's output already loads: the stage-1 model at the top level
    top, stage1 = (load_file(d / "model.safetensors") for d in (tmp_path / "part", tmp_path / "part" / "checkpoints"
                                                                 / "stage-1"))
    assert top.keys() == stage1.keys() and all(torch.equal(top[k], stage1[k]) for k in top)
    assert LatentGenerator.from_pretrained(tmp_path / "part").config.num_latent_steps == 1
    assert json.loads((tmp_path / "part" / "lvr_config.json").read_text())["latent_config"]["num_latent_steps"] == 1
    rest = Trainer(_cfg(tiny, tmp_path / "part", examples, **kw)).train(resume=True)
    assert rest.completed and rest.global_step == full.global_step
    assert rest.losses == full.losses[2:]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    # a finished run resumes to a no-op
    again = Trainer(_cfg(tiny, tmp_path / "part", examples, **kw)).train(resume=True)
    assert again.completed and again.losses == []


def test_resume_errors_name_the_path(tiny, examples, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "checkpoints")):
        Trainer(_cfg(tiny, tmp_path / "empty", examples)).train(resume=True)
    bad = tmp_path / "bad" / "checkpoints" / "stage-0"
    bad.mkdir(parents=True)
    (bad / "trainer_state.json").write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(_cfg(tiny, tmp_path / "bad", examples)).train(resume=True)
    (bad / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=f"{bad}.*incomplete"):
        Trainer(_cfg(tiny, tmp_path / "bad", examples)).train(resume=True)
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(_cfg(tiny, tmp_path / "bad", examples)).train()


# -- (c) atomic checkpoints -----------------------------------------------------------------------------
def test_failed_save_keeps_previous_checkpoint(tiny, examples, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(tiny, out, examples, max_stage=1))
    real_write = Trainer._write_processor

    def failing_write(self, dest):  # the model is already written into the temp dir when this fails
        real_write(self, dest)
        assert (dest / "model.safetensors").exists()
        raise OSError("disk full (injected)")

    saves = []
    real_save = Trainer.save_checkpoint

    def save(self, dest, stage, completed):
        saves.append(dest.name)
        if len(saves) == 2:  # stage 1's save fails
            monkeypatch.setattr(Trainer, "_write_processor", failing_write)
        return real_save(self, dest, stage, completed)

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    with pytest.raises(OSError, match="injected"):
        trainer.train()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["stage-0"]  # no stage-1, no .tmp-* left behind
    stage0 = ckpts / "stage-0"
    before = {p.name: p.read_bytes() for p in stage0.iterdir() if p.is_file()}
    assert json.loads(before["trainer_state.json"])["stage"] == 0

    # re-saving over an existing checkpoint that fails midway leaves the old one byte-identical
    with pytest.raises(OSError, match="injected"):
        real_save(trainer, stage0, trainer.plan[0], False)
    assert {p.name: p.read_bytes() for p in stage0.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["stage-0"]
    # and the run resumes from it
    monkeypatch.setattr(Trainer, "_write_processor", real_write)
    res = Trainer(_cfg(tiny, out, examples, max_stage=1)).train(resume=True)
    assert res.completed and (ckpts / "stage-1" / "model.safetensors").exists()


# -- (d) stage s: target = steps[s:] + answer, s latent steps ----------------------------------------
def test_stage_batches(tiny, examples, tmp_path, monkeypatch):
    from lvr_engine.models.loading import load_processor_or_tokenizer

    proc = load_processor_or_tokenizer(tiny)
    tok = proc.tokenizer
    for s in range(4):
        b = collate(examples, proc, s)
        assert b.num_latent_steps == s and b.replaced_steps == s
        for r, ex in enumerate(examples):
            ids = b.target_ids[r][b.target_mask[r]].tolist()
            assert ids[-1] == TINY_TOKEN_IDS["<|im_end|>"]
            text = tok.decode(ids[:-1])
            assert text == "".join(st + "\n" for st in ex.steps[s:]) + f"Therefore, the answer is {ex.answer}"
            assert text == format_target(ex, s).text
            assert (b.target_ids[r][~b.target_mask[r]] == tok.pad_token_id).all()  # right padding
            assert b.target_mask[r].tolist() == sorted(b.target_mask[r].tolist(), reverse=True)
    d = collate(examples, proc, 2, mode="direct")
    assert d.num_latent_steps == 0
    answer = tok.decode(d.target_ids[0][d.target_mask[0]][:-1].tolist())
    assert answer == f"Therefore, the answer is {examples[0].answer}"
    # prompts are left-padded, end with the assistant turn
    assert (d.attention_mask[:, -1] == 1).all()

    # the trainer feeds stage s with min(s, cap) latent steps and steps[s:] as the target
    cfg = _cfg(tiny, tmp_path / "spy", examples, max_stage=3, num_latent_steps=2)
    assert [(p.index, p.num_latent_steps, p.replaced_steps) for p in stage_plan(cfg)] == \
        [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 2, 3)]
    seen = []
    real = trainer_mod.latent_forward

    def spy(runner, adapter, **kw):
        seen.append((kw["num_latent_steps"], kw["start_marker_id"], int(kw["target_mask"].sum())))
        return real(runner, adapter, **kw)

    monkeypatch.setattr(trainer_mod, "latent_forward", spy)
    Trainer(cfg).train()
    start = TINY_TOKEN_IDS["<|start-latent|>"]
    want_tokens = [int(collate(examples, proc, s).target_mask.sum()) for s in range(4)]
    assert seen == [(0, None, want_tokens[0]), (1, start, want_tokens[1]), (2, start, want_tokens[2]),
                    (2, start, want_tokens[3])]
    meta = json.loads((tmp_path / "spy" / "lvr_config.json").read_text())
    assert meta["latent_config"]["num_latent_steps"] == 2 and meta["latent_config"]["num_selected_patches"] == 4


# -- (e) LoRA and gradient checkpointing -------------------------------------------------------------
def test_lora_trains_only_adapter_weights(tiny, examples, tmp_path):
    tr = Trainer(_cfg(tiny, tmp_path / "lora", examples, max_stage=1, num_latent_steps=1,
                      lora=LoraSettings(r=4, alpha=8)))
    base = load_file(Path(tiny) / "model.safetensors")
    tr.train()
    named = dict(tr.model.named_parameters())
    lora_b = [n for n in named if "lora_B" in n]
    assert lora_b and all(named[n].abs().sum() > 0 for n in lora_b)  # B starts at zero: it moved
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    merged = load_file(tmp_path / "lora" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed)
    assert (tmp_path / "lora" / "checkpoints" / "stage-1" / "adapter" / "adapter_model.safetensors").exists()
    # the merged model loads as a plain checkpoint and runs the trained latent setup
    from lvr_engine.evaluation import evaluate

    res = evaluate(tmp_path / "lora", examples[:2], "latent", max_new_tokens=4)
    assert res.summary["num_latent_steps"] == 1 and res.summary["num_selected_patches"] == 4


def test_gradient_checkpointing_same_losses(tiny, examples, tmp_path, monkeypatch):
    import torch.utils.checkpoint as ckpt_mod

    kw = dict(max_stage=1, num_latent_steps=1)
    plain = Trainer(_cfg(tiny, tmp_path / "plain", examples, **kw)).train()
    calls = []
    real = ckpt_mod.checkpoint
    monkeypatch.setattr(ckpt_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    tr = Trainer(_cfg(tiny, tmp_path / "gc", examples, gradient_checkpointing=True, **kw))
    ckpt = tr.train()
    assert tr.accelerator.unwrap_model(tr.module).runner.gradient_checkpointing
    assert len(calls) >= 2 * 2  # at least every decoder layer of the prefill, per step
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-6, atol=1e-6)


def _plain_logits(model, batch) -> torch.Tensor:
    """(B, S, vocab) float64 logits of a plain transformers forward of the collated prompts (no latent steps)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                     image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids).logits.double()


def test_mirage_stages(tiny, examples, tmp_path):
    """Stage 1 trains (the saved weights moved away from the initial ones), saves the weights it trained (the
    reloaded checkpoint gives the trained model's logits), and stage 2 continues from that output."""
    from transformers import Qwen2VLForConditionalGeneration

    from lvr_engine.models.loading import load_processor_or_tokenizer

    tr = Trainer(_cfg(tiny, tmp_path / "mirage", examples, objective="mirage_stage1", num_latent_steps=2))
    res = tr.train()
    assert res.completed and len(res.losses) == 1
    row = json.loads((tmp_path / "mirage" / "train_log.jsonl").read_text().splitlines()[0])
    assert 0 <= row["latent_cos"] <= 2 and row["loss"] == pytest.approx(row["latent_cos"] + 0.1 * row["ce"])
    meta = json.loads((tmp_path / "mirage" / "lvr_config.json").read_text())
    assert meta["latent_config"]["trigger"] == "token" and meta["latent_config"]["max_latent_steps"] == 8

    initial = load_file(Path(tiny) / "model.safetensors")
    saved = load_file(tmp_path / "mirage" / "model.safetensors")
    assert saved.keys() == initial.keys()
    moved = {k for k in initial if not torch.equal(initial[k], saved[k])}
    assert any(".layers." in k for k in moved), "stage 1 left the decoder weights unchanged"
    # the checkpoint holds the trained weights: reloaded, it gives the in-memory trained model's logits
    batch = collate(examples[:2], load_processor_or_tokenizer(tiny), 0)
    trained = _plain_logits(tr.accelerator.unwrap_model(tr.module).model, batch)
    gen = LatentGenerator.from_pretrained(tmp_path / "mirage")
    assert gen.config.trigger == "token" and gen.config.max_latent_steps == 8
    torch.testing.assert_close(_plain_logits(gen.model, batch), trained, rtol=1e-5, atol=1e-5)
    before = _plain_logits(Qwen2VLForConditionalGeneration.from_pretrained(tiny), batch)
    assert (before - trained).abs().max() > 1e-3  # ... and those are not the untrained model's logits

    # stage 2 continues from stage 1's output with CE only (markers supervised)
    res2 = Trainer(_cfg(tiny, tmp_path / "mirage2", examples, model=str(tmp_path / "mirage"),
                        objective="mirage_stage2", num_latent_steps=2)).train()
    row = json.loads((tmp_path / "mirage2" / "train_log.jsonl").read_text().splitlines()[0])
    assert "latent_cos" not in row and row["loss"] == pytest.approx(row["ce"]) and res2.completed
    saved2 = load_file(tmp_path / "mirage2" / "model.safetensors")
    # Adam moves a weight by at most lr per step (no weight decay): stage 2 started from stage 1's weights. From
    # the tiny ones, stage 1's own step (up to lr, either sign) would stand between them as well.
    drift = max((saved2[k] - saved[k]).abs().max().item() for k in moved if ".layers." in k)
    assert 0 < drift <= len(res2.losses) * 1e-3 * 1.01, drift
    assert max((saved2[k] - initial[k]).abs().max().item() for k in moved) > len(res2.losses) * 1e-3 * 1.01


def test_config_errors():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(model="m", output_dir="o", objective="nope")
    with pytest.raises(ValueError, match="data_dir"):
        TrainConfig(model="m", output_dir="o", dataset="m3cot")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(model="m", output_dir="o", batch_size=0)
