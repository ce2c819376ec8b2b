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
    # Chameleon: per-head LayerNorm of q and k before rotary (weight and bias (heads, head_dim)); None elsewhere
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


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
    qk_norm_eps: float = 1e-5         # epsilon of the q/k LayerNorms (LayerWeights.q_norm/k_norm), if any
    # token ids whose logits the model's own forward sets to the dtype's minimum (Chameleon: its image tokens,
    # so decoding never emits one); None: no such tokens
    suppressed_token_ids: torch.Tensor | None = None


class ModelAdapter(abc.ABC):
    """Family-specific glue: image encoding, prompt positions and access to the decoder weights."""

    family: str = "base"
    is_multimodal: bool = False
    lean_runner: bool = False  # True when the engine's own decoder loop understands this family's weights
    image_token_id: int | None = None

    patch_dim: int | None = None  # width of a pixel_values row (multimodal families)
    spatial_merge_size: int = 1  # image grid sides must be multiples of it
    image_source: str = "image_grid_thw"  # the argument that says how many image tokens each image fills

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

    def check_images(self, pixel_values, image_grid_thw, num_image_tokens: int) -> list[int]:
        """Validate a request's images against the model and the ``num_image_tokens`` image placeholder tokens of
        its prompts, before any compute; return the image tokens each image fills, in order. This default is the
        Qwen2-VL layout: ``pixel_values`` (num_patches, patch_dim) patch rows and ``image_grid_thw``
        (num_images, 3) int with positive entries, height and width multiples of ``spatial_merge_size``.
        ValueError/TypeError naming the problem."""
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        require_tensor("image_grid_thw", image_grid_thw, 2, (torch.int64, torch.int32))
        if image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (num_images, 3), got {tuple(image_grid_thw.shape)}")
        m = self.spatial_merge_size
        odd = (image_grid_thw <= 0).any(1) | (image_grid_thw[:, 1:] % m != 0).any(1)
        if odd.any():
            i = int(torch.nonzero(odd)[0])
            raise ValueError(f"image_grid_thw[{i}] = {image_grid_thw[i].tolist()}: every entry must be positive and "
                             f"the height and width multiples of the spatial merge size {m}")
        require_tensor("pixel_values", pixel_values, 2)
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        if self.patch_dim is not None and pixel_values.shape[1] != self.patch_dim:
            raise ValueError(f"pixel_values rows have {pixel_values.shape[1]} values, this model's patches have "
                             f"{self.patch_dim} (channels x temporal patch x patch x patch)")
        _require_finite(pixel_values, "patch row", "row")
        per_image = self.image_token_counts(image_grid_thw)
        if num_image_tokens != sum(per_image):
            raise ValueError(
                f"image tokens do not match image_grid_thw: input_ids hold {num_image_tokens} image tokens, "
                f"image_grid_thw describes {sum(per_image)} ({per_image} per image)"
            )
        n_patches = int(image_grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != n_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw describes {n_patches}")
        return per_image

    def prompt_positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw) -> torch.Tensor:
        """(3, B, S) multimodal rotary positions of the prompt (padding positions arbitrary)."""
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1)

    def untrainable_parameters(self) -> list[nn.Parameter]:
        """Parameters no gradient can reach (the trainer freezes them); none by default."""
        return []

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


def require_tensor(name, x, ndim=None, dtypes=None):
    """A TypeError/ValueError naming ``name`` unless x is a tensor of ``ndim`` dims with a dtype in ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def _require_finite(pixel_values: torch.Tensor, what: str, first: str) -> None:
    """ValueError when ``pixel_values`` holds NaN or Inf, counting the bad ``what`` (entries along dim 0) and naming
    the ``first`` one."""
    ok = torch.isfinite(pixel_values).reshape(pixel_values.shape[0], -1).all(1)
    if not ok.all():
        rows = torch.nonzero(~ok).flatten()
        raise ValueError(f"pixel_values holds NaN or Inf in {rows.numel()} {what}(s), first {first} {int(rows[0])}")
