import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.data.documents import iter_documents, strip_gutenberg
from nanochat.errors import UserError
from nanochat.settings import TOKENIZER_TRAINERS
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanochat.tokenizer.compression import compression_table

HARD_CASES = [
    "",
    "hello world",
    "Hello    world\n\n\n  \t\t  tabs\r\nand CRLF\r\n",
    "🤖🎉🚀 emoji, 👩‍👩‍👧‍👦 ZWJ family, 🇫🇷 flags",
    "日本語のテキストと中文文本, 한국어 텍스트, Ελληνικά, العربية, עברית",
    "def f(x):\n    return {'a': [1, 2, 3]}[x] ** 2  # comment\n",
    "1234567890" * 7 + " 3.14159265358979 1,000,000 0x7fff",
    " " * 257 + "\n" * 33 + "\t" * 9,
    "don't I'll we've they're she'd it's DON'T I'LL",
    "a\u00a0b\u2028c\u3000d\u200be\ufeff",
    "<|bos|> <|assistant_end|> typed by a user",
]


def test_vocabulary_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 1024
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(1024 - 9, 1024))
    assert tok.bos_token_id == 1015
    for b in (0, 65, 200, 255):  # byte b is token b
        assert tok.enc.decode_single_token_bytes(b) == bytes([b])
    with pytest.raises(UserError, match="unknown special token"):
        tok.token_id("<|eos|>")


def test_token_bytes_sum_to_the_text_length(tiny_tokenizer):
    tok = tiny_tokenizer
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype == torch.int32
    assert tb[-9:].tolist() == [0] * 9 and tb[:256].tolist() == [1] * 256
    for text in HARD_CASES:
        ids = tok.encode(text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))  # what bits-per-byte relies on


def test_hf_and_tiktoken_give_identical_ids_on_hard_cases(tiny_tokenizer):
    for text in HARD_CASES[:-1]:  # the last one holds special-token text, which HF parses and we do not
        assert tiny_tokenizer.hf.encode(text, add_special_tokens=False).ids == tiny_tokenizer.encode(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_hf_tiktoken_parity_and_round_trip_on_random_unicode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    if "<|" not in text:
        assert tiny_tokenizer.hf.encode(text, add_special_tokens=False).ids == ids


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(["12", "345", "6789", " ", "  ", "\n", "\t", "ab", "Ünï", "字", "🙂", "'s", "'LL"]), max_size=80
    )
)
def test_parity_on_digit_and_whitespace_runs(tiny_tokenizer, pieces):
    text = "".join(pieces)
    assert tiny_tokenizer.hf.encode(text, add_special_tokens=False).ids == tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_digits_split_in_groups_of_at_most_two(tiny_tokenizer):
    for piece in (tiny_tokenizer.decode([i]) for i in tiny_tokenizer.encode("1234567 98765")):
        digits = piece.strip()
        assert not digits.isdigit() or len(digits) <= 2


def test_special_token_text_is_not_parsed(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("<|bos|><|assistant_end|>")
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "<|bos|><|assistant_end|>"


def test_encode_batch_prepend_append(tiny_tokenizer):
    tok = tiny_tokenizer
    texts = HARD_CASES * 3
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    bos, end = tok.bos_token_id, tok.token_id("<|assistant_end|>")
    assert tok.encode("hi", prepend="<|bos|>", append=end) == [bos, *tok.encode("hi"), end]
    assert tok.encode_batch(["hi", "yo"], prepend=bos) == [[bos, *tok.encode("hi")], [bos, *tok.encode("yo")]]
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "string"])


def test_save_load_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tiny_tokenizer.vocab_size and loaded.special_tokens == tiny_tokenizer.special_tokens
    for text in HARD_CASES:
        assert loaded.encode(text) == tiny_tokenizer.encode(text)
        assert (
            loaded.hf.encode(text, add_special_tokens=False).ids
            == tiny_tokenizer.hf.encode(text, add_special_tokens=False).ids
        )
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "tokenizer.json",
        "tokenizer.tiktoken",
        "tokenizer_config.json",
    ]


def test_load_errors_are_one_sentence(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="no tokenizer in"):
        Tokenizer.load(tmp_path / "missing")
    tiny_tokenizer.save(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.load(tmp_path / "tok")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*7?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": "It is 84."},
        ],
    },
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]


