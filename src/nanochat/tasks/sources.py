"""Rows of a hub dataset, read through `datasets` (its cache) or from local files in the same format.

Local files: parquet, jsonl / jsonl.gz, json (an array of records) or csv; `path` may be one file or a folder,
in which case the files whose name or folder names the split are read (`train.jsonl`, `dev/x_dev.csv`,
`main/train-00000-of-00001.parquet`), in sorted order. Every local row gets a `_file` key (the file stem).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from nanochat.errors import DataUnavailable, UserError

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv")


class Rows:
    """A read-only sequence of dict rows over one or more arrow tables (local) or a `datasets.Dataset` (hub)."""

    def __init__(self, segments: list, names: list[str] | None = None, shuffle_seed: int | None = None):
        self.segments = segments  # pyarrow Tables or datasets.Dataset objects
        self.names = names  # per segment file stem, or None for hub data
        self.offsets = [0]
        for seg in segments:
            self.offsets.append(self.offsets[-1] + len(seg))
        # Same order as `datasets.Dataset.shuffle(seed=...)`: a numpy default_rng permutation.
        self.order = None if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(self))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        if self.order is not None:
            index = int(self.order[index])
        s = bisect.bisect_right(self.offsets, index) - 1
        seg, j = self.segments[s], index - self.offsets[s]
        if self.names is None:
            return dict(seg[j])
        row = seg.slice(j, 1).to_pylist()[0]
        row["_file"] = self.names[s]
        return row


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(LOCAL_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _names_split(rel: Path, split: str) -> bool:
    parts = [*rel.parts[:-1], _stem(rel)]
    return any(p == split or p.startswith(f"{split}-") or p.endswith(f"_{split}") for p in parts)


def local_files(path: str | Path, split: str | None) -> list[Path]:
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataUnavailable(f"local dataset path {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if split is not None:
        files = [p for p in files if _names_split(p.relative_to(path), split)]
    if not files:
        raise UserError(f"no {'/'.join(s.lstrip('.') for s in LOCAL_SUFFIXES)} files for split {split!r} under {path}")
    return files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> list:
    """The records of a jsonl file; a bad line is a UserError naming file:line (curated task data is not skipped)."""
    records = []
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                records.append(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno} is not valid UTF-8 (bad byte at offset {e.start}); fix or delete that line"
                ) from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(records[-1], dict):
                raise UserError(
                    f"{path}:{lineno} is not a record (an object with named fields); fix or delete that line"
                )
    return records


def read_table(path: Path):
    """One local file as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = path.name
    try:
        if name.endswith(".parquet"):
            return pq.read_table(path)
        if name.endswith((".jsonl", ".jsonl.gz")):
            records = _read_jsonl(path)
        else:
            with _open_text(path) as f:
                records = list(csv.DictReader(io.StringIO(f.read()))) if name.endswith(".csv") else json.load(f)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read dataset file {path}: {e}") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"dataset file {path} must hold records (objects with named fields)")
    return pa.Table.from_pylist(records)


def hub_offline() -> None:
    """Make `datasets` read only its cache from now on: no requests, no retries, no waiting on a network.

    The libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when imported, so the variables are set for later
    imports and the flags of modules already imported are set too.
    """
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def load_rows(
    repo_id: str,
    config: str | None,
    split: str,
    path: str | Path | None = None,
    shuffle_seed: int | None = None,
    local_split: str | None = "",
) -> Rows:
    """The split's rows from `path` when given, else from the `datasets` hub cache; a UserError if neither works.

    `local_split` overrides the split used to pick files in a local folder (None: read every file).
    """
    if path is not None:
        files = local_files(path, split if local_split == "" else local_split)
        return Rows([read_table(p) for p in files], [_stem(p) for p in files], shuffle_seed)
    how = (
        f"dataset {repo_id!r} (config {config!r}, split {split!r}) is neither in the Hugging Face cache nor given "
        f"locally: pass path=<a parquet/jsonl/csv file or folder in the hub format>, or run once with network "
        f"access so `datasets` caches it"
    )
    try:
        import datasets
    except ImportError as e:
        raise DataUnavailable(how + " (the `datasets` package is not installed)") from e
    not_found = (OSError, ConnectionError, getattr(datasets.exceptions, "DatasetNotFoundError", OSError))
    try:
        ds = datasets.load_dataset(repo_id, config, split=split)
    except not_found as e:
        raise DataUnavailable(f"{how} ({type(e).__name__}: {e})") from e
    return Rows([ds], None, shuffle_seed)
