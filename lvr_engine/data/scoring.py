"""Answer extraction and accuracy for M3CoT and ScienceQA, and VSP spatial planning (Mirage) at the end.

The default judge is M3CoT's official one (LightChen233/M3CoT, ``utils/metric.py``,
``judge_answer``; used by ``evaluate.py``), re-implemented here with the same precedence:

1. if the output contains ``"[Answer]"``, only the text after the last ``"[Answer]"`` and before
   any following ``"[Rationale]"`` or ``"[Context]"`` is judged;
2. the last parenthesised letter ``"(X)"`` (either case, any letter) wins;
3. else every choice whose text occurs in the output (case-insensitive substring) is a hit and the
   hit with the *highest choice index* wins (not the last in the output);
4. else ``\\n . , ! ?`` become spaces, the text is split on single spaces, and the highest-index
   choice letter that is a whole token in upper case wins ("B", "B." ...);
5. else the same with the lower-case letter ("b"; note that the article "a" counts as choice A);
6. else no answer (the official code's ``"FAILED"``), which is never correct.

Quirks kept for fidelity: an empty choice text matches every output at rule 3, and rule 2 accepts
letters beyond the number of choices. The official code only knows letters A–F; here any A–Z.

IVT-LR's own scoring (``qwen_vl/infer.py`` and ``qwen_vl/infer_sqa.py`` of FYYDCC/IVT-LR, read in
the fork faaiz004/IVT-LR) is
available with ``judge="ivtlr"``: for M3CoT an output is correct when the gold letter is among the
letters right after any "the answer is" / "Answer:" (case-insensitive, so "the answer is because"
yields "B" — their quirk too); for ScienceQA the first digit after "the answer is" (three patterns
tried in order) is the 0-based answer index, else the first letter there, mapped to an index.

``judge="ivtlr_infer"`` is the rule of the official inference loop itself (``qwen_vl/infer.py`` of
FYYDCC/IVT-LR), for the ``"ivtlr_infer"`` prompt. It judges the *whole* decoded sequence: infer.py decodes
the prompt and the output together with ``skip_special_tokens=True``, so the chat markers, image pads and
``<|latent|>`` placeholders vanish and the text reads ``...B.{choice}\nAnswer:\nassistant\n<output>``.
Then:

1. an ``assistant`` that follows ``answer:`` with only whitespace between (any case) is deleted — the
   role line of the generation prompt — which leaves the prompt's own ``Answer:`` directly before the
   output;
2. every letter that follows "the answer is" or "Answer:" (any case; whitespace and newlines may come
   between; the letter is upper-cased) is a candidate;
3. the output is correct iff the gold letter is among the candidates.

Because of 1, the first character the model writes counts when it is a letter: "B. The square is blue"
yields {"B"}, "Therefore, the answer is C" yields {"T", "C"}, "I think (A)" yields {"I"}. Matches do not
overlap, so "The answer is C" yields {"T"} alone (the prompt's "Answer:" takes the "T", and "he answer
is" is no match), and a parenthesised letter is never read ("... the answer is (B)" adds nothing).
Every candidate is accepted, so an output naming two letters is right for either. Kept as the official
code has it, for comparable numbers; pass the decoded prompt + output as ``pred_text``
(:func:`lvr_engine.evaluation.evaluate` does).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .example import LETTERS, ReasoningExample

__all__ = [
    "extract_m3cot_answer",
    "ivtlr_m3cot_candidates",
    "ivtlr_infer_candidates",
    "extract_ivtlr_scienceqa_index",
    "score_m3cot",
    "score_scienceqa",
    "accuracy",
    "accuracy_by",
    "JUDGES",
    "VSPOutcome",
    "extract_boxed",
    "vsp_moves",
    "simulate_vsp",
    "vsp_outcome",
    "score_vsp",
]

JUDGES = ("m3cot", "ivtlr", "ivtlr_infer")
"""Names accepted by the ``judge`` argument of the scoring functions."""

_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_PUNCT_TO_SPACE = re.compile(r"[\n.,!?]")
_IVTLR_M3COT = re.compile(r"(?:the\s+answer\s+is|Answer:)\s*([A-Z])", re.IGNORECASE)
_ROLE_AFTER_ANSWER = re.compile(r"(?<=answer:)\s*assistant\b", re.IGNORECASE)
_IVTLR_SQA_DIGIT = [
    re.compile(r"Therefore,?\s*the\s+answer\s+is\s+(\d)", re.IGNORECASE),
    re.compile(r"the\s+answer\s+is\s+(\d)", re.IGNORECASE),
    re.compile(r"answer\s+is:?\s*(\d)", re.IGNORECASE),
]
_IVTLR_SQA_LETTER = [
    re.compile(r"Therefore,?\s*the\s+answer\s+is\s+([A-Z])", re.IGNORECASE),
    re.compile(r"the\s+answer\s+is\s+([A-Z])", re.IGNORECASE),
    re.compile(r"answer\s+is:?\s*([A-Z])", re.IGNORECASE),
]


def extract_m3cot_answer(text: str, choices: Sequence[str]) -> str | None:
    """Return the upper-case letter M3CoT's official judge reads from ``text``, or ``None``.

    See the module docstring for the precedence of the rules.
    """
    if text is None:
        return None
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    if "[Answer]" in text:
        text = text.split("[Answer]")[-1].split("[Rationale]")[0].split("[Context]")[0]
    parens = _PAREN_LETTER.findall(text)
    if parens:
        return parens[-1].upper()
    lowered = text.lower()
    hits = [LETTERS[i] for i, c in enumerate(choices) if str(c).lower() in lowered]
    if hits:
        return hits[-1]
    tokens = _PUNCT_TO_SPACE.sub(" ", text).split(" ")
    for case in (str.upper, str.lower):
        hits = [LETTERS[i] for i in range(len(choices)) if case(LETTERS[i]) in tokens]
        if hits:
            return hits[-1]
    return None


def ivtlr_m3cot_candidates(text: str) -> set[str]:
    """Return the upper-case letters right after "the answer is" or "Answer:" in ``text`` (IVT-LR's rule)."""
    return {m.group(1).upper() for m in _IVTLR_M3COT.finditer(text or "")}


def ivtlr_infer_candidates(full_text: str) -> set[str]:
    """Return the letters ``qwen_vl/infer.py`` accepts in ``full_text``, the prompt and the output decoded
    together with ``skip_special_tokens=True``: :func:`ivtlr_m3cot_candidates` after deleting each
    ``assistant`` that follows ``answer:`` (module docstring)."""
    return ivtlr_m3cot_candidates(_ROLE_AFTER_ANSWER.sub("", full_text or ""))


def extract_ivtlr_scienceqa_index(text: str) -> int | None:
    """Return the answer index IVT-LR's ScienceQA scorer reads from ``text``, or ``None``.

    Digit patterns first (the digit is the 0-based index), then letter patterns (A → 0).
    """
    text = text or ""
    for pattern in _IVTLR_SQA_DIGIT:
        m = pattern.search(text)
        if m:
            return int(m.group(1))
    for pattern in _IVTLR_SQA_LETTER:
        m = pattern.search(text)
        if m:
            return LETTERS.index(m.group(1).upper())
    return None


def _check_judge(judge: str) -> None:
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; known judges: {list(JUDGES)}")


def score_m3cot(pred_text: str, example: ReasoningExample, judge: str = "m3cot") -> bool:
    """Return whether ``pred_text`` answers ``example`` correctly.

    ``judge="m3cot"``: the official judge's letter (:func:`extract_m3cot_answer`) equals
    ``example.answer``. ``judge="ivtlr"``: ``example.answer`` is among
    :func:`ivtlr_m3cot_candidates`. ``judge="ivtlr_infer"``: ``pred_text`` is the decoded prompt + output
    and ``example.answer`` is among :func:`ivtlr_infer_candidates`.
    """
    _check_judge(judge)
    if judge == "ivtlr_infer":
        return example.answer in ivtlr_infer_candidates(pred_text)
    if judge == "ivtlr":
        return example.answer in ivtlr_m3cot_candidates(pred_text)
    return extract_m3cot_answer(pred_text, example.choices) == example.answer


def score_scienceqa(pred_text: str, example: ReasoningExample, judge: str = "m3cot") -> bool:
    """Return whether ``pred_text`` picks the gold choice index of ``example``.

    ``judge="m3cot"``: the letter of :func:`extract_m3cot_answer`, mapped to its index, equals
    ``example.answer_index``. ``judge="ivtlr"``: :func:`extract_ivtlr_scienceqa_index` equals it
    (for models trained with the ``"ivtlr_scienceqa"`` template, whose answers are indices).
    ``judge="ivtlr_infer"``: the gold choice's letter is among :func:`ivtlr_infer_candidates` of
    ``pred_text``, the decoded prompt + output (infer.py's M3CoT rule applied to lettered options).
    """
    _check_judge(judge)
    if judge == "ivtlr_infer":
        return LETTERS[example.answer_index] in ivtlr_infer_candidates(pred_text)
    if judge == "ivtlr":
        index = extract_ivtlr_scienceqa_index(pred_text)
    else:
        letter = extract_m3cot_answer(pred_text, example.choices)
        index = None if letter is None else LETTERS.index(letter)
    return index == example.answer_index


def accuracy(correct: Iterable[bool]) -> float:
    """Return the fraction of true values in ``correct``; ``ValueError`` when it is empty."""
    values = [bool(c) for c in correct]
    if not values:
        raise ValueError("accuracy of an empty list of results is undefined")
    return sum(values) / len(values)


def accuracy_by(
    examples: Sequence[ReasoningExample], correct: Sequence[bool], key: str = "domain"
) -> dict[Any, float]:
    """Return ``{metadata[key]: accuracy}`` over the groups of ``examples`` (e.g. M3CoT's domains).

    ``examples`` and ``correct`` are parallel; an example without ``key`` in its metadata falls in
    group ``None``.
    """
    if len(examples) != len(correct):
        raise ValueError(f"{len(examples)} examples but {len(correct)} results")
    groups: dict[Any, list[bool]] = defaultdict(list)
    for ex, ok in zip(examples, correct, strict=True):
        groups[ex.metadata.get(key)].append(bool(ok))
    return {k: accuracy(v) for k, v in groups.items()}


# -- VSP spatial planning (Mirage's benchmark) ------------------------------------------------------------
_VSP_MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}


