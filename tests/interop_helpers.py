"""Shared by the interop tests: a tiny trained GPT, and nanochat's native checkpoint layout written by hand."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from conftest import corpus_documents

TINY = dict(sequence_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # GQA: 4 query heads share 2 kv heads


def train_tiny(tokenizer, steps: int = 40, seed: int = 0, **config):
    """A tiny GPT trained `steps` AdamW steps on corpus_documents() (seconds on a CPU): real, varied weights,
    nonzero output projections, logits that depend on the prompt."""
    from nanochat.models.components import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, **{**TINY, **config})
    model = GPT(cfg)
    ids = torch.tensor([t for doc in corpus_documents() for t in tokenizer.encode(doc[:3000], prepend="<|bos|>")])
    T = cfg.sequence_len
    rows = ids[: (len(ids) // (T + 1)) * (T + 1)].view(-1, T + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (8,), generator=gen)]
        loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_nanochat_checkpoint(
    home: Path,
    model,
    tokenizer,
    step: int,
    stage_dir: str = "chatsft_checkpoints",
    dtype: torch.dtype = torch.float32,
    **extra_config,
) -> Path:
    """nanochat's own layout under `home`: <stage_dir>/d<depth>/model_<step:06d>.pt (a compiled model's state dict,
    keys prefixed `_orig_mod.`), meta_<step:06d>.json (model_config and the other fields nanochat writes), and
    tokenizer/tokenizer.pkl (a pickled tiktoken Encoding) + tokenizer/token_bytes.pt. Returns the checkpoint dir."""
    import tiktoken

    c = model.config
    ckpt = home / stage_dir / f"d{c.n_layer}"
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {f"_orig_mod.{k}": v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    torch.save(state, ckpt / f"model_{step:06d}.pt")
    model_config = {
        "sequence_len": c.sequence_len,
        "vocab_size": c.vocab_size,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_kv_head": c.n_kv_head,
        "n_embd": c.n_embd,
        **extra_config,
    }
    meta = {
        "step": step,
        "val_bpb": 1.25,
        "model_config": model_config,
        "user_config": {"run": "dummy", "depth": c.n_layer},
        "device_batch_size": 4,
        "max_seq_len": c.sequence_len,
    }
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    tok_dir = home / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    enc = tokenizer.enc
    encoding = tiktoken.Encoding(
        name="rustbpe", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks, special_tokens=enc._special_tokens
    )
    with open(tok_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(encoding, f)
    torch.save(tokenizer.token_bytes().clone(), tok_dir / "token_bytes.pt")
    return ckpt


def fake_hub_cache(cache: Path, repo: str, files: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout for `repo` at `commit` (refs/main), holding a copy of the files in `files`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
