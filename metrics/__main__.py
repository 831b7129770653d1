"""``python -m metrics``: see :mod:`metrics.cli`."""

from metrics.cli import main

if __name__ == "__main__":
    main()
