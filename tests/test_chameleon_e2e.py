"""End to end on Chameleon (issue #16, acceptance 2): ``lvr tiny-model --family chameleon`` -> ``lvr train`` (curriculum
stages 0 and 1, the official ScienceQA Chameleon prompt as the template) -> ``lvr eval`` (latent and CoT), on a
ScienceQA-format fixture written to disk, through ``lvr_engine.cli.main`` in this process.

What the commands write is checked against computations independent of the engine: the trained checkpoint loaded
with plain transformers (eager attention) and decoded one question at a time by the official IVT-LR Chameleon
inference (``official_ivtlr_chameleon.py``, fed the prompt the official script builds) for the latent mode, and by
transformers' own ``generate`` for the CoT mode; gold answers from the rows the fixture wrote; correctness by the
official ``extract_answer`` rule (``judge="ivtlr"``: the digit after "the answer is").
"""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from fixtures_datasets import write_scienceqa_fixture
from lvr_engine import LatentGenerator
from lvr_engine.cli import main
from official_ivtlr_chameleon import official_chameleon_generate

ACCURACY = re.compile(r"accuracy: (\d\.\d{4}) \((\d+)/(\d+)\)")
TRAIN = ["--template", "ivtlr_chameleon", "--max-stage", "1", "--epochs-per-stage", "1", "--num-latent-steps", "1",
         "--num-selected-patches", "4", "--batch-size", "2", "--lr", "1e-3", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tiny model dir, fixture dir, fixture rows, trained run dir): tiny-model + train once for the module."""
    root = tmp_path_factory.mktemp("chameleon")
    tiny, data, out = root / "tiny", root / "ScienceQA", root / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["tiny-model", str(tiny), "--family", "chameleon", "--hidden-size", "64", "--num-layers", "2",
                     "--seed", "1"]) == 0
    assert "wrote tiny chameleon checkpoint" in buf.getvalue()
    written = write_scienceqa_fixture(data, n_train=6, n_test=3)  # rows 2 and 5 of each split have no image
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--model", str(tiny), "--dataset", "scienceqa", "--data-dir", str(data),
                     "--output", str(out), *TRAIN]) == 0
    return tiny, data, written, out


def _examples(data, image_only):
    from lvr_engine.data import load_dataset_by_name

    ds = load_dataset_by_name("scienceqa", data, "test", require_image=image_only)
    return [ds[i] for i in range(len(ds))]


def _official_text(ex) -> str:
    """``infer_chameleon_scienceqa.py``'s ``format_prompt``, spelled out here independently of the templates."""
    options = "\n".join(f"({chr(65 + i)}).{{{c.strip()}}}" for i, c in enumerate(ex.choices))
    image = "<image>" if ex.image is not None else ""
    return f"{image}[Question]:{{{ex.question.strip()}}}\n[Options]:\n{options}\nAnswer:"


def _reference(run, examples, N, K, max_new=8):
    """Per example (new tokens up to and including EOS, decoded text) from plain transformers: the official
    Chameleon inference with N placeholders (N > 0; feeding order ascending, as the run trained), else
    ``model.generate`` on the processor's prompt."""
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(run, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(run)
    tok = proc.tokenizer
    eos = tok.eos_token_id
    out = []
    for ex in examples:
        enc = proc(images=ex.image, text=_official_text(ex) + "<|latent|>" * N, return_tensors="pt")
        if N:
            toks = official_chameleon_generate(
                model, enc["input_ids"][0], enc["pixel_values"],
                latent_token_id=tok.convert_tokens_to_ids("<|latent|>"),
                image_token_id=tok.convert_tokens_to_ids("<image>"), num_selected_patches=K, eos_token_id=None,
                max_new_tokens=max_new, patch_order="ascending").tokens
            toks = toks[:toks.index(eos) + 1] if eos in toks else toks  # the trained setup checks every token
        else:
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id)
            toks = gen[0, enc["input_ids"].shape[1]:].tolist()
        out.append((toks, tok.decode(toks, skip_special_tokens=True).strip()))
    return out


