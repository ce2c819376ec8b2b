"""The training run's configuration: :class:`TrainConfig` (every knob of a run, validated on construction) and
:class:`LoraSettings`. Plain data: importing this module pulls in neither torch nor accelerate."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["OBJECTIVES", "LoraSettings", "TrainConfig"]

OBJECTIVES = ("ivtlr", "coconut", "mirage_stage1", "mirage_stage2")


@dataclass
class LoraSettings:
    """peft LoRA on the text decoder's projections (the vision tower's ``qkv``/``proj`` are left alone)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainConfig:
    """Everything a training run needs. ``dataset``: "m3cot" / "scienceqa" / "vsp" (read from ``data_dir``),
    "synthetic" (``synthetic_size`` generated examples), or an in-memory sequence of ReasoningExamples.

    ``num_latent_steps`` caps the latent steps per stage (stage s runs min(s, cap)); for Mirage it is the
    fixed latent count (L), and ``max_latent_steps`` the cap its checkpoints' inference runs with (Mirage: 8).
    ``train_vision``: train the vision tower (None: not for Mirage, which freezes it, yes otherwise).
    ``mirage_detach_targets``: Mirage stage 1 with a training vision tower takes no gradient through the pooled
    helper-image embeddings (fixed targets, as a frozen tower gives; without it the cosine term can be met by
    collapsing the tower's output).
    ``template`` None: ``"mirage"`` for the ``vsp`` dataset, else ``"ivtlr"``. ``batch_size`` is per process.
    ``mode="direct"`` fine-tunes the no-CoT baseline (answer only, stage 0). ``stop_after_stage`` ends the run
    after that stage's checkpoint (a planned interruption; ``resume=True`` continues it).
    """

    model: str
    output_dir: str
    dataset: Any = "synthetic"
    data_dir: str | None = None
    split: str = "train"
    limit: int | None = None
    synthetic_size: int = 256
    objective: str = "ivtlr"
    mode: str = "cot"
    max_stage: int = 3
    epochs_per_stage: int = 1
    num_latent_steps: int = 3
    num_selected_patches: int = 32
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    reset_optimizer_per_stage: bool = True
    detach_latents: bool = False
    position_mode: str = "mrope"
    patch_order: str = "ascending"
    score_precision: str = "fp32"
    use_markers: bool = True
    template: str | None = None
    image_size: int | None = None
    seed: int = 0
    log_every: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    lora: LoraSettings | None = None
    mirage_text_weight: float = 0.1
    mirage_detach_targets: bool = False
    max_latent_steps: int = 8
    train_vision: bool | None = None
    stop_after_stage: int | None = None
    progress: bool = True
    backend: str | None = None

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.template is None:
            vsp = isinstance(self.dataset, str) and self.dataset.strip().lower() == "vsp"
            self.template = "mirage" if vsp else "ivtlr"
        self.validate()

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.mode not in ("cot", "direct"):
            raise ValueError(f"TrainConfig.mode must be 'cot' or 'direct', got {self.mode!r}")
        for name in ("max_stage", "num_latent_steps", "num_selected_patches", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative int, got {v!r}")
        for name in ("epochs_per_stage", "batch_size", "log_every", "limit", "image_size"):
            v = getattr(self, name)
            if v is None and name in ("limit", "image_size"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.position_mode not in ("mrope", "arange"):
            raise ValueError(f"TrainConfig.position_mode must be 'mrope' or 'arange', got {self.position_mode!r}")
        if self.patch_order not in ("ascending", "official"):
            raise ValueError(f"TrainConfig.patch_order must be 'ascending' or 'official', got {self.patch_order!r}")
        if self.score_precision not in ("fp32", "model"):
            raise ValueError(f"TrainConfig.score_precision must be 'fp32' or 'model', got {self.score_precision!r}")
        if isinstance(self.max_latent_steps, bool) or not isinstance(self.max_latent_steps, int) \
                or self.max_latent_steps < 1:
            raise ValueError(f"TrainConfig.max_latent_steps must be a positive int, got {self.max_latent_steps!r}")
        if self.objective == "mirage_stage1" and self.num_latent_steps < 1:
            raise ValueError("objective='mirage_stage1' needs num_latent_steps >= 1 (latents to supervise)")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        on_disk = ("m3cot", "scienceqa", "vsp")
        if isinstance(self.dataset, str) and self.dataset.lower() in on_disk and not self.data_dir:
            raise ValueError(f"dataset {self.dataset!r} is read from disk: set data_dir")

    @property
    def is_mirage(self) -> bool:
        return self.objective.startswith("mirage")

    @property
    def trains_vision(self) -> bool:
        """Whether the vision tower trains: ``train_vision``, or by default all but Mirage (which freezes it)."""
        return (not self.is_mirage) if self.train_vision is None else bool(self.train_vision)

    @property
    def patches(self) -> int:
        """K actually used: IVT-LR's num_selected_patches; 0 for Coconut and Mirage (hidden state only)."""
        return self.num_selected_patches if self.objective == "ivtlr" else 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(self.dataset, str):
            d["dataset"] = f"<{len(self.dataset)} in-memory examples>"
        return d
