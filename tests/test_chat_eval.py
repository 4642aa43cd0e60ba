"""Chat evaluation: categorical scoring from letter logits, generative pass@k, ChatCORE arithmetic, the eval stage."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import dtype_of, write_core_bundle

from nanochat.configs import compose
from nanochat.eval.chat_tasks import categorical_correct, evaluate_chat, sample_passes
from nanochat.models.components import GPT, GPTConfig
from nanochat.stages import run_stage
from nanochat.tasks.base import Task, render_mc
from nanochat.tasks.gsm8k import GSM8K

LETTERS = ("A", "B", "C", "D")


def mc(question: str, gold: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, LETTERS, ["w", "x", "y", "z"])},
            {"role": "assistant", "content": gold},
        ],
        "letters": LETTERS,
    }


class ListTask(Task):
    def __init__(self, conversations, eval_type="categorical"):
        super().__init__()
        self.rows, self.eval_type = conversations, eval_type

    def get_example(self, index):
        return self.rows[index]


class Prefers(torch.nn.Module):
    """Scripted chat model: at every position the same logits, highest for `favourite`, then the letters' order."""

    def __init__(self, vocab: int, scores: dict[int, float]):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            for token, score in scores.items():
                self.logits[token] = score

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1)


def letter_ids(tok):
    return [tok.encode(letter)[0] for letter in LETTERS]


def test_categorical_reads_only_the_letters_logits(tiny_tokenizer):
    a, b, c, d = letter_ids(tiny_tokenizer)
    other = tiny_tokenizer.encode(" the")[0]
    model = Prefers(tiny_tokenizer.vocab_size, {other: 50.0, b: 5.0, a: 1.0})  # a non-letter token is likeliest
    convs = [mc("one?", "B"), mc("two, longer question?", "A"), mc("3", "B"), mc("four", "D")]
    assert categorical_correct(model, tiny_tokenizer, convs) == 2
    task = ListTask(convs)
    result = evaluate_chat(model, tiny_tokenizer, {"mmlu": task, "arc_easy": ListTask([mc("q", "B")] * 3)})
    (m, e) = result["tasks"]
    assert (m["accuracy"], e["accuracy"]) == (0.5, 1.0)
    assert m["centered"] == pytest.approx((0.5 - 0.25) / 0.75) and e["centered"] == 1.0
    assert result["chatcore"] == pytest.approx((1 / 3 + 1.0) / 2) and result["chatcore_tasks"] == ["mmlu", "arc_easy"]
    assert result["metrics"] == {"chat/mmlu": 0.5, "chat/arc_easy": 1.0, "chat/chatcore": result["chatcore"]}
    limited = evaluate_chat(model, tiny_tokenizer, {"mmlu": task}, max_per_task=1)
    assert limited["tasks"][0]["examples"] == 1 and limited["tasks"][0]["accuracy"] == 1.0


def test_categorical_batches_of_padded_prompts_agree_with_one_at_a_time(tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tiny_tokenizer.vocab_size, 256, aspect_ratio=64, head_dim=64)).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a zero head would tie every letter
    convs = [mc("q" * (i + 1) + " what?", LETTERS[i % 4]) for i in range(12)]
    one_by_one = [categorical_correct(model, tiny_tokenizer, [c]) for c in convs]
    assert categorical_correct(model, tiny_tokenizer, convs) == sum(one_by_one)
    ranks = [
        evaluate_chat(model, tiny_tokenizer, {"t": ListTask(convs)}, batch_size=5, rank=r, world_size=2)["tasks"][0]
        for r in range(2)
    ]
    assert sum(r["accuracy"] for r in ranks) * 12 == pytest.approx(sum(one_by_one))


class FakeEngine:
    """Returns canned completions: enough to test pass-if-any-sample and the context budget."""

    def __init__(self, tok, completions, max_context=1000):
        self.tok, self.completions, self.max_context, self.calls = tok, completions, max_context, []

    def generate_batch(self, prompt, num_samples, **kwargs):
        self.calls.append((num_samples, kwargs))
        return [prompt + self.tok.encode(c) for c in self.completions[:num_samples]], None


