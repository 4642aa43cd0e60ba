"""The export directory: everything inference or the next stage needs, nothing else.

    export/
      model.safetensors   fp32 weights of the GPT (no optimizer, no Lightning state)
      config.json         {"model": GPTConfig fields, "meta": {stage, step, metrics, ...}}
      tokenizer.tiktoken, tokenizer_config.json, tokenizer.json

The directory is written beside the target and swapped in with renames, so a reader sees the old export or
the new one, never a mix (after a kill between the two renames, the next reader or writer restores the old one).
`init_from=`, `ckpt=` and serving accept an export dir, a stage run dir holding `export/`, a Hugging Face NanoChat
dir, or a spec `hf:<dir or repo id>` / `nanochat:<checkpoint dir>[@step]`, which `find_export` converts once into an
export dir under the nanochat home (nanochat.export.imports).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from nanochat.errors import NonFiniteError, UserError
from nanochat.io import atomic_write, fsync_dir

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_export(model, tokenizer, out_dir: str | Path, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from nanochat.checkpoint import nonfinite_tensors

    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(
            f"refusing to export to {out_dir}: the weights {', '.join(bad[:3])} hold NaN or infinite values"
        )
    with staged_dir(out_dir) as staging:
        save_file(state, str(staging / WEIGHTS_FILE))
        with open(staging / WEIGHTS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write(staging / CONFIG_FILE, json.dumps({"model": model.config.to_dict(), "meta": meta or {}}, indent=2))
        tokenizer.save(staging)
    return out_dir


@contextlib.contextmanager
def staged_dir(out_dir: Path):
    """Yield an empty `<out_dir>.partial` to write into, then swap it in for `out_dir` (kept as it was on an error)."""
    recover_export(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(staging)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    # A kill right here leaves only `.old` (complete) and `.partial`: recover_export puts `.old` back.
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_export(out_dir: Path) -> None:
    """Undo a swap that a kill interrupted: `export/` gone, the previous one still complete as `export.old/`."""
    old = out_dir.with_name(out_dir.name + ".old")
    if not out_dir.exists() and (old / WEIGHTS_FILE).is_file() and (old / CONFIG_FILE).is_file():
        os.replace(old, out_dir)
        fsync_dir(out_dir.parent)


def find_export(path: str | Path) -> Path:
    """An export dir itself, or a run dir with `export/` inside, or the import of a spec or a Hugging Face dir
    (see nanochat.export.imports); a clear error otherwise."""
    from nanochat.export import imports

    if imports.is_spec(path):
        return imports.resolve(str(path))
    path = Path(path).expanduser()
    if imports.is_hf_dir(path):
        return imports.resolve(f"hf:{path}")
    for candidate in (path, path / "export"):
        recover_export(candidate)
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            return candidate
    raise UserError(
        f"{path} holds no exported model (expected {WEIGHTS_FILE} and {CONFIG_FILE} in it or in {path / 'export'})"
    )


def read_export_config(path: str | Path) -> dict:
    export = find_export(path)
    try:
        return json.loads((export / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{export / CONFIG_FILE} is unreadable ({e})") from None


def load_weights(model, path: str | Path) -> Path:
    """Copy exported weights into `model`; the shapes must match (same depth, width and vocab)."""
    from safetensors.torch import load_file

    from nanochat.models.components import GPTConfig

    export = find_export(path)
    saved = GPTConfig.from_dict(read_export_config(export)["model"]).to_dict()  # keys an old export lacks: defaults
    if saved != model.config.to_dict():
        diff = {k: (saved.get(k), v) for k, v in model.config.to_dict().items() if saved.get(k) != v}
        raise UserError(
            f"the model in {export} (depth {saved.get('n_layer')}, vocab {saved.get('vocab_size')}) "
            f"does not match this run's model (saved vs configured: {diff}); "
            "configure the model=, arch= and tokenizer it was trained with"
        )
    try:
        state = load_file(str(export / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"{export / WEIGHTS_FILE} is unreadable ({e})") from None
    missing, unexpected = sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise UserError(
            f"{export / WEIGHTS_FILE} does not hold this model's weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); re-export it"
        )
    model.load_state_dict(state)
    return export


def stage_tokenizer(tokenizer_dir: str | Path | None, init_from: str | Path | None):
    """The tokenizer a stage trains with: `tokenizer_dir`'s when it holds one, else the `init_from` export's.

    When both exist they must be the same tokenizer: weights trained with one vocabulary are meaningless
    under another, so a mismatch is refused rather than trained on.
    """
    from nanochat.tokenizer import Tokenizer

    here = tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").is_file()
    if init_from is None:
        if not here:
            raise UserError(
                f"no tokenizer in {tokenizer_dir}; train it for this data and vocabulary first with "
                f"`nanochat train stage=tokenizer` plus the same data=/model= overrides as this run"
            )
        return Tokenizer.load(tokenizer_dir)
    export = find_export(init_from)
    inherited = Tokenizer.load(export)
    if here:
        configured = Tokenizer.load(tokenizer_dir)
        if not configured.same_as(inherited):
            raise UserError(
                f"init_from={init_from} was trained with the tokenizer in {export} (vocab {inherited.vocab_size:,}), "
                f"which differs from the tokenizer in {tokenizer_dir} (vocab {configured.vocab_size:,}); set "
                f"paths.tokenizer_dir={export} or the data=/model= of the run that trained it"
            )
        return configured
    return inherited


def parent_meta(init_from: str | Path) -> dict:
    """What a run records about the run it started from: where, which stage, how far it had trained."""
    export = find_export(init_from)
    meta = read_export_config(export).get("meta", {})
    return {
        "export": str(export.resolve()),
        **{k: meta[k] for k in ("stage", "step", "tokens", "metrics") if k in meta},
    }


def load_export(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(GPT, Tokenizer, meta) from an export: what the engine, serving and evaluation start from.

    `dtype`: the weights' dtype in memory (serving loads them in its precision's; the file stays fp32)."""
    from nanochat.models.components import GPT, GPTConfig
    from nanochat.precision import cast_weights
    from nanochat.tokenizer import Tokenizer

    export = find_export(path)
    cfg = read_export_config(export)
    model = GPT.initialised(GPTConfig.from_dict(cfg["model"]), device)  # init_weights builds the rotary tables
    cast_weights(model, dtype)  # before loading: the fp32 file is copied straight into dtype
    load_weights(model, export)
    return model.eval(), Tokenizer.load(export), cfg.get("meta", {})
