"""``lvr convert ivtlr``: an official-format IVT-LR ``model.pth`` built here -> converted checkpoint directory.

The checkpoint is made the way the official code makes it: a tiny Qwen2-VL base whose tokenizer lacks the
latent tokens and whose embedding is padded beyond the tokenizer (as Qwen2-VL-7B's), the three tokens added,
the embeddings resized to the tokenizer, a peft LoRA on the seven projections (r != alpha, B randomised so the
merge matters), the state dict of a wrapper holding it as ``base_causallm`` plus its own ``embedding``, keys
renamed to transformers 4.51's layout (checked against transformers' own loader of that layout), prefixed
``module.``, ``torch.save``d. The converted model must give the peft model's logits, and every bad input must be a
clear error that leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lvr_engine.cli import main
from lvr_engine.engine.config import LatentConfig
from lvr_engine.models.processors import load_processor
from lvr_engine.models.tiny import write_tiny_model

peft = pytest.importorskip("peft")

LORA_R, LORA_ALPHA = 4, 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LATENT_TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]
# 280x280 images -> 100 image tokens; a padded embedding (1024 rows > tokenizer); weights large enough that greedy
# decoding does not repeat one token
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vision_depth=1, vision_embed_dim=32,
            image_size=280, vocab_size=1024, latent_tokens=False, initializer_range=0.15)


def to_451(key: str) -> str:
    """A peft key of the installed transformers' Qwen2-VL, written in transformers 4.51's layout (decoder under
    ``model.``, vision tower under ``visual.``), spelled out here independently of the converter."""
    key = key.replace("base_model.model.model.language_model.", "base_model.model.model.")
    return key.replace("base_model.model.model.visual.", "base_model.model.visual.")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny base, the official wrapper's peft model built on it, and its ``model.pth``."""
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("ivtlr")
    base = write_tiny_model(root / "base", seed=3, **TINY)
    processor = load_processor(base)
    tok = processor.tokenizer
    base_len = len(tok)
    tok.add_special_tokens({"additional_special_tokens": LATENT_TOKENS})
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 1024 > len(tok)  # padded, as Qwen2-VL-7B's 152064
    model.resize_token_embeddings(len(tok))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                                      target_modules=TARGETS, bias="none"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.eval()
    state = {"module.base_causallm." + to_451(k): v for k, v in lora.state_dict().items()}
    state["module.embedding.weight"] = lora.get_input_embeddings().weight  # the wrapper's reference to it
    pth = root / "model.pth"
    torch.save(state, pth)
    return SimpleNamespace(root=root, base=base, pth=pth, lora=lora, state=state, processor=processor,
                           base_len=base_len)


@pytest.fixture(scope="module")
def converted(official):
    out = official.root / "converted-fp32"
    assert main(["convert", "ivtlr", "--checkpoint", str(official.pth), "--base", str(official.base), "--output",
                 str(out), "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--dtype", "float32"]) == 0
    return out


