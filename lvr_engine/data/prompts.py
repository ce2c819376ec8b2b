"""Prompt and target text for the benchmarks, with IVT-LR's format as the default.

The ``"ivtlr"`` template reproduces the training format of the official code (FYYDCC/IVT-LR
``qwen_vl/qwenvl_run.py``, ``process_example``, for M3CoT; ``qwen_vl/qwenvl_run_sqa.py`` for
ScienceQA and ``qwen_vl/dataset.py``, ``get_dataset``/``get_cot_latent_dataset``, for the target,
as found in the forks faaiz004/IVT-LR and HaiderDawoodKhan/IVT-LR)::

    [Question]:{<question>}
    [Options]:
    (A).{<choice 0>}
    (B).{<choice 1>}
    Answer:
    <the user text ends with this newline>

The user text goes into a Qwen2-VL chat turn after the image (:func:`chat_messages`); the assistant
text the model is trained on is, per curriculum stage ``s``: ``s`` latent positions (the trainer's
business), then ``steps[s:]`` each followed by ``"\\n"``, then ``"Therefore, the answer is B"`` and
EOS (the trainer appends the tokenizer's EOS). Two quirks of the official code: its prompt omits
the context (M3CoT ``context``, ScienceQA ``hint``) — ``"ivtlr"`` does too, ``"ivtlr_context"``
adds it; its ScienceQA target names the 0-based answer *index* ("Therefore, the answer is 1") while
the options are lettered — ``"ivtlr"`` uses the letter for both datasets, ``"ivtlr_scienceqa"``
reproduces the index. (Its M3CoT *inference* script, ``qwen_vl/infer.py`` in the forks, formats options as
``A.{...}`` and ends the prompt at ``"Answer:"`` without the newline, unlike its training script; the
``"ivtlr"`` template uses the training format for both, ``"ivtlr_infer"`` reproduces the inference prompt.)

``"ivtlr_infer"`` is exactly what ``qwen_vl/infer.py`` (FYYDCC/IVT-LR) feeds the released checkpoints::

    [Question]:{<question>}
    [Options]:
    A.{<choice 0>}
    B.{<choice 1>}
    Answer:

in a chat turn after the image resized to 280x280, rendered with the generation prompt, then
``<|latent|><|latent|><|latent|>`` appended to the text (:attr:`PromptTemplate.generation_suffix`; the engine
consumes these placeholders as the latent steps). Its answers are judged with ``judge="ivtlr_infer"``
(:mod:`lvr_engine.data.scoring`).

``"mirage"`` is the prompt of Mirage's checkpoints (UMass-Embodied-AGI/Mirage ``src/test.py``): the question's
``text_input`` verbatim with each image where its ``<image>`` stands (images first when the text has none), the
chat template without a generation prompt, then ``<|im_start|>assistant`` with no newline. Its target (Mirage's
training sequence) is ``"\\n"`` + ``text_output`` verbatim + the end-of-turn token + ``"\\n"``; the latents go where
``text_output`` has ``<output_image>`` (the trainer's business, training/mirage.py).

``"ivtlr_chameleon"`` is the prompt of the official Chameleon inference (``chameleon/infer_chameleon_scienceqa.py`` of
FYYDCC/IVT-LR) for ScienceQA::

    <image>[Question]:{<question>}
    [Options]:
    (A).{<choice 0>}
    (B).{<choice 1>}
    Answer:

with no chat template (``chat=False``): the text goes to ``ChameleonProcessor`` as it is, which adds BOS, puts the
image tokens between its image markers where ``<image>`` stands (the image at the processor's own size, 512x512 for
Chameleon-7B) and appends its separator ``<reserved08706>`` after the text. The official script appends
``<|latent|><|latent|><|latent|>`` to the text first (``latent_placeholder``: one per latent step the request runs,
so the separator follows them; the engine consumes both and feeds the separator after the latent steps —
``LatentConfig.ivtlr_chameleon()``). Its target is the official Chameleon training target: the steps, then
``"Therefore, the answer is <0-based index>"``; its answers are judged by ``judge="ivtlr"`` on ScienceQA (the official
``extract_answer``: a digit after "the answer is", else a letter, as the index).

Templates live in :data:`PROMPT_TEMPLATES`; add your own with :func:`register_template`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image

from .example import LETTERS, ReasoningExample

__all__ = [
    "PromptTemplate",
    "Target",
    "PROMPT_TEMPLATES",
    "IVTLR_IMAGE_SIZE",
    "register_template",
    "get_template",
    "format_prompt",
    "format_target",
    "chat_messages",
]

IVTLR_IMAGE_SIZE = 280
"""Side length IVT-LR resizes every image to (``resized_height``/``resized_width`` = 280 → 10×10
merged Qwen2-VL patches, 100 image tokens)."""


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt/target format. The fields are ``str.format`` strings (``{{``/``}}`` are literal braces).

    Attributes:
        name: the key in :data:`PROMPT_TEMPLATES`.
        prompt: the user text; fields ``{context}`` (the rendered ``context`` block or ``""``),
            ``{question}``, ``{options}``.
        option: one option line; fields ``{letter}``, ``{index}``, ``{choice}``.
        option_separator: joins the option lines into ``{options}``.
        context: the context block, field ``{context}``; ``None`` leaves the context out. An
            empty context always renders as ``""``.
        step_suffix: appended to every reasoning step of the target.
        answer: the final answer line of the target; fields ``{letter}``, ``{index}``, ``{choice}``.
        strip: strip whitespace around question, choices and context before formatting.
        generation_suffix: text appended after the rendered chat template (after the assistant's
            generation prompt), e.g. the official IVT-LR ``<|latent|>`` placeholders.
        image_size: the side every image is resized to (bicubic) when the caller gives none;
            ``None`` leaves the processor's own resizing.
        image_placeholder: each image goes where this string stands in the user text (in order; images first
            when the text has none); ``None``: images first (IVT-LR).
        add_generation_prompt: render the chat template with the assistant's generation prompt.
        target_prefix: text the target starts with (Mirage: ``"\\n"``, the newline after ``assistant``).
        target_suffix: text after the end-of-turn token of the target (Mirage: ``"\\n"``).
        chat: render the chat template (True), or give the user text to the processor as it is, with each
            ``image_placeholder`` left for the processor to expand (Chameleon, which has no chat template).
        latent_placeholder: the official IVT-LR layout: this token once per latent step of the request after the
            text (``encode_prompts(latent_steps=)``; none without latent steps), consumed by the engine as the
            steps (``LatentConfig.placeholder_id``). ``None``: no placeholders.
        end_marker: the token that follows the placeholders in the processed prompt (Chameleon: the separator its
            processor appends), fed after the latent steps (``LatentConfig.end_marker_id``); ``None``: none.
    """

    name: str
    prompt: str
    option: str
    option_separator: str = "\n"
    context: str | None = None
    step_suffix: str = "\n"
    answer: str = "Therefore, the answer is {letter}"
    strip: bool = True
    generation_suffix: str = ""
    image_size: int | None = None
    image_placeholder: str | None = None
    add_generation_prompt: bool = True
    target_prefix: str = ""
    target_suffix: str = ""
    chat: bool = True
    latent_placeholder: str | None = None
    end_marker: str | None = None


