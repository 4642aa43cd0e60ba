"""Tokens/s of the real pretraining stream in one process, against the tokens/s one GPU consumes at d20.

    python bench/data_stream.py [--workers 0 1] [--seconds 6] [--warmup 2] [--vocab-size 32768]
                                [--tokenizer-chars 5e6] [--tokenizer DIR] [--text DIR] [--text-chars 30e6]
                                [--json bench/results/data_stream.json]

The code path is training's: the datamodule config is composed the way `train.py stage=base data=local
trainer=8xh100 model=d20` composes it (nanochat.configs.compose), `PretrainDataModule.prepare_data` turns
../shared/data/pretrain_text into parquet shards (in a temp dir; generated text when that folder is absent, and
the output says so), `stage=tokenizer`'s own trainer (nanochat.tokenizer.__main__.cmd_train) fits the BPE on the
training shards, and `setup` + `train_dataloader` yield the packed (rows, T + 1) batches that training_step gets.
`model.total_batch_size` is set to one micro-batch (32 x 2048), i.e. one rank of an 8-GPU run: 32 rows a batch.

Measured per process: for `num_workers=0` the main process reads, tokenizes and packs; for `num_workers=1` (the
default of trainer=1xgpu / 8xh100) one DataLoader worker does, and the main process only receives. Each run
discards `warmup` batches (opening files, the first thread pool) and then counts the tokens in the batches for
`seconds`. Tokens are every token of a (rows, T + 1) batch; training consumes rows x T of them, 1/(T+1) fewer.
"CPU cores busy" is the CPU time of the main process and its workers (all threads, from /proc) over the wall time;
"tok per CPU-second" is the figure that carries over to a node where the reader has cores of its own (on a shared
machine the wall-clock figures swing with the others' load).

The GPU side: `GPT.flops_per_token()` of `GPTConfig.from_depth(20, 65536, 2048)` (built on the meta device), H100
bf16 peak from nanochat.hardware.GPU_PEAK_BF16, at 50 % MFU and at the ~59 % nanochat's d20 speedrun reaches
(reference spec: 0.98M tok/s on 8 GPUs). Headroom = stream tok/s / GPU tok/s; the issue's bar is >= 3x per rank.

Then a profile of the stream's stages on the same shards, each timed alone with the stream's own code:
parquet read (`TokenStream._read_unit`), tokenize (`Tokenizer.encode_batch` in batches of 128 with the configured
threads, and with 1 thread), and packing (`pack_rows` on the already-tokenized documents, tensor included).
Each stage's capacity in tok/s says which one bounds the stream.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import markdown_table, save

DEPTH, GPU_VOCAB, GPU_SEQ = 20, 65536, 2048  # the d20 speedrun model
MFUS = (("50 %", 0.50), ("59 % (nanochat d20)", 0.59))
HEADROOM_BAR = 3.0
GPU_NAME = "H100"  # SXM row of nanochat.hardware.GPU_PEAK_BF16

WORDS_TEXT = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if more no out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three river mountain science history question answer number water light energy system theory"
)
WORDS = WORDS_TEXT.split()


# --- text -----------------------------------------------------------------------------------------
def generated_documents(chars: int, seed: int = 0) -> list[str]:
    """Pseudo-English documents (Zipf-weighted words, sentences, paragraphs, a few numbers) totalling >= `chars`."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    docs, total = [], 0
    while total < chars:
        paragraphs = []
        for _ in range(rng.randint(1, 6)):
            sentences = []
            for _ in range(rng.randint(2, 8)):
                words = rng.choices(WORDS, weights, k=rng.randint(5, 25))
                if rng.random() < 0.2:
                    words.insert(rng.randrange(len(words)), str(rng.randint(0, 3000)))
                sentences.append(" ".join(words).capitalize() + rng.choice(".....!?"))
            paragraphs.append(" ".join(sentences))
        doc = "\n\n".join(paragraphs)
        docs.append(doc)
        total += len(doc)
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def pick_files(text_dir: Path, max_bytes: int) -> list[Path]:
    """Files of the text folder up to ~`max_bytes`: web and small files first (a mix), then books in sorted order."""
    from nanochat.data.documents import list_files

    files = sorted(list_files([text_dir]), key=lambda f: ("gutenberg" in f.parts[-2], f))
    picked, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        picked.append(f)
        total += f.stat().st_size
    return picked


