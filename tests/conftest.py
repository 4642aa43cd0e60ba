import inspect
import json
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


PRECISIONS = ("fp32", "bf16")


@pytest.fixture(params=PRECISIONS)
def precision(request) -> str:
    """Both precisions on every machine: bf16 autocast runs on any CPU (emulated, and slower, without native bf16),
    so the bf16 path every GPU and modern CPU takes is tested wherever the suite runs."""
    return request.param


def dtype_of(precision: str):
    from nanochat.precision import resolve

    return resolve(precision).dtype


@pytest.fixture
def stage_error(capsys):
    """Run a stage config that must fail; check it exits 2 with exactly one `error: ...` line, and return it."""

    def run(cfg) -> str:
        from nanochat.stages import run_stage

        with pytest.raises(SystemExit) as exit_info:
            run_stage(cfg)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: extra OpenMP threads only spin (8 ms vs 8 us per op measured);
    a live server under test also gets a core of its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serving_tokenizer():
    """A 600-token BPE for serving tests: small enough to train in a second, real enough to chat with."""
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train([d[:4000] for d in corpus_documents()], vocab_size=600, show_progress=False)


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


def random_gpt(vocab_size: int, std: float, **config):
    """A tiny GPT (seed 0) with large N(0, std) weights: varied, prompt-dependent output (a zero-init model is
    constant). `config`: GPTConfig's other fields."""
    import torch

    from nanochat.models.components import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, **config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


@pytest.fixture(scope="session")
def random_model(tiny_tokenizer):
    return random_gpt(tiny_tokenizer.vocab_size, 0.3, sequence_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


@pytest.fixture(scope="session")
def tiny_corpus_shards(tmp_path_factory):
    """Shards prepared from corpus_documents(): several train shards and row groups, 10% validation."""
    from nanochat.data.documents import split_text
    from nanochat.data.shards import prepare

    root = tmp_path_factory.mktemp("corpus")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in corpus_documents():
            for piece in split_text(doc, 1500):
                f.write(json.dumps({"text": piece}) + "\n")
    prepare([root / "corpus.jsonl"], root / "shards", val_fraction=0.1, shard_chars=60_000, show_progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    return tiny_tokenizer.save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def tiny_run(tiny_corpus_shards, tiny_tokenizer_dir):
    """Hydra overrides for a seconds-long base run: depth 2, seq 16, 64-token steps, no logger."""

    def overrides(*extra: str) -> list[str]:
        return [
            "stage=base",
            "model=d4",
            "trainer=cpu",
            "data=local",
            "logger=none",
            f"data.dir={tiny_corpus_shards}",
            f"paths.tokenizer_dir={tiny_tokenizer_dir}",
            "model.depth=2",
            "model.sequence_len=16",
            "model.device_batch_size=4",
            "model.total_batch_size=64",
            "budget.base_steps=8",
            "budget.eval_every=4",
            "budget.eval_tokens=256",
            "budget.sample_every=100",
            "budget.save_every=4",
            "budget.log_every=2",
            "module.head_dim=64",
            "compile=false",
            *extra,
        ]

    return overrides


# --- a hand-made CORE bundle: one task of each type, and one listed task whose file is missing ----------------
MC = [
    {"query": f"Question {w}?", "choices": [f"yes{w}", f"no{w}", f"maybe{w}"], "gold": i % 3}
    for i, w in enumerate("abcdefgh")
]
SCHEMA = [
    {"context_options": [f"The cat{w}", f"The dog{w}"], "continuation": f"barked at {w}.", "gold": i % 2}
    for i, w in enumerate("abcdef")
]
LM = [{"context": f"  Capital of {w} is {w}{w} ", "continuation": f"city{w} indeed"} for w in "abcdef"]


def write_core_bundle(root, missing: bool = True):
    """core.yaml, eval_meta_data.csv and eval_data/ in the DCLM layout under `root`; returns `root`."""
    files = {
        "mc": ("world/mc.jsonl", MC, "multiple_choice", 2, "\nAnswer: ", 25),
        "sch": ("lang/schema.jsonl", SCHEMA, "schema", 0, " ", 50),
        "lm": ("lm/lm.jsonl", LM, "language_modeling", 1, " ", 0),
    }
    lines = ["icl_tasks:"]
    csv = ["Eval Task,Task Category,Random baseline"]
    for label, (uri, rows, kind, shots, delim, base) in files.items():
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines += [
            f"- label: {label}",
            f"  dataset_uri: {uri}",
            f"  num_fewshot: [{shots}]",
            f"  icl_task_type: {kind}",
            f"  continuation_delimiter: {json.dumps(delim)}",
        ]
        csv.append(f"{label},x,{base}")
    if missing:
        lines += ["- label: gone", "  dataset_uri: nowhere/gone.jsonl", "  num_fewshot: [0]", "  icl_task_type: schema"]
        csv.append("gone,x,50")
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(csv) + "\n")
    return root
