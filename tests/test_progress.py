"""lvr_engine.progress: a redrawing bar on a terminal, ~10 plain lines with the same numbers in a file or pipe."""
import io
import math
import re

import pytest
from tqdm import tqdm

from lvr_engine.progress import LineProgress, progress_bar

LINE = re.compile(r"^train: +(\d+)% (\d+)/(\d+) \[[\d:]+<[\d:?]+, +[\d.?]+(?:it|s)/(?:s|it), loss=(\d+\.\d{4})\]$")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _loss(step: int) -> float:
    return 10.0 / step


@pytest.mark.parametrize("n", [200, 37, 10, 3])
def test_lines_per_tenth_with_the_numbers(n):
    buf = io.StringIO()
    bar = progress_bar(total=n, desc="train", file=buf)
    assert isinstance(bar, LineProgress)
    for step in range(1, n + 1):
        bar.set_postfix(loss=f"{_loss(step):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    # one line per tenth crossed: at the first step reaching k/10 of the work, k = 1..10 (fewer when n < 10)
    expected_steps = sorted({math.ceil(n * k / 10) for k in range(1, 11)})
    assert len(lines) == len(expected_steps)
    for line, step in zip(lines, expected_steps, strict=True):
        m = LINE.match(line)
        assert m, line
        pct, done, total, loss = int(m[1]), int(m[2]), int(m[3]), float(m[4])
        assert (done, total) == (step, n)
        assert pct == round(100 * step / n)
        assert loss == pytest.approx(_loss(step), abs=1e-4)
    assert lines[-1].startswith("train: 100%")


def test_iterating_a_sequence_and_interleaved_messages():
    buf = io.StringIO()
    seen = []
    bar = progress_bar(range(50), desc="eval", file=buf, unit="q")
    for i in bar:
        seen.append(i)
        if i == 24:
            bar.write("a log line", file=buf)
    assert seen == list(range(50))
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    # the 25th item counts when the loop asks for the 26th: 10%..40%, the message, 50%..100%
    assert len(lines) == 11 and lines[4] == "a log line"
    counts = [int(re.search(r" (\d+)/50 ", l)[1]) for l in lines if l != "a log line"]
    assert counts == list(range(5, 51, 5))
    assert all("q/s" in l for l in lines if l != "a log line")


def test_close_writes_the_last_numbers_once():
    buf = io.StringIO()
    bar = progress_bar(total=200, desc="train", file=buf)
    bar.update(15)  # less than a tenth: nothing yet
    assert buf.getvalue() == ""
    bar.close()
    bar.close()
    assert buf.getvalue().splitlines() == [l for l in buf.getvalue().splitlines() if " 15/200 " in l]
    assert len(buf.getvalue().splitlines()) == 1


def test_unknown_total_is_one_line_at_close():
    buf = io.StringIO()
    for _ in progress_bar(iter(range(7)), desc="stream", file=buf):
        pass
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stream: 7it [") and "%" not in lines[0]


def test_terminal_gets_a_redrawing_bar_and_disable_writes_nothing():
    term = _Terminal()
    bar = progress_bar(total=5, desc="train", file=term)
    assert type(bar) is tqdm
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in term.getvalue()

    buf = io.StringIO()
    bar = progress_bar(total=5, desc="train", file=buf, disable=True)
    bar.update(5)
    bar.close()
    assert buf.getvalue() == ""


def test_lines_must_be_positive():
    with pytest.raises(ValueError, match="lines"):
        LineProgress(total=3, file=io.StringIO(), lines=0)
