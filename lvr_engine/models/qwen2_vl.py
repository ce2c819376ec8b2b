"""Qwen2-VL and Qwen2.5-VL: vision tower once per image, the model's own M-RoPE prompt positions.

The text-only adapters (Qwen2 / Llama / generic causal LM) are in text_models.py; their names stay importable
from here.
"""
from __future__ import annotations

import torch

from .base import DecoderWeights, ModelAdapter
from .converted import converted
from .text_models import CausalLMAdapter, GenericCausalLMAdapter, text_decoder_weights

__all__ = ["Qwen2VLAdapter", "VISION_GROUP_PATCHES", "CausalLMAdapter", "GenericCausalLMAdapter"]


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
        vc = cfg.vision_config
        self.spatial_merge_size = int(vc.spatial_merge_size)
        chans = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
        self.patch_dim = int(chans) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2  # pixel_values width
        self._weights = None

    def decoder_weights(self) -> DecoderWeights:
        if self._weights is None:
            lm = self.model.model.language_model
            tc = self.text_config
            rope = getattr(tc, "rope_parameters", None) or {}
            section = rope.get("mrope_section") or getattr(lm.rotary_emb, "mrope_section", None)
            self._weights = text_decoder_weights(lm, self.model.lm_head, tc, section)
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
