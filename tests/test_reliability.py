"""Faults injected into real training runs: SIGKILL at random moments, kill storms during checkpoint writes,
pre-emption signals, NaN losses, half-swapped exports. Each must leave loadable artifacts and resume exactly."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import AtomicCheckpointIO, latest_checkpoint, readable
from nanochat.configs import compose
from nanochat.errors import NonFiniteError
from nanochat.stages.fit import build

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
SEED = int(os.environ.get("NANOCHAT_FAULT_SEED", time.time_ns() % 100_000))  # printed in failures: rerun with it


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def _launch(overrides: list[str], run: str, record: Path, log: Path, delay: float = 0.05) -> subprocess.Popen:
    args = [
        sys.executable,
        "train.py",
        *overrides,
        f"run={run}",
        "+callbacks.record._target_=fault_helpers.RecordSteps",
        f"+callbacks.record.path={record}",
        f"+callbacks.record.delay={delay}",
    ]
    with open(log, "a") as out:
        return subprocess.Popen(
            args, cwd=REPO, env=_child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _records(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(r[0]), r[1]) for r in rows if len(r) == 2]


def _wait_for_step(proc, record: Path, step: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _records(record)
        if done and done[-1][0] >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"child exited {proc.returncode} before step {step} (seed {SEED}):\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s (seed {SEED})")


def _finish(proc, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, f"(seed {SEED}) child failed:\n{log.read_text()[-3000:]}"


def _assert_same_tensors(a, b, where: str) -> None:
    """Bitwise equality of two nested checkpoint structures (dicts, lists, tensors, numbers)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs (seed {SEED})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def _losses(run_dir: Path) -> list[tuple[int, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


# --- SIGKILL, SIGTERM and SIGUSR1 at random moments, then resume: the same weights, the same data --------------
def test_killed_and_preempted_run_resumes_to_the_bitwise_same_weights_and_data(tiny_run, tmp_path):
    overrides = tiny_run(
        f"budget.base_steps={STEPS}", "budget.save_every=4", "budget.log_every=2", "budget.eval_every=0", "logger=csv"
    )
    home = Path(os.environ["NANOCHAT_BASE_DIR"])
    straight_rec, killed_rec = tmp_path / "straight.txt", tmp_path / "killed.txt"
    straight_log, killed_log = tmp_path / "straight.log", tmp_path / "killed.log"
    straight = _launch(overrides, "straight", straight_rec, straight_log, delay=0.0)

    rng = random.Random(SEED)
    # Three SIGKILLs (anywhere: mid-step, mid-checkpoint, mid-log), then SLURM's SIGTERM and SIGUSR1.
    interruptions = [signal.SIGKILL] * 3 + [signal.SIGTERM, signal.SIGUSR1]
    # From step 5 on, so that every later launch resumes (step 4's checkpoint is written before step 5 is
    # recorded); a kill before the first checkpoint is test_a_run_that_starts_over_drops_what_a_killed_attempt_logged.
    targets = sorted(rng.sample(range(5, STEPS - 3), len(interruptions)))
    last_ckpt = home / "runs" / "killed" / "base" / "checkpoints" / "last.ckpt"
    for signum, target in zip(interruptions, targets):
        proc = _launch(overrides, "killed", killed_rec, killed_log)
        _wait_for_step(proc, killed_rec, target, killed_log)
        time.sleep(rng.uniform(0, 0.06))  # a random moment within the step (each lasts ~0.05 s + its work)
        if signum == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        else:
            os.kill(proc.pid, signum)
            assert proc.wait(timeout=120) == 128 + signum, f"(seed {SEED}) {killed_log.read_text()[-3000:]}"
            stopped_at = _records(killed_rec)[-1][0]
            assert (
                torch.load(last_ckpt, weights_only=False)["global_step"] == stopped_at
            )  # saved at the step it stopped after, not an earlier one
    proc = _launch(overrides, "killed", killed_rec, killed_log)
    _finish(proc, killed_log)
    _finish(straight, straight_log)

    log = killed_log.read_text()
    assert log.count("resuming from") == len(interruptions)
    assert "stopped by SIGTERM" in log and "stopped by SIGUSR1" in log

    # The data: every step's batch equals the uninterrupted run's, including the steps trained twice.
    reference = dict(_records(straight_rec))
    assert sorted(reference) == list(range(1, STEPS + 1))
    seen = _records(killed_rec)
    assert {s for s, _ in seen} == set(reference)
    for step, digest in seen:
        assert digest == reference[step], f"step {step} trained on other data (seed {SEED}, kills at {targets})"

    # The weights and the optimizer state: bitwise.
    runs = home / "runs"
    a = torch.load(runs / "straight" / "base" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(runs / "killed" / "base" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    _assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same_tensors(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert (runs / "straight" / "base" / "export" / "model.safetensors").read_bytes() == (
        runs / "killed" / "base" / "export" / "model.safetensors"
    ).read_bytes()

    # The logger run: each logged step once, the same losses as the uninterrupted run.
    losses = _losses(runs / "killed" / "base")
    assert [s for s, _ in losses] == sorted({s for s, _ in losses})
    assert losses == _losses(runs / "straight" / "base")


def test_a_run_that_starts_over_drops_what_a_killed_attempt_logged(tiny_run):
    from nanochat.stages import run_stage

    cfg = compose(tiny_run("budget.base_steps=4", "budget.eval_every=0", "logger=csv"))
    logs = Path(cfg.paths.run_dir) / "logs"
    logs.mkdir(parents=True)  # what an attempt killed before its first checkpoint leaves behind
    (logs / "metrics.csv").write_text("epoch,step,train/loss\r\n0,2,9.5\r\n0,4,9.")
    run_stage(cfg)
    steps = [s for s, _ in _losses(logs.parent)]
    assert steps == [2, 4] and "9.5" not in (logs / "metrics.csv").read_text()


# --- a kill storm while checkpoints are being written ---------------------------------------------------------
def _checkpoint_writer(directory: Path, checkpoint: dict, io) -> None:
    """What ModelCheckpoint does every `save_every` steps, forever: the step file, last.ckpt, drop the older step."""
    step = 0
    while True:
        step += 1
        checkpoint["global_step"] = step
        io.save_checkpoint(checkpoint, directory / f"step{step:06d}.ckpt")
        io.save_checkpoint(checkpoint, directory / "last.ckpt")
        io.remove_checkpoint(directory / f"step{step - 1:06d}.ckpt")


class _PlainIO(AtomicCheckpointIO):
    """A writer without the temp file and rename: torch.save straight onto the target, as a naive loop would."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        torch.save(checkpoint, path)


def _storm(directory: Path, io, kills: int, rng: random.Random) -> tuple[int, int, int]:
    """(kills that landed mid-write, checkpoint files left, of them unreadable), over `kills` SIGKILLs."""
    from nanochat.models.components import GPT, GPTConfig

    model = GPT(GPTConfig(sequence_len=64, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=256))
    checkpoint = {
        "state_dict": model.state_dict(),
        "optimizer_states": [{"state": {i: {"exp_avg": torch.randn(64, 1024)} for i in range(8)}}],
    }
    mid_write = files = unreadable = 0
    directory.mkdir()
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # a forked writer starts in milliseconds, where a fresh interpreter would take seconds
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork: stay off it
            try:
                _checkpoint_writer(directory, checkpoint, io)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += any(p.name.endswith(".tmp") for p in directory.iterdir())
        for p in directory.glob("*.ckpt"):
            files += 1
            try:
                torch.load(p, weights_only=False)["state_dict"]
            except Exception:
                unreadable += 1
        # The next "run" starts where a resume would: leftovers cleaned, the newest readable checkpoint chosen.
        if io.__class__ is AtomicCheckpointIO:
            found = latest_checkpoint(directory)  # None only when the first write was killed
            assert (found is None and not any(directory.glob("*.ckpt"))) or readable(found)
            assert not any(p.name.endswith(".tmp") for p in directory.iterdir())
    return mid_write, files, unreadable


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the storm forks writer processes")
def test_twenty_sigkills_during_checkpoint_writes_leave_every_checkpoint_loadable(tmp_path, capsys):
    rng = random.Random(SEED)
    mid_write, files, unreadable = _storm(tmp_path / "atomic", AtomicCheckpointIO(), 20, rng)
    assert unreadable == 0, f"{unreadable} of {files} checkpoints unreadable (seed {SEED})"
    assert mid_write >= 10, f"only {mid_write} of 20 kills landed during a write (seed {SEED})"
    # The harness can see corruption: the same storm on a plain torch.save leaves files that do not load.
    plain_mid, plain_files, plain_bad = _storm(tmp_path / "plain", _PlainIO(), 8, rng)
    assert plain_bad >= 1, f"plain torch.save survived 8 kills (seed {SEED}): the storm is not hitting writes"
    with capsys.disabled():
        print(
            f"\n[kill storm, seed {SEED}] atomic: 20 kills, {mid_write} mid-write, {files} files checked, {unreadable} "
            f"unreadable | plain torch.save: 8 kills, {plain_bad} of {plain_files} files unreadable"
        )


def test_resume_skips_an_unreadable_last_checkpoint_and_leftover_temporaries(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, d / "step000004.ckpt")
    (d / "last.ckpt").write_bytes((d / "step000004.ckpt").read_bytes()[:100])  # a torn copy, not from our writer
    (d / ".last.ckpt.abc123.tmp").write_bytes(b"half")
    assert latest_checkpoint(d) == d / "step000004.ckpt"
    assert "resuming from" in caplog.text and not (d / ".last.ckpt.abc123.tmp").exists()
    (d / "step000004.ckpt").write_bytes(b"garbage")
    from nanochat.errors import UserError

    with pytest.raises(UserError, match="no readable checkpoint"):
        latest_checkpoint(d)


# --- numerical faults ------------------------------------------------------------------------------------
def _poison_step(module, trainer, step: int) -> None:
    """Make the loss NaN on the batch that produces optimizer step `step` (1-based), once."""
    fired = []

    def hook(mod, args, output):
        if trainer.global_step == step - 1 and not fired:
            fired.append(True)
            return output * float("nan")
        return None

    # on the last block: the training loss reads lm_head.weight in its fused op, so lm_head's own hooks never fire
    module.model.transformer.h[-1].register_forward_hook(hook)


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_nan_loss_at_step_k_stops_there_and_keeps_the_last_good_checkpoint(tiny_run):
    cfg = compose(tiny_run("budget.base_steps=12", "budget.save_every=3", "budget.eval_every=0"))
    trainer, module, datamodule, ckpt = build(cfg)
    _poison_step(module, trainer, 8)
    with pytest.raises(
        NonFiniteError, match=r"^step 8: the loss is NaN or infinite; stopped before the optimizer step"
    ):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert trainer.global_step == 7
    run_dir = Path(cfg.paths.run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and _all_finite(last["state_dict"])
    assert not (run_dir / "export").exists()  # a stopped run exports nothing
    assert _all_finite(module.model.state_dict())  # the optimizer never applied the NaN


def test_nan_loss_in_skip_mode_skips_that_batch_counts_it_and_finishes(tiny_run, caplog):
    cfg = compose(tiny_run("budget.base_steps=10", "budget.eval_every=0", "module.on_nonfinite=skip", "logger=csv"))
    trainer, module, datamodule, ckpt = build(cfg)
    _poison_step(module, trainer, 4)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert trainer.global_step == 10 and module.stepper.skipped == 1
    assert "step 4: the loss is NaN or infinite; batch skipped (1 so far)" in caplog.text
    run_dir = Path(cfg.paths.run_dir)
    assert _all_finite(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        assert [r["train/nonfinite_skipped"] for r in csv.DictReader(f) if r.get("train/nonfinite_skipped")][
            -1
        ] == "1.0"
    assert module.report_items()["non-finite batches skipped"] == 1


def test_diverged_weights_are_never_written_as_a_checkpoint_or_export(tmp_path, tiny_tokenizer):
    from nanochat.export import save_export
    from nanochat.models.components import GPT, GPTConfig

    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    )
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": model.state_dict(), "global_step": 1}, tmp_path / "last.ckpt")
    save_export(model, tiny_tokenizer, tmp_path / "export")
    before = (tmp_path / "last.ckpt").read_bytes(), (tmp_path / "export" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="transformer.h.0.mlp.c_fc.weight"):
        io.save_checkpoint({"state_dict": model.state_dict(), "global_step": 2}, tmp_path / "last.ckpt")
    with pytest.raises(NonFiniteError, match="refusing to export"):
        save_export(model, tiny_tokenizer, tmp_path / "export")
    assert ((tmp_path / "last.ckpt").read_bytes(), (tmp_path / "export" / "model.safetensors").read_bytes()) == before


def test_export_swap_interrupted_between_renames_is_recovered(tmp_path, tiny_tokenizer):
    from nanochat.export import load_export, save_export
    from nanochat.models.components import GPT, GPTConfig

    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    )
    out = save_export(model, tiny_tokenizer, tmp_path / "export", {"step": 1})
    os.replace(out, tmp_path / "export.old")  # a kill after the first rename of the swap
    (tmp_path / "export.partial").mkdir()
    _, _, meta = load_export(tmp_path)
    assert meta["step"] == 1 and (tmp_path / "export" / "model.safetensors").is_file()
    save_export(model, tiny_tokenizer, tmp_path / "export", {"step": 2})
    assert load_export(tmp_path)[2]["step"] == 2
    assert not (tmp_path / "export.partial").exists() and not (tmp_path / "export.old").exists()
