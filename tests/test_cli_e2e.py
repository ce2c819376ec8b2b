"""End to end through the ``lvr`` command: tiny model -> train (curriculum stages 0..1) -> eval, on M3CoT- and
ScienceQA-format fixtures written to disk. M3CoT's train and eval run the installed console script in
subprocesses; the rest goes through ``lvr_engine.cli.main`` in this process (the same code path, without the
~5 s of imports each new process pays)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures_datasets import write_m3cot_fixture, write_scienceqa_fixture
from lvr_engine import LatentGenerator
from lvr_engine.cli import main

REPO = Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r"accuracy: (\d\.\d{4}) \((\d+)/(\d+)\)  mean steps: ([\d.]+)  ms/question: ([\d.]+)")


def _lvr() -> list[str]:
    exe = Path(sys.executable).with_name("lvr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lvr_engine.cli"]


def _run(args, tmp_path, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(_lvr() + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"lvr {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["tiny-model", str(path), "--hidden-size", "64", "--num-layers", "2", "--vision-depth", "1",
                     "--vision-embed-dim", "32", "--image-size", "112"]) == 0
    assert "wrote tiny qwen2_vl checkpoint" in buf.getvalue()
    assert (path / "model.safetensors").exists() and (path / "processor_config.json").exists()
    return path


TRAIN = ["--max-stage", "1", "--epochs-per-stage", "1", "--num-latent-steps", "1", "--num-selected-patches", "4",
         "--batch-size", "2", "--lr", "1e-3", "--no-progress"]


def _check_results(results: Path, n: int, stdout: str, latent_steps: int):
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    assert len(rows) == n
    for r in rows:
        assert set(r) == {"id", "prediction", "extracted", "answer", "correct", "steps", "ms"}
        assert isinstance(r["prediction"], str) and isinstance(r["correct"], bool)
        assert r["answer"] in "ABCDE" and r["ms"] > 0
        assert latent_steps + 1 <= r["steps"] <= latent_steps + 8  # new tokens (max 8) + latent steps
    m = ACCURACY.search(stdout)
    assert m, stdout
    acc, correct, total = float(m.group(1)), int(m.group(2)), int(m.group(3))
    assert total == n and correct == sum(r["correct"] for r in rows)
    assert acc == pytest.approx(correct / n, abs=1e-4)
    assert float(m.group(4)) == pytest.approx(sum(r["steps"] for r in rows) / n, abs=0.01)
    return rows


def test_m3cot_train_then_eval(tiny, tmp_path):
    data = tmp_path / "M3CoT"
    write_m3cot_fixture(data, n_train=4, n_test=3)
    out = tmp_path / "run"
    stdout = _run(["train", "--model", tiny, "--dataset", "m3cot", "--data-dir", data, "--output", out,
                   "--limit", "4", *TRAIN], tmp_path)
    log = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    assert [r["stage"] for r in log] == [0, 0, 1, 1]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in log)
    assert "complete" in stdout
    assert (out / "checkpoints" / "stage-0" / "model.safetensors").exists()
    assert json.loads((out / "lvr_config.json").read_text())["latent_config"]["num_latent_steps"] == 1

    results = tmp_path / "results.jsonl"
    stdout = _run(["eval", "--model", out, "--dataset", "m3cot", "--data-dir", data, "--split", "test",
                   "--mode", "latent", "--output", results, "--batch-size", "2", "--max-new-tokens", "8",
                   "--no-progress"], tmp_path)
    rows = _check_results(results, 3, stdout, latent_steps=1)
    assert [r["id"] for r in rows] == [f"m3cot-test-0-{i}" for i in range(3)]
    assert "latent steps=1, K=4" in stdout

    gen = LatentGenerator.from_pretrained(out)  # the trained output is a loadable checkpoint
    assert gen.processor is not None and gen.adapter.family == "qwen2_vl"


def test_scienceqa_train_then_eval(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "ScienceQA"
    write_scienceqa_fixture(data, n_train=6, n_test=3)  # rows 2 and 5 of each split have no image
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny), "--dataset", "scienceqa", "--data-dir", str(data),
                 "--output", str(out), *TRAIN]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["completed"] and state["global_step"] == 4  # 4 image rows of 6, batch 2, 2 stages

    capsys.readouterr()
    results = tmp_path / "sqa.jsonl"
    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "cot",
                 "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check_results(results, 3, capsys.readouterr().out, latent_steps=0)  # cot: every row, with or without image

    # latent mode selects patches: only the image questions (auto --image-only)
    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "latent",
                 "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check_results(results, 2, capsys.readouterr().out, latent_steps=1)

    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "direct",
                 "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check_results(results, 3, capsys.readouterr().out, latent_steps=0)


def test_cli_errors_are_clear(tiny, tmp_path, capsys):
    def err(args):
        assert main([str(a) for a in args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in err(["train", "--model", tiny, "--dataset", "m3cot", "--data-dir",
                                    tmp_path / "nope", "--output", tmp_path / "o"])
    assert "--data-dir is required" in err(["eval", "--model", tiny, "--dataset", "scienceqa"])
    assert "no checkpoint" in err(["train", "--model", tiny, "--dataset", "synthetic", "--output", tmp_path / "fresh",
                                   "--resume", "--limit", "2"])
    broken = tmp_path / "broken" / "checkpoints" / "stage-0"
    broken.mkdir(parents=True)
    (broken / "trainer_state.json").write_text("{")
    msg = err(["train", "--model", tiny, "--dataset", "synthetic", "--output", tmp_path / "broken", "--resume",
               "--limit", "2"])
    assert "corrupt" in msg and str(broken) in msg
    assert "model directory" in err(["eval", "--model", tmp_path / "none", "--dataset", "synthetic"])
    assert "lvr_config.json" in err(["eval", "--model", tiny, "--dataset", "synthetic", "--limit", "1"])
    with pytest.raises(SystemExit):  # argparse: unknown dataset
        main(["train", "--model", str(tiny), "--dataset", "imagenet", "--output", str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err


def test_generate_prints_an_answer(tiny, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (112, 112), (200, 30, 30)).save(img)
    assert main(["generate", "--model", str(tiny), "--image", str(img), "--question", "What color is it?",
                 "--choices", "red", "green", "--num-latent-steps", "2", "--num-selected-patches", "4",
                 "--max-new-tokens", "4"]) == 0
    assert isinstance(capsys.readouterr().out, str)


def test_from_pretrained_uses_trained_latent_config(tmp_path):
    """A checkpoint's lvr_config.json decides the latent setup when no config is passed."""
    import json

    from lvr_engine import LatentGenerator
    from lvr_engine.models.tiny import TINY_TOKEN_IDS, write_tiny_model

    path = write_tiny_model(tmp_path / "m", hidden_size=64, num_layers=1)
    latent = {"num_latent_steps": 2, "num_selected_patches": 3, "trigger": "prompt", "position_mode": "arange",
              "start_marker_id": TINY_TOKEN_IDS["<|start-latent|>"], "end_marker_id": None}
    (path / "lvr_config.json").write_text(json.dumps({"latent_config": latent}))
    gen = LatentGenerator.from_pretrained(path)
    assert (gen.config.num_latent_steps, gen.config.num_selected_patches, gen.config.position_mode) == (2, 3, "arange")
    (path / "lvr_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt"):
        LatentGenerator.from_pretrained(path)
