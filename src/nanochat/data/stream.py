"""The pretraining token stream: parquet shards -> documents -> BOS-prefixed tokens -> packed (rows, T+1) batches.

Work is split by *units*: a unit is one parquet row group (or, when there are fewer row groups than
readers, an interleaved slice of one). Reader `slot` of rank `r` takes units `r*S + slot, r*S + slot + W*S, ...`
for W ranks and S slots (DataLoader workers, at least one), so two ranks with two workers each read
disjoint documents and together read every document once per epoch. The stream is endless: after its last
unit a reader starts the next epoch.

Packing (`packing`): `concat` joins the documents into one token stream cut into rows (rows start mid-document);
`bestfit` starts every row with a document's BOS and fills it from a buffer of documents, largest that fits first,
cropping the shortest when none fits (`pack_bestfit`); the share of tokens cropped off is counted.

Resume is exact for one process: each batch carries the position of the next token its reader would emit
(epoch, round, document, token) and, under bestfit, the positions of the documents still in the buffer (re-read
on resume) and the crop counts; `TokenStream(start=...)` restarts there. Under several ranks only rank 0's
positions are checkpointed; other ranks restart at the same round of their own units (with an empty buffer), so
resume is exact up to the current row group (nanochat does the same).

Bad data (`on_bad_data`): with "skip" (the default) a shard that cannot be opened is left out of the plan with
one warning, an unreadable row group is passed over with one warning, and documents that are empty or not text
are dropped; each is counted by kind (FAULT_KINDS). With "fail" each raises a UserError naming the file and the
row group / row. Per-reader counts travel in every batch's state next to the position they belong to, so a
resume continues them instead of counting again.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from nanochat.errors import UserError

log = logging.getLogger(__name__)

# What on_bad_data=skip passes over, in report order. Shards are counted once per stream (at plan time), the
# others each time a reader meets them (so once per epoch).
FAULT_KINDS = ("skipped_shards", "skipped_row_groups", "empty_documents", "invalid_documents")
PACKINGS = ("concat", "bestfit")
POSITION_KEYS = ("epoch", "round", "doc", "token")
REFILL = 128  # documents tokenized together by nanochat's loader: its best-fit buffer grows by one such batch


def one_line(error: Exception) -> str:
    """An exception's text on one line (pyarrow's messages span several): errors are printed as one line."""
    return " ".join(str(error).split())


def document_fault(value) -> tuple[str | None, str | None, str]:
    """(text, None, "") for a usable document, else (None, fault kind, what is wrong with it)."""
    if isinstance(value, bytes):  # a binary `text` column: accept it when it holds UTF-8
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "invalid_documents", f"is not valid UTF-8 (bad byte at offset {e.start})"
    if not isinstance(value, str):
        return None, "invalid_documents", "is null" if value is None else f"is a {type(value).__name__}, not text"
    if not value.strip():
        return None, "empty_documents", "is empty"
    return value, None, ""


@dataclass(frozen=True)
class Position:
    """Where a reader stands: the next token to emit is token `token` of document `doc` of its round-th unit."""

    epoch: int = 0
    round: int = 0
    doc: int = 0
    token: int = 0


class TokenStream(IterableDataset):
    """Yields `{"tokens": LongTensor(rows, seq_len + 1), "state": {...}}` forever (or once, `infinite=False`)."""

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        rows: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_slots: int = 1,
        start: dict[int, Position] | None = None,
        infinite: bool = True,
        tokenizer_batch: int = 128,
        tokenizer_threads: int = 4,
        on_bad_data: str = "skip",
        packing: str = "concat",
        buffer_size: int = 1000,
    ):
        if on_bad_data not in ("skip", "fail"):
            raise UserError(f"data.on_bad_data must be 'skip' or 'fail', got {on_bad_data!r}")
        if packing not in PACKINGS:
            raise UserError(f"datamodule.packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        if buffer_size < 1:
            raise UserError(f"datamodule.buffer_size={buffer_size} must be at least 1")
        self.packing, self.buffer_size = packing, buffer_size
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.rows, self.seq_len = rows, seq_len
        self.rank, self.world_size, self.num_slots = rank, world_size, max(1, num_slots)
        self.start = start or {}
        self.infinite = infinite
        self.tokenizer_batch, self.tokenizer_threads = tokenizer_batch, tokenizer_threads
        self.on_bad_data = on_bad_data
        self.skipped_shards: list[Path] = []  # shards left out of the plan (on_bad_data=skip)
        self.units = self._plan_units()

    @property
    def stride(self) -> int:
        return self.world_size * self.num_slots

    def _plan_units(self) -> list[tuple[int, int, int, int]]:
        """(file index, row group, part, parts): row groups split into `parts` interleaved slices when scarce."""
        import pyarrow.parquet as pq

        from nanochat.data.shards import check_shard

        groups = []
        for i, path in enumerate(self.files):
            try:
                check_shard(path)  # footer, `text` column, at least one row: its UserError names the file
                groups += [(i, rg) for rg in range(pq.ParquetFile(path).num_row_groups)]
            except Exception as e:  # pyarrow raises several types for unreadable files
                if not isinstance(e, UserError):
                    e = UserError(
                        f"{path} is not a readable parquet shard ({one_line(e)}); "
                        "delete it and prepare/download it again"
                    )
                if self.on_bad_data == "fail":
                    raise e from None
                log.warning("skipping shard: %s", e)
                self.skipped_shards.append(path)
        if not groups:
            names = ", ".join(str(f) for f in self.files[:3]) + (
                f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
            )
            raise UserError(
                f"none of the {len(self.files)} shard(s) {names} holds readable text (see the warnings "
                "above); delete them and re-run the download or prepare command"
            )
        parts = math.ceil(self.stride / len(groups))
        return [(f, rg, part, parts) for f, rg in groups for part in range(parts)]

    def slot_units(self, slot: int) -> list[int]:
        """Indices into `self.units` read by this rank's reader `slot`, in order."""
        return list(range(self.rank * self.num_slots + slot, len(self.units), self.stride))

    # --- reading -------------------------------------------------------------------------------
    def _read_unit(self, unit: int, cache: dict) -> list | None:
        """The unit's `text` values, raw (checked by `_documents`); None for an unreadable row group (skip mode)."""
        import pyarrow.parquet as pq

        f, rg, part, parts = self.units[unit]
        path = self.files[f]
        try:
            if f not in cache:
                cache.clear()  # one open file per reader is enough: units of a file are read in sequence
                cache[f] = pq.ParquetFile(path)
            texts = cache[f].read_row_group(rg, columns=["text"]).column("text").to_pylist()
        except Exception as e:
            if self.on_bad_data == "fail":
                raise UserError(
                    f"{path} row group {rg} cannot be read ({one_line(e)}); set data.on_bad_data=skip to skip it"
                ) from None
            log.warning("skipping unreadable row group %d of %s (%s)", rg, path, one_line(e))
            return None
        return texts[part::parts]

    def _documents(self, slot: int, pos: Position, faults: list) -> Iterator[tuple[Position, list[int]]]:
        """(position of the document's first token, its tokens) from `pos` on, tokenized in batches.

        Skipped data is appended to `faults` as ((epoch, round, doc), kind) when met: before the documents after it.
        """
        units = self.slot_units(slot)
        epoch, round_, doc, token = pos.epoch, pos.round, pos.doc, pos.token
        whole_epoch = pos == Position(epoch)  # a resumed, partial epoch may rightly hold no documents
        cache: dict = {}
        bos = self.tokenizer.bos_token_id
        while True:
            found = 0
            for r in range(round_, len(units)):
                texts = self._read_unit(units[r], cache)
                if texts is None:
                    faults.append(((epoch, r, 0), "skipped_row_groups"))
                    texts = []
                for lo in range(doc, len(texts), self.tokenizer_batch):
                    keep, docs = [], []
                    for i, value in enumerate(texts[lo : lo + self.tokenizer_batch], start=lo):
                        text, kind, why = document_fault(value)
                        if kind is None:
                            keep.append(i)
                            docs.append(text)
                        elif self.on_bad_data == "fail":
                            f, rg, part, parts = self.units[units[r]]
                            raise UserError(
                                f"{self.files[f]} row group {rg} row {part + i * parts}: the 'text' value "
                                f"{why}; set data.on_bad_data=skip to skip (and count) such documents"
                            )
                        else:
                            faults.append(((epoch, r, i), kind))
                    encoded = self.tokenizer.encode_batch(docs, prepend=bos, num_threads=self.tokenizer_threads)
                    found += len(keep)
                    for i, ids in zip(keep, encoded):
                        start = token if i == doc else 0
                        yield Position(epoch, r, i, start), ids[start:]
                doc, token = 0, 0
            if not self.infinite:
                return
            if whole_epoch and not found:  # another pass would find nothing either: fail instead of spinning
                met = dict(Counter(kind for (e, _, _), kind in faults if e == epoch))
                why = (
                    f"skipped: {met}"
                    if met
                    else "no rows: the data is too small for this many readers (ranks x data.num_workers)"
                )
                raise UserError(
                    f"reader {slot} of rank {self.rank} read all its {len(units)} row group(s) of "
                    f"{len(self.files)} shard(s) and found no usable document ({why})"
                )
            epoch, round_, whole_epoch = epoch + 1, 0, True

    def _buffered(self, slot: int, where: list) -> list[tuple[Position, list[int]]]:
        """The documents at `where` ([epoch, round, doc] each, buffer order) read and tokenized again: a resumed
        best-fit buffer."""
        units, cache, texts_of = self.slot_units(slot), {}, {}
        texts = []
        for _, r, d in where:
            if r not in texts_of:
                texts_of[r] = self._read_unit(units[r], cache) or []
            text, _, _ = document_fault(texts_of[r][d] if d < len(texts_of[r]) else None)
            if text is None:
                raise UserError(
                    f"reader {slot} of rank {self.rank} cannot re-read document {d} of its row group {r} "
                    f"for the resumed best-fit buffer: the shards changed since the checkpoint"
                )
            texts.append(text)
        bos = self.tokenizer.bos_token_id
        encoded = self.tokenizer.encode_batch(texts, prepend=bos, num_threads=self.tokenizer_threads) if texts else []
        return [(Position(e, r, d), ids) for (e, r, d), ids in zip(where, encoded)]

    def batches(self, slot: int) -> Iterator[dict]:
        """Reader `slot`'s batches; `__iter__` picks the slot from the DataLoader worker id."""
        pos = self.start.get(slot, Position())
        if pos.round >= len(self.slot_units(slot)):
            pos = Position(pos.epoch + 1)
        counts = Counter(self.start.get("faults", {}).get(slot, {}))  # counted before a resume
        pending: list = []  # faults met by the document reader, which runs ahead of the packed rows
        documents = self._documents(slot, pos, pending)
        if self.packing == "bestfit":
            buffer = self._buffered(slot, self.start.get("buffers", {}).get(slot, []))
            crop = self.start.get("crop", {}).get(slot, {})
            packed = pack_bestfit(
                documents,
                self.rows,
                self.seq_len,
                self.buffer_size,
                buffer=buffer,
                counts=(crop.get("cropped", 0), crop.get("taken", 0)),
                start=pos,
            )
        else:
            packed = ((tokens, nxt, {}) for tokens, nxt in pack_rows(documents, self.rows, self.seq_len))
        for tokens, nxt, extra in packed:
            # Faults before `nxt` are behind this batch; a resume at `nxt` meets the others again, so they wait.
            here = (nxt.epoch, nxt.round, nxt.doc)
            counts.update(kind for where, kind in pending if where < here)
            pending[:] = [(where, kind) for where, kind in pending if where >= here]
            faults = {k: counts[k] for k in FAULT_KINDS if counts[k]}
            # `skipped` (their total) is the key the chat streams carry too.
            state = {"slot": slot, "faults": faults, "skipped": sum(faults.values()), **extra}
            yield {"tokens": tokens, "state": {**state, **asdict(nxt)}}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_slots:
            raise RuntimeError(f"TokenStream planned {self.num_slots} slots but runs in {info.num_workers} workers")
        # After a resume the loader's first batch must come from the reader whose turn it is.
        slot = (worker + self.start.get("next_slot", 0)) % self.num_slots
        return self.batches(slot)


