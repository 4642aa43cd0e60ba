"""Checkpoints from elsewhere, wherever a checkpoint is taken: converted once into an ordinary export directory.

    hf:<local dir>                      a Hugging Face NanoChat dir (a plain path to one works too)
    hf:<owner>/<name>[@revision]        a Hub repo, through huggingface_hub's cache (HF_HUB_OFFLINE respected)
    nanochat:<checkpoint dir>[@step]    nanochat's own model_<step>.pt + meta_<step>.json (default: the last step)

`find_export` resolves a spec to `<nanochat home>/imports/<kind>/<name>/export`. The export records where it came
from and a fingerprint of its source files (or the Hub snapshot's commit); a later resolve reuses it while the
fingerprint matches and converts again when the source changed. A lock file keeps two processes (ranks of one
run) from converting the same source at once. Every stage, the server and the chat CLI thus need no code of their
own for imported models.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
from pathlib import Path

from nanochat.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("hf", "nanochat")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_snapshots: dict[str, Path] = {}  # repo[@revision] -> snapshot dir: a stage resolves its init_from several times, and
# asking the Hub each time costs a round trip; local sources are checked (a few stat calls) every time


def is_spec(path) -> bool:
    return isinstance(path, str) and path.partition(":")[0] in KINDS and ":" in path


def is_hf_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face model dir (its config.json names a model_type) rather than an export dir."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "model" not in config


def resolve(spec: str) -> Path:
    """The export dir for `spec` (see the module docstring), converting it first when needed."""
    kind, _, target = spec.partition(":")
    if not target:
        other = " or hf:<owner>/<name>" if kind == "hf" else ""
        raise UserError(f"{spec!r} names no model: write {kind}:<dir>{other}")
    return _resolve_hf(target) if kind == "hf" else _resolve_nanochat(target)


def imports_dir() -> Path:
    from nanochat.paths import base_dir

    return base_dir() / "imports"


def _local_name(path: Path) -> str:
    """A cache name for a local source: its dir name plus a hash of its absolute path (two `sft/` dirs differ)."""
    return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def fingerprint(files: list[Path]) -> list[list]:
    """Name, size and modification time of each source file: a changed source is converted again."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def _resolve_hf(target: str) -> Path:
    from nanochat.export import hf, hub, nanochat_checkpoint

    local = Path(target).expanduser()
    if local.is_dir():
        src = local.resolve()
        if not is_hf_dir(src) and nanochat_checkpoint.has_checkpoint(src):
            return _resolve_nanochat(str(src))
        source = {"kind": "hf", "path": str(src), "files": fingerprint(hf.source_files(src))}
        out = imports_dir() / "hf" / _local_name(src) / "export"
    else:
        repo, _, revision = target.partition("@")
        if not REPO_ID.match(repo):
            raise UserError(f"hf:{target} is neither a directory nor a Hugging Face repo id like karpathy/nanochat-d32")
        if target not in _snapshots:
            _snapshots[target] = hub.snapshot(repo, revision or None)
        src = _snapshots[target]
        source = {"kind": "hf", "repo": repo, "revision": revision or None, "commit": src.name}
        out = imports_dir() / "hf" / (repo.replace("/", "--") + (f"@{revision}" if revision else "")) / "export"
    if not is_hf_dir(src):
        if nanochat_checkpoint.has_checkpoint(src):  # a Hub repo holding nanochat's own files
            step = nanochat_checkpoint.last_step(src)
            return convert_once(
                out, source, lambda dest: nanochat_checkpoint.import_checkpoint(src, step, dest, source)
            )
        raise UserError(
            f"{src} is not a Hugging Face model dir (no config.json naming a model_type) "
            "and holds no nanochat checkpoint (model_<step>.pt)"
        )
    return convert_once(out, source, lambda dest: hf.import_hf(src, dest, source))


def _resolve_nanochat(target: str) -> Path:
    from nanochat.export import nanochat_checkpoint

    path, at, step_text = target.rpartition("@")
    if not at or not step_text.isdigit():
        path, step_text = target, ""
    ckpt = Path(path).expanduser()
    if not ckpt.is_dir():
        raise UserError(f"nanochat:{target}: no directory {ckpt}")
    ckpt = ckpt.resolve()
    step = int(step_text) if step_text else nanochat_checkpoint.last_step(ckpt)
    files = nanochat_checkpoint.source_files(ckpt, step)
    source = {"kind": "nanochat", "path": str(ckpt), "step": step, "files": fingerprint(files)}
    out = imports_dir() / "nanochat" / f"{_local_name(ckpt)}-{step}" / "export"
    return convert_once(out, source, lambda dest: nanochat_checkpoint.import_checkpoint(ckpt, step, dest, source))


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_once(out: Path, source: dict, convert) -> Path:
    """`out` when it already holds the conversion of this exact source, else `convert(out)` first."""
    from nanochat.export.export_dir import CONFIG_FILE, WEIGHTS_FILE, recover_export

    with _locked(out.parent / ".lock"):
        recover_export(out)
        if (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file():
            with contextlib.suppress(OSError, ValueError):
                if json.loads((out / CONFIG_FILE).read_text()).get("meta", {}).get("source") == source:
                    return out
        log.info("converting %s into %s", source.get("repo") or source.get("path"), out)
        convert(out)
    return out
