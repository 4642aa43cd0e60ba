"""Data faults: corrupt / truncated shards, unreadable row groups, empty and invalid documents, broken jsonl rows.

on_bad_data=skip (the pretraining default) passes over them and counts them by kind, in the batch state, the
metrics (`data/<kind>`) and the report card; on_bad_data=fail stops with one UserError naming the file and row.
"""

import copy
import json
import logging
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.configs import compose
from nanochat.data.pretrain_datamodule import PretrainDataModule
from nanochat.data.shards import prepare, write_shard
from nanochat.data.stream import TokenStream
from nanochat.errors import UserError
from nanochat.stages import run_stage

# Row by row: 3 invalid UTF-8, 1 null, 2 empty, then good documents. The bad rows come first so that the first
# batch's position lies past all of them: the counts are then final after one batch.
BAD_ROWS = [b"\xff\xfe not utf-8", b"caf\xe9", None, b"", b"  \n\t ", b"\xc3\x28 broken pair"]
INVALID, EMPTY = 4, 2


def good_docs(prefix: str, n: int) -> list[str]:
    return [f"{prefix} document {i}: the quick brown fox jumps over the lazy dog." for i in range(n)]


def write_mixed(path: Path, n_good: int = 20) -> Path:
    """A shard whose `text` column is binary: invalid UTF-8, a null and empty values before good documents."""
    values = BAD_ROWS + [d.encode() for d in good_docs(path.stem, n_good)]
    pq.write_table(pa.table({"text": pa.array(values, type=pa.binary())}), path)
    return path


def truncate(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # the footer is gone: it cannot be opened
    return dst


def corrupt_row_group(path: Path, rg: int = 0) -> Path:
    """Overwrite the page header of row group `rg`: the footer still reads, that row group does not."""
    offset = pq.read_metadata(path).row_group(rg).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def faulty(tmp_path):
    """Train shards with every fault kind (one each of the shard kinds), in sorted order, plus a good val shard."""
    d = tmp_path / "shards"
    write_shard(d / "a_good.parquet", good_docs("a", 40))
    write_mixed(d / "b_mixed.parquet")
    # Two row groups, the first unreadable.
    pq.write_table(pa.table({"text": good_docs("c", 40)}), d / "c_row_groups.parquet", row_group_size=20)
    corrupt_row_group(d / "c_row_groups.parquet")
    truncate(d / "a_good.parquet", d / "d_truncated.parquet")
    (d / "e_garbage.parquet").write_bytes(bytes(range(256)) * 8)
    write_shard(d / "f_good.parquet", good_docs("f", 40))
    write_shard(d / "z_val.parquet", good_docs("val", 40))
    return d


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: the stream must raise, not spin."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def train_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.parquet") if p.name != "z_val.parquet")


# --- the stream -----------------------------------------------------------------------------------
def test_stream_skips_and_counts_every_fault_kind(faulty, tiny_tokenizer, caplog):
    stream = TokenStream(train_files(faulty), tiny_tokenizer, rows=2, seq_len=16, infinite=False)
    assert stream.skipped_shards == [faulty / "d_truncated.parquet", faulty / "e_garbage.parquet"]
    for name in ("d_truncated.parquet", "e_garbage.parquet"):
        assert sum(str(faulty / name) in r.message for r in caplog.records) == 1  # one warning each, naming it
    batches = list(stream)
    assert len(batches) > 100
    assert batches[-1]["state"]["faults"] == {
        "skipped_row_groups": 1,
        "empty_documents": EMPTY,
        "invalid_documents": INVALID,
    }
    assert batches[-1]["state"]["skipped"] == 1 + EMPTY + INVALID
    assert f"skipping unreadable row group 0 of {faulty / 'c_row_groups.parquet'}" in caplog.text
    text = tiny_tokenizer.decode(batches[0]["tokens"].flatten().tolist())
    assert "b_mixed document 0" in text or "a document" in text  # good documents around the bad ones are kept

    # An endless stream keeps counting, once per pass over the data.
    endless = TokenStream(train_files(faulty)[:2], tiny_tokenizer, rows=2, seq_len=16)
    for item in endless.batches(0):
        if item["state"]["epoch"] == 2:
            break
    assert item["state"]["faults"] == {"empty_documents": 2 * EMPTY, "invalid_documents": 2 * INVALID}


@pytest.mark.parametrize(
    "name, where",
    [
        ("d_truncated.parquet", "not a readable parquet file"),
        ("e_garbage.parquet", "not a readable parquet file"),
        ("c_row_groups.parquet", "row group 0 cannot be read"),
        ("b_mixed.parquet", "row group 0 row 0: the 'text' value is not valid UTF-8"),
    ],
)
def test_fail_mode_names_the_file_and_row(faulty, tiny_tokenizer, name, where):
    with pytest.raises(UserError) as err:
        list(TokenStream([faulty / name], tiny_tokenizer, rows=2, seq_len=16, infinite=False, on_bad_data="fail"))
    assert f"{faulty / name}" in str(err.value) and where in str(err.value)
    assert "\n" not in str(err.value)


