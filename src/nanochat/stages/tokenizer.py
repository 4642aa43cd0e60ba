"""`stage=tokenizer`: train the BPE on the training shards of `data` and save it to `paths.tokenizer_dir`."""

from __future__ import annotations

from argparse import Namespace


def run(cfg) -> None:
    from nanochat.data.pretrain import ensure_shards
    from nanochat.data.shards import split_shards
    from nanochat.tokenizer.__main__ import cmd_train

    d = cfg.data
    shards = ensure_shards(d.dir, d.source, gutenberg=d.gutenberg, val_fraction=d.val_fraction, shard_chars=d.shard_chars)
    train_files, _ = split_shards(shards)  # the validation shard stays unseen, as for the model
    t = cfg.tokenizer
    cmd_train(Namespace(input=[str(f) for f in train_files], vocab_size=cfg.model.vocab_size, max_chars=t.max_chars,
                        doc_cap=t.doc_cap, gutenberg=False, out=cfg.paths.tokenizer_dir, quiet=not t.progress))
