"""The built-in starter data (data=builtin, mixture=builtin): generated text, word list and conversation tasks."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import dtype_of
from omegaconf import OmegaConf

from nanochat.configs import compose
from nanochat.data import builtin
from nanochat.engine.calculator import calculate
from nanochat.stages import run_stage
from nanochat.tasks.arithmetic import Arithmetic, ArithmeticChoice
from nanochat.tasks.identity import Identity
from nanochat.tasks.registry import build_mixture
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data dir whose builtin/ holds the full generated corpus and word list (generated once: a few seconds)."""
    data = tmp_path_factory.mktemp("data")
    builtin.ensure_words(data / "builtin")
    return data


def corpus_path(data_dir):
    return data_dir / "builtin" / builtin.CORPUS_NAME


def tiny_documents():
    return ["the brown dog\n" * 3, "Module demo\n\nthe quick fox sleeps"]


# --- the corpus ------------------------------------------------------------------------------------
def test_corpus_is_python_documentation_of_useful_size(data_dir):
    docs = [json.loads(line)["text"] for line in corpus_path(data_dir).read_text(encoding="utf-8").splitlines()]
    chars = sum(map(len, docs))
    assert len(docs) > 500 and chars > 2_000_000, (len(docs), chars)
    assert all(d.strip() for d in docs)
    text = "\n".join(docs)
    assert "Python language reference: with" in text  # pydoc_data topics
    assert "Module json" in text and "json.dumps(obj" in text  # docstrings with signatures, parsed from source
    assert "Comments in the source of" in text
    # Sources are parsed, never imported: these two print or open a browser on import.
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_corpus_is_deterministic(data_dir, tmp_path):
    # Another process with another hash seed: no set or dict order may leak into the text.
    code = f"from nanochat.data.builtin import ensure_corpus; ensure_corpus({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert (tmp_path / builtin.CORPUS_NAME).read_bytes() == corpus_path(data_dir).read_bytes()


def test_corpus_is_written_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "documents", tiny_documents)
    path = builtin.ensure_corpus(tmp_path)
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(builtin, "documents", lambda: pytest.fail("regenerated an existing corpus"))
    assert builtin.ensure_corpus(tmp_path) == path and path.stat().st_mtime_ns == before

    # A write that dies before its rename leaves neither a corpus nor a half-written file behind.
    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(builtin, "documents", tiny_documents)
    monkeypatch.setattr(os, "fsync", disk_full)
    other = tmp_path / "other"
    with pytest.raises(OSError, match="disk full"):
        builtin.ensure_corpus(other)
    assert not [p for p in other.rglob("*") if p.is_file()]


def test_word_list_is_lowercase_words_of_the_corpus(data_dir):
    words = (data_dir / "builtin" / builtin.WORDS_NAME).read_text(encoding="utf-8").split()
    assert 2000 <= len(words) <= builtin.MAX_WORDS
    assert words == sorted(set(words)) and all(re.fullmatch(r"[a-z]{3,14}", w) for w in words)
    assert {"function", "return", "module", "string"} <= set(words)


def test_compose_writes_nothing(tmp_path):
    cfg = compose(["stage=sft", "data=builtin", "mixture=builtin", f"paths.base_dir={tmp_path / 'home'}"])
    OmegaConf.resolve(cfg)
    assert cfg.data.source == f"builtin:{tmp_path / 'home' / 'data' / 'builtin'}"
    assert not (tmp_path / "home").exists()


def test_tokenizer_stage_prepares_builtin_shards(data_dir, tmp_path):
    from nanochat.tokenizer import Tokenizer

    corpus_mtime = corpus_path(data_dir).stat().st_mtime_ns
    cfg = compose(
        [
            "stage=tokenizer",
            "data=builtin",
            f"paths.data_dir={data_dir}",
            f"paths.tokenizer_dir={tmp_path / 'tok'}",
            "model.vocab_size=512",
            "tokenizer.max_chars=300000",
            "tokenizer.progress=false",
            "logger=none",
        ]
    )
    run_stage(cfg)
    shards = data_dir / "builtin" / "shards"
    assert (shards / "manifest.json").is_file() and len(list(shards.glob("*.parquet"))) >= 2
    assert corpus_path(data_dir).stat().st_mtime_ns == corpus_mtime  # reused, not regenerated
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 512 and tok.decode(tok.encode("Return the value.")) == "Return the value."


# --- spelling on the built-in words -----------------------------------------------------------------
def test_spelling_tasks_read_the_builtin_words(data_dir):
    spec = f"builtin:{data_dir / 'builtin'}"
    words = set((data_dir / "builtin" / builtin.WORDS_NAME).read_text(encoding="utf-8").split())
    for task in (SpellingBee(size=20, split="test", words_path=spec), SimpleSpelling(size=20, words_path=spec)):
        assert set(task.words) == words
        for conversation in task:
            reference = conversation["messages"][-1]["content"]
            reference = reference if isinstance(reference, str) else reference[-1]["text"]
            assert task.evaluate(conversation, reference)
            assert not task.evaluate(conversation, "#### 99" if isinstance(task, SpellingBee) else "x:x")


def test_builtin_words_are_derived_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "documents", tiny_documents)
    task = SimpleSpelling(size=5, words_path=f"builtin:{tmp_path}")
    assert set(task.words) == {"the", "brown", "dog"}  # the words seen at least 3 times
    assert (tmp_path / builtin.WORDS_NAME).is_file() and (tmp_path / builtin.CORPUS_NAME).is_file()


