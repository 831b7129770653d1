"""Every `python` / `torchrun` command in README.md and docs/*.md names options its program accepts.

Each command runs in-process with ``--help`` added (before a ``--`` that passes the rest on), the way
the shell would start it: ``python script.py`` runs the script, ``python -m pkg`` the module, and
``torchrun ... script.py`` the script.  A misspelt or removed option makes the program exit 2.
"""

from __future__ import annotations

import pathlib
import re
import runpy
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("#")[0].strip() for line in joined.splitlines()]
    commands += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    return sorted({c for c in commands if c.startswith(("python ", "torchrun ")) and "..." not in c})  # not prose


def _entry(words: list[str]) -> tuple[str, str, list[str]]:
    """('path' | 'module', target, arguments) of a command line."""
    if words[0] == "torchrun":
        words = words[1:]
        while words and words[0].startswith("--"):
            words = words[1:]
    else:
        words = words[1:]
    if words[0] == "-m":
        return "module", words[1], words[2:]
    return "path", words[0], words[1:]


COMMANDS = sorted({c for doc in DOCUMENTS for c in readme_commands(doc.read_text())})


def test_readme_has_the_commands():
    assert len(COMMANDS) >= 12
    assert any("search.optuna_search" in c for c in COMMANDS) and any("sample_dit.py" in c for c in COMMANDS)
    readme = readme_commands((ROOT / "README.md").read_text())  # the paper's commands stay in README itself
    assert sum("sample_edm2.py" in c for c in readme) >= 3 and sum("sample_dit.py" in c for c in readme) >= 2


def test_docs_pages_are_checked():
    """Every docs page is read, and the pages that document commands contribute theirs."""
    names = {doc.name for doc in DOCUMENTS}
    assert {"README.md", "metrics.md", "results.md", "clusters.md", "benchmarks.md"} <= names
    for name in ("metrics.md", "results.md", "clusters.md", "benchmarks.md"):
        assert readme_commands((ROOT / "docs" / name).read_text()), name


def _help_exit(kind: str, target: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the program with ``args`` and ``--help`` (before a ``--``); return (status, stdout, stderr)."""
    args = args[:args.index("--")] + ["--help"] + args[args.index("--"):] if "--" in args else args + ["--help"]
    monkeypatch.setattr(sys, "argv", [target, *args])
    code = 0
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / target), run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy on an imported module
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_options_exist(command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    kind, target, args = _entry(shlex.split(command))
    code, out, err = _help_exit(kind, target, args, monkeypatch, capsys)
    assert code == 0 and "usage" in out.lower(), (command, err[-2000:])
    if target == "search.optuna_search":  # the arguments after -- go to the sampler: check them there too
        sampler = args[args.index("--sampler") + 1]
        code, out, err = _help_exit("path", f"sample_{sampler}.py", args[args.index("--") + 1:], monkeypatch, capsys)
        assert code == 0 and "usage" in out.lower(), (command, err[-2000:])
