"""Training a tokenizer from text files: the one function the `nanochat tokenizer train` command and the tokenizer
stage both call. Reads the files' documents (each cropped to `doc_cap` characters, at most `max_chars` in all),
trains the BPE and saves it with its statistics (`train_stats.json`)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.settings import TokenizerConfig, check_tokenizer_trainer


def capped_documents(docs: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Crop each document to doc_cap characters (0 = no crop) and stop once max_chars have been yielded."""
    total = 0
    for doc in docs:
        if doc_cap:
            doc = doc[:doc_cap]
        yield doc
        total += len(doc)
        if total >= max_chars:
            return


def train_tokenizer(
    inputs: list[str | Path],
    vocab_size: int,
    out: str | Path,
    *,
    max_chars: int = TokenizerConfig.max_chars,
    doc_cap: int = TokenizerConfig.doc_cap,
    gutenberg: bool = False,
    show_progress: bool = True,
    trainer: str = TokenizerConfig.trainer,
) -> dict:
    """Train with `trainer` (rustbpe | hf), save to `out`, and return the summary (vocab size, documents, characters,
    time, token byte lengths)."""
    import sys

    from tqdm import tqdm

    from nanochat.data.documents import iter_documents, list_files
    from nanochat.io import atomic_write
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer.bpe import check_vocab_size

    check_vocab_size(vocab_size)  # fail on bad arguments before any work
    check_tokenizer_trainer(trainer)
    files = list_files(inputs)
    estimate = min(max_chars, sum(f.stat().st_size for f in files))
    progress = tqdm(total=estimate, unit="char", unit_scale=True, desc="reading text", disable=not show_progress)
    stats = {"docs": 0, "chars": 0}

    def tracked(docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            stats["docs"] += 1
            stats["chars"] += len(doc)
            progress.update(len(doc))
            yield doc

    docs = tracked(capped_documents(iter_documents(files, gutenberg=gutenberg), max_chars, doc_cap))
    t0 = time.perf_counter()
    with progress:  # closed before any error message, so the message gets a line of its own
        tok = Tokenizer.train(docs, vocab_size, show_progress=show_progress and sys.stderr.isatty(), trainer=trainer)
    train_time = time.perf_counter() - t0
    out = tok.save(out)
    token_bytes = [b for b in tok.token_bytes().tolist() if b > 0]
    summary = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "trainer": trainer,
        "documents": stats["docs"],
        "chars": stats["chars"],
        "train_time_s": round(train_time, 2),
        "token_bytes_min": min(token_bytes),
        "token_bytes_max": max(token_bytes),
        "token_bytes_mean": round(statistics.mean(token_bytes), 4),
        "token_bytes_std": round(statistics.pstdev(token_bytes), 4),
    }
    atomic_write(out / "train_stats.json", json.dumps(summary, indent=2))
    if tok.vocab_size < vocab_size:
        print(f"note: the text supports only {tok.vocab_size} tokens (asked for {vocab_size}); give it more text")
    print(
        f"trained a {tok.vocab_size:,}-token BPE on {stats['chars']:,} chars ({stats['docs']:,} documents) "
        f"in {train_time:.1f} s ({trainer}); saved to {out}"
    )
    return summary
