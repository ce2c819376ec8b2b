"""``lvr convert ivtlr --family chameleon``: an official-format IVT-LR Chameleon ``model.pth`` built here -> a converted
checkpoint directory (issue #16, acceptance 1, second half).

The checkpoint is made the way the official Chameleon code makes it (``chameleon/infer_chameleon_scienceqa.py`` and
``chameleon_run_sqa.py``): a tiny Chameleon base (VQ-VAE included) whose tokenizer lacks the latent tokens, the
three tokens added (start, end, latent) and the embeddings resized to the tokenizer, a peft LoRA (r != alpha, B
randomised so the merge matters) on the seven projections, the state dict of a wrapper holding it as
``base_causallm`` plus its own ``embedding``, without a ``module.`` prefix, ``torch.save``d. The converted model
must decode as the official inference run on the peft model itself (the wrapper's tokens and selections), and a
bad input must be a clear error that leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from lvr_engine.cli import main
from lvr_engine.engine.config import LatentConfig
from lvr_engine.models.tiny_chameleon import write_tiny_chameleon
from official_ivtlr_chameleon import official_chameleon_generate

peft = pytest.importorskip("peft")

LORA_R, LORA_ALPHA = 4, 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LATENT_TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]
# 64x64 images -> 16x16 = 256 image tokens: room for the official 3 steps of K = 64
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, image_size=64, latent_tokens=False,
            initializer_range=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny base, the official wrapper's peft model built on it, and its ``model.pth``."""
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    root = tmp_path_factory.mktemp("ivtlr-chameleon")
    base = write_tiny_chameleon(root / "base", seed=3, **TINY)
    processor = AutoProcessor.from_pretrained(base)
    tok = processor.tokenizer
    base_len = len(tok)
    tok.add_special_tokens({"additional_special_tokens": LATENT_TOKENS})
    model = ChameleonForConditionalGeneration.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                                      target_modules=TARGETS, bias="none"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.eval()
    state = {"base_causallm." + k: v for k, v in lora.state_dict().items()}
    state["embedding.weight"] = lora.get_input_embeddings().weight  # the wrapper's reference to it
    pth = root / "model.pth"
    torch.save(state, pth)
    return SimpleNamespace(root=root, base=base, pth=pth, lora=lora, state=state, processor=processor,
                           base_len=base_len)


@pytest.fixture(scope="module")
def converted(official):
    out = official.root / "converted-fp32"
    assert main(["convert", "ivtlr", "--family", "chameleon", "--checkpoint", str(official.pth), "--base",
                 str(official.base), "--output", str(out), "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA),
                 "--dtype", "float32"]) == 0
    return out


def _image(seed: int, h=90, w=120):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def _examples():
    from lvr_engine.data.example import ReasoningExample

    return [ReasoningExample(id="q0", image=_image(0), question="Which square is red?", choices=["left", "right"],
                             answer="A", answer_index=0, steps=[]),
            ReasoningExample(id="q1", image=_image(1, 70, 64), question="What colour is the shape in the corner?",
                             choices=["red", "green", "blue"], answer="C", answer_index=2, steps=[])]


def test_the_checkpoint_has_the_official_keys(official):
    keys = set(official.state)
    for key in ["embedding.weight", "base_causallm.base_model.model.lm_head.weight",
                "base_causallm.base_model.model.model.embed_tokens.weight",
                "base_causallm.base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight",
                "base_causallm.base_model.model.model.layers.1.self_attn.k_norm.bias",
                "base_causallm.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight",
                "base_causallm.base_model.model.model.vqmodel.encoder.conv_in.weight",
                "base_causallm.base_model.model.model.vqmodel.quantize.embedding.weight"]:
        assert key in keys, key
    assert not any(k.startswith("module.") for k in keys)


