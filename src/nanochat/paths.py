"""Where artifacts live: one home directory, `~/.cache/nanochat` unless NANOCHAT_BASE_DIR says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "data"


def base_dir() -> Path:
    return Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat")).expanduser()


def shared_data_dir() -> Path | None:
    """The read-only real datasets beside the checkout (`../shared/data`), or NANOCHAT_SHARED_DATA; None if absent."""
    env = os.environ.get("NANOCHAT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(SHARED_DATA_BESIDE_CHECKOUT)
    candidates.append(Path.cwd().parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)
