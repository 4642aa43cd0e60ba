"""Conversations as training streams: a task mixture rendered with the chat template, by rank, resumable.

    Conversations           this rank's conversations r, r + W, r + 2W, ... of the shuffled mixture, epoch after epoch
    PackedConversations     midtraining: their ids concatenated into (rows, T + 1) rows like pretraining text
    ConversationRows        SFT: one conversation per padded row, `accum` micro-batches per item (see `sft_pair`)
    BestFitConversationRows SFT (2026): conversations best-fit into (rows, T + 1) rows that start at a BOS, the
                            rest of a row padded with BOS when nothing fits; `accum` micro-batches per item

Each item carries the position of the next conversation (and token, for packing; and the best-fit buffer's
conversations), so a resumed run continues where the checkpoint was taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import torch
from torch.utils.data import IterableDataset

from nanochat.data.stream import Position, pack_rows
from nanochat.errors import UserError


class Conversations(IterableDataset):
    """This rank's conversations of a mixture as (position, rendered ids and mask), from `start`, epoch after epoch."""

    def __init__(
        self,
        mixture,
        tokenizer,
        *,
        max_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        start: Position | None = None,
        infinite: bool = True,
    ):
        self.mixture, self.tokenizer, self.max_tokens = mixture, tokenizer, max_tokens
        self.rank, self.world_size = rank, world_size
        self.start = start or Position()
        self.infinite = infinite
        self.count = len(range(rank, len(mixture), world_size))
        if self.count == 0:
            raise UserError(
                f"a mixture of {len(mixture)} conversations gives rank {rank} of {world_size} none to train on"
            )

    def indices(self) -> Iterator[tuple[Position, int]]:
        """(position, mixture index) of this rank's conversations. Positions count conversations as the `round`
        (a conversation is this reader's unit of data), so under several ranks the others resume at rank 0's
        conversation, as they resume at its row group for text."""
        epoch = self.start.epoch
        first = self.start.round + (1 if self.start.doc > 0 else 0)  # doc 1 of a conversation: the next one
        while True:
            for r in range(first, self.count):
                yield Position(epoch, r, 0, 0), self.rank + r * self.world_size
            if not self.infinite:
                return
            epoch, first = epoch + 1, 0

    def rendered(self) -> Iterator[tuple[Position, list[int], list[int]]]:
        for pos, index in self.indices():
            ids, mask = self.tokenizer.render_conversation(self.mixture[index], self.max_tokens)
            yield pos, ids, mask


class PackedConversations(Conversations):
    """Midtraining: rendered conversations concatenated into (rows, seq_len + 1) rows, as TokenStream does text."""

    def __init__(self, mixture, tokenizer, *, rows: int, seq_len: int, **kwargs):
        super().__init__(mixture, tokenizer, **kwargs)
        self.rows, self.seq_len = rows, seq_len

    def __iter__(self) -> Iterator[dict]:
        skip = self.start.token if self.start.doc == 0 else 0

        def documents():
            for i, (pos, ids, _) in enumerate(self.rendered()):
                cut = skip if i == 0 else 0
                yield Position(pos.epoch, pos.round, 0, cut), ids[cut:]

        for tokens, nxt in pack_rows(documents(), self.rows, self.seq_len):
            yield {"tokens": tokens, "state": {"slot": 0, "skipped": 0, **asdict(nxt)}}


