"""What every training DataModule keeps of its stream: where each reader stands and what it skipped.

A stream yields `{"state": {...}, ...}` items. A DataModule passes the item Lightning hands to the training step
(not the one being prefetched) through `StreamState.record`, so `state_dict()` is exactly "what has been trained
on" and a resume continues from there. Each DataModule holds one and delegates its checkpoint hooks to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch.utils.data import DataLoader

from nanochat.data.stream import FAULT_KINDS, resume_positions
from nanochat.errors import UserError


def rank_and_world(trainer) -> tuple[int, int]:
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def make_loader(trainer, stream, num_workers: int) -> DataLoader:
    on_cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=on_cuda)


class StreamState:
    def __init__(self, num_slots: int = 1):
        self.num_slots = max(1, num_slots)
        self.slots: dict[int, dict] = {}  # reader slot -> position after the last batch trained on
        self.faults: dict[int, dict[str, int]] = {}  # reader slot -> data it skipped up to that position
        self.crop: dict[int, dict[str, int]] = {}  # reader slot -> best-fit packing's cropped and taken tokens so far
        self.skipped_shards = 0  # shards the training stream left out of its plan
        self.next_slot = 0
        self.loaded: dict = {}

    @property
    def data_faults(self) -> dict[str, int]:
        """What the stream skipped so far in this run, resumes included (on_bad_data=skip), by kind; only kinds that
        occurred. Counted by rank 0's readers."""
        total = sum((Counter(c) for c in self.faults.values()), Counter(skipped_shards=self.skipped_shards))
        kinds = list(FAULT_KINDS) + sorted(set(total) - set(FAULT_KINDS))
        return {k: total[k] for k in kinds if total[k]}

    @property
    def crop_share(self) -> float | None:
        """Best-fit packing: the share of the tokens taken from the buffer so far that were cropped off (rank 0's
        readers, resumes included); None under another packing or before the first batch."""
        taken = sum(c.get("taken", 0) for c in self.crop.values())
        return sum(c.get("cropped", 0) for c in self.crop.values()) / taken if taken else None

    @property
    def pad_share(self) -> float | None:
        """Best-fit SFT rows: the share of row tokens that were padding so far (rank 0's reader, resumes included)."""
        tokens = sum(c.get("tokens", 0) for c in self.crop.values())
        return sum(c.get("padded", 0) for c in self.crop.values()) / tokens if tokens else None

    def start_positions(self, rank: int, world: int) -> dict:
        return resume_positions(self.loaded, rank, self.num_slots, world * self.num_slots)

    def record(self, item: dict) -> dict:
        """Note the position and faults of a batch about to be trained on; returns the item."""
        state = dict(item["state"])
        slot = state.pop("slot")
        skipped = state.pop("skipped", 0)
        # The chat streams carry only `skipped`: conversations with nothing to train on.
        self.faults[slot] = state.pop("faults", None) or ({"skipped_conversations": skipped} if skipped else {})
        if "crop" in state:
            self.crop[slot] = state.pop("crop")
        self.slots[slot] = state
        self.next_slot = (slot + 1) % self.num_slots
        return item

    def state_dict(self, world: int) -> dict:
        if not self.slots:
            return dict(self.loaded)
        stride = world * self.num_slots  # readers across all ranks, as TokenStream.stride
        return {
            "slots": dict(self.slots),
            "next_slot": self.next_slot,
            "num_slots": self.num_slots,
            "stride": stride,
            "faults": dict(self.faults),
            "crop": dict(self.crop),
        }

    def load_state_dict(self, state: dict) -> None:
        self.loaded = dict(state)
        self.slots = {int(k): dict(v) for k, v in state.get("slots", {}).items()}
        self.next_slot = state.get("next_slot", 0)
        self.faults = {int(k): dict(v) for k, v in state.get("faults", {}).items()}  # absent in older checkpoints
        self.crop = {int(k): dict(v) for k, v in state.get("crop", {}).items()}


def val_rows(stream, max_tokens: int, world: int, rows: int, seq_len: int) -> Iterator:
    """The same fixed validation rows every call: (rows, seq_len + 1) batches, this rank's share of `max_tokens`."""
    budget = max(1, max_tokens // world)
    seen = 0
    for item in stream:
        if seen >= budget:
            return
        seen += item["tokens"][:, :-1].numel()
        yield item["tokens"]
    if seen == 0:
        raise UserError(
            f"the validation data has fewer than {rows * (seq_len + 1)} tokens for one batch of {rows} rows"
        )
