"""Text-only causal LMs: Qwen2 / Llama on the lean runner (Coconut: no images, 1-D rotary positions), other HF
causal LMs on the HF-module runner, and the decoder-weight view every Qwen2/Llama-shaped text model shares."""
from __future__ import annotations

from .base import DecoderWeights, LayerWeights, ModelAdapter

__all__ = ["CausalLMAdapter", "GenericCausalLMAdapter", "text_decoder_weights"]


def text_decoder_weights(text_model, lm_head, text_config, mrope_section) -> DecoderWeights:
    """Decoder parts shared by every Qwen2/Llama-shaped text model (``text_model`` has embed_tokens, layers, norm,
    rotary_emb; the VLM adapters pass their language model). ``mrope_section``: the M-RoPE split of the rotary
    dims, or None for 1-D positions."""
    # getattr: families served only by the HF-module runner may name their norms differently
    layers = [
        LayerWeights(attn=l.self_attn, mlp=getattr(l, "mlp", None), input_norm=getattr(l, "input_layernorm", None),
                     post_norm=getattr(l, "post_attention_layernorm", None))
        for l in text_model.layers
    ]
    attn0 = text_model.layers[0].self_attn
    head_dim = getattr(attn0, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    rot = text_model.rotary_emb
    norm = text_model.norm
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or text_config.rms_norm_eps
    return DecoderWeights(
        embed=text_model.embed_tokens,
        layers=layers,
        norm=norm,
        lm_head=lm_head,
        num_heads=text_config.num_attention_heads,
        num_kv_heads=text_config.num_key_value_heads,
        head_dim=head_dim,
        rms_eps=float(eps),
        inv_freq=rot.inv_freq.detach().float(),
        rope_scaling=float(getattr(rot, "attention_scaling", 1.0)),
        mrope_section=list(mrope_section) if mrope_section is not None else None,
        act=getattr(text_config, "hidden_act", "silu"),
        layer_modules=list(text_model.layers),
        rotary_module=rot,
    )


class CausalLMAdapter(ModelAdapter):
    """Qwen2 / Llama text-only causal LMs (Coconut): no images, 1-D rotary positions."""

    family = "causal_lm"
    is_multimodal = False
    lean_runner = True

    def __init__(self, model):
        super().__init__(model)
        self._weights = None

    def decoder_weights(self) -> DecoderWeights:
        if self._weights is None:
            self._weights = text_decoder_weights(self.model.model, self.model.lm_head, self.config, None)
        return self._weights


class GenericCausalLMAdapter(CausalLMAdapter):
    """Other HF causal LMs laid out as ``model.model.{embed_tokens, layers, norm, rotary_emb}`` + ``lm_head``
    (Qwen3, Mistral, ...): no lean runner; the engine runs their own layer modules (HF-module runner)."""

    family = "generic_causal_lm"
    lean_runner = False

    @staticmethod
    def fits(model) -> bool:
        inner = getattr(model, "model", None)
        return (type(model).__name__.endswith("ForCausalLM") and hasattr(model, "lm_head")
                and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
                and all(hasattr(l, "self_attn") and hasattr(l.self_attn, "layer_idx") for l in inner.layers))
