"""The pretraining stream: rank x worker sharding, packing, exact resume, bad shards."""

import copy
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from nanochat.data.pretrain_datamodule import PretrainDataModule
from nanochat.data.shards import write_shard
from nanochat.data.stream import Position, TokenStream, resume_positions
from nanochat.errors import UserError


class DigitTokenizer:
    """Document "17" -> [BOS, 18, 18, 18]: every document fills exactly one row of seq_len 3 + 1."""

    bos_token_id = 0

    def encode_batch(self, texts, prepend=None, num_threads=1):
        return [[prepend, int(t) + 1, int(t) + 1, int(t) + 1] for t in texts]


def doc_ids(batches) -> list[int]:
    return [int(row[1]) - 1 for b in batches for row in b["tokens"]]


@pytest.fixture
def numbered_shards(tmp_path):
    """3,700 documents "0".."3699" in 3 files with 2, 2 and 1 row groups: 5 units for 4 readers, unevenly."""
    files, start = [], 0
    for i, n in enumerate((1500, 1500, 700)):
        path = tmp_path / f"shard_{i:05d}.parquet"
        write_shard(path, [str(d) for d in range(start, start + n)])
        files.append(path)
        start += n
    return files


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_two_readers_read_every_document_exactly_once(numbered_shards, num_workers):
    slots = 2
    seen = []
    for rank in range(2):
        stream = TokenStream(
            numbered_shards,
            DigitTokenizer(),
            rows=1,
            seq_len=3,
            rank=rank,
            world_size=2,
            num_slots=slots,
            infinite=False,
        )
        if num_workers:
            seen += doc_ids(DataLoader(stream, batch_size=None, num_workers=num_workers))
        else:  # the same four readers, driven one after another in this process
            seen += [d for slot in range(slots) for d in doc_ids(stream.batches(slot))]
    counts = Counter(seen)
    assert sorted(counts) == list(range(3700))
    assert set(counts.values()) == {1}


def test_scarce_row_groups_are_split_between_readers(tmp_path):
    path = tmp_path / "one.parquet"
    write_shard(path, [str(d) for d in range(101)])  # one row group, four readers
    seen = []
    for rank in range(2):
        stream = TokenStream(
            [path], DigitTokenizer(), rows=1, seq_len=3, rank=rank, world_size=2, num_slots=2, infinite=False
        )
        per_slot = [doc_ids(stream.batches(slot)) for slot in range(2)]
        assert all(len(ids) >= 25 for ids in per_slot)  # each reader gets a quarter, not zero
        seen += [d for ids in per_slot for d in ids]
    assert sorted(seen) == list(range(101))


def test_rows_are_packed_bos_prefixed_documents(tiny_corpus_shards, tiny_tokenizer):
    from nanochat.data.shards import list_shards

    files = list_shards(tiny_corpus_shards)[:1]
    stream = TokenStream(files, tiny_tokenizer, rows=4, seq_len=32, infinite=False)
    first = next(iter(stream))["tokens"]
    assert first.shape == (4, 33) and first.dtype == torch.long
    assert int(first[0, 0]) == tiny_tokenizer.bos_token_id  # the stream starts at a document boundary
    import pyarrow.parquet as pq

    text = pq.read_table(files[0]).column("text")[0].as_py()
    expected = tiny_tokenizer.encode(text, prepend=tiny_tokenizer.bos_token_id)
    flat = first.view(-1).tolist()
    n = min(len(expected), len(flat))
    assert flat[:n] == expected[:n]  # rows are consecutive slices of the token stream, no padding


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_state_round_trip_resumes_at_the_same_token(tiny_corpus_shards, tiny_tokenizer_dir, num_workers):
    def make():
        dm = PretrainDataModule(
            dir=str(tiny_corpus_shards),
            tokenizer_dir=str(tiny_tokenizer_dir),
            sequence_len=16,
            device_batch_size=2,
            total_batch_size=64,
            num_workers=num_workers,
        )
        dm.setup("fit")
        return dm

    dm = make()
    consumed = []
    for raw in dm.train_dataloader():
        consumed.append(dm.on_before_batch_transfer(raw, 0))
        if len(consumed) == 7:
            state = copy.deepcopy(dm.state_dict())
        if len(consumed) == 14:
            break
    assert consumed[0].shape == (2, 2, 17)  # (accumulation, device batch, seq_len + 1)
    resumed = make()
    resumed.load_state_dict(torch.load(_roundtrip(state, tiny_corpus_shards), weights_only=False))
    after = []
    for raw in resumed.train_dataloader():
        after.append(resumed.on_before_batch_transfer(raw, 0))
        if len(after) == 7:
            break
    for a, b in zip(consumed[7:], after):
        assert torch.equal(a, b)


