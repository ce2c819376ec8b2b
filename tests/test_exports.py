"""Public names stay where users import them from.

The lists below are literal on purpose: they are every name the packages exported (``__all__``) before the
files-by-job split of issue #11 (commit b65ed23), the names other code and tests imported from the modules that
split moved code out of, and the names the README documents. A move must leave a re-export behind; a removal
must edit this file.
"""
from __future__ import annotations

import importlib

import pytest

# Each package's ``__all__`` before the split: every name must still be in ``__all__`` and importable.
PACKAGE_ALL = {
    "lvr_engine": ["LatentConfig", "LatentGenerator", "GenerationOutput", "GenerationStats"],
    "lvr_engine.ops": [
        "image_attention_scores", "select_and_feedback", "chunk_attention_with_scores", "mixed_linear",
        "pack_mixed_weight", "rope_write_kv", "rms_norm", "available_backends", "resolve_backend", "reference",
    ],
    "lvr_engine.data": [
        "LETTERS", "ReasoningExample", "ReasoningDataset", "decode_image", "letter_for", "index_for",
        "split_rationale", "split_sentences", "merge_into_steps", "M3COT_COLUMNS", "SCIENCEQA_COLUMNS", "load_m3cot",
        "load_scienceqa", "DATASET_LOADERS", "SCORERS", "load_dataset_by_name", "PromptTemplate", "Target",
        "PROMPT_TEMPLATES", "IVTLR_IMAGE_SIZE", "register_template", "get_template", "format_prompt",
        "format_target", "chat_messages", "JUDGES", "extract_m3cot_answer", "ivtlr_m3cot_candidates",
        "extract_ivtlr_scienceqa_index", "score_m3cot", "score_scienceqa", "accuracy", "accuracy_by",
    ],
    "lvr_engine.training": [
        "latent_forward", "LatentForwardOutput", "mirage_latent_loss", "pool_image_embeddings", "Trainer",
        "TrainConfig", "collate",
    ],
    "lvr_engine.models": [
        "ModelAdapter", "DecoderWeights", "LayerWeights", "adapter_for", "supported_model_classes", "Qwen2VLAdapter",
        "CausalLMAdapter", "GenericCausalLMAdapter",
    ],
    "lvr_engine.analysis": [
        "draw_selection_heatmap", "selection_overlay", "selection_frequency_map", "draw_frequency_heatmap",
        "step_colors", "token_box", "token_grid", "MediationReport", "LatentSensitivity", "AnswerSensitivity",
        "RunRecord", "Perturbation", "Intervention", "record_run", "latent_sensitivity", "answer_sensitivity",
        "run_mediation", "letter_answer", "identity", "pixel_noise", "blank_image", "swap_images", "no_intervention",
        "zero_hidden", "noise_hidden", "swap_blocks", "shuffle_patches",
    ],
    # the trainer module's own __all__ (cli.py, demo.py and tests import from it)
    "lvr_engine.training.trainer": [
        "TrainConfig", "LoraSettings", "StagePlan", "Trainer", "TrainResult", "stage_plan", "load_examples",
        "OBJECTIVES", "LVR_CONFIG", "TRAINER_STATE",
    ],
}

# Names importable from the modules the split moved code out of, which other code or tests use; and the names
# the README documents outside the package lists above.
MODULE_NAMES = {
    "lvr_engine.training.trainer": ["LatentLossModule", "latent_forward"],  # tests monkeypatch latent_forward here
    "lvr_engine.models.qwen2_vl": ["Qwen2VLAdapter", "CausalLMAdapter", "GenericCausalLMAdapter",
                                   "VISION_GROUP_PATCHES"],
    "lvr_engine.data.example": [
        "LETTERS", "ReasoningExample", "ReasoningDataset", "decode_image", "letter_for", "index_for", "to_rgb",
        "find_split_shards", "check_columns", "read_parquet_split", "rows_with_image", "load_split",
    ],
    "lvr_engine.ops.reference": [
        "image_attention_scores", "select_and_feedback", "chunk_attention_with_scores", "topk_ascending",
        "pack_mixed_weight", "unpack_mixed_weight", "mixed_linear", "rope_write_kv", "rms_norm", "MIXED_PANEL",
        "MIXED_PANEL_ORDER",
    ],
    "lvr_engine.analysis.heatmap": ["draw_selection_heatmap", "selection_overlay"],
    "lvr_engine.analysis.mediation": ["run_mediation", "MediationReport"],
    "lvr_engine.cli": ["main"],  # the `lvr` console script (pyproject.toml)
}

# Attributes the README documents on the public classes.
ATTRIBUTES = {
    ("lvr_engine", "LatentConfig"): ["ivtlr", "coconut", "mirage"],
    ("lvr_engine", "LatentGenerator"): ["from_pretrained", "generate"],
}


def _pairs(table):
    return [(mod, name) for mod, names in table.items() for name in names]


@pytest.mark.parametrize("module,name", _pairs(PACKAGE_ALL))
def test_package_still_exports(module, name):
    mod = importlib.import_module(module)
    assert name in mod.__all__, f"{name} dropped from {module}.__all__"
    assert getattr(mod, name) is not None


@pytest.mark.parametrize("module,name", _pairs(MODULE_NAMES))
def test_name_still_importable_from_its_module(module, name):
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"`from {module} import {name}` no longer works"


@pytest.mark.parametrize("owner,attrs", list(ATTRIBUTES.items()), ids=lambda v: ".".join(v) if isinstance(v, tuple)
                         else None)
def test_documented_attributes(owner, attrs):
    obj = getattr(importlib.import_module(owner[0]), owner[1])
    for a in attrs:
        assert callable(getattr(obj, a, None)), f"{owner[1]}.{a} is gone"


def test_moved_names_are_the_same_objects():
    """The re-exports are the moved objects, not copies: isinstance checks and monkeypatching keep working."""
    from lvr_engine.data import example, parquet
    from lvr_engine.models import qwen2_vl, text_models
    from lvr_engine.training import checkpoint, stages, train_config, trainer

    assert trainer.TrainConfig is train_config.TrainConfig and trainer.LoraSettings is train_config.LoraSettings
    assert trainer.OBJECTIVES is train_config.OBJECTIVES
    assert trainer.StagePlan is stages.StagePlan and trainer.stage_plan is stages.stage_plan
    assert trainer.TRAINER_STATE == checkpoint.TRAINER_STATE
    assert qwen2_vl.CausalLMAdapter is text_models.CausalLMAdapter
    assert qwen2_vl.GenericCausalLMAdapter is text_models.GenericCausalLMAdapter
    for name in ("find_split_shards", "check_columns", "read_parquet_split", "rows_with_image"):
        assert getattr(example, name) is getattr(parquet, name)
