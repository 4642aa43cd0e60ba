"""Read documents (strings) from plain text, jsonl and parquet files or directories of them.

Formats:
- `.txt`: cut into documents of about `txt_doc_chars` characters at paragraph boundaries (blank
  lines), so a book becomes many web-page-sized documents that keep their paragraph breaks; text without
  blank lines is cut at line ends. Byte-order marks are dropped and CRLF / CR line endings become `\\n`.
- `.jsonl`: one JSON object per line with a string field `text`.
- `.parquet`: a string column `text` (the FineWeb-Edu shard layout), read one row group at a time.

Problems with the input (missing path, no readable files, invalid UTF-8, a malformed jsonl row, a parquet
file without a `text` column) raise UserError naming the file and, where it applies, the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.errors import UserError

TEXT_SUFFIXES = (".txt",)
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")

_GUTENBERG_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF (THE|THIS) PROJECT GUTENBERG", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Keep what lies between Project Gutenberg's START and END marker lines (to the end if END is missing)."""
    start = _GUTENBERG_START.search(text)
    if start is None:
        return text
    end = _GUTENBERG_END.search(text, start.end())
    return text[start.end() : end.start() if end else len(text)].strip()


def list_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into the readable files they name."""
    files: list[Path] = []
    inputs = list(inputs)
    if not inputs:
        raise UserError("no input given: pass one or more text, jsonl or parquet files or directories")
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise UserError(f"directory {item} holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif item.is_file():
            if item.suffix not in SUFFIXES:
                raise UserError(f"{item} has an unsupported suffix; expected one of {', '.join(SUFFIXES)}")
            files.append(item)
        else:
            raise UserError(f"input path {item} does not exist")
    return files


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_text(text: str, target_chars: int = 8000) -> Iterator[str]:
    """Cut text into pieces of at least target_chars, ending at a blank line (or any line end past 4x target)."""
    chunk: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        chunk.append(line)
        size += len(line)
        if size >= target_chars and (not line.strip() or size >= 4 * target_chars):
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)


def iter_documents(inputs: Iterable[str | Path], *, gutenberg: bool = False, txt_doc_chars: int = 8000) -> Iterator[str]:
    """Yield every non-empty document of the given files/directories, in sorted file order.

    `gutenberg=True` strips Project Gutenberg licence headers and footers from plain-text files.
    """
    for path in list_files(inputs):
        if path.suffix in TEXT_SUFFIXES:
            text = read_text_file(path)
            if gutenberg:
                text = strip_gutenberg(text)
            for doc in split_text(text, txt_doc_chars):
                if doc.strip():
                    yield doc.strip("\n")
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            yield from _iter_parquet(path)


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno} is not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno} has no string field 'text'")
            if text.strip():
                yield text


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
            if text and text.strip():
                yield text