def text_source(text_dir: Path | None, work: Path, chars: int) -> tuple[list[str], str]:
    """(sources for data.source, a line saying what they are): ~`chars` of the real text folder when present,
    else as much generated text."""
    if text_dir is not None and text_dir.is_dir():
        files = pick_files(text_dir, chars)
        mb = sum(f.stat().st_size for f in files) / 1e6
        return [str(f) for f in files], f"real text: {len(files)} files ({mb:.1f} MB) of {text_dir}"
    path = write_jsonl(work / "generated" / "text.jsonl", generated_documents(chars))
    why = f"{text_dir} is absent" if text_dir is not None else "no ../shared/data"
    return [str(path)], f"GENERATED pseudo-English text ({chars / 1e6:.0f}M chars; {why})"


# --- the training configuration -------------------------------------------------------------------
def datamodule_kwargs(
    shard_dir: Path, tokenizer_dir: Path, source: list[str] | None, overrides: list[str] = ()
) -> dict:
    """PretrainDataModule's arguments as `train.py stage=base data=local trainer=8xh100 model=d20` composes them,
    with one rank's micro-batch as the batch (no accumulation) and the given shard/tokenizer dirs."""
    from omegaconf import OmegaConf

    from nanochat.configs import compose

    cfg = compose(
        [
            "stage=base",
            "data=local",
            "trainer=8xh100",
            "model=d20",
            "model.total_batch_size=65536",
            f"data.dir={shard_dir}",
            f"paths.tokenizer_dir={tokenizer_dir}",
            *overrides,
        ]
    )
    kwargs = OmegaConf.to_container(cfg.datamodule, resolve=True)
    kwargs.pop("_target_")
    kwargs["source"] = source
    return kwargs


def make_datamodule(kwargs: dict, **changes):
    from nanochat.data.pretrain_datamodule import PretrainDataModule

    return PretrainDataModule(**{**kwargs, **changes})


def prepare_shards(kwargs: dict) -> dict:
    """Shards from `kwargs['source']` into `kwargs['dir']` by the datamodule's own prepare_data; their manifest."""
    import contextlib
    import io
    import json

    from nanochat.data.shards import MANIFEST_NAME

    with contextlib.redirect_stderr(io.StringIO()):  # prepare's progress bar
        make_datamodule(kwargs).prepare_data()
    return json.loads((Path(kwargs["dir"]) / MANIFEST_NAME).read_text())


def train_tokenizer(shard_dir: Path, out: Path, vocab_size: int, max_chars: int, doc_cap: int = 10_000) -> dict:
    """The tokenizer stage's trainer on the training shards (the validation shard stays unseen); its summary."""
    import contextlib
    import io

    from nanochat.data.shards import list_shards, split_shards
    from nanochat.tokenizer.training import train_tokenizer as train

    train_files, _ = split_shards(list_shards(shard_dir))
    with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary; the stats come back as a dict
        return train(
            [str(f) for f in train_files], vocab_size, out, max_chars=max_chars, doc_cap=doc_cap, show_progress=False
        )


