"""Chameleon (IVT-LR's second backbone): discrete VQ image tokens, 1-D positions, query/key LayerNorms.

An image is not encoded into continuous features. The model's VQ-VAE turns each image, a (3, H, W) array, into
(H/f)·(W/f) discrete codes (f = 2^(levels-1) its downsampling; 1,024 codes for Chameleon-7B's 512x512 images),
mapped to BPE token ids (``ChameleonModel.get_image_tokens``) that take the places of the image placeholder tokens
the processor wrote between its image markers. The "image embeddings" the latent steps choose from are the token
embeddings of those ids, as in the official IVT-LR Chameleon code. Positions are 1-D, 0..S-1.

The decoder is Llama-shaped except that each attention normalises q and k per head with a LayerNorm (no affine in
the statistics; each head's own weight and bias (heads, head_dim) after) before rotary. The engine's lean runner
computes that (``LayerWeights.q_norm/k_norm``); the Swin-norm variant (``config.swin_norm``: norms after attention
and MLP) runs on the HF-module runner. As the model's own forward does, the image-token logits are set to the
dtype's minimum (``DecoderWeights.suppressed_token_ids``), so decoding never writes an image token.

The VQ-VAE always runs in its own stored dtype (the official code casts the pixels to the model's dtype): its codes
are discrete, and computing them in another precision could pick other codes.
"""
from __future__ import annotations

import torch

from .base import DecoderWeights, ModelAdapter, _require_finite, require_tensor
from .text_models import text_decoder_weights

__all__ = ["ChameleonAdapter", "VQ_GROUP_IMAGES", "QK_NORM_EPS"]

# Inference tokenizes images through the VQ-VAE this many at a time: its full-resolution convolutions (128 channels
# at 512x512 for Chameleon-7B) dominate the peak memory of a batch otherwise, for no gain in speed on a CPU.
VQ_GROUP_IMAGES = 4

# ChameleonLayerNorm.forward normalises with this epsilon whatever its module says (transformers 4.4x-5.x).
QK_NORM_EPS = 1e-5


class ChameleonAdapter(ModelAdapter):
    """``ChameleonForConditionalGeneration``: images in, VQ image-token embeddings as the image embeddings."""

    family = "chameleon"
    is_multimodal = True
    patch_dim = None
    image_source = "pixel_values"

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.lean_runner = not bool(getattr(cfg, "swin_norm", False))
        self.image_token_id = int(model.model.vocabulary_mapping.image_token_id)
        vq = cfg.vq_config
        self.in_channels = int(vq.in_channels)
        self.downsample = 2 ** (len(vq.channel_multiplier) - 1)  # one stride-2 convolution per level but the last
        self._weights = None

    def decoder_weights(self) -> DecoderWeights:
        if self._weights is None:
            inner = self.model.model
            w = text_decoder_weights(inner, self.model.lm_head, self.config, None)
            for lw, layer in zip(w.layers, inner.layers, strict=True):
                lw.q_norm, lw.k_norm = layer.self_attn.q_norm, layer.self_attn.k_norm
            w.qk_norm_eps = QK_NORM_EPS
            w.suppressed_token_ids = torch.tensor(inner.vocabulary_mapping.image_tokens, dtype=torch.long)
            self._weights = w
        return self._weights

    # -- images ------------------------------------------------------------------------------------------
    def tokens_per_image(self, height: int, width: int) -> int:
        """Image tokens the VQ-VAE makes of an ``height`` x ``width`` image."""
        return (height // self.downsample) * (width // self.downsample)

    def check_images(self, pixel_values, image_grid_thw, num_image_tokens: int) -> list[int]:
        """``pixel_values`` (num_images, channels, H, W) floating point, finite, H and W positive multiples of the
        VQ-VAE's downsampling; no ``image_grid_thw``; the prompts' ``num_image_tokens`` image tokens equal what the
        images fill. Returns the tokens of each image."""
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw given to a Chameleon model: its images are whole (channels, H, W) "
                             "arrays in pixel_values, as its processor returns them; pass image_grid_thw=None")
        require_tensor("pixel_values", pixel_values, 4)
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        n, c, h, w = (int(x) for x in pixel_values.shape)
        if c != self.in_channels:
            raise ValueError(f"pixel_values has {c} channels per image, this model's VQ-VAE takes {self.in_channels} "
                             "(pixel_values must be (num_images, channels, height, width))")
        f = self.downsample
        if h < f or w < f or h % f or w % f:
            raise ValueError(f"pixel_values images are {h}x{w} pixels; the VQ-VAE needs height and width positive "
                             f"multiples of its downsampling {f}")
        _require_finite(pixel_values, "image", "image")
        per_image = [self.tokens_per_image(h, w)] * n
        if num_image_tokens != sum(per_image):
            raise ValueError(f"image tokens do not match pixel_values: input_ids hold {num_image_tokens} image tokens, "
                             f"the {n} image(s) of {h}x{w} pixels fill {sum(per_image)} ({per_image[0] if n else 0} "
                             f"each: (H/{f}) x (W/{f}))")
        return per_image

    @torch.no_grad()
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, tokens) int64 BPE ids of the images' VQ codes (``ChameleonModel.get_image_tokens``), the
        VQ-VAE run in its own dtype on groups of at most :data:`VQ_GROUP_IMAGES` images."""
        inner = self.model.model
        vq_dtype = next(inner.vqmodel.parameters()).dtype
        out = [inner.get_image_tokens(pixel_values[i:i + VQ_GROUP_IMAGES].to(vq_dtype))
               for i in range(0, pixel_values.shape[0], VQ_GROUP_IMAGES)]
        return torch.cat(out).long()

    def encode_images(self, pixel_values, image_grid_thw=None, compute_dtype=None):
        """Per image (tokens, hidden) input-level embeddings: the token embeddings of its VQ image tokens, in the
        model's dtype, then ``compute_dtype`` when given. Differentiable in the embedding under autograd."""
        ids = self.image_tokens(pixel_values)
        emb = self.decoder_weights().embed(ids.to(self.device))
        if compute_dtype is not None:
            emb = emb.to(compute_dtype)
        return list(emb.unbind(0))

    def prompt_positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw) -> torch.Tensor:
        """(3, B, S) 1-D positions 0..len-1 of each row's attended tokens, on all three axes (no multimodal rope)."""
        return super().prompt_positions(input_ids, attention_mask, mm_token_type_ids, image_grid_thw)

    def untrainable_parameters(self) -> list[torch.nn.Parameter]:
        """The VQ-VAE's: its codes are discrete (argmin), so no gradient reaches it; training freezes it."""
        return list(self.model.model.vqmodel.parameters())
