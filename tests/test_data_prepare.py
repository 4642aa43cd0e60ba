import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data.__main__ import main
from nanochat.data.documents import iter_documents
from nanochat.data.shards import (
    MANIFEST_NAME,
    ROW_GROUP_DOCS,
    check_shard,
    list_shards,
    prepare,
    shard_name,
    split_shards,
    val_score,
    write_shard,
)
from nanochat.errors import UserError

TXT_DOC_CHARS = 500
N_JSONL = 60
N_PARQUET = 2600


def read_docs(path: Path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


def make_inputs(root: Path) -> Path:
    """A small mixed corpus: prose .txt, a Gutenberg book, jsonl and parquet; every document is unique."""
    src = root / "inputs"
    (src / "books").mkdir(parents=True)
    paragraphs = [f"Paragraph {i} of the essay. " + "Words flow on and on. " * (5 + i % 7) for i in range(120)]
    (src / "essay.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    body = "\n\n".join(f"Chapter {i}. It was a dark and stormy night, number {i}. " * 4 for i in range(40))
    book = (
        "The Project Gutenberg eBook of Storms\n\nThis eBook is for the use of anyone anywhere.\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK STORMS ***\n\n"
        f"{body}\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK STORMS ***\n\n"
        "Updated editions will replace the previous one. START: FULL LICENSE\n"
    )
    (src / "books" / "storms.txt").write_text(book, encoding="utf-8")
    with open(src / "web.jsonl", "w", encoding="utf-8") as f:
        for i in range(N_JSONL):
            row = {"text": f"Web page {i}: how to grow tomatoes, café edition ☕ {i * 7}.", "id": i}
            f.write(json.dumps(row) + "\n")
    rows = [f"Row {i} of a parquet corpus about rivers and {i % 13} bridges." for i in range(N_PARQUET)]
    table = pa.table({"text": rows})
    pq.write_table(table, src / "table.parquet")
    return src


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_inputs(tmp_path)


def run_prepare(inputs, out, **kw) -> dict:
    kw.setdefault("txt_doc_chars", TXT_DOC_CHARS)
    kw.setdefault("val_fraction", 0.05)
    kw.setdefault("show_progress", False)
    return prepare(inputs if isinstance(inputs, list) else [inputs], out, **kw)


def test_layout_row_groups_compression_and_manifest(corpus, tmp_path):
    out = tmp_path / "shards"
    m = run_prepare(corpus, out, shard_chars=80_000)
    files = list_shards(out)
    assert [f.name for f in files] == [shard_name(i) for i in range(len(files))]
    assert m["num_shards"] == len(files) >= 3
    assert m["train"]["shards"] == [f.name for f in files[:-1]] and m["val"]["shards"] == [files[-1].name]
    assert json.loads((out / MANIFEST_NAME).read_text()) == m

    rows = {}
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.schema.to_arrow_schema().names == ["text"]
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        assert all(g.num_rows <= ROW_GROUP_DOCS for g in groups)
        assert all(g.num_rows == ROW_GROUP_DOCS for g in groups[:-1])  # only the tail group is short
        for g in groups:
            col = g.column(0)
            assert col.compression == "ZSTD"
            assert not col.is_stats_set
            assert not col.has_dictionary_page
        rows[f.name] = check_shard(f)
        assert rows[f.name] == meta.num_rows

    assert any(n > ROW_GROUP_DOCS for n in rows.values())  # the row-group check above saw several groups
    assert m["train"]["docs"] == sum(rows[n] for n in m["train"]["shards"])
    assert m["val"]["docs"] == rows[files[-1].name]
    train_docs = [d for f in files[:-1] for d in read_docs(f)]
    assert m["train"]["chars"] == sum(map(len, train_docs))
    assert m["val"]["chars"] == sum(map(len, read_docs(files[-1])))
    # Every train shard but the last closes as soon as it reaches shard_chars.
    for f in files[:-2]:
        sizes = [len(d) for d in read_docs(f)]
        assert sum(sizes) >= 80_000 > sum(sizes) - sizes[-1]


def test_every_document_appears_exactly_once(corpus, tmp_path):
    out = tmp_path / "shards"
    run_prepare(corpus, out, shard_chars=50_000)
    written = [d for f in list_shards(out) for d in read_docs(f)]
    expected = list(iter_documents([corpus], txt_doc_chars=TXT_DOC_CHARS))
    assert len(expected) > N_JSONL + N_PARQUET  # the text files contributed documents too
    assert Counter(written) == Counter(expected)
    assert len(set(written)) == len(written)  # the corpus has no duplicates, so none were introduced


def test_split_follows_the_hash_rule(corpus, tmp_path):
    out = tmp_path / "shards"
    m = run_prepare(corpus, out, val_fraction=0.1)
    train, val = split_shards(list_shards(out))
    val_docs = read_docs(val[0])
    train_docs = [d for f in train for d in read_docs(f)]
    assert all(val_score(d) < 0.1 for d in val_docs)
    assert all(val_score(d) >= 0.1 for d in train_docs)
    assert val_docs == sorted(val_docs, key=val_score)
    assert 0.07 < m["val"]["docs"] / (m["val"]["docs"] + m["train"]["docs"]) < 0.13


def test_deterministic_across_runs(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_prepare(corpus, a, shard_chars=40_000)
    run_prepare(corpus, b, shard_chars=40_000)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) >= 4
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_val_shard_independent_of_input_order_and_seed(corpus, tmp_path):
    parts = [corpus / "web.jsonl", corpus / "table.parquet", corpus / "essay.txt"]
    m1 = run_prepare(parts, tmp_path / "fwd")
    m2 = run_prepare(parts[::-1], tmp_path / "rev")
    m3 = run_prepare(parts, tmp_path / "seed7", seed=7)
    val = [list_shards(tmp_path / d)[-1] for d in ("fwd", "rev", "seed7")]
    assert val[0].read_bytes() == val[1].read_bytes() == val[2].read_bytes()
    assert m1["val"] == m2["val"] == m3["val"]

    def train_docs(d):
        return [x for f in list_shards(tmp_path / d)[:-1] for x in read_docs(f)]

    fwd, seed7 = train_docs("fwd"), train_docs("seed7")
    assert Counter(fwd) == Counter(train_docs("rev")) == Counter(seed7)
    assert fwd != seed7  # the seed does reorder the training documents


def test_gutenberg_boilerplate(corpus, tmp_path):
    run_prepare(corpus / "books", tmp_path / "plain", val_fraction=0.2)
    run_prepare(corpus / "books", tmp_path / "stripped", val_fraction=0.2, gutenberg=True)

    def text(d):
        return "\n".join(x for f in list_shards(tmp_path / d) for x in read_docs(f))

    plain, stripped = text("plain"), text("stripped")
    assert "START OF THE PROJECT GUTENBERG" in plain and "FULL LICENSE" in plain
    for marker in ("PROJECT GUTENBERG", "Project Gutenberg", "FULL LICENSE", "anyone anywhere"):
        assert marker not in stripped
    assert stripped.count("It was a dark and stormy night") == 40 * 4


def test_tiny_inputs(tmp_path):
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "first document"}\n{"text": "second document"}\n', encoding="utf-8")
    m = run_prepare(two, tmp_path / "out", val_fraction=0.01)
    assert (m["train"]["docs"], m["val"]["docs"], m["num_shards"]) == (1, 1, 2)
    # Even a val_fraction near 1 keeps one document for training.
    m = run_prepare(two, tmp_path / "out2", val_fraction=0.999)
    assert (m["train"]["docs"], m["val"]["docs"]) == (1, 1)

    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "lonely document"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="too small"):
        run_prepare(one, tmp_path / "out3")
    assert not (tmp_path / "out3").exists() or not list((tmp_path / "out3").iterdir())


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(UserError, match="val_fraction"):
        run_prepare(corpus, tmp_path / "o", val_fraction=0)
    with pytest.raises(UserError, match="shard_chars"):
        run_prepare(corpus, tmp_path / "o", shard_chars=0)
    with pytest.raises(UserError, match="does not exist"):
        run_prepare(tmp_path / "nope", tmp_path / "o")


