"""PretrainDataModule: shards on disk -> the TokenStream -> (accum, device_batch, seq_len + 1) training batches.

It owns the data position (see StreamDataModule, shared with the chat stages' data modules).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from nanochat.data.builtin import resolve_source
from nanochat.data.shards import MANIFEST_NAME, check_shard, list_shards, prepare, split_shards
from nanochat.data.stream import FAULT_KINDS, TokenStream, resume_positions
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


class StreamDataModule(L.LightningDataModule):
    """What the pretraining and midtraining/SFT data modules share: ranks and reader slots, and the data position.

    A stream yields `{"state": {...}, ...}` items; `on_before_batch_transfer` records the state of the batch
    Lightning hands to the training step (not of the one being prefetched) and `training_batch` turns the
    item into what the module trains on. `state_dict` is therefore exactly "what has been trained on".
    """

    def __init__(self, *, sequence_len: int, device_batch_size: int, num_workers: int = 1):
        super().__init__()
        self.seq_len, self.device_batch_size = sequence_len, device_batch_size
        self.num_workers = num_workers
        self._slots: dict[int, dict] = {}  # reader slot -> position after the last batch trained on
        self._faults: dict[int, dict[str, int]] = {}  # reader slot -> data it skipped up to that position
        self._skipped_shards = 0  # shards the training stream left out of its plan
        self._next_slot = 0
        self._loaded: dict = {}

    @property
    def num_slots(self) -> int:
        return max(1, self.num_workers)

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def data_faults(self) -> dict[str, int]:
        """What the stream skipped so far in this run, resumes included (on_bad_data=skip), by kind; only kinds that
        occurred. Counted by rank 0's readers."""
        total = sum((Counter(c) for c in self._faults.values()), Counter(skipped_shards=self._skipped_shards))
        kinds = list(FAULT_KINDS) + sorted(set(total) - set(FAULT_KINDS))
        return {k: total[k] for k in kinds if total[k]}

    def start_positions(self) -> dict:
        rank, world = self.rank_and_world
        return resume_positions(self._loaded, rank, self.num_slots, world * self.num_slots)

    def loader(self, stream) -> DataLoader:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=on_cuda)

    def training_batch(self, item: dict):
        """Packed rows (set `grad_accum` in `setup`) as the (accum, B, T + 1) tensor one training_step consumes."""
        return item["tokens"].view(self.grad_accum, self.device_batch_size, self.seq_len + 1)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict):
            return batch
        state = dict(batch["state"])
        slot = state.pop("slot")
        skipped = state.pop("skipped", 0)
        # The chat streams carry only `skipped`: conversations with nothing to train on.
        self._faults[slot] = state.pop("faults", None) or ({"skipped_conversations": skipped} if skipped else {})
        self._slots[slot] = state
        self._next_slot = (slot + 1) % self.num_slots
        return self.training_batch(batch)

    def state_dict(self) -> dict:
        if not self._slots:
            return dict(self._loaded)
        stride = self.rank_and_world[1] * self.num_slots  # readers across all ranks, as TokenStream.stride
        return {"slots": dict(self._slots), "next_slot": self._next_slot, "num_slots": self.num_slots, "stride": stride,
                "faults": dict(self._faults)}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state)
        self._slots = {int(k): dict(v) for k, v in state.get("slots", {}).items()}
        self._next_slot = state.get("next_slot", 0)
        self._faults = {int(k): dict(v) for k, v in state.get("faults", {}).items()}  # absent in older checkpoints

    # --- validation tokens ---------------------------------------------------------------------
    def val_stream(self, rows: int):
        """A finite stream of this rank's share of the held-out data, `rows` packed rows per item."""
        raise NotImplementedError

    def val_batches(self, max_tokens: int, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The same fixed validation rows every call: (B, seq_len + 1) batches, this rank's share of `max_tokens`."""
        world = self.rank_and_world[1]
        rows = batch_size or self.device_batch_size
        budget = max(1, max_tokens // world)
        seen = 0
        for item in self.val_stream(rows):
            if seen >= budget:
                return
            seen += item["tokens"][:, :-1].numel()
            yield item["tokens"]
        if seen == 0:
            raise UserError(f"the validation data has fewer than {rows * (self.seq_len + 1)} tokens for one batch of {rows} rows")


class PretrainDataModule(StreamDataModule):
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
    ):
        super().__init__(sequence_len=sequence_len, device_batch_size=device_batch_size, num_workers=num_workers)
        self.dir = Path(dir)
        self.tokenizer_dir = tokenizer_dir
        self.source = source
        self.prepare_kwargs = dict(gutenberg=gutenberg, val_fraction=val_fraction, shard_chars=shard_chars)
        self.total_batch_size = total_batch_size
        self.on_bad_data = on_bad_data
        self.stream_kwargs = dict(tokenizer_batch=tokenizer_batch, tokenizer_threads=tokenizer_threads, on_bad_data=on_bad_data)

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
        rank, world = self.rank_and_world
        self.grad_accum = grad_accum_steps(self.total_batch_size, self.device_batch_size, self.seq_len, world)
        if rank == 0:
            log.info(
                f"data: {len(self.train_files)} train + {len(self.val_files)} val shards in {self.dir}; "
                f"{self.device_batch_size} x {self.seq_len} tokens per micro-batch x {self.grad_accum} accumulation "
                f"x {world} ranks = {self.total_batch_size:,} tokens per step"
            )

    # --- training stream -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_and_world
        stream = TokenStream(
            self.train_files,
            self.tokenizer,
            rows=self.grad_accum * self.device_batch_size,
            seq_len=self.seq_len,
            rank=rank,
            world_size=world,
            num_slots=self.num_slots,
            start=self.start_positions(),
            **self.stream_kwargs,
        )
        self._skipped_shards = len(stream.skipped_shards)
        return self.loader(stream)

    def val_stream(self, rows: int) -> TokenStream:
        rank, world = self.rank_and_world
        return TokenStream(self.val_files, self.tokenizer, rows=rows, seq_len=self.seq_len, rank=rank, world_size=world,
                           infinite=False, **self.stream_kwargs)
