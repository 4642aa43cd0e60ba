"""PretrainDataModule: shards on disk -> the TokenStream -> (accum, device_batch, seq_len + 1) training batches.

`packing` decides how documents become rows (nanochat.data.stream): concat (the 2025 loader) or bestfit (BOS-aligned
rows, the 2026 loader), for the training and the validation rows alike.

It owns the data position through a StreamState (nanochat.data.stream_state), as the chat stages' DataModules do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from nanochat.data.builtin import resolve_source
from nanochat.data.shards import MANIFEST_NAME, check_shard, list_shards, prepare, split_shards
from nanochat.data.stream import TokenStream
from nanochat.data.stream_state import StreamState, make_loader, rank_and_world, val_rows
from nanochat.errors import UserError
from nanochat.models.horizon import grad_accum_steps

log = logging.getLogger(__name__)


def ensure_shards(directory: str | Path, source=None, **prepare_kwargs) -> list[Path]:
    """The shards in `directory`; prepared from `source` (files or dirs of text) first when there are none.

    A source `builtin:<dir>` is the built-in starter corpus (nanochat.data.builtin), generated here on first use.
    """
    directory = Path(directory)
    if source and not (directory / MANIFEST_NAME).is_file():
        if directory.is_dir() and any(directory.glob("*.parquet")):
            # prepare() writes its manifest last: these are an interrupted prepare's, or someone else's, shards.
            raise UserError(
                f"{directory} holds shards but no {MANIFEST_NAME} (an interrupted prepare?); delete them to prepare "
                f"again from data.source, or set data.source=null to train on them as they are"
            )
        sources = [resolve_source(s) for s in ([source] if isinstance(source, (str, Path)) else list(source))]
        log.info(f"preparing shards in {directory} from {', '.join(map(str, sources))}")
        prepare(sources, directory, **prepare_kwargs)
    return list_shards(directory)


class PretrainDataModule(L.LightningDataModule):
    def __init__(
        self,
        *,
        dir: str,
        tokenizer_dir: str,
        sequence_len: int,
        device_batch_size: int,
        total_batch_size: int,
        source: str | list[str] | None = None,
        gutenberg: bool = True,
        val_fraction: float = 0.01,
        shard_chars: int = 250_000_000,
        num_workers: int = 1,
        tokenizer_threads: int = 4,
        tokenizer_batch: int = 128,
        on_bad_data: str = "skip",
        packing: str = "concat",
        buffer_size: int = 1000,
    ):
        super().__init__()
        self.seq_len, self.device_batch_size, self.num_workers = sequence_len, device_batch_size, num_workers
        self.stream_state = StreamState(num_workers)
        self.dir = Path(dir)
        self.tokenizer_dir = tokenizer_dir
        self.source = source
        self.prepare_kwargs = dict(gutenberg=gutenberg, val_fraction=val_fraction, shard_chars=shard_chars)
        self.total_batch_size = total_batch_size
        self.on_bad_data = on_bad_data
        self.stream_kwargs = dict(
            tokenizer_batch=tokenizer_batch,
            tokenizer_threads=tokenizer_threads,
            on_bad_data=on_bad_data,
            packing=packing,
            buffer_size=buffer_size,
        )

    def prepare_data(self) -> None:
        ensure_shards(self.dir, self.source, on_bad_data=self.on_bad_data, **self.prepare_kwargs)

    def setup(self, stage: str | None = None) -> None:
        from nanochat.tokenizer import Tokenizer

        self.train_files, self.val_files = split_shards(list_shards(self.dir))
        # The validation shard cannot be skipped (it is the only one); bad training shards fail here in fail mode,
        # and in skip mode are left out (one warning each, counted) by the training stream.
        for f in self.val_files + (self.train_files if self.on_bad_data == "fail" else []):
            check_shard(f)
        self.tokenizer = Tokenizer.load(self.tokenizer_dir)
        rank, world = rank_and_world(self.trainer)
        self.grad_accum = grad_accum_steps(self.total_batch_size, self.device_batch_size, self.seq_len, world)
        if rank == 0:
            log.info(
                f"data: {len(self.train_files)} train + {len(self.val_files)} val shards in {self.dir}; "
                f"{self.device_batch_size} x {self.seq_len} tokens per micro-batch x {self.grad_accum} accumulation "
                f"x {world} ranks = {self.total_batch_size:,} tokens per step"
            )

    # --- training stream -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        slots = self.stream_state.num_slots
        stream = TokenStream(
            self.train_files,
            self.tokenizer,
            rows=self.grad_accum * self.device_batch_size,
            seq_len=self.seq_len,
            rank=rank,
            world_size=world,
            num_slots=slots,
            start=self.stream_state.start_positions(rank, world),
            **self.stream_kwargs,
        )
        self.stream_state.skipped_shards = len(stream.skipped_shards)
        return make_loader(self.trainer, stream, self.num_workers)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict):
            return batch
        item = self.stream_state.record(batch)
        return item["tokens"].view(
            self.grad_accum, self.device_batch_size, self.seq_len + 1
        )  # one step's micro-batches

    def state_dict(self) -> dict:
        return self.stream_state.state_dict(rank_and_world(self.trainer)[1])

    def load_state_dict(self, state: dict) -> None:
        self.stream_state.load_state_dict(state)

    @property
    def data_faults(self) -> dict[str, int]:
        return self.stream_state.data_faults

    @property
    def packing_stats(self) -> dict[str, float]:
        """Best-fit packing's share of tokens cropped off so far (nothing under concat, which crops nothing)."""
        share = self.stream_state.crop_share
        return {} if share is None else {"crop_share": share}

    def val_batches(self, max_tokens: int, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The same fixed validation rows every call: (B, seq_len + 1) batches, this rank's share of `max_tokens`."""
        rank, world = rank_and_world(self.trainer)
        rows = batch_size or self.device_batch_size
        stream = TokenStream(
            self.val_files,
            self.tokenizer,
            rows=rows,
            seq_len=self.seq_len,
            rank=rank,
            world_size=world,
            infinite=False,
            **self.stream_kwargs,
        )
        return val_rows(stream, max_tokens, world, rows, self.seq_len)