def test_refuses_to_overwrite(corpus, tmp_path):
    out = tmp_path / "shards"
    first = run_prepare(corpus, out, shard_chars=30_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=str(out)) as err:
        run_prepare(corpus, out)
    assert "--overwrite" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # A failing input must not cost the old shards either.
    with pytest.raises(UserError):
        run_prepare(tmp_path / "missing", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    second = run_prepare(corpus, out, overwrite=True)  # default shard_chars: one train shard
    assert first["num_shards"] > 2 and second["num_shards"] == 2
    assert [p.name for p in list_shards(out)] == [shard_name(0), shard_name(1)]
    assert json.loads((out / MANIFEST_NAME).read_text()) == second


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / shard_name(0)
    write_shard(path, ["old"])

    def broken_write(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(RuntimeError):
        write_shard(path, ["new"] * 10)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert read_docs(path) == ["old"]


def test_list_shards_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match=str(missing)) as err:
        list_shards(missing)
    assert "download fineweb-edu" in str(err.value) and "prepare" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "shard_00000.parquet.part").write_bytes(b"partial download")
    (empty / ".shard_00000.parquet.abc.tmp").write_bytes(b"partial write")
    with pytest.raises(UserError, match=str(empty)) as err:
        list_shards(empty)
    assert "no .parquet shards" in str(err.value)

    for i in (2, 0, 1):
        write_shard(empty / shard_name(i), [f"doc {i}"])
    files = list_shards(empty)
    assert [f.name for f in files] == [shard_name(i) for i in range(3)]
    assert split_shards(files) == (files[:2], files[2:])


