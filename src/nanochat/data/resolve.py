"""Where a pipeline's data comes from, decided once before its first step and announced in one line each.

Two sources, resolved separately, each in this order:
  pretraining text   local (NANOCHAT_PRETRAIN_TEXT, ../shared/data/pretrain_text) -> the configured data's published
                     shards from the hub (its `download` source: FineWeb-Edu, or ClimbMix for data=climbmix;
                     downloaded by a first `data` step, or already cached) -> the built-in starter corpus
  chat conversations local (../shared/data: mixture=shared) -> the hub (mixture=hub) -> built-in
The built-in starter corpus is allowed only where the experiment says so (`pipeline.data: auto_or_builtin`, the
CPU demo presets); elsewhere a missing source is an error naming what to fetch. A source you choose yourself on
the command line (data=..., mixture=...) is used as given. The hub is probed (one TCP connection, no data)
only when nothing local was found, and never when HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nanochat.configs import override_key
from nanochat.data.download import SOURCES
from nanochat.errors import UserError
from nanochat.paths import shared_data_dir

HUB_HOST = "huggingface.co"
BUILTIN_NOTE = (
    "the built-in starter corpus (Python's own documentation + generated arithmetic, spelling and identity "
    "conversations) - NOT FineWeb or SmolTalk: a toy model for trying the pipeline"
)


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _chosen(forwarded: list[str], key: str) -> bool:
    return any(override_key(o) in (key, f"{key}.source", f"{key}.name") for o in forwarded)


def resolve_sources(cfg, forwarded: list[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """(overrides for every step, commands a first `data` step runs, lines to print)."""
    mode = cfg.pipeline.data
    if mode not in ("auto", "auto_or_builtin", "builtin", "configured"):
        raise UserError(f"pipeline.data={mode} is not one of auto, auto_or_builtin, builtin, configured")
    if mode == "configured":
        return [], [], ["data: as configured (pipeline.data=configured)"]
    allow_builtin = mode in ("auto_or_builtin", "builtin")
    hub = None  # probed at most once, and only if needed

    def online() -> bool:
        nonlocal hub
        if hub is None:
            hub = hub_reachable()
        return hub

    overrides, prep, lines = [], [], []
    shared = shared_data_dir()
    published = cfg.data.get("download") or "fineweb-edu"  # the configured data's hub source, else FineWeb-Edu
    choice = f"data={cfg.data.name}" if cfg.data.get("download") else "data=fineweb_edu"
    title = {"fineweb-edu": "FineWeb-Edu", "climbmix": "ClimbMix"}.get(published, published)
    hub_dir = Path(cfg.paths.data_dir) / SOURCES[published].dirname  # where the download step puts the shards
    # Pretraining text.
    if _chosen(forwarded, "data"):
        lines.append("pretraining text: as given on the command line")
    elif mode == "builtin":
        overrides.append("data=builtin")
    elif os.environ.get("NANOCHAT_PRETRAIN_TEXT"):
        overrides.append("data=local")  # data/local.yaml reads its source from the variable
        lines.append(f"pretraining text: {os.environ['NANOCHAT_PRETRAIN_TEXT']} (NANOCHAT_PRETRAIN_TEXT)")
    elif shared is not None and (shared / "pretrain_text").is_dir():
        overrides += ["data=local", f"data.source={shared / 'pretrain_text'}"]
        lines.append(f"pretraining text: {shared / 'pretrain_text'}")
    elif online():
        overrides.append(choice)
        prep.append(["-m", "nanochat", "data", "download", published, "-n", str(cfg.pipeline.shards)])
        lines.append(
            f"pretraining text: {title} from the hub ({cfg.pipeline.shards} shards, skipping those already here)"
        )
    elif len(list(hub_dir.glob("*.parquet"))) >= 2:
        overrides.append(choice)
        lines.append(f"pretraining text: {title} shards already in {hub_dir} (hub unreachable)")
    elif allow_builtin:
        overrides.append("data=builtin")
    else:
        raise UserError(
            "no pretraining text on this machine and the hub is unreachable: set NANOCHAT_PRETRAIN_TEXT=<dir of "
            f".txt/.jsonl/.parquet>, or fetch {title} (nanochat data download {published} -n "
            f"{cfg.pipeline.shards}) where there is network"
        )
    # Chat conversations (midtraining, SFT, RL, chat evaluation).
    if _chosen(forwarded, "mixture"):
        lines.append("chat data: as given on the command line")
    elif mode == "builtin":
        overrides.append("mixture=builtin")
    elif shared is not None:
        overrides.append("mixture=shared")
        lines.append(f"chat data: {shared} (mixture=shared)")
    elif online():
        overrides.append("mixture=hub")
        prep += [["-m", "nanochat", "data", "fetch", name] for name in ("identity", "words", "eval_bundle")]
        lines.append("chat data: SmolTalk, MMLU, GSM8K, ARC, HumanEval from the hub (mixture=hub)")
    elif allow_builtin:
        overrides.append("mixture=builtin")
    else:
        raise UserError(
            "no chat data on this machine (no ../shared/data, no NANOCHAT_SHARED_DATA) and the hub is "
            "unreachable: put the datasets there, or run where there is network"
        )
    if "data=builtin" in overrides or "mixture=builtin" in overrides:
        which = " and ".join(
            k for k, o in (("text", "data=builtin"), ("conversations", "mixture=builtin")) if o in overrides
        )
        lines.append(f"data ({which}): {BUILTIN_NOTE}")
    return overrides, prep, lines