def _roundtrip(state, tmp):
    path = tmp.parent / "state.pt"
    torch.save(state, path)
    return path


def test_other_ranks_resume_at_rank0_round_start():
    state = {"slots": {0: {"epoch": 1, "round": 5, "doc": 7, "token": 30}}, "next_slot": 0, "num_slots": 1, "stride": 2}
    assert resume_positions(state, rank=0, num_slots=1, stride=2)[0] == Position(1, 5, 7, 30)
    assert resume_positions(state, rank=1, num_slots=1, stride=2)[0] == Position(1, 5, 0, 0)
    # a different layout cannot map positions: every reader restarts the saved epoch
    assert resume_positions(state, rank=0, num_slots=2, stride=4)[1] == Position(1)


def test_stream_is_endless_and_counts_epochs(numbered_shards):
    stream = TokenStream(numbered_shards[2:], DigitTokenizer(), rows=100, seq_len=3)
    it = stream.batches(0)
    states = [next(it)["state"] for _ in range(9)]  # 700 docs = 7 batches per epoch
    assert [s["epoch"] for s in states] == [0] * 7 + [1] * 2


def test_corrupt_row_group_is_skipped_and_counted_or_fails(tmp_path, monkeypatch, caplog):
    path = tmp_path / "a.parquet"
    write_shard(path, [str(d) for d in range(2048)])  # two row groups
    stream = TokenStream([path], DigitTokenizer(), rows=1, seq_len=3, infinite=False)
    import pyarrow.parquet as pq

    real = pq.ParquetFile.read_row_group

    def flaky(self, i, *args, **kwargs):
        if i == 0:
            raise OSError("Corrupt snappy compressed data")
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", flaky)
    batches = list(stream)
    assert doc_ids(batches) == list(range(1024, 2048))
    assert batches[-1]["state"]["skipped"] == 1
    assert "skipping unreadable row group 0" in caplog.text and str(path) in caplog.text
    strict = TokenStream([path], DigitTokenizer(), rows=1, seq_len=3, infinite=False, on_bad_data="fail")
    with pytest.raises(UserError, match=r"a\.parquet row group 0"):
        list(strict)


def test_unreadable_shard_fails_at_setup_naming_it_in_fail_mode(tmp_path, tiny_tokenizer_dir):
    for i in range(3):
        write_shard(tmp_path / f"shard_{i:05d}.parquet", [f"document {j}" for j in range(10)])
    (tmp_path / "shard_00001.parquet").write_bytes(b"PAR1 this is not parquet")
    dm = PretrainDataModule(
        dir=str(tmp_path),
        tokenizer_dir=str(tiny_tokenizer_dir),
        sequence_len=8,
        device_batch_size=1,
        total_batch_size=8,
        on_bad_data="fail",
    )  # skip: tests/test_data_faults.py
    with pytest.raises(UserError, match="shard_00001.parquet"):
        dm.setup("fit")


def test_prepare_on_first_use_and_never_over_foreign_shards(tmp_path):
    from nanochat.data.pretrain_datamodule import ensure_shards

    text = tmp_path / "text.jsonl"
    text.write_text("".join(f'{{"text": "document number {i}"}}\n' for i in range(50)))
    shards = ensure_shards(tmp_path / "prepared", str(text), val_fraction=0.1)
    assert len(shards) >= 2 and (tmp_path / "prepared" / "manifest.json").is_file()
    assert ensure_shards(tmp_path / "prepared", str(text)) == shards  # prepared once, then reused
    foreign = tmp_path / "downloaded"
    write_shard(foreign / "shard_00000.parquet", ["a"])
    with pytest.raises(UserError, match="holds shards but no manifest.json"):
        ensure_shards(foreign, str(text))
    assert (foreign / "shard_00000.parquet").is_file()