def test_fail_mode_names_null_and_empty_rows(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.parquet"
    for values, why in (
        ([None, "ok"], "row 0: the 'text' value is null"),
        (["ok", " "], "row 1: the 'text' value is empty"),
    ):
        pq.write_table(pa.table({"text": pa.array(values, type=pa.string())}), path)
        with pytest.raises(UserError, match=f"{path} row group 0 {why}"):
            list(TokenStream([path], tiny_tokenizer, rows=1, seq_len=2, infinite=False, on_bad_data="fail"))


def test_all_bad_shards_or_no_usable_document_is_one_error_not_a_hang(faulty, tiny_tokenizer):
    bad = [faulty / "d_truncated.parquet", faulty / "e_garbage.parquet"]
    with pytest.raises(UserError, match=r"none of the 2 shard\(s\) .*d_truncated.parquet.* holds readable text"):
        TokenStream(bad, tiny_tokenizer, rows=1, seq_len=8)
    # Shards that open but hold nothing usable: one pass, then an error (an endless stream must not spin).
    empty = faulty / "empty_docs.parquet"
    pq.write_table(pa.table({"text": pa.array(BAD_ROWS, type=pa.binary())}), empty)
    stream = TokenStream([empty], tiny_tokenizer, rows=1, seq_len=8)
    with time_limit(30), pytest.raises(UserError, match="found no usable document") as err:
        next(iter(stream))
    assert "'invalid_documents': 4" in str(err.value)


def test_fault_counts_continue_across_resume(faulty, tiny_tokenizer_dir):
    def make():
        dm = PretrainDataModule(
            dir=str(faulty),
            tokenizer_dir=str(tiny_tokenizer_dir),
            sequence_len=16,
            device_batch_size=2,
            total_batch_size=32,
            num_workers=0,
        )
        dm.setup("fit")
        return dm

    def consume(dm, n):
        out = []
        for raw in dm.train_dataloader():
            tokens = dm.on_before_batch_transfer(raw, 0)
            out.append((tokens, dm.data_faults, copy.deepcopy(dm.state_dict())))
            if len(out) == n:
                return out

    straight = consume(make(), 300)
    epochs = [state["slots"][0]["epoch"] for _, _, state in straight]
    assert straight[0][1] == {"skipped_shards": 2} and epochs[-1] >= 2
    # Two whole passes over the data are behind the first batch of the third: each fault counted once per pass.
    assert straight[epochs.index(2)][1] == {
        "skipped_shards": 2,
        "skipped_row_groups": 2,
        "empty_documents": 2 * EMPTY,
        "invalid_documents": 2 * INVALID,
    }
    one_pass = epochs.index(1)
    # Resume before any fault, between the bad rows and the bad row group, and in the second pass before its faults.
    for at in (5, 50, one_pass + 40):
        dm = make()
        dm.load_state_dict(straight[at][2])
        for (tokens, faults, _), (tokens2, faults2, _) in zip(straight[at + 1 :], consume(dm, 50)):
            assert (tokens == tokens2).all() and faults == faults2
    # A checkpoint from before faults were kept resumes at the same token and counts from there.
    old = {k: v for k, v in straight[5][2].items() if k != "faults"}
    dm = make()
    dm.load_state_dict(old)
    tokens, faults, state = consume(dm, 1)[0]
    assert (tokens == straight[6][0]).all() and faults == {"skipped_shards": 2} and "faults" in state


# --- a pretraining run ------------------------------------------------------------------------------
@pytest.fixture
def faulty_corpus(tiny_corpus_shards, tmp_path):
    """The tiny corpus's shards, plus a truncated copy of one and a shard of bad rows read first."""
    d = tmp_path / "faulty_corpus"
    shutil.copytree(tiny_corpus_shards, d)
    write_mixed(d / "a_mixed.parquet")
    truncate(d / "shard_00000.parquet", d / "b_truncated.parquet")
    return d


def test_pretraining_run_skips_a_corrupt_shard_and_reports_the_counts(tiny_run, faulty_corpus, caplog):
    cfg = compose(
        tiny_run(
            f"data.dir={faulty_corpus}",
            "data.source=null",
            "logger=csv",
            "budget.base_steps=4",
            "budget.eval_every=0",
            "budget.save_every=0",
        )
    )
    with caplog.at_level(logging.WARNING):
        run_stage(cfg)
    assert f"skipping shard: {faulty_corpus / 'b_truncated.parquet'}" in caplog.text
    run_dir = Path(cfg.paths.run_dir)
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    counts = {
        name: [r.split(",")[header.index(f"data/{name}")] for r in rows[1:]]
        for name in ("skipped_shards", "empty_documents", "invalid_documents")
    }
    assert {k: [float(x) for x in v if x] for k, v in counts.items()} == {
        "skipped_shards": [1.0, 1.0],
        "empty_documents": [EMPTY] * 2,
        "invalid_documents": [INVALID] * 2,
    }  # steps 2, 4
    report = (run_dir.parent / "report.md").read_text()
    assert f"data faults skipped: 1 skipped shards, {EMPTY} empty documents, {INVALID} invalid documents" in report


def test_fail_mode_run_exits_with_one_error_line_naming_the_file(tiny_run, faulty_corpus, stage_error):
    line = stage_error(compose(tiny_run(f"data.dir={faulty_corpus}", "data.source=null", "data.on_bad_data=fail")))
    assert str(faulty_corpus / "b_truncated.parquet") in line
    (faulty_corpus / "b_truncated.parquet").unlink()
    line = stage_error(compose(tiny_run(f"data.dir={faulty_corpus}", "data.source=null", "data.on_bad_data=fail")))
    assert f"{faulty_corpus / 'a_mixed.parquet'} row group 0 row 0" in line
    # Raised inside a DataLoader worker (the GPU presets' num_workers=1), it is still one line, the same one.
    assert (
        stage_error(
            compose(
                tiny_run(f"data.dir={faulty_corpus}", "data.source=null", "data.on_bad_data=fail", "data.num_workers=1")
            )
        )
        == line
    )


def test_run_on_only_bad_training_shards_is_one_error(tiny_run, tmp_path, faulty_corpus, stage_error):
    d = tmp_path / "all_bad"
    d.mkdir()
    truncate(faulty_corpus / "shard_00000.parquet", d / "shard_00000.parquet")
    (d / "shard_00001.parquet").write_bytes(b"PAR1 not parquet PAR1")
    shutil.copy(faulty_corpus / "shard_00000.parquet", d / "shard_00002.parquet")  # the (good) validation shard
    with time_limit(60):
        line = stage_error(compose(tiny_run(f"data.dir={d}", "data.source=null")))
    assert "none of the 2 shard(s)" in line and str(d / "shard_00000.parquet") in line


# --- preparing shards from text --------------------------------------------------------------------
def test_prepare_skips_and_counts_bad_jsonl_rows_or_names_the_line(tmp_path, caplog):
    src = tmp_path / "text.jsonl"
    lines = [json.dumps({"text": d}) for d in good_docs("p", 30)]
    lines[3] = '{"text": "cut sho'
    lines[7] = json.dumps({"body": "no text field"})
    lines[11] = json.dumps({"text": 42})
    src.write_bytes("\n".join(lines).encode() + b'\n{"text": "caf\xe9"}\n')  # line 31: invalid UTF-8
    with caplog.at_level(logging.WARNING):
        manifest = prepare([src], tmp_path / "out", val_fraction=0.2, show_progress=False)
    assert manifest["skipped_rows"] == 4 and manifest["train"]["docs"] + manifest["val"]["docs"] == 27
    assert f"skipped 4 bad input row(s): {src}:4 (is not valid JSON" in caplog.text
    assert f"{src}:8 (has no string field 'text')" in caplog.text and f"{src}:31 (is not valid UTF-8" in caplog.text
    with pytest.raises(UserError, match=rf"{src}:4 is not valid JSON .*data.on_bad_data=skip"):
        prepare([src], tmp_path / "strict", val_fraction=0.2, show_progress=False, on_bad_data="fail")

    # The pretraining data module prepares with its own setting.
    dm = PretrainDataModule(
        dir=str(tmp_path / "dm"),
        source=str(src),
        tokenizer_dir="unused",
        sequence_len=8,
        device_batch_size=1,
        total_batch_size=8,
        on_bad_data="fail",
    )
    with pytest.raises(UserError, match=f"{src}:4"):
        dm.prepare_data()


def test_prepare_replaces_invalid_utf8_in_text_files_with_one_warning(tmp_path, caplog):
    (tmp_path / "book.txt").write_bytes(b"caf\xe9 cr\xe8me\n\n" + b"A fine paragraph.\n\n" * 20)
    with caplog.at_level(logging.WARNING):
        manifest = prepare(
            [tmp_path / "book.txt"], tmp_path / "out", val_fraction=0.5, txt_doc_chars=20, show_progress=False
        )
    assert manifest["train"]["docs"] + manifest["val"]["docs"] >= 2
    assert caplog.text.count("is not valid UTF-8") == 1 and "2 undecodable character(s)" in caplog.text
    with pytest.raises(UserError, match="book.txt is not valid UTF-8"):
        prepare([tmp_path / "book.txt"], tmp_path / "strict", show_progress=False, on_bad_data="fail")


# --- chat task files ----------------------------------------------------------------------------------
def test_chat_task_jsonl_with_a_broken_line_names_file_and_line(tmp_path):
    from nanochat.tasks.smoltalk import SmolTalk

    path = tmp_path / "train.jsonl"
    rows = [
        json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]})
        for i in range(5)
    ]
    rows[2] = rows[2][:-7]  # a row cut short
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError) as err:
        SmolTalk(path=path)
    assert str(err.value).startswith(f"{path}:3 is not valid JSON") and "\n" not in str(err.value)
    path.write_bytes(b'{"messages": []}\n\n["a list"]\n')
    with pytest.raises(UserError, match=rf"{path}:3 is not a record"):
        SmolTalk(path=path)
