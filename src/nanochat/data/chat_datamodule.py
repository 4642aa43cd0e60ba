"""Chat data for midtraining and SFT: task mixtures rendered with the chat template.

    mid:  conversations -> render_conversation ids -> concatenated and packed (rows, T + 1) like pretraining text;
          every token is trained (nanochat's mid_train ignores the mask)
    sft:  packing=none: one conversation per row, rows padded to the longest in their micro-batch with
          <|assistant_end|>, `examples_per_step` conversations per step; packing=bestfit (the 2026 chat stage):
          conversations best-fit into BOS-started rows of seq_len + 1, padded with BOS, `total_batch_size` tokens
          per step. Either way targets are -1 wherever render_conversation's mask is 0 (user text, tool outputs)
          and on padding

Rank r of W reads conversations r, r + W, r + 2W, ... of the shuffled mixture, one reader per rank (conversations
are indexed, not sharded, so more workers would repeat them), and resumes from the checkpointed position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import lightning as L
import torch

from nanochat.data.conversations import (
    BestFitConversationRows,
    ConversationRows,
    PackedConversations,
    pack_bestfit_padded,
)
from nanochat.data.stream import Position
from nanochat.data.stream_state import StreamState, make_loader, rank_and_world, val_rows
from nanochat.errors import UserError
from nanochat.models.horizon import examples_grad_accum, grad_accum_steps

log = logging.getLogger(__name__)


class ChatMixtures:
    """The task mixtures of a chat stage (lists of registry entries, see nanochat.tasks.registry) and their
    tokenizer, loaded once: the horizon needs the mixture before the Trainer exists."""

    def __init__(
        self,
        train: list[Mapping],
        val: list[Mapping] | None,
        tokenizer_dir: str | None,
        init_from: str | None,
        seed: int,
        offline: bool,
    ):
        self.train_entries, self.val_entries = list(train), list(val or [])
        self.tokenizer_dir, self.init_from, self.seed, self.offline = tokenizer_dir, init_from, seed, offline
        self.train = self.val = self.tokenizer = None

    def load(self) -> ChatMixtures:
        if self.train is not None:
            return self
        from nanochat.export import stage_tokenizer
        from nanochat.tasks.registry import build_mixture, entry_name
        from nanochat.tasks.sources import hub_offline

        if self.offline:
            hub_offline()
        self.tokenizer = stage_tokenizer(self.tokenizer_dir, self.init_from)
        self.train = build_mixture(self.train_entries, seed=self.seed)
        self.val = build_mixture(self.val_entries, seed=self.seed) if self.val_entries else None
        if len(self.train) == 0:
            raise UserError(
                f"the training mixture {[entry_name(e) for e in self.train_entries]} holds no conversations"
            )
        sizes = ", ".join(f"{type(t).__name__} {len(t):,}" for t in self.train.tasks)
        val = f"{len(self.val):,} val" if self.val is not None else "no val"
        log.info(f"chat mixture: {len(self.train):,} train conversations ({sizes}); {val}")
        return self

    def stream_kwargs(self, trainer, state: StreamState, max_tokens: int, infinite: bool) -> dict:
        rank, world = rank_and_world(trainer)
        start = state.start_positions(rank, world).get(0) if infinite else None
        return dict(
            tokenizer=self.tokenizer, rank=rank, world_size=world, start=start, infinite=infinite, max_tokens=max_tokens
        )


class MidDataModule(L.LightningDataModule):
    """Midtraining batches: the mixture packed into (accum, B, T + 1) token rows, `total_batch_size` tokens per step."""

    def __init__(
        self,
        *,
        train: list[Mapping],
        val: list[Mapping] | None = None,
        tokenizer_dir: str | None = None,
        init_from: str | None = None,
        sequence_len: int,
        device_batch_size: int,
        total_batch_size: int,
        seed: int = 42,
        num_workers: int = 1,
        max_conversation_tokens: int = 2048,
        offline: bool = False,
        estimate_sample: int = 2000,
    ):
        super().__init__()
        self.mixtures = ChatMixtures(train, val, tokenizer_dir, init_from, seed, offline)
        self.seq_len, self.device_batch_size, self.total_batch_size = sequence_len, device_batch_size, total_batch_size
        self.num_workers = min(num_workers, 1)
        self.max_conversation_tokens, self.estimate_sample = max_conversation_tokens, estimate_sample
        self.stream_state = StreamState()

    def steps_per_epoch(self) -> float:
        """Steps to pass over the mixture once: its token count, measured on an evenly spaced sample when large."""
        m = self.mixtures.load()
        n = len(m.train)
        picks = range(0, n, max(1, n // self.estimate_sample))
        lengths = [len(m.tokenizer.render_conversation(m.train[i], self.max_conversation_tokens)[0]) for i in picks]
        tokens = n * sum(lengths) / len(lengths)
        log.info(
            f"mid epoch: ~{tokens:,.0f} tokens ({n:,} conversations, "
            f"mean {tokens / n:.0f} tokens over {len(lengths):,})"
        )
        return tokens / self.total_batch_size

    def setup(self, stage: str | None = None) -> None:
        self.mixtures.load()
        world = rank_and_world(self.trainer)[1]
        self.grad_accum = grad_accum_steps(self.total_batch_size, self.device_batch_size, self.seq_len, world)

    def _packed(self, mixture, rows: int, infinite: bool) -> PackedConversations:
        kwargs = self.mixtures.stream_kwargs(self.trainer, self.stream_state, self.max_conversation_tokens, infinite)
        return PackedConversations(mixture, rows=rows, seq_len=self.seq_len, **kwargs)

    def train_dataloader(self):
        stream = self._packed(self.mixtures.train, self.grad_accum * self.device_batch_size, True)
        return make_loader(self.trainer, stream, self.num_workers)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict):
            return batch
        item = self.stream_state.record(batch)
        return item["tokens"].view(self.grad_accum, self.device_batch_size, self.seq_len + 1)

    def state_dict(self) -> dict:
        return self.stream_state.state_dict(rank_and_world(self.trainer)[1])

    def load_state_dict(self, state: dict) -> None:
        self.stream_state.load_state_dict(state)

    @property
    def data_faults(self) -> dict[str, int]:
        return self.stream_state.data_faults

    def val_batches(self, max_tokens: int, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        rows = batch_size or self.device_batch_size
        stream = self._packed(self.mixtures.val, rows, False)
        return val_rows(stream, max_tokens, rank_and_world(self.trainer)[1], rows, self.seq_len)


class SFTDataModule(L.LightningDataModule):
    """SFT batches: `examples_per_step` conversations per optimizer step across ranks, one per padded row
    (packing=none), or `total_batch_size` tokens of best-fit rows (packing=bestfit)."""

    def __init__(
        self,
        *,
        train: list[Mapping],
        val: list[Mapping] | None = None,
        tokenizer_dir: str | None = None,
        init_from: str | None = None,
        sequence_len: int,
        device_batch_size: int = 4,
        examples_per_step: int = 32,
        seed: int = 42,
        num_workers: int = 1,
        max_conversation_tokens: int = 2048,
        offline: bool = False,
        packing: str = "none",
        total_batch_size: int | None = None,
        buffer_size: int = 100,
        estimate_sample: int = 2000,
    ):
        super().__init__()
        if packing not in ("none", "bestfit"):
            raise UserError(f"datamodule.packing must be none or bestfit for SFT, got {packing!r}")
        if packing == "none" and examples_per_step <= 0:
            raise UserError(f"datamodule.examples_per_step={examples_per_step} must be positive")
        if packing == "bestfit" and not total_batch_size:
            raise UserError("datamodule.packing=bestfit counts a step in tokens: set datamodule.total_batch_size")
        self.mixtures = ChatMixtures(train, val, tokenizer_dir, init_from, seed, offline)
        self.seq_len, self.device_batch_size, self.examples_per_step = (
            sequence_len,
            device_batch_size,
            examples_per_step,
        )
        self.packing, self.total_batch_size, self.buffer_size = packing, total_batch_size, buffer_size
        self.num_workers = min(num_workers, 1)
        self.max_conversation_tokens, self.estimate_sample = max_conversation_tokens, estimate_sample
        self.stream_state = StreamState()

    @property
    def max_tokens(self) -> int:
        return min(self.max_conversation_tokens, self.seq_len + 1)  # no conversation longer than a row

    def steps_per_epoch(self) -> float:
        m = self.mixtures.load()
        if self.packing == "none":
            return len(m.train) / self.examples_per_step
        # Best-fit rows: the rows an evenly spaced sample packs into, scaled to the mixture (padding included).
        n = len(m.train)
        picks = list(range(0, n, max(1, n // self.estimate_sample)))
        items = (
            (Position(0, i), *m.tokenizer.render_conversation(m.train[j], self.max_tokens)) for i, j in enumerate(picks)
        )
        width = self.seq_len + 1
        rows = sum(1 for _ in pack_bestfit_padded(items, 1, width, 0, self.buffer_size))
        rows_per_conversation = max(rows, 1) / len(picks)
        log.info(
            f"sft epoch: ~{n * rows_per_conversation:,.0f} best-fit rows of {width} tokens ({n:,} conversations, "
            f"{rows_per_conversation:.3f} rows each over a sample of {len(picks):,})"
        )
        return n * rows_per_conversation * self.seq_len / self.total_batch_size

    def setup(self, stage: str | None = None) -> None:
        self.mixtures.load()
        world = rank_and_world(self.trainer)[1]
        if self.packing == "none":
            self.grad_accum = examples_grad_accum(self.examples_per_step, self.device_batch_size, world)
        else:
            self.grad_accum = grad_accum_steps(self.total_batch_size, self.device_batch_size, self.seq_len, world)

    def _rows(self, mixture, rows: int, accum: int, infinite: bool):
        kwargs = self.mixtures.stream_kwargs(self.trainer, self.stream_state, self.max_tokens, infinite)
        if self.packing == "none":
            return ConversationRows(mixture, rows=rows, accum=accum, **kwargs)
        resumed = self.stream_state.start_positions(*rank_and_world(self.trainer)) if infinite else {}
        return BestFitConversationRows(
            mixture,
            rows=rows,
            seq_len=self.seq_len,
            accum=accum,
            buffer_size=self.buffer_size,
            buffer=resumed.get("buffers", {}).get(0),
            counts=resumed.get("crop", {}).get(0),
            **kwargs,
        )

    def train_dataloader(self):
        stream = self._rows(self.mixtures.train, self.device_batch_size, self.grad_accum, True)
        return make_loader(self.trainer, stream, self.num_workers)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict):
            return batch
        return self.stream_state.record(batch)["pairs"]

    def state_dict(self) -> dict:
        return self.stream_state.state_dict(rank_and_world(self.trainer)[1])

    def load_state_dict(self, state: dict) -> None:
        self.stream_state.load_state_dict(state)

    @property
    def data_faults(self) -> dict[str, int]:
        return self.stream_state.data_faults

    @property
    def packing_stats(self) -> dict[str, float]:
        """Best-fit rows: the share of row tokens that are padding so far."""
        share = self.stream_state.pad_share
        return {} if share is None else {"pad_share": share}

    def val_batches(
        self, max_tokens: int, batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) micro-batches of the validation mixture, this rank's share of `max_tokens` input tokens."""
        rows = batch_size or self.device_batch_size
        budget = max(1, max_tokens // rank_and_world(self.trainer)[1])
        seen = 0
        for item in self._rows(self.mixtures.val, rows, 1, False):
            if seen >= budget:
                return
            inputs, targets = item["pairs"][0]
            seen += inputs.numel()
            yield inputs, targets
        if seen == 0:
            raise UserError(f"the validation mixture has fewer than {rows} usable conversations")
