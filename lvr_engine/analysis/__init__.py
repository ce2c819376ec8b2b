"""Analysis tools: selection heat maps and causal mediation (input -> latent -> answer).

    from lvr_engine.analysis import draw_selection_heatmap, run_mediation
"""
from .heatmap import (
    draw_frequency_heatmap,
    draw_selection_heatmap,
    selection_frequency_map,
    selection_overlay,
    step_colors,
    token_box,
    token_grid,
)
from .mediation import (
    AnswerSensitivity,
    Intervention,
    LatentSensitivity,
    MediationReport,
    Perturbation,
    RunRecord,
    answer_sensitivity,
    blank_image,
    identity,
    latent_sensitivity,
    letter_answer,
    no_intervention,
    noise_hidden,
    pixel_noise,
    record_run,
    run_mediation,
    shuffle_patches,
    swap_blocks,
    swap_images,
    zero_hidden,
)

__all__ = [
    "draw_selection_heatmap", "selection_overlay", "selection_frequency_map", "draw_frequency_heatmap",
    "step_colors", "token_box", "token_grid",
    "MediationReport", "LatentSensitivity", "AnswerSensitivity", "RunRecord", "Perturbation", "Intervention",
    "record_run", "latent_sensitivity", "answer_sensitivity", "run_mediation", "letter_answer",
    "identity", "pixel_noise", "blank_image", "swap_images",
    "no_intervention", "zero_hidden", "noise_hidden", "swap_blocks", "shuffle_patches",
]
