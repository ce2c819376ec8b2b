"""`lvr` on bad input: every invocation below must exit with status 2 and exactly one line on stderr
(``lvr <cmd>: error: ...`` naming the problem), no traceback, and nothing written. The checks run before any
model is loaded: the "checkpoint" most cases pass is a directory with an empty config.json, so a command that
loaded the model before checking its other arguments would fail with a different message.

The cases issue #17 lists (:data:`SUBPROCESS`) run the installed command in subprocesses, concurrently (each
pays ~1.5 s of CPU importing torch); the others go through ``lvr_engine.cli.main`` in this process (the same
code path and handler, argparse's exit included).

Unexpected errors (a bug, an input nothing checks) are tested in-process: one line saying it is an internal
error and pointing to --debug, exit status 1; with --debug, the traceback."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures_datasets import write_m3cot_fixture
from lvr_engine import cli

REPO = Path(__file__).resolve().parents[1]
SHARD = "data/test-00000-of-00001.parquet"


def _lvr() -> list[str]:
    exe = Path(sys.executable).with_name("lvr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lvr_engine.cli"]


def _unwritable_dir(root: Path) -> Path | None:
    """A directory this process cannot create files in: a 0o555 directory, or for root (whom permissions do
    not stop) /sys when it is read-only; None when there is none."""
    d = root / "read-only"
    d.mkdir()
    d.chmod(0o555)
    for cand in (d, Path("/sys")):
        try:
            with open(cand / ".lvr-probe", "w"):
                pass
            (cand / ".lvr-probe").unlink()
        except OSError:
            return cand
    return None


def _write_cases(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{case id: (arguments after `lvr`, substrings the one error line must hold)}."""
    model = root / "model"          # looks like a checkpoint; never loaded (the errors come first)
    model.mkdir()
    (model / "config.json").write_text("{}")
    trained = root / "trained"      # + lvr_config.json, for analyze
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    (trained / "lvr_config.json").write_text('{"latent_config": {"num_latent_steps": 1, "num_selected_patches": 2}}')
    a_file = root / "a-file.txt"
    a_file.write_text("not a directory\n")
    not_image = root / "not-image.png"
    not_image.write_text("hello, I am text\n")
    truncated = root / "truncated.png"
    import PIL.Image

    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])

    good = root / "m3cot"
    write_m3cot_fixture(good, n_train=4, n_test=4)
    table = pq.read_table(good / SHARD)

    def variant(name: str, table_or_bytes) -> Path:
        d = root / name
        (d / "data").mkdir(parents=True)
        for split in ("test", "train"):
            f = d / SHARD.replace("test", split)
            if isinstance(table_or_bytes, bytes):
                f.write_bytes(table_or_bytes)
            else:
                pq.write_table(table_or_bytes, f)
        return d

    rows = table.to_pylist()
    rows[2]["image"] = {"bytes": b"these bytes are no image", "path": None}
    bad_image = variant("bad-image", pa.Table.from_pylist(rows, schema=table.schema))
    rows = table.to_pylist()
    rows[1]["answer"] = "H"                                 # 3 choices: A-C
    bad_answer = variant("bad-answer", pa.Table.from_pylist(rows, schema=table.schema))
    no_answer = variant("no-answer-column", table.drop_columns(["answer"]))
    zero_bytes = variant("zero-bytes", b"")
    zero_rows = variant("zero-rows", table.slice(0, 0))

    img = root / "image.png"
    PIL.Image.new("RGB", (56, 56), (10, 200, 10)).save(img)
    gen = ["generate", "--model", model, "--image", img, "--question", "which?", "--choices", "x", "y"]
    ev = ["eval", "--model", model, "--dataset", "m3cot", "--split", "test", "--no-progress"]
    tr = ["train", "--model", model, "--dataset", "m3cot", "--split", "test", "--output", root / "run",
          "--no-progress"]
    ro = _unwritable_dir(root)
    passwd = Path("/etc/passwd") if Path("/etc/passwd").is_file() else a_file
    cases = {
        # inputs that are not what they claim to be
        "generate-model-is-etc-passwd": (["generate", "--model", passwd] + gen[3:],
                                         [f"--model {passwd} is a file, not a checkpoint directory"]),
        "generate-image-not-an-image": (gen[:4] + [not_image] + gen[5:], [f"--image {not_image} is not an image"]),
        "generate-image-truncated": (gen[:4] + [truncated] + gen[5:], [f"--image {truncated} is a damaged image"]),
        "generate-image-directory": (gen[:4] + [root] + gen[5:], [f"--image {root} is a directory"]),
        "generate-model-is-a-file": (["generate", "--model", a_file] + gen[3:],
                                     [f"--model {a_file} is a file, not a checkpoint directory"]),
        "eval-model-is-a-file": (["eval", "--model", a_file, "--dataset", "synthetic"],
                                 [f"--model {a_file} is a file, not a checkpoint directory"]),
        "train-model-is-a-file": (["train", "--model", a_file, "--dataset", "synthetic", "--output", root / "r2"],
                                  [f"--model {a_file} is a file, not a checkpoint directory"]),
        "eval-model-missing": (["eval", "--model", root / "nowhere", "--dataset", "synthetic"],
                               [f"--model: model directory {root / 'nowhere'} does not exist"]),
        "analyze-model-missing": (["analyze", "--model", root / "nowhere", "--dataset", "synthetic"],
                                  [f"--model: model directory {root / 'nowhere'} does not exist"]),
        "analyze-model-without-lvr-config": (["analyze", "--model", model, "--dataset", "synthetic"],
                                             ["has no lvr_config.json"]),
        "generate-model-not-a-checkpoint": (["generate", "--model", root] + gen[3:], ["has no config.json"]),
        # dataset rows and shards
        "eval-row-image-not-an-image": (ev + ["--data-dir", bad_image],
                                        ["m3cot test row 2 (0-based): its image is not an image"]),
        "eval-answer-beyond-choices": (ev + ["--data-dir", bad_answer],
                                       ["m3cot test row 1 (0-based)", "answer 'H' but only 3 choices"]),
        "eval-missing-column": (ev + ["--data-dir", no_answer], ["missing column(s) ['answer']"]),
        "eval-zero-byte-parquet": (ev + ["--data-dir", zero_bytes], ["Parquet file size is 0 bytes"]),
        "eval-zero-row-parquet": (ev + ["--data-dir", zero_rows], ["split 'test' has no rows"]),
        "train-row-image-not-an-image": (tr + ["--data-dir", bad_image], ["m3cot test row 2 (0-based)"]),
        "train-answer-beyond-choices": (tr + ["--data-dir", bad_answer], ["answer 'H' but only 3 choices"]),
        "train-missing-column": (tr + ["--data-dir", no_answer], ["missing column(s) ['answer']"]),
        "train-zero-row-parquet": (tr + ["--data-dir", zero_rows], ["split 'test' has no rows"]),
        "train-resume-without-checkpoint": (tr[:-1] + ["--data-dir", good, "--resume"],
                                            ["--resume: no checkpoint to resume from"]),
        # output paths, checked before the work
        "eval-output-under-a-file": (ev + ["--data-dir", good, "--output", a_file / "r.jsonl"],
                                     [f"--output {a_file / 'r.jsonl'} cannot be created: {a_file} is a file"]),
        "eval-output-is-a-directory": (ev + ["--data-dir", good, "--output", root],
                                       [f"--output {root} is a directory"]),
        "generate-heatmap-under-a-file": (gen + ["--heatmap", a_file / "h.png"],
                                          [f"--heatmap {a_file / 'h.png'} cannot be created"]),
        "analyze-output-under-a-file": (["analyze", "--model", trained, "--dataset", "synthetic", "--output",
                                         a_file / "x" / "r.json"], [f"{a_file} is a file, not a directory"]),
        "analyze-heatmaps-is-a-file": (["analyze", "--model", trained, "--dataset", "synthetic", "--heatmaps", a_file],
                                       [f"--heatmaps {a_file} is a file, not a directory"]),
        "train-output-is-a-file": (tr[:8] + [a_file, "--data-dir", good], [f"--output {a_file} is a file"]),
        "tiny-model-path-is-a-file": (["tiny-model", a_file], [f"path {a_file} is a file"]),
        "demo-output-is-a-file": (["demo", "--output", a_file], [f"--output {a_file} is a file"]),
        "convert-output-exists": (["convert", "ivtlr", "--checkpoint", a_file, "--base", model, "--output", root],
                                  [f"--output {root} already exists"]),
        "convert-checkpoint-missing": (["convert", "ivtlr", "--checkpoint", root / "model.pth", "--base", model,
                                        "--output", root / "conv"], ["--checkpoint", "does not exist"]),
        # numbers
        "tiny-model-hidden-size-0": (["tiny-model", root / "t0", "--hidden-size", "0"],
                                     ["argument --hidden-size: must be >= 1, got 0"]),
        "tiny-model-num-heads-negative": (["tiny-model", root / "t1", "--num-heads", "-2"],
                                          ["argument --num-heads: must be >= 1, got -2"]),
        "tiny-model-image-size-not-28k": (["tiny-model", root / "t2", "--image-size", "30"],
                                          ["image_size must be a positive multiple of 28"]),
        "tiny-model-odd-head-dim": (["tiny-model", root / "t3", "--hidden-size", "12"], ["head_dim must be even"]),
        "eval-batch-size-0": (ev + ["--data-dir", good, "--batch-size", "0"], ["argument --batch-size: must be >= 1"]),
        "eval-limit-0": (ev + ["--data-dir", good, "--limit", "0"], ["--limit must be >= 1, got 0"]),
        "generate-max-new-tokens-0": (gen + ["--max-new-tokens", "0"], ["argument --max-new-tokens: must be >= 1"]),
        "train-batch-size-0": (tr + ["--data-dir", good, "--batch-size", "0"], ["batch_size must be a positive int"]),
        "train-image-size-0": (tr + ["--data-dir", good, "--image-size", "0"], ["image_size must be a positive int"]),
        # argparse's own errors: one line too
        "eval-missing-required": (["eval", "--dataset", "synthetic"],
                                  ["the following arguments are required: --model"]),
        "no-command": ([], ["lvr: error:", "COMMAND"]),
    }
    if ro is not None:
        cases["eval-output-in-read-only-dir"] = (ev + ["--data-dir", good, "--output", ro / "sub" / "r.jsonl"],
                                                 ["cannot be written: no write access to"])
    return {k: ([str(a) for a in argv], want) for k, (argv, want) in cases.items()}


