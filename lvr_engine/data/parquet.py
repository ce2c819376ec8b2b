"""The parquet reader behind the benchmark loaders: find a split's shards in the published Hugging Face layout
(``<data_dir>/data/<split>-*.parquet``), check their columns, read them with ``datasets`` (images left undecoded),
and find the rows that carry an image. ``datasets``/``pyarrow`` are imported only when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["find_split_shards", "check_columns", "read_parquet_split", "rows_with_image"]

# Split names that mean the same thing across the published layouts: the Hugging Face repositories
# use "validation", the M3CoT GitHub code calls the same split "dev".
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "validation": ("validation", "dev", "val"),
    "dev": ("dev", "validation", "val"),
    "val": ("val", "validation", "dev"),
}


def find_split_shards(data_dir: str | os.PathLike, split: str, dataset_name: str) -> list[Path]:
    """Return the parquet shards of ``split`` under ``<data_dir>/data/``, sorted by name.

    Accepts ``data/<split>-*.parquet`` (the published naming, e.g.
    ``data/test-00000-of-00001-f0e719df791966ff.parquet``) and ``data/<split>.parquet``. The split
    names "validation", "dev" and "val" stand in for one another. Raises ``FileNotFoundError``
    naming the path and the expected files when the directory, its ``data/`` folder, or the
    split's shards are missing.
    """
    root = Path(data_dir).expanduser()
    expected = f"{root}/data/{split}-*.parquet (e.g. data/{split}-00000-of-00001.parquet)"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{dataset_name} dataset directory {root} does not exist (or is not a directory); "
            f"expected the Hugging Face parquet layout with shards at {expected}"
        )
    data = root / "data"
    if not data.is_dir():
        raise FileNotFoundError(
            f"{dataset_name} dataset directory {root} has no data/ folder; expected the Hugging Face "
            f"parquet layout with shards at {expected}"
        )
    shards: list[Path] = []
    for name in _SPLIT_ALIASES.get(split, (split,)):
        shards = sorted(set(data.glob(f"{name}-*.parquet")) | set(data.glob(f"{name}.parquet")))
        if shards:
            break
    if not shards:
        present = sorted(p.name for p in data.glob("*.parquet"))
        raise FileNotFoundError(
            f"{dataset_name}: no parquet shards for split {split!r} in {data}; expected {expected}. "
            f"Parquet files present: {present if present else 'none'}"
        )
    return shards


def check_columns(shards: Sequence[Path], required: Sequence[str], dataset_name: str) -> None:
    """Raise ``ValueError`` naming the shard and the missing columns if a shard lacks a required column."""
    import pyarrow.parquet as pq

    for shard in shards:
        try:
            names = set(pq.read_schema(shard).names)
        except Exception as exc:  # not a parquet file, truncated, ...
            raise ValueError(f"{dataset_name}: cannot read the parquet schema of {shard}: {exc}") from exc
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(
                f"{dataset_name}: shard {shard} is missing column(s) {missing}; expected columns "
                f"{list(required)} (found {sorted(names)})"
            )


def read_parquet_split(shards: Sequence[Path], split: str, cache_dir: str | os.PathLike | None = None):
    """Read ``shards`` with ``datasets`` and return a ``datasets.Dataset`` with the image undecoded.

    The ``image`` column comes back as ``Image(decode=False)`` cells (``{"bytes", "path"}`` dicts or
    ``None``) whether or not the parquet carries the Hugging Face feature metadata, so that
    :func:`~lvr_engine.data.example.decode_image` decides how to decode. ``cache_dir`` is passed to ``datasets``
    (its Arrow cache; default ``~/.cache/huggingface/datasets``).
    """
    import datasets
    import pyarrow.parquet as pq

    # datasets fails on a shard without rows ("BatchSize must be greater than 0"): leave such shards out, and
    # say so when none is left
    nonempty = [s for s in shards if pq.ParquetFile(s).metadata.num_rows > 0]
    if not nonempty:
        raise ValueError(f"split {split!r} has no rows: {[str(s) for s in shards]} hold 0 rows")
    shards = nonempty
    ds = datasets.load_dataset(
        "parquet",
        data_files={split: [str(s) for s in shards]},
        split=split,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    if "image" in ds.column_names:
        feat = ds.features["image"]
        if isinstance(feat, datasets.Image):
            if feat.decode:
                ds = ds.cast_column("image", datasets.Image(decode=False))
        elif isinstance(feat, dict) and {"bytes", "path"} <= set(feat):
            ds = ds.cast_column("image", datasets.Image(decode=False))
        else:
            raise ValueError(
                f"column 'image' of {shards[0]} has type {feat}; expected the datasets Image feature "
                "(a struct {bytes: binary, path: string})"
            )
    return ds


def rows_with_image(ds) -> list[int]:
    """Return the indices of the rows of ``ds`` whose ``image`` cell holds bytes or a path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.data.column("image")  # the Arrow table behind ds (no indices mapping after load)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    has = pc.or_(
        pc.fill_null(pc.is_valid(pc.struct_field(col, "bytes")), False),
        pc.fill_null(pc.is_valid(pc.struct_field(col, "path")), False),
    )
    has = pc.and_(has, pc.is_valid(col))
    return [i for i, ok in enumerate(has.to_pylist()) if ok]
