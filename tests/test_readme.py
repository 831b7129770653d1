"""The Python API examples (docs/api.md) run as written."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)


def test_readme_api_example_runs(capsys):
    blocks = _python_blocks()
    assert blocks, "docs/api.md has a Python API example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    images = namespace["images"]
    assert tuple(images.shape) == (4, 3, 32, 32)
    assert images.isfinite().all()
    assert "torch.Size([4, 3, 32, 32])" in capsys.readouterr().out


def test_readme_backend_example_runs():
    """The in-memory backend example samples the demo model (uint8 images, the seeds' own classes)."""
    (block,) = [b for b in _python_blocks() if "EDM2Backend" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    images = namespace["images"]
    assert tuple(images.shape) == (4, 1, 16, 16) and str(images.dtype) == "torch.uint8"
    assert images.float().std() > 10  # digits, not a constant
