"""End to end through the ``lvr`` command: tiny model -> train (curriculum stages 0..1) -> eval, on M3CoT- and
ScienceQA-format fixtures written to disk. M3CoT's train and eval run the installed console script in
subprocesses; the rest goes through ``lvr_engine.cli.main`` in this process (the same code path, without the
~5 s of imports each new process pays).

What the commands print and write is checked against an independent computation: the checkpoint loaded with
plain transformers (eager attention) and decoded one question at a time by the published algorithm
(``benchmarks.baselines.published_latent_generate``), gold answers read from the rows the fixture wrote."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.baselines import published_latent_generate
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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def _published(model_dir: Path, examples, *, num_latent_steps=0, num_selected_patches=0, start_marker_id=None,
               end_marker_id=None, position_mode="mrope", max_new_tokens=8, template="ivtlr", image_size=None,
               prompt_texts=None):
    """Per example, (new tokens up to and including EOS, decoded text): the checkpoint in ``model_dir`` loaded by
    transformers (fp32, eager attention) and decoded alone by the published algorithm."""
    import transformers

    from lvr_engine.models.loading import load_processor_or_tokenizer
    from lvr_engine.training.collate import encode_prompts

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    proc = load_processor_or_tokenizer(model_dir)
    eos = model.generation_config.eos_token_id
    out = []
    for i, ex in enumerate(examples):
        enc = encode_prompts([ex], proc, template=template, image_size=image_size,
                             prompt_texts=None if prompt_texts is None else [prompt_texts[i]])
        with torch.no_grad():
            toks, _ = published_latent_generate(
                model, enc.input_ids[0], pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                mm_token_type_ids=None if enc.mm_token_type_ids is None else enc.mm_token_type_ids[0],
                num_latent_steps=num_latent_steps, num_selected_patches=num_selected_patches,
                start_marker_id=start_marker_id, end_marker_id=end_marker_id, position_mode=position_mode,
                max_new_tokens=max_new_tokens, eos_token_id=eos)
        out.append((toks, proc.tokenizer.decode(toks, skip_special_tokens=True).strip()))
    return out


def _check_results(results: Path, stdout: str, model_dir: Path, examples, gold: dict, mode: str, dataset: str):
    """The jsonl rows and the accuracy line of ``lvr eval`` against the published decode of every question:
    same prediction text, AR steps (tokens up to EOS + latent steps), gold answer, judged correctness."""
    from lvr_engine.data import SCORERS

    meta = json.loads((model_dir / "lvr_config.json").read_text())
    lc = meta["latent_config"]
    assert lc.get("patch_order", "ascending") == "ascending" and lc.get("trigger", "prompt") == "prompt"
    N = lc["num_latent_steps"] if mode == "latent" else 0
    K = lc["num_selected_patches"] if N else 0
    ref = _published(model_dir, examples, num_latent_steps=N, num_selected_patches=K,
                     start_marker_id=lc.get("start_marker_id") if N else None,
                     end_marker_id=lc.get("end_marker_id") if N else None,
                     position_mode=lc.get("position_mode", "mrope"), max_new_tokens=8,
                     template=meta.get("template", "ivtlr"), image_size=meta.get("image_size"))
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    for r, ex, (toks, text) in zip(rows, examples, ref, strict=True):
        assert set(r) == {"id", "prediction", "extracted", "answer", "correct", "steps", "ms"}
        assert r["prediction"] == text, f"{r['id']}: eval wrote {r['prediction']!r}, published decode {text!r}"
        assert r["steps"] == len(toks) + N, (r["id"], r["steps"], toks)
        assert r["answer"] == gold[ex.id] and r["ms"] > 0
        assert r["correct"] == bool(SCORERS[dataset](text, ex))
    m = ACCURACY.search(stdout)
    assert m, stdout
    acc, correct, total = float(m.group(1)), int(m.group(2)), int(m.group(3))
    n = len(examples)
    assert total == n and correct == sum(r["correct"] for r in rows)
    assert acc == pytest.approx(correct / n, abs=1e-4)
    assert float(m.group(4)) == pytest.approx(sum(len(t) + N for t, _ in ref) / n, abs=0.01)
    return rows


def _changed_weights(before: Path, after: Path) -> list[str]:
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _examples(name, data, split, image_only):
    from lvr_engine.data import load_dataset_by_name

    ds = load_dataset_by_name(name, data, split, require_image=image_only)
    return [ds[i] for i in range(len(ds))]


def test_m3cot_train_then_eval(tiny, tmp_path):
    data = tmp_path / "M3CoT"
    written = write_m3cot_fixture(data, n_train=4, n_test=3)
    out = tmp_path / "run"
    stdout = _run(["train", "--model", tiny, "--dataset", "m3cot", "--data-dir", data, "--output", out,
                   "--limit", "4", *TRAIN], tmp_path)
    log = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    assert [r["stage"] for r in log] == [0, 0, 1, 1]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in log)
    assert "complete" in stdout
    assert (out / "checkpoints" / "stage-0" / "model.safetensors").exists()
    assert json.loads((out / "lvr_config.json").read_text())["latent_config"]["num_latent_steps"] == 1
    assert _changed_weights(tiny, out), "training left every weight of the tiny model unchanged"

    results = tmp_path / "results.jsonl"
    stdout = _run(["eval", "--model", out, "--dataset", "m3cot", "--data-dir", data, "--split", "test",
                   "--mode", "latent", "--output", results, "--batch-size", "2", "--max-new-tokens", "8",
                   "--no-progress"], tmp_path)
    gold = {r["id"]: r["answer"] for r in written["test"]}
    examples = _examples("m3cot", data, "test", True)
    rows = _check_results(results, stdout, out, examples, gold, "latent", "m3cot")
    assert [r["id"] for r in rows] == [f"m3cot-test-0-{i}" for i in range(3)]
    assert "latent steps=1, K=4" in stdout

    gen = LatentGenerator.from_pretrained(out)  # the trained output is a loadable checkpoint
    assert gen.processor is not None and gen.adapter.family == "qwen2_vl"


def test_scienceqa_train_then_eval(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "ScienceQA"
    written = write_scienceqa_fixture(data, n_train=6, n_test=3)  # rows 2 and 5 of each split have no image
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny), "--dataset", "scienceqa", "--data-dir", str(data),
                 "--output", str(out), *TRAIN]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["completed"] and state["global_step"] == 4  # 4 image rows of 6, batch 2, 2 stages
    assert _changed_weights(tiny, out), "training left every weight of the tiny model unchanged"
    gold = {f"scienceqa-test-{i}": "ABCDEF"[r["answer"]] for i, r in enumerate(written["test"])}
    every, with_image = _examples("scienceqa", data, "test", False), _examples("scienceqa", data, "test", True)
    assert len(every) == 3 and len(with_image) == 2

    capsys.readouterr()
    results = tmp_path / "sqa.jsonl"
    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "cot",
                 "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    # cot: every row, with or without image
    _check_results(results, capsys.readouterr().out, out, every, gold, "cot", "scienceqa")

    # latent mode selects patches: only the image questions (auto --image-only)
    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "latent",
                 "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check_results(results, capsys.readouterr().out, out, with_image, gold, "latent", "scienceqa")

    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "direct",
                 "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check_results(results, capsys.readouterr().out, out, every, gold, "direct", "scienceqa")


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
    msg = err(["eval", "--model", tmp_path / "none", "--dataset", "synthetic"])
    assert "--model" in msg and f"{tmp_path / 'none'} does not exist" in msg
    assert "lvr_config.json" in err(["eval", "--model", tiny, "--dataset", "synthetic", "--limit", "1"])
    with pytest.raises(SystemExit):  # argparse: unknown dataset
        main(["train", "--model", str(tiny), "--dataset", "imagenet", "--output", str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err


def test_generate_prints_an_answer(tiny, tmp_path, capsys):
    """`lvr generate` prints the decoded answer the published algorithm gives for the same prompt."""
    from PIL import Image

    from lvr_engine.data.example import ReasoningExample
    from lvr_engine.data.prompts import format_prompt

    img = tmp_path / "img.png"
    Image.new("RGB", (112, 112), (200, 30, 30)).save(img)
    question, choices = "What color is it?", ["red", "green"]
    assert main(["generate", "--model", str(tiny), "--image", str(img), "--question", question,
                 "--choices", *choices, "--num-latent-steps", "2", "--num-selected-patches", "4",
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    ex = ReasoningExample(id="cli", image=Image.open(img).convert("RGB"), question=question, choices=choices,
                          answer="A", answer_index=0, steps=[])
    [(toks, text)] = _published(tiny, [ex], num_latent_steps=2, num_selected_patches=4, max_new_tokens=4,
                                prompt_texts=[format_prompt(ex, "ivtlr")])
    assert len(toks) == 4 and text  # four tokens, not all special: the comparison below is not vacuous
    assert printed == text + "\n"


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