def test_engine_decodes_the_converted_model_as_the_wrapper(official, converted):
    """Token for token and patch for patch, at the official sizes (3 steps of K = 64, the separator after them),
    against the official inference run on the peft model itself (unmerged LoRA, eager attention, fp32), one row
    at a time; the engine batches the two rows, left padded, from the converted directory alone."""
    from lvr_engine import LatentGenerator
    from lvr_engine.training.collate import encode_prompts

    gen = LatentGenerator.from_pretrained(converted)
    assert gen.config.num_selected_patches == 64 and gen.config.num_latent_steps == 3
    tok = gen.processor.tokenizer
    prompt = encode_prompts(_examples(), gen.processor, template="ivtlr_chameleon", latent_steps=3)
    out = gen.generate(**prompt.model_inputs(), max_new_tokens=10)
    for b in range(2):
        ids = prompt.input_ids[b][prompt.attention_mask[b].bool()]
        assert ids[-1] == tok.convert_tokens_to_ids("<reserved08706>")
        want = official_chameleon_generate(
            official.lora, ids, prompt.pixel_values[b:b + 1], latent_token_id=tok.convert_tokens_to_ids("<|latent|>"),
            image_token_id=tok.convert_tokens_to_ids("<image>"), num_selected_patches=64,
            eos_token_id=tok.eos_token_id, max_new_tokens=10)
        assert out.selected[b].tolist() == want.selected, f"row {b}"
        assert out.sequences[b, :len(want.tokens)].tolist() == want.tokens, f"row {b}"
    # and the LoRA matters: the base alone decodes otherwise
    with official.lora.disable_adapter():
        ids = prompt.input_ids[0][prompt.attention_mask[0].bool()]
        plain = official_chameleon_generate(
            official.lora, ids, prompt.pixel_values[:1], latent_token_id=tok.convert_tokens_to_ids("<|latent|>"),
            image_token_id=tok.convert_tokens_to_ids("<image>"), num_selected_patches=64, max_new_tokens=10)
    assert plain.tokens != out.sequences[0, :10].tolist() or plain.selected != out.selected[0].tolist()


def test_converted_directory_holds_the_official_setup(official, converted):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(converted).tokenizer
    assert tok.convert_tokens_to_ids(LATENT_TOKENS) == [official.base_len + i for i in range(3)]
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "chameleon" and cfg["vocab_size"] == len(tok) == official.base_len + 3
    gen_cfg = json.loads((converted / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    meta = json.loads((converted / "lvr_config.json").read_text())
    assert meta["latent_config"] == dataclasses.asdict(LatentConfig.ivtlr_chameleon().resolve_tokens(tok))
    assert meta["latent_config"]["end_marker_id"] == tok.convert_tokens_to_ids("<reserved08706>")
    assert meta["template"] == "ivtlr_chameleon" and meta["image_size"] is None
    assert meta["converted_from"]["family"] == "chameleon" and meta["converted_from"]["lora_r"] == LORA_R
    assert not [p.name for p in converted.parent.iterdir() if ".tmp-" in p.name]


def _convert_error(capsys, official, out, pth=None, base=None, family="chameleon", extra=()):
    rc = main(["convert", "ivtlr", "--family", family, "--checkpoint", str(pth or official.pth), "--base",
               str(base or official.base), "--output", str(out), "--lora-r", str(LORA_R), "--lora-alpha",
               str(LORA_ALPHA), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "lvr convert: error: " in err, err
    assert not out.exists(), "a failed conversion left its output directory"
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name], "a failed conversion left a temp dir"
    return err


def test_wrong_family_says_which(official, tmp_path, capsys):
    err = _convert_error(capsys, official, tmp_path / "out", family="qwen2_vl")
    assert "is a 'chameleon' model, not Qwen2-VL" in err and "--family chameleon" in err


def test_missing_unexpected_and_misshapen_keys(official, tmp_path, capsys):
    state = dict(official.state)
    dropped = "base_causallm.base_model.model.model.vqmodel.quant_conv.weight"
    del state[dropped]
    state["base_causallm.base_model.model.model.layers.0.self_attn.q_norm.extra"] = torch.zeros(2)
    f = tmp_path / "keys.pth"
    torch.save(state, f)
    err = _convert_error(capsys, official, tmp_path / "out", pth=f)
    assert "missing keys (1):" in err and dropped in err and "q_norm.extra" in err
    assert "transformers 4.51 Chameleon keys" in err
    err = _convert_error(capsys, official, tmp_path / "out", extra=["--lora-r", "8"])
    assert ("model.layers.0.self_attn.q_proj.lora_A.default.weight -> model.layers.0.self_attn.q_proj.weight: "
            "checkpoint (4, 64), base (--lora-r 8) (8, 64)") in err


def test_base_tokenizer_must_match(official, tmp_path, capsys):
    other = write_tiny_chameleon(tmp_path / "other", seed=3, corpus=["just a few words"], **TINY)
    err = _convert_error(capsys, official, tmp_path / "out", base=other)
    assert f"but the checkpoint's embedding has {official.base_len + 3} rows" in err


def test_a_failure_while_writing_leaves_nothing(official, tmp_path, monkeypatch):
    import lvr_engine.models.convert_ivtlr as conv

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "save_processor", fail)
    out = tmp_path / "new" / "out"
    with pytest.raises(OSError, match="disk full"):
        conv.convert_ivtlr(official.pth, official.base, out, lora_r=LORA_R, lora_alpha=LORA_ALPHA, family="chameleon")
    assert list(tmp_path.iterdir()) == []
