"""Download published pretraining shards (nanochat's shuffled re-packagings of FineWeb-Edu and of ClimbMix), the
single files the chat mixtures use (identity conversations, the English word list) and the CORE evaluation bundle.

Each shard is fetched into `<name>.part`, checked to be readable parquet and then renamed into place, so a
`shard_XXXXX.parquet` on disk is always complete. An interrupted transfer keeps its `.part` file and the
next attempt (or the next run) continues it with an HTTP Range request. Only the standard library does HTTP.

The CORE bundle (`ensure_eval_bundle`, or `nanochat data fetch eval_bundle`) travels the same way as
a zip, is checked (CRCs of every member), extracted into a staging directory beside the target and renamed
into place, so `<home>/eval_bundle/` is either absent or complete (core.yaml, eval_meta_data.csv, eval_data/).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nanochat.data.shards import check_shard, shard_name
from nanochat.errors import UserError
from nanochat.paths import base_dir

CHUNK_BYTES = 1 << 20
USER_AGENT = "nanochat-data-download"


@dataclass(frozen=True)
class Source:
    """A published set of shards `shard_00000.parquet` ... With `val_shard`, that shard is the validation split and
    comes with every download besides the -n training shards; without, the last shard fetched is validation."""

    base_url: str
    num_shards: int
    dirname: str
    val_shard: int | None = None


SOURCES = {
    "fineweb-edu": Source(
        base_url="https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        num_shards=1823,
        dirname="fineweb_edu",
    ),
    # NVIDIA's Nemotron-ClimbMix, shuffled and re-packaged as text shards of ~250M characters for nanochat.
    "climbmix": Source(
        base_url="https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        num_shards=6543,
        dirname="climbmix",
        val_shard=6542,
    ),
}


@dataclass(frozen=True)
class RemoteFile:
    """One download: `url` becomes `<out_dir>/<name>`, out_dir defaulting to <home>/<home_subdir>.

    Plain files must be non-empty UTF-8 text. With `unpack` the URL is a zip, extracted into the directory `name`,
    which must then hold every path in `required` (a trailing "/" marks a directory).
    """

    url: str
    name: str
    home_subdir: str = "data"
    unpack: bool = False
    required: tuple[str, ...] = ()


# The hub mixture (conf/mixture/hub.yaml) reads identity and words from <home>/data; CORE reads <home>/eval_bundle.
FILES = {
    "identity": RemoteFile(
        "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl",
        "identity_conversations.jsonl",
    ),
    "words": RemoteFile(
        "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt", "words_alpha.txt"
    ),
    "eval_bundle": RemoteFile(
        "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip",
        "eval_bundle",
        home_subdir="",
        unpack=True,
        required=("core.yaml", "eval_meta_data.csv", "eval_data/"),
    ),
}


class RetryableError(Exception):
    """A failed attempt worth repeating (network trouble, server error, truncated or corrupt transfer)."""


class PermanentError(Exception):
    """A failed attempt that repeating will not fix (e.g. 404)."""


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise UserError(f"unknown data source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def _shard_indices(source_name: str, source: Source, num_shards: int) -> list[int]:
    """Training shards 0 .. num_shards-1 (-1: all), then the validation shard when the source names one."""
    train = source.num_shards - (source.val_shard is not None)
    if num_shards == -1:
        num_shards = train
    if num_shards < 1:
        raise UserError(f"the number of shards must be positive (or -1 for all), got {num_shards}")
    if num_shards > train:
        what = "training shards (and one validation shard)" if source.val_shard is not None else "shards"
        raise UserError(f"{source_name} publishes {train} {what} but {num_shards} were requested")
    return list(range(num_shards)) + ([source.val_shard] if source.val_shard is not None else [])


def _is_complete_shard(path: Path) -> bool:
    try:
        check_shard(path)
    except UserError:
        return False
    return True


def _fetch_once(url: str, part: Path, opener, timeout: float) -> None:
    """One HTTP attempt that appends to (or restarts) `part`; raises RetryableError/PermanentError."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our .part is not a prefix of the file the server has: start over
            part.unlink(missing_ok=True)
            raise RetryableError("HTTP 416, restarting from byte 0") from None
        # Client errors other than timeout / rate limiting will not go away by asking again.
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise PermanentError(f"HTTP {e.code} {e.reason}") from None
        raise RetryableError(f"HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are OSErrors
        raise RetryableError(str(e) or type(e).__name__) from None

    with response:
        resumed = offset > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink(missing_ok=True)
            raise RetryableError("server answered a different byte range, restarting from byte 0")
        # A 200 to a Range request carries the whole file: overwrite rather than append.
        expected = response.headers.get("Content-Length")
        written = 0
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise RetryableError(f"transfer interrupted after {written} bytes ({e or type(e).__name__})") from None
    # http.client returns a short body silently when the connection drops, so compare with the header.
    if expected is not None and written < int(expected):
        raise RetryableError(f"connection closed after {written} of {expected} bytes")


def fetch_shard(
    url: str,
    dest: Path,
    *,
    opener,
    attempts: int,
    backoff: float,
    sleep: Callable[[float], None],
    timeout: float,
    verify: Callable[[Path], bool] = _is_complete_shard,
) -> None:
    """Download url to dest with retries; on success dest passed `verify` (default: a readable shard), else
    raises PermanentError."""
    part = dest.with_name(dest.name + ".part")
    if part.exists() and verify(part):  # an earlier run finished the transfer but not the rename
        os.replace(part, dest)
        return
    error = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(url, part, opener, timeout)
            if not verify(part):
                part.unlink()  # resuming a corrupt file cannot help: start over
                raise RetryableError("downloaded file failed its check (not readable parquet / UTF-8 text / zip)")
            os.replace(part, dest)
            return
        except RetryableError as e:
            error = str(e)
        if attempt < attempts:
            sleep(backoff**attempt)
    raise PermanentError(f"{error} (after {attempts} attempts)")


def download(
    name: str,
    num_shards: int,
    out_dir: str | Path | None = None,
    *,
    base_url: str | None = None,
    workers: int = 4,
    attempts: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    opener=None,
    sleep: Callable[[float], None] = time.sleep,
    show_progress: bool = True,
) -> list[Path]:
    """Make sure shards 0 .. num_shards-1 (-1: all) of a published source, and its validation shard if it has one,
    are on disk; return their paths (the validation shard last).

    Shards already present and readable are kept. `base_url` points at a mirror, `opener` (anything with
    urllib's `open(request, timeout=)`) replaces the HTTP transport. Shards that still fail after `attempts`
    tries (waiting backoff**attempt seconds between tries) are reported in one UserError at the end; the
    others stay on disk and a re-run fetches only what is missing.
    """
    from tqdm import tqdm

    source = _source(name)
    indices = _shard_indices(name, source, num_shards)
    count = len(indices)
    if workers < 1 or attempts < 1:
        raise UserError(f"workers and attempts must be at least 1 (got workers={workers}, attempts={attempts})")
    out_dir = Path(out_dir) if out_dir is not None else base_dir() / "data" / source.dirname
    out_dir.mkdir(parents=True, exist_ok=True)
    base_url = (base_url or source.base_url).rstrip("/")
    opener = opener or urllib.request.build_opener()

    paths = [out_dir / shard_name(i) for i in indices]
    todo = [p for p in paths if not _is_complete_shard(p)]
    for path in todo:
        path.unlink(missing_ok=True)  # a corrupt or empty shard must not linger if its download fails
    failures: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(
            total=count, initial=count - len(todo), desc=f"downloading {name}", unit="shard", disable=not show_progress
        ) as progress:
            futures = {
                pool.submit(
                    fetch_shard,
                    f"{base_url}/{p.name}",
                    p,
                    opener=opener,
                    attempts=attempts,
                    backoff=backoff,
                    sleep=sleep,
                    timeout=timeout,
                ): p
                for p in todo
            }
            for future in as_completed(futures):
                try:
                    future.result()
                except PermanentError as e:
                    failures[futures[future].name] = str(e)
                progress.update(1)
    finally:
        # On Ctrl-C, drop the queued shards instead of waiting for all of them; running ones keep their .part.
        pool.shutdown(wait=True, cancel_futures=True)

    if failures:
        listed = "; ".join(f"{shard}: {why}" for shard, why in sorted(failures.items()))
        raise UserError(
            f"could not download {len(failures)} of {count} shards from {base_url} ({listed}); "
            f"the other {count - len(failures)} are in {out_dir} "
            "and re-running the command fetches only the missing ones"
        )
    return paths


def _is_text(path: Path) -> bool:
    try:
        return path.stat().st_size > 0 and bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def _is_zip(path: Path) -> bool:
    """A complete zip whose members all decompress with the right CRC."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, ValueError):
        return False


def _missing(root: Path, required: tuple[str, ...]) -> list[str]:
    return [r for r in required if not ((root / r).is_dir() if r.endswith("/") else (root / r).is_file())]


def _is_unpacked(root: Path, spec: RemoteFile) -> bool:
    return root.is_dir() and not _missing(root, spec.required)


def _check_members(zf: zipfile.ZipFile, url: str) -> None:
    """Refuse members that would land outside the extraction directory (zip-slip)."""
    for member in zf.namelist():
        path = PurePosixPath(member.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts:
            raise UserError(
                f"the zip from {url} holds the unsafe member path {member!r} (absolute or with '..'), "
                "so it was not extracted"
            )


def _unpack(zip_path: Path, dest: Path, spec: RemoteFile, url: str) -> None:
    """Extract zip_path beside dest and rename it into place; the result directly holds spec.required."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    old = None
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _check_members(zf, url)
                zf.extractall(staging)
        except UserError:
            zip_path.unlink(missing_ok=True)  # it will never extract safely: fetch afresh next time
            raise
        root = staging
        if _missing(staging, spec.required):  # the files may sit under one top-level folder (eval_bundle/)
            tops = [p for p in staging.iterdir() if p.name != "__MACOSX"]
            if len(tops) == 1 and tops[0].is_dir():
                root = tops[0]
        if missing := _missing(root, spec.required):
            zip_path.unlink(missing_ok=True)
            raise UserError(
                f"the zip from {url} has no {', '.join(missing)} at its root or under one top-level "
                "folder, so it is not the expected bundle"
            )
        if dest.exists():  # an incomplete leftover (a complete one returned earlier): move it out of the way
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        try:
            os.replace(root, dest)
        except OSError:
            if not _is_unpacked(dest, spec):  # another process may have just put a complete bundle there
                raise
    finally:
        for leftover in (staging, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    zip_path.unlink(missing_ok=True)


def download_file(
    name: str,
    out_dir: str | Path | None = None,
    *,
    url: str | None = None,
    attempts: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    opener=None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Make sure one of FILES is in `out_dir` (default <home>/data, for eval_bundle <home>); return its path.

    Plain files must be non-empty UTF-8 text. An `unpack` entry (eval_bundle) is downloaded as `<name>.zip`
    (resumable, checked to be an intact zip), extracted beside the target and renamed into place as the
    directory `<name>`; if that directory is already complete nothing is downloaded.
    """
    if name not in FILES:
        raise UserError(f"unknown file {name!r}; known files: {', '.join(sorted(FILES))}")
    spec = FILES[name]
    dest = Path(out_dir if out_dir is not None else base_dir() / spec.home_subdir) / spec.name
    if _is_unpacked(dest, spec) if spec.unpack else _is_text(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = url or spec.url
    target = dest.with_name(dest.name + ".zip") if spec.unpack else dest
    verify = _is_zip if spec.unpack else _is_text
    try:
        if not (spec.unpack and verify(target)):  # a zip left by a run that stopped before extracting is reused
            fetch_shard(
                url,
                target,
                opener=opener or urllib.request.build_opener(),
                attempts=attempts,
                backoff=backoff,
                sleep=sleep,
                timeout=timeout,
                verify=verify,
            )
    except PermanentError as e:
        raise UserError(
            f"could not download {name} from {url} ({e}); re-running continues any partial transfer"
        ) from None
    if spec.unpack:
        _unpack(target, dest, spec, url)
    return dest


def ensure_eval_bundle(out_dir: str | Path | None = None, url: str | None = None, **kwargs) -> Path:
    """The CORE evaluation bundle directory (core.yaml, eval_meta_data.csv, eval_data/), downloading it if needed.

    It lands in `<out_dir>/eval_bundle` (default <home>/eval_bundle); the command line equivalent is
    `nanochat data fetch eval_bundle [--out DIR] [--url URL]`. kwargs go to download_file.
    """
    return download_file("eval_bundle", out_dir, url=url, **kwargs)