def pack_rows(
    documents: Iterator[tuple[Position, list[int]]], rows: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, Position]]:
    """Concatenate documents into (rows, seq_len + 1) batches; each with the position of the next unused token.

    A document that does not fit is split: its rest starts the next batch. When the documents run out, the
    partial batch is dropped (a finite stream ends without padding).
    """
    need = rows * (seq_len + 1)
    pending: list[tuple[Position, list[int]]] = []  # documents with tokens not yet emitted
    exhausted = False
    while True:
        have = sum(len(ids) for _, ids in pending)
        while have < need and not exhausted:
            item = next(documents, None)
            if item is None:
                exhausted = True
            else:
                pending.append(item)
                have += len(item[1])
        if have < need:
            return
        out, taken = [], 0
        while taken < need:
            p, ids = pending.pop(0)
            use = min(len(ids), need - taken)
            out.extend(ids[:use])
            taken += use
            if use < len(ids):  # the rest of this document starts the next batch
                pending.insert(0, (Position(p.epoch, p.round, p.doc, p.token + use), ids[use:]))
        nxt = pending[0][0] if pending else Position(p.epoch, p.round, p.doc + 1, 0)
        yield torch.tensor(out, dtype=torch.long).view(rows, seq_len + 1), nxt


def pack_bestfit(
    documents: Iterator[tuple[Position, list[int]]],
    rows: int,
    seq_len: int,
    buffer_size: int = 1000,
    *,
    refill: int = REFILL,
    buffer: list[tuple[Position, list[int]]] | None = None,
    counts: tuple[int, int] = (0, 0),
    start: Position | None = None,
) -> Iterator[tuple[torch.Tensor, Position, dict]]:
    """BOS-aligned best-fit rows: (rows, seq_len + 1) batches in which every row starts at a document's first token.

    Each row is filled from a buffer kept at `buffer_size` documents or more: the largest document that fits the
    space left (the earliest of equals), again and again; when none fits, the shortest is cropped to fill the row
    exactly and its rest dropped. No padding. The buffer grows a chunk at a time, documents `refill * k` to
    `refill * (k + 1) - 1` of a row group (nanochat's tokenizer batches), so the rows are the ones nanochat's
    loader packs from the same documents. Yields (batch, position of the next document to read, state) where the
    state has the buffer's positions ([epoch, round, doc], in order) and the running counts `cropped` (tokens
    dropped) and `taken` (tokens of every document taken from the buffer); `buffer` and `counts` continue a resumed
    stream. Finite documents end with the last full batch.
    """
    width = seq_len + 1
    buf = list(buffer or [])
    lengths = [len(ids) for _, ids in buf]
    cropped, taken = counts
    nxt = start or Position()
    chunks = (list(c) for _, c in groupby(documents, key=lambda d: (d[0].epoch, d[0].round, d[0].doc // refill)))
    exhausted = False
    while True:
        out = torch.empty(rows, width, dtype=torch.long)
        for r in range(rows):
            filled = 0
            while filled < width:
                while len(buf) < buffer_size and not exhausted:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                    else:
                        buf.extend(chunk)
                        lengths.extend(len(ids) for _, ids in chunk)
                        p = chunk[-1][0]
                        nxt = Position(p.epoch, p.round, p.doc + 1, 0)
                if not buf:
                    return
                space = width - filled
                best, best_len = -1, 0
                for i, n in enumerate(lengths):
                    if best_len < n <= space:
                        best, best_len = i, n
                if best < 0:  # nothing fits: crop the shortest document to the space left
                    best = min(range(len(lengths)), key=lengths.__getitem__)
                _, ids = buf.pop(best)
                n = lengths.pop(best)
                use = min(n, space)
                out[r, filled : filled + use] = torch.tensor(ids[:use], dtype=torch.long)
                filled += use
                cropped += n - use
                taken += n
        state = {"buffer": [[p.epoch, p.round, p.doc] for p, _ in buf], "crop": {"cropped": cropped, "taken": taken}}
        yield out, nxt, state


def resume_positions(state: dict, rank: int, num_slots: int, stride: int) -> dict:
    """Turn a checkpointed stream state (rank 0's readers) into start positions for this rank's readers."""
    if not state:
        return {}
    if state.get("num_slots") != num_slots or state.get("stride") != stride:
        log.warning("data stream resumed with a different rank/worker layout; restarting readers at the saved epoch")
        epoch = min(p["epoch"] for p in state["slots"].values()) if state.get("slots") else 0
        total = sum((Counter(c) for c in state.get("faults", {}).values()), Counter())
        return {slot: Position(epoch) for slot in range(num_slots)} | {"faults": {0: dict(total)}}
    # Fault and crop counts so far (rank 0's, like the positions); checkpoints from before they were kept have none.
    start: dict = {
        "next_slot": state["next_slot"],
        "faults": {int(s): dict(c) for s, c in state.get("faults", {}).items()},
        "crop": {int(s): dict(c) for s, c in state.get("crop", {}).items()},
        "buffers": {},
    }
    for slot, saved in state["slots"].items():
        p = Position(**{k: saved[k] for k in POSITION_KEYS})
        # Other ranks only know rank 0's round, so they restart at the beginning of it, with an empty buffer.
        start[int(slot)] = p if rank == 0 else Position(p.epoch, p.round)
        if rank == 0 and saved.get("buffer"):
            start["buffers"][int(slot)] = [list(b) for b in saved["buffer"]]
    return start