class VSPOutcome(NamedTuple):
    """How an answer fares on a VSP map: ``success`` (the walk ends on the goal), ``invalid`` (no boxed answer,
    or an empty last box: our extra figure, also a failure), ``status`` in words and the ``moves`` walked."""

    success: bool
    invalid: bool
    status: str
    moves: str


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces inside balanced), stripped; None when there
    is none or it is never closed (mathruler's ``extract_boxed_content``, which Mirage's test script uses)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    body = text[start + len("\\boxed{"):]
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return body[:i].strip()
            depth -= 1
    return None


def vsp_moves(answer: str) -> str:
    """The moves of a boxed VSP answer: the letters U/D/L/R, in order, of its upper-cased text, so ``"R,D"`` and
    ``"RIGHT, DOWN"`` both give ``"RD"`` (as Mirage's ``parse_action_sequence``; other letters are dropped)."""
    return "".join(c for c in answer.upper() if c in _VSP_MOVES)


def simulate_vsp(map_desc: Sequence[Sequence[int]], moves: str) -> tuple[bool, str]:
    """Walk ``moves`` on ``map_desc`` (rows of cells: 1 start, 2 goal, -1 hole, 0 ice) from the start cell, as
    Mirage's ``simulate_vsp``: a move off the map is ignored; stepping on a hole fails at once; success iff the
    walk ends on the goal. Returns ``(success, status)``; ``ValueError`` when the map has no start cell."""
    start = next(((r, c) for r, row in enumerate(map_desc) for c, v in enumerate(row) if v == 1), None)
    if start is None:
        raise ValueError(f"VSP map {map_desc!r} has no start cell (value 1)")
    r, c = start
    for m in moves:
        dr, dc = _VSP_MOVES[m]
        nr, nc = r + dr, c + dc
        if not (0 <= nr < len(map_desc) and 0 <= nc < len(map_desc[nr])):
            continue
        r, c = nr, nc
        if map_desc[r][c] == -1:
            return False, "fell in a hole"
    return (True, "reached the goal") if map_desc[r][c] == 2 else (False, "did not reach the goal")


def vsp_outcome(pred_text: str, map_desc: Sequence[Sequence[int]]) -> VSPOutcome:
    """Score one answer on one map: the moves of the last boxed answer walked on ``map_desc``."""
    boxed = extract_boxed(pred_text)
    if boxed is None:
        return VSPOutcome(False, True, "no boxed answer", "")
    if not boxed:
        return VSPOutcome(False, True, "empty boxed answer", "")
    moves = vsp_moves(boxed)
    ok, status = simulate_vsp(map_desc, moves)
    return VSPOutcome(ok, False, status, moves)


def score_vsp(pred_text: str, example: ReasoningExample, judge: str = "m3cot") -> bool:
    """Whether ``pred_text`` solves ``example``'s VSP map (``metadata["map_desc"]``; :func:`vsp_outcome`). VSP has
    one rule: ``judge`` (which picks a letter rule for the other datasets) is checked and otherwise unused."""
    _check_judge(judge)
    map_desc = example.metadata.get("map_desc") if isinstance(example.metadata, dict) else None
    if map_desc is None:
        raise ValueError(f"example {example.id!r} has no map_desc: it is not a VSP spatial-planning question")
    return vsp_outcome(pred_text, map_desc).success