def test_split_shards_needs_two(tmp_path):
    only = tmp_path / shard_name(0)
    write_shard(only, ["a"])
    with pytest.raises(UserError, match=str(only)):
        split_shards([only])
    with pytest.raises(UserError, match="found 0"):
        split_shards([])


def test_check_shard_errors(tmp_path):
    good = tmp_path / "good.parquet"
    write_shard(good, [f"document {i}" for i in range(3000)])
    assert check_shard(good) == 3000

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(UserError, match=str(bad)) as err:
            check_shard(bad)
        assert "delete it" in str(err.value)

    empty = tmp_path / "empty.parquet"
    write_shard(empty, [])
    with pytest.raises(UserError, match="empty shard") as err:
        check_shard(empty)
    assert str(empty) in str(err.value)

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": ["x"]}), other)
    with pytest.raises(UserError, match="no string column 'text'") as err:
        check_shard(other)
    assert str(other) in str(err.value)


def test_cli_prepare(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["prepare", str(corpus), "--out", str(out), "--val-fraction", "0.1", "--shard-chars", "5e4", "--quiet"])
    stdout = capsys.readouterr().out.strip().splitlines()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(stdout) == 1 and str(out) in stdout[0]
    assert f"{manifest['val']['docs']:,} docs" in stdout[0]
    assert manifest["val_fraction"] == 0.1 and manifest["shard_chars"] == 50_000 and manifest["seed"] == 42
    assert len(list_shards(out)) == manifest["num_shards"] > 2

    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(corpus), "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0]


def test_cli_subprocess_errors(tmp_path):
    missing = tmp_path / "no_such_input"
    proc = subprocess.run(
        [sys.executable, "-m", "nanochat.data", "prepare", str(missing), "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


@pytest.mark.real_data
def test_prepare_real_pretrain_text(shared_data, tmp_path):
    src = shared_data / "pretrain_text"
    out = tmp_path / "real"
    m = prepare([src], out, gutenberg=True, shard_chars=20_000_000, show_progress=False)
    files = list_shards(out)
    train, val = split_shards(files)
    assert m["num_shards"] == len(files) >= 4
    rows = [check_shard(f) for f in files]
    assert sum(rows[:-1]) == m["train"]["docs"] and rows[-1] == m["val"]["docs"] > 0
    # ~75 M characters of text (the Gutenberg boilerplate removed).
    assert 60e6 < m["train"]["chars"] + m["val"]["chars"] < 80e6

    lowered_markers = ("start of the project gutenberg", "start of this project gutenberg")
    written: Counter = Counter()
    for f in files:
        pf = pq.ParquetFile(f)
        assert all(pf.metadata.row_group(g).num_rows <= ROW_GROUP_DOCS for g in range(pf.num_row_groups))
        texts = read_docs(f)
        for doc in texts:
            low = doc.lower()
            assert not any(marker in low for marker in lowered_markers), doc[:200]
        written.update(texts)
        if f in train[:-1]:  # full train shards stop at the first document that reaches 20 M chars
            sizes = [len(t) for t in texts]
            assert sum(sizes) >= 20_000_000 > sum(sizes) - sizes[-1]
    assert sum(written.values()) == m["train"]["docs"] + m["val"]["docs"]
    assert written == Counter(iter_documents([src], gutenberg=True))
