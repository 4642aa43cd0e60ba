"""Chat data for midtraining and SFT: task mixtures rendered with the chat template.

    mid:  conversations -> render_conversation ids -> concatenated and packed (rows, T + 1) like pretraining text;
          every token is trained (nanochat's mid_train ignores the mask)
    sft:  one conversation per row, rows padded to the longest in their micro-batch with <|assistant_end|>;
          targets are -1 wherever render_conversation's mask is 0 (user text, tool outputs) and on padding

Rank r of W reads conversations r, r + W, r + 2W, ... of the shuffled mixture, one reader per rank, and
starts the next epoch after its last. Each batch carries the position of the next conversation (and token,
for packing), so a resumed run continues where the checkpoint was taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict

import torch
from torch.utils.data import IterableDataset

from nanochat.data.pretrain_datamodule import StreamDataModule
from nanochat.data.stream import Position, pack_rows
from nanochat.errors import UserError
from nanochat.models.horizon import grad_accum_steps

log = logging.getLogger(__name__)


class _Conversations(IterableDataset):
    """This rank's conversations of a mixture as (position, rendered ids and mask), from `start`, epoch after epoch."""

    def __init__(self, mixture, tokenizer, *, max_tokens: int, rank: int = 0, world_size: int = 1,
                 start: Position | None = None, infinite: bool = True):
        self.mixture, self.tokenizer, self.max_tokens = mixture, tokenizer, max_tokens
        self.rank, self.world_size = rank, world_size
        self.start = start or Position()
        self.infinite = infinite
        self.count = len(range(rank, len(mixture), world_size))
        if self.count == 0:
            raise UserError(f"a mixture of {len(mixture)} conversations gives rank {rank} of {world_size} none to train on")

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


class PackedConversations(_Conversations):
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


class ConversationRows(_Conversations):
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


class ChatDataModule(StreamDataModule):
    """The task mixtures of a chat stage (lists of registry entries, see nanochat.tasks.registry) and their tokenizer."""

    def __init__(self, *, train: list[Mapping], val: list[Mapping] | None = None, tokenizer_dir: str | None = None,
                 init_from: str | None = None, sequence_len: int, device_batch_size: int, seed: int = 42,
                 num_workers: int = 1, max_conversation_tokens: int = 2048, offline: bool = False):
        # One reader per rank: conversations are indexed, not sharded, so workers beyond one would repeat them.
        super().__init__(sequence_len=sequence_len, device_batch_size=device_batch_size, num_workers=min(num_workers, 1))
        self.train_entries, self.val_entries = list(train), list(val or [])
        self.tokenizer_dir, self.init_from = tokenizer_dir, init_from
        self.seed = seed
        self.max_conversation_tokens = max_conversation_tokens
        self.offline = offline
        self.train_mixture = self.val_mixture = self.tokenizer = None

    def _load(self) -> None:
        """Tasks and tokenizer, once: the horizon needs the mixture before the Trainer exists."""
        if self.train_mixture is not None:
            return
        from nanochat.export import stage_tokenizer
        from nanochat.tasks.registry import build_mixture, entry_name
        from nanochat.tasks.sources import hub_offline

        if self.offline:
            hub_offline()
        self.tokenizer = stage_tokenizer(self.tokenizer_dir, self.init_from)
        self.train_mixture = build_mixture(self.train_entries, seed=self.seed)
        self.val_mixture = build_mixture(self.val_entries, seed=self.seed) if self.val_entries else None
        if len(self.train_mixture) == 0:
            raise UserError(f"the training mixture {[entry_name(e) for e in self.train_entries]} holds no conversations")
        sizes = ", ".join(f"{type(t).__name__} {len(t):,}" for t in self.train_mixture.tasks)
        val = f"{len(self.val_mixture):,} val" if self.val_mixture is not None else "no val"
        log.info(f"chat mixture: {len(self.train_mixture):,} train conversations ({sizes}); {val}")

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _stream_kwargs(self, infinite: bool) -> dict:
        rank, world = self.rank_and_world
        start = self.start_positions().get(0) if infinite else None
        return dict(tokenizer=self.tokenizer, rank=rank, world_size=world, start=start, infinite=infinite,
                    max_tokens=self.max_conversation_tokens)


class MidDataModule(ChatDataModule):
    """Midtraining batches: the mixture packed into (accum, B, T + 1) token rows, `total_batch_size` tokens per step."""

    def __init__(self, *, total_batch_size: int, estimate_sample: int = 2000, **kwargs):
        super().__init__(**kwargs)
        self.total_batch_size, self.estimate_sample = total_batch_size, estimate_sample

    def steps_per_epoch(self) -> float:
        """Steps to pass over the mixture once: its token count, measured on an evenly spaced sample when large."""
        self._load()
        n = len(self.train_mixture)
        picks = range(0, n, max(1, n // self.estimate_sample))
        lengths = [len(self.tokenizer.render_conversation(self.train_mixture[i], self.max_conversation_tokens)[0]) for i in picks]
        tokens = n * sum(lengths) / len(lengths)
        log.info(f"mid epoch: ~{tokens:,.0f} tokens ({n:,} conversations, mean {tokens / n:.0f} tokens over {len(lengths):,})")
        return tokens / self.total_batch_size

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.grad_accum = grad_accum_steps(self.total_batch_size, self.device_batch_size, self.seq_len, self.rank_and_world[1])

    def train_dataloader(self):
        rows = self.grad_accum * self.device_batch_size
        return self.loader(PackedConversations(self.train_mixture, rows=rows, seq_len=self.seq_len, **self._stream_kwargs(True)))

    def val_stream(self, rows: int):
        return PackedConversations(self.val_mixture, rows=rows, seq_len=self.seq_len, **self._stream_kwargs(False))


class SFTDataModule(ChatDataModule):
    """SFT batches: `examples_per_step` conversations per optimizer step across ranks, one per padded row."""

    def __init__(self, *, examples_per_step: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.examples_per_step = examples_per_step

    def steps_per_epoch(self) -> float:
        self._load()
        return len(self.train_mixture) / self.examples_per_step

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        world = self.rank_and_world[1]
        per_pass = self.device_batch_size * world
        if self.examples_per_step <= 0 or self.examples_per_step % per_pass:
            raise UserError(
                f"examples_per_step={self.examples_per_step} is not a positive multiple of device_batch_size x world_size "
                f"= {self.device_batch_size} x {world}; change datamodule.examples_per_step or datamodule.device_batch_size"
            )
        self.grad_accum = self.examples_per_step // per_pass

    def _rows(self, mixture, rows: int, accum: int, infinite: bool) -> ConversationRows:
        kwargs = self._stream_kwargs(infinite)
        kwargs["max_tokens"] = min(kwargs["max_tokens"], self.seq_len + 1)  # inputs no longer than the model's context
        return ConversationRows(mixture, rows=rows, accum=accum, **kwargs)

    def train_dataloader(self):
        return self.loader(self._rows(self.train_mixture, self.device_batch_size, self.grad_accum, True))

    def training_batch(self, item: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return item["pairs"]

    def val_batches(self, max_tokens: int, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) micro-batches of the validation mixture, this rank's share of `max_tokens` input tokens."""
        budget = max(1, max_tokens // self.rank_and_world[1])
        seen = 0
        for item in self._rows(self.val_mixture, batch_size or self.device_batch_size, 1, False):
            if seen >= budget:
                return
            inputs, targets = item["pairs"][0]
            seen += inputs.numel()
            yield inputs, targets
        if seen == 0:
            raise UserError(f"the validation mixture has fewer than {batch_size or self.device_batch_size} usable conversations")

