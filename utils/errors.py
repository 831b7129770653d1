"""One error type for bad user input: the CLIs print its one-line message and exit 2."""

from __future__ import annotations

import functools
import sys

__all__ = ["UsageError", "exit_on_usage_error"]


class UsageError(Exception):
    """Bad input from the user. The message is one line naming the problem and the fix."""

    exit_code = 2


def exit_on_usage_error(fn):
    """Decorator for CLI entry points: a :class:`UsageError` becomes ``error: <msg>`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            msg = " ".join(str(exc).split())
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return wrapper