class Target(NamedTuple):
    """The supervised assistant text, split where the curriculum needs it.

    ``steps`` are the explicit reasoning steps still written as text (each ending with the
    template's ``step_suffix``), ``answer`` the final answer line (no EOS). ``steps, answer =
    target`` unpacks it; ``target.text`` is the whole string.
    """

    steps: list[str]
    answer: str

    @property
    def text(self) -> str:
        """The steps followed by the answer line, concatenated."""
        return "".join(self.steps) + self.answer


_IVTLR = PromptTemplate(
    name="ivtlr",
    prompt="{context}[Question]:{{{question}}}\n[Options]:\n{options}\nAnswer:\n",
    option="({letter}).{{{choice}}}",
)

PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "ivtlr": _IVTLR,
    "ivtlr_context": PromptTemplate(
        name="ivtlr_context",
        prompt=_IVTLR.prompt,
        option=_IVTLR.option,
        context="[Context]:{{{context}}}\n",
    ),
    "ivtlr_scienceqa": PromptTemplate(
        name="ivtlr_scienceqa",
        prompt=_IVTLR.prompt,
        option=_IVTLR.option,
        answer="Therefore, the answer is {index}",
    ),
    "ivtlr_infer": PromptTemplate(
        name="ivtlr_infer",
        prompt="[Question]:{{{question}}}\n[Options]:\n{options}\nAnswer:",
        option="{letter}.{{{choice}}}",
        generation_suffix="<|latent|>" * 3,
        image_size=IVTLR_IMAGE_SIZE,
    ),
    "ivtlr_chameleon": PromptTemplate(
        name="ivtlr_chameleon",
        prompt="<image>[Question]:{{{question}}}\n[Options]:\n{options}\nAnswer:",
        option="({letter}).{{{choice}}}",
        answer="Therefore, the answer is {index}",
        image_placeholder="<image>",
        chat=False,
        latent_placeholder="<|latent|>",
        end_marker="<reserved08706>",
    ),
    "mirage": PromptTemplate(
        name="mirage",
        prompt="{question}",
        option="",
        strip=False,
        answer="",
        generation_suffix="<|im_start|>assistant",
        image_placeholder="<image>",
        add_generation_prompt=False,
        target_prefix="\n",
        target_suffix="\n",
    ),
}
"""Registered templates by name: ``"ivtlr"`` (default, IVT-LR's training format),
``"ivtlr_context"`` (plus a ``[Context]:{...}`` line when the example has context),
``"ivtlr_scienceqa"`` (IVT-LR's ScienceQA target, the 0-based answer index instead of the letter),
``"ivtlr_infer"`` (the official M3CoT inference prompt of the released checkpoints: ``A.{...}`` options, ends
at ``Answer:``, images 280x280, three ``<|latent|>`` placeholders after the generation prompt), ``"ivtlr_chameleon"``
(the official Chameleon ScienceQA inference prompt: no chat template, the image at ``<image>``, one ``<|latent|>`` per
latent step, the processor's separator after them), ``"mirage"`` (Mirage's prompt: ``text_input`` verbatim with
images at ``<image>``, ends with ``<|im_start|>assistant``)."""


