"""Tiny random-init Qwen2-VL checkpoints, built locally (no downloads), for tests and the CPU demo.

``write_tiny_model(path)`` writes a directory that loads offline with
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
(the latter needs torchvision in transformers 5.23; :func:`load_processor` loads the same processor
without it):

- ``config.json`` / ``model.safetensors`` / ``generation_config.json``: a
  ``Qwen2VLForConditionalGeneration`` (or ``Qwen2_5_VLForConditionalGeneration``) with a tiny config;
- ``tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE trained with the ``tokenizers``
  library on the synthetic task's text (Qwen2's own pre-tokenizer, so nothing is ever unknown and
  decoding is lossless), wrapped as ``Qwen2Tokenizer``;
- ``processor_config.json`` / ``chat_template.jinja``: a real ``Qwen2VLProcessor`` whose image
  processor has ``min_pixels = max_pixels = image_size**2``, so every square image becomes
  ``(image_size / 28)**2`` image tokens (224 -> 64), and the Qwen2-VL chat template.

The special tokens come first in the vocabulary, so their ids are the same for every corpus
(:data:`TINY_TOKEN_IDS`) and :func:`tiny_qwen2vl_config` (config only, for tests that build random
models directly) uses the same ids as any tokenizer written here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "TINY_SPECIAL_TOKENS",
    "TINY_TOKEN_IDS",
    "QWEN2_VL_CHAT_TEMPLATE",
    "tiny_qwen2vl_config",
    "build_tiny_tokenizer",
    "build_tiny_processor",
    "write_tiny_model",
    "load_processor",
]

from .processors import _has_torchvision, _processor_class, _video_stand_in, load_processor  # noqa: E402

#: Special tokens, in id order (ids 0..12 in every tiny tokenizer).
TINY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    # Coconut / IVT-LR latent markers
    "<|start-latent|>",
    "<|end-latent|>",
    "<|latent|>",
    # Mirage latent markers
    "<|latent_start|>",
    "<|latent_end|>",
    "<|latent_pad|>",
)
TINY_TOKEN_IDS: dict[str, int] = {t: i for i, t in enumerate(TINY_SPECIAL_TOKENS)}
_IVTLR_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")

# Qwen2-VL-Instruct's chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT_VOCAB_SIZE = 1024  # cap for the BPE (the synthetic corpus needs ~540); also the config default


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's [16, 24, 24] (for head_dim 128) scaled to ``head_dim``: sums to head_dim // 2."""
    half = head_dim // 2
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_qwen2vl_config(family: str = "qwen2_vl", **overrides: Any):
    """A tiny ``Qwen2VLConfig`` (or ``Qwen2_5_VLConfig`` for ``family="qwen2_5_vl"``).

    Defaults: text hidden 128, 4 layers, 4 heads (head_dim 32), 2 KV heads, MLP 512, vocab 1024,
    mrope_section [4, 6, 6]; vision depth 2, embed 64, 4 heads, patch 14, merge 2; special-token ids
    from :data:`TINY_TOKEN_IDS`. Flat overrides: ``hidden_size, num_layers (num_hidden_layers),
    num_heads (num_attention_heads), num_kv_heads (num_key_value_heads), intermediate_size,
    vocab_size, head_dim, mrope_section, rope_theta, max_position_embeddings, rms_norm_eps,
    initializer_range`` (text, vision and top level), ``vision_depth, vision_embed_dim,
    vision_num_heads, vision_intermediate_size (qwen2_5_vl), tie_word_embeddings, dtype,
    attn_implementation``, any token id (``image_token_id`` ...), and ``text_config`` /
    ``vision_config`` dicts merged last.
    """
    o = dict(overrides)
    hidden = int(o.pop("hidden_size", 128))
    layers = int(o.pop("num_layers", o.pop("num_hidden_layers", 4)))
    heads = int(o.pop("num_heads", o.pop("num_attention_heads", 4)))
    kv_heads = int(o.pop("num_kv_heads", o.pop("num_key_value_heads", 2)))
    for name, v in (("hidden_size", hidden), ("num_layers", layers), ("num_heads", heads), ("num_kv_heads", kv_heads)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden_size {hidden} / heads {heads} / kv heads {kv_heads} do not divide")
    head_dim = hidden // heads
    if "head_dim" in o and int(o.pop("head_dim")) != head_dim:
        raise ValueError("Qwen2-VL uses head_dim = hidden_size // num_heads")
    init = float(o.pop("initializer_range", 0.02))
    ids = {**TINY_TOKEN_IDS}
    text = dict(
        vocab_size=int(o.pop("vocab_size", _DEFAULT_VOCAB_SIZE)),
        hidden_size=hidden,
        intermediate_size=int(o.pop("intermediate_size", 4 * hidden)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(o.pop("max_position_embeddings", 4096)),
        rms_norm_eps=float(o.pop("rms_norm_eps", 1e-6)),
        initializer_range=init,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(o.pop("rope_theta", 10000.0)),
            "mrope_section": list(o.pop("mrope_section", _mrope_section(head_dim))),
        },
        bos_token_id=int(o.pop("bos_token_id", ids["<|endoftext|>"])),
        eos_token_id=int(o.pop("eos_token_id", ids["<|im_end|>"])),
        pad_token_id=int(o.pop("pad_token_id", ids["<|endoftext|>"])),
        use_cache=True,
    )
    if sum(text["rope_parameters"]["mrope_section"]) != head_dim // 2:
        raise ValueError(f"mrope_section must sum to head_dim // 2 = {head_dim // 2}")
    v_embed = int(o.pop("vision_embed_dim", 64))
    v_heads = int(o.pop("vision_num_heads", 4))
    v_depth = int(o.pop("vision_depth", 2))
    v_inter = int(o.pop("vision_intermediate_size", 2 * v_embed))
    for name, v in (("vision_embed_dim", v_embed), ("vision_num_heads", v_heads), ("vision_depth", v_depth),
                    ("vision_intermediate_size", v_inter)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if v_embed % v_heads:
        raise ValueError(f"vision_embed_dim {v_embed} is not a multiple of vision_num_heads {v_heads}")
    common_v = dict(depth=v_depth, num_heads=v_heads, in_channels=3, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, initializer_range=init)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as cfg_cls

        vision = dict(embed_dim=v_embed, hidden_size=hidden, mlp_ratio=4, hidden_act="quick_gelu", **common_v)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as cfg_cls

        vision = dict(hidden_size=v_embed, out_hidden_size=hidden, intermediate_size=v_inter, hidden_act="silu",
                      window_size=112, fullatt_block_indexes=[v_depth - 1], tokens_per_second=2, **common_v)
    else:
        raise ValueError(f"family must be 'qwen2_vl' or 'qwen2_5_vl', got {family!r}")
    text.update(o.pop("text_config", {}) or {})
    vision.update(o.pop("vision_config", {}) or {})
    top = dict(
        image_token_id=int(o.pop("image_token_id", ids["<|image_pad|>"])),
        video_token_id=int(o.pop("video_token_id", ids["<|video_pad|>"])),
        vision_start_token_id=int(o.pop("vision_start_token_id", ids["<|vision_start|>"])),
        vision_end_token_id=int(o.pop("vision_end_token_id", ids["<|vision_end|>"])),
        tie_word_embeddings=bool(o.pop("tie_word_embeddings", False)),
    )
    attn = o.pop("attn_implementation", None)
    dtype = o.pop("dtype", None)
    if o:
        raise TypeError(f"unknown tiny config overrides: {sorted(o)}")
    cfg = cfg_cls(text_config=text, vision_config=vision, **top)
    cfg.initializer_range = init
    # Mirror the token ids at the top level too (generate() and older code read them there).
    cfg.bos_token_id, cfg.eos_token_id = text["bos_token_id"], text["eos_token_id"]
    cfg.pad_token_id = text["pad_token_id"]
    if dtype is not None:
        cfg.dtype = _dtype_name(dtype)
        cfg.text_config.dtype = cfg.dtype
    if attn is not None:
        cfg._attn_implementation = attn
    return cfg


def _dtype_name(dtype) -> str:
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"bad dtype {dtype!r}")
    return str(dtype).removeprefix("torch.")


def _default_corpus() -> list[str]:
    from lvr_engine.data.synthetic import task_corpus  # lazy: models does not depend on data otherwise

    return task_corpus()


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = _DEFAULT_VOCAB_SIZE,
                         latent_tokens: bool = True):
    """A ``Qwen2Tokenizer``: byte-level BPE (Qwen2's pre-tokenizer) trained on ``corpus`` (default: the
    synthetic task's text), vocabulary capped at ``vocab_size``, with :data:`TINY_SPECIAL_TOKENS` as
    ids 0..12 (special, never split). Deterministic for a given corpus.

    ``latent_tokens=False`` leaves out the three IVT-LR / Coconut tokens (``<|start-latent|>``,
    ``<|end-latent|>``, ``<|latent|>``), as in a released Qwen2-VL tokenizer: the Qwen2-VL tokens keep
    ids 0..6 and the Mirage tokens take ids 7..9."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    specials = [t for t in TINY_SPECIAL_TOKENS if latent_tokens or t not in _IVTLR_TOKENS]
    ids = {t: i for i, t in enumerate(specials)}
    texts = list(_default_corpus() if corpus is None else corpus)
    # chat scaffolding always in the corpus so role words / newlines merge the same way
    texts += ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n", "\n\n"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=1, show_progress=False,
        special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    for t, i in ids.items():
        if vocab.get(t) != i:
            raise RuntimeError(f"special token {t} got id {vocab.get(t)}, expected {i}")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        errors="replace", clean_up_tokenization_spaces=False, model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    for t, i in ids.items():
        got = tokenizer.convert_tokens_to_ids(t)
        if got != i:
            raise RuntimeError(f"special token {t} has id {got}, expected {i}")
    return tokenizer


def build_tiny_processor(tokenizer=None, *, family: str = "qwen2_vl", image_size: int = 224):
    """A ``Qwen2VLProcessor`` (``Qwen2_5_VLProcessor`` for qwen2_5_vl) around ``tokenizer`` (default:
    :func:`build_tiny_tokenizer`), with min_pixels = max_pixels = image_size**2 (must be a multiple
    of 28): every square image -> (image_size / 28)**2 image tokens.

    Without torchvision the image processor is the PIL backend and the video processor a stand-in
    (see :func:`load_processor`)."""
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {image_size}")
    proc_cls = _processor_class(family)
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    px = image_size * image_size
    kw = dict(min_pixels=px, max_pixels=px, patch_size=14, temporal_patch_size=2, merge_size=2)
    if _has_torchvision():
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image_processor, video_processor = Qwen2VLImageProcessor(**kw), Qwen2VLVideoProcessor(**kw)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor, video_processor = Qwen2VLImageProcessorPil(**kw), _video_stand_in()
    return proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                    chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _fix_saved_video_processor(path: Path, image_size: int) -> None:
    """Record the real Qwen2-VL video processor in processor_config.json in place of the stand-in,
    so the checkpoint loads with plain AutoProcessor wherever torchvision is installed."""
    f = path / "processor_config.json"
    if not f.exists():
        return
    cfg = json.loads(f.read_text())
    vp = cfg.get("video_processor")
    if isinstance(vp, dict) and vp.get("video_processor_type") == "VideoProcessorMixin":
        px = image_size * image_size
        cfg["video_processor"] = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "size": {"shortest_edge": px, "longest_edge": px},
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 1 / 255, "resample": 3,
        }
        f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_tiny_model(
    path: str | os.PathLike,
    *,
    family: str = "qwen2_vl",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_embed_dim: int = 64,
    vision_num_heads: int = 4,
    corpus: Iterable[str] | None = None,
    vocab_size: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    dtype: Any = "float32",
    initializer_range: float = 0.02,
    latent_tokens: bool = True,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random-init Qwen2-VL checkpoint + tokenizer + processor to ``path``; return it.

    The tokenizer is trained on ``corpus`` (default: the synthetic task's text); the config's
    ``vocab_size`` is the tokenizer's length unless given (it must not be smaller). Weights are drawn
    with ``torch.manual_seed(seed)`` inside a forked RNG (the caller's RNG state is untouched), so the
    same arguments write the same checkpoint. ``latent_tokens=False``: a tokenizer without the IVT-LR tokens
    (:func:`build_tiny_tokenizer`), like a released Qwen2-VL base. Extra keyword arguments go to
    :func:`tiny_qwen2vl_config`.
    """
    import torch
    from transformers import GenerationConfig

    path = Path(path)
    if image_size < 28 or image_size % 28:  # checked by the processor too, but before anything is written
        raise ValueError(f"image_size must be a positive multiple of 28 (patch 14 x merge 2), got {image_size}")
    tokenizer = build_tiny_tokenizer(corpus, latent_tokens=latent_tokens)
    n_tok = len(tokenizer)
    vocab = n_tok if vocab_size is None else int(vocab_size)
    if vocab < n_tok:
        raise ValueError(f"vocab_size {vocab} < tokenizer size {n_tok}")
    cfg = tiny_qwen2vl_config(
        family, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, vision_depth=vision_depth,
        vision_embed_dim=vision_embed_dim, vision_num_heads=vision_num_heads, vocab_size=vocab,
        initializer_range=initializer_range, dtype=dtype, **config_overrides,
    )
    if family == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration as model_cls
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as model_cls
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    model = model.to(getattr(torch, _dtype_name(dtype))).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=TINY_TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[TINY_TOKEN_IDS["<|im_end|>"], TINY_TOKEN_IDS["<|endoftext|>"]],
        pad_token_id=TINY_TOKEN_IDS["<|endoftext|>"],
        do_sample=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor = build_tiny_processor(tokenizer, family=family, image_size=image_size)
    processor.save_pretrained(path)
    _fix_saved_video_processor(path, image_size)
    return path