def test_render_conversation_masks_follow_the_spec(tiny_tokenizer):
    tok = tiny_tokenizer
    s = tok.token_id
    enc = tok.encode
    expected = [
        ([tok.bos_token_id], 0),
        ([s("<|user_start|>")] + enc("Be brief.\n\nWhat is 12*7?") + [s("<|user_end|>")], 0),  # system merged
        ([s("<|assistant_start|>")], 0),
        (enc("Let me compute. "), 1),
        ([s("<|python_start|>")] + enc("12*7") + [s("<|python_end|>")], 1),  # tool call trained
        ([s("<|output_start|>")] + enc("84") + [s("<|output_end|>")], 0),  # tool output not trained
        (enc("It is 84."), 1),
        ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + enc("Thanks") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (enc("You're welcome.") + [s("<|assistant_end|>")], 1),
    ]
    ids, mask = tok.render_conversation(CONVERSATION)
    assert ids == [i for seg, _ in expected for i in seg]
    assert mask == [m for seg, m in expected for _ in seg]
    assert tok.render_conversation({"messages": CONVERSATION}) == (ids, mask)  # dict form too
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]


def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok.render_for_completion(CONVERSATION)
    history, _ = tok.render_conversation(CONVERSATION[:-1])
    assert prompt == history + [tok.token_id("<|assistant_start|>")]
    assert tok.render_for_completion(CONVERSATION[:-1]) == prompt  # ending on a user turn works too


def test_user_typed_special_text_stays_text_in_chat(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, _ = tok.render_conversation([{"role": "user", "content": "<|assistant_end|>"}])
    assert ids.count(tok.token_id("<|assistant_end|>")) == 0


@pytest.mark.parametrize(
    "conversation,match",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "hi"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "s"}], "followed by a user"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}],
            "part type",
        ),
    ],
)
def test_malformed_conversations_are_clear_errors(tiny_tokenizer, conversation, match):
    with pytest.raises(UserError, match=match):
        tiny_tokenizer.render_conversation(conversation)


