"""The smoke run behind `make demo`: tokenizer -> tiny GPT -> a few hundred Muon+AdamW steps -> sample.

It exercises every foundation piece on a laptop CPU in a couple of minutes: BPE training and the tiktoken
export, the GPT, the hybrid optimizer with its schedules, bits-per-byte, and KV-cached greedy decoding.
Later stages replace it with the full speedrun pipeline.

    python -m nanochat.demo [--steps 200] [--depth 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sysconfig
import time
from pathlib import Path

import torch

from nanochat.data.documents import iter_documents
from nanochat.engine.kv_cache import KVCache
from nanochat.errors import exit_on_user_error
from nanochat.models.components import GPT, GPTConfig
from nanochat.optim import build_optimizer, lr_multiplier, muon_momentum
from nanochat.paths import base_dir, shared_data_dir
from nanochat.tokenizer import Tokenizer


def demo_documents() -> list[str]:
    """Real text from ../shared/data when present; otherwise Python's own standard-library source files."""
    shared = shared_data_dir()
    if shared is not None and (shared / "pretrain_text").is_dir():
        print(f"text: {shared / 'pretrain_text'} (Gutenberg books, Shakespeare, web text)")
        return list(iter_documents([shared / "pretrain_text"], gutenberg=True))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    print(f"text: ../shared/data not found; using Python standard-library sources from {stdlib} (a stand-in, not FineWeb)")
    files = sorted(stdlib.glob("*.py"))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def bits_per_byte(model: GPT, tokens: torch.Tensor, token_bytes: torch.Tensor, seq_len: int) -> float:
    """Cross-entropy in bits per UTF-8 byte of the targets: comparable across tokenizers, unlike loss per token."""
    rows = tokens[: (len(tokens) - 1) // seq_len * seq_len + 1]
    x = rows[:-1].view(-1, seq_len)
    y = rows[1:].view(-1, seq_len)
    with torch.no_grad():
        nats = model(x, y, loss_reduction="none").view(-1)
    nbytes = token_bytes[y.view(-1)]
    return (nats * (nbytes > 0)).sum().item() / (math.log(2) * nbytes.sum().item())


@torch.no_grad()
def greedy_sample(model: GPT, tok: Tokenizer, prompt: str, max_tokens: int = 24) -> str:
    ids = tok.encode(prompt, prepend="<|bos|>")
    cache = KVCache.for_model(model, batch_size=1, max_len=len(ids) + max_tokens)
    logits = model(torch.tensor([ids]), kv_cache=cache)  # prefill once
    out = []
    for _ in range(max_tokens):
        next_id = int(logits[0, -1].argmax())
        out.append(next_id)
        logits = model(torch.tensor([[next_id]]), kv_cache=cache)  # one token per step
    return tok.decode(out)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanochat.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=base_dir() / "demo")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    docs = demo_documents()
    val_docs, train_docs = docs[::50], [d for i, d in enumerate(docs) if i % 50]
    t0 = time.perf_counter()
    tok = Tokenizer.train(itertools.islice(train_docs, 600), args.vocab_size, show_progress=False)
    tok.save(args.out / "tokenizer")
    print(f"tokenizer: {tok.vocab_size:,} tokens trained in {time.perf_counter() - t0:.1f} s -> {args.out / 'tokenizer'}")

    bos = tok.bos_token_id
    need = args.steps * args.batch_size * args.seq_len + 1
    train_ids: list[int] = []
    for ids in tok.encode_batch(train_docs[:2000], prepend=bos):
        train_ids.extend(ids)
        if len(train_ids) >= need:
            break
    train = torch.tensor(train_ids)
    val = torch.tensor([i for ids in tok.encode_batch(val_docs[:40], prepend=bos) for i in ids][: 16 * args.seq_len + 1])
    print(f"data: {len(train):,} train tokens, {len(val):,} val tokens")

    config = GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=args.seq_len)
    model = GPT(config)
    optimizer = build_optimizer(model)
    print(f"model: d{args.depth}, width {config.n_embd}, {config.n_head} heads, {model.num_params():,} params, "
          f"{model.flops_per_token():.3g} FLOPs/token")
    token_bytes = tok.token_bytes()
    bpb_before = bits_per_byte(model, val, token_bytes, args.seq_len)

    tokens_per_step = args.batch_size * args.seq_len
    t0 = time.perf_counter()
    for step in range(args.steps):
        start = (step * tokens_per_step) % (len(train) - tokens_per_step - 1)
        chunk = train[start : start + tokens_per_step + 1]
        x, y = chunk[:-1].view(args.batch_size, -1), chunk[1:].view(args.batch_size, -1)
        loss = model(x, y)
        loss.backward()
        optimizer.apply_schedule(lr_multiplier(step, args.steps), muon_momentum(step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            print(f"step {step:4d}/{args.steps} | loss {loss.item():.4f} | {tokens_per_step * (step + 1) / elapsed:,.0f} tok/s")
    bpb_after = bits_per_byte(model, val, token_bytes, args.seq_len)
    print(f"val bits/byte: {bpb_before:.3f} at init -> {bpb_after:.3f} after {args.steps} steps")
    for prompt in ("The king said", "It was a dark"):
        print(f"sample: {prompt!r} -> {greedy_sample(model, tok, prompt)!r}")
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
