"""Rationale → reasoning steps, for the progressive latent curriculum.

IVT-LR (FYYDCC/IVT-LR, ``qwen_vl/qwenvl_run.py`` and ``qwenvl_run_sqa.py``, ``process_example``)
turns a rationale into at most 3 steps like this: newlines become spaces, the text is split on the
literal string ``". "``, a trailing empty piece is dropped, and when there are more than 3 pieces
they are merged into 3 contiguous chunks whose sizes are ``n // 3`` plus one for each of the first
``n % 3`` chunks (so 7 pieces → 3, 2, 2), the pieces of a chunk re-joined with ``". "``.

:func:`split_rationale` keeps that chunking rule exactly (for any ``max_steps``) and differs only in
the sentence splitter, on purpose:

* a sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing quotes/brackets) followed
  by whitespace; IVT-LR splits on ``". "`` only;
* no split after a known abbreviation (``e.g.``, ``i.e.``, ``etc.``, ``Dr.``, ``vs.``, ``Fig.``,
  ``U.S.``, ... see :data:`ABBREVIATIONS`), which IVT-LR would cut; decimals (``3.5``) never split
  in either, as no whitespace follows the point. Single-letter initials (``J. K. Rowling``) do split:
  treating them as abbreviations would glue "... the answer is B. Next ..." together, which is far
  more common in these rationales. Words that also end sentences ("no", "in", "min") are not
  abbreviations here;
* sentences keep their final punctuation and a chunk joins its sentences with one space, so every
  step ends with its period, where IVT-LR's steps (except the last) lose it.

Whitespace (newlines included) is collapsed to single spaces first, as in IVT-LR.
"""

from __future__ import annotations

import re

__all__ = ["split_sentences", "merge_into_steps", "split_rationale", "ABBREVIATIONS"]

ABBREVIATIONS = frozenset(
    {
        "e.g", "i.e", "etc", "vs", "cf", "al", "approx", "ca", "mr", "mrs", "ms", "dr", "prof",
        "sr", "jr", "st", "mt", "fig", "figs", "eq", "eqs", "vol", "pp", "dept", "inc", "ltd",
        "corp", "jan", "feb", "apr", "jun", "jul", "aug", "sept", "oct", "nov", "dec", "u.s",
        "u.k", "a.m", "p.m", "ph.d", "b.c", "a.d", "lbs", "oz", "ft", "yd", "hrs", "sq", "esp",
    }
)
"""Words (lower case, without the final period) after which a period does not end a sentence."""

# A terminator run (. ! ?), optional closing quotes/brackets, then whitespace: a candidate boundary.
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)")
# The word right before a terminating period, e.g. "e.g" in "... e.g." or "Dr" in "Dr.".
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")


def _is_abbreviation(text_before_period: str) -> bool:
    m = _WORD_BEFORE.search(text_before_period)
    if m is None:
        return False
    return m.group(1).lower() in ABBREVIATIONS


def split_sentences(text: str | None) -> list[str]:
    """Split ``text`` into sentences; returns ``[]`` for ``None`` or blank text.

    Whitespace runs become single spaces; a sentence ends at ``.``/``!``/``?`` (plus closing quotes
    or brackets) followed by whitespace, except after an abbreviation in :data:`ABBREVIATIONS`.
    Sentences keep their punctuation and are stripped.
    """
    if text is None:
        return []
    text = " ".join(str(text).split())
    if not text:
        return []
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        punct = m.group(0)
        if punct[0] == "." and len(punct.rstrip("\"'”’)]")) == 1 and _is_abbreviation(text[start : m.start()]):
            continue
        piece = text[start : m.end()].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def merge_into_steps(sentences: list[str], max_steps: int = 3) -> list[str]:
    """Merge ``sentences`` into at most ``max_steps`` contiguous chunks, returned as strings.

    With ``n <= max_steps`` sentences each is its own step. Otherwise chunk ``i`` holds
    ``n // max_steps`` sentences plus one if ``i < n % max_steps`` (IVT-LR's rule), joined by a space.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n = len(sentences)
    if n <= max_steps:
        return list(sentences)
    size, extra = divmod(n, max_steps)
    steps: list[str] = []
    start = 0
    for i in range(max_steps):
        end = start + size + (1 if i < extra else 0)
        steps.append(" ".join(sentences[start:end]))
        start = end
    return steps


def split_rationale(text: str | None, max_steps: int = 3) -> list[str]:
    """Split a rationale into at most ``max_steps`` reasoning steps (strings, in order).

    Returns ``[]`` for ``None``/blank text, ``[sentence]`` for a single sentence, and otherwise the
    sentences of :func:`split_sentences` merged by :func:`merge_into_steps`. Joining the steps with
    spaces gives back the whitespace-normalised rationale.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return merge_into_steps(split_sentences(text), max_steps)
