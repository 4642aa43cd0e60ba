"""The two BPE trainers behind `nanochat tokenizer train`, side by side: rustbpe (the default) and HF `tokenizers`.

    python bench/tokenizer_trainers.py [--shards DIR] [--vocab-sizes 32768 65536] [--max-chars 0] [--repeats 2]
                                       [--json bench/results/tokenizer_trainers.json]

Text: the train shards of a prepared shard directory (`nanochat data prepare TEXT --gutenberg --out DIR`; default:
prepared once from ../shared/data/pretrain_text into a temp dir), read as `train_tokenizer` reads them (documents
cropped to 10,000 characters), held in memory so that reading is not timed; `--max-chars` caps it (0: all).
Each trainer runs `Tokenizer.train` (training plus the tiktoken and tokenizer.json builds), alternating, best of
`--repeats`. Bytes per token are measured on the val shard, which neither trainer sees. The last column
extrapolates linearly to nanochat's d20 tokenizer budget of 2B characters (counting pre-tokens is linear in the
text; the merge phase grows more slowly, so this is an upper bound).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, markdown_table, save

D20_CHARS = 2_000_000_000


def prepared_shards(text: Path, work: Path) -> Path:
    out = work / "shards"
    cmd = [sys.executable, "-m", "nanochat", "data", "prepare", str(text), "--gutenberg", "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return out


def main() -> None:
    from nanochat.data.documents import iter_documents
    from nanochat.data.shards import list_shards, split_shards
    from nanochat.settings import TOKENIZER_TRAINERS
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer.training import capped_documents

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, help="a prepared shard dir (default: prepared from --text)")
    p.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "pretrain_text")
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--max-chars", type=int, default=0, help="train on at most this many characters (0: all)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default="bench/results/tokenizer_trainers.json")
    args = p.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or prepared_shards(args.text, Path(tmp))
        train_files, val_files = split_shards(list_shards(shards))
        docs = list(capped_documents(iter_documents(train_files), args.max_chars or 10**15, 10_000))
        val_text = "\n".join(iter_documents(val_files))
    chars = sum(map(len, docs))
    val_bytes = len(val_text.encode("utf-8"))
    results = []
    for vocab in args.vocab_sizes:
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for trainer in TOKENIZER_TRAINERS:
                t0 = time.perf_counter()
                tok = Tokenizer.train(docs, vocab, show_progress=False, trainer=trainer)
                seconds = time.perf_counter() - t0
                if trainer not in best or seconds < best[trainer]["seconds"]:
                    best[trainer] = {
                        "seconds": seconds,
                        "vocab_size": tok.vocab_size,
                        "bytes_per_token": val_bytes / len(tok.encode(val_text)),
                    }
                print(f"  vocab {vocab} {trainer}: {seconds:.1f} s", file=sys.stderr, flush=True)
        for trainer, r in best.items():
            results.append(
                {
                    "vocab": vocab,
                    "trainer": trainer,
                    "chars": chars,
                    **r,
                    "d20_estimate_s": r["seconds"] * D20_CHARS / chars,
                }
            )
    rows = []
    for r in results:
        fastest = min(x["seconds"] for x in results if x["vocab"] == r["vocab"])
        rows.append(
            [
                f"{r['vocab']:,}",
                r["trainer"],
                f"{r['chars'] / 1e6:.1f}M chars",
                f"{r['seconds']:.1f}",
                f"{r['seconds'] / fastest:.2f}x",
                f"{r['chars'] / r['seconds'] / 1e6:.1f}",
                f"{r['bytes_per_token']:.3f}",
                f"{r['d20_estimate_s'] / 60:.0f} min",
            ]
        )
    table = markdown_table(
        [
            "vocab",
            "trainer",
            "text",
            "seconds (best)",
            "vs fastest",
            "M chars/s",
            "bytes/token (val shard)",
            "2B chars, linear",
        ],
        rows,
    )
    settings = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    save(args.json, table, results, settings)


if __name__ == "__main__":
    main()
