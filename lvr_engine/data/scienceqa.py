"""ScienceQA (Lu et al., 2022) from a local copy of the Hugging Face repository derek-thomas/ScienceQA.

Layout: ``<data_dir>/data/{train,validation,test}-*.parquet`` (published as
``data/train-00000-of-00001-1028f23e353fbe3e.parquet`` and the like). Columns: image (embedded, may
be null: about half the questions have no image), question, choices (list of str), answer (int
index), hint, task, grade, subject, topic, category, skill, lecture, solution.

Mapping to :class:`ReasoningExample` (as IVT-LR's ``qwen_vl/qwenvl_run_sqa.py``): rationale =
lecture + " " + solution (either may be empty), context = hint. The dataset has no id column, so
``id = "scienceqa-<split>-<row>"``, row being the index in the split (IVT-LR keys its ScienceQA
results by the same index). Where IVT-LR falls back to the answer index as the rationale when both
lecture and solution are empty, the steps here are ``[]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .example import (
    LETTERS,
    ReasoningDataset,
    ReasoningExample,
    decode_image,
    load_split,
)
from .steps import split_rationale

__all__ = ["SCIENCEQA_COLUMNS", "load_scienceqa", "scienceqa_row_to_example", "scienceqa_rationale"]

SCIENCEQA_COLUMNS = (
    "image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic",
    "category", "skill", "lecture", "solution",
)
"""The columns every ScienceQA shard must have."""

_METADATA_COLUMNS = ("task", "grade", "subject", "topic", "category", "skill")


def scienceqa_rationale(lecture: str | None, solution: str | None) -> str:
    """Return lecture and solution, each stripped, joined by one space (``""`` if both are empty)."""
    parts = [p.strip() for p in (lecture or "", solution or "") if p and p.strip()]
    return " ".join(parts)


def scienceqa_row_to_example(
    row: Mapping[str, Any],
    row_index: int,
    *,
    split: str,
    base_dir: str | os.PathLike | None = None,
    max_steps: int = 3,
) -> ReasoningExample:
    """Convert one ScienceQA row (image undecoded) to a :class:`ReasoningExample`.

    ``row_index`` is the row's index in the split (it makes the id). ``ValueError`` when the answer
    index is not one of the choices.
    """
    ex_id = f"scienceqa-{split}-{row_index}"
    choices = [str(c) for c in (row["choices"] or [])]
    answer_index = row["answer"]
    if answer_index is None or not 0 <= int(answer_index) < min(len(choices), len(LETTERS)):
        raise ValueError(
            f"ScienceQA row {ex_id}: answer index {answer_index!r} is out of range for {len(choices)} choices"
        )
    answer_index = int(answer_index)
    rationale = scienceqa_rationale(row["lecture"], row["solution"])
    metadata = {k: row[k] for k in _METADATA_COLUMNS}
    metadata.update(
        dataset="scienceqa", split=split, row=row_index,
        lecture=row["lecture"] or "", solution=row["solution"] or "",
    )
    return ReasoningExample(
        id=ex_id,
        image=decode_image(row["image"], base_dir),
        question=row["question"] or "",
        choices=choices,
        answer=LETTERS[answer_index],
        answer_index=answer_index,
        steps=split_rationale(rationale, max_steps),
        context=row["hint"] or "",
        metadata=metadata,
        rationale=rationale,
    )


def load_scienceqa(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    require_image: bool = False,
    max_steps: int = 3,
    cache_dir: str | os.PathLike | None = None,
) -> ReasoningDataset:
    """Load one ScienceQA split from ``<data_dir>/data/<split>-*.parquet``.

    Returns a lazy :class:`ReasoningDataset` of :class:`ReasoningExample` (rows decoded on access;
    ``image`` is ``None`` for the text-only questions). ``split`` is "train", "validation" (alias
    "dev"/"val") or "test". ``require_image=True`` keeps only the rows with an image, as IVT-LR
    does (ids keep the original row index). ``cache_dir`` is the ``datasets`` Arrow cache. Raises
    ``FileNotFoundError`` (missing directory, ``data/`` folder or shards) or ``ValueError``
    (missing columns), naming the path and what was expected.
    """
    return load_split(data_dir, split, dataset_name="ScienceQA", name="scienceqa", columns=SCIENCEQA_COLUMNS,
                      row_to_example=scienceqa_row_to_example, require_image=require_image, max_steps=max_steps,
                      cache_dir=cache_dir)
