"""The curriculum: which phases a run trains, and what inference setup each phase's checkpoint describes.

``objective="ivtlr"`` / ``"coconut"``: stages 0..max_stage; stage ``s`` replaces the first ``s`` reasoning steps by
``min(s, num_latent_steps)`` latent steps (stage 0 is the full chain of thought). Mirage (``"mirage_stage1"`` /
``"mirage_stage2"``): one phase of ``num_latent_steps`` latent slots (training/mirage.py); its checkpoint's inference
switches to latent mode by itself (``trigger="token"``), at most ``max_latent_steps`` steps per segment (8).
``mode="direct"``: one phase, answer only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .train_config import TrainConfig

__all__ = ["StagePlan", "stage_plan", "stage_lvr_config"]


@dataclass(frozen=True)
class StagePlan:
    """One phase of the curriculum: ``index`` (checkpoint name stage-<index>), latent steps per row, and
    reasoning steps removed from the front of every target."""

    index: int
    num_latent_steps: int
    replaced_steps: int


def stage_plan(cfg: TrainConfig) -> list[StagePlan]:
    """The phases ``cfg`` trains, in order (see the module docstring)."""
    if cfg.mode == "direct":
        return [StagePlan(0, 0, 0)]
    if cfg.is_mirage:
        return [StagePlan(0, cfg.num_latent_steps, 0)]
    return [StagePlan(s, min(s, cfg.num_latent_steps), s) for s in range(cfg.max_stage + 1)]


def stage_lvr_config(cfg: TrainConfig, stage: StagePlan, markers: dict[str, int | None]) -> dict:
    """The ``lvr_config.json`` of ``stage``'s checkpoint: the engine's latent setup that evaluates what the stage
    trained (``latent_config`` for :class:`~lvr_engine.engine.config.LatentConfig`), the evaluation mode and the
    curriculum position. ``markers``: the resolved marker token ids ("start", "end", and "pad" for Mirage)."""
    if cfg.mode == "direct":
        latent = dict(num_latent_steps=0, num_selected_patches=0, trigger="prompt")
        eval_mode = "direct"
    elif cfg.is_mirage:
        latent = dict(num_latent_steps=0, num_selected_patches=0, trigger="token",
                      latent_start_id=markers["start"], latent_end_id=markers["end"],
                      latent_pad_id=markers["pad"], max_latent_steps=cfg.max_latent_steps)
        eval_mode = "latent"
    else:
        N = stage.num_latent_steps
        latent = dict(num_latent_steps=N, num_selected_patches=cfg.patches if N else 0, trigger="prompt",
                      start_marker_id=markers.get("start") if N else None,
                      end_marker_id=markers.get("end") if N else None)
        eval_mode = "latent" if N else "cot"
        if N and markers.get("placeholder") is not None:  # prompts in the official layout (Chameleon)
            latent["placeholder_id"] = markers["placeholder"]
    latent["position_mode"] = cfg.position_mode
    if latent["num_selected_patches"]:
        latent.update(patch_order=cfg.patch_order, score_precision=cfg.score_precision)
    return {"latent_config": latent, "objective": cfg.objective, "eval_mode": eval_mode, "stage": stage.index,
            "replaced_steps": stage.replaced_steps, "template": cfg.template, "image_size": cfg.image_size}
