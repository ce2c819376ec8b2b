"""Loading a local checkpoint directory (model + processor) for a supported family."""
from __future__ import annotations

import json
import os

# model_type in config.json -> transformers class name
_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "chameleon": "ChameleonForConditionalGeneration",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


# Written by the trainer next to the weights: the LatentConfig fields the model was trained with.
LVR_CONFIG = "lvr_config.json"


def read_lvr_meta(path) -> dict | None:
    """The checkpoint's ``lvr_config.json`` as a dict (None when absent); ValueError naming a corrupt file."""
    f = os.path.join(os.fspath(path), LVR_CONFIG)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            meta = json.load(fh)
        meta["latent_config"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt {f}: {e!r}") from e
    return meta


def load_checkpoint(path, dtype=None, device=None):
    """(model, processor_or_tokenizer) from a local directory; clear errors for missing/corrupt files."""
    import transformers

    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} is not a checkpoint: no config.json (expected config.json + *.safetensors)")
    try:
        with open(cfg_file) as f:
            model_type = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint {path!r}: config.json is not valid JSON ({e})") from e
    cls_name = _CLASSES.get(model_type)
    if cls_name is not None:
        cls = getattr(transformers, cls_name)
    else:  # other causal LMs run on the HF-module runner if their layout fits (checked by adapter_for)
        if model_type not in transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise TypeError(f"unsupported model family {model_type!r} in {cfg_file}; supported: "
                            f"{sorted(_CLASSES)} and other causal LMs with a model.model.layers layout")
        cls, cls_name = transformers.AutoModelForCausalLM, "AutoModelForCausalLM"
    try:
        model = cls.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    except Exception as e:  # safetensors/OS/shape errors alike: the checkpoint is unusable, say which
        raise ValueError(f"cannot load checkpoint {path!r} as {cls_name}: {e}") from e
    model.eval()
    if device is not None:
        model.to(device)
    return model, load_processor_or_tokenizer(path)


def load_processor_or_tokenizer(path):
    """The checkpoint's processor (VLMs), else its tokenizer, else None when it ships neither."""
    import transformers

    from .processors import load_processor

    for load in (load_processor, transformers.AutoTokenizer.from_pretrained):
        try:
            return load(path)
        except (OSError, ValueError, KeyError, TypeError, ImportError):
            continue
    return None
