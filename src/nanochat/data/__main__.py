"""Pretraining data command line.

nanochat data download fineweb-edu|climbmix -n 8 [--workers 4] [--out DIR]   (climbmix adds its validation shard)
nanochat data fetch identity|words [--out DIR] [--url URL]   (single files for the chat mixtures)
nanochat data fetch eval_bundle [--out DIR] [--url URL]      (CORE evaluation bundle -> DIR/eval_bundle/)
nanochat data prepare <files or dirs>... --out DIR [--gutenberg] [--val-fraction 0.01]
    [--shard-chars 250000000] [--seed 42] [--overwrite] [--quiet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanochat.errors import exit_on_error
from nanochat.paths import base_dir


def _count(text: str) -> int:
    return int(float(text))  # accept 2.5e8


def cmd_download(args) -> None:
    from nanochat.data.download import download

    paths = download(
        args.name,
        args.num_shards,
        args.out,
        base_url=args.base_url,
        workers=args.workers,
        show_progress=not args.quiet,
    )
    size = sum(p.stat().st_size for p in paths)
    print(
        f"{len(paths)} {args.name} shards ({size / 1e9:.2f} GB) ready in {paths[0].parent}; the last one is validation"
    )


def cmd_fetch(args) -> None:
    from nanochat.data.download import download_file

    path = download_file(args.name, args.out, url=args.url)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    size = sum(p.stat().st_size for p in files)
    print(f"{args.name}: {path} ({f'{len(files)} files, ' if path.is_dir() else ''}{size:,} bytes)")


def cmd_prepare(args) -> None:
    from nanochat.data.shards import prepare

    m = prepare(
        args.inputs,
        args.out,
        gutenberg=args.gutenberg,
        val_fraction=args.val_fraction,
        shard_chars=args.shard_chars,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    train, val = m["train"], m["val"]
    print(
        f"wrote {len(train['shards'])} train shard(s) ({train['docs']:,} docs, {train['chars']:,} chars) and "
        f"1 val shard {val['shards'][0]} ({val['docs']:,} docs, {val['chars']:,} chars) to {args.out}"
    )


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanochat data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="download published pretraining shards (resumable)")
    dl.add_argument("name", help="data source: fineweb-edu or climbmix")
    dl.add_argument(
        "-n",
        "--num-shards",
        type=int,
        required=True,
        help="shards 0..N-1 to fetch (-1: all); climbmix also fetches its validation shard 6542",
    )
    dl.add_argument("--workers", type=int, default=4, help="parallel downloads")
    dl.add_argument("--out", type=Path, default=None, help=f"output directory (default {base_dir() / 'data'}/<source>)")
    dl.add_argument("--base-url", default=None, help="fetch from this mirror instead of the published URL")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=cmd_download)

    fetch = sub.add_parser("fetch", help="download one file (identity, words) or the CORE eval bundle (eval_bundle)")
    fetch.add_argument(
        "name",
        help="identity (nanochat's identity conversations), words (English word list) or "
        "eval_bundle (CORE evaluation bundle, a zip unpacked into <out>/eval_bundle/)",
    )
    fetch.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default {base_dir() / 'data'}; for eval_bundle {base_dir()})",
    )
    fetch.add_argument("--url", default=None, help="fetch from this URL instead of the published one")
    fetch.set_defaults(func=cmd_fetch)

    prep = sub.add_parser("prepare", help="turn local text/jsonl/parquet files into train + val shards")
    prep.add_argument("inputs", nargs="+", help="text (.txt), .jsonl (text field) or .parquet files or directories")
    prep.add_argument("--out", type=Path, required=True, help="output shard directory")
    prep.add_argument("--gutenberg", action="store_true", help="strip Project Gutenberg licence headers/footers")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for the val shard")
    prep.add_argument("--shard-chars", type=_count, default=250_000_000, help="close a train shard at this many chars")
    prep.add_argument("--seed", type=int, default=42, help="seed of the train shuffle")
    prep.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
