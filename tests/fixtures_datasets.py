"""Tiny M3CoT- and ScienceQA-format datasets on disk, for tests (``from fixtures_datasets import ...``).

Each writer produces the published Hugging Face layout, ``<root>/data/<split>-0000k-of-0000n[-hash].parquet``,
written through ``datasets`` with its ``Image`` feature (so the parquet carries the Hugging Face
feature metadata and images are embedded PNG bytes, a struct ``{bytes, path}``), and returns the
rows it wrote, ``{split: [row dict, ...]}`` in file order (image cells as ``{"bytes", "path"}`` or
``None``). Everything is deterministic in ``seed``.

Images are 56×56 RGB (4 Qwen2-VL merged patches): low-amplitude noise plus a bright square in the
quadrant ``answer_index % 4``, so the answer is visible in the image.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIZE = 56
_COLORS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 200, 30)]
_SENTENCES = [
    "The object in the image is about 2.5 cm wide.",
    "Animals such as birds, e.g. robins, have feathers.",
    "The square is in one corner of the picture.",
    "Its color tells us which option matches!",
    "Is the square near the top?",
    "Dr. Smith measured 3.14 units on the left side.",
    "We compare the options one by one.",
    "Only one option fits the picture.",
]
_DOMAINS = [("science", "physics"), ("commonsense", "social"), ("mathematics", "geometry")]
_CHOICE_WORDS = ["red square", "green square", "blue square", "yellow square", "no square"]


def _rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), i])


def make_image(seed: int, split: str, i: int, answer_index: int) -> bytes:
    """Return PNG bytes of the deterministic 56×56 RGB fixture image of row ``i`` of ``split``."""
    rng = _rng(seed, split, i)
    pixels = rng.integers(0, 40, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    half = IMAGE_SIZE // 2
    q = answer_index % 4
    y0, x0 = (q // 2) * half, (q % 2) * half
    pixels[y0 + 4 : y0 + half - 4, x0 + 4 : x0 + half - 4] = _COLORS[q]
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _rationale(rng: np.random.Generator, n_sentences: int) -> str:
    picks = rng.permutation(len(_SENTENCES))[:n_sentences]
    return " ".join(_SENTENCES[k] for k in picks)


def _write_split(root: Path, split: str, rows: list[dict[str, Any]], features, num_shards: int, suffix: str) -> None:
    import datasets
    import pyarrow.parquet as pq

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    columns = {name: [r[name] for r in rows] for name in features}
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    bounds = np.linspace(0, len(rows), num_shards + 1).astype(int)
    for k in range(num_shards):
        tag = f"-{zlib.crc32(f'{split}{k}'.encode()):08x}" if suffix == "hash" else ""
        path = data / f"{split}-{k:05d}-of-{num_shards:05d}{tag}.parquet"
        pq.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), path)


def m3cot_features():
    """Return the ``datasets.Features`` of the published M3CoT parquet."""
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    return Features(
        {
            "id": Value("string"),
            "category": Value("string"),
            "image_id": Value("string"),
            "question": Value("string"),
            "choices": List(Value("string")),
            "context": Value("string"),
            "answer": Value("string"),
            "rationale": Value("string"),
            "split": Value("string"),
            "image": HFImage(),
            "domain": Value("string"),
            "topic": Value("string"),
        }
    )


def scienceqa_features():
    """Return the ``datasets.Features`` of the published ScienceQA (derek-thomas) parquet."""
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    return Features(
        {
            "image": HFImage(),
            "question": Value("string"),
            "choices": List(Value("string")),
            "answer": Value("int8"),
            "hint": Value("string"),
            "task": Value("string"),
            "grade": Value("string"),
            "subject": Value("string"),
            "topic": Value("string"),
            "category": Value("string"),
            "skill": Value("string"),
            "lecture": Value("string"),
            "solution": Value("string"),
        }
    )


def m3cot_rows(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Return ``n`` deterministic M3CoT rows for ``split`` (row ``i`` has ``i % 7`` rationale sentences)."""
    rows = []
    source_split = "dev" if split == "validation" else split
    for i in range(n):
        rng = _rng(seed, split, i)
        n_choices = 2 + i % 4
        answer_index = int(rng.integers(0, n_choices))
        domain, topic = _DOMAINS[i % len(_DOMAINS)]
        rows.append(
            {
                "id": f"m3cot-{split}-{seed}-{i}",
                "category": f"category-{i % 3}",
                "image_id": f"img-{split}-{i}",
                "question": f"Which square does picture {i} show?",
                "choices": _CHOICE_WORDS[:n_choices],
                "context": "" if i % 2 == 0 else f"Picture {i} was taken indoors.",
                "answer": "ABCDEF"[answer_index],
                "rationale": _rationale(rng, i % 7),
                "split": source_split,
                "image": {"bytes": make_image(seed, split, i, answer_index), "path": None},
                "domain": domain,
                "topic": topic,
            }
        )
    return rows


def scienceqa_rows(split: str, n: int, seed: int, image_every: int = 3) -> list[dict[str, Any]]:
    """Return ``n`` deterministic ScienceQA rows for ``split``; every ``image_every``-th row
    (``i % image_every == image_every - 1``) has no image, and lecture/solution/hint vary."""
    rows = []
    for i in range(n):
        rng = _rng(seed + 1000, split, i)
        n_choices = 2 + i % 4
        answer_index = int(rng.integers(0, n_choices))
        has_image = image_every <= 0 or i % image_every != image_every - 1
        rows.append(
            {
                "image": {"bytes": make_image(seed + 1000, split, i, answer_index), "path": None}
                if has_image
                else None,
                "question": f"Which color is the square in figure {i}?",
                "choices": _CHOICE_WORDS[:n_choices],
                "answer": answer_index,
                "hint": "" if i % 2 == 0 else f"Figure {i} shows a square.",
                "task": "closed choice",
                "grade": f"grade{1 + i % 8}",
                "subject": "natural science",
                "topic": "colors",
                "category": "Identify colors",
                "skill": "Identify the color of a shape",
                "lecture": "" if i % 4 == 0 else _rationale(rng, 1 + i % 3),
                "solution": "" if i % 5 == 0 else _rationale(rng, 1 + i % 2),
            }
        )
    return rows


def write_m3cot_fixture(
    root: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    *,
    n_validation: int = 0,
    num_shards: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Write an M3CoT-format dataset under ``root`` and return ``{split: rows}``.

    Splits with zero rows are not written. ``num_shards`` splits each split over that many files.
    """
    root = Path(root)
    features = m3cot_features()
    written = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        if n <= 0:
            continue
        rows = m3cot_rows(split, n, seed)
        _write_split(root, split, rows, features, num_shards, suffix="")
        written[split] = rows
    return written


def write_scienceqa_fixture(
    root: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    *,
    n_validation: int = 0,
    num_shards: int = 1,
    image_every: int = 3,
) -> dict[str, list[dict[str, Any]]]:
    """Write a ScienceQA-format dataset (file names with the published hash suffix) under ``root``
    and return ``{split: rows}``; every ``image_every``-th row has no image (0: all have one)."""
    root = Path(root)
    features = scienceqa_features()
    written = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        if n <= 0:
            continue
        rows = scienceqa_rows(split, n, seed, image_every)
        _write_split(root, split, rows, features, num_shards, suffix="hash")
        written[split] = rows
    return written
