"""Side by side with karpathy/nanochat on nanochat's own configuration: the same shards, the same token ids, the same
model shape and tokens per step. Base training tok/s, wall time, peak RSS and the val bpb of one common evaluator;
then decoding of the same weights in each engine (prefill, time to first token, tok/s at batch 1 and 8).

    python bench/nanochat_side_by_side.py --nanochat DIR [--work DIR] [--text DIR] [--vocab 32768] [--depth 4]
        [--seq-len 512] [--batch 16] [--steps 60] [--threads 2] [--precision bf16|fp32] [--eval-tokens 65536]
        [--prompt 256] [--new 128] [--repeats 3] [--quiet 0.05] [--ours OVERRIDE ...] [--variant LABEL:OVERRIDES]
        [--baseline CHECKOUT]
        [--skip-train] [--skip-decode] [--json PATH]

`--nanochat` is a checkout of github.com/karpathy/nanochat. Its scripts run from its own directory in their own
processes (its package is also called `nanochat`); nothing of it is imported into this project. Without it the
script prints why it skipped and exits 0.

- Data: `nanochat data prepare TEXT --gutenberg` writes the shards once into WORK/shards; the last shard is the val
  shard for both (nanochat's convention too). nanochat reads them through WORK/nanochat_home/base_data_climbmix.
- Tokenizer: ours, trained once on the train shards (`train_tokenizer`), and the same ranks written as nanochat's
  `tokenizer.pkl` (a pickled tiktoken Encoding) + `token_bytes.pt`, so both train on identical ids.
- Training: nanochat's `scripts/base_train.py` (window pattern L, NANOCHAT_DTYPE=bfloat16|float32) and ours
  (`python -m nanochat train stage=base`, precision=bf16|fp32), depth, head_dim 128, sequence, rows x sequence
  tokens per step (no accumulation), `--steps` steps, no evaluation or sampling during the run, weights saved at the
  end. tok/s is each step's own figure from each program's log (nanochat: tokens / its dt; ours: log_every=1), median
  over steps 11..N. On a shared machine other processes steal cores unevenly: while a run's output is read, the CPU
  time of every process outside the run's process tree is sampled at each line, and steps during which others used
  more than `--quiet` of the CPUs are left out (the table says how many steps counted; all of them when fewer than
  10 were quiet; the all-steps median is shown beside it). Wall is the whole process (start-up and compilation
  included); peak RSS from wait4. The training loss of every step is read from both logs: nanochat logs an EMA of it
  (beta 0.9, debiased), so ours is smoothed the same way and the table shows the first step's, the last step's and
  the largest gap between the two curves. Our 2026 model+recipe (a `--variant`) starts from nanochat's weights (same
  seed, same draws) and reads nanochat's rows (same best-fit packing of the same documents), so its curve is
  nanochat's up to rounding.
- Common evaluator: the first `--eval-tokens` tokens of the val shard, documents BOS-prefixed and concatenated, cut
  into rows of sequence + 1; each trained model scores them in fp32 with `nanochat.eval.bpb.bpb_sums` (nanochat's
  GPT takes the same `model(x, y, loss_reduction="none")` call; the function's file is loaded by path there).
- Decoding: nanochat's trained checkpoint in both engines, the same function: nanochat's Engine on its own GPT, and
  ours on our GPT with the checkpoint imported (`nanochat:<dir>@<step>`, arch=nanochat2026, identical logits). Greedy,
  `--prompt` tokens of val text, `--new` tokens; prefill = one forward of the prompt into an empty KV cache; TTFT =
  from calling each engine's `generate` to its first yield; decode tok/s = rows x steps after the first / their
  time. Best of `--repeats`, both engines in the bench's precision, `--threads` threads. The table also says how
  many of the first batch-1 tokens the two engines agree on (bf16 rounds differently in each).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NANOCHAT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# nanochat's per-step line: "step 00011/00060 (18.33%) | loss: ... | dt: 812.34ms | tok/sec: 10,084 | ..."
NANOCHAT_STEP = re.compile(r"^step (\d+)/(\d+) .*\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)")
# ours: "step     11/60 ( 18.3%) | loss 7.1234 | lrm 1.000 | 10,084 tok/s | mfu ..."
OUR_STEP = re.compile(r"step\s+(\d+)/(\d+) .*\| ([\d,]+) tok/s")
# The training loss of each step: nanochat logs an EMA of it (beta 0.9, debiased), ours the step's own.
NANOCHAT_LOSS = re.compile(r"^step (\d+)/\d+ .*\| loss: ([\d.]+) ")
OUR_LOSS = re.compile(r"step\s+(\d+)/\d+ .*\| loss ([\d.]+) ")
EMA_BETA = 0.9


# --- pieces that need neither program -------------------------------------------------------------
def step_rates(log: str, pattern: re.Pattern, first: int, one_based: bool) -> dict[int, float]:
    """{1-based step: tok/s} of the steps from `first` on, read from a training log."""
    rates = {}
    for line in log.splitlines():
        m = pattern.search(line)
        if m:
            step = int(m.group(1)) + (0 if one_based else 1)
            if step >= first:
                rates[step] = float(m.group(m.lastindex).replace(",", ""))
    return rates


def step_losses(lines: list[str], pattern: re.Pattern, one_based: bool) -> list[float]:
    """The loss each step logged, in step order (steps counted from 1)."""
    found = {}
    for line in lines:
        m = pattern.search(line)
        if m:
            found[int(m.group(1)) + (0 if one_based else 1)] = float(m.group(2))
    return [found[k] for k in sorted(found)]


def smoothed(losses: list[float], beta: float = EMA_BETA) -> list[float]:
    """nanochat's logged training loss: an exponential moving average, divided by 1 - beta^steps."""
    ema, out = 0.0, []
    for step, loss in enumerate(losses, 1):
        ema = beta * ema + (1 - beta) * loss
        out.append(ema / (1 - beta**step))
    return out


