"""The on-disk layout of pretraining shards, shared by the FineWeb-Edu download and local preparation.

A shard directory holds `shard_00000.parquet`, `shard_00001.parquet`, ... Each file has one string column
`text` (one document per row) in row groups of 1,024 documents, zstd level 3, without dictionary encoding
or column statistics: the layout of nanochat's published FineWeb-Edu re-packaging. The last shard (in sorted
order) is the validation split; all others are training data.

`prepare` turns local text / jsonl / parquet files into such a directory plus a `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.data.documents import BadRows, iter_documents, list_files
from nanochat.errors import UserError
from nanochat.io import atomic_open, atomic_write

ROW_GROUP_DOCS = 1024
ZSTD_LEVEL = 3
MANIFEST_NAME = "manifest.json"
FILL_HINT = (
    "fill it with `nanochat data download fineweb-edu -n 8` or `nanochat data prepare <files or dirs> --out <dir>`"
)
SPLIT_RULE = (
    "a document goes to validation when blake2b-64(utf-8 text) / 2**64 < val_fraction "
    "(at least one document per split); train documents are shuffled with random.Random(seed), "
    "validation documents are ordered by that hash"
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def write_shard(path: str | Path, texts: list[str]) -> None:
    """Write one shard atomically: readers see the complete file or none (never a truncated parquet file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, type=pa.string())})
    # The temp name ends in .tmp, so list_shards never mistakes it for a shard.
    with atomic_open(path) as f:
        pq.write_table(
            table,
            f,
            row_group_size=ROW_GROUP_DOCS,
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            use_dictionary=False,
            write_statistics=False,
        )


def _shard_files(directory: Path) -> list[Path]:
    # Hidden names are temp files of write_shard; .part downloads do not end in .parquet.
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.parquet") if p.is_file() and not p.name.startswith("."))


def list_shards(directory: str | Path) -> list[Path]:
    """The shard files of a directory in sorted order; UserError if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"shard directory {directory} does not exist; {FILL_HINT}")
    files = _shard_files(directory)
    if not files:
        raise UserError(f"shard directory {directory} holds no .parquet shards; {FILL_HINT}")
    return files


def split_shards(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split sorted shard files into (train, val): the last shard is validation, as in nanochat."""
    files = list(files)
    if len(files) < 2:
        where = f" ({files[0]})" if files else ""
        raise UserError(
            f"need at least 2 shards (training + the last one for validation) but found {len(files)}{where}; "
            "download more with `nanochat data download fineweb-edu -n 8` or re-run prepare"
        )
    return files[:-1], files[-1:]


def check_shard(path: str | Path) -> int:
    """Number of documents in a shard, read from the parquet footer only; UserError if it is not usable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for truncated or foreign files
        raise UserError(
            f"{path} is not a readable parquet file ({' '.join(str(e).split())}); it is probably corrupt or truncated: "
            "delete it and re-run the download or prepare command"
        ) from None
    field = schema.field("text") if "text" in schema.names else None
    # Binary is accepted: its values are checked (UTF-8) one document at a time by the stream.
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if field is None or not any(is_kind(field.type) for is_kind in kinds):
        raise UserError(f"{path} has no string column 'text' (columns: {schema.names}); it is not a text shard")
    if meta.num_rows == 0:
        raise UserError(f"{path} is an empty shard (0 rows); delete it and re-run the download or prepare command")
    return meta.num_rows


def val_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) per document: the same text always lands in the same split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(docs: Iterable[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) by val_score; the val list is sorted by score so it does not depend on input order."""
    train: list[tuple[float, str]] = []
    val: list[tuple[float, str]] = []
    for doc in docs:
        score = val_score(doc)
        (val if score < val_fraction else train).append((score, doc))
    if len(train) + len(val) < 2:
        raise UserError(
            f"the input is too small: it has {len(train) + len(val)} document(s) but needs at least 2 "
            "(one for training, one for validation)"
        )
    # Tiny corpora may hash every document to one side; move the document nearest the boundary across.
    if not val:
        i = min(range(len(train)), key=lambda k: train[k])
        val.append(train.pop(i))
    if not train:
        i = max(range(len(val)), key=lambda k: val[k])
        train.append(val.pop(i))
    val.sort()
    return [doc for _, doc in train], [doc for _, doc in val]


def chunk_by_chars(docs: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    """Group documents into shards, closing each one as soon as it holds shard_chars characters."""
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= shard_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_prepare_args(val_fraction: float, shard_chars: int) -> None:
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if shard_chars < 1:
        raise UserError(f"shard_chars must be a positive number of characters, got {shard_chars}")


def prepare(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    gutenberg: bool = False,
    val_fraction: float = 0.01,
    shard_chars: int = 250_000_000,
    seed: int = 42,
    txt_doc_chars: int = 8000,
    overwrite: bool = False,
    show_progress: bool = True,
    on_bad_data: str = "skip",
) -> dict:
    """Turn local text / jsonl / parquet files into a shard directory and return its manifest.

    The whole corpus is held in memory (documents are shuffled globally), which suits corpora up to a few GB;
    larger ones should be downloaded or pre-sharded instead. The validation split depends only on each
    document's text and val_fraction (see SPLIT_RULE), so adding inputs or reordering them keeps the
    validation documents of the others where they were. Train shards come first, the validation shard last.
    Bad input rows are skipped and counted (manifest "skipped_rows", one warning), or with on_bad_data="fail"
    raise a UserError naming the file and line.
    """
    from tqdm import tqdm

    _check_prepare_args(val_fraction, shard_chars)
    out_dir = Path(out_dir)
    old = _shard_files(out_dir)
    if old and not overwrite:
        raise UserError(
            f"{out_dir} already holds {len(old)} shard(s); pass --overwrite to replace them or choose another --out"
        )
    files = list_files(inputs)

    # Read everything before deleting old shards: a bad input must not cost the user their previous shards.
    bad = BadRows(
        on_bad_data, hint="; fix or delete that row, or set data.on_bad_data=skip to skip (and count) such rows"
    )
    docs = tqdm(
        iter_documents(files, gutenberg=gutenberg, txt_doc_chars=txt_doc_chars, bad=bad),
        desc="reading documents",
        unit="doc",
        disable=not show_progress,
    )
    with docs:
        train, val = split_documents(docs, val_fraction)
    random.Random(seed).shuffle(train)

    for path in old:
        path.unlink()
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    train_names = []
    for index, batch in enumerate(chunk_by_chars(train, shard_chars)):
        train_names.append(shard_name(index))
        write_shard(out_dir / train_names[-1], batch)
    val_name = shard_name(len(train_names))
    write_shard(out_dir / val_name, val)

    manifest = {
        "sources": [str(f) for f in files],
        "gutenberg": gutenberg,
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_chars": shard_chars,
        "txt_doc_chars": txt_doc_chars,
        "rule": SPLIT_RULE,
        "num_shards": len(train_names) + 1,
        "train": {"docs": len(train), "chars": sum(map(len, train)), "shards": train_names},
        "val": {"docs": len(val), "chars": sum(map(len, val)), "shards": [val_name]},
    }
    if bad.count:
        manifest["skipped_rows"] = bad.count
    # Written last: a manifest means the directory is complete.
    atomic_write(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest
