"""Convert a released IVT-LR ``model.pth`` into a checkpoint directory the engine loads (``lvr convert ivtlr``).

The official IVT-LR code (FYYDCC/IVT-LR, ``qwen_vl/``) wraps a peft LoRA model of Qwen2-VL (r=64, alpha=16 on
the decoder's q/k/v/o/gate/up/down projections, embeddings resized after adding ``<|start-latent|>``,
``<|end-latent|>``, ``<|latent|>``) in its ``IVTLR`` module and releases ``torch.save(wrapper.state_dict())``.
Its keys, after an optional ``module.`` (DDP / DeepSpeed) prefix:

    embedding.weight                          the wrapper's own reference to the resized token embedding
    base_causallm.base_model.model.<key>      the peft model; <key> in transformers 4.51's Qwen2-VL layout:
        model.embed_tokens.weight, model.layers.N.*, model.norm.weight   the decoder
        visual.*                                                           the vision tower
        lm_head.weight
    and for each LoRA target of each decoder layer (e.g. model.layers.N.self_attn.q_proj):
        <module>.base_layer.weight / .bias    the frozen linear layer
        <module>.lora_A.default.weight        (r, in_features)
        <module>.lora_B.default.weight        (out_features, r)

Key mapping to the installed transformers (5.x), whose ``Qwen2VLForConditionalGeneration`` nests the decoder as
``model.language_model`` and the tower as ``model.visual`` — the renames of transformers' own checkpoint
conversion mapping for this class (``^visual`` -> ``model.visual``, ``^model`` -> ``model.language_model``):

    model.<rest>     -> model.language_model.<rest>
    visual.<rest>    -> model.visual.<rest>
    lm_head.weight   -> lm_head.weight

The Chameleon release (``family="chameleon"``, FYYDCC/IVT-LR ``chameleon/``) is the same wrapper around a peft LoRA
(r=64, alpha=16, the same seven projections) of ``ChameleonForConditionalGeneration`` (Chameleon-7B), saved without
the ``module.`` prefix, the three tokens added in the same order and the embeddings resized. Its transformers 4.51
key layout is the installed one (``model.embed_tokens``, ``model.layers.N.*`` with their ``q_norm``/``k_norm``,
``model.norm``, ``model.vqmodel.*`` the VQ-VAE, ``lm_head``): no renames. It converts to
``LatentConfig.ivtlr_chameleon()`` (the official Chameleon inference: K=64, the processor's separator fed after the
latent steps) with template ``ivtlr_chameleon`` (``infer_chameleon_scienceqa.py``'s prompt; images as the processor
resizes them, 512x512).

The LoRA is merged as ``W = W_base + (alpha / r) * B @ A``, computed in fp32 and rounded once to ``dtype`` (the
official inference runs the unmerged adapter in bf16, so a bf16 conversion can differ from it in the last bit of
some activations; in fp32 the two agree to rounding). Only the base's config, tokenizer and processor are read:
every weight comes from ``model.pth``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .loading import LVR_CONFIG
from .processors import load_processor, save_processor

__all__ = ["convert_ivtlr", "read_state_dict", "legacy_key", "IVTLR_SPECIAL_TOKENS", "LORA_TARGETS",
           "PEFT_PREFIX", "WRAPPER_EMBEDDING", "DTYPES", "FAMILIES"]

IVTLR_SPECIAL_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
"""The tokens the official code adds to the Qwen2-VL tokenizer, in this order, as additional special tokens."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""peft's ``target_modules`` in the official code: every linear layer whose name ends with one of these."""
PEFT_PREFIX = "base_causallm.base_model.model."
WRAPPER_EMBEDDING = "embedding.weight"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FAMILIES = ("qwen2_vl", "chameleon")
"""The backbones of the official releases: ``model_type`` of the base each converts on top of."""
_BASE_NAMES = {"qwen2_vl": "Qwen2-VL-7B-Instruct", "chameleon": "Chameleon-7B"}
_KEY_LAYOUTS = {"qwen2_vl": "transformers 4.51 Qwen2-VL keys", "chameleon": "transformers 4.51 Chameleon keys"}
_SHOWN = 20  # names listed in an error before "... and N more"


