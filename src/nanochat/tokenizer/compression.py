"""Compression of a tokenizer (UTF-8 bytes per token) on held-out texts, next to GPT-2 and GPT-4 when available."""

from __future__ import annotations

import csv
import gzip
import inspect
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import tiktoken

REFERENCE_ENCODINGS = {"gpt2": "GPT-2", "cl100k_base": "GPT-4"}


@contextmanager
def _no_downloads():
    """tiktoken fetches missing files over the network; allow only what its local cache already holds."""
    import tiktoken.load as tl

    def refuse(blobpath: str) -> bytes:
        raise FileNotFoundError(f"{blobpath} is not in tiktoken's local cache")

    original, tl.read_file = tl.read_file, refuse
    try:
        yield
    finally:
        tl.read_file = original


def reference_encodings(allow_download: bool = False) -> tuple[dict[str, tiktoken.Encoding], list[str]]:
    """GPT-2 / GPT-4 encodings that can be loaded (from tiktoken's cache unless downloads are allowed), and notes."""
    found, notes = {}, []
    for name, label in REFERENCE_ENCODINGS.items():
        try:
            if allow_download:
                found[label] = tiktoken.get_encoding(name)
            else:
                with _no_downloads():
                    found[label] = tiktoken.get_encoding(name)
        except Exception as e:  # noqa: BLE001 - any failure just means "not available"
            notes.append(
                f"{label} ({name}) not available locally: {type(e).__name__}; pass --allow-download to fetch it"
            )
    return found, notes


def held_out_samples(shared_data: Path | None, max_chars: int = 200_000) -> dict[str, str]:
    """Texts no tokenizer trained on pretrain_text has seen: math, code, exam questions, chat; plus Python source.

    The first four come from ../shared/data in their published formats; the last is on every machine.
    """
    samples: dict[str, str] = {}
    readers: dict[str, Callable[[Path], list[str]]] = {
        "gsm8k": lambda d: [f"{r['question']}\n{r['answer']}" for r in _jsonl(d / "gsm8k" / "test.jsonl")],
        "humaneval": lambda d: [
            r["prompt"] + r["canonical_solution"] for r in _jsonl(d / "humaneval" / "HumanEval.jsonl.gz")
        ],
        "mmlu": lambda d: [
            " ".join(row)
            for f in sorted((d / "mmlu" / "test").glob("*.csv"))
            for row in csv.reader(open(f, encoding="utf-8"))
        ],
        "chat": lambda d: [
            m["content"] for conv in _jsonl(d / "chat_sft" / "nanochat_identity_conversations.jsonl") for m in conv
        ],
    }
    if shared_data is not None:
        for name, read in readers.items():
            try:
                samples[name] = "\n\n".join(read(shared_data))[:max_chars]
            except FileNotFoundError:
                continue
    # The standard library's own source is text that every Python installation carries.
    samples["python-source"] = (inspect.getsource(json.decoder) + inspect.getsource(inspect))[:max_chars]
    return samples


def _jsonl(path: Path) -> list:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compression_table(encoders: dict[str, Callable[[str], list[int]]], samples: dict[str, str]) -> list[dict]:
    """One row per sample: its size in bytes and bytes/token under each encoder."""
    rows = []
    for name, text in samples.items():
        n_bytes = len(text.encode("utf-8"))
        row = {"text": name, "bytes": n_bytes}
        for label, encode in encoders.items():
            n_tokens = len(encode(text))
            row[label] = n_bytes / n_tokens if n_tokens else float("nan")
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no texts)"
    labels = [k for k in rows[0] if k not in ("text", "bytes")]
    widths = [max(12, len(label) + 8) for label in labels]
    header = f"{'text':<16}{'bytes':>10}" + "".join(f"{label + ' B/tok':>{w}}" for label, w in zip(labels, widths))
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['text']:<16}{r['bytes']:>10,}" + "".join(f"{r[label]:>{w}.3f}" for label, w in zip(labels, widths))
        )
    return "\n".join(lines)
