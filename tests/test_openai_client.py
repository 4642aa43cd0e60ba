"""The official `openai` Python client against a live `nanochat serve ckpt=hf:<dir>` (a transformers export of a tiny
trained model, imported on start): chat (plain, streamed with usage, n, stop, seed), the `developer` role and merged
same-role messages, text completions with echo and logprobs, and errors as the SDK's exception types."""

import os

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from common import serve_process  # noqa: E402  (bench/common.py)
from interop_helpers import train_tiny  # noqa: E402

from nanochat.engine.engine import Engine  # noqa: E402
from nanochat.export import save_export  # noqa: E402
from nanochat.export.__main__ import main as export_main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
KEY = "sk-test-key"
MERGED = [  # what OpenWebUI and agent frameworks send: a developer message, two user messages in a row
    {"role": "developer", "content": "Answer briefly."},
    {"role": "user", "content": "Hello there."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, one_torch_thread):
    return train_tiny(tiny_tokenizer), tiny_tokenizer


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """(client, model id) for serve.py on a free port, serving hf:<transformers dir> in fp32 with an API key."""
    model, tok = trained
    root = tmp_path_factory.mktemp("openai")
    hf_dir = root / "tiny-hf"
    export_main(["hf", str(save_export(model, tok, root / "export")), str(hf_dir)])
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root / "home"), "OMP_NUM_THREADS": "1"}
    overrides = [f"api_key={KEY}", "precision=fp32", "model_name=tiny", "sampling.max_tokens=16"]
    with serve_process(f"hf:{hf_dir}", overrides, env, root / "serve.log", ready_timeout=180) as (_, port):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60), port


def greedy_reply(trained, messages, max_tokens: int) -> str:
    """What our own engine answers (greedy, calculator on) to the conversation as the server renders it."""
    from nanochat.serving.generation import generate_events
    from nanochat.serving.limits import validate_chat

    model, tok = trained
    engine = Engine(model, tok)
    request = validate_chat(
        messages, temperature=0, max_tokens=max_tokens, tokenizer=tok, max_context=engine.max_context
    )
    return "".join(e.text for e in generate_events(engine, tok, request) if hasattr(e, "text"))


def test_chat_plain_and_streamed_with_usage(server, trained):
    client, _ = server
    reply = client.chat.completions.create(model="tiny", messages=MERGED, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.model == "tiny" and reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == greedy_reply(trained, MERGED, 12)  # developer = system, users merged
    merged = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello there.\n\nWhat is the capital of France?"},
    ]
    assert reply.usage.prompt_tokens == len(trained[1].render_for_completion(merged))
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MERGED,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [choice.finish_reason]


def test_n_seed_and_stop(server):
    client, _ = server
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10, temperature=1.0)
    first = client.chat.completions.create(n=3, seed=11, **ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    again = client.chat.completions.create(n=3, seed=11, **ask)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    text = first.choices[0].message.content
    assert len(text) >= 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.chat.completions.create(n=3, seed=11, stop=["<never>", stop], **ask)  # the same samples, cut
    for before, after in zip(first.choices, stopped.choices):
        if stop in before.message.content:
            assert (after.message.content, after.finish_reason) == (before.message.content.split(stop)[0], "stop")
        else:
            assert (after.message.content, after.finish_reason) == (before.message.content, before.finish_reason)


def test_text_completions_with_echo_and_logprobs(server, trained):
    client, _ = server
    model, tok = trained
    out = client.completions.create(
        model="tiny", prompt="The year 1984 had", max_tokens=2, temperature=0, echo=True, logprobs=3
    )
    choice = out.choices[0]
    ids = tok.encode("The year 1984 had", prepend="<|bos|>")
    assert choice.text.startswith("The year 1984 had") and choice.logprobs.tokens[0] == "<|bos|>"
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    torch.testing.assert_close(
        torch.tensor(choice.logprobs.token_logprobs[1 : len(ids)]), torch.tensor(expected), atol=1e-4, rtol=0
    )


def test_errors_arrive_as_the_sdks_exception_types(server):
    client, port = server
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=hi, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])
    assert e.value.param == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert [m.id for m in client.models.list()] == ["tiny"]
    stranger = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.chat.completions.create(model="tiny", messages=hi)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert e.value.status_code == 413
