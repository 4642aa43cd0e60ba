"""Best-fit packing of pretraining rows: BOS-aligned rows, no overflow, the crop share, exact resume."""

import copy

import pytest
import torch

from nanochat.data.pretrain_datamodule import PretrainDataModule
from nanochat.data.shards import write_shard
from nanochat.data.stream import Position, TokenStream, pack_bestfit
from nanochat.errors import UserError

BOS = 0


def synthetic(lengths):
    """Document i of length n: [BOS, i + 1, i + 1, ...] (n tokens), at position (0, 0, i)."""
    return iter([(Position(0, 0, i), [BOS] + [i + 1] * (n - 1)) for i, n in enumerate(lengths)])


def test_rows_by_hand():
    # Width 8, a buffer of 3. Row 1 takes the 8; row 2 the 6, then (after a refill) the 2; row 3 the 5 and the 3;
    # row 4 the 4, then nothing fits the 4 tokens left, so the shortest left (the 10) is cropped to 4, dropping 6.
    batches = list(pack_bestfit(synthetic([5, 3, 8, 6, 2, 10, 4]), rows=1, seq_len=7, buffer_size=3, refill=1))
    rows = [b[0][0].tolist() for b in batches]
    assert rows == [
        [0, 3, 3, 3, 3, 3, 3, 3],
        [0, 4, 4, 4, 4, 4, 0, 5],
        [0, 1, 1, 1, 1, 0, 2, 2],
        [0, 7, 7, 7, 0, 6, 6, 6],
    ]
    last = batches[-1][2]["crop"]
    assert last == {"cropped": 6, "taken": 5 + 3 + 8 + 6 + 2 + 10 + 4}
    assert last["cropped"] / last["taken"] == pytest.approx(6 / 38)
    assert [b[2]["crop"]["cropped"] for b in batches] == [0, 0, 0, 6]  # running counts
    assert batches[0][2]["buffer"] == [[0, 0, 0], [0, 0, 1]]  # the 5 and the 3 wait in the buffer
    assert batches[0][1] == Position(0, 0, 3)  # the next document to read


def test_the_buffer_grows_by_whole_chunks_of_a_row_group():
    # Width 8, a buffer of 2, chunks of 3 documents: row group 0 holds lengths 4, 4, 8 (one chunk), row group 1
    # holds 3, 5. Row 1: the first chunk comes in whole, so the 8 is there and fills the row (one document at a
    # time, the two 4s would have). Row 2: the two 4s, the second after row group 1's chunk arrives; row 3: the 5,
    # then the 3.
    docs = [(Position(0, 0, 0), 4), (Position(0, 0, 1), 4), (Position(0, 0, 2), 8), (Position(0, 1, 0), 3)]
    docs += [(Position(0, 1, 1), 5)]
    items = [(p, [BOS] + [n] * (n - 1)) for p, n in docs]
    batches = list(pack_bestfit(iter(items), rows=1, seq_len=7, buffer_size=2, refill=3))
    assert [b[0][0].tolist() for b in batches] == [
        [0, 8, 8, 8, 8, 8, 8, 8],
        [0, 4, 4, 4, 0, 4, 4, 4],
        [0, 5, 5, 5, 5, 0, 3, 3],
    ]
    assert batches[0][2]["buffer"] == [[0, 0, 0], [0, 0, 1]] and batches[0][1] == Position(0, 0, 3)
    assert batches[1][2]["buffer"] == [[0, 1, 0], [0, 1, 1]] and batches[1][1] == Position(0, 1, 2)
    one_at_a_time = list(pack_bestfit(iter(items), rows=1, seq_len=7, buffer_size=2, refill=1))
    assert one_at_a_time[0][0][0].tolist() == [0, 4, 4, 4, 0, 4, 4, 4]