def legacy_key(key: str, family: str = "qwen2_vl") -> str:
    """The transformers 4.51 name of installed parameter ``key`` (inverse of the module docstring's mapping). Qwen2-VL:
    ``model.language_model.X`` -> ``model.X``, ``model.visual.X`` -> ``visual.X``, others unchanged; Chameleon:
    unchanged (4.51 and the installed transformers lay it out alike)."""
    if family == "chameleon":
        return key
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def _listing(names, what: str) -> str:
    names = sorted(names)
    shown = "\n  ".join(names[:_SHOWN])
    more = f"\n  ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{what} ({len(names)}):\n  {shown}{more}"


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` saved with ``torch.save`` at ``path``, read with ``weights_only=True`` (no pickled
    code runs) and memory-mapped where the file format allows. ``FileNotFoundError`` when there is no file;
    ``ValueError`` naming the file when it cannot be read that way or is not a flat mapping of names to tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected the official IVT-LR model.pth)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) torch.save format
    except Exception as e:  # unpickling refused, not a torch file, truncated: the same user-facing problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} is not a state dict readable with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {first}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} is not a state dict: torch.load gives a {type(obj).__name__}, "
                         "expected a mapping of parameter names to tensors")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state dict: " + _listing(bad, "entries that are not name -> tensor"))
    if not obj:
        raise ValueError(f"{path} is an empty state dict")
    return dict(obj)


def _strip_module(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix that DDP / DeepSpeed wrappers add (the official loader drops it)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        name = k.removeprefix("module.")
        if name in out:
            raise ValueError(f"{path} holds {name!r} both with and without the 'module.' prefix")
        out[name] = v
    return out


def _base_config(base: Path, family: str = "qwen2_vl"):
    """The base's config; ValueError unless it is a checkpoint of ``family`` (its ``model_type``)."""
    cfg_file = base / "config.json"
    want = _BASE_NAMES[family]
    if not base.is_dir():
        raise FileNotFoundError(f"base checkpoint directory {base} does not exist")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"base {base} has no config.json (expected a local {want} copy)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"base {cfg_file} is not a valid config.json: {e}") from e
    if model_type != family:
        name = {"qwen2_vl": "Qwen2-VL", "chameleon": "Chameleon"}[family]
        raise ValueError(f"base {base} is a {model_type!r} model, not {name} (model_type {family!r}): the "
                         f"released IVT-LR {name} checkpoints are LoRA fine-tunes of {want}"
                         + ("; pass --family chameleon for the Chameleon release" if model_type == "chameleon" else "")
                         + ("; pass --family qwen2_vl for the Qwen2-VL release" if model_type == "qwen2_vl" else ""))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base)


def _empty_model(config, vocab: int, family: str = "qwen2_vl"):
    """``Qwen2VLForConditionalGeneration`` (or ``ChameleonForConditionalGeneration``) of ``config`` with ``vocab``
    token rows, parameters on the meta device (shapes only; the converted tensors are assigned later)."""
    import transformers

    cls = getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                 "chameleon": "ChameleonForConditionalGeneration"}[family])
    config.get_text_config().vocab_size = vocab
    with torch.device("meta"):
        return cls(config)


def _expected(model, family: str = "qwen2_vl") -> dict[str, tuple[str, str]]:
    """``{official key: (installed parameter, role)}`` for every tensor the official state dict must hold; role
    is ``"weight"`` (copied), ``"base"`` (a LoRA target's frozen weight / bias), ``"lora_A"`` or ``"lora_B"``."""
    lora_modules = {name for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS}
    out: dict[str, tuple[str, str]] = {}
    for name in model.state_dict():
        module, _, param = name.rpartition(".")
        if module in lora_modules:
            stem = PEFT_PREFIX + legacy_key(module, family)
            out[f"{stem}.base_layer.{param}"] = (name, "base")
            if param == "weight":
                out[f"{stem}.lora_A.default.weight"] = (name, "lora_A")
                out[f"{stem}.lora_B.default.weight"] = (name, "lora_B")
        else:
            out[PEFT_PREFIX + legacy_key(name, family)] = (name, "weight")
    out[WRAPPER_EMBEDDING] = (_embed_key(family), "weight")
    return out


def _embed_key(family: str) -> str:
    """The installed name of the decoder's token embedding."""
    return "model.embed_tokens.weight" if family == "chameleon" else "model.language_model.embed_tokens.weight"


def _check_keys(expected: Mapping[str, tuple[str, str]], state: Mapping[str, torch.Tensor], path: Path,
                base: Path, family: str = "qwen2_vl") -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [_listing(missing, "missing keys")] if missing else []
        parts += [_listing(unexpected, "unexpected keys")] if unexpected else []
        raise ValueError(f"{path} does not match the official IVT-LR layout for base {base} (peft LoRA on "
                         f"{', '.join(LORA_TARGETS)}, {_KEY_LAYOUTS[family]}):\n" + "\n".join(parts))


def _check_shapes(expected: Mapping[str, tuple[str, str]], state: Mapping[str, torch.Tensor], model, r: int,
                  path: Path, base: Path) -> None:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = []
    for key, (name, role) in expected.items():
        want = shapes[name]
        if role == "lora_A":
            want = (r, want[1])
        elif role == "lora_B":
            want = (want[0], r)
        got = tuple(state[key].shape)
        if got != want:
            lora = f" (--lora-r {r})" if role.startswith("lora") else ""
            bad.append(f"{key} -> {name}: checkpoint {got}, base{lora} {want}")
    if bad:
        raise ValueError(f"{path} does not fit base {base}: " + _listing(bad, "tensors whose shapes differ"))


def _check_copies(state: Mapping[str, torch.Tensor], tied: bool, path: Path) -> None:
    """The wrapper's ``embedding.weight`` (and, in a tied base, ``lm_head``) must equal the decoder's embedding."""
    embed = state[PEFT_PREFIX + "model.embed_tokens.weight"]
    others = [WRAPPER_EMBEDDING] + ([PEFT_PREFIX + "lm_head.weight"] if tied else [])
    for key in others:
        if not torch.equal(state[key], embed):
            why = "the official wrapper saves the same tensor twice" if key == WRAPPER_EMBEDDING else \
                "the base ties its LM head to the embedding"
            raise ValueError(f"{path}: {key} differs from {PEFT_PREFIX}model.embed_tokens.weight ({why})")


def _add_latent_tokens(processor, vocab: int, base: Path):
    """Add :data:`IVTLR_SPECIAL_TOKENS` to the processor's tokenizer as the official code does; ValueError unless
    the result has exactly ``vocab`` tokens (the checkpoint's embedding rows) and an EOS token."""
    tok = getattr(processor, "tokenizer", None)
    if tok is None:
        raise ValueError(f"base {base} has no tokenizer in its processor")
    before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": list(IVTLR_SPECIAL_TOKENS)})
    if len(tok) != vocab:
        raise ValueError(f"the base tokenizer ({base}) has {before} tokens, {len(tok)} with {IVTLR_SPECIAL_TOKENS}, "
                         f"but the checkpoint's embedding has {vocab} rows: it was not trained from this base")
    if tok.eos_token_id is None:
        raise ValueError(f"the base tokenizer ({base}) has no EOS token (the official loop stops at it)")
    return tok


def _merged(expected: Mapping[str, tuple[str, str]], state: Mapping[str, torch.Tensor], r: int, alpha: float,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Installed-layout tensors in ``dtype``: copies, and LoRA targets ``W + (alpha / r) * B @ A`` in fp32."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, (name, role) in expected.items():
        if key == WRAPPER_EMBEDDING:
            continue
        if role == "weight" or (role == "base" and key.endswith(".bias")):
            out[name] = state[key].to(dtype).contiguous()
        else:
            lora.setdefault(name, {})[role] = state[key]
    scale = alpha / r
    for name, parts in lora.items():
        w = parts["base"].float() + scale * (parts["lora_B"].float() @ parts["lora_A"].float())
        out[name] = w.to(dtype).contiguous()
    return out


def _generation_config(tok, config):
    from transformers import GenerationConfig

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bos = getattr(config.get_text_config(), "bos_token_id", None)
    return GenerationConfig(bos_token_id=bos, eos_token_id=tok.eos_token_id, pad_token_id=pad, do_sample=False)


def _lvr_meta(tok, checkpoint: Path, base: Path, r: int, alpha: float, dtype: str,
              family: str = "qwen2_vl") -> dict:
    # engine and data sit above models; imported here only to write the official setup the engine will read
    from ..data.prompts import IVTLR_IMAGE_SIZE
    from ..engine.config import LatentConfig

    if family == "chameleon":  # its separator must be a token of the base: resolve_tokens says so otherwise
        latent, template, size = LatentConfig.ivtlr_chameleon().resolve_tokens(tok), "ivtlr_chameleon", None
    else:
        latent, template, size = LatentConfig.ivtlr().resolve_tokens(tok), "ivtlr_infer", IVTLR_IMAGE_SIZE
    return {"latent_config": dataclasses.asdict(latent), "objective": "ivtlr", "eval_mode": "latent",
            "template": template, "image_size": size,
            "converted_from": {"format": "ivtlr", "family": family, "checkpoint": str(checkpoint.resolve()),
                               "base": str(base.resolve()), "lora_r": r, "lora_alpha": alpha, "dtype": dtype}}


def _check_args(lora_r, lora_alpha, dtype, family="qwen2_vl") -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1:
        raise ValueError(f"lora_r must be a positive int, got {lora_r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def convert_ivtlr(checkpoint, base, output, *, lora_r: int = 64, lora_alpha: float = 16, dtype: str = "bfloat16",
                  family: str = "qwen2_vl", log: Callable[[str], None] | None = None) -> Path:
    """Convert the official IVT-LR ``checkpoint`` (``model.pth``) on top of ``base`` (a local checkpoint directory
    of ``family``: config, tokenizer, processor; Qwen2-VL-7B-Instruct, or Chameleon-7B for ``family="chameleon"``)
    into ``output``.

    ``output`` gets: the merged model as safetensors (``save_pretrained``; vocabulary resized to the checkpoint's
    embedding rows), the processor with the three latent tokens added, a ``generation_config.json`` whose EOS is
    the tokenizer's EOS alone (the official loop stops there, greedy), and ``lvr_config.json`` holding
    ``LatentConfig.ivtlr()`` (the official inference setup), template ``ivtlr_infer`` and image size 280 — for
    Chameleon ``LatentConfig.ivtlr_chameleon()`` and template ``ivtlr_chameleon`` (the processor's own image size).

    Everything is checked before anything is written: ``FileExistsError`` when ``output`` exists,
    ``FileNotFoundError`` for a missing checkpoint or base, ``ValueError`` for a file that is not a state dict, a
    base that is not of ``family``, missing or unexpected keys (listed), a tensor whose shape does not fit the base
    (named, both shapes), a tokenizer whose size does not match the checkpoint's vocabulary (or, for Chameleon,
    that lacks the separator). The result is written into a temporary directory beside ``output`` and renamed at
    the end; on any error nothing is left. ``log(message)`` receives progress lines. Returns ``output``.
    """
    _check_args(lora_r, lora_alpha, dtype, family)
    say = log or (lambda msg: None)
    checkpoint, base, output = Path(checkpoint), Path(base), Path(output)
    if output.exists():
        raise FileExistsError(f"output {output} already exists; choose a new directory")
    config = _base_config(base, family)
    processor = load_processor(base)
    say(f"reading {checkpoint}")
    state = _strip_module(read_state_dict(checkpoint), checkpoint)
    embed = state.get(PEFT_PREFIX + "model.embed_tokens.weight")
    vocab = embed.shape[0] if embed is not None and embed.dim() == 2 else config.get_text_config().vocab_size
    model = _empty_model(config, vocab, family)
    expected = _expected(model, family)
    _check_keys(expected, state, checkpoint, base, family)
    _check_shapes(expected, state, model, lora_r, checkpoint, base)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    _check_copies(state, tied, checkpoint)
    tok = _add_latent_tokens(processor, vocab, base)
    say(f"merging LoRA (r={lora_r}, alpha={lora_alpha}) into {len(state)} tensors, {dtype}")
    model.load_state_dict(_merged(expected, state, lora_r, lora_alpha, DTYPES[dtype]), strict=True, assign=True)
    if tied:
        model.tie_weights()
    model.config.dtype = DTYPES[dtype]
    model.config.get_text_config().dtype = DTYPES[dtype]
    model.generation_config = _generation_config(tok, model.config)
    meta = _lvr_meta(tok, checkpoint, base, lora_r, lora_alpha, dtype, family)

    say(f"writing {output}")
    created = next((p for p in reversed(output.parents) if not p.exists()), None)  # topmost missing parent
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
        model.save_pretrained(tmp)
        save_processor(processor, tmp, base)
        (tmp / LVR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return output
