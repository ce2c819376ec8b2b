"""End to end on the command line: a tiny Qwen2.5-VL, ``lvr train --dataset vsp --objective mirage_stage1``, then
``--objective mirage_stage2`` from its output, then ``lvr eval --dataset vsp --mode latent`` (sampling), on a
VSP-format fixture written here (maps drawn with PIL, Mirage's relative paths)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lvr_engine.cli import main
from lvr_engine.models.loading import load_processor_or_tokenizer
from lvr_engine.training import trainer as trainer_mod
from mirage_fixtures import write_vsp

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _vision_moved(a: dict, b: dict) -> set[str]:
    """The vision-tower tensors that differ between two state dicts (``visual.*`` in the saved files)."""
    vision = [k for k in a if k.split(".")[0] == "visual" or ".visual." in k]
    assert len(vision) > 10, sorted(a)[:5]
    return {k for k in vision if not torch.equal(a[k], b[k])}


def test_vsp_mirage_stage1_stage2_eval(tmp_path, monkeypatch, capsys):
    tiny = tmp_path / "tiny"
    assert main(["tiny-model", str(tiny), "--family", "qwen2_5_vl", "--hidden-size", "64", "--num-layers", "2",
                 "--vision-depth", "1", "--vision-embed-dim", "32", "--image-size", "84"]) == 0
    data = write_vsp(tmp_path / "repo", rows=3, placeholder="mid")
    monkeypatch.chdir(tmp_path)  # Mirage's ./data/... paths resolve through the data directory's parents

    # record what stage 1 feeds as helper images, per row
    seen = []
    real_collate = trainer_mod.collate_mirage

    def spy(rows, processor, *a, **kw):
        batch = real_collate(rows, processor, *a, **kw)
        if batch.helper_pixel_values is not None:  # stage 1
            seen.append(([ex.id for ex in rows], batch.helper_pixel_values.clone(), batch.pixel_values.clone()))
        return batch

    monkeypatch.setattr(trainer_mod, "collate_mirage", spy)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = ["--dataset", "vsp", "--data-dir", str(data), "--num-latent-steps", "4", "--batch-size", "3",
              "--lr", "1e-3", "--no-progress"]
    assert main(["train", "--model", str(tiny), "--objective", "mirage_stage1", "--output", str(s1),
                 "--epochs-per-stage", "2", *common]) == 0

    # the helper image of each row is its image_output (pixels of that file, in row order), not its input image
    rows = [json.loads(line) for line in (data / "train_direct.jsonl").read_text().splitlines()]
    proc = load_processor_or_tokenizer(tiny).image_processor
    assert len(seen) == 2
    for ids, helper_px, input_px in seen:
        order = [int(i.rsplit("-", 1)[1]) for i in ids]
        assert sorted(order) == [0, 1, 2] and all(i.startswith("vsp-train-") for i in ids)
        files = [Image.open(tmp_path / "repo" / rows[r]["image_output"]).convert("RGB") for r in order]
        torch.testing.assert_close(helper_px, proc(images=files, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
        assert not torch.equal(helper_px, input_px)

    log1 = _log(s1)
    assert len(log1) == 2 and all({"loss", "ce", "latent_cos"} <= set(r) for r in log1)
    for r in log1:
        assert r["loss"] == pytest.approx(0.1 * r["ce"] + r["latent_cos"]) and 0 <= r["latent_cos"] <= 2
    meta = json.loads((s1 / "lvr_config.json").read_text())
    assert meta["template"] == "mirage" and meta["objective"] == "mirage_stage1"
    lc = meta["latent_config"]
    assert lc["trigger"] == "token" and lc["max_latent_steps"] == 8  # Mirage's inference cap, not the 4 trained
    initial, w1 = load_file(tiny / "model.safetensors"), load_file(s1 / "model.safetensors")
    assert not _vision_moved(initial, w1)  # frozen by default
    assert any(".layers." in k and not torch.equal(initial[k], w1[k]) for k in initial)

    assert main(["train", "--model", str(s1), "--objective", "mirage_stage2", "--output", str(s2),
                 "--max-latent-steps", "6", *common]) == 0
    log2 = _log(s2)
    assert len(log2) == 1 and "latent_cos" not in log2[0] and log2[0]["loss"] == pytest.approx(log2[0]["ce"])
    assert json.loads((s2 / "lvr_config.json").read_text())["latent_config"]["max_latent_steps"] == 6
    w2 = load_file(s2 / "model.safetensors")
    # Adam moves a weight by at most lr per step: stage 2 started from stage 1's weights
    drift = max((w2[k] - w1[k]).abs().max().item() for k in w1 if ".layers." in k)
    assert 0 < drift <= 1e-3 * 1.01 and not _vision_moved(w1, w2)
    capsys.readouterr()

    results = []
    for run, seed in enumerate((3, 3, 4)):  # sampled as Mirage's test script samples, reproducible per seed
        out = tmp_path / f"r{run}.jsonl"
        assert main(["eval", "--model", str(s2), "--dataset", "vsp", "--data-dir", str(data), "--split", "test",
                     "--mode", "latent", "--max-new-tokens", "12", "--batch-size", "2", "--do-sample",
                     "--temperature", "0.7", "--top-p", "0.9", "--seed", str(seed), "--output", str(out),
                     "--no-progress"]) == 0
        results.append([json.loads(line) for line in out.read_text().splitlines()])
    printed = capsys.readouterr().out
    assert "success rate:" in printed and "invalid rate:" in printed
    assert [r["id"] for r in results[0]] == ["vsp-test-0", "vsp-test-1", "vsp-test-2"]
    for r in results[0]:
        assert {"id", "prediction", "correct", "invalid"} <= set(r)
        if "\\boxed{" not in r["prediction"]:  # no boxed answer: a failure, and invalid
            assert r["invalid"] and not r["correct"]
    n_invalid = sum(r["invalid"] for r in results[2])
    assert f"invalid rate: {n_invalid / 3:.4f} ({n_invalid}/3)" in printed.strip().splitlines()[-1]
    preds = [[r["prediction"] for r in res] for res in results]
    assert preds[0] == preds[1] and preds[0] != preds[2]  # the seed decides (a random tiny model: near-uniform)


def test_train_vision_trains_the_tower(tmp_path, monkeypatch):
    tiny = tmp_path / "tiny"
    assert main(["tiny-model", str(tiny), "--family", "qwen2_5_vl", "--hidden-size", "64", "--num-layers", "1",
                 "--vision-depth", "1", "--vision-embed-dim", "32", "--image-size", "84"]) == 0
    data = write_vsp(tmp_path / "repo", rows=2, placeholder="none")
    monkeypatch.chdir(tmp_path / "repo")
    out = tmp_path / "tv"
    assert main(["train", "--model", str(tiny), "--dataset", "vsp", "--data-dir", str(data), "--objective",
                 "mirage_stage1", "--num-latent-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--train-vision",
                 "--output", str(out), "--no-progress"]) == 0
    assert _vision_moved(load_file(tiny / "model.safetensors"), load_file(out / "model.safetensors"))
