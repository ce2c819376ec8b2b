"""Qwen2-VL and Qwen2.5-VL: vision tower once per image, the model's own M-RoPE prompt positions."""
from __future__ import annotations

import torch

from .base import DecoderWeights, LayerWeights, ModelAdapter
from .converted import converted


def _text_decoder_weights(text_model, lm_head, text_config, mrope_section) -> DecoderWeights:
    """Decoder parts shared by every Qwen2/Llama-shaped text model (``text_model`` has embed_tokens, layers, norm)."""
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


# The vision tower attends within each image only, so inference encodes images in groups: this bounds its
# activation memory (a batch of large images otherwise peaks far above the decoder) at no cost in results.
# Training encodes all images at once (its activations are kept for backward anyway; fewer, larger matmuls).
VISION_GROUP_PATCHES = 1024


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    is_multimodal = True
    lean_runner = True

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.spatial_merge_size = int(cfg.vision_config.spatial_merge_size)
        self._weights = None

    def decoder_weights(self) -> DecoderWeights:
        if self._weights is None:
            lm = self.model.model.language_model
            tc = self.text_config
            rope = getattr(tc, "rope_parameters", None) or {}
            section = rope.get("mrope_section") or getattr(lm.rotary_emb, "mrope_section", None)
            self._weights = _text_decoder_weights(lm, self.model.lm_head, tc, section)
        return self._weights

    def image_token_counts(self, image_grid_thw: torch.Tensor) -> list[int]:
        return (image_grid_thw.prod(-1) // self.spatial_merge_size**2).tolist()

    def encode_images(self, pixel_values, image_grid_thw, compute_dtype=None):
        """Per image (n_i, hidden) embeddings; images go through the tower in groups of <= VISION_GROUP_PATCHES
        patches (always at least one image per group). ``compute_dtype`` (inference only): run the tower in that
        dtype from a cached converted copy (models/converted.py) when the model is stored in another."""
        visual = self.model.model.visual
        if compute_dtype is not None and compute_dtype != visual.dtype and not torch.is_grad_enabled():
            visual = converted(visual, compute_dtype)
        patches = image_grid_thw.prod(-1).tolist()
        limit = VISION_GROUP_PATCHES if not torch.is_grad_enabled() else sum(patches)
        out, start, i = [], 0, 0
        while i < len(patches):
            j, n = i + 1, patches[i]
            while j < len(patches) and n + patches[j] <= limit:
                n += patches[j]
                j += 1
            # what Qwen2VLModel.get_image_features does, on the tower chosen above
            feats = visual(pixel_values[start:start + n].to(visual.dtype), grid_thw=image_grid_thw[i:j],
                           return_dict=True).pooler_output
            out.extend(torch.split(feats, self.image_token_counts(image_grid_thw[i:j])))
            start, i = start + n, j
        return out

    def prompt_positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
        if image_grid_thw is None:
            return super().prompt_positions(input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
        pos, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return pos


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
            self._weights = _text_decoder_weights(self.model.model, self.model.lm_head, self.config, None)
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
