"""Training tokens/s of PretrainModule under a real lightning.Trainer vs a plain PyTorch loop, side by side.

    python bench/train_step.py [--depths 4 6] [--seq-len 512] [--batch 4] [--steps 10] [--bf16-steps 2] [--repeats 2]
        [--skip-bf16] [--skip-fp32] [--vocab 4096] [--head-dim 128] [--compile] [--device cpu|cuda] [--json PATH]

Both sides train the same GPT (same seed, same config) with the same Muon+AdamW optimizer, the same lr and
momentum schedules and the same pre-tokenized batches (Python stdlib source, a 4,096-token BPE trained at
start-up). The Trainer is configured like conf/trainer/cpu.yaml. Runs alternate (Lightning, plain), (plain,
Lightning), ... so that drift in machine load and cold starts hit both alike; each side's tok/s is the median
over its runs.

Only steady-state steps count: warm-up steps are run but not timed. A step is timed from
`on_train_batch_start` to `on_train_batch_end` (Lightning) or over the same work in the plain loop (slice the
batch, forward, backward, schedule, optimizer step, zero_grad), so Trainer setup and teardown stay out.

The fp32 losses are the held-out loss of each trained model on a batch neither side trained on, computed in
fp32; the math is the same on both sides, so they should agree to float rounding.

bf16 note: Lightning's bf16-mixed wraps the whole manual-optimization `training_step` in autocast; the module
steps its optimizer with autocast disabled (Muon's Newton-Schulz picks its own dtype), so both sides autocast
forward and backward only. `--plain-autocast step` puts the plain loop's optimizer step under autocast too, to
show what that would cost.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from common import markdown_table, save, sync
from torch.utils.data import DataLoader

from nanochat.hardware import peak_flops
from nanochat.models.components import GPT, GPTConfig
from nanochat.models.pretrain_module import PretrainModule
from nanochat.optim import build_optimizer, lr_multiplier, muon_momentum
from nanochat.settings import HorizonConfig, ScheduleConfig
from nanochat.tokenizer import Tokenizer

TOKENIZER_CHARS_PER_TOKEN = 750  # 3 MB of stdlib source for 4,096 merges (24 MB for 32,768): seconds to train
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


# --- data -----------------------------------------------------------------------------------------
def stdlib_texts(max_chars: int) -> list[str]:
    """Python stdlib sources in a fixed (sorted) order, so every run trains on the same text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def make_batches(tokenizer: Tokenizer, texts: list[str], count: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """`count` batches of shape (accum=1, batch, seq_len + 1), cut from consecutive tokens of the texts."""
    need = count * batch * (seq_len + 1)
    ids: list[int] = []
    while len(ids) < need:  # wrap around the texts should a large config ask for more tokens than they hold
        for text in texts:
            ids += tokenizer.encode(text)
            if len(ids) >= need:
                break
    rows = torch.tensor(ids[:need], dtype=torch.long).view(count, 1, batch, seq_len + 1)
    return list(rows.unbind(0))


class FixedBatches(L.LightningDataModule):
    def __init__(self, batches: list[torch.Tensor]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)  # each item already is a whole step's batch


# --- the two implementations ----------------------------------------------------------------------
def gpt_config(args, depth: int) -> GPTConfig:
    return GPTConfig.from_depth(depth, args.vocab, args.seq_len, head_dim=args.head_dim)  # as PretrainModule builds it


class StepTimer(L.Callback):
    """Per-step wall time between the batch hooks: the training step itself, not the Trainer around it."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        self.seconds.append(time.perf_counter() - self._t0)


def run_lightning(args, depth: int, precision: str, batches: list[torch.Tensor], tokenizer_dir: str):
    L.seed_everything(args.seed, verbose=False)
    module = PretrainModule(
        depth=depth,
        tokenizer_dir=tokenizer_dir,
        sequence_len=args.seq_len,
        total_batch_size=args.batch * args.seq_len,  # accum = 1
        horizon=HorizonConfig(num_iterations=len(batches)),  # the plain loop's schedule horizon too
        head_dim=args.head_dim,
        compile=args.compile,
    )
    assert module.config == gpt_config(args, depth), "the two sides must build the same GPT"
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=PRECISIONS[precision],
        max_epochs=-1,
        max_steps=len(batches),
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        use_distributed_sampler=False,
        callbacks=[timer],
        default_root_dir=os.environ["NANOCHAT_BASE_DIR"],
    )
    trainer.fit(module, datamodule=FixedBatches(batches))
    return module.model, timer.seconds, None


def bf16_autocast(device: str) -> torch.autocast:
    return torch.autocast(
        device, dtype=torch.bfloat16, cache_enabled=False
    )  # the arguments Lightning's bf16-mixed uses


def run_plain(args, depth: int, precision: str, batches: list[torch.Tensor]):
    L.seed_everything(args.seed, verbose=False)
    model = GPT.initialised(gpt_config(args, depth), args.device)  # the Lightning side's weights
    opt = build_optimizer(model)
    schedule = ScheduleConfig()
    forward = torch.compile(model) if args.compile else model
    bf16 = precision == "bf16"
    autocast = lambda: bf16_autocast(args.device)  # noqa: E731
    around_step = autocast if bf16 and args.plain_autocast == "step" else contextlib.nullcontext
    around_forward = autocast if bf16 and args.plain_autocast == "forward" else contextlib.nullcontext
    step_seconds, opt_seconds = [], []
    for step, batch in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        with around_step():
            batch = batch.to(args.device)
            x, y = batch[0, :, :-1], batch[0, :, 1:].contiguous()
            with around_forward():
                loss = forward(x, y)
            loss.backward()
            sync()
            t1 = time.perf_counter()
            opt.apply_schedule(lr_multiplier(step, len(batches), schedule), muon_momentum(step, schedule))
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        step_seconds.append(t2 - t0)
        opt_seconds.append(t2 - t1)
    return model, step_seconds, opt_seconds


@torch.no_grad()
def held_out_loss(model: GPT, batch: torch.Tensor) -> float:
    model.eval()
    batch = batch.to(next(model.parameters()).device)
    return float(model(batch[0, :, :-1], batch[0, :, 1:].contiguous()))


# --- measurement ----------------------------------------------------------------------------------
def measure(args, depth: int, precision: str, batches, eval_batch, tokenizer_dir: str) -> dict:
    """Alternate Lightning and plain runs; keep the timed (post-warm-up) steps of each."""
    warmup = args.warmup if precision == "fp32" else args.bf16_warmup
    steps = args.steps if precision == "fp32" else args.bf16_steps
    batches = batches[: warmup + steps]
    tokens_per_step = args.batch * args.seq_len
    runs = []
    for repeat in range(args.repeats):
        # Alternate which side goes first: the first run of a new model size in a process runs cold.
        for impl in ("lightning", "plain") if repeat % 2 == 0 else ("plain", "lightning"):
            if impl == "lightning":
                model, seconds, opt_seconds = run_lightning(args, depth, precision, batches, tokenizer_dir)
            else:
                model, seconds, opt_seconds = run_plain(args, depth, precision, batches)
            timed = seconds[warmup:]
            run = {
                "impl": impl,
                "repeat": repeat,
                "step_seconds": timed,
                "tok_per_s": tokens_per_step * len(timed) / sum(timed),
                "held_out_loss": held_out_loss(model, eval_batch),
            }
            if opt_seconds is not None:
                run["optimizer_share"] = sum(opt_seconds[warmup:]) / sum(timed)
            runs.append(run)
            print(
                f"  d{depth} {precision} {impl} #{repeat}: {run['tok_per_s']:,.0f} tok/s, "
                f"loss {run['held_out_loss']:.6f}",
                file=sys.stderr,
                flush=True,
            )
    return summarize(depth, precision, warmup, steps, runs)


def summarize(depth: int, precision: str, warmup: int, steps: int, runs: list[dict]) -> dict:
    def of(impl, key):
        return [r[key] for r in runs if r["impl"] == impl and key in r]

    plain, lightning = statistics.median(of("plain", "tok_per_s")), statistics.median(of("lightning", "tok_per_s"))
    return {
        "model": f"d{depth}",
        "precision": precision,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "plain_tok_per_s": plain,
        "lightning_tok_per_s": lightning,
        "ratio_lightning_over_plain": lightning / plain,
        "plain_optimizer_share": statistics.median(of("plain", "optimizer_share")),
        # Every run starts from the same seed and batches, so the last run stands for all (the JSON keeps each).
        "loss_plain": of("plain", "held_out_loss")[-1],
        "loss_lightning": of("lightning", "held_out_loss")[-1],
        "runs": runs,
    }


def table(rows: list[dict]) -> str:
    return markdown_table(
        [
            "model",
            "precision",
            "compile",
            "plain tok/s",
            "Lightning tok/s",
            "Lightning / plain",
            "MFU (Lightning)",
            "optimizer share",
            "loss plain",
            "loss Lightning",
        ],
        [
            [
                r["model"],
                r["precision"],
                "yes" if r["compile"] else "no",
                f"{r['plain_tok_per_s']:,.0f}",
                f"{r['lightning_tok_per_s']:,.0f}",
                f"{r['ratio_lightning_over_plain']:.3f}",
                f"{100 * r['mfu_lightning']:.1f} %",
                f"{100 * r['plain_optimizer_share']:.1f} %",
                f"{r['loss_plain']:.6f}",
                f"{r['loss_lightning']:.6f}",
            ]
            for r in rows
        ],
    )


# --- set-up -----------------------------------------------------------------------------------------
def quiet_lightning() -> None:
    # The Trainer's banner lines and the few-workers hint would bury the table; they say nothing about speed.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a deprecation inside Lightning itself


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="device batch (rows per step); accum is 1")
    p.add_argument("--steps", type=int, default=10, help="timed fp32 steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed fp32 steps before the timed ones")
    # Emulated bf16 is ~50-100x slower on CPUs without native bf16, hence the smaller bf16 defaults.
    p.add_argument("--bf16-steps", type=int, default=2, help="timed bf16 steps per run")
    p.add_argument("--bf16-warmup", type=int, default=1, help="untimed bf16 steps before the timed ones")
    p.add_argument("--repeats", type=int, default=2, help="runs of each implementation, interleaved")
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--skip-fp32", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--plain-autocast",
        choices=("forward", "step"),
        default="forward",
        help="bf16: autocast the plain loop's forward only, or its whole step as Lightning does",
    )
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer and model vocabulary")
    p.add_argument("--head-dim", type=int, default=128, help="128 as nanochat's presets; the CPU reference used 64")
    p.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/results/train_step.json")
    args = p.parse_args()
    if args.skip_fp32 and args.skip_bf16:
        p.error("--skip-fp32 and --skip-bf16 leave nothing to measure")
    if min(args.steps, args.bf16_steps, args.repeats) < 1 or min(args.warmup, args.bf16_warmup) < 0:
        p.error("steps and repeats must be >= 1, warm-up steps >= 0")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    quiet_lightning()
    load = os.getloadavg()[0]
    if load > 0.5:
        # Other processes competing for the cores make torch's threads wait on each other: steps were seen
        # to take 10x longer, and unevenly, under load.
        print(f"WARNING: load average {load:.1f} before start; timings will be noisy", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as tmp:
        os.environ["NANOCHAT_BASE_DIR"] = tmp  # nothing of this run lands in ~/.cache/nanochat
        torch.manual_seed(args.seed)
        texts = stdlib_texts(TOKENIZER_CHARS_PER_TOKEN * args.vocab)
        tokenizer = Tokenizer.train(texts, args.vocab, show_progress=False)
        if tokenizer.vocab_size != args.vocab:
            raise SystemExit(f"the stdlib text gave a {tokenizer.vocab_size}-token tokenizer, not {args.vocab}")
        tokenizer_dir = str(tokenizer.save(Path(tmp) / "tokenizer"))
        precisions = ([] if args.skip_fp32 else ["fp32"]) + ([] if args.skip_bf16 else ["bf16"])
        most_steps = max(
            0 if args.skip_fp32 else args.warmup + args.steps,
            0 if args.skip_bf16 else args.bf16_warmup + args.bf16_steps,
        )
        *batches, eval_batch = make_batches(tokenizer, texts, most_steps + 1, args.batch, args.seq_len)
        # PretrainModule's progress log measures the CPU's peak matmul rate once per dtype (for MFU);
        # do it here so that one-off lands in no timed step.
        peaks = {p: peak_flops(args.device, torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
        rows = []
        for depth in args.depths:
            with torch.device("meta"):  # shapes only: a d20 need not be allocated to be counted
                flops_per_token = GPT(gpt_config(args, depth)).flops_per_token()
            for precision in precisions:
                row = measure(args, depth, precision, batches, eval_batch, tokenizer_dir)
                row["compile"] = args.compile
                row["peak_flops"] = peaks[precision]
                row["mfu_lightning"] = row["lightning_tok_per_s"] * flops_per_token / peaks[precision]
                rows.append(row)
    for r in rows:
        if r["precision"] == "fp32" and abs(r["loss_plain"] - r["loss_lightning"]) > 1e-4 * abs(r["loss_plain"]):
            print(f"WARNING: {r['model']} fp32 losses disagree; the bench or the module has a bug", file=sys.stderr)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    save(args.json, table(rows), rows, settings)


if __name__ == "__main__":
    main()
