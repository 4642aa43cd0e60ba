"""Our tokenizer's training time and encode throughput, against tiktoken with the same ranks.

    python bench/tokenizer_speed.py [--vocab-sizes 4096 32768] [--train-mb 20] [--encode-mb 2] [--threads 4]
                                    [--repeats 2] [--text DIR] [--json bench/results/tokenizer_speed.json]

Text: the documents of ../shared/data/pretrain_text as training reads them (Gutenberg headers stripped, books cut
into ~8k-character documents), shuffled with a fixed seed; generated pseudo-English when that folder is absent
(the output says so). The first `train-mb` MB train the tokenizer, cropped to 10,000 characters a document as the
tokenizer stage does; the next `encode-mb` MB, held out, are encoded.

Training: `Tokenizer.train` (HF `tokenizers` BPE trainer, which uses every core, then the export to tiktoken).
Encoding: nanochat.tokenizer.Tokenizer encodes with tiktoken (`encode` = `enc.encode_ordinary` plus optional BOS;
`encode_batch` = `enc.encode_ordinary_batch`, a thread pool per call), so both are measured next to the bare
tiktoken calls on the same ranks, batched the way the pretraining stream batches (128 documents a call, the
data config's 4 threads). The HF tokenizer saved beside it (`tokenizer.json`, same ids) is timed too: it is
what other tools would load. Bytes/token is on the held-out text.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from common import markdown_table, save

DOC_CAP = 10_000  # conf/stage/tokenizer.yaml tokenizer.doc_cap
STREAM_BATCH = 128  # TokenStream's tokenizer_batch


def load_documents(text_dir: Path | None, chars: int, seed: int = 0) -> tuple[list[str], str]:
    """Shuffled documents totalling >= `chars` (or all there are), and a line saying where they come from."""
    if text_dir is not None and text_dir.is_dir():
        from nanochat.data.documents import iter_documents

        docs = list(iter_documents([text_dir], gutenberg=True))
        random.Random(seed).shuffle(docs)
        label = f"real text: {text_dir} ({len(docs):,} documents, shuffled with seed {seed})"
    else:
        from data_stream import generated_documents

        docs = generated_documents(chars, seed)
        why = f"{text_dir} is absent" if text_dir is not None else "no ../shared/data"
        label = f"GENERATED pseudo-English text ({why})"
    return docs, label


def split_text(
    docs: list[str], train_chars: int, encode_chars: int, doc_cap: int = DOC_CAP
) -> tuple[list[str], list[str]]:
    """(training documents cropped to doc_cap, totalling ~train_chars; the following documents, ~encode_chars)."""
    from nanochat.tokenizer.training import capped_documents

    train = list(capped_documents(docs, train_chars, doc_cap))
    held, total = [], 0
    for doc in docs[len(train) :]:
        if total >= encode_chars:
            break
        held.append(doc)
        total += len(doc)
    if not held:
        raise SystemExit(f"no text left to encode after {train_chars:,} training characters; ask for less")
    return train, held


def time_training(train_docs: list[str], vocab_size: int):
    """(wall seconds, CPU seconds of all threads, tokenizer) for one `Tokenizer.train` on the documents."""
    from nanochat.tokenizer import Tokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    tok = Tokenizer.train(train_docs, vocab_size, show_progress=False)
    return time.perf_counter() - t0, time.process_time() - c0, tok


def encoders(tok, threads: int, batch: int = STREAM_BATCH) -> dict:
    """name -> fn(docs) -> list of token lists, for every encode path worth timing."""
    enc = tok.enc

    def batched(fn):
        return lambda docs: [ids for lo in range(0, len(docs), batch) for ids in fn(docs[lo : lo + batch])]

    out = {
        "ours: Tokenizer.encode, 1 thread": lambda docs: [tok.encode(d) for d in docs],
        f"ours: Tokenizer.encode_batch, {threads} threads, {batch} docs/call": batched(
            lambda b: tok.encode_batch(b, num_threads=threads)
        ),
        "tiktoken: encode_ordinary, 1 thread": lambda docs: [enc.encode_ordinary(d) for d in docs],
        f"tiktoken: encode_ordinary_batch, {threads} threads, {batch} docs/call": batched(
            lambda b: enc.encode_ordinary_batch(b, num_threads=threads)
        ),
    }
    if tok.hf is not None:
        out["HF tokenizers: encode_batch (Rust threads), same ids"] = lambda docs: [
            e.ids for e in tok.hf.encode_batch(docs, add_special_tokens=False)
        ]
    return out


def measure_encode(tok, docs: list[str], threads: int = 4, repeats: int = 2) -> list[dict]:
    """MB/s, tok/s and bytes/token of each encode path on `docs`, after a short warm-up.

    The methods take turns, `repeats` rounds, and each keeps its fastest round: on a shared machine the load
    drifts, and taking turns lets the drift hit every method alike (`common.best_of` would time one method's
    rounds back to back). CPU seconds (all threads) of that round come along: MB per CPU-second hardly depends
    on how much of the machine others take.
    """
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    methods = encoders(tok, threads)
    for fn in methods.values():
        fn(docs[:16])  # warm-up: thread pools, per-thread regex copies
    best: dict[str, tuple[float, float]] = {}
    ids: dict[str, list] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            ids[name] = fn(docs)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    reference = next(iter(ids.values()))
    rows = []
    for name, (seconds, cpu) in best.items():
        tokens = sum(map(len, ids[name]))
        rows.append(
            {
                "method": name,
                "seconds": seconds,
                "cpu_s": cpu,
                "bytes": nbytes,
                "tokens": tokens,
                "MB_s": nbytes / seconds / 1e6,
                "tok_s": tokens / seconds,
                "MB_per_cpu_s": nbytes / cpu / 1e6 if cpu > 0 else None,
                "bytes_per_token": nbytes / tokens,
                "same_ids_as_ours": ids[name] == reference,
            }
        )
    return rows


def tables(training: list[dict], encoding: dict[int, list[dict]], source_line: str, threads: int) -> str:
    train_rows = [
        [
            f"{t['requested_vocab']:,}"
            + ("" if t["vocab_size"] == t["requested_vocab"] else f" (got {t['vocab_size']:,})"),
            f"{t['chars'] / 1e6:.1f}M chars, {t['docs']:,} docs",
            f"{t['seconds']:.1f}",
            f"{t['cpu_s']:.1f}",
            f"{t['bytes'] / t['seconds'] / 1e6:.2f}",
        ]
        for t in training
    ]
    enc_rows = []
    for vocab, rows in encoding.items():
        for r in rows:
            enc_rows.append(
                [
                    f"{vocab:,}",
                    r["method"],
                    f"{r['MB_s']:.2f}",
                    f"{r['tok_s']:,.0f}",
                    f"{r['MB_per_cpu_s']:.2f}" if r["MB_per_cpu_s"] else "n/a",
                    f"{r['bytes_per_token']:.3f}",
                    "yes" if r["same_ids_as_ours"] else "**no**",
                ]
            )
    held = next(iter(encoding.values()))[0]
    return "\n".join(
        [
            f"Data: {source_line}. Machine: {os.cpu_count()} cores.",
            "",
            markdown_table(
                ["vocab", "training text", "train seconds", "train CPU s (all threads)", "train MB/s"], train_rows
            ),
            "",
            f"Encoding {held['bytes'] / 1e6:.1f} MB of held-out text ({threads} threads where batched):",
            "",
            markdown_table(
                ["vocab", "method", "MB/s", "tok/s", "MB per CPU-second", "bytes/token", "same ids as ours"], enc_rows
            ),
        ]
    )


def main() -> None:
    from nanochat.paths import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--train-mb", type=float, default=20, help="MB (millions of characters) of training text")
    parser.add_argument(
        "--encode-mb", type=float, default=2, help="MB (millions of characters) of held-out text to encode"
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="threads for the batched encoders (data.tokenizer_threads)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of timed encodes, methods taking turns (best counts)"
    )
    parser.add_argument("--text", type=Path, default=None, help="text folder (default ../shared/data/pretrain_text)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/tokenizer_speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    t_all = time.perf_counter()

    text_dir = args.text or ((shared_data_dir() / "pretrain_text") if shared_data_dir() else None)
    train_chars, encode_chars = int(args.train_mb * 1e6), int(args.encode_mb * 1e6)
    docs, source_line = load_documents(text_dir, train_chars + encode_chars)
    train_docs, held = split_text(docs, train_chars, encode_chars)
    print(f"data: {source_line}", flush=True)

    training, encoding = [], {}
    train_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
    for vocab in args.vocab_sizes:
        seconds, cpu, tok = time_training(train_docs, vocab)
        training.append(
            {
                "requested_vocab": vocab,
                "vocab_size": tok.vocab_size,
                "docs": len(train_docs),
                "chars": sum(map(len, train_docs)),
                "bytes": train_bytes,
                "seconds": seconds,
                "cpu_s": cpu,
            }
        )
        print(f"vocab {vocab:,}: trained in {seconds:.1f} s", flush=True)
        encoding[vocab] = measure_encode(tok, held, args.threads, args.repeats)

    settings = {
        "data": source_line,
        "train_chars": train_chars,
        "encode_chars": encode_chars,
        "doc_cap": DOC_CAP,
        "threads": args.threads,
        "batch_docs": STREAM_BATCH,
        "repeats": args.repeats,
        "held_out_docs": len(held),
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print()
    save(
        args.json,
        tables(training, encoding, source_line, args.threads),
        {"training": training, "encoding": {str(k): v for k, v in encoding.items()}},
        settings,
    )
    print(f"wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