def _image(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(90, 120, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def _examples():
    from lvr_engine.data.example import ReasoningExample

    return [ReasoningExample(id="q0", image=_image(0), question="Which square is red?", choices=["left", "right"],
                             answer="A", answer_index=0, steps=[]),
            ReasoningExample(id="q1", image=_image(1), question="What colour is the shape in the top left corner?",
                             choices=["red", "green", "blue"], answer="C", answer_index=2, steps=[])]


def test_the_checkpoint_is_in_the_transformers_451_layout(official, tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    keys = set(official.state)
    for key in ["module.embedding.weight", "module.base_causallm.base_model.model.lm_head.weight",
                "module.base_causallm.base_model.model.model.embed_tokens.weight",
                "module.base_causallm.base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias",
                "module.base_causallm.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight",
                "module.base_causallm.base_model.model.visual.patch_embed.proj.weight",
                "module.base_causallm.base_model.model.visual.merger.mlp.2.weight"]:
        assert key in keys, key
    # transformers' own loader of the 4.51 layout reads the renamed base weights without missing/unexpected keys
    base = Qwen2VLForConditionalGeneration.from_pretrained(official.base, dtype=torch.float32)
    legacy = {to_451("base_model.model." + k).removeprefix("base_model.model."): v.clone()
              for k, v in base.state_dict().items()}
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((Path(official.base) / "config.json").read_text())
    loaded, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_converted_model_gives_the_peft_models_logits(official, converted):
    from transformers import Qwen2VLForConditionalGeneration

    from lvr_engine.training.collate import encode_prompts

    model = Qwen2VLForConditionalGeneration.from_pretrained(converted, attn_implementation="eager")
    assert model.dtype == torch.float32
    processor = load_processor(converted)
    # the image and the three new <|latent|> tokens (rows added by the resize) are in the input
    batch = encode_prompts(_examples(), processor, template="ivtlr_infer").model_inputs()
    assert int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|latent|>")).sum()) == 6
    with torch.no_grad():
        want = official.lora(**batch).logits
        got = model(**batch).logits
    assert got.shape == want.shape == (2, batch["input_ids"].shape[1], official.base_len + 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    # and the LoRA matters: the base alone is far from it
    with official.lora.disable_adapter(), torch.no_grad():
        plain = official.lora(**batch).logits
    assert (plain - want).abs().max() > 100 * (got - want).abs().max()


def test_converted_directory_holds_the_official_setup(official, converted):
    tok = load_processor(converted).tokenizer
    ids = tok.convert_tokens_to_ids(LATENT_TOKENS)
    assert ids == [official.base_len, official.base_len + 1, official.base_len + 2]  # added in that order
    assert len(tok) == official.base_len + 3
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == len(tok) and cfg["model_type"] == "qwen2_vl"
    gen_cfg = json.loads((converted / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert not gen_cfg.get("do_sample", False)
    meta = json.loads((converted / "lvr_config.json").read_text())
    assert meta["latent_config"] == dataclasses.asdict(LatentConfig.ivtlr().resolve_tokens(tok))
    assert meta["template"] == "ivtlr_infer" and meta["image_size"] == 280
    assert meta["converted_from"]["lora_r"] == LORA_R and meta["converted_from"]["lora_alpha"] == LORA_ALPHA
    assert not [p.name for p in converted.parent.iterdir() if ".tmp-" in p.name]
    video = [json.loads((d / "processor_config.json").read_text())["video_processor"]
             for d in (converted, official.base)]
    assert video[0] == video[1] and video[0]["video_processor_type"] == "Qwen2VLVideoProcessor"  # not the stand-in


def test_bf16_conversion_rounds_the_fp32_merge_once(official, converted):
    from safetensors.torch import load_file

    out = official.root / "converted-bf16"
    assert main(["convert", "ivtlr", "--checkpoint", str(official.pth), "--base", str(official.base), "--output",
                 str(out), "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA)]) == 0
    fp32, bf16 = load_file(converted / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(fp32) == set(bf16)
    for k, v in fp32.items():
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], v.to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _convert_error(capsys, official, out, pth=None, base=None, extra=()):
    rc = main(["convert", "ivtlr", "--checkpoint", str(pth or official.pth), "--base", str(base or official.base),
               "--output", str(out), "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "lvr convert: error: " in err, err
    assert not out.exists(), "a failed conversion left its output directory"
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name], "a failed conversion left a temp dir"
    return err


class _NotATensor:
    pass


def test_not_a_state_dict_is_a_clear_error(official, tmp_path, capsys):
    out = tmp_path / "out"
    f = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], f)
    assert "is not a state dict: torch.load gives a list" in _convert_error(capsys, official, out, pth=f)
    f = tmp_path / "junk.pth"
    f.write_bytes(b"not a torch file at all")
    assert "is not a state dict readable with torch.load(weights_only=True)" in _convert_error(
        capsys, official, out, pth=f)
    f = tmp_path / "code.pth"
    torch.save({"a": _NotATensor()}, f)  # unpickling it would need to import this class: refused
    assert "weights_only" in _convert_error(capsys, official, out, pth=f)
    f = tmp_path / "ints.pth"
    torch.save({"embedding.weight": 3}, f)
    assert "'embedding.weight' (int)" in _convert_error(capsys, official, out, pth=f)
    assert "does not exist" in _convert_error(capsys, official, out, pth=tmp_path / "missing.pth")


def test_missing_and_unexpected_keys_are_listed(official, tmp_path, capsys):
    state = dict(official.state)
    dropped = "module.base_causallm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    del state[dropped]
    f = tmp_path / "missing.pth"
    torch.save(state, f)
    err = _convert_error(capsys, official, tmp_path / "out", pth=f)
    assert "missing keys (1):" in err and dropped.removeprefix("module.") in err
    assert "unexpected keys" not in err

    state = dict(official.state)
    extra = "module.base_causallm.base_model.model.model.layers.0.mlp.up_proj.lora_A.other.weight"
    state[extra] = torch.zeros(LORA_R, 64)
    state["module.latent_head.weight"] = torch.zeros(3)
    f = tmp_path / "unexpected.pth"
    torch.save(state, f)
    err = _convert_error(capsys, official, tmp_path / "out", pth=f)
    assert "unexpected keys (2):" in err and extra.removeprefix("module.") in err and "latent_head.weight" in err


def test_shape_mismatch_names_the_tensor_and_both_shapes(official, tmp_path, capsys):
    other = write_tiny_model(tmp_path / "wider", seed=3, **{**TINY, "intermediate_size": 192})
    err = _convert_error(capsys, official, tmp_path / "out", base=other)
    assert ("base_causallm.base_model.model.model.layers.0.mlp.gate_proj.base_layer.weight -> "
            "model.language_model.layers.0.mlp.gate_proj.weight: checkpoint (256, 64), base (192, 64)") in err
    err = _convert_error(capsys, official, tmp_path / "out", extra=["--lora-r", "8"])
    assert ("model.layers.0.self_attn.q_proj.lora_A.default.weight -> model.language_model.layers.0.self_attn."
            "q_proj.weight: checkpoint (4, 64), base (--lora-r 8) (8, 64)") in err


def test_base_must_be_qwen2_vl_with_the_matching_tokenizer(official, tmp_path, capsys):
    qwen25 = write_tiny_model(tmp_path / "q25", family="qwen2_5_vl", seed=3, **TINY)
    err = _convert_error(capsys, official, tmp_path / "out", base=qwen25)
    assert "is a 'qwen2_5_vl' model, not Qwen2-VL" in err
    other_tok = write_tiny_model(tmp_path / "other-tok", seed=3, corpus=["just a few words"], **TINY)
    err = _convert_error(capsys, official, tmp_path / "out", base=other_tok)
    assert f"but the checkpoint's embedding has {official.base_len + 3} rows" in err
    assert "does not exist" in _convert_error(capsys, official, tmp_path / "out", base=tmp_path / "nowhere")


def test_existing_output_is_refused_and_kept(official, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["convert", "ivtlr", "--checkpoint", str(official.pth), "--base", str(official.base), "--output",
               str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_nothing(official, tmp_path, monkeypatch):
    import lvr_engine.models.convert_ivtlr as conv

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "save_processor", fail)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(OSError, match="disk full"):
        conv.convert_ivtlr(official.pth, official.base, out, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
    assert list(tmp_path.iterdir()) == []  # not even the parents it created


def test_engine_decodes_the_converted_model_as_the_official_inference(official, converted):
    """Token for token (and patch for patch) against the independent re-implementation of the official
    inference, run on the peft model itself (eager attention, fp32), one row at a time; the engine batches."""
    ref = pytest.importorskip("official_ivtlr")
    from lvr_engine import LatentGenerator
    from lvr_engine.training.collate import encode_prompts

    gen = LatentGenerator.from_pretrained(converted)
    assert gen.config.num_selected_patches == 32 and gen.config.num_latent_steps == 3
    tok = gen.processor.tokenizer
    prompt = encode_prompts(_examples(), gen.processor, template="ivtlr_infer")
    out = gen.generate(**prompt.model_inputs(), max_new_tokens=10)
    patches = [int(t * h * w) for t, h, w in prompt.image_grid_thw.tolist()]
    offsets = [0, patches[0], patches[0] + patches[1]]
    for b in range(2):
        ids = prompt.input_ids[b][prompt.attention_mask[b].bool()]
        want = ref.official_ivtlr_generate(
            official.lora.base_model.model, ids, prompt.pixel_values[offsets[b]:offsets[b + 1]],
            prompt.image_grid_thw[b:b + 1], latent_token_id=tok.convert_tokens_to_ids("<|latent|>"),
            num_selected_patches=32, eos_token_id=tok.eos_token_id, max_new_tokens=10)
        assert out.selected[b].tolist() == want.selected, f"row {b}"
        assert out.sequences[b, :len(want.tokens)].tolist() == want.tokens, f"row {b}"


def test_eval_in_the_official_format_writes_rows_and_accuracy(converted, tmp_path, capsys):
    """``lvr eval --template ivtlr_infer --judge ivtlr_infer`` on an M3CoT-format split, batched."""
    import re

    from fixtures_datasets import write_m3cot_fixture

    data = tmp_path / "M3CoT"
    written = write_m3cot_fixture(data, n_train=0, n_test=3)["test"]
    results = tmp_path / "results.jsonl"
    assert main(["eval", "--model", str(converted), "--dataset", "m3cot", "--data-dir", str(data), "--split", "test",
                 "--template", "ivtlr_infer", "--judge", "ivtlr_infer", "--output", str(results), "--batch-size", "2",
                 "--max-new-tokens", "6", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == [w["id"] for w in written]
    assert [r["answer"] for r in rows] == [w["answer"] for w in written]
    for r in rows:
        letters = set((r["extracted"] or "").split(",")) - {""}
        assert r["correct"] == (r["answer"] in letters)
        first = r["prediction"][:1]
        if first.isascii() and first.isalpha():  # the prompt ends with "Answer:": the first letter written counts
            assert first.upper() in letters
        assert r["steps"] >= 3 + 1                 # three latent steps + at least one token
    m = re.search(r"accuracy: (\d\.\d{4}) \((\d+)/(\d+)\)", stdout)
    assert m and int(m.group(3)) == 3 and int(m.group(2)) == sum(r["correct"] for r in rows), stdout
    assert "latent steps=3, K=32" in stdout


def test_generate_answers_with_the_converted_model(converted, tmp_path, capsys):
    image = tmp_path / "q.png"
    _image(2).save(image)
    assert main(["generate", "--model", str(converted), "--image", str(image), "--question", "Which square is red?",
                 "--choices", "left", "right", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
