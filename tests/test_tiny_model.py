"""Tiny Qwen2-VL checkpoints: write -> load with transformers -> chat template -> processor -> forward/generate."""

from __future__ import annotations

import json

import pytest
import torch

from lvr_engine.data.prompts import format_prompt, format_target
from lvr_engine.data.synthetic import make_synthetic_dataset
from lvr_engine.models.tiny import (
    TINY_SPECIAL_TOKENS,
    TINY_TOKEN_IDS,
    build_tiny_tokenizer,
    load_processor,
    tiny_qwen2vl_config,
    write_tiny_model,
)


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2vl", seed=0)


@pytest.fixture(scope="module")
def loaded(ckpt):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    return model, load_processor(ckpt)


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_dataset(4, seed=0, split="test")


def _inputs(processor, exs):
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}],
            add_generation_prompt=True, tokenize=False)
        for ex in exs
    ]
    return texts, processor(text=texts, images=[ex.image for ex in exs], return_tensors="pt", padding=True)


def test_checkpoint_files(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json"} <= names
    pcfg = json.loads((ckpt / "processor_config.json").read_text())
    assert pcfg["processor_class"] == "Qwen2VLProcessor"
    assert pcfg["image_processor"]["size"] == {"shortest_edge": 224 * 224, "longest_edge": 224 * 224}
    assert pcfg["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"


def test_loads_with_auto_classes(loaded):
    model, processor = loaded
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    cfg = model.config.text_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    assert sum(cfg.rope_parameters["mrope_section"]) == cfg.hidden_size // cfg.num_attention_heads // 2
    assert model.config.vision_config.patch_size == 14 and model.config.vision_config.spatial_merge_size == 2
    assert cfg.vocab_size == len(processor.tokenizer)


@pytest.mark.skipif(not _has_torchvision(), reason="transformers 5.23's AutoProcessor needs torchvision for Qwen2-VL")
def test_autoprocessor_with_torchvision(ckpt):
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(ckpt)).__name__ == "Qwen2VLProcessor"


def test_special_token_ids_match_config(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    for t, i in TINY_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]  # never split
        assert t in tok.all_special_tokens or t in [str(x) for x in tok.added_tokens_decoder.values()]
    assert len(TINY_SPECIAL_TOKENS) == 13
    c = model.config
    assert c.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert c.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert c.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert c.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert c.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert c.text_config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id in model.generation_config.eos_token_id
    # the config-only helper uses the same ids
    tc = tiny_qwen2vl_config()
    assert (tc.image_token_id, tc.vision_start_token_id, tc.vision_end_token_id) == (
        c.image_token_id, c.vision_start_token_id, c.vision_end_token_id)


def test_processor_image_tokens(loaded, examples):
    model, processor = loaded
    texts, inp = _inputs(processor, examples[:1])
    assert "<|vision_start|><|image_pad|><|vision_end|>" in texts[0]
    assert texts[0].endswith("<|im_start|>assistant\n")
    ids = inp["input_ids"][0]
    img = ids == model.config.image_token_id
    assert int(img.sum()) == 64  # 224 x 224 -> 8 x 8 merged patches
    assert inp["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert tuple(inp["pixel_values"].shape) == (256, 3 * 2 * 14 * 14)
    assert "mm_token_type_ids" in inp
    assert torch.equal(inp["mm_token_type_ids"][0].bool(), img)
    # the image tokens sit between vision_start and vision_end, contiguously
    pos = img.nonzero().flatten()
    assert ids[pos[0] - 1] == model.config.vision_start_token_id
    assert ids[pos[-1] + 1] == model.config.vision_end_token_id
    assert pos[-1] - pos[0] == 63


def test_forward_and_generate(loaded, examples):
    model, processor = loaded
    processor.tokenizer.padding_side = "left"
    _, inp = _inputs(processor, examples[:2])
    with torch.no_grad():
        out = model(**inp)
        assert out.logits.shape == (*inp["input_ids"].shape, model.config.text_config.vocab_size)
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inp["input_ids"].shape[1] + 3)
    assert torch.equal(gen[:, : inp["input_ids"].shape[1]], inp["input_ids"])
    text = processor.batch_decode(gen[:, inp["input_ids"].shape[1]:], skip_special_tokens=False)
    assert len(text) == 2


def test_tokenizer_round_trip(loaded, examples):
    _, processor = loaded
    tok = processor.tokenizer
    for ex in examples:
        for text in [ex.question, *ex.steps, format_prompt(ex), format_target(ex).text,
                     "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + ex.question + "<|im_end|>"]:
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text  # byte-level BPE: lossless, whitespace included
        # the task's words are whole tokens: a question is about one token per word / punctuation mark
        assert len(tok.encode(ex.question, add_special_tokens=False)) <= len(ex.question.split()) + 3
    assert tok.decode(tok.encode("Zebra 42 ünïcode!", add_special_tokens=False)) == "Zebra 42 ünïcode!"
    # training the tokenizer is deterministic
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()


def test_config_for_random_models():
    from transformers import Qwen2VLForConditionalGeneration

    cfg = tiny_qwen2vl_config(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=600,
                              initializer_range=0.5, vision_embed_dim=32, vision_num_heads=2)
    assert cfg.text_config.initializer_range == 0.5 and cfg.vision_config.initializer_range == 0.5
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 6, 6]  # head_dim 32
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    assert model.model.language_model.embed_tokens.weight.std() > 0.3  # the initializer range took
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 4, 600)
    with pytest.raises(TypeError):
        tiny_qwen2vl_config(not_an_option=1)
    with pytest.raises(ValueError):
        tiny_qwen2vl_config(mrope_section=[1, 2, 3])


def test_qwen2_5_vl_family(tmp_path, examples):
    from transformers import AutoModelForImageTextToText

    path = write_tiny_model(tmp_path / "q25", family="qwen2_5_vl", num_layers=2, hidden_size=64, num_heads=2,
                            num_kv_heads=1, vision_depth=2, vision_embed_dim=32, vision_num_heads=2,
                            dtype="bfloat16")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = load_processor(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert json.loads((path / "config.json").read_text()).get("dtype") in ("bfloat16", None)
    _, inp = _inputs(processor, examples[:1])
    assert int((inp["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        gen = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inp["input_ids"].shape[1] + 3


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    kw = dict(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1, vision_depth=1, vision_embed_dim=32,
              vision_num_heads=2, corpus=["red green blue circle square"])
    a = load_file(write_tiny_model(tmp_path / "a", seed=3, **kw) / "model.safetensors")
    b = load_file(write_tiny_model(tmp_path / "b", seed=3, **kw) / "model.safetensors")
    c = load_file(write_tiny_model(tmp_path / "c", seed=4, **kw) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
