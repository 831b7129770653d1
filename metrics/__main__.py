"""``python -m metrics``: see :mod:`metrics.cli`."""

import sys

from metrics.cli import main
from utils.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command(main, None, "python -m metrics"))