# --- measurements ---------------------------------------------------------------------------------
def cpu_seconds(pids=("self",)) -> float:
    """User + system CPU seconds of these processes (all their threads) so far, from /proc; 0.0 where unreadable."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure_stream(
    kwargs: dict,
    num_workers: int,
    *,
    warmup: int = 2,
    seconds: float = 6.0,
    min_batches: int = 3,
    max_batches: int | None = None,
    on_batch=None,
) -> dict:
    """Tokens/s of `train_dataloader()` with `num_workers` loader workers, after `warmup` batches.

    Counts every token of every batch timed (rows x (T + 1)); stops after `seconds` (once `min_batches` are in) or
    at `max_batches`. `on_batch(batch)` sees each timed (accum, B, T + 1) batch (inside the timed window).
    """
    dm = make_datamodule(kwargs, num_workers=num_workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    t_start = time.perf_counter()
    it = iter(loader)
    try:
        for _ in range(warmup):
            next(it)
        t_warm = time.perf_counter()
        pids = ["self", *(w.pid for w in getattr(it, "_workers", []))]  # the main process and its loader workers
        batches = tokens = 0
        shape = None
        cpu0 = cpu_seconds(pids)
        t0 = time.perf_counter()
        while True:
            item = next(it)
            batch = dm.on_before_batch_transfer(item, 0)  # (accum, B, T + 1): what training_step receives
            shape = list(batch.shape)
            tokens += batch.numel()
            batches += 1
            if on_batch is not None:
                on_batch(batch)
            elapsed = time.perf_counter() - t0
            if max_batches is not None and batches >= max_batches:
                break
            if max_batches is None and elapsed >= seconds and batches >= min_batches:
                break
        cpu = cpu_seconds(pids) - cpu0
    finally:
        del it  # shuts the workers down
    return {
        "num_workers": num_workers,
        "tokenizer_threads": kwargs["tokenizer_threads"],
        "shape": shape,
        "warmup_batches": warmup,
        "warmup_s": t_warm - t_start,
        "batches": batches,
        "tokens": tokens,
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        # CPU the readers got: on a shared machine less than a core per thread; tok/s per busy core is the
        # figure that carries over to a node with cores to spare.
        "cpu_s": cpu,
        "cores_busy": cpu / elapsed,
        "tok_per_cpu_s": tokens / cpu if cpu > 0 else None,
    }


def gpu_tokens_per_s(
    depth: int = DEPTH, vocab_size: int = GPU_VOCAB, seq_len: int = GPU_SEQ, gpu: str = GPU_NAME, mfus=MFUS
) -> dict:
    """Training tokens/s one GPU consumes: peak bf16 FLOP/s x MFU / flops_per_token (model built on `meta`)."""
    import torch

    from nanochat.hardware import GPU_PEAK_BF16
    from nanochat.models.components import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, seq_len))
    flops = model.flops_per_token()
    peak = next(value for key, value in GPU_PEAK_BF16 if key in gpu)
    return {
        "depth": depth,
        "vocab_size": vocab_size,
        "sequence_len": seq_len,
        "params": model.num_params(),
        "flops_per_token": flops,
        "gpu": gpu,
        "peak_bf16": peak,
        "tok_s": {label: peak * mfu / flops for label, mfu in mfus},
    }


def profile_stages(kwargs: dict, *, docs: int = 512, threads: tuple[int, ...] | None = None) -> dict:
    """Time the stream's stages one at a time on the first `docs` documents of reader 0 (whole row groups are read).

    read: `_read_unit` (parquet -> Python str list); tokenize: document checks + `encode_batch(prepend=BOS)` in
    the stream's batches, per thread count; pack: `pack_rows` over the tokenized documents into (rows, T + 1)
    tensors. Each stage's tok/s is the tokens of those documents divided by that stage's time alone; `share` is
    its part of read + tokenize (configured threads) + pack.
    """
    from nanochat.data.stream import Position, document_fault, pack_rows

    dm = make_datamodule(kwargs, num_workers=0)
    dm.setup("fit")
    stream = dm.train_dataloader().dataset
    tok = stream.tokenizer
    threads = threads or tuple(dict.fromkeys((stream.tokenizer_threads, 1)))
    clock = {}

    def timed(name, fn, share=1.0):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        clock[name] = ((time.perf_counter() - t0) * share, (time.process_time() - c0) * share)
        return result

    def read():
        cache, raw, groups = {}, [], 0
        for unit in stream.slot_units(0):
            raw += stream._read_unit(unit, cache) or []
            groups += 1
            if len(raw) >= docs:
                break
        return raw, groups

    raw, groups = timed("parquet read", read)
    # Whole row groups were read: count the share of the documents used.
    clock["parquet read"] = tuple(x * min(1.0, docs / max(1, len(raw))) for x in clock["parquet read"])
    raw = raw[:docs]

    def tokenize(n):
        out = []
        for lo in range(0, len(raw), stream.tokenizer_batch):
            batch = [t for t, kind, _ in map(document_fault, raw[lo : lo + stream.tokenizer_batch]) if kind is None]
            out += tok.encode_batch(batch, prepend=tok.bos_token_id, num_threads=n)
        return out

    names = {n: f"tokenize ({n} thread{'s' * (n > 1)})" for n in threads}
    for n in threads:
        encoded = timed(names[n], functools.partial(tokenize, n))
    tokens = sum(map(len, encoded))
    kept = [text for text, kind, _ in map(document_fault, raw) if kind is None]
    chars, nbytes = sum(map(len, kept)), sum(len(d.encode("utf-8")) for d in kept)

    def pack():
        items = ((Position(0, 0, i), ids) for i, ids in enumerate(encoded))
        return sum(t.numel() for t, _ in pack_rows(items, stream.rows, stream.seq_len))

    packed = timed("pack rows", pack)
    order = ["parquet read", *names.values(), "pack rows"]
    stream_s = sum(clock[k][0] for k in ("parquet read", names[threads[0]], "pack rows"))
    stages = {}
    for name in order:
        wall, cpu = clock[name]
        stages[name] = {
            "seconds": wall,
            "cpu_s": cpu,
            "tok_s": tokens / wall,
            "MB_s": nbytes / wall / 1e6,
            "tok_per_cpu_s": tokens / cpu if cpu > 0 else None,
            "share": wall / stream_s if not name.startswith("tokenize") or name == names[threads[0]] else None,
        }
    return {
        "row_groups": groups,
        "documents": len(kept),
        "chars": chars,
        "bytes": nbytes,
        "tokens": tokens,
        "packed_tokens": packed,
        "bytes_per_token": nbytes / tokens,
        "stages": stages,
    }


# --- report ---------------------------------------------------------------------------------------
def headroom(stream_tok_s: float, gpu: dict) -> dict:
    return {label: stream_tok_s / tok_s for label, tok_s in gpu["tok_s"].items()}


def tables(runs: list[dict], gpu: dict, profile: dict | None, source_line: str) -> str:
    labels = list(gpu["tok_s"])
    last = labels[-1]
    header = [
        "readers",
        "batch (accum, B, T+1)",
        "batches timed",
        "tokens",
        "seconds",
        "stream tok/s",
        *[f"headroom @ {label} MFU" for label in labels],
        f">= {HEADROOM_BAR:g}x",
        "CPU cores busy",
        "tok per CPU-second",
        f"headroom per busy core @ {last} MFU",
    ]
    rows = []
    for r in runs:
        who = "main process (num_workers=0)" if r["num_workers"] == 0 else f"num_workers={r['num_workers']}"
        room = r["headroom"]
        per_core = r["tok_per_cpu_s"]
        rows.append(
            [
                f"{who}, {r['tokenizer_threads']} tokenizer threads",
                "x".join(map(str, r["shape"])),
                r["batches"],
                f"{r['tokens']:,}",
                f"{r['seconds']:.2f}",
                f"{r['tok_s']:,.0f}",
                *[f"{room[label]:.2f}x" for label in labels],
                "yes" if min(room.values()) >= HEADROOM_BAR else "**no**",
                f"{r['cores_busy']:.2f}",
                f"{per_core:,.0f}" if per_core else "n/a",
                f"{per_core / gpu['tok_s'][last]:.2f}x" if per_core else "n/a",
            ]
        )
    out = [f"Data: {source_line}", "", markdown_table(header, rows), ""]
    out.append(
        markdown_table(
            ["GPU consumer", "flops/token", *[f"tok/s @ {label} MFU" for label in labels]],
            [
                [
                    (
                        f"d{gpu['depth']} (vocab {gpu['vocab_size']:,}, T {gpu['sequence_len']}) on one {gpu['gpu']} "
                        f"({gpu['peak_bf16'] / 1e12:.0f} TFLOP/s bf16)"
                    ),
                    f"{gpu['flops_per_token']:.3e}",
                    *[f"{gpu['tok_s'][label]:,.0f}" for label in labels],
                ]
            ],
        )
    )
    if profile:
        out += [
            "",
            (
                f"Stage profile ({profile['documents']:,} documents of {profile['row_groups']} row group(s), "
                f"{profile['bytes'] / 1e6:.1f} MB, {profile['tokens']:,} tokens, "
                f"{profile['bytes_per_token']:.2f} bytes/token), each stage alone in the main process:"
            ),
            "",
        ]
        out.append(
            markdown_table(
                ["stage", "seconds", "share of the stream", "CPU s", "tok/s", "tok per CPU-second", "MB/s"],
                [
                    [
                        name,
                        f"{s['seconds']:.3f}",
                        f"{s['share']:.0%}" if s["share"] is not None else "-",
                        f"{s['cpu_s']:.2f}",
                        f"{s['tok_s']:,.0f}",
                        f"{s['tok_per_cpu_s']:,.0f}" if s["tok_per_cpu_s"] else "n/a",
                        f"{s['MB_s']:.1f}",
                    ]
                    for name, s in profile["stages"].items()
                ],
            )
        )
    return "\n".join(out)


def main() -> None:
    from nanochat.paths import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="num_workers values to measure")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per run, after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="batches discarded before timing")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--tokenizer-chars", type=float, default=5e6, help="characters to train the tokenizer on")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="reuse this saved tokenizer instead of training one"
    )
    parser.add_argument("--text", type=Path, default=None, help="text folder (default ../shared/data/pretrain_text)")
    parser.add_argument(
        "--text-chars",
        type=float,
        default=30e6,
        help="about this much text (bytes of real files, or generated characters) goes into the shards",
    )
    parser.add_argument("--profile-docs", type=int, default=512, help="documents in the stage profile (0: no profile)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/data_stream.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    t_all = time.perf_counter()

    text_dir = args.text or ((shared_data_dir() / "pretrain_text") if shared_data_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="bench_data_stream_"))
    try:
        source, source_line = text_source(text_dir, work, int(args.text_chars))
        print(f"data: {source_line}", flush=True)
        tokenizer_dir = args.tokenizer or work / "tokenizer"
        kwargs = datamodule_kwargs(work / "shards", tokenizer_dir, source)
        t0 = time.perf_counter()
        manifest = prepare_shards(kwargs)
        prepare_s = time.perf_counter() - t0
        print(
            f"shards: {manifest['num_shards']} ({manifest['train']['chars']:,} train chars) in {prepare_s:.1f} s",
            flush=True,
        )
        if args.tokenizer is None:
            tok_stats = train_tokenizer(work / "shards", tokenizer_dir, args.vocab_size, int(args.tokenizer_chars))
            asked = (
                ""
                if tok_stats["vocab_size"] == args.vocab_size
                else f" (asked for {args.vocab_size:,}: the text has no more merges)"
            )
            print(
                f"tokenizer: {tok_stats['vocab_size']:,} tokens{asked} trained on {tok_stats['chars']:,} chars in "
                f"{tok_stats['train_time_s']} s",
                flush=True,
            )
        else:
            from nanochat.tokenizer import Tokenizer

            tok_stats = {"reused": str(args.tokenizer), "vocab_size": Tokenizer.load(args.tokenizer).vocab_size}

        gpu = gpu_tokens_per_s()
        runs = []
        for n in args.workers:
            r = measure_stream(kwargs, n, warmup=args.warmup, seconds=args.seconds)
            r["headroom"] = headroom(r["tok_s"], gpu)
            runs.append(r)
            print(f"num_workers={n}: {r['tok_s']:,.0f} tok/s", flush=True)
        profile = profile_stages(kwargs, docs=args.profile_docs) if args.profile_docs else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    settings = {
        "data": source_line,
        "shard_prepare_s": round(prepare_s, 2),
        "shards": {
            "count": manifest["num_shards"],
            "train_chars": manifest["train"]["chars"],
            "train_docs": manifest["train"]["docs"],
        },
        "tokenizer": tok_stats,
        "datamodule": {k: v for k, v in kwargs.items() if k not in ("dir", "tokenizer_dir", "source")},
        "warmup_batches": args.warmup,
        "seconds": args.seconds,
        "headroom_bar": HEADROOM_BAR,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print()
    described = f"{source_line}; BPE tokenizer of {tok_stats['vocab_size']:,} tokens"
    save(args.json, tables(runs, gpu, profile, described), {"runs": runs, "gpu": gpu, "profile": profile}, settings)
    print(f"wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
