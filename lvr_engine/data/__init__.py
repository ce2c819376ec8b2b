"""Benchmark data: M3CoT and ScienceQA loaders, Mirage's jsonl format and VSP, rationale steps, prompts, answer
scoring.

Importing this package is light (PIL only): ``datasets``/``pyarrow`` are imported when a split is
loaded, and torch never.

>>> from lvr_engine.data import load_dataset_by_name, format_prompt, format_target, score_m3cot
>>> ds = load_dataset_by_name("m3cot", "/data/M3CoT", "test", require_image=True)  # doctest: +SKIP
>>> ex = ds[0]                                                                      # doctest: +SKIP
>>> steps, answer = format_target(ex, num_latent_steps_replaced=1)                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .example import (
    LETTERS,
    SKIPPED_NO_IMAGE,
    ReasoningDataset,
    ReasoningExample,
    decode_image,
    index_for,
    letter_for,
)
from .m3cot import M3COT_COLUMNS, load_m3cot
from .mirage import MirageDataset, MirageExample, load_mirage_jsonl, load_vsp
from .prompts import (
    IVTLR_IMAGE_SIZE,
    PROMPT_TEMPLATES,
    PromptTemplate,
    Target,
    chat_messages,
    format_prompt,
    format_target,
    get_template,
    register_template,
)
from .scienceqa import SCIENCEQA_COLUMNS, load_scienceqa
from .scoring import (
    JUDGES,
    accuracy,
    accuracy_by,
    extract_ivtlr_scienceqa_index,
    extract_m3cot_answer,
    ivtlr_m3cot_candidates,
    score_m3cot,
    score_scienceqa,
    score_vsp,
    vsp_outcome,
)
from .steps import merge_into_steps, split_rationale, split_sentences

DATASET_LOADERS: dict[str, Callable[..., ReasoningDataset]] = {
    "m3cot": load_m3cot,
    "scienceqa": load_scienceqa,
    "vsp": load_vsp,
}
"""Loaders by dataset name, for :func:`load_dataset_by_name`."""

SCORERS: dict[str, Callable[..., bool]] = {
    "m3cot": score_m3cot,
    "scienceqa": score_scienceqa,
    "vsp": score_vsp,
}
"""The per-example scorer of each dataset: ``SCORERS[name](pred_text, example, judge=...) -> bool``."""


def load_dataset_by_name(
    name: str, data_dir: str | os.PathLike, split: str = "train", **kwargs
) -> ReasoningDataset:
    """Load ``split`` of the dataset ``name`` ("m3cot", "scienceqa" or "vsp", any case) from ``data_dir``.

    Returns the loader's lazy :class:`ReasoningDataset`; ``kwargs`` go to the loader
    (``require_image``, ``max_steps``, ``cache_dir``). ``ValueError`` listing the known names when
    ``name`` is not one of them.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASET_LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(DATASET_LOADERS)}")
    return DATASET_LOADERS[key](data_dir, split, **kwargs)


__all__ = [
    "LETTERS",
    "SKIPPED_NO_IMAGE",
    "ReasoningExample",
    "ReasoningDataset",
    "decode_image",
    "letter_for",
    "index_for",
    "split_rationale",
    "split_sentences",
    "merge_into_steps",
    "M3COT_COLUMNS",
    "SCIENCEQA_COLUMNS",
    "load_m3cot",
    "load_scienceqa",
    "DATASET_LOADERS",
    "SCORERS",
    "load_dataset_by_name",
    "PromptTemplate",
    "Target",
    "PROMPT_TEMPLATES",
    "IVTLR_IMAGE_SIZE",
    "register_template",
    "get_template",
    "format_prompt",
    "format_target",
    "chat_messages",
    "JUDGES",
    "extract_m3cot_answer",
    "ivtlr_m3cot_candidates",
    "extract_ivtlr_scienceqa_index",
    "score_m3cot",
    "score_scienceqa",
    "MirageExample",
    "MirageDataset",
    "load_mirage_jsonl",
    "load_vsp",
    "score_vsp",
    "vsp_outcome",
    "accuracy",
    "accuracy_by",
]
