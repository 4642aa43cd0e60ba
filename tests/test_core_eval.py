"""CORE on a hand-made bundle with a scripted model whose preferences are known, and on the real bundle."""

import json
import random
import re

import pytest
import torch
from conftest import MC, SCHEMA, write_core_bundle

from nanochat.errors import DataUnavailable, UserError
from nanochat.eval.core import CoreEval, crop_left, evaluate_core, evaluate_task, scored_spans
from nanochat.tasks.core_bundle import fewshot_examples, load_bundle, read_examples, render_prompts


class WordTokenizer:
    """One token per word with its leading whitespace, so each example's words are its own tokens."""

    bos_token_id = 0

    def __init__(self):
        self.vocab = {"<|bos|>": 0}

    def encode(self, text: str, prepend: int | None = None) -> list[int]:
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\s*\S+|\s+$", text)]
        return ([prepend] if prepend is not None else []) + ids


class Counter:
    n = 0

    def update(self, k: int) -> None:
        self.n += k


class BigramModel(torch.nn.Module):
    """Logits from a table over (previous token -> next token): it prefers exactly the transitions it was given."""

    def __init__(self, vocab: int = 512, rotary_len: int = 10_000):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))
        self.rotary_len = rotary_len

    def prefer(self, tokens: list[int], start: int, end: int) -> None:
        with torch.no_grad():
            for t in range(start, end):
                self.table[tokens[t - 1], tokens[t]] = 10.0

    def forward(self, ids):
        return self.table[ids]


def scripted(bundle, tok, choose) -> BigramModel:
    """A model that prefers option `choose(example)` of every example (and the gold continuation of LM tasks)."""
    model = BigramModel()
    for task in bundle.tasks:
        data = task.examples()
        for i, item in enumerate(data):
            prompts = render_prompts(task.task_type, item, task.delimiter, fewshot_examples(data, i, task.num_fewshot))
            rows, spans = scored_spans(task.task_type, [tok.encode(p, prepend=0) for p in prompts])
            k = 0 if task.task_type == "language_modeling" else choose(item)
            model.prefer(rows[k], *spans[k])
    return model


def test_each_task_type_scores_the_preferred_option(tmp_path):
    bundle = load_bundle(write_core_bundle(tmp_path))
    assert [t.label for t in bundle.tasks] == ["mc", "sch", "lm"] and bundle.missing == ["gone"]
    assert bundle.coverage() == "3 of 22 tasks (missing: gone)"
    tok = WordTokenizer()
    right = evaluate_core(scripted(bundle, tok, lambda item: item["gold"]), tok, bundle)
    assert [r["accuracy"] for r in right["tasks"]] == [1.0, 1.0, 1.0]
    wrong = scripted(
        bundle, tok, lambda item: (item["gold"] + 1) % len(item.get("choices", item.get("context_options")))
    )
    result = evaluate_core(wrong, tok, bundle)
    assert [r["accuracy"] for r in result["tasks"][:2]] == [0.0, 0.0]
    # An untrained model's greedy guess never reproduces a continuation.
    assert evaluate_core(BigramModel(), tok, bundle)["tasks"][2]["accuracy"] == 0.0
    # centered accuracy: (acc - b) / (1 - b) with the bundle's baselines in percent; CORE = their mean
    mc, sch, lm = result["tasks"]
    assert mc["centered"] == pytest.approx((0 - 0.25) / 0.75) and sch["centered"] == pytest.approx(-1.0)
    assert lm["centered"] == pytest.approx(1.0)
    assert result["score"] == pytest.approx((-1 / 3 - 1.0 + 1.0) / 3)
    assert result["metrics"] == {
        "core/score": result["score"],
        "core/mc": mc["centered"],
        "core/sch": -1.0,
        "core/lm": 1.0,
    }


def test_half_right_gives_the_centered_value_in_between(tmp_path):
    bundle = load_bundle(write_core_bundle(tmp_path, missing=False), only=["sch"])
    tok = WordTokenizer()
    model = scripted(bundle, tok, lambda item: item["gold"] if item["continuation"][-2] in "abc" else 1 - item["gold"])
    (row,) = evaluate_core(model, tok, bundle)["tasks"]
    assert row["accuracy"] == 0.5 and row["centered"] == 0.0  # chance on a 2-way task centres to 0
    task = bundle.tasks[0]
    assert task.centered(0.75) == pytest.approx(0.5) and task.centered(1.0) == 1.0


def test_prompts_match_the_reference_templates():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}]
    assert render_prompts("multiple_choice", {"query": "Q2", "choices": ["x", "y"]}, ": ", shots) == [
        "Q1: b\n\nQ2: x",
        "Q1: b\n\nQ2: y",
    ]
    shots = [{"context_options": ["c0", "c1"], "continuation": "k", "gold": 0}]
    assert render_prompts("schema", {"context_options": ["A", "B"], "continuation": "end"}, " ", shots) == [
        "c0 k\n\nA end",
        "c0 k\n\nB end",
    ]
    shots = [{"context": " ctx one ", "continuation": "one"}]
    assert render_prompts(
        "language_modeling", {"context": "ctx two\n", "continuation": "two"}, "\nAnswer: ", shots
    ) == ["ctx one\nAnswer: one\n\nctx two\nAnswer:", "ctx one\nAnswer: one\n\nctx two\nAnswer: two"]


