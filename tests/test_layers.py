"""The import graph follows the layer order: no import runs from a lower layer to a higher one.

    utils  <  networks, guidance, metrics  <  sampling  <  tools (results, search, training, demo,
    benchmarks, notebooks)  <  command-line scripts (sample_edm2.py, sample_dit.py)

Every ``import`` in every module is checked (also those inside functions), and the code cells
of the notebooks.  Peers on the same layer below the tools do not import each other.
"""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "networks": 1, "guidance": 1, "metrics": 1, "sampling": 2,
          "results": 3, "search": 3, "training": 3, "demo": 3, "benchmarks": 3, "notebooks": 3,
          "sample_edm2": 4, "sample_dit": 4}
TOOLS = 3
# (importing file, imported package) pairs allowed against the rule, each with its reason.
ALLOWED = {
    # Deprecated alias of networks.zoo + sampling.presets, kept until demo/run_demo.py imports those.
    ("networks/presets.py", "sampling"),
}


def _imports(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every import in ``tree`` that names a project package."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return [(line, name) for line, name in out if name in LAYERS]


def _sources():
    for path in sorted(ROOT.glob("*.py")):
        yield path, path.stem, path.read_text()
    for package in LAYERS:
        folder = ROOT / package
        if folder.is_dir():
            for path in sorted(folder.rglob("*.py")):
                yield path, package, path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path, "notebooks", "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))


def _violations() -> list[str]:
    bad = []
    for path, package, text in _sources():
        if package not in LAYERS:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for line, name in _imports(ast.parse(text), package):
            mine, theirs = LAYERS[package], LAYERS[name]
            ok = name == package or theirs < mine or (mine == theirs == TOOLS)
            if not ok and (rel, name) not in ALLOWED:
                bad.append(f"{rel}:{line} ({package}, layer {mine}) imports {name} (layer {theirs})")
    return bad


def test_no_import_runs_upward():
    assert _violations() == []


def test_the_check_sees_upward_imports(tmp_path, monkeypatch):
    """The checker itself: an upward import and a peer import are reported, a downward one is not."""
    tree = ast.parse("import sampling.run\nfrom metrics import api\nfrom utils import dist\nfrom . import x\n")
    found = _imports(tree, "guidance")
    assert found == [(1, "sampling"), (2, "metrics"), (3, "utils"), (4, "guidance")]
    mine = LAYERS["guidance"]
    upward = [n for _, n in found if not (n == "guidance" or LAYERS[n] < mine)]
    assert upward == ["sampling", "metrics"]


@pytest.mark.parametrize("tool", ["results/grid.py", "search/optuna_search.py", "training/eval_denoiser.py"])
def test_tools_never_import_the_command_line_scripts(tool):
    text = (ROOT / tool).read_text()
    assert not [n for _, n in _imports(ast.parse(text), tool.split("/")[0]) if n.startswith("sample_")]
