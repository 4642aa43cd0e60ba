"""The one exception type for mistakes a user can fix (bad config, missing or corrupt input).

Its message is a single sentence naming what is wrong and where; entry points print it as one line
instead of a traceback. It subclasses ValueError so library callers can catch it the usual way.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps

TRACEBACK_ENV = "NANOCHAT_TRACEBACK"  # =1: a command's internal error shows its traceback too


class UserError(ValueError):
    """A problem with the user's input or configuration, explained in one sentence."""


class DataUnavailable(UserError):
    """Data that is not on this machine (not cached, not downloaded), as opposed to data that is there but bad.

    Mixture entries marked `optional` are skipped on this error and on no other.
    """


class NonFiniteError(UserError):
    """A loss, gradient or weight that is NaN or infinite: training stops rather than keep or save it."""


def exit_on_error(main: Callable) -> Callable:
    """Decorate a command-line entry point: a UserError becomes `error: <message>` and exit status 2; any other
    exception (a bug, an exhausted device) one `error: internal error ...` line and exit status 1, its traceback
    only with NANOCHAT_TRACEBACK=1."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as e:
            if os.environ.get(TRACEBACK_ENV) == "1":
                traceback.print_exc()
            print(f"error: {internal_error(e)}; {TRACEBACK_ENV}=1 shows the traceback", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def internal_error(e: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"internal error ({type(e).__name__}{': ' + first if first else ''})"
