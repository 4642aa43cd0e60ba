"""Stage entry points: each takes the composed config and runs one stage (tokenizer, base, ...)."""

from __future__ import annotations

import sys


def run_stage(cfg) -> None:
    """Dispatch to `cfg.stage.entry`; a UserError ends the run with one line instead of a traceback."""
    from hydra.utils import get_method

    from nanochat.errors import UserError

    try:
        get_method(cfg.stage.entry)(cfg)
    except Exception as e:
        cause = e  # hydra.utils.instantiate wraps errors raised in constructors; find ours inside
        while cause is not None and not isinstance(cause, UserError):
            # OmegaConf drops __cause__ of an error raised in a resolver (unless OC_CAUSE=1); __context__ keeps it
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        message = _one_line(str(cause))
        print(f"error: {message}", file=sys.stderr)
        if _in_multirun():  # not an exit: Hydra marks this sweep job failed, runs the others, then reports
            from hydra.errors import CompactHydraException  # the first failure in one line, no traceback

            raise CompactHydraException(message) from None
        raise SystemExit(2) from None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _one_line(message: str) -> str:
    """The user's sentence of an error; one re-raised from a DataLoader worker carries the worker's traceback too."""
    if (
        "Original Traceback" in message
    ):  # torch: "Caught UserError in DataLoader worker ...\n<traceback>\nUserError: <msg>"
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message
