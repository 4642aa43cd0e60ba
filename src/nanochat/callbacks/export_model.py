"""Write `export/` (weights, config, tokenizer) at the end of training: the hand-off to the next stage."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from nanochat.export import save_export

log = logging.getLogger(__name__)


class ExportModel(L.Callback):
    def __init__(self, dirpath: str, stage: str = "base"):
        self.dirpath = Path(dirpath)
        self.stage = stage

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "core/", "chat/", "rl/"))
        }
        meta = {"stage": self.stage, **pl_module.export_meta(), "metrics": metrics}
        save_export(pl_module.model, pl_module.tokenizer, self.dirpath, meta)
        log.info(f"exported model -> {self.dirpath}")
