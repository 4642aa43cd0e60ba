"""Tokenizer command line.

    python -m nanochat.tokenizer train --input <files or dirs> [--vocab-size 65536] [--max-chars 2e9] [--out DIR]
    python -m nanochat.tokenizer eval [--tokenizer DIR] [--input <files or dirs>] [--allow-download]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.errors import UserError, exit_on_error
from nanochat.paths import base_dir, shared_data_dir


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


def _count(text: str) -> int:
    value = int(float(text))  # accept 2e9
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a non-negative number")
    return value


def cmd_train(args) -> dict:
    from tqdm import tqdm

    from nanochat.data.documents import iter_documents, list_files
    from nanochat.io import atomic_write
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer.bpe import check_vocab_size

    check_vocab_size(args.vocab_size)  # fail on bad arguments before any work
    files = list_files(args.input)
    estimate = min(args.max_chars, sum(f.stat().st_size for f in files))
    progress = tqdm(total=estimate, unit="char", unit_scale=True, desc="reading text", disable=args.quiet)
    stats = {"docs": 0, "chars": 0}

    def tracked(docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            stats["docs"] += 1
            stats["chars"] += len(doc)
            progress.update(len(doc))
            yield doc

    docs = tracked(capped_documents(iter_documents(files, gutenberg=args.gutenberg), args.max_chars, args.doc_cap))
    t0 = time.perf_counter()
    with progress:  # closed before any error message, so the message gets a line of its own
        tok = Tokenizer.train(docs, args.vocab_size, show_progress=not args.quiet and sys.stderr.isatty())
    train_time = time.perf_counter() - t0
    out = tok.save(args.out)
    token_bytes = [b for b in tok.token_bytes().tolist() if b > 0]
    summary = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "documents": stats["docs"],
        "chars": stats["chars"],
        "train_time_s": round(train_time, 2),
        "token_bytes_min": min(token_bytes),
        "token_bytes_max": max(token_bytes),
        "token_bytes_mean": round(statistics.mean(token_bytes), 4),
        "token_bytes_std": round(statistics.pstdev(token_bytes), 4),
    }
    atomic_write(out / "train_stats.json", json.dumps(summary, indent=2))
    if tok.vocab_size < args.vocab_size:
        print(f"note: the text supports only {tok.vocab_size} tokens (asked for {args.vocab_size}); give it more text")
    print(
        f"trained a {tok.vocab_size:,}-token BPE on {stats['chars']:,} chars ({stats['docs']:,} documents) "
        f"in {train_time:.1f} s; saved to {out}"
    )
    return summary


def cmd_eval(args) -> None:
    from nanochat.data.documents import iter_documents
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer.compression import compression_table, format_table, held_out_samples, reference_encodings

    tok = Tokenizer.load(args.tokenizer)
    if args.input:
        samples = {Path(p).name: "\n\n".join(iter_documents([p], gutenberg=args.gutenberg)) for p in args.input}
    else:
        samples = held_out_samples(shared_data_dir())
    refs, notes = reference_encodings(args.allow_download)
    encoders = {f"ours({tok.vocab_size})": tok.encode, **{label: enc.encode_ordinary for label, enc in refs.items()}}
    rows = compression_table(encoders, samples)
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        print(json.dumps(rows))


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanochat.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_dir = base_dir() / "tokenizer"

    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    train.add_argument("--input", nargs="+", required=True, help="text (.txt), .jsonl (text field) or .parquet files or directories")
    train.add_argument("--vocab-size", type=_count, default=65536, help="final vocabulary size incl. 9 special tokens")
    train.add_argument("--max-chars", type=_count, default=2_000_000_000, help="stop reading after this many characters")
    train.add_argument("--doc-cap", type=_count, default=10_000, help="crop each document to this many chars (0: no crop)")
    train.add_argument("--gutenberg", action="store_true", help="strip Project Gutenberg licence headers/footers")
    train.add_argument("--out", type=Path, default=default_dir, help=f"output directory (default {default_dir})")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="bytes per token on held-out text, vs GPT-2/GPT-4 when available")
    ev.add_argument("--tokenizer", type=Path, default=default_dir, help=f"tokenizer directory (default {default_dir})")
    ev.add_argument("--input", nargs="+", help="texts to measure (default: held-out samples from ../shared/data)")
    ev.add_argument("--gutenberg", action="store_true", help="strip Project Gutenberg licence headers/footers")
    ev.add_argument("--allow-download", action="store_true", help="let tiktoken download the GPT-2/GPT-4 files")
    ev.add_argument("--json", action="store_true", help="also print the table as one JSON line")
    ev.set_defaults(func=cmd_eval)

    args = parser.parse_args(argv)
    if getattr(args, "max_chars", None) == 0:
        raise UserError("--max-chars must be positive")
    args.func(args)


if __name__ == "__main__":
    main()
