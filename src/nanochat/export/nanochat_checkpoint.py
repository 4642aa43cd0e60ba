"""nanochat's own checkpoints: `model_<step>.pt` + `meta_<step>.json` in a checkpoint dir (such as
`~/.cache/nanochat/chatsft_checkpoints/d20`), and the tokenizer of that nanochat home (`<home>/tokenizer/tokenizer.pkl`,
a pickled tiktoken Encoding, with `token_bytes.pt` beside it).

Nothing here runs pickled code. The weights load with `torch.load(weights_only=True)`. tokenizer.pkl goes through an
unpickler that knows a single class, a stand-in for tiktoken's Encoding that only records the state a real one is
then built from (name, split pattern, ranks, special tokens); any other object in the file is refused unopened.
Two architectures import: the seed-era one (c6b7ab7; transformers' NanoChat), and nanochat HEAD's (92d63d4: value
embeddings, per-layer lambdas, smear, backout, sliding windows, a padded vocabulary), recognised by those weights
or a window pattern and built with `conf/arch/nanochat2026.yaml` (HEAD's rope base and QK scale, which no file of a
checkpoint records; versions between the two, whose constants differed, import with HEAD's).
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from nanochat.errors import UserError
from nanochat.models.components.gpt_config import GPTConfig

MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
HEAD_FEATURES = {  # GPTConfig switch -> the state-dict name that says a checkpoint has it
    "value_embeds": "value_embeds.",
    "layer_lambdas": "resid_lambdas",
    "smear": "smear_gate.weight",
    "backout": "backout_lambda",
}
STAGES = {
    "base_checkpoints": "base",
    "mid_checkpoints": "mid",
    "chatsft_checkpoints": "sft",
    "chatrl_checkpoints": "rl",
}
STEP_FILE = re.compile(r"^model_(\d+)\.pt$")
ORIG_MOD = "_orig_mod."  # torch.compile's prefix on every key of a compiled module's state dict


def checkpoint_steps(ckpt: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in ckpt.glob("model_*.pt") if (m := STEP_FILE.match(p.name))}


def has_checkpoint(ckpt: Path) -> bool:
    return bool(checkpoint_steps(ckpt))


def last_step(ckpt: Path) -> int:
    steps = checkpoint_steps(ckpt)
    if not steps:
        inner = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and checkpoint_steps(p)) if ckpt.is_dir() else []
        hint = f"; its subdirectories {', '.join(inner)} do: write nanochat:{ckpt / inner[0]}" if inner else ""
        raise UserError(f"{ckpt} holds no nanochat checkpoint (model_<step>.pt){hint}")
    return max(steps)


def model_file(ckpt: Path, step: int) -> Path:
    steps = checkpoint_steps(ckpt)
    if step not in steps:
        raise UserError(f"{ckpt} has no checkpoint of step {step} (it has steps {sorted(steps) or 'none'})")
    return steps[step]


def meta_file(ckpt: Path, step: int) -> Path:
    weights = model_file(ckpt, step)
    path = weights.with_name("meta_" + weights.name.removeprefix("model_").removesuffix(".pt") + ".json")
    if not path.is_file():
        raise UserError(f"{ckpt} has model_{step:06d}.pt but no {path.name} (its model_config)")
    return path


def tokenizer_file(ckpt: Path) -> Path:
    """tokenizer.pkl beside the checkpoint, or in the `tokenizer/` dir of the nanochat home above it."""
    candidates = [
        ckpt / "tokenizer.pkl",
        ckpt / "tokenizer" / "tokenizer.pkl",
        ckpt.parent / "tokenizer" / "tokenizer.pkl",
        ckpt.parent.parent / "tokenizer" / "tokenizer.pkl",
    ]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = ", ".join(str(p.parent) for p in candidates)
        raise UserError(
            f"no tokenizer.pkl for the checkpoint {ckpt} (looked in {looked}); copy the tokenizer/ dir of "
            "the nanochat home that trained it next to the checkpoint"
        )
    return found


def source_files(ckpt: Path, step: int) -> list[Path]:
    pkl = tokenizer_file(ckpt)
    extra = [pkl.with_name("token_bytes.pt")] if pkl.with_name("token_bytes.pt").is_file() else []
    return [model_file(ckpt, step), meta_file(ckpt, step), pkl, *extra]


# --- tokenizer.pkl ---------------------------------------------------------------------------------------------------
class _EncodingState:
    """What unpickling a tiktoken Encoding yields here: its state, recorded, nothing constructed or called."""

    def __setstate__(self, state) -> None:
        self.state = state


class _Foreign(pickle.UnpicklingError):
    """The pickle names a class or function other than tiktoken's Encoding."""


class _EncodingOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise _Foreign(f"{module}.{name}")


