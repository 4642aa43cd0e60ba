import inspect
import os

import pytest

# Tests never touch the network: hub libraries read only their caches, artifacts go to a temp home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nanochat_home"))


@pytest.fixture(scope="session")
def shared_data():
    from nanochat.paths import shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent: real-data tests need the shared datasets beside the checkout")
    return path


def corpus_documents() -> list[str]:
    """A varied corpus every machine has: Python's stdlib source (code, prose in docstrings) plus unicode prose."""
    import argparse
    import collections
    import json
    import textwrap

    docs = [inspect.getsource(m) for m in (argparse, collections, json.decoder, textwrap, inspect)]
    docs += [
        "Le cœur a ses raisons que la raison ne connaît point. 日本語のテキストと中文文本。 Привет, мир! 🤖🎉🚀 " * 20,
        "The year 1984 had 365 days; 3.14159 and 2.71828 are constants. Call 555-0100 or +1 (800) 123-4567. " * 20,
    ]
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train(corpus_documents(), vocab_size=1024, show_progress=False)
