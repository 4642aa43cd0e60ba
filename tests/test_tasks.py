"""Chat tasks: slicing, mixtures, exact renderings, loaders for hub-format files, errors, and the real data."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.errors import UserError
from nanochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    CustomJSON,
    HumanEval,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    Task,
    TaskMixture,
    TaskSequence,
    build_mixture,
    render_mc,
)


class Numbers(Task):
    def __init__(self, n, tag="n", **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"}, {"role": "assistant", "content": "ok"}]}


def ids(task):
    return [c["messages"][0]["content"] for c in task]


def test_slicing_lengths_and_elements():
    assert len(Numbers(10)) == 10
    assert ids(Numbers(10, start=2, stop=8, step=3)) == ["n2", "n5"]
    assert ids(Numbers(10, start=1, step=4)) == ["n1", "n5", "n9"]
    assert len(Numbers(10, stop=100)) == 10 and len(Numbers(10, start=12, stop=20)) == 0
    assert Numbers(10, start=3)[-1]["messages"][0]["content"] == "n9"
    with pytest.raises(IndexError):
        Numbers(10, start=5)[5]
    with pytest.raises(UserError):
        Numbers(10, step=0)


def test_mixture_deterministic_and_epochs():
    a, b = Numbers(5, "a"), Numbers(3, "b")
    first, again = ids(TaskMixture([a, b], seed=42)), ids(TaskMixture([a, b], seed=42))
    assert first == again and sorted(first) == sorted(ids(a) + ids(b))
    assert ids(TaskMixture([a, b], seed=7)) != first
    twice = ids(TaskMixture([a, a, b]))
    assert len(twice) == 13 and twice.count("a0") == 2 and twice.count("b0") == 1
    assert ids(TaskSequence([a, b])) == ids(a) + ids(b)
    assert ids(TaskMixture([a, b], start=2, stop=4)) == first[2:4]


def test_render_mc_exact():
    text = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert (
        text
        == "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer."
    )


def gsm8k_row():
    return {
        "question": "Tom has 3 bags of 1,000 apples. How many?",
        "answer": "He has 3*1000=<<3*1000=3000>>3000 apples.\n#### 3,000",
    }


def test_gsm8k_parts_and_evaluate(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(gsm8k_row()) + "\n")
    task = GSM8K(path=path)
    conv = task[0]
    assert conv["messages"][0] == {"role": "user", "content": gsm8k_row()["question"]}
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "He has 3*1000="},
        {"type": "python", "text": "3*1000"},
        {"type": "python_output", "text": "3000"},
        {"type": "text", "text": "3000 apples.\n#### 3,000"},
    ]
    assert task.evaluate(conv, "so #### 3000") and task.evaluate(conv, "#### 3,000")
    assert not task.evaluate(conv, "#### 2999") and not task.evaluate(conv, "3000")
    assert task.reward(conv, "#### 3000") == 1.0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_custom_json_errors(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    task = CustomJSON(write_jsonl(tmp_path / "ok.jsonl", [good, good]))
    assert len(task) == 2 and task[1] == {"messages": good}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + "[{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2"):
        CustomJSON(bad)
    swapped = [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    with pytest.raises(UserError, match=r"order\.jsonl line 3.*alternate"):
        CustomJSON(write_jsonl(tmp_path / "order.jsonl", [good, good, swapped]))
    with pytest.raises(UserError, match="alternate"):
        CustomJSON(write_jsonl(tmp_path / "two_users.jsonl", [[good[0], good[0]]]))


def test_unknown_task_name_lists_known():
    with pytest.raises(UserError, match="unknown task 'nope'.*gsm8k.*smoltalk"):
        build_mixture([{"name": "nope"}])


def test_build_mixture_epochs_and_slices(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [gsm8k_row()] * 5)
    mix = build_mixture([{"name": "gsm8k", "split": "train", "path": str(path), "epochs": 3, "stop": 2}], seed=1)
    assert len(mix) == 6


def test_smoltalk_parquet(tmp_path):
    messages = [{"role": "user", "content": f"q{i}"} for i in range(3)]
    rows = [{"messages": [m, {"role": "assistant", "content": "a"}], "source": "s"} for m in messages]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "test-00000-of-00001.parquet")
    train = SmolTalk(split="train", path=tmp_path)
    assert len(train) == 3 and sorted(c["messages"][0]["content"] for c in train) == ["q0", "q1", "q2"]
    assert len(SmolTalk(split="test", path=tmp_path)) == 1
    assert [c["messages"][0]["content"] for c in SmolTalk(path=tmp_path, shuffle_seed=None)] == ["q0", "q1", "q2"]


def test_arc_parquet(tmp_path):
    row = {
        "id": "x",
        "question": "Which is a gas?",
        "choices": {"text": ["rock", "steam", "ice"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "train-00000-of-00001.parquet")
    task = ARC("ARC-Challenge", split="train", path=tmp_path)
    conv = task[0]
    assert conv["messages"][0]["content"] == render_mc("Which is a gas?", ["1", "2", "3"], ["rock", "steam", "ice"])
    assert conv["messages"][1]["content"] == "2" and task.evaluate(conv, "2") and not task.evaluate(conv, "1")
    assert task.eval_type == "categorical"


def test_mmlu_auxiliary_train_parquet(tmp_path):
    rows = [{"question": "Q?", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 3}]
    (tmp_path / "all").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all" / "auxiliary_train-00000-of-00001.parquet")
    task = MMLU(split="auxiliary_train", path=tmp_path)
    conv = task[0]
    assert conv["messages"][0]["content"] == render_mc("Q?", "ABCD", ["a", "b", "c", "d"])
    assert conv["messages"][1]["content"] == "D" and task.evaluate(conv, "D") and not task.evaluate(conv, "A")


def test_no_cache_no_path_error():
    with pytest.raises(UserError, match=r"'openai/gsm8k'.*pass path=.*network"):
        GSM8K(split="train")
    with pytest.raises(UserError, match="does not exist"):
        SmolTalk(path="/nonexistent/smoltalk")


# ---------------------------------------------------------------- real data (../shared/data)


@pytest.mark.real_data
def test_gsm8k_real_every_row(shared_data, tiny_tokenizer):
    import re

    from nanochat.tokenizer.chat_format import render_conversation

    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")]
    task = GSM8K(path=shared_data / "gsm8k" / "train.jsonl", shuffle_seed=None)
    assert len(task) == len(rows) == 7473
    for row, conv in zip(rows, task):
        parts = conv["messages"][1]["content"]
        calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert all(q["type"] == "python_output" for p, q in zip(parts, parts[1:]) if p["type"] == "python")
        annotations = [tuple(a.rsplit("=", 1)) for a in re.findall(r"<<([^>]+)>>", row["answer"])]
        assert calls == annotations
        assert "".join(p["text"] for p in parts if p["type"] == "text") == re.sub(r"<<[^>]+>>", "", row["answer"])
        assert task.evaluate(conv, "#### " + row["answer"].split("#### ")[-1])
        render_conversation(tiny_tokenizer, conv)


@pytest.mark.real_data
def test_mmlu_real_dev(shared_data):
    task = MMLU(split="dev", path=shared_data / "mmlu")
    assert len(task) == 285
    subjects = {task[i]["subject"] for i in range(len(task))}
    assert len(subjects) == 57 and "abstract_algebra" in subjects
    assert all(task[i]["messages"][1]["content"] in "ABCD" for i in range(len(task)))


@pytest.mark.real_data
def test_identity_conversations_real(shared_data, tiny_tokenizer):
    from nanochat.tokenizer.chat_format import render_conversation

    task = CustomJSON(shared_data / "chat_sft" / "nanochat_identity_conversations.jsonl")
    assert len(task) == 1000
    for conv in task:
        render_conversation(tiny_tokenizer, conv)


@pytest.mark.real_data
def test_humaneval_real(shared_data):
    task = HumanEval(path=shared_data / "humaneval" / "HumanEval.jsonl.gz")
    assert len(task) == 164
    conv = task[0]
    assert conv["messages"][1]["content"].startswith(conv["messages"][0]["content"])
    assert conv["task_id"].startswith("HumanEval/") and "def check" in conv["test"] and conv["entry_point"]
    # the sandboxed check: all 164 canonical solutions pass; fenced answers pass too; a wrong body fails
    failed = [
        task[i]["task_id"] for i in range(len(task)) if not task.evaluate(task[i], task[i]["messages"][1]["content"])
    ]
    assert failed == []
    for i in range(0, 164, 41):
        conv = task[i]
        solution = conv["messages"][1]["content"]
        assert task.evaluate(conv, f"Here it is:\n```python\n{solution}\n```\nDone."), conv["task_id"]
        assert not task.evaluate(conv, conv["messages"][0]["content"] + "    return None\n"), conv["task_id"]


@pytest.mark.real_data
def test_spelling_real(shared_data, tiny_tokenizer):
    from nanochat.engine.calculator import calculate
    from nanochat.tasks.base import extract_answer
    from nanochat.tokenizer.chat_format import render_conversation

    words = shared_data / "english_words" / "words_alpha.txt"
    for split in ("train", "test"):
        task = SpellingBee(size=200, split=split, words_path=words)
        for conv in task:
            parts = conv["messages"][1]["content"]
            (call,) = [p["text"] for p in parts if p["type"] == "python"]
            (output,) = [p["text"] for p in parts if p["type"] == "python_output"]
            answer = extract_answer(parts[-1]["text"])
            assert calculate(call) == output == answer
            assert task.evaluate(conv, f"#### {answer}")
            render_conversation(tiny_tokenizer, conv)
    assert SpellingBee(size=5, words_path=words)[3] == SpellingBee(size=5, words_path=words)[3]
    assert SpellingBee(size=5, words_path=words)[0] != SpellingBee(size=5, split="test", words_path=words)[0]
    simple = SimpleSpelling(size=50, words_path=words)
    for conv in simple:
        word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
        assert conv["messages"][1]["content"] == f"{word}:{','.join(word)}" and "\r" not in word
