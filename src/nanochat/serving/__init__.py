"""Serving a chat model: request limits, generation, the OpenAI-compatible API, the web UI and the CLI.

Kept import-light: torch, FastAPI and Gradio load only in the modules (and functions) that need them, so
`nanochat serve --help` and `nanochat chat --help` answer at once.
"""

from __future__ import annotations


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda if present, else mps, else cpu; anything else is checked to exist."""
    import torch

    from nanochat.errors import UserError

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if device == "auto":
        return next(kind for kind, ok in available.items() if ok)  # in order of preference
    kind = device.split(":")[0]
    if kind not in available:
        raise UserError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if not available[kind]:
        raise UserError(f"device={device!r} was asked for but this machine has no {kind}; use device=auto")
    return device


def load_engine(ckpt, device: str = "auto", use_tools: bool = True, precision: str = "auto"):
    """(Engine, Tokenizer, meta, Precision) for an export dir or a run dir holding `export/`; UserError when
    missing. The weights are loaded in the precision's dtype, and the engine computes and caches in it."""
    import torch

    from nanochat.engine.engine import Engine
    from nanochat.errors import UserError
    from nanochat.export import load_export
    from nanochat.precision import resolve

    if not ckpt:
        raise UserError("no model given: pass ckpt=<run dir or export dir> (e.g. ckpt=~/.cache/nanochat/runs/d20/sft)")
    device = resolve_device(device)
    chosen = resolve(precision, torch.device(device).type)
    model, tokenizer, meta = load_export(ckpt, device, chosen.dtype)
    return Engine(model, tokenizer, use_tools=use_tools, dtype=chosen.dtype), tokenizer, meta, chosen


def default_model_name(ckpt) -> str:
    """nanochat-<run>-<stage> for runs/<run>/<stage>/export, else nanochat-<dir name>."""
    from nanochat.export import find_export

    export = find_export(ckpt).resolve()
    if export.name == "export":
        return f"nanochat-{export.parent.parent.name}-{export.parent.name}"
    return f"nanochat-{export.name}"
