"""Lightning checkpoints that a killed process cannot corrupt, and the choice of which one a resume reads.

Lightning's own writer renames a finished file into place but never fsyncs it, and it writes whatever the
model holds. `AtomicCheckpointIO` (the `trainer.plugins` of every trainer preset) writes through
`nanochat.io.atomic_open` (temp file + fsync + rename + directory fsync) and refuses weights that are not
finite, so `last.ckpt` is always a complete checkpoint of a model that was still training normally.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from nanochat.errors import NonFiniteError, UserError
from nanochat.io import atomic_open, fsync_dir, remove_partial

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats:
        return []
    # A NaN or inf makes its tensor's sum non-finite; one sum per tensor is ~20x cheaper than isfinite().all().
    sums = torch.stack([v.detach().sum(dtype=torch.float32).cpu() for v in floats.values()])
    if torch.isfinite(sums).all():
        return []
    return [k for k, v in floats.items() if not torch.isfinite(v).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(
                f"refusing to write {path}: the weights {', '.join(bad[:3])} hold NaN or infinite values "
                f"(the previous checkpoint is kept)"
            )
        with atomic_open(path) as f:
            torch.save(checkpoint, f)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
        fsync_dir(Path(path).parent)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise UserError(
                f"{path} cannot be read as a checkpoint ({e}); resume from another one with resume=<path> "
                f"or start over with resume=never"
            ) from None


def readable(path: Path) -> bool:
    """A cheap completeness check: a torch checkpoint is a zip file, whose directory is written last."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """`last.ckpt`, or when it is missing or unreadable the newest readable step checkpoint; None if there is none.

    Also removes the temporary files of a write that a kill interrupted.
    """
    removed = remove_partial(checkpoint_dir)
    if removed:
        log.info(f"removed {len(removed)} partial checkpoint file(s) of an interrupted write in {checkpoint_dir}")
    last = checkpoint_dir / LAST
    if last.exists() and readable(last):
        return last
    candidates = sorted(
        (p for p in checkpoint_dir.glob("*.ckpt") if p.name != LAST), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for p in candidates:
        if readable(p):
            log.warning(f"{last} is {'unreadable' if last.exists() else 'missing'}; resuming from {p} instead")
            return p
    if last.exists() or candidates:
        raise UserError(f"no readable checkpoint in {checkpoint_dir}; start over with resume=never")
    return None