def _check(results, stdout, run, examples, gold, N):
    from lvr_engine.data.scoring import score_scienceqa

    lc = json.loads((run / "lvr_config.json").read_text())["latent_config"]
    ref = _reference(run, examples, N, lc["num_selected_patches"] if N else 0)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    for r, ex, (toks, text) in zip(rows, examples, ref, strict=True):
        assert r["prediction"] == text, f"{r['id']}: eval wrote {r['prediction']!r}, reference {text!r}"
        assert r["steps"] == len(toks) + N and r["answer"] == gold[ex.id]
        assert r["correct"] == score_scienceqa(text, ex, judge="ivtlr")
    m = ACCURACY.search(stdout)
    assert m and int(m.group(3)) == len(examples) and int(m.group(2)) == sum(r["correct"] for r in rows), stdout


def test_tiny_model_loads(trained):
    tiny = trained[0]
    gen = LatentGenerator.from_pretrained(tiny)
    assert gen.adapter.family == "chameleon" and type(gen.runner).__name__ == "DecoderRunner"
    assert gen.processor.image_seq_length == 64 and gen.processor.tokenizer.sep_token == "<reserved08706>"


def test_train_two_stages(trained):
    tiny, _, _, out = trained
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["completed"] and state["global_step"] == 4  # 4 image rows of 6, batch 2, stages 0 and 1
    a, b = load_file(tiny / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.startswith("model.layers.") for k in changed), "training left the decoder unchanged"
    assert not [k for k in changed if k.startswith("model.vqmodel.")], "the VQ-VAE must stay frozen"
    meta = json.loads((out / "lvr_config.json").read_text())
    tok = LatentGenerator.from_pretrained(out).processor.tokenizer
    lc = meta["latent_config"]
    assert meta["template"] == "ivtlr_chameleon" and lc["num_latent_steps"] == 1 and lc["num_selected_patches"] == 4
    assert lc["placeholder_id"] == tok.convert_tokens_to_ids("<|latent|>")
    assert lc["end_marker_id"] == tok.convert_tokens_to_ids("<reserved08706>") and lc["start_marker_id"] is None


def _recording(monkeypatch):
    """Record the prompt rows (unpadded input_ids) every LatentGenerator.generate call receives."""
    seen, real = [], LatentGenerator.generate

    def generate(self, input_ids, attention_mask=None, **kw):
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True))
        return real(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(LatentGenerator, "generate", generate)
    return seen


def _official_ids(run, examples, N):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(run)
    return [proc(images=ex.image, text=_official_text(ex) + "<|latent|>" * N, return_tensors="pt")["input_ids"][0]
            .tolist() for ex in examples]


def test_eval_latent_and_cot(trained, tmp_path, capsys, monkeypatch):
    _, data, written, out = trained
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    gold = {f"scienceqa-test-{i}": "ABCDEF"[r["answer"]] for i, r in enumerate(written["test"])}
    results = tmp_path / "sqa.jsonl"
    capsys.readouterr()
    prompts = _recording(monkeypatch)
    # latent mode selects patches: only the image questions (auto --image-only); the prompts are the official
    # script's (the placeholders of the trained latent step count, then the separator)
    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "latent",
                 "--judge", "ivtlr", "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check(results, capsys.readouterr().out, out, _examples(data, True), gold, N=1)
    assert prompts == _official_ids(out, _examples(data, True), 1)
    # CoT: every row, the one without an image too; no placeholders
    prompts.clear()
    assert main(["eval", "--model", str(out), "--dataset", "scienceqa", "--data-dir", str(data), "--mode", "cot",
                 "--judge", "ivtlr", "--output", str(results), "--max-new-tokens", "8", "--no-progress"]) == 0
    _check(results, capsys.readouterr().out, out, _examples(data, False), gold, N=0)
    assert prompts == _official_ids(out, _examples(data, False), 0)


def test_generate_answers_as_the_official_inference(trained, tmp_path, capsys, monkeypatch):
    """``lvr generate`` on the trained run: the official prompt (one placeholder per trained latent step, then the
    separator), decoded as the official inference decodes it."""
    from PIL import Image

    from lvr_engine.data.example import ReasoningExample

    out = trained[3]
    img = tmp_path / "q.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    ex = ReasoningExample(id="cli", image=Image.open(img).convert("RGB"), question="Which color is the square?",
                          choices=["red", "blue"], answer="A", answer_index=0, steps=[])
    capsys.readouterr()
    prompts = _recording(monkeypatch)
    assert main(["generate", "--model", str(out), "--image", str(img), "--question", ex.question, "--choices",
                 "red", "blue", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    assert prompts == _official_ids(out, [ex], 1)
    (_, want), = _reference(out, [ex], 1, 4)
    assert printed == want
