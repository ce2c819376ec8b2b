"""Tiny random-init Chameleon checkpoints (VQ-VAE included), built locally (no downloads), for tests and demos.

``write_tiny_chameleon(path)`` (``lvr tiny-model --family chameleon``) writes a directory that loads offline with
``ChameleonForConditionalGeneration.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``:

- ``config.json`` / ``model.safetensors`` / ``generation_config.json``: a ``ChameleonForConditionalGeneration``
  with a tiny decoder (q/k LayerNorms with random weights and biases, so they matter) and a tiny VQ-VAE
  (``vq_levels`` levels: images of ``image_size`` pixels become (image_size / 2^(levels-1))^2 image tokens,
  8x8 = 64 for the default 32 pixels and 3 levels); ``vocabulary_map`` is the tokenizer's vocabulary;
- ``tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE trained with the ``tokenizers`` library on the
  synthetic task's text, BOS added in front of every text as Chameleon's tokenizer does, with Chameleon's special
  tokens first (:data:`CHAMELEON_SPECIAL_TOKENS`: ``<s>`` ``<pad>`` ``</s>`` ``<unk>`` ``<image>`` ``<racm3:break>``
  ``<eoss>`` and the separator ``<reserved08706>``, ids 0..7), then one ``IMGIMG<code>Z`` token per VQ code (the
  names Chameleon's vocabulary gives its image tokens: the code's digits written as letters A-J), then, unless
  ``latent_tokens=False``, ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>`` added last as the official
  IVT-LR code adds them;
- ``processor_config.json``: a ``ChameleonProcessor`` (BOS, ``<racm3:break>``, the image tokens, ``<eoss>`` in place
  of each ``<image>``, and the separator after the text) whose image processor resizes and center-crops to
  ``image_size``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["CHAMELEON_SPECIAL_TOKENS", "CHAMELEON_TOKEN_IDS", "image_token_name", "build_tiny_chameleon_tokenizer",
           "build_tiny_chameleon_processor", "tiny_chameleon_config", "tiny_chameleon_model", "write_tiny_chameleon"]

#: Chameleon's special tokens, in id order (ids 0..7 in every tiny Chameleon tokenizer).
CHAMELEON_SPECIAL_TOKENS: tuple[str, ...] = (
    "<s>", "<pad>", "</s>", "<unk>", "<image>", "<racm3:break>", "<eoss>", "<reserved08706>",
)
CHAMELEON_TOKEN_IDS: dict[str, int] = {t: i for i, t in enumerate(CHAMELEON_SPECIAL_TOKENS)}
_LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
_BPE_SIZE = 512


def image_token_name(code: int) -> str:
    """The vocabulary name of VQ code ``code`` (Chameleon's ``IMGIMG<digits as letters A-J>Z``)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


def _default_corpus() -> list[str]:
    from lvr_engine.data.synthetic import task_corpus  # lazy: models does not depend on data otherwise

    return task_corpus() + ["[Question]:{Which is it?}\n[Options]:\n(A).{one}\n(B).{two}\nAnswer:",
                            "Therefore, the answer is 0", "Therefore, the answer is 1"]


def build_tiny_chameleon_tokenizer(corpus: Iterable[str] | None = None, *, num_image_codes: int = 256,
                                   bpe_size: int = _BPE_SIZE, latent_tokens: bool = True):
    """A fast tokenizer laid out as described in the module docstring; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    if num_image_codes < 1:
        raise ValueError(f"num_image_codes must be >= 1, got {num_image_codes}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(bpe_size), min_frequency=1, show_progress=False,
                                  special_tokens=list(CHAMELEON_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_default_corpus() if corpus is None else corpus), trainer=trainer)
    bos = CHAMELEON_TOKEN_IDS["<s>"]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", sep_token="<reserved08706>", clean_up_tokenization_spaces=False)
    t.add_tokens([AddedToken(image_token_name(c), special=False, normalized=False) for c in range(num_image_codes)])
    if latent_tokens:  # the official code: add_special_tokens({"additional_special_tokens": [start, end, latent]})
        t.add_special_tokens({"additional_special_tokens": list(_LATENT_TOKENS)})
    for name, i in CHAMELEON_TOKEN_IDS.items():
        if t.convert_tokens_to_ids(name) != i:
            raise RuntimeError(f"special token {name} got id {t.convert_tokens_to_ids(name)}, expected {i}")
    return t


def build_tiny_chameleon_processor(tokenizer=None, *, image_size: int = 32, vq_levels: int = 3):
    """A ``ChameleonProcessor`` around ``tokenizer`` (default: :func:`build_tiny_chameleon_tokenizer`) whose image
    processor (PIL backend: no torchvision needed) resizes the shorter side to ``image_size`` and center-crops
    a square: every image becomes (image_size / 2^(vq_levels-1))^2 image tokens."""
    from transformers import ChameleonProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    f = _downsample(vq_levels)
    if image_size < f or image_size % f:
        raise ValueError(f"image_size must be a positive multiple of {f} (the VQ-VAE's downsampling with "
                         f"{vq_levels} levels), got {image_size}")
    tokenizer = build_tiny_chameleon_tokenizer() if tokenizer is None else tokenizer
    ip = ChameleonImageProcessorPil(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
    return ChameleonProcessor(image_processor=ip, tokenizer=tokenizer, image_seq_length=(image_size // f) ** 2)


def _downsample(vq_levels: int) -> int:
    if isinstance(vq_levels, bool) or not isinstance(vq_levels, int) or vq_levels < 1:
        raise ValueError(f"vq_levels must be a positive int, got {vq_levels!r}")
    return 2 ** (vq_levels - 1)


def tiny_chameleon_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, intermediate_size: int | None = None, image_size: int = 32,
                          vq_levels: int = 3, vq_channels: int = 32, num_image_codes: int | None = None,
                          initializer_range: float = 0.02, vocab_size: int | None = None, swin_norm: bool = False,
                          max_position_embeddings: int = 4096):
    """A tiny ``ChameleonConfig`` for ``tokenizer`` (its vocabulary is the config's ``vocabulary_map``).
    ``vq_channels`` must be a multiple of 32 (the VQ-VAE's GroupNorms have 32 groups)."""
    from transformers import ChameleonConfig

    for name, v in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                    ("num_kv_heads", num_kv_heads), ("vq_channels", vq_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size {hidden_size} / heads {num_heads} / kv heads {num_kv_heads} do not divide "
                         "(and the head size must be even)")
    if vq_channels % 32:
        raise ValueError(f"vq_channels must be a multiple of 32 (GroupNorm with 32 groups), got {vq_channels}")
    vocab_map = tokenizer.get_vocab()
    codes = sum(1 for name in vocab_map if name.startswith("IMGIMG")) if num_image_codes is None else num_image_codes
    if codes < 1:
        raise ValueError("the tokenizer has no IMGIMG...Z image tokens (build it with build_tiny_chameleon_tokenizer)")
    vq = dict(embed_dim=vq_channels, num_embeddings=codes, double_latent=False, latent_channels=vq_channels,
              resolution=image_size, in_channels=3, base_channels=vq_channels,
              channel_multiplier=[1] * vq_levels, num_res_blocks=1, attn_resolutions=None, dropout=0.0,
              initializer_range=initializer_range)
    _downsample(vq_levels)
    vocab = len(tokenizer) if vocab_size is None else int(vocab_size)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} < tokenizer size {len(tokenizer)}")
    ids = CHAMELEON_TOKEN_IDS
    return ChameleonConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range, vq_config=vq,
        vocabulary_map=vocab_map, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        image_token_id=ids["<image>"], swin_norm=swin_norm, tie_word_embeddings=False)


def tiny_chameleon_model(config, seed: int = 0, dtype: Any = "float32", attn_implementation: str | None = None):
    """A random ``ChameleonForConditionalGeneration`` of ``config`` (eval mode), drawn with ``torch.manual_seed(seed)``
    inside a forked RNG; the q/k LayerNorm weights are drawn around 1 and their biases around 0 (not left at the
    identity), so the layers' query/key normalisation is exercised."""
    import torch
    from transformers import ChameleonForConditionalGeneration, GenerationConfig

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = ChameleonForConditionalGeneration._from_config(config, dtype=torch.float32, **kw)
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
                    norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
    model = model.to(dt).eval()
    ids = CHAMELEON_TOKEN_IDS
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                               pad_token_id=ids["<pad>"], do_sample=False)
    return model


