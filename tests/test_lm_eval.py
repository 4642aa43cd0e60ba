"""lm-evaluation-harness on a tiny trained model, offline: a multiple-choice task written here (YAML over a local
jsonl), run with `--model hf` on the transformers export and with `local-completions` against the live API. Both must
score every item as our own model does (sum of the choice's token log-probabilities after <|bos|> + question)."""

import contextlib
import json
import socket
import threading
import time

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from interop_helpers import train_tiny  # noqa: E402

from nanochat.export import save_export  # noqa: E402
from nanochat.export.__main__ import main as export_main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TASK = "nanochat_tiny_mc"
WORDS = ["cat", "dog", "tree", "river", "stone", "cloud", "bread", "music", "light", "paper", "glass", "horse"]
ITEMS = [
    {
        "question": f"Question {i}: which word follows {w} in the list?",
        "choices": [WORDS[(i + 1) % 12], WORDS[(i + 5) % 12], f"{WORDS[(i + 7) % 12]} again"],
        "gold": i % 3,
    }
    for i, w in enumerate(WORDS)
]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tmp_path_factory, one_torch_thread):
    """(model, tokenizer, transformers dir, task dir)."""
    root = tmp_path_factory.mktemp("lm_eval")
    model = train_tiny(tiny_tokenizer)
    hf_dir = root / "hf"
    export_main(["hf", str(save_export(model, tiny_tokenizer, root / "export")), str(hf_dir)])
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tasks / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "items.jsonl"}
  cache_dir: {root / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
""")
    return model, tiny_tokenizer, hf_dir, tasks


def our_scores(model, tok) -> tuple[list[list[float]], float]:
    """Per item, each choice's log-likelihood (continuation " <choice>" after <|bos|> + question), and the accuracy."""
    scores = []
    for item in ITEMS:
        context = tok.encode(item["question"], prepend="<|bos|>")
        row = []
        for choice in item["choices"]:
            whole = tok.encode(item["question"] + " " + choice, prepend="<|bos|>")
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole]))[0], dim=-1)
            row.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        scores.append(row)
    correct = [max(range(3), key=lambda c: row[c]) == item["gold"] for row, item in zip(scores, ITEMS)]
    return scores, sum(correct) / len(ITEMS)


def evaluate(model: str, model_args: str, tasks) -> tuple[float, list[list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        batch_size=4,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]


def test_lm_eval_hf_model_scores_the_items_as_we_do(setup):
    model, tok, hf_dir, tasks = setup
    ours, accuracy = our_scores(model, tok)
    theirs, per_item = evaluate("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", tasks)
    torch.testing.assert_close(torch.tensor(per_item), torch.tensor(ours), atol=1e-4, rtol=0)
    assert theirs == accuracy


@contextlib.contextmanager
def live_api(export_dir):
    """The API app (fp32) on a free local port, served by uvicorn in a thread."""
    import uvicorn

    from nanochat.serving import load_engine
    from nanochat.serving.api import create_app

    engine, tok, _, _ = load_engine(export_dir, "cpu", precision="fp32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, tok, "tiny"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_lm_eval_local_completions_against_the_api_scores_the_items_as_we_do(setup):
    model, tok, hf_dir, tasks = setup
    ours, accuracy = our_scores(model, tok)
    with live_api(hf_dir) as url:  # a transformers dir is imported on load like any checkpoint
        theirs, per_item = evaluate(
            "local-completions",
            f"base_url={url}/v1/completions,model=tiny,tokenizer={hf_dir},"
            "tokenizer_backend=huggingface,add_bos_token=True,max_retries=1",
            tasks,
        )
    torch.testing.assert_close(torch.tensor(per_item), torch.tensor(ours), atol=1e-4, rtol=0)
    assert theirs == accuracy