def load_encoding(path: Path):
    """The tiktoken Encoding pickled in `path`, built from its recorded state after checking it."""
    from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
    from nanochat.tokenizer.bpe import make_encoding

    try:
        obj = _EncodingOnly(io.BytesIO(path.read_bytes())).load()
    except _Foreign as e:
        raise UserError(
            f"{path} holds {e}, not only a tiktoken Encoding; refusing to unpickle it (a pickle can run any code)"
        ) from None
    except Exception as e:  # truncated or garbage bytes raise many kinds of errors
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None)
    if not isinstance(obj, _EncodingState) or not isinstance(state, dict):
        what = f"tiktoken's registered encoding {state!r}" if isinstance(state, str) else type(obj).__name__
        raise UserError(f"{path} holds {what}, not a tiktoken Encoding with its own ranks")
    ranks, specials, pattern = state.get("mergeable_ranks"), state.get("special_tokens"), state.get("pat_str")

    def typed(d, key_type) -> bool:
        return isinstance(d, dict) and all(isinstance(k, key_type) and isinstance(v, int) for k, v in d.items())

    if not (typed(ranks, bytes) and typed(specials, str)):
        raise UserError(f"{path} holds an Encoding whose ranks or special tokens are malformed")
    if pattern != SPLIT_PATTERN:
        raise UserError(f"{path} splits text with a different pattern than nanochat's tokenizer ({pattern!r})")
    missing = [t for t in SPECIAL_TOKENS if t not in specials]
    if missing:
        raise UserError(f"{path} lacks nanochat's special tokens {', '.join(missing)}")
    return make_encoding(ranks, specials, str(state.get("name", "nanochat")))


def load_tokenizer(pkl: Path, vocab_size: int):
    from nanochat.export.hf import check_probe
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer.bpe import tiktoken_to_hf

    encoding = load_encoding(pkl)
    tokenizer = Tokenizer(encoding, tiktoken_to_hf(encoding))
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"{pkl} has {tokenizer.vocab_size:,} tokens but the checkpoint's vocab_size is {vocab_size:,}: "
            "it is the tokenizer of another model"
        )
    sizes = pkl.with_name("token_bytes.pt")
    if sizes.is_file():
        saved = load_tensors(sizes)
        ours = tokenizer.token_bytes().to(torch.int64)
        if not isinstance(saved, torch.Tensor) or not torch.equal(saved.to(torch.int64), ours):
            raise UserError(f"{sizes} does not match {pkl.name} (token byte lengths differ): not one tokenizer")
    check_probe(tokenizer, pkl)
    return tokenizer


# --- weights and config ----------------------------------------------------------------------------------------------
def load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{path} holds more than tensors; refusing to unpickle it ({reason})") from None
    except Exception as e:  # a truncated zip or a foreign file
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def gpt_config(model_config, where: Path, keys) -> GPTConfig:
    """Our GPTConfig for a checkpoint's model_config and state-dict `keys` (prefixes stripped)."""
    if not isinstance(model_config, dict):
        raise UserError(f"{where} has no model_config object")
    extra = {k: v for k, v in model_config.items() if k not in MODEL_CONFIG_KEYS}
    window = str(extra.pop("window_pattern", "L"))
    if extra:
        raise UserError(
            f"{where} sets {', '.join(sorted(extra))} in its model_config, which this project's GPT does not have"
        )
    missing = [k for k in MODEL_CONFIG_KEYS if k not in model_config]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)} in its model_config")
    shape = {k: model_config[k] for k in MODEL_CONFIG_KEYS}
    present = {switch: any(k.startswith(name) for k in keys) for switch, name in HEAD_FEATURES.items()}
    if window == "L" and not any(present.values()):
        return GPTConfig(**shape)  # the seed-era architecture
    return GPTConfig(**shape, **{**head_architecture(), **present, "window_pattern": window})


def head_architecture() -> dict:
    """nanochat HEAD's switches, from the `arch=nanochat2026` preset (the one place they are written)."""
    from omegaconf import OmegaConf

    from nanochat.configs import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "arch" / "nanochat2026.yaml"))


def checked_state(raw, model, where: Path) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"{where} is not a state dict of tensors")
    state = {k.removeprefix(ORIG_MOD): v for k, v in raw.items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{where} does not hold the weights its model_config describes (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"{k} in {where} has shape {tuple(v.shape)} but its model_config implies {tuple(expected[k].shape)}"
            )
    return {k: v.to(torch.float32) for k, v in state.items()}


def import_checkpoint(ckpt: Path, step: int, out: Path, source: dict) -> Path:
    """Convert step `step` of the nanochat checkpoint dir `ckpt` (and its home's tokenizer) into the export dir
    `out`."""
    from nanochat.export.export_dir import save_export
    from nanochat.models.components import GPT

    meta_path = meta_file(ckpt, step)
    try:
        nanochat_meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is unreadable ({e})") from None
    weights = model_file(ckpt, step)
    raw = load_tensors(weights)
    keys = [k.removeprefix(ORIG_MOD) for k in raw] if isinstance(raw, dict) else []
    config = gpt_config(nanochat_meta.get("model_config") if isinstance(nanochat_meta, dict) else None, meta_path, keys)
    tokenizer = load_tokenizer(tokenizer_file(ckpt), config.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(checked_state(raw, model, weights), assign=True)
    meta = {"step": step, "source": source}
    if ckpt.parent.name in STAGES:
        meta["stage"] = STAGES[ckpt.parent.name]
    if isinstance(nanochat_meta.get("val_bpb"), (int, float)):
        meta["metrics"] = {"val/bpb": float(nanochat_meta["val_bpb"])}
    return save_export(model, tokenizer, out, meta)