def test_generative_passes_if_any_sample_has_the_answer(tiny_tokenizer, tmp_path):
    rows = [{"question": "What is 6 * 7?", "answer": "6*7=<<6*7=42>>42\n#### 42"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = GSM8K(split="test", path=tmp_path / "test.jsonl")
    conv = task[0]
    args = dict(max_new_tokens=64, temperature=1.0, top_k=50, seed=0)
    engine = FakeEngine(tiny_tokenizer, ["#### 41", "It is 42.\n#### 42", "#### 4"])
    assert sample_passes(engine, tiny_tokenizer, task, conv, num_samples=3, **args) == [False, True, False]
    assert sample_passes(engine, tiny_tokenizer, task, conv, num_samples=1, **args) == [False]
    assert engine.calls[0] == (3, {"max_tokens": 64, "temperature": 1.0, "top_k": 50, "seed": 0})
    short = FakeEngine(tiny_tokenizer, ["#### 42"], max_context=len(tiny_tokenizer.render_for_completion(conv)) + 5)
    assert sample_passes(short, tiny_tokenizer, task, conv, num_samples=1, **args) == [True]
    assert short.calls[0][1]["max_tokens"] == 5  # what fits in the context, not max_new_tokens
    full = FakeEngine(tiny_tokenizer, ["#### 42"], max_context=3)
    assert sample_passes(full, tiny_tokenizer, task, conv, num_samples=2, **args) == [False, False] and not full.calls


@pytest.mark.parametrize(
    "text,answer",
    [("so #### 1,234 apples", "1234"), ("#### -7.5", "-7.5"), ("no marker 42", None), ("#### 3\n#### 4", "3")],
)
def test_gsm8k_answer_extraction(text, answer):
    from nanochat.tasks.base import extract_answer

    assert extract_answer(text) == answer


# --- the eval stage ----------------------------------------------------------------------------------
@pytest.fixture
def run_export(tiny_tokenizer, tmp_path):
    """A tiny model exported as runs/evalrun/<stage>/export, as a training run leaves it."""
    from nanochat.export import save_export

    def make(stage: str) -> Path:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_depth(2, tiny_tokenizer.vocab_size, 64, aspect_ratio=64, head_dim=64))
        model.init_weights()
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        return save_export(
            model, tiny_tokenizer, tmp_path / "runs" / "evalrun" / stage / "export", {"stage": stage, "step": 3}
        )

    return make


def test_eval_stage_core_matches_the_function_and_writes_the_report(run_export, tmp_path, precision, capsys):
    from nanochat.eval.core import evaluate_core
    from nanochat.export import load_export
    from nanochat.precision import computing
    from nanochat.tasks.core_bundle import load_bundle

    export = run_export("base")
    bundle = write_core_bundle(tmp_path / "bundle")
    run_stage(
        compose(
            [
                "stage=eval",
                f"ckpt={export.parent}",
                f"mixture.core_bundle={bundle}",
                "trainer=cpu",
                f"precision={precision}",
            ]
        )
    )
    assert f"precision: {precision} (precision={precision}" in capsys.readouterr().out
    section = json.loads((tmp_path / "runs" / "evalrun" / "report" / "base-eval.json").read_text())
    model, tok, _ = load_export(export)
    with computing(model, dtype_of(precision)):  # what a trainer in that precision computes during training
        expected = evaluate_core(model, tok, load_bundle(bundle))
    assert section["metrics"] == pytest.approx(expected["metrics"])  # the same names and numbers as the callback's
    assert set(section["metrics"]) == {"core/score", "core/mc", "core/sch", "core/lm"}
    report = (tmp_path / "runs" / "evalrun" / "report.md").read_text()
    assert "## Base model evaluation" in report and "| CORE |" in report and "3 of 22 tasks (missing: gone)" in report


def test_eval_stage_auto_picks_chat_tasks_for_a_chat_model(run_export, tmp_path, tiny_tokenizer, precision):
    export = run_export("sft")
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = f"[{{name: gsm8k, split: test, path: '{tmp_path / 'test.jsonl'}'}}]"
    run_stage(
        compose(
            [
                "stage=eval",
                f"ckpt={export}",
                f"mixture.eval={tasks}",
                "evaluators.chat.max_new_tokens=4",
                "trainer=cpu",
                "mixture.core_bundle=/nonexistent",
                f"precision={precision}",
            ]
        )
    )
    section = json.loads((tmp_path / "runs" / "evalrun" / "report" / "sft-eval.json").read_text())
    assert set(section["metrics"]) == {"chat/gsm8k", "chat/chatcore"}  # CORE skipped for a chat model: no bundle needed
    assert section["metrics"]["chat/gsm8k"] == 0.0 and math.isfinite(section["wall_time_s"])


def test_eval_stage_bad_inputs_are_one_line(run_export, tmp_path, stage_error):
    line = stage_error(compose(["stage=eval", f"ckpt={tmp_path}", "trainer=cpu"]))
    assert str(tmp_path) in line and "holds no exported model" in line
    line = stage_error(compose(["stage=eval", "trainer=cpu"]))
    assert "nanochat eval needs ckpt=" in line
    export = run_export("base")
    line = stage_error(
        compose(
            ["stage=eval", f"ckpt={export}", "eval=core", f"mixture.core_bundle={tmp_path / 'nope'}", "trainer=cpu"]
        )
    )
    assert f"CORE eval bundle {tmp_path / 'nope'} does not exist" in line
    bundle = write_core_bundle(tmp_path / "bundle")
    bad = bundle / "eval_data" / "lm" / "lm.jsonl"
    bad.write_text(bad.read_text() + '{"context": "cut short\n')
    line = stage_error(
        compose(["stage=eval", f"ckpt={export}", "eval=core", f"mixture.core_bundle={bundle}", "trainer=cpu"])
    )
    assert f"{bad}:7 is not valid JSON" in line


def test_eval_task_list_skips_only_optional_entries_without_data(tmp_path, caplog):
    from nanochat.errors import DataUnavailable
    from nanochat.eval.chat_tasks import build_eval_tasks

    rows = [{"question": "q", "answer": "#### 1"}]
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    present = {"name": "gsm8k", "split": "test", "path": str(tmp_path / "test.jsonl"), "label": "gsm8k_local"}
    absent = {"name": "gsm8k", "split": "test", "path": str(tmp_path / "nope")}
    tasks = build_eval_tasks([present, {**absent, "optional": True}])
    assert list(tasks) == ["gsm8k_local"] and len(tasks["gsm8k_local"]) == 1
    assert any("skipping optional task 'gsm8k'" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataUnavailable, match="does not exist"):
        build_eval_tasks([present, absent])