# issue #17's list, run as subprocesses of the installed `lvr`
SUBPROCESS = {
    "generate-image-not-an-image", "eval-row-image-not-an-image", "eval-missing-column", "eval-zero-byte-parquet",
    "eval-zero-row-parquet", "eval-answer-beyond-choices", "eval-output-under-a-file", "generate-heatmap-under-a-file",
    "tiny-model-hidden-size-0", "generate-model-is-etc-passwd", "analyze-model-missing", "train-zero-row-parquet",
}
CASE_IDS = [
    "generate-model-is-etc-passwd", "generate-image-not-an-image", "generate-image-truncated",
    "generate-image-directory", "generate-model-is-a-file",
    "eval-model-is-a-file", "train-model-is-a-file", "eval-model-missing", "analyze-model-missing",
    "analyze-model-without-lvr-config", "generate-model-not-a-checkpoint", "eval-row-image-not-an-image",
    "eval-answer-beyond-choices", "eval-missing-column", "eval-zero-byte-parquet", "eval-zero-row-parquet",
    "train-row-image-not-an-image", "train-answer-beyond-choices", "train-missing-column", "train-zero-row-parquet",
    "train-resume-without-checkpoint", "eval-output-under-a-file", "eval-output-is-a-directory",
    "generate-heatmap-under-a-file", "analyze-output-under-a-file", "analyze-heatmaps-is-a-file",
    "train-output-is-a-file", "tiny-model-path-is-a-file", "demo-output-is-a-file", "convert-output-exists",
    "convert-checkpoint-missing", "tiny-model-hidden-size-0", "tiny-model-num-heads-negative",
    "tiny-model-image-size-not-28k", "tiny-model-odd-head-dim", "eval-batch-size-0", "eval-limit-0",
    "generate-max-new-tokens-0", "train-batch-size-0", "train-image-size-0", "eval-missing-required", "no-command",
    "eval-output-in-read-only-dir",
]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case id: (argv, wanted substrings, Ran or None)}: the :data:`SUBPROCESS` cases run (concurrently)."""
    import datasets

    datasets.disable_progress_bars()  # as `lvr` does off a terminal (in a subprocess, before datasets is imported)
    root = tmp_path_factory.mktemp("cli-errors")
    cases = _write_cases(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_DATASETS_CACHE": str(root / "hf-cache")}

    def run(argv):
        p = subprocess.run(_lvr() + argv, env=env, capture_output=True, text=True, timeout=300, cwd=root)
        return Ran(p.returncode, p.stdout, p.stderr)

    names = [k for k in cases if k in SUBPROCESS]
    assert len(names) == len(SUBPROCESS)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        ran = dict(zip(names, pool.map(run, [cases[k][0] for k in names]), strict=True))
    out = {k: (cases[k][0], cases[k][1], ran.get(k)) for k in cases}
    out["_root"] = root
    return out


def _in_process(argv, capsys, monkeypatch, cwd) -> Ran:
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return Ran(rc, out, err)


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_invocation_is_one_line_and_exit_2(results, case, capsys, monkeypatch):
    if case not in results:
        pytest.skip("no directory this process cannot write to (root without a read-only /sys)")
    argv, want, proc = results[case]
    if proc is None:
        proc = _in_process(argv, capsys, monkeypatch, results["_root"])
    err = proc.stderr
    where = "subprocess" if case in SUBPROCESS else "in process"
    shown = (f"lvr {' '.join(argv)} ({where})\nrc={proc.returncode}\nstderr:\n{err[-3000:]}\n"
             f"stdout:\n{proc.stdout[-1000:]}")
    assert proc.returncode == 2, shown
    assert "Traceback" not in err and "Traceback" not in proc.stdout, shown
    lines = err.splitlines()
    assert len(lines) == 1, shown
    cmd = argv[0] if argv else ""
    assert lines[0].startswith(f"lvr {cmd}: error: " if cmd else "lvr: error: "), shown
    for w in want:
        assert w in lines[0], f"{w!r} not in the error line\n{shown}"


def test_nothing_was_written(results):
    """The failed runs created none of their outputs."""
    root = results["_root"]
    for name in ("run", "r2", "t0", "t1", "t2", "t3", "conv"):
        assert not (root / name).exists(), name
    assert not (root / "a-file.txt" / "r.jsonl").exists()


def test_no_model_dir_message_is_not_misleading(results):
    """`analyze --model /nonexistent` says it does not exist (not that it lacks lvr_config.json); a file says it
    is a file (not that it does not exist)."""
    assert "lvr_config" not in results["analyze-model-missing"][2].stderr
    assert "does not exist" not in results["generate-model-is-etc-passwd"][2].stderr


# -- internal errors: in-process (a subprocess cannot be made to hit a bug on purpose) ---------------------------
def _boom(args, argv):
    raise RuntimeError("something\nunexpected")


def test_internal_error_is_one_line_pointing_to_debug(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "cmd_demo", _boom)
    assert cli.main(["demo", "--output", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["lvr demo: internal error: RuntimeError: something unexpected "
                                "(rerun with lvr --debug demo ... for the traceback)"], err
    for argv in (["--debug", "demo", "--output", str(tmp_path / "d")], ["demo", "--debug", "--output", "x"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "in _boom" in err, err
        assert err.splitlines()[-1] == "lvr demo: internal error: RuntimeError: something unexpected", err


def test_report_internal_error_directly():
    try:
        raise KeyError("k")
    except KeyError as e:
        buf = io.StringIO()
        assert cli.report_internal_error("eval", e, debug=False, file=buf) == 1
        assert buf.getvalue() == "lvr eval: internal error: KeyError: 'k' (rerun with lvr --debug eval ... for the " \
                                 "traceback)\n"
        buf = io.StringIO()
        cli.report_internal_error("eval", e, debug=True, file=buf)
        assert "Traceback" in buf.getvalue() and 'raise KeyError("k")' in buf.getvalue()


def test_keyboard_interrupt_outside_training_is_130(monkeypatch, capsys, tmp_path):
    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_demo", interrupted)
    assert cli.main(["demo", "--output", str(tmp_path / "d")]) == 130
    assert capsys.readouterr().err.strip() == "lvr demo: interrupted"


def test_user_error_in_process_is_one_line(capsys, tmp_path):
    """The same handler as the subprocess cases, without the subprocess: CLIError -> exit 2."""
    f = tmp_path / "f"
    f.write_text("x")
    assert cli.main(["eval", "--model", str(f), "--dataset", "synthetic"]) == 2
    assert capsys.readouterr().err == f"lvr eval: error: --model {f} is a file, not a checkpoint directory (a " \
                                      "directory with config.json and *.safetensors)\n"
