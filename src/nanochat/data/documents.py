"""Read documents (strings) from plain text, jsonl and parquet files or directories of them.

Formats:
- `.txt`: cut into documents of about `txt_doc_chars` characters at paragraph boundaries (blank
  lines), so a book becomes many web-page-sized documents that keep their paragraph breaks; text without
  blank lines is cut at line ends. Byte-order marks are dropped and CRLF / CR line endings become `\\n`.
- `.jsonl`: one JSON object per line with a string field `text`.
- `.parquet`: a string column `text` (the FineWeb-Edu shard layout), read one row group at a time.

Problems with the input files (missing path, no readable files, a parquet file without a `text` column) raise
UserError naming the file. Bad rows depend on `on_bad_data`: "fail" raises a UserError naming the file and line
(or row); "skip" passes over a malformed jsonl line, a row without a string `text` or with invalid UTF-8 (and a
parquet value that is not text), counts them and ends with one warning giving the count and the first locations.
Invalid UTF-8 in a .txt file is replaced by U+FFFD in skip mode, with one warning per file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.errors import UserError

log = logging.getLogger(__name__)

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


class BadRows:
    """Rows passed over (on_bad_data=skip) with the first few locations, or a UserError at the first (fail)."""

    SHOWN = 5

    def __init__(self, on_bad_data: str = "skip", hint: str = ""):
        if on_bad_data not in ("skip", "fail"):
            raise UserError(f"on_bad_data must be 'skip' or 'fail', got {on_bad_data!r}")
        self.on_bad_data, self.hint = on_bad_data, hint
        self.count = 0
        self.where: list[str] = []

    def add(self, where: str, why: str) -> None:
        if self.on_bad_data == "fail":
            raise UserError(f"{where} {why}{self.hint}")
        self.count += 1
        if len(self.where) < self.SHOWN:
            self.where.append(f"{where} ({why})")

    def warn(self) -> None:
        if self.count:
            more = f" and {self.count - len(self.where)} more" if self.count > len(self.where) else ""
            log.warning(f"skipped {self.count:,} bad input row(s): {'; '.join(self.where)}{more}")


def read_text_file(path: Path, bad: BadRows | None = None) -> str:
    """The file's text; invalid UTF-8 is a UserError, or (skip mode) replaced by U+FFFD with one warning."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if bad is None or bad.on_bad_data == "fail":
            raise UserError(
                f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8"
            ) from None
        # A stray byte in a book should not cost the book: keep the text around it.
        text = data.decode("utf-8-sig", errors="replace")
        log.warning(
            f"{path} is not valid UTF-8 (first bad byte at offset {e.start}): "
            f"{text.count(chr(0xFFFD)):,} undecodable character(s) replaced by U+FFFD"
        )
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


def iter_documents(
    inputs: Iterable[str | Path],
    *,
    gutenberg: bool = False,
    txt_doc_chars: int = 8000,
    on_bad_data: str = "fail",
    bad: BadRows | None = None,
) -> Iterator[str]:
    """Yield every non-empty document of the given files/directories, in sorted file order.

    `gutenberg=True` strips Project Gutenberg licence headers and footers from plain-text files. Bad rows
    raise (on_bad_data="fail", for tools reading files a user names) or are skipped, counted in `bad` (a
    BadRows, made from on_bad_data when not given) and summed up in one warning at the end.
    """
    bad = bad or BadRows(on_bad_data)
    for path in list_files(inputs):
        if path.suffix in TEXT_SUFFIXES:
            text = read_text_file(path, bad)
            if gutenberg:
                text = strip_gutenberg(text)
            for doc in split_text(text, txt_doc_chars):
                if doc.strip():
                    yield doc.strip("\n")
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, bad)
        else:
            yield from _iter_parquet(path, bad)
    bad.warn()


def _iter_jsonl(path: Path, bad: BadRows) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.add(f"{path}:{lineno}", f"is not valid UTF-8 (bad byte at offset {e.start})")
                continue
            except json.JSONDecodeError as e:
                bad.add(f"{path}:{lineno}", f"is not valid JSON ({e.msg})")
                continue
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                bad.add(f"{path}:{lineno}", "has no string field 'text'")
            elif text.strip():
                yield text


def _iter_parquet(path: Path, bad: BadRows) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
    for rg in range(pf.num_row_groups):
        for row, text in enumerate(pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()):
            if isinstance(text, bytes):  # a binary column
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad.add(f"{path} row group {rg} row {row}", f"is not valid UTF-8 (bad byte at offset {e.start})")
                    continue
            if text is not None and not isinstance(text, str):
                bad.add(f"{path} row group {rg} row {row}", f"is a {type(text).__name__}, not text")
            elif text and text.strip():
                yield text