# --- arithmetic ----------------------------------------------------------------------------------------
def tool_calls(conversation):
    parts = conversation["messages"][-1]["content"]
    return [(p["text"], out["text"]) for p, out in zip(parts, parts[1:]) if p["type"] == "python"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_arithmetic_answers_check_out_with_the_calculator(split):
    task = Arithmetic(size=300, split=split)
    for conversation in task:
        calls = tool_calls(conversation)
        assert calls, conversation
        for expr, result in calls:
            assert calculate(expr) == result, (expr, result)
        final = conversation["messages"][-1]["content"][-1]["text"]
        answer = int(re.search(r"#### (\d+)$", final).group(1))
        assert answer == int(calls[-1][1])
        assert (
            task.evaluate(conversation, f"so the answer is\n#### {answer}") and task.reward(conversation, final) == 1.0
        )
        assert not task.evaluate(conversation, f"#### {answer + 1}") and task.reward(conversation, "no idea") == 0.0


def test_arithmetic_is_deterministic_and_splits_are_disjoint():
    assert list(Arithmetic(size=50)) == list(Arithmetic(size=50))
    train = {c["messages"][0]["content"] for c in Arithmetic(size=2000)}
    test = {c["messages"][0]["content"] for c in Arithmetic(size=500, split="test")}
    assert len(test) > 450 and not train & test
    choice_train = {c["messages"][0]["content"] for c in ArithmeticChoice(size=1000)}
    assert not choice_train & {c["messages"][0]["content"] for c in ArithmeticChoice(size=300, split="test")}


def test_arithmetic_renders_with_calculator_tool_calls(tiny_tokenizer):
    conversation = Arithmetic(size=1)[0]
    ids, mask = tiny_tokenizer.render_conversation(conversation)
    special = {
        name: tiny_tokenizer.token_id(name)
        for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
    }
    calls = tool_calls(conversation)
    assert ids.count(special["<|python_start|>"]) == len(calls) == ids.count(special["<|output_start|>"])
    # The calculator's output is forced at inference, so it is never trained on; the expression is.
    start, end = ids.index(special["<|output_start|>"]), ids.index(special["<|output_end|>"])
    assert set(mask[start : end + 1]) == {0}
    assert tiny_tokenizer.decode(ids[start + 1 : end]) == calls[0][1]
    assert mask[ids.index(special["<|python_start|>"]) + 1] == 1


def test_arithmetic_choice_is_categorical_with_the_right_letter(tiny_tokenizer):
    task = ArithmeticChoice(size=50, split="test")
    assert task.eval_type == "categorical"
    for conversation in task:
        prompt, gold = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
        expr = re.search(r"What is (\d+ [-+*] \d+)\?", prompt).group(1)
        assert f"- {calculate(expr)}={gold}\n" in prompt
        assert task.evaluate(conversation, gold) and not task.evaluate(conversation, "ABCD".replace(gold, "")[0])
        tiny_tokenizer.render_conversation(conversation)


# --- identity ------------------------------------------------------------------------------------------
def test_identity_conversations(tiny_tokenizer):
    task = Identity(size=200)
    conversations = list(task)
    assert conversations == list(Identity(size=200))
    assert any(len(c["messages"]) > 2 for c in conversations) and any(len(c["messages"]) == 2 for c in conversations)
    assert len({json.dumps(c) for c in conversations}) > 150
    for c in conversations:
        tiny_tokenizer.render_conversation(c)  # roles alternate, starting with the user
    replies = " ".join(m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant")
    assert "nanochat" in replies and "calculator" in replies and "mistakes" in replies


# --- mixture=builtin ----------------------------------------------------------------------------------
def test_builtin_mixture_builds_every_list(data_dir, caplog):
    from nanochat.eval.chat_tasks import build_eval_tasks
    from nanochat.eval.core import CoreEval

    cfg = compose(["stage=sft", "mixture=builtin", f"paths.data_dir={data_dir}"])
    mixture = OmegaConf.to_container(cfg.mixture, resolve=True)
    assert mixture["offline"] is True
    sizes = {
        f"{stage}.{part}": len(build_mixture(mixture[stage][part]))
        for stage in ("mid", "sft", "rl")
        for part in mixture[stage]
    }
    assert 3000 <= sizes["mid.train"] <= 8000 and 1000 <= sizes["sft.train"] <= 2500, sizes
    assert all(n > 0 for n in sizes.values()), sizes
    eval_tasks = build_eval_tasks(mixture["eval"])
    assert {"arithmetic", "spelling_bee", "arithmetic_choice"} <= set(eval_tasks)
    # No CORE offline: the bundle path does not exist and CORE switches itself off with a warning.
    with caplog.at_level(logging.WARNING):
        assert CoreEval(bundle_dir=mixture["core_bundle"], required=False).load() is None
    assert any("CORE evaluation off" in r.getMessage() for r in caplog.records)


def test_chat_eval_scores_builtin_tasks(random_model, tiny_tokenizer, precision):
    from nanochat.eval.chat_tasks import chat_table, evaluate_chat
    from nanochat.precision import computing

    tasks = {
        "arithmetic": Arithmetic(size=2, split="test"),
        "arithmetic_choice": ArithmeticChoice(size=4, split="test"),
    }
    with computing(random_model, dtype_of(precision)):  # as a trainer or the eval stage in that precision
        result = evaluate_chat(random_model, tiny_tokenizer, tasks, max_new_tokens=4)
    assert {"chat/arithmetic", "chat/arithmetic_choice", "chat/chatcore"} <= set(result["metrics"])
    assert chat_table(result)["rows"]