def register_template(template: PromptTemplate, overwrite: bool = False) -> PromptTemplate:
    """Add ``template`` to :data:`PROMPT_TEMPLATES` under ``template.name`` and return it.

    ``ValueError`` if the name is taken and ``overwrite`` is false.
    """
    if template.name in PROMPT_TEMPLATES and not overwrite:
        raise ValueError(f"a prompt template named {template.name!r} already exists (pass overwrite=True)")
    PROMPT_TEMPLATES[template.name] = template
    return template


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """Return the template itself, or the registered template of that name (``ValueError`` if unknown)."""
    if isinstance(template, PromptTemplate):
        return template
    try:
        return PROMPT_TEMPLATES[template]
    except KeyError:
        raise ValueError(
            f"unknown prompt template {template!r}; known templates: {sorted(PROMPT_TEMPLATES)}"
        ) from None


def _clean(text: str | None, strip: bool) -> str:
    text = "" if text is None else str(text)
    return text.strip() if strip else text


def format_prompt(example: ReasoningExample, template: str | PromptTemplate = "ivtlr") -> str:
    """Return the user text (question, optional context, lettered options) for ``example``.

    The image is not part of the text: :func:`chat_messages` puts it in the chat turn.
    """
    t = get_template(template)
    context = _clean(example.context, t.strip)
    context_block = t.context.format(context=context) if (t.context is not None and context) else ""
    question = _clean(example.question, t.strip)
    options = t.option_separator.join(
        t.option.format(letter=LETTERS[i], index=i, choice=_clean(c, t.strip))
        for i, c in enumerate(example.choices)
    )
    return t.prompt.format(context=context_block, question=question, options=options)


