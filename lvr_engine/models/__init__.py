"""Model adapters: one per family, chosen by the model's class."""
from __future__ import annotations

from .base import DecoderWeights, LayerWeights, ModelAdapter
from .chameleon import ChameleonAdapter
from .qwen2_vl import Qwen2VLAdapter
from .text_models import CausalLMAdapter, GenericCausalLMAdapter

# Class names we have a runner for. Matched by name so the project does not import every family.
_ADAPTERS = {
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen2VLAdapter,
    "ChameleonForConditionalGeneration": ChameleonAdapter,
    "Qwen2ForCausalLM": CausalLMAdapter,
    "LlamaForCausalLM": CausalLMAdapter,
}


def supported_model_classes() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model) -> ModelAdapter:
    """The adapter for ``model``; a TypeError naming the class when the family is not supported."""
    name = type(model).__name__
    cls = _ADAPTERS.get(name)
    if cls is None:
        # peft wraps models; look through the wrapper before giving up.
        base = getattr(getattr(model, "base_model", None), "model", None)
        if base is not None and base is not model and type(base).__name__ in _ADAPTERS:
            return _ADAPTERS[type(base).__name__](base)
        if GenericCausalLMAdapter.fits(model):
            return GenericCausalLMAdapter(model)
        raise TypeError(
            f"unsupported model class {name}; lvr_engine runs {', '.join(supported_model_classes())} "
            "and other *ForCausalLM models laid out as model.model.layers (HF-module runner)"
        )
    return cls(model)


__all__ = ["ModelAdapter", "DecoderWeights", "LayerWeights", "adapter_for", "supported_model_classes",
           "Qwen2VLAdapter", "ChameleonAdapter", "CausalLMAdapter", "GenericCausalLMAdapter"]
