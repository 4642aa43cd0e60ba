"""The one exception type for mistakes a user can fix (bad config, missing or corrupt input).

Its message is a single sentence naming what is wrong and where; entry points print it as one line
instead of a traceback. It subclasses ValueError so library callers can catch it the usual way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps


class UserError(ValueError):
    """A problem with the user's input or configuration, explained in one sentence."""


class DataUnavailable(UserError):
    """Data that is not on this machine (not cached, not downloaded), as opposed to data that is there but bad.

    Mixture entries marked `optional` are skipped on this error and on no other.
    """


class NonFiniteError(UserError):
    """A loss, gradient or weight that is NaN or infinite: training stops rather than keep or save it."""


def exit_on_user_error(main: Callable) -> Callable:
    """Decorate a command-line entry point: a UserError becomes `error: <message>` and exit status 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
