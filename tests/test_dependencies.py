"""`pip install lvr_engine` (no extras) runs `lvr demo`, `lvr train` and `lvr eval`: every third-party package the
package imports is a core dependency, or an optional one whose absence is reported with the extra to install."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]

# imported only where their absence is handled: {module: the extra that installs it (None: no extra)}
OPTIONAL = {
    "matplotlib": "plot",       # demo._plot_losses: "loss plot skipped ... pip install 'lvr_engine[plot]'"
    "peft": "lora",             # cli: `lvr train --lora-r` checks first
    "triton": None,             # ops backend, used when importable on a GPU
    "torchvision": None,        # models.processors works around its absence
}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> dict[str, list[str]]:
    """{top-level module: [files importing it]} over lvr_engine/, standard library and lvr_engine excluded."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "lvr_engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "lvr_engine":
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_every_import_is_a_core_dependency_or_a_handled_optional_one():
    project = _pyproject()["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in _third_party_imports().items():
        if module in OPTIONAL:
            extra = OPTIONAL[module]
            assert extra is None or _name(module) in extras[extra], f"{module} should be in the [{extra}] extra"
            continue
        names = {_name(d) for d in dists.get(module, [module])}
        if not names & core:
            missing[module] = files
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_demo_without_matplotlib_names_the_extra_and_carries_on(tmp_path, monkeypatch, capsys):
    from lvr_engine.demo import QUICK, _plot_losses

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    losses = {"curriculum": [2.0, 1.0], "direct": [1.5], "stage_steps": [1, 1]}
    assert _plot_losses(losses, tmp_path / "loss.png", QUICK) is False
    assert not (tmp_path / "loss.png").exists()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install 'lvr_engine[plot]'" in out


def test_lora_without_peft_names_the_extra(tmp_path, monkeypatch, capsys):
    from lvr_engine.cli import main

    assert main(["tiny-model", str(tmp_path / "model"), "--hidden-size", "32", "--num-layers", "1",
                 "--vision-depth", "1", "--vision-embed-dim", "32", "--image-size", "56"]) == 0
    monkeypatch.setitem(sys.modules, "peft", None)  # importlib.util.find_spec("peft") -> None
    capsys.readouterr()
    assert main(["train", "--model", str(tmp_path / "model"), "--dataset", "synthetic", "--output",
                 str(tmp_path / "out"), "--lora-r", "4", "--limit", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--lora-r needs peft" in err and "pip install 'lvr_engine[lora]'" in err


@pytest.mark.parametrize("extra", ["plot", "lora"])
def test_extras_are_in_the_test_extra(extra):
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {_name(r) for r in extras[extra]} <= {_name(r) for r in extras["test"]}