def test_every_row_starts_with_bos_and_none_overflows():
    lengths = [int(n) for n in torch.randint(1, 40, (400,), generator=torch.Generator().manual_seed(0))]
    taken = cropped = 0
    for tokens, _, state in pack_bestfit(synthetic(lengths), rows=4, seq_len=15, buffer_size=20):
        assert tokens.shape == (4, 16)  # T + 1 per row, never more (and no padding: rows are full)
        assert (tokens[:, 0] == BOS).all()
        taken, cropped = state["crop"]["taken"], state["crop"]["cropped"]
    assert 0 < cropped < taken <= sum(lengths)


def test_the_largest_document_that_fits_goes_first():
    batches = list(pack_bestfit(synthetic([2, 4, 3, 4, 2]), rows=1, seq_len=5, buffer_size=10))
    # Row 1: the first 4 (document 1), then the first 2 (document 0); row 2: the other 4, then the other 2.
    assert [b[0][0].tolist() for b in batches] == [[0, 2, 2, 2, 0, 1], [0, 4, 4, 4, 0, 5]]


class LengthTokenizer:
    """Document "n" -> [BOS] + [n] * (n - 1): its text is its length."""

    bos_token_id = BOS

    def encode_batch(self, texts, prepend=None, num_threads=1):
        return [[prepend] + [int(t)] * (int(t) - 1) for t in texts]


@pytest.fixture
def length_shards(tmp_path):
    gen = torch.Generator().manual_seed(1)
    files = []
    for i in range(4):  # one row group each
        path = tmp_path / f"shard_{i:05d}.parquet"
        write_shard(path, [str(int(n)) for n in torch.randint(2, 30, (150,), generator=gen)])
        files.append(path)
    return files


def test_stream_resumes_exactly_from_a_batch_state(length_shards):
    def stream(start=None):
        return TokenStream(
            length_shards, LengthTokenizer(), rows=3, seq_len=15, packing="bestfit", buffer_size=25, start=start
        )

    full = []
    for item in stream().batches(0):
        full.append(item)
        if len(full) == 120:  # past several shards of 150 documents
            break
    state = full[59]["state"]
    assert len(state["buffer"]) >= 24 and state["crop"]["cropped"] > 0  # refilled before each placement
    start = {
        0: Position(**{k: state[k] for k in ("epoch", "round", "doc", "token")}),
        "buffers": {0: state["buffer"]},
        "crop": {0: state["crop"]},
    }
    resumed = stream(start).batches(0)
    for want in full[60:]:
        got = next(resumed)
        assert torch.equal(got["tokens"], want["tokens"])
        assert got["state"]["crop"] == want["state"]["crop"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_resume_continues_rows_and_crop_share(tiny_corpus_shards, tiny_tokenizer_dir, num_workers):
    def make():
        dm = PretrainDataModule(
            dir=str(tiny_corpus_shards),
            tokenizer_dir=str(tiny_tokenizer_dir),
            sequence_len=16,
            device_batch_size=2,
            total_batch_size=64,
            num_workers=num_workers,
            packing="bestfit",
            buffer_size=16,
        )
        dm.setup("fit")
        return dm

    dm = make()
    consumed, shares = [], []
    for raw in dm.train_dataloader():
        consumed.append(dm.on_before_batch_transfer(raw, 0))
        shares.append(dm.packing_stats["crop_share"])
        if len(consumed) == 7:
            state = copy.deepcopy(dm.state_dict())
        if len(consumed) == 14:
            break
    assert all((batch[..., 0] == dm.tokenizer.bos_token_id).all() for batch in consumed)
    resumed = make()
    resumed.load_state_dict(state)
    for want, share, raw in zip(consumed[7:], shares[7:], resumed.train_dataloader()):
        assert torch.equal(resumed.on_before_batch_transfer(raw, 0), want)
        assert resumed.packing_stats["crop_share"] == share
    assert 0 < shares[-1] < 1


def test_unknown_packing_is_one_line(length_shards):
    with pytest.raises(UserError, match="datamodule.packing must be one of concat, bestfit, got 'best'"):
        TokenStream(length_shards, LengthTokenizer(), rows=1, seq_len=7, packing="best")