def write_tiny_chameleon(path: str | os.PathLike, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                         num_kv_heads: int = 2, intermediate_size: int | None = None, image_size: int = 32,
                         vq_levels: int = 3, vq_channels: int = 32, num_image_codes: int = 256,
                         corpus: Iterable[str] | None = None, seed: int = 0, dtype: Any = "float32",
                         initializer_range: float = 0.02, latent_tokens: bool = True) -> Path:
    """Write a tiny random-init Chameleon checkpoint + tokenizer + processor to ``path``; return it. Sizes are
    checked (ValueError) before anything is written; the same arguments write the same checkpoint."""
    path = Path(path)
    f = _downsample(vq_levels)
    if image_size < f or image_size % f:
        raise ValueError(f"image_size must be a positive multiple of {f} (the VQ-VAE's downsampling with "
                         f"{vq_levels} levels), got {image_size}")
    tokenizer = build_tiny_chameleon_tokenizer(corpus, num_image_codes=num_image_codes, latent_tokens=latent_tokens)
    cfg = tiny_chameleon_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                                image_size=image_size, vq_levels=vq_levels, vq_channels=vq_channels,
                                initializer_range=initializer_range)
    model = tiny_chameleon_model(cfg, seed=seed, dtype=dtype)
    processor = build_tiny_chameleon_processor(tokenizer, image_size=image_size, vq_levels=vq_levels)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
