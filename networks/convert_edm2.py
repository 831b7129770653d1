"""Convert an official EDM2 ``.pkl`` snapshot into ``.safetensors`` + ``.json`` without running its code.

    python -m networks.convert_edm2 edm2-img512-s-2147483-0.100.pkl converted/
    python -m networks.convert_edm2 https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl converted/

writes ``converted/<name>.safetensors`` (the state dict, float32) and
``converted/<name>.json`` (``Precond`` constructor arguments and the encoder
constants).  Existing outputs are never overwritten.
"""

from __future__ import annotations

import pathlib
import sys
import urllib.parse

import click

from networks.edm2_pickle import load_checkpoint, save_plain
from utils.cache import fetch
from utils.cli import CONTEXT, run_command
from utils.errors import UsageError, exit_on_usage_error


@click.command(context_settings=CONTEXT)
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--name", default=None, help="Output file stem (default: the input's name).")
@exit_on_usage_error
def main(source: str, out_dir: str, name: str | None) -> None:
    """Convert SOURCE (a path, URL or hf:// address of an EDM2 .pkl) into OUT_DIR."""
    stem = name or pathlib.PurePosixPath(urllib.parse.urlsplit(source).path).stem
    if not stem:
        raise UsageError(f"cannot derive an output name from {source!r}; pass --name")
    out = pathlib.Path(out_dir)
    for suffix in (".safetensors", ".json"):
        if (out / (stem + suffix)).exists():
            raise UsageError(f"{out / (stem + suffix)} already exists; remove it or choose another OUT_DIR")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is not a folder; choose another OUT_DIR")
    ckpt = load_checkpoint(fetch(source), source=source)
    weights, meta = save_plain(ckpt, out / stem)
    n = sum(t.numel() for t in ckpt.net.state_dict().values())
    click.echo(f"wrote {weights} ({n / 1e6:.1f} M values) and {meta}")


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "python -m networks.convert_edm2"))
