"""A callback the fault-injection tests load into `python train.py` children (tests/ is on their PYTHONPATH)."""

import hashlib
import time

import lightning as L


class RecordSteps(L.Callback):
    """Appends `<optimizer step> <sha256 of its batch>` per step to `path`, flushed, so a SIGKILL loses nothing logged.

    `delay` seconds per step stretch a seconds-long run so that a kill can land at any phase of a step.
    """

    def __init__(self, path: str, delay: float = 0.0):
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        digest = hashlib.sha256(batch.cpu().numpy().tobytes()).hexdigest()[:16]
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {digest}\n")
        time.sleep(self.delay)
