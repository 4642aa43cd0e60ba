"""Tokenizer command line.

nanochat tokenizer train --input <files or dirs> [--vocab-size 65536] [--max-chars 2e9] [--trainer rustbpe|hf]
                         [--out DIR]
nanochat tokenizer eval [--tokenizer DIR] [--input <files or dirs>] [--allow-download]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanochat.errors import UserError, exit_on_error
from nanochat.paths import base_dir, shared_data_dir
from nanochat.settings import TOKENIZER_TRAINERS, TokenizerConfig


def _count(text: str) -> int:
    value = int(float(text))  # accept 2e9
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a non-negative number")
    return value


def cmd_train(args) -> dict:
    from nanochat.tokenizer.training import train_tokenizer

    return train_tokenizer(
        args.input,
        args.vocab_size,
        args.out,
        max_chars=args.max_chars,
        doc_cap=args.doc_cap,
        gutenberg=args.gutenberg,
        show_progress=not args.quiet,
        trainer=args.trainer,
    )


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
    parser = argparse.ArgumentParser(prog="nanochat tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_dir = base_dir() / "tokenizer"

    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    train.add_argument(
        "--input", nargs="+", required=True, help="text (.txt), .jsonl (text field) or .parquet files or directories"
    )
    train.add_argument("--vocab-size", type=_count, default=65536, help="final vocabulary size incl. 9 special tokens")
    train.add_argument(
        "--max-chars", type=_count, default=TokenizerConfig.max_chars, help="stop reading after this many characters"
    )
    train.add_argument(
        "--doc-cap",
        type=_count,
        default=TokenizerConfig.doc_cap,
        help="crop each document to this many chars (0: no crop)",
    )
    train.add_argument("--gutenberg", action="store_true", help="strip Project Gutenberg licence headers/footers")
    train.add_argument("--out", type=Path, default=default_dir, help=f"output directory (default {default_dir})")
    train.add_argument(
        "--trainer",
        choices=TOKENIZER_TRAINERS,
        default=TokenizerConfig.trainer,
        help="BPE trainer: rustbpe (faster) or hf (HF tokenizers); same ids and files either way",
    )
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
