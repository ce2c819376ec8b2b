"""What the engine needs from a model family, independent of how HF lays out its modules."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerWeights:
    """One pre-norm decoder layer (Qwen2 / Llama shape): RMSNorm -> attention -> RMSNorm -> SwiGLU MLP."""

    attn: nn.Module          # has q_proj, k_proj, v_proj, o_proj (nn.Linear)
    mlp: nn.Module           # has gate_proj, up_proj, down_proj
    input_norm: nn.Module    # RMSNorm with .weight and an eps attribute
    post_norm: nn.Module


@dataclass
class DecoderWeights:
    """The text decoder as plain parts: embeddings, layers, final norm, head, rotary tables."""

    embed: nn.Embedding
    layers: list[LayerWeights]
    norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    inv_freq: torch.Tensor            # (head_dim/2,) float32 from the model's rotary module
    rope_scaling: float = 1.0         # multiplies cos/sin (HF's attention_scaling)
    mrope_section: list[int] | None = None  # Qwen2-VL multimodal rotary split of head_dim/2
    act: str = "silu"
    layer_modules: list[nn.Module] = field(default_factory=list)  # the HF decoder layers (fallback runner)
    rotary_module: nn.Module | None = None                         # the HF rotary embedding module


class ModelAdapter(abc.ABC):
    """Family-specific glue: image encoding, prompt positions and access to the decoder weights."""

    family: str = "base"
    is_multimodal: bool = False
    lean_runner: bool = False  # True when the engine's own decoder loop understands this family's weights
    image_token_id: int | None = None

    patch_dim: int | None = None  # width of a pixel_values row (multimodal families)
    spatial_merge_size: int = 1  # image grid sides must be multiples of it

    def __init__(self, model: nn.Module):
        self.model = model

    # Properties every adapter provides -----------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.decoder_weights().embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder_weights().embed.weight.dtype

    @abc.abstractmethod
    def decoder_weights(self) -> DecoderWeights:
        """The decoder's parts (cached by the adapter)."""

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                      compute_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Per image, its (n_tokens_i, hidden) input-level embeddings (vision tower + merger), computed in
        ``compute_dtype`` when given (inference; the engine's compute dtype), else in the model's dtype."""
        raise TypeError(f"{type(self.model).__name__} has no vision tower")

    def image_token_counts(self, image_grid_thw: torch.Tensor) -> list[int]:
        raise TypeError(f"{type(self.model).__name__} has no vision tower")

    def prompt_positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw) -> torch.Tensor:
        """(3, B, S) multimodal rotary positions of the prompt (padding positions arbitrary)."""
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1)

    @property
    def eos_token_ids(self) -> list[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None) or getattr(self.text_config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    @property
    def pad_token_id(self) -> int:
        gc = getattr(self.model, "generation_config", None)
        for src in (gc, self.config, self.text_config):
            pid = getattr(src, "pad_token_id", None) if src is not None else None
            if pid is not None:
                return int(pid)
        eos = self.eos_token_ids
        return eos[0] if eos else 0

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the valid token ids are [0, vocab_size)."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)
