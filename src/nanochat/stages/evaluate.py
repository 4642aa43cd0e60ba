"""`nanochat eval` (stage=eval): evaluate an exported model with the evaluators `cfg.eval` names from `cfg.evaluators`.

Runs on the trainer preset's devices through Lightning Fabric, so `torchrun ... trainer=8xh100` strides the
examples over 8 GPUs. Rank 0 prints each evaluator's table and writes the checkpoint stage's "<stage>-eval"
section of runs/<run>/report.md when the checkpoint lives in a run directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nanochat.errors import UserError

log = logging.getLogger(__name__)


def select_evaluators(evaluators, which, stage: str) -> dict:
    """The evaluator configs `eval` names: auto (CORE for a base model, the chat tasks otherwise), all, one name or a
    list of names."""
    if which == "auto":
        which = ["core"] if stage == "base" else ["chat"]
    elif which == "all":
        which = ["core", "chat"]
    names = [which] if isinstance(which, str) else list(which)
    unknown = [n for n in names if n not in evaluators]
    if unknown or not names:
        raise UserError(
            f"eval={which} names no evaluator of {sorted(evaluators)}; use eval=auto, eval=all, one of "
            f"them or a list like eval=[core,chat]"
        )
    return {name: evaluators[name] for name in names}


def report_root(export: Path, stage: str) -> Path | None:
    """runs/<run>/ when the export is runs/<run>/<stage>/export, else None (a loose export dir has no report)."""
    return export.parent.parent if export.name == "export" and export.parent.name == stage else None


def run(cfg) -> None:
    import torch
    from hydra.utils import instantiate
    from lightning.fabric import Fabric

    from nanochat.export import find_export, load_export
    from nanochat.precision import of_trainer
    from nanochat.report import write_section

    if not cfg.get("ckpt"):
        raise UserError("nanochat eval needs ckpt=<run dir or export dir of the model to evaluate>")
    export = find_export(cfg.ckpt)
    t = cfg.trainer
    fabric = Fabric(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.get("num_nodes", 1),
        precision=t.precision,
        strategy="ddp" if t.devices != 1 or t.get("num_nodes", 1) > 1 else "auto",
    )
    fabric.launch()
    # fp32 weights under Fabric's autocast, as the trainer evaluates: the same numbers as during training
    fabric.print(f"{of_trainer(cfg.precision, fabric.device.type, t.precision)} on {fabric.device}")
    model, tokenizer, meta = load_export(export, device=fabric.device)
    stage = meta.get("stage", "base")
    chosen = select_evaluators(cfg.evaluators, cfg.eval, stage)
    evaluators = {name: instantiate(c, _convert_="all") for name, c in chosen.items()}
    reduce = lambda x: fabric.all_reduce(x, reduce_op="sum")  # noqa: E731
    section = {
        "items": {"model": str(export), "stage": stage, "step": meta.get("step", "?")},
        "metrics": {},
        "tables": [],
        "notes": [],
    }
    t0 = time.perf_counter()
    for name, evaluator in evaluators.items():
        fabric.print(f"{name} evaluation of {export} ({stage} step {meta.get('step', '?')}) on {fabric.device}")
        with torch.no_grad(), fabric.autocast():
            evaluator.evaluate(
                model, tokenizer, fabric.global_rank, fabric.world_size, reduce, show_progress=fabric.is_global_zero
            )
        if fabric.is_global_zero:
            evaluator.log_latest(tasks=False)  # each task was logged as it finished
            for key, value in evaluator.report().items():
                section[key].update(value) if key == "metrics" else section[key].extend(value)
    section["wall_time_s"] = time.perf_counter() - t0
    root = report_root(export, stage)
    if fabric.is_global_zero and root is not None:
        log.info(f"report card: {write_section(root, f'{stage}-eval', section)}")
