"""`stage=tokenizer`: train the BPE on the training shards of `data`, save it to `paths.tokenizer_dir` and write
the "tokenizer" section of runs/<run>/report.md."""

from __future__ import annotations


def run(cfg) -> None:
    import time
    from pathlib import Path

    from nanochat.data.pretrain_datamodule import ensure_shards
    from nanochat.data.shards import split_shards
    from nanochat.report import start_run, write_section
    from nanochat.tokenizer.training import train_tokenizer

    t0 = time.perf_counter()
    run_root = Path(cfg.paths.runs_dir) / cfg.run
    start_run(run_root)
    d = cfg.data
    shards = ensure_shards(
        d.dir, d.source, gutenberg=d.gutenberg, val_fraction=d.val_fraction, shard_chars=d.shard_chars
    )
    train_files, _ = split_shards(shards)  # the validation shard stays unseen, as for the model
    t = cfg.tokenizer
    stats = train_tokenizer(
        train_files,
        cfg.model.vocab_size,
        cfg.paths.tokenizer_dir,
        max_chars=t.max_chars,
        doc_cap=t.doc_cap,
        show_progress=t.progress,
        trainer=t.trainer,
    )
    items = {
        "data": f"{d.name} ({len(train_files)} training shards)",
        "tokenizer dir": cfg.paths.tokenizer_dir,
        **stats,
    }
    write_section(run_root, "tokenizer", {"items": items, "wall_time_s": time.perf_counter() - t0})