def sft_pair(rendered: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (B, L) for rendered (ids, mask) rows, L = longest row - 1.

    targets[i] = ids[i + 1] where mask[i + 1] is 1, else -1; padding is `pad_id` in the inputs and -1 in the targets.
    """
    length = max(len(ids) for ids, _ in rendered) - 1
    inputs = torch.full((len(rendered), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rendered), length), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        ids_t = torch.tensor(ids, dtype=torch.long)
        inputs[row, :n] = ids_t[:-1]
        targets[row, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), ids_t[1:], -1)
    return inputs, targets


def pack_bestfit_padded(
    items: Iterator[tuple[Position, list[int], list[int]]],
    rows: int,
    width: int,
    pad_id: int,
    buffer_size: int = 100,
    *,
    buffer: list | None = None,
    counts: dict | None = None,
    start: Position | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Position, dict]]:
    """(ids, mask) rows of `width` tokens best-fit from a buffer of `buffer_size` (position, ids, mask) items: the
    largest that fits the space left (the earliest of equals), again and again; when none fits, the rest of the row
    is `pad_id` with mask 0. Nothing is cropped: an item longer than `width` never fits, so it must not be given.
    Yields (ids, mask, position of the next item to read, state); the state has the buffer's positions and the
    running counts `padded` (padding tokens) and `tokens` (all row tokens). Finite items end with the last full batch.
    """
    buf = list(buffer or [])
    counts = {"padded": 0, "tokens": 0, **(counts or {})}
    nxt, exhausted = start or Position(), False
    while True:
        ids_out = torch.full((rows, width), pad_id, dtype=torch.long)
        mask_out = torch.zeros(rows, width, dtype=torch.long)
        for r in range(rows):
            filled = 0
            while filled < width:
                while len(buf) < buffer_size and not exhausted:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                    else:
                        buf.append(item)
                        nxt = Position(item[0].epoch, item[0].round + 1, 0, 0)
                if not buf:
                    return
                space = width - filled
                best, best_len = -1, 0
                for i, (_, ids, _) in enumerate(buf):
                    if best_len < len(ids) <= space:
                        best, best_len = i, len(ids)
                if best < 0:
                    if filled == 0:
                        raise ValueError(f"an item of {min(len(b[1]) for b in buf)} tokens cannot fit a row of {width}")
                    counts["padded"] += space
                    break
                _, ids, mask = buf.pop(best)
                ids_out[r, filled : filled + best_len] = torch.tensor(ids, dtype=torch.long)
                mask_out[r, filled : filled + best_len] = torch.tensor(mask, dtype=torch.long)
                filled += best_len
        counts["tokens"] += rows * width
        yield ids_out, mask_out, nxt, {"buffer": [[p.epoch, p.round, p.doc] for p, _, _ in buf], "crop": dict(counts)}


def packed_pair(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of (B, width - 1) from packed rows: targets -1 where the mask is 0 (padding included)."""
    return ids[:, :-1].contiguous(), torch.where(mask[:, 1:].bool(), ids[:, 1:], -1)


class BestFitConversationRows(Conversations):
    """The one chat stage's SFT rows: each item is one optimizer step, `accum` micro-batches of (inputs, targets)
    of `rows` x seq_len, conversations best-fit from a `buffer_size` buffer and padding (BOS in, -1 out) when
    nothing fits. Conversations with no trained token are left out and counted."""

    def __init__(
        self,
        mixture,
        tokenizer,
        *,
        rows: int,
        seq_len: int,
        accum: int = 1,
        buffer_size: int = 100,
        buffer: list | None = None,
        counts: dict | None = None,
        **kwargs,
    ):
        super().__init__(mixture, tokenizer, **kwargs)
        self.rows, self.seq_len, self.accum, self.buffer_size = rows, seq_len, accum, buffer_size
        self.buffer_positions, self.counts = list(buffer or []), dict(counts or {})
        self.bos = tokenizer.token_id("<|bos|>")

    def _usable(self, skipped: list) -> Iterator[tuple[Position, list[int], list[int]]]:
        for pos, ids, mask in self.rendered():
            if sum(mask[1:]) == 0:  # nothing to train on (e.g. truncated inside the user turn)
                skipped[0] += 1
                continue
            yield pos, ids, mask

    def _buffered(self) -> list:
        out = []
        for epoch, r, _ in self.buffer_positions:
            index = self.rank + r * self.world_size
            ids, mask = self.tokenizer.render_conversation(self.mixture[index], self.max_tokens)
            out.append((Position(epoch, r, 0, 0), ids, mask))
        return out

    def __iter__(self) -> Iterator[dict]:
        skipped = [0]
        packed = pack_bestfit_padded(
            self._usable(skipped),
            self.rows,
            self.seq_len + 1,
            self.bos,
            self.buffer_size,
            buffer=self._buffered(),
            counts=self.counts,
            start=self.start,
        )
        pairs = []
        for ids, mask, nxt, state in packed:
            pairs.append(packed_pair(ids, mask))
            if len(pairs) == self.accum:
                yield {"pairs": pairs, "state": {"slot": 0, "skipped": skipped[0], **state, **asdict(nxt)}}
                pairs = []


class ConversationRows(Conversations):
    """SFT: each item is one optimizer step, `accum` micro-batches of `rows` conversations as (inputs, targets)."""

    def __init__(self, mixture, tokenizer, *, rows: int, accum: int = 1, **kwargs):
        super().__init__(mixture, tokenizer, **kwargs)
        self.rows, self.accum = rows, accum
        self.pad_id = tokenizer.token_id("<|assistant_end|>")

    def __iter__(self) -> Iterator[dict]:
        pairs, batch, skipped = [], [], 0
        for pos, ids, mask in self.rendered():
            if sum(mask[1:]) == 0:  # nothing to train on (e.g. truncated inside the user turn)
                skipped += 1
                continue
            batch.append((ids, mask))
            if len(batch) == self.rows:
                pairs.append(sft_pair(batch, self.pad_id))
                batch = []
                if len(pairs) == self.accum:
                    nxt = Position(pos.epoch, pos.round + 1, 0, 0)
                    yield {"pairs": pairs, "state": {"slot": 0, "skipped": skipped, **asdict(nxt)}}
                    pairs = []