def test_fewshot_and_order_are_deterministic_and_exclude_the_example(tmp_path):
    data = [{"i": i} for i in range(30)]
    for index in (0, 7, 29):
        picked = fewshot_examples(data, index, 10)
        assert picked == fewshot_examples(data, index, 10) and {"i": index} not in picked
        others = [i for i in range(30) if i != index]
        assert [d["i"] for d in picked] == random.Random(1234 + index).sample(others, 10)
    assert sorted(d["i"] for d in fewshot_examples(data[:3], 0, 10)) == [1, 2]  # fewer others than shots: all of them
    bundle = load_bundle(write_core_bundle(tmp_path))
    shuffled = list(MC)
    random.Random(1337).shuffle(shuffled)
    assert bundle.tasks[0].examples() == shuffled and bundle.tasks[0].examples(3) == shuffled[:3]


def test_ranks_split_the_examples_and_their_sum_is_the_whole(tmp_path):
    bundle = load_bundle(write_core_bundle(tmp_path, missing=False))
    tok = WordTokenizer()
    model = scripted(bundle, tok, lambda item: item["gold"] if len(item.get("choices", [])) != 3 else 0)
    for task in bundle.tasks:
        data = task.examples()
        whole, _ = evaluate_task(model, tok, task, data)
        seen = [Counter(), Counter()]
        parts = [evaluate_task(model, tok, task, data, rank=r, world_size=2, progress=seen[r])[0] for r in range(2)]
        assert sum(parts) == pytest.approx(whole)  # each rank's share over the same denominator
        assert [c.n for c in seen] == [(len(data) + 1) // 2, len(data) // 2]


def test_prompts_longer_than_the_model_are_cropped_from_the_left():
    rows, spans = crop_left([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 9]], [(6, 8), (3, 4)], limit=5)
    assert rows == [[0, 4, 5, 6, 7], [0, 1, 2, 9]] and spans == [(3, 5), (3, 4)]
    assert [r[s:e] for r, (s, e) in zip(rows, spans)] == [[6, 7], [9]]  # the scored tokens survive


def test_bad_bundles_are_one_sentence_naming_the_place(tmp_path):
    with pytest.raises(DataUnavailable, match=r"does not exist; fetch it with `nanochat data fetch eval_bundle`"):
        load_bundle(tmp_path / "nope")
    root = write_core_bundle(tmp_path / "b")
    bad = root / "eval_data" / "lang" / "schema.jsonl"
    bad.write_text(json.dumps(SCHEMA[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=re.escape(f"{bad}:2 is not valid JSON")):
        read_examples(bad, "schema")
    bad.write_text(json.dumps(SCHEMA[0]) + "\n" + json.dumps({"context_options": ["a"], "gold": 0}) + "\n")
    with pytest.raises(
        UserError, match=re.escape(f"{bad}:2: a schema example needs the fields context_options, continuation, gold")
    ):
        read_examples(bad, "schema")
    bad.write_text(json.dumps({**SCHEMA[0], "gold": 5}) + "\n")
    with pytest.raises(UserError, match=":1: gold=5 is not an index into its 2 options"):
        read_examples(bad, "schema")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\n")
    with pytest.raises(UserError, match="has no `Random baseline` for CORE task 'sch'"):
        load_bundle(root)
    with pytest.raises(UserError, match=r"CORE tasks \['nonesuch'\] are not in"):
        load_bundle(write_core_bundle(tmp_path / "c"), only=["nonesuch"])


def test_training_callback_without_a_bundle_warns_unless_required(tmp_path, caplog):
    assert CoreEval(str(tmp_path / "none"), required=False).load() is None  # as the training callback has it
    assert "CORE evaluation off" in caplog.text
    with pytest.raises(DataUnavailable):
        CoreEval(str(tmp_path / "none")).load()


@pytest.mark.real_data
def test_real_bundle_lists_18_of_22_tasks_and_every_example_parses(shared_data, tiny_tokenizer):
    bundle = load_bundle(shared_data / "core_eval")
    assert len(bundle.tasks) == 18 and sorted(bundle.missing) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    assert bundle.coverage().startswith("18 of 22 tasks")
    for task in bundle.tasks:
        data = task.examples()
        item = data[0]
        prompts = render_prompts(task.task_type, item, task.delimiter, fewshot_examples(data, 0, task.num_fewshot))
        rows, spans = scored_spans(
            task.task_type, [tiny_tokenizer.encode(p, prepend=tiny_tokenizer.bos_token_id) for p in prompts]
        )
        assert all(0 < s < e <= len(r) for r, (s, e) in zip(rows, spans)), task.label
    baselines = {t.label: t.baseline for t in bundle.tasks}
    assert baselines["arc_easy"] == 25 and baselines["copa"] == 50 and baselines["jeopardy"] == 0
    v1 = {t.label: t.baseline for t in load_bundle(shared_data / "core_eval", "eval_meta_data_v1.csv").tasks}
    assert (baselines["commonsense_qa"], v1["commonsense_qa"]) == (40.3, 20) and v1[
        "bigbench_language_identification"
    ] == 9.1
