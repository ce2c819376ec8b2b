"""M3CoT (Chen et al., 2024) from a local copy of the Hugging Face repository LightChen2333/M3CoT.

Layout: ``<data_dir>/data/{train,validation,test}-*.parquet`` (the repository's ``configs`` map each
split to ``data/<split>-*``; 7,863 / 1,108 / 2,318 rows). Columns: id, category, image_id, question,
choices (list of str), context, answer (a letter), rationale, split, image (embedded), domain, topic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .example import (
    ReasoningDataset,
    ReasoningExample,
    decode_image,
    index_for,
    load_split,
)
from .steps import split_rationale

__all__ = ["M3COT_COLUMNS", "load_m3cot", "m3cot_row_to_example"]

M3COT_COLUMNS = (
    "id", "category", "image_id", "question", "choices", "context", "answer", "rationale",
    "split", "image", "domain", "topic",
)
"""The columns every M3CoT shard must have."""

_METADATA_COLUMNS = ("category", "image_id", "domain", "topic")


def m3cot_row_to_example(
    row: Mapping[str, Any],
    row_index: int,
    *,
    split: str,
    base_dir: str | os.PathLike | None = None,
    max_steps: int = 3,
) -> ReasoningExample:
    """Convert one M3CoT row (image undecoded) to a :class:`ReasoningExample`.

    ``row_index`` is the row's index in the split; ``base_dir`` resolves relative image paths.
    ``ValueError`` (naming the id) when the answer is not the letter of one of the choices.
    """
    choices = [str(c) for c in (row["choices"] or [])]
    raw_answer = "" if row["answer"] is None else str(row["answer"])
    try:
        answer_index = index_for(raw_answer)
    except ValueError:
        raise ValueError(f"M3CoT row {row['id']!r} ({split}): answer {raw_answer!r} is not a letter") from None
    if answer_index >= len(choices):
        raise ValueError(
            f"M3CoT row {row['id']!r} ({split}): answer {raw_answer!r} but only {len(choices)} choices"
        )
    rationale = row["rationale"] or ""
    metadata = {k: row[k] for k in _METADATA_COLUMNS}
    # "split" is the split loaded; the row's own split column (M3CoT says "dev" for validation) is kept.
    metadata.update(dataset="m3cot", split=split, row=row_index, source_split=row["split"])
    return ReasoningExample(
        id=str(row["id"]),
        image=decode_image(row["image"], base_dir),
        question=row["question"] or "",
        choices=choices,
        answer=raw_answer.strip().upper(),
        answer_index=answer_index,
        steps=split_rationale(rationale, max_steps),
        context=row["context"] or "",
        metadata=metadata,
        rationale=rationale,
    )


def load_m3cot(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    require_image: bool = False,
    max_steps: int = 3,
    cache_dir: str | os.PathLike | None = None,
) -> ReasoningDataset:
    """Load one M3CoT split from ``<data_dir>/data/<split>-*.parquet``.

    Returns a lazy :class:`ReasoningDataset` of :class:`ReasoningExample` (rows decoded on access).
    ``split`` is "train", "validation" (alias "dev"/"val") or "test". ``require_image=True`` keeps
    only rows with an image, as IVT-LR does. ``max_steps`` bounds the rationale steps.
    ``cache_dir`` is the ``datasets`` Arrow cache. Raises ``FileNotFoundError`` (missing directory,
    ``data/`` folder or shards) or ``ValueError`` (missing columns), naming the path and what was
    expected.
    """
    return load_split(data_dir, split, dataset_name="M3CoT", name="m3cot", columns=M3COT_COLUMNS,
                      row_to_example=m3cot_row_to_example, require_image=require_image, max_steps=max_steps,
                      cache_dir=cache_dir)