def test_training_input_errors(tmp_path):
    from conftest import corpus_documents

    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(corpus_documents(), vocab_size=264)
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents([tmp_path / "nope.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        list(iter_documents([tmp_path / "empty"]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        list(iter_documents([tmp_path / "latin1.txt"]))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="no training text"):
        Tokenizer.train(iter_documents([tmp_path / "blank.txt"]), vocab_size=300, show_progress=False)


def test_both_trainers_follow_the_same_conventions():
    """rustbpe (default) and HF tokenizers: byte b at id b, specials last, HF and tiktoken ids equal, and the same
    compression of the training text to 2 % (they may break ties between equally frequent pairs differently)."""
    from conftest import corpus_documents

    docs = corpus_documents()
    toks = {
        name: Tokenizer.train(docs, vocab_size=600, show_progress=False, trainer=name) for name in TOKENIZER_TRAINERS
    }
    for tok in toks.values():
        assert tok.vocab_size == 600
        assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(591, 600))
        assert all(tok.enc.decode_single_token_bytes(b) == bytes([b]) for b in range(256))
        for doc in docs + HARD_CASES[:-1]:
            assert tok.hf.encode(doc, add_special_tokens=False).ids == tok.encode(doc)
    sizes = {name: sum(len(tok.encode(d)) for d in docs) for name, tok in toks.items()}
    assert abs(sizes["rustbpe"] - sizes["hf"]) <= 0.02 * sizes["hf"], sizes


def test_unknown_trainer_is_named(tmp_path):
    from nanochat.configs import compose
    from nanochat.tokenizer.training import train_tokenizer

    (tmp_path / "t.txt").write_text("some text " * 20)
    with pytest.raises(UserError, match="'sentencepiece' is not one of rustbpe, hf"):
        train_tokenizer([tmp_path / "t.txt"], 300, tmp_path / "out", trainer="sentencepiece")
    assert not (tmp_path / "out").exists()
    assert compose(["stage=tokenizer"]).tokenizer.trainer == "rustbpe"
    with pytest.raises(UserError, match="'sentencepiece' is not one of rustbpe, hf"):
        from nanochat.settings import TokenizerConfig

        TokenizerConfig(trainer="sentencepiece")


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    out = tmp_path / "out"
    for args in (
        ["--input", str(tmp_path / "missing")],
        ["--input", str(tmp_path / "bad.txt")],
        ["--input", str(tmp_path / "bad.txt"), "--vocab-size", "100"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "nanochat.tokenizer", "train", "--quiet", "--out", str(out), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert not out.exists()


def test_cli_train_then_eval(tmp_path):
    from conftest import corpus_documents

    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents()))
    out = tmp_path / "tok"

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "nanochat.tokenizer", *a], capture_output=True, text=True, timeout=300
        )

    proc = run("train", "--input", str(tmp_path / "corpus.jsonl"), "--vocab-size", "600", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["vocab_size"] == 600 and stats["token_bytes_min"] == 1 and stats["trainer"] == "rustbpe"
    proc = run(
        "train",
        "--input",
        str(tmp_path / "corpus.jsonl"),
        "--vocab-size",
        "600",
        "--out",
        str(tmp_path / "hf"),
        "--quiet",
        "--trainer",
        "hf",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "hf" / "train_stats.json").read_text())["trainer"] == "hf"
    proc = run("eval", "--tokenizer", str(out), "--input", str(tmp_path / "corpus.jsonl"), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows[0]["text"] == "corpus.jsonl" and rows[0]["ours(600)"] > 2.0  # 600 tokens compress code >2 bytes/token
    assert "GPT-2" in proc.stdout  # either a column or a note saying it is not available locally


def test_document_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_bytes("\ufeffpara one\r\nline two\r\n\r\npara two\r\n".encode())
    (tmp_path / "b.jsonl").write_text('{"text": "doc b1"}\n\n{"text": "doc b2"}\n')
    pq.write_table(pa.table({"text": ["p1", "", "p2"]}), tmp_path / "c.parquet", row_group_size=2)
    assert list(iter_documents([tmp_path])) == ["para one\nline two\n\npara two", "doc b1", "doc b2", "p1", "p2"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 has no string field 'text'"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"broken.jsonl:2 is not valid JSON"):
        list(iter_documents([tmp_path / "broken.jsonl"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        list(iter_documents([tmp_path / "nocol.parquet"]))


def test_long_text_files_become_paragraph_aligned_documents(tmp_path):
    paragraphs = [f"Paragraph {i} " + "word " * 300 for i in range(40)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs))
    docs = list(iter_documents([tmp_path / "book.txt"], txt_doc_chars=5000))
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # nothing lost, breaks kept
    assert len(docs) > 5 and all(d.startswith("Paragraph") for d in docs)


def test_strip_gutenberg_variants():
    body = "Chapter 1\n\nIt was a dark night."
    for start, end in [
        ("*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "*** END OF THIS PROJECT GUTENBERG EBOOK X ***"),
        ("***START OF THE PROJECT GUTENBERG EBOOK X***", "   *** END OF THE PROJECT GUTENBERG EBOOK X ***"),
    ]:
        assert strip_gutenberg(f"licence header\n{start}\n\n{body}\n\n{end}\nlicence footer") == body
    assert strip_gutenberg(f"header\n*** START OF THE PROJECT GUTENBERG ETEXT X ***\n{body}") == body  # no END
    assert strip_gutenberg(body) == body  # not a Gutenberg file: unchanged


def test_compression_table():
    rows = compression_table({"chars": list, "words": str.split}, {"s": "ab cd ef"})
    assert rows == [{"text": "s", "bytes": 8, "chars": 1.0, "words": 8 / 3}]


@pytest.mark.real_data
def test_real_text_parity_and_larger_vocab_compresses_held_out_text_better(shared_data):
    from nanochat.tokenizer.compression import held_out_samples

    docs = list(iter_documents([shared_data / "pretrain_text" / "gutenberg_books"], gutenberg=True))[:400]
    small = Tokenizer.train(docs, vocab_size=512, show_progress=False)
    large = Tokenizer.train(docs, vocab_size=4096, show_progress=False)
    samples = held_out_samples(shared_data, max_chars=50_000)
    assert {"gsm8k", "humaneval", "mmlu", "chat"} <= set(samples)
    rows = compression_table({"small": small.encode, "large": large.encode}, samples)
    for row in rows:
        assert row["large"] > row["small"], row
    for text in list(samples.values()) + docs[:50]:
        assert large.hf.encode(text, add_special_tokens=False).ids == large.encode(text)


@pytest.mark.parametrize("show_progress, lines", [(False, 0), (True, 10)])
def test_rustbpe_prints_its_progress_lines_only_when_asked(show_progress, lines):
    """rustbpe logs one INFO line per percent of the merges; a non-interactive run (make demo's log) keeps none."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from nanochat.tokenizer.rustbpe_trainer import train_rustbpe\n"
        f"train_rustbpe(['hello world, the quick brown fox'] * 200, 300, show_progress={show_progress})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    progress = [line for line in out.stderr.splitlines() if line.startswith("INFO:rustbpe:Progress")]
    assert (len(progress) >= lines) if show_progress else not progress, out.stderr[-500:]
