"""The official IVT-LR evaluation format: the ``ivtlr_infer`` prompt template and judge.

The judge cases are worked by hand from ``qwen_vl/infer.py``'s rule (FYYDCC/IVT-LR): the prompt and the output are
decoded together with the special tokens skipped; an ``assistant`` right after ``answer:`` is deleted; every letter
after "the answer is" / "Answer:" (any case, whitespace and newlines allowed, matches not overlapping) is a
candidate; correct iff the gold letter is a candidate.
"""
from __future__ import annotations

import pytest
from PIL import Image

from lvr_engine.data.example import ReasoningExample
from lvr_engine.data.prompts import format_prompt
from lvr_engine.data.scoring import ivtlr_infer_candidates, score_m3cot, score_scienceqa

# what infer.py's decode(prompt + output, skip_special_tokens=True) starts with, for the question below
PROMPT = ("system\nYou are a helpful assistant.\nuser\n[Question]:{Which square is red?}\n[Options]:\nA.{left}\n"
          "B.{right}\nC.{neither}\nAnswer:\nassistant\n")


def _example(answer="B", image=None):
    return ReasoningExample(id="q", image=image, question="  Which square is red? ",
                            choices=[" left", "right ", "neither"], answer=answer, answer_index="ABC".index(answer),
                            steps=[])


@pytest.mark.parametrize("output, letters", [
    ("B", {"B"}),                                       # the prompt's own "Answer:" reads the model's first letter
    ("B. The square on the right is red.", {"B"}),
    ("  \n c", {"C"}),                                  # lower case, after whitespace and newlines
    ("Therefore, the answer is C", {"T", "C"}),         # "Answer:" takes the T of Therefore; then "the answer is C"
    ("The answer is C", {"T"}),                         # the T of "The" is taken: "he answer is C" is no match
    ("the answer is (B)", {"T"}),                       # a parenthesised letter is never read
    ("Looking closer, the answer is\n\n   b.", {"L", "B"}),
    ("x, so the answer is A, or the answer is b", {"X", "A", "B"}),   # several letters: all are candidates
    ("", set()),                                        # no answer at all
    ("42 squares", set()),
    ("... ANSWER: d", {"D"}),
])
def test_judge_on_hand_worked_outputs(output, letters):
    assert ivtlr_infer_candidates(PROMPT + output) == letters
    for gold in "ABCD"[:3]:
        assert score_m3cot(PROMPT + output, _example(gold), judge="ivtlr_infer") == (gold in letters)
        assert score_scienceqa(PROMPT + output, _example(gold), judge="ivtlr_infer") == (gold in letters)


def test_judge_drops_the_assistant_role_after_answer():
    # without the deletion, the "a" of "assistant" would be read after the prompt's "Answer:" (as "A")
    assert ivtlr_infer_candidates(PROMPT + "B") == {"B"}
    assert ivtlr_infer_candidates("Answer: \n\n  Assistant\nC") == {"C"}
    assert ivtlr_infer_candidates("Answer:\nassistants") == {"A"}    # not the whole word "assistant"
    assert ivtlr_infer_candidates("Answer: the assistant B") == {"T"}  # not directly after "answer:"
    assert ivtlr_infer_candidates(None) == set()


def test_prompt_is_infer_pys_m3cot_prompt():
    assert format_prompt(_example(), "ivtlr_infer") == (
        "[Question]:{Which square is red?}\n[Options]:\nA.{left}\nB.{right}\nC.{neither}\nAnswer:")


def test_encoded_prompt_is_the_official_layout():
    from lvr_engine.models.tiny import build_tiny_processor
    from lvr_engine.training.collate import encode_prompts

    processor = build_tiny_processor(image_size=280)
    tok = processor.tokenizer
    image = Image.new("RGB", (120, 90), (200, 30, 30))          # not square: only the template makes it 280x280
    enc = encode_prompts([_example(image=image)], processor, template="ivtlr_infer")
    assert enc.image_grid_thw.tolist() == [[1, 20, 20]]         # 280 / 14 = 20 patches a side (100 merged tokens)
    ids = enc.input_ids[0].tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("C.{neither}\nAnswer:<|im_end|>\n<|im_start|>assistant\n<|latent|><|latent|><|latent|>")
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 100
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT   # what the judge sees before the output
    # an explicit image size still wins over the template's
    tall = encode_prompts([_example(image=image)], processor, template="ivtlr_infer", image_size=(140, 560))
    assert tall.image_grid_thw.tolist() == [[1, 40, 10]]          # (w, h) = (140, 560): same area, not resized


def test_eval_rejects_an_unknown_template_or_judge(tmp_path, capsys):
    from lvr_engine.cli import main

    assert main(["eval", "--model", str(tmp_path), "--dataset", "synthetic", "--template", "nope"]) == 2
    assert "unknown --template 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path), "--dataset", "synthetic", "--judge", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    from lvr_engine.evaluation import evaluate

    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        evaluate(tmp_path, [_example()], judge="nope")
