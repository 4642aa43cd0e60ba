"""`POST /v1/completions`: prompts as text or ids, echo, logprobs equal to the model's own, limits, and scoring
that runs between the decoding steps of a busy batch. In both precisions: logprobs come from the engine's forward."""

import asyncio

import pytest
import torch

pytest.importorskip("fastapi")

from conftest import PRECISIONS, random_gpt  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from nanochat.precision import computing  # noqa: E402
from nanochat.serving.api import create_app  # noqa: E402
from nanochat.serving.generation import GenerationQueue, ScoreRequest, Scores  # noqa: E402
from nanochat.serving.limits import validate_chat  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(serving_tokenizer):
    return serving_tokenizer


@pytest.fixture(scope="module")
def export_dir(tok, tmp_path_factory):
    from nanochat.export import save_export

    model = random_gpt(tok.vocab_size, 0.5, sequence_len=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    return save_export(model, tok, tmp_path_factory.mktemp("completions") / "export")


@pytest.fixture(scope="module", params=PRECISIONS)
def engine(export_dir, request):
    from nanochat.serving import load_engine

    return load_engine(export_dir, "cpu", precision=request.param)[0]


@pytest.fixture(scope="module")
def client(engine, tok):
    with TestClient(create_app(engine, tok, "tiny")) as c:
        yield c


def reference_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log_softmax of the engine's model over `ids`, computed as the engine computes (its dtype), in fp32."""
    with torch.no_grad(), computing(engine.model, engine.compute_dtype()):
        return torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_are_the_models_own(client, engine, tok):
    text = "Hello there, how are you?"
    body = complete(client, prompt=text, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = body["choices"][0]
    ids = tok.encode(text, prepend="<|bos|>")
    lp = choice["logprobs"]
    generated = len(lp["tokens"]) - len(ids)
    assert choice["text"].startswith(text) and 1 <= generated <= 3
    assert lp["tokens"][0] == "<|bos|>" and "".join(lp["tokens"][1 : len(ids)]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][: len(ids) + 1] == [0, 0] + [len(tok.decode(ids[1:i])) for i in range(2, len(ids) + 1)]
    for logprob, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) <= 2 and (logprob in top.values() or logprob < min(top.values()))
    for logprob, top in zip(lp["token_logprobs"][len(ids) :], lp["top_logprobs"][len(ids) :]):
        assert logprob == max(top.values())  # greedy: each generated token is its position's likeliest
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == generated
    # Exactly the model's numbers over the same tokens (the prompt alone: a forward of another length may round
    # differently in bf16).
    lp = complete(client, prompt=text, max_tokens=0, echo=True, logprobs=2)["choices"][0]["logprobs"]
    ref = reference_logprobs(engine, ids)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), torch.tensor(expected), atol=1e-5, rtol=0)
    # Likeliest first (two tokens with one text, such as halves of a character, keep the likelier).
    assert [next(iter(top.values())) for top in lp["top_logprobs"][1:]] == ref[:-1].max(-1).values.tolist()


def test_logprobs_in_both_precisions_agree_with_the_fp32_model(client, engine, export_dir, tok):
    from nanochat.export import load_export

    model = load_export(export_dir)[0]
    ids = tok.encode("The year 1984 had 365 days", prepend="<|bos|>")
    body = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    expected = torch.tensor([ref[i - 1, ids[i]].item() for i in range(1, len(ids))])
    atol = 1e-4 if engine.compute_dtype() == torch.float32 else 0.15  # bf16: weights and activations rounded
    served = torch.tensor(body["choices"][0]["logprobs"]["token_logprobs"][1:])
    torch.testing.assert_close(served, expected, atol=atol, rtol=0)


def test_token_prompts_several_prompts_n_and_max_tokens_zero(client, tok):
    a, b = tok.encode("abc", prepend="<|bos|>"), tok.encode("Hello", prepend="<|bos|>")
    body = complete(client, prompt=[a, b], max_tokens=0, echo=True, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [tok.decode(a)] * 2 + [tok.decode(b)] * 2
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": len(a) + len(b), "completion_tokens": 0, "total_tokens": len(a) + len(b)}
    body = complete(client, prompt="Once upon", max_tokens=5, temperature=1.0, seed=3, n=2, logprobs=1)
    for c in body["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
        assert lp["text_offset"][0] == len("Once upon") and all(len(top) == 1 for top in lp["top_logprobs"])
    again = complete(client, prompt="Once upon", max_tokens=5, temperature=1.0, seed=3, n=2, logprobs=1)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]


BAD = [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": ["x"] * 17}, "prompt"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "temperature": 9}, "temperature"),
    ({"prompt": "word " * 60, "max_tokens": 10, "logprobs": 1}, "prompt"),  # over the training context of 64
    ({"prompt": "word " * 60, "max_tokens": 600}, "prompt"),  # over the rotary context of 640
]


def test_bad_completion_requests_name_the_field(client):
    for body, param in BAD:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert client.get("/v1/completions").status_code == 405
    assert complete(client, prompt="word " * 60, max_tokens=10)["choices"][0]["finish_reason"] in ("stop", "length")


def test_scoring_runs_between_decoding_steps_of_a_busy_batch(engine, tok):
    async def scenario():
        queue = GenerationQueue(engine, tok)
        # Greedy, this model and prompt decode all 500 tokens without an end token (in both precisions).
        long = queue.submit(
            validate_chat(
                [{"role": "user", "content": "Go on"}],
                temperature=0,
                max_tokens=500,
                tokenizer=tok,
                max_context=engine.max_context,
            )
        )
        ids = tok.encode("score me", prepend="<|bos|>")
        scores = [e async for e in queue.submit(ScoreRequest(ids, top=3)).events()]
        busy = queue.generating  # the long generation is still decoding
        events = [e async for e in long.events()]
        assert events[-1].reason == "length" and events[-1].tokens == 500
        queue.shutdown()
        return scores, busy, ids

    scores, busy, ids = asyncio.run(scenario())
    assert busy == 1 and len(scores) == 1 and isinstance(scores[0], Scores)
    ref = reference_logprobs(engine, ids)
    torch.testing.assert_close(
        torch.tensor(scores[0].token_logprobs),
        torch.tensor([ref[i - 1, ids[i]].item() for i in range(1, len(ids))]),
        atol=1e-5,
        rtol=0,
    )
    assert [t for t, _ in scores[0].top_logprobs[0]] == ref[0].topk(3).indices.tolist()
