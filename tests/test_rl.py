"""RL: advantages and the policy-gradient loss on hand-made rewards, masking of forced tool output, and a tiny
model that learns a reward (answer with the digit 7) in a bounded number of CPU steps through the real stage."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engine import ScriptedModel

from examples.rl_custom_task import PickDigit, shorter_is_better
from nanochat.configs import compose
from nanochat.data.conversations import sft_pair
from nanochat.data.rl_datamodule import PromptGroups
from nanochat.engine.engine import Engine
from nanochat.export import load_export, save_export
from nanochat.models.components import GPT, GPTConfig
from nanochat.models.rl_module import group_advantages, policy_gradient_loss, rollout
from nanochat.stages import run_stage
from nanochat.stages.fit import build


def test_advantages_subtract_the_group_mean_and_optionally_divide_by_its_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    assert group_advantages(r).tolist() == pytest.approx([0.4, -0.6, -0.6, 0.4, 0.4])
    std = math.sqrt(0.24)  # population std of three 1s and two 0s
    assert group_advantages(r, normalize_std=True).tolist() == pytest.approx(
        [0.4 / std, -0.6 / std, -0.6 / std, 0.4 / std, 0.4 / std], rel=1e-3
    )
    for normalize in (False, True):
        assert group_advantages(torch.full((6,), 0.7), normalize).abs().max() == 0


def test_policy_gradient_loss_is_the_advantage_weighted_log_likelihood_of_the_kept_tokens(random_model):
    torch.manual_seed(1)
    inputs = torch.randint(0, 200, (3, 7))
    targets = torch.randint(0, 200, (3, 7))
    targets[0, :3] = -1  # prompt
    targets[2, 5:] = -1  # padding
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss = policy_gradient_loss(random_model, inputs, targets, adv, denominator=4.0)
    logp = F.log_softmax(random_model(inputs), dim=-1)
    expected = 0.0
    for b in range(3):
        for t in range(7):
            if targets[b, t] >= 0:
                expected -= adv[b] * logp[b, t, targets[b, t]]
    kept = int((targets >= 0).sum())
    assert kept == 21 - 3 - 2
    assert loss.item() == pytest.approx(expected.item() / (kept * 4.0), rel=1e-5)


def test_equal_rewards_give_exactly_zero_gradient(random_model):
    inputs = torch.randint(0, 200, (4, 9))
    targets = torch.randint(0, 200, (4, 9))
    for rewards in ([1.0] * 4, [0.0] * 4):
        random_model.zero_grad(set_to_none=True)
        policy_gradient_loss(random_model, inputs, targets, group_advantages(torch.tensor(rewards))).backward()
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in random_model.parameters())
    random_model.zero_grad(set_to_none=True)
    policy_gradient_loss(random_model, inputs, targets, group_advantages(torch.tensor([1.0, 0, 0, 0]))).backward()
    assert random_model.lm_head.weight.grad.abs().max() > 0


def test_rollouts_train_on_sampled_tokens_only_not_the_prompt_or_forced_tool_output(tiny_tokenizer):
    t = tiny_tokenizer.token_id
    call = [t("<|python_start|>"), *tiny_tokenizer.encode("6*7"), t("<|python_end|>")]
    forced = [t("<|output_start|>"), *tiny_tokenizer.encode("42"), t("<|output_end|>")]
    answer = tiny_tokenizer.encode(" #### 42")
    script = call + [0] * len(forced) + answer + [t("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tiny_tokenizer.vocab_size), tiny_tokenizer)
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "6 times 7?"}]})
    sequences, masks, completions = rollout(
        engine, prompt, num_samples=1, chunk=1, max_new_tokens=40, temperature=1.0, top_k=None, seed=0
    )
    generated = call + forced + answer + [t("<|assistant_end|>")]
    assert sequences[0] == prompt + generated  # the stop token is kept: stopping is trained too
    assert masks[0] == [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1] * (len(answer) + 1)
    assert completions[0] == generated[:-1]  # the reward sees the reply without the stop token
    assert tiny_tokenizer.decode(completions[0]).endswith("#### 42")
    # a second, shorter row pads the first chunk: padding is masked like the prompt and forced tokens
    inputs, targets = sft_pair(
        [(sequences[0], masks[0]), (prompt + [t("<|assistant_end|>")], [0] * len(prompt) + [1])],
        pad_id=t("<|assistant_end|>"),
    )
    kept = [(i, int(targets[0, i])) for i in range(targets.size(1)) if targets[0, i] >= 0]
    assert [tok for _, tok in kept] == call + answer + [t("<|assistant_end|>")]
    assert (targets[1] >= 0).sum() == 1
    # the loss does not move when the forced tokens' logits change: they carry no gradient
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    )
    logits = torch.randn(2, inputs.size(1), tiny_tokenizer.vocab_size, requires_grad=True)
    model.forward = lambda x, y, loss_reduction: F.cross_entropy(
        logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction=loss_reduction
    )
    policy_gradient_loss(model, inputs, targets, torch.tensor([1.0, -1.0])).backward()
    rows_with_grad = {(b, i) for b in range(2) for i in range(inputs.size(1)) if logits.grad[b, i].abs().max() > 0}
    assert rows_with_grad == {(0, i) for i, _ in kept} | {(1, i) for i in range(targets.size(1)) if targets[1, i] >= 0}


def test_a_prompt_that_fills_the_context_gets_empty_completions(tiny_tokenizer):
    engine = Engine(ScriptedModel([5], tiny_tokenizer.vocab_size), tiny_tokenizer)
    prompt = list(range(700))  # the scripted model's context is 640
    sequences, masks, completions = rollout(engine, prompt, 3, 2, 16, 1.0, None, seed=0)
    assert completions == [[], [], []] and all(m == [0, 0] for m in masks) and len(sequences) == 3


def test_question_groups_split_over_ranks_and_resume(tiny_tokenizer):
    task = PickDigit(size=12)
    groups = [
        list(PromptGroups(task, tiny_tokenizer, per_step=2, max_tokens=64, rank=r, world_size=2, infinite=False))
        for r in range(2)
    ]
    assert [g["indices"] for g in groups[0]] == [[0, 2], [4, 6], [8, 10]]
    assert [g["indices"] for g in groups[1]] == [[1, 3], [5, 7], [9, 11]]
    from nanochat.data.stream import Position

    state = groups[0][0]["state"]
    resumed = PromptGroups(
        task,
        tiny_tokenizer,
        per_step=2,
        max_tokens=64,
        rank=0,
        world_size=2,
        infinite=False,
        start=Position(state["epoch"], state["round"], state["doc"], state["token"]),
    )
    assert [g["indices"] for g in resumed] == [[4, 6], [8, 10]]


def test_example_task_and_reward_function():
    task = PickDigit(size=20)
    conv = task[4]
    assert conv["messages"][0]["content"] == "Pick a digit." and conv["messages"][1]["content"].isdigit()
    counts = [sum(c["messages"][1]["content"] == str(d) for c in PickDigit(size=400)) for d in range(10)]
    assert min(counts) >= 25  # the reference digits are spread over 0-9, whatever the wording
    assert (
        task.reward(conv, " 7") == 1.0 and task.reward(conv, "77") == pytest.approx(0.2) and task.reward(conv, "3") == 0
    )
    assert task.evaluate(conv, "7") and not task.evaluate(conv, "77")
    assert PickDigit(size=4, split="test")[0]["messages"][0]["content"] == "Name a digit."
    assert shorter_is_better(conv, "") == 1.0 and shorter_is_better(conv, "x" * 50) == 0.5
    from hydra.utils import instantiate

    from nanochat.models.rl_module import reward_name

    partial = instantiate({"_target_": "examples.rl_custom_task.shorter_is_better", "_partial_": True})
    assert partial(conv, "x" * 50) == 0.5 and reward_name(partial) == "shorter_is_better"
    assert reward_name(task.reward) == "PickDigit.reward"


# --- learning: a tiny model picks up the reward through the real stage ----------------------------------------
SEQ = 32


@pytest.fixture(scope="module")
def digit_sft_export(tiny_tokenizer, tmp_path_factory):
    """A tiny chat model that answers 'Pick a digit.' with a digit about uniformly at random (a short SFT in a
    plain loop), so 7 comes about one time in ten before RL."""
    torch.manual_seed(0)
    config = GPTConfig.from_depth(2, tiny_tokenizer.vocab_size, SEQ, aspect_ratio=64, head_dim=64)
    model = GPT(config)
    task = PickDigit(size=400)
    pad = tiny_tokenizer.token_id("<|assistant_end|>")
    inputs, targets = sft_pair([tiny_tokenizer.render_conversation(c) for c in task], pad)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _step in range(100):
        rows = torch.randint(0, len(task), (64,))
        loss = model(inputs[rows], targets[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return save_export(
        model, tiny_tokenizer, tmp_path_factory.mktemp("digit_sft") / "export", {"stage": "sft", "step": 100}
    )


def rl_overrides(init_from, *extra):
    target = "examples.rl_custom_task.PickDigit"
    return [
        "stage=rl",
        "model=d4",
        "trainer=cpu",
        "logger=csv",
        f"init_from={init_from}",
        "run=digits",
        "model.depth=2",
        f"model.sequence_len={SEQ}",
        f"mixture.rl.train=[{{_target_: {target}, size: 512}}]",
        f"mixture.rl.eval=[{{_target_: {target}, size: 32, split: test}}]",
        "mixture.eval=[]",
        "callbacks.chat_eval=null",
        "callbacks.samples=null",
        "budget.rl_questions=4",
        "budget.rl_samples=8",
        "budget.rl_max_new_tokens=4",
        "budget.rl_eval_max_per_task=32",
        "budget.rl_eval_every=0",
        "module.device_batch_size=4",
        *extra,
    ]


def test_rl_raises_the_reward_of_a_tiny_model_within_bounded_cpu_steps(digit_sft_export, precision):
    # lr 0.2 x base instead of the stage's 0.05: a 655K-parameter model tolerates it, and the test stays short
    cfg = compose(
        rl_overrides(
            digit_sft_export, "budget.rl_steps=30", "module.schedule.init_lr_frac=0.2", f"precision={precision}"
        )
    )
    trainer, module, datamodule, _ = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    rewards = [r for _, r in module.reward_history]
    assert len(rewards) == 30
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert start < 0.35 and end > 0.8, rewards  # about 1 in 10 picks 7 before; nearly all do after
    totals = module.rollout_totals
    assert totals["samples"] == 30 * 4 * 8 and totals["passes"] == 30 * 4 * 2
    assert 0 < totals["skipped"] < totals["passes"]  # chunks of all-equal rewards were skipped, the rest trained
    # held-out wordings, 8 samples each at temperature 1: pass@1 before the first step and after the last
    history = next(
        c.evaluator for c in trainer.callbacks if type(getattr(c, "evaluator", None)).__name__ == "PassAtK"
    ).history
    (step0, first), (step1, last) = history[0], history[-1]
    assert (step0, step1) == (0, 30)
    assert first["tasks"][0]["pass"][0] < 0.35 and last["tasks"][0]["pass"][0] > 0.8
    assert last["tasks"][0]["pass"][-1] >= first["tasks"][0]["pass"][-1]  # pass@8 does not fall either
    # the export and the report card carry it
    model, _, meta = load_export(Path(cfg.paths.run_dir))
    assert (
        meta["stage"] == "rl" and meta["parent"]["stage"] == "sft" and meta["metrics"]["chat/pick_digit_pass@1"] > 0.8
    )
    text = (Path(cfg.paths.runs_dir) / "digits" / "report.md").read_text()
    assert "## RL" in text and "pass@k on held-out questions" in text and "- reward: pick_digit.reward" in text
    assert f"- mean reward: {rewards[0]:.4f} (step 1) -> {rewards[-1]:.4f} (step 30)" in text
    assert (Path(cfg.paths.runs_dir) / "digits" / "report" / "rl_curves.png").is_file()
    # stage=eval eval=pass_at_k on the export: the same questions, seeds and metric names as the callback's last run
    target = "examples.rl_custom_task.PickDigit"
    run_stage(
        compose(
            [
                "stage=eval",
                "eval=pass_at_k",
                f"ckpt={cfg.paths.run_dir}",
                "evaluators.pass_at_k.max_per_task=32",
                "evaluators.pass_at_k.max_new_tokens=4",
                f"mixture.rl.eval=[{{_target_: {target}, size: 32, split: test}}]",
                f"precision={precision}",
            ]
        )
    )
    section = json.loads((Path(cfg.paths.runs_dir) / "digits" / "report" / "rl-eval.json").read_text())
    assert section["metrics"] == pytest.approx(last["metrics"], abs=1e-12)


def test_a_resumed_rl_run_ends_with_the_weights_of_an_uninterrupted_one(digit_sft_export, precision):
    def run(name, stop_at=None):
        cfg = compose(
            rl_overrides(
                digit_sft_export,
                f"run={name}",
                "budget.rl_steps=4",
                "logger=none",
                "callbacks.checkpoint.every_n_train_steps=2",
                "budget.rl_eval_max_per_task=4",
                f"precision={precision}",
            )
        )
        trainer, module, datamodule, ckpt = build(cfg)
        if stop_at:
            trainer.fit_loop.epoch_loop.max_steps = stop_at  # as if killed after the checkpoint at stop_at
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        pass_at_k = next(
            c.evaluator for c in trainer.callbacks if type(getattr(c, "evaluator", None)).__name__ == "PassAtK"
        )
        return module, pass_at_k, Path(cfg.paths.run_dir)

    whole, whole_evals, _ = run("whole")
    first, _, run_dir = run("parted", stop_at=2)
    assert first.global_step == 2 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    resumed, evals, _ = run("parted")  # resume=auto: last.ckpt, the same questions and seeds from step 3 on
    assert resumed.global_step == 4
    assert resumed.reward_history == whole.reward_history  # steps 1-2 came back from the checkpoint
    counts = lambda t: {k: v for k, v in t.items() if k != "seconds"}  # noqa: E731
    assert counts(resumed.rollout_totals) == counts(whole.rollout_totals)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the evaluation before RL survives the resume (the report's before/after); step 2's is not repeated
    assert [step for step, _ in evals.history] == [0, 2, 4] and [step for step, _ in whole_evals.history] == [0, 4]
    assert evals.history[0][1]["metrics"] == whole_evals.history[0][1]["metrics"]
    assert evals.history[-1][1]["metrics"] == whole_evals.history[-1][1]["metrics"]


def test_bad_rl_settings_are_one_line(digit_sft_export, stage_error, tmp_path):
    err = stage_error(compose(rl_overrides(digit_sft_export, "budget.rl_samples=1")))
    assert "module.num_samples=1" in err
    chat = tmp_path / "chat.jsonl"  # conversations with nothing to score them by
    chat.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n")
    err = stage_error(
        compose(rl_overrides(digit_sft_export, f"mixture.rl.train=[{{name: custom_json, path: '{chat}'}}]"))
    )
    assert "task 'customjson' has neither `reward` nor `evaluate`" in err
    err = stage_error(compose(rl_overrides(digit_sft_export, "datamodule.reward=3")))
    assert "datamodule.reward must be a callable" in err
    err = stage_error(compose(rl_overrides(digit_sft_export, "budget.rl_questions=0")))
    assert "examples_per_step=0" in err
    broken = "{_target_: builtins.divmod, _partial_: true}"  # (conversation, completion) -> TypeError
    err = stage_error(compose(rl_overrides(digit_sft_export, f"datamodule.reward={broken}")))
    assert err.startswith("error: reward divmod failed on question ") and "TypeError" in err
    nan = "{_target_: math.log, _partial_: true}"  # wrong arity too: any failure is one line naming the reward
    assert "reward log failed" in stage_error(compose(rl_overrides(digit_sft_export, f"datamodule.reward={nan}")))


@pytest.mark.slow
def test_two_ranks_split_the_questions_and_take_the_same_step_as_one_process(digit_sft_export, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    args = rl_overrides(
        digit_sft_export,
        "budget.rl_steps=3",
        "budget.rl_eval_max_per_task=8",
        "callbacks.checkpoint.every_n_train_steps=0",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for ranks in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        out = subprocess.run(
            [
                sys.executable,
                *launcher,
                "train.py",
                *args,
                f"run=ranks{ranks}",
                f"trainer.devices={ranks}",
                "trainer.strategy=" + ("ddp" if ranks > 1 else "auto"),
            ],
            cwd=repo,
            env={**env, "NANOCHAT_BASE_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one, _, meta1 = load_export(tmp_path / "runs" / "ranks1" / "rl")
    two, _, meta2 = load_export(tmp_path / "runs" / "ranks2" / "rl")
    # every question is sampled with the same seeds whichever rank asks it; DDP's gradient mean over 2 ranks of
    # 2 questions each equals one process's mean over 4: the same update, up to float summation order (which AdamW
    # can scale up to ~lr on embedding entries whose gradient is only rounding noise: hence 1e-4, not 1e-6)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
    assert meta2["metrics"]["rl/reward"] == pytest.approx(meta1["metrics"]["rl/reward"])
    assert meta2["metrics"]["chat/pick_digit_pass@1"] == pytest.approx(meta1["metrics"]["chat/pick_digit_pass@1"])
    log0 = (tmp_path / "runs" / "ranks2" / "rl" / "train_rank0.log").read_text()
    assert "step     3/3" in log0