def format_target(
    example: ReasoningExample,
    num_latent_steps_replaced: int = 0,
    mode: str = "cot",
    template: str | PromptTemplate = "ivtlr",
) -> Target:
    """Return the assistant text for a curriculum stage as ``Target(steps, answer)``.

    ``mode="cot"``: ``steps`` are ``example.steps[num_latent_steps_replaced:]`` (the first
    ``num_latent_steps_replaced`` steps are the ones the latent segment replaces; asking for more
    than there are leaves none), each followed by the template's ``step_suffix``. ``mode="direct"``:
    no steps, the answer line alone (the no-CoT baseline). ``answer`` is the template's answer line,
    e.g. ``"Therefore, the answer is B"``; the EOS token is not included. How many latent
    positions the trainer inserts for a stage (IVT-LR: the stage number, even when the example has
    fewer steps) is not decided here.

    A free-form example (one with a ``target_text``, e.g. :class:`~lvr_engine.data.mirage.MirageExample`) has
    ``Target([], target_text)`` verbatim in either mode; ``ValueError`` when its ``target_text`` is None (a test
    row). The template's ``target_prefix``/``target_suffix`` are added by the collator, not here.
    """
    if num_latent_steps_replaced < 0:
        raise ValueError(f"num_latent_steps_replaced must be >= 0, got {num_latent_steps_replaced}")
    if mode not in ("cot", "direct"):
        raise ValueError(f"mode must be 'cot' or 'direct', got {mode!r}")
    t = get_template(template)
    if hasattr(example, "target_text"):
        if example.target_text is None:
            raise ValueError(f"example {example.id!r} has no target text (a test row): nothing to train on")
        return Target(steps=[], answer=example.target_text)
    if mode == "direct":
        steps: list[str] = []
    else:
        steps = [s + t.step_suffix for s in example.steps[num_latent_steps_replaced:]]
    answer = t.answer.format(
        letter=example.answer, index=example.answer_index, choice=example.answer_text
    )
    return Target(steps=steps, answer=answer)


def chat_messages(
    example: ReasoningExample,
    prompt_text: str,
    image_size: int | tuple[int, int] | None = None,
    system: str | None = None,
    image_placeholder: str | None = None,
) -> list[dict[str, Any]]:
    """Return the Qwen2-VL chat message list for ``processor.apply_chat_template``.

    One user turn: ``{"type": "image", "image": <PIL image>}`` (left out when ``example.image`` is
    ``None``), then ``{"type": "text", "text": prompt_text}``; an optional system turn first. An example with
    several images (``example.images``) has them all, in order. With ``image_placeholder`` (Mirage: ``"<image>"``)
    each image goes where the placeholder stands in ``prompt_text`` instead (the images first when it has none;
    ``ValueError`` when the counts differ). With
    ``image_size`` (an int side or ``(width, height)``; IVT-LR uses :data:`IVTLR_IMAGE_SIZE`) the
    image is resized (bicubic) and the entry also carries ``resized_height``/``resized_width`` for
    ``qwen_vl_utils``. Render with ``processor.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``, as IVT-LR does.
    """
    images = list(getattr(example, "images", None) or ([example.image] if example.image is not None else []))
    entries: list[dict[str, Any]] = []
    for image in images:
        entry: dict[str, Any] = {"type": "image", "image": image}
        if image_size is not None:
            w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
            if w < 1 or h < 1:
                raise ValueError(f"image_size must be positive, got {image_size!r}")
            if image.size != (w, h):
                entry["image"] = image.resize((w, h), Image.Resampling.BICUBIC)
            entry["resized_height"] = h
            entry["resized_width"] = w
        entries.append(entry)
    pieces = prompt_text.split(image_placeholder) if image_placeholder else [prompt_text]
    if len(pieces) == 1:  # no placeholder: the images first
        content: list[dict[str, Any]] = [*entries, {"type": "text", "text": prompt_text}]
    else:
        if len(pieces) - 1 != len(entries):
            raise ValueError(f"example {example.id!r}: the prompt has {len(pieces) - 1} {image_placeholder} "
                             f"placeholder(s) for {len(entries)} image(s)")
        content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for entry, text in zip(entries, pieces[1:], strict=True):
            content.append(entry)
            if text:
                content.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    return messages