def val_rows(texts, tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(rows, seq_len + 1) int64: BOS + document tokens, documents concatenated, cut into rows of seq_len + 1;
    as many rows as `n_tokens` targets need."""
    rows = -(-n_tokens // seq_len)
    need = rows * (seq_len + 1)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, prepend=tokenizer.bos_token_id)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"the val shard holds {len(ids):,} tokens; --eval-tokens asks for {need:,}")
    return torch.tensor(ids[:need], dtype=torch.long).view(rows, seq_len + 1)


def write_nanochat_tokenizer(tokenizer, directory: Path) -> None:
    """Our ranks as nanochat's tokenizer files: the tiktoken Encoding pickled, and each token's byte length."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "tokenizer.pkl", "wb") as f:
        pickle.dump(tokenizer.enc, f)
    torch.save(tokenizer.token_bytes().clone(), directory / "token_bytes.pt")


def bpb_function():
    """`bpb_sums` from our evaluation package, loaded from its file so it runs in a process whose `nanochat` is
    nanochat's: the one function that scores both models."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("common_bpb", REPO / "src" / "nanochat" / "eval" / "bpb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bpb_sums


@torch.no_grad()
def score(model, rows: torch.Tensor, token_bytes: torch.Tensor, batch: int) -> dict:
    """Bits per byte and mean loss of `model` on the rows, fp32, via the shared `bpb_sums`."""
    import math

    bpb_sums = bpb_function()
    sums = torch.zeros(4, dtype=torch.float64)
    for start in range(0, rows.size(0), batch):
        sums += torch.stack([t.double() for t in bpb_sums(model, rows[start : start + batch], token_bytes)])
    nats, nbytes, all_nats, count = sums.tolist()
    return {"bpb": nats / (math.log(2) * nbytes), "loss": all_nats / count, "tokens": int(count)}


def decode_prompt(rows: torch.Tensor, length: int) -> list[int]:
    return rows.flatten()[:length].tolist()


def time_generation(generate, prompt: list[int], rows: int, new: int, repeats: int) -> dict:
    """Best-of-`repeats` TTFT (call to first yield) and decode tok/s (steps after the first) of a generator that
    yields (token per row, mask per row); also the first row's tokens."""
    best = {"ttft_s": float("inf"), "decode_tok_per_s": 0.0, "steps": 0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        stream = generate(prompt, rows, new)
        tokens = [next(stream)[0][0]]
        t1 = time.perf_counter()
        tokens += [column[0] for column, _ in stream]
        steps = len(tokens) - 1
        t2 = time.perf_counter()
        best["ttft_s"] = min(best["ttft_s"], t1 - t0)
        if steps:
            best["decode_tok_per_s"] = max(best["decode_tok_per_s"], rows * steps / (t2 - t1))
        best["steps"] = steps + 1
        best["tokens"] = tokens
    return best


def time_prefill(forward, prompt: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(prompt)
        times.append(time.perf_counter() - t0)
    return min(times)


# --- nanochat's side: run inside its checkout -------------------------------------------------------
def worker(args) -> None:
    """`--worker score|decode|rows`: runs with cwd = the nanochat checkout, whose `nanochat` package this imports."""
    job = json.loads(Path(args.job).read_text())
    sys.path.insert(0, os.getcwd())
    torch.set_num_threads(job["threads"])
    from nanochat.checkpoint_manager import build_model
    from nanochat.common import COMPUTE_DTYPE
    from nanochat.engine import Engine, KVCache

    device = torch.device("cpu")
    if args.worker == "rows":
        from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader
        from nanochat.tokenizer import get_tokenizer

        batches = loader(get_tokenizer(), job["batch"], job["seq_len"], "train", device="cpu")
        torch.save(torch.stack([next(batches)[0].clone() for _ in range(job["count"])]), job["rows_out"])
        Path(job["out"]).write_text("{}")
        return
    if args.worker == "score":
        model, _, _ = build_model(job["checkpoint_dir"], job["step"], device, phase="eval")
        result = score(model, torch.load(job["rows"]), torch.load(job["token_bytes"]), job["batch"])
    else:
        model, tokenizer, _ = build_model(job["checkpoint_dir"], job["step"], device, phase="eval")
        engine = Engine(model, tokenizer)
        m = model.config
        kv = {"num_heads": m.n_kv_head, "head_dim": m.n_embd // m.n_head, "num_layers": m.n_layer}

        @torch.inference_mode()
        def prefill(prompt):
            cache = KVCache(batch_size=1, seq_len=len(prompt), device=device, dtype=COMPUTE_DTYPE, **kv)
            return model.forward(torch.tensor([prompt]), kv_cache=cache)

        def generate(prompt, rows, new):
            return engine.generate(prompt, num_samples=rows, max_tokens=new, temperature=0.0)

        result = decode_results(prefill, generate, job)
        result["compute_dtype"] = str(COMPUTE_DTYPE)
    Path(job["out"]).write_text(json.dumps(result))


def decode_results(prefill, generate, job: dict) -> dict:
    prompt = job["prompt_ids"]
    generate(prompt[:8], 1, 4).__next__()  # first-call costs (allocator, lazy init) outside the timings
    out = {"prefill_s": time_prefill(prefill, prompt, job["repeats"])}
    for rows in (1, 8):
        out[f"batch{rows}"] = time_generation(generate, prompt, rows, job["new"], job["repeats"])
    return out


def run_worker(checkout: Path, kind: str, job: dict, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--job", str(Path(tmp) / "job.json")]
        done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"nanochat {kind} worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(Path(job["out"]).read_text())


# --- the two training runs ------------------------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_ticks() -> int:
    """CPU ticks spent by all processes since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


def tree_ticks(root: int) -> int:
    """CPU ticks of `root` and every process below it (compile workers included)."""
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        total += t if p == root else 0
    return total


def timed_process(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run to completion, its output to `log`; wall seconds, peak RSS (GB) and, per output line, when it appeared
    and how much of the machine other processes used since the previous line (`others`, 0..1 of all CPUs)."""
    lines, samples = [], []
    t0 = time.perf_counter()
    with open(log, "w", buffering=1) as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        mark = (time.perf_counter(), busy_ticks(), tree_ticks(proc.pid))
        for line in proc.stdout:
            out.write(line)
            now = (time.perf_counter(), busy_ticks(), tree_ticks(proc.pid))
            others = max(0, (now[1] - mark[1]) - (now[2] - mark[2])) / CLOCK_TICKS
            samples.append(others / max(now[0] - mark[0], 1e-6) / os.cpu_count())
            lines.append(line)
            mark = now
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); last lines of {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20, "lines": list(zip(lines, samples))}


def quiet_rates(
    lines: list[tuple[str, float]], pattern: re.Pattern, first: int, one_based: bool, threshold: float
) -> dict:
    """Median tok/s of steps `first`.. from a log, over the steps during which other processes used less than
    `threshold` of the machine (all steps when fewer than 10 of them were quiet)."""
    rates, disturbed = {}, {}
    for line, others in lines:
        step = step_rates(line, pattern, first, one_based)
        rates |= step
        disturbed |= {k: others for k in step}
    quiet = {k: v for k, v in rates.items() if disturbed[k] < threshold}
    used = quiet if len(quiet) >= 10 else rates
    return {
        "tok_per_s": statistics.median(used.values()),
        "steps_timed": len(used),
        "steps_quiet": len(quiet),
        "steps": len(rates),
        "tok_per_s_all_steps": statistics.median(rates.values()),
        "others_max": max(disturbed.values()),
        "others_median": statistics.median(disturbed.values()),
    }


def thread_env(threads: int, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


def train_nanochat(args, work: Path, checkout: Path) -> dict:
    home = work / "nanochat_home"
    cmd = [
        sys.executable,
        "-m",
        "scripts.base_train",
        f"--depth={args.depth}",
        "--head-dim=128",
        f"--max-seq-len={args.seq_len}",
        "--window-pattern=L",
        f"--device-batch-size={args.batch}",
        f"--total-batch-size={args.batch * args.seq_len}",
        f"--num-iterations={args.steps}",
        "--eval-every=-1",
        "--core-metric-every=-1",
        "--sample-every=-1",
        "--device-type=cpu",
        "--model-tag=side_by_side",
    ]
    env = thread_env(args.threads, NANOCHAT_BASE_DIR=str(home), NANOCHAT_DTYPE=NANOCHAT_DTYPES[args.precision])
    log = work / f"nanochat_train_{args.precision}.log"
    run = timed_process(cmd, checkout, env, log)
    run["smoothed_losses"] = step_losses([line for line, _ in run["lines"]], NANOCHAT_LOSS, one_based=False)
    rates = quiet_rates(run.pop("lines"), NANOCHAT_STEP, 11, one_based=False, threshold=args.quiet)
    ckpt = home / "base_checkpoints" / "side_by_side"
    job = {
        "checkpoint_dir": str(ckpt),
        "step": args.steps,
        "rows": str(work / "val_rows.pt"),
        "token_bytes": str(home / "tokenizer" / "token_bytes.pt"),
        "batch": args.batch,
        "threads": args.threads,
    }
    scored = run_worker(
        checkout, "score", job, thread_env(args.threads, NANOCHAT_BASE_DIR=str(home), NANOCHAT_DTYPE="float32")
    )
    return {**run, **rates, **scored, "command": " ".join(cmd), "log": str(log)}


def train_ours(args, work: Path, repo: Path = REPO, name: str = "ours", extra: list[str] = ()) -> dict:
    from nanochat.export import load_export

    home = work / f"{name}_home"
    run = f"side_by_side_{args.precision}"
    cmd = [
        sys.executable,
        "-m",
        "nanochat",
        "train",
        "stage=base",
        "data=local",
        f"data.dir={work / 'shards'}",
        f"paths.tokenizer_dir={work / f'tokenizer_{args.vocab}'}",
        f"model.depth={args.depth}",
        f"model.vocab_size={args.vocab}",
        f"model.sequence_len={args.seq_len}",
        f"model.device_batch_size={args.batch}",
        f"model.total_batch_size={args.batch * args.seq_len}",
        f"budget.base_steps={args.steps}",
        "budget.log_every=1",
        f"budget.save_every={args.steps}",
        "~callbacks.val_bpb",
        "~callbacks.samples",
        "~callbacks.core",
        "logger=none",
        "resume=never",
        f"run={run}",
        f"precision={args.precision}",
        *args.ours,
        *extra,
    ]
    env = thread_env(args.threads, NANOCHAT_BASE_DIR=str(home), PYTHONPATH=str(repo / "src"))
    log = work / f"{name}_train_{args.precision}.log"
    out = timed_process(cmd, repo, env, log)
    out["losses"] = step_losses([line for line, _ in out["lines"]], OUR_LOSS, one_based=True)
    out["smoothed_losses"] = smoothed(out["losses"])
    rates = quiet_rates(out.pop("lines"), OUR_STEP, 11, one_based=True, threshold=args.quiet)
    model, tokenizer, _ = load_export(home / "runs" / run / "base")
    rows = torch.load(work / "val_rows.pt")
    scored = score(model, rows, tokenizer.token_bytes(), args.batch)
    return {
        **out,
        **rates,
        **scored,
        "command": " ".join(cmd[1:]),
        "log": str(log),
        "export": str(home / "runs" / run / "base" / "export"),
    }


# --- decoding -------------------------------------------------------------------------------------------
def decode_ours(args, source: str, prompt: list[int]) -> dict:
    from nanochat.engine.engine import Engine
    from nanochat.engine.kv_cache import KVCache
    from nanochat.export import load_export
    from nanochat.precision import computing, resolve

    dtype = resolve(args.precision).dtype
    model, tokenizer, _ = load_export(source, dtype=dtype)
    engine = Engine(model, tokenizer, dtype=dtype)

    @torch.inference_mode()
    def prefill(ids):
        cache = KVCache.for_model(model, 1, len(ids), dtype)
        with computing(model, dtype):
            return model(torch.tensor([ids]), kv_cache=cache, last_only=True)

    def generate(ids, rows, new):
        return engine.generate(ids, num_samples=rows, max_tokens=new, temperature=0.0)

    job = {"prompt_ids": prompt, "repeats": args.repeats, "new": args.new}
    return decode_results(prefill, generate, job)


def decode_side_by_side(args, work: Path, checkout: Path) -> dict:
    """nanochat's trained checkpoint decoded by its Engine and, imported, by ours."""
    rows = torch.load(work / "val_rows.pt")
    prompt = decode_prompt(rows, args.prompt)
    home = work / "nanochat_home"
    ckpt = home / "base_checkpoints" / "side_by_side"
    job = {
        "checkpoint_dir": str(ckpt),
        "step": args.steps,
        "prompt_ids": prompt,
        "repeats": args.repeats,
        "new": args.new,
        "threads": args.threads,
    }
    env = thread_env(args.threads, NANOCHAT_BASE_DIR=str(home), NANOCHAT_DTYPE=NANOCHAT_DTYPES[args.precision])
    theirs = run_worker(checkout, "decode", job, env)
    torch.set_num_threads(args.threads)
    os.environ["NANOCHAT_BASE_DIR"] = str(work / "imports_home")  # where the imported checkpoint is converted to
    ours = decode_ours(args, f"nanochat:{ckpt}@{args.steps}", prompt)
    a, b = theirs["batch1"]["tokens"], ours["batch1"]["tokens"]
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"nanochat": theirs, "ours": ours, "agree": agree}


def same_rows(args, work: Path, checkout: Path, count: int = 70) -> dict:
    """How many of the first `count` training batches nanochat's best-fit loader and our datamodule (packing=bestfit,
    its defaults) build identically from the same shards and token ids (input tokens compared)."""
    from nanochat.data.pretrain_datamodule import PretrainDataModule

    home = work / "nanochat_home"
    out = work / "nanochat_rows.pt"
    job = {"batch": args.batch, "seq_len": args.seq_len, "count": count, "rows_out": str(out), "threads": args.threads}
    run_worker(checkout, "rows", job, thread_env(args.threads, NANOCHAT_BASE_DIR=str(home), NANOCHAT_DTYPE="float32"))
    theirs = torch.load(out)
    dm = PretrainDataModule(
        dir=str(work / "shards"),
        tokenizer_dir=str(work / f"tokenizer_{args.vocab}"),
        sequence_len=args.seq_len,
        device_batch_size=args.batch,
        total_batch_size=args.batch * args.seq_len,
        packing="bestfit",
    )
    dm.setup("fit")
    same = 0
    for raw, want in zip(dm.train_dataloader(), theirs):
        if not torch.equal(dm.on_before_batch_transfer(raw, 0)[0, :, :-1], want):
            break
        same += 1
    return {"batches": count, "identical": same}


# --- set-up and report -----------------------------------------------------------------------------
def prepare(args, work: Path) -> None:
    """Shards, our tokenizer, nanochat's copy of it and its data dir, and the common evaluator's rows (once)."""
    from nanochat.data.documents import iter_documents
    from nanochat.data.shards import list_shards, split_shards
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer.training import train_tokenizer

    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "nanochat",
            "data",
            "prepare",
            str(args.text),
            "--gutenberg",
            "--out",
            str(shards),
            "--quiet",
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    train, val = split_shards(list_shards(shards))
    tok_dir = work / f"tokenizer_{args.vocab}"
    if not (tok_dir / "tokenizer_config.json").is_file():
        train_tokenizer([str(p) for p in train], args.vocab, tok_dir, show_progress=False)
    tokenizer = Tokenizer.load(tok_dir)
    home = work / "nanochat_home"
    write_nanochat_tokenizer(tokenizer, home / "tokenizer")
    data = home / "base_data_climbmix"
    data.mkdir(parents=True, exist_ok=True)
    for shard in [*train, *val]:
        link = data / shard.name
        if not link.exists():
            link.symlink_to(shard.resolve())
    torch.save(
        val_rows(iter_documents([str(p) for p in val]), tokenizer, args.eval_tokens, args.seq_len), work / "val_rows.pt"
    )


def training_table(results: dict) -> str:
    from common import markdown_table

    base = results["nanochat"]["tok_per_s"]
    reference = results["nanochat"].get("smoothed_losses", [])
    rows = []
    for name, r in results.items():
        curve = r.get("smoothed_losses", [])
        gap = max((abs(a - b) for a, b in zip(curve, reference)), default=float("nan"))
        rows.append(
            [
                name,
                f"{r['tok_per_s']:,.0f} ({r['steps_timed']} steps)",
                f"{r['tok_per_s'] / base:.2f}x",
                f"{r['tok_per_s_all_steps']:,.0f}",
                f"{r['wall_s']:.0f} s",
                f"{r['peak_rss_gb']:.2f} GB",
                f"{r['bpb']:.4f}",
                f"{r['loss']:.4f}",
                f"{curve[0]:.6f}" if curve else "",
                f"{curve[-1]:.4f}" if curve else "",
                "" if name == "nanochat" or not curve else f"{gap:.4f}",
            ]
        )
    return markdown_table(
        [
            "run",
            "tok/s (median of quiet steps 11-N)",
            "vs nanochat",
            "tok/s (all steps)",
            "wall",
            "peak RSS",
            "val bpb (common evaluator)",
            "val loss",
            "train loss, step 1",
            "train loss, last step (EMA 0.9)",
            "max gap to nanochat's (EMA)",
        ],
        rows,
    )


def decode_table(results: dict) -> str:
    from common import markdown_table

    rows = []
    for name in ("nanochat", "ours"):
        r = results[name]
        rows.append(
            [
                name,
                f"{1000 * r['prefill_s']:.1f}",
                f"{1000 * r['batch1']['ttft_s']:.1f}",
                f"{r['batch1']['decode_tok_per_s']:,.1f}",
                f"{1000 * r['batch8']['ttft_s']:.1f}",
                f"{r['batch8']['decode_tok_per_s']:,.1f}",
                f"{r['batch1']['steps']} / {r['batch8']['steps']}",
            ]
        )
    base = results["nanochat"]
    rows.append(
        [
            "ours / nanochat",
            f"{base['prefill_s'] / results['ours']['prefill_s']:.2f}x faster",
            "",
            f"{results['ours']['batch1']['decode_tok_per_s'] / base['batch1']['decode_tok_per_s']:.2f}x",
            "",
            f"{results['ours']['batch8']['decode_tok_per_s'] / base['batch8']['decode_tok_per_s']:.2f}x",
            f"first {results['agree']} greedy tokens identical",
        ]
    )
    return markdown_table(
        [
            "engine",
            "prefill (ms)",
            "TTFT b1 (ms)",
            "decode tok/s b1",
            "TTFT b8 (ms)",
            "decode tok/s b8",
            "steps b1 / b8",
        ],
        rows,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", type=Path, help="a checkout of karpathy/nanochat (without it: skip)")
    p.add_argument("--work", type=Path, help="where shards, tokenizer, runs and logs go (default: a temp dir)")
    p.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "pretrain_text")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="rows per step (tokens per step = rows x seq-len)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=NANOCHAT_DTYPES, default="bf16")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument(
        "--quiet",
        type=float,
        default=0.05,
        help="steps during which other processes used more than this share of the CPUs are not counted",
    )
    p.add_argument("--prompt", type=int, default=256, help="decode: prompt tokens")
    p.add_argument("--new", type=int, default=128, help="decode: tokens generated per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ours", nargs="*", default=[], help="extra overrides for our run (e.g. compile=false)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:OVERRIDES",
        help="one more row of ours with these overrides, e.g. 'nanochat's network:arch=nanochat2026 "
        "model.arch.window_pattern=L'",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of this project (e.g. an earlier commit) to train as one more row, same settings",
    )
    p.add_argument("--skip-train", action="store_true", help="decode only, from the runs already in --work")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--json", default="bench/results/nanochat_side_by_side.json")
    p.add_argument("--worker", choices=("score", "decode", "rows"), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.nanochat is None:
        print("skipped: no nanochat checkout given (--nanochat DIR, a checkout of github.com/karpathy/nanochat)")
        return
    if not (args.nanochat / "scripts" / "base_train.py").is_file():
        raise SystemExit(f"{args.nanochat} is not a nanochat checkout (no scripts/base_train.py)")
    sys.path.insert(0, str(REPO / "bench"))
    from common import save

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="nanochat-side-by-side-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    prepare(args, work)
    results, tables = {"rows": same_rows(args, work, args.nanochat)}, []
    record = work / f"train_{args.precision}.json"
    if args.skip_train:
        results["train"] = json.loads(record.read_text())
    else:
        results["train"] = {"nanochat": train_nanochat(args, work, args.nanochat), "ours": train_ours(args, work)}
        for variant in args.variant:
            label, _, overrides = variant.partition(":")
            results["train"][f"ours, {label}"] = train_ours(
                args, work, name=f"variant_{len(results['train'])}", extra=overrides.split()
            )
        if args.baseline:
            rev = (
                subprocess.run(
                    ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
                or args.baseline.name
            )
            results["train"][f"ours @ {rev}"] = train_ours(args, work, args.baseline.resolve(), "baseline")
        record.write_text(json.dumps(results["train"], indent=2))
    tables.append(
        f"Best-fit rows: the first {results['rows']['identical']} of {results['rows']['batches']} training batches "
        "of nanochat's loader and ours (packing=bestfit) are identical.\n\n" + training_table(results["train"])
    )
    if not args.skip_decode:
        results["decode"] = decode_side_by_side(args, work, args.nanochat)
        tables.append(decode_table(results["decode"]))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("worker", "job")}
    settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    save(args.json, "\n\n".join(tables), results, settings)


if __name__ == "__main__":
    main()
