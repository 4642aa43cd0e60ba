"""Serving: request limits, streamed generation, the OpenAI-compatible API, the Gradio UI and the CLI.

Two real engines: a tiny random-weight GPT (varied output, real decoding) and a scripted model that emits a
fixed token script (exact text, tool calls, endless replies for the disconnect test).
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("gradio")

import httpx  # noqa: E402
from conftest import PRECISIONS, random_gpt  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from nanochat.engine.engine import Engine  # noqa: E402
from nanochat.models.components import GPTConfig  # noqa: E402
from nanochat.serving.api import create_app  # noqa: E402
from nanochat.serving.generation import Finish, GenerationQueue, QueueFull, TextDelta, ToolUse, generate_events  # noqa: E402
from nanochat.serving.limits import RequestError, validate_chat  # noqa: E402
from nanochat.settings import ServerLimits  # noqa: E402

pytestmark = [  # gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.usefixtures("one_torch_thread"),
]
REPO = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tok(serving_tokenizer):
    return serving_tokenizer


@pytest.fixture(scope="module")
def export_dir(tok, tmp_path_factory):
    from nanochat.export import save_export

    model = random_gpt(tok.vocab_size, 0.5, sequence_len=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    return save_export(model, tok, tmp_path_factory.mktemp("serve") / "export")


@pytest.fixture(scope="module", params=PRECISIONS)
def engine(export_dir, request):
    """The engine as serve.py loads it, in each precision (bf16: bf16 weights, bf16 KV cache)."""
    from nanochat.serving import load_engine

    engine, _, _, chosen = load_engine(export_dir, "cpu", precision=request.param)
    assert chosen.name == request.param and engine.compute_dtype() == chosen.dtype
    return engine


class ScriptedModel(nn.Module):
    """Stands in for the GPT: each reply replays `script` (one token per forward) then repeats its last token."""

    def __init__(self, vocab_size: int, delay: float = 0.0):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.rotary_len = 640
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the engine a device
        self.script, self.delay, self.calls, self.prompts = [0], delay, 0, []
        self.fail = False  # True: every forward raises, as a device failure would

    def forward(self, idx, kv_cache=None, last_only=False, **_batching):  # positions, key_mask: see GPT.forward
        if self.fail:
            raise RuntimeError("simulated device failure")
        if idx.size(1) > 1:  # a prefill: a new reply starts
            self.calls, self.prompts = 0, [*self.prompts, idx[0].tolist()]
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        time.sleep(self.delay)
        kv_cache.advance(idx.size(1))
        logits = torch.full((idx.size(0), idx.size(1), self.config.vocab_size), -1e9)
        logits[..., token] = 0.0
        return logits


@pytest.fixture
def scripted(tok):
    """(engine, model, say): `say(*pieces)` sets the reply; str pieces are text, others special-token names."""
    model = ScriptedModel(tok.vocab_size)

    def say(*pieces, end=True):
        ids = []
        for piece in pieces:
            ids += tok.encode(piece) if not piece.startswith("<|") else [tok.token_id(piece)]
        model.script = ids + ([tok.token_id("<|assistant_end|>")] if end else [])

    return Engine(model, tok), model, say


def calculator_script(tok, say):
    """A reply with a tool call; the engine forces <|output_start|> 84 <|output_end|> while the model's picks
    are ignored."""
    forced = ["<|bos|>"] * (len(tok.encode("84")) + 2)
    say("Let me compute", "<|python_start|>", "12*7", "<|python_end|>", *forced, " so 84.")


def request_for(tok, engine, messages=HI, **kw):
    return validate_chat(messages, tokenizer=tok, max_context=engine.max_context, **{"temperature": 0, **kw})


def reply_text(events, index=0):
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == index)


# --- limits --------------------------------------------------------------------------------------


def test_validate_chat_normalizes_parts_and_defaults(tok, engine):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    req = validate_chat(
        [{"role": "system", "content": "Be brief"}, {"role": "user", "content": parts}],
        tokenizer=tok,
        max_context=engine.max_context,
    )
    assert req.messages[1]["content"] == "Hello\nthere"
    assert (req.temperature, req.top_k, req.n) == (0.6, 50, 1)
    assert req.max_tokens == min(512, engine.max_context - len(req.prompt_ids))
    assert req.prompt_ids == tok.render_for_completion(req.messages)
    with pytest.raises(RequestError) as e:
        validate_chat(HI, max_tokens=engine.max_context, tokenizer=tok, max_context=engine.max_context)
    assert e.value.field == "messages"


def test_developer_is_system_and_same_role_runs_are_merged(tok, engine):
    from nanochat.serving.limits import validate_messages

    calc = [{"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "1+1?"}]},
        {"role": "assistant", "content": "Let me see."},
        {"role": "assistant", "content": calc},
        {"role": "user", "content": "Thanks"},
    ]
    assert validate_messages(messages) == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Hi.\n\n1+1?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}, *calc]},
        {"role": "user", "content": "Thanks"},
    ]
    req = validate_chat(messages, tokenizer=tok, max_context=engine.max_context)
    assert req.prompt_ids == tok.render_for_completion(validate_messages(messages))


# --- generation ----------------------------------------------------------------------------------


def test_utf8_is_never_split_and_stop_strings_cut(tok, scripted):
    engine, _model, say = scripted
    text = "Привет 🤖 мир, 日本語"
    assert len(tok.encode("🤖")) > 1  # the emoji really is spread over several byte tokens
    say(text)
    events = list(generate_events(engine, tok, request_for(tok, engine)))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert events[-1] == Finish(0, "stop", len(tok.encode(text)) + 1)

    events = list(generate_events(engine, tok, request_for(tok, engine, stop=["мир", "zzz"])))
    assert reply_text(events) == "Привет 🤖 " and events[-1].reason == "stop"
    say("Hello world. " * 10, end=False)
    events = list(generate_events(engine, tok, request_for(tok, engine, max_tokens=7)))
    assert events[-1] == Finish(0, "length", 7)


def test_tool_calls_as_text_or_as_events(tok, scripted):
    engine, _model, say = scripted
    calculator_script(tok, say)
    events = list(generate_events(engine, tok, request_for(tok, engine)))
    assert reply_text(events) == "Let me compute\n[calculator] 12*7 = 84\n so 84."
    events = list(generate_events(engine, tok, request_for(tok, engine), tools_as_text=False))
    kinds = [type(e).__name__ for e in events]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == [
        "TextDelta",
        "ToolUse",
        "TextDelta",
        "Finish",
    ]
    assert [e for e in events if isinstance(e, ToolUse)] == [ToolUse(0, "12*7", "84")]
    say("Try", "<|python_start|>", "__import__('os')", "<|python_end|>", " sorry")  # refused: nothing forced
    assert (
        reply_text(generate_events(engine, tok, request_for(tok, engine)))
        == "Try\n[calculator] __import__('os') = (no result)\n sorry"
    )


def test_queue_rejects_when_full_and_skips_cancelled_jobs(tok, scripted):
    engine, model, say = scripted
    say("slow", end=False)
    model.delay = 0.002

    async def scenario():
        queue = GenerationQueue(engine, tok, max_waiting=1)
        running = queue.submit(request_for(tok, engine, max_tokens=400))
        waiting = queue.submit(request_for(tok, engine, max_tokens=400))
        with pytest.raises(QueueFull):
            queue.submit(request_for(tok, engine))
        waiting.cancel()
        first = [e async for e in running.events()]
        async for _ in waiting.events():
            raise AssertionError("a cancelled job must not generate")
        queue.shutdown()
        return first

    first = asyncio.run(scenario())
    assert first[-1] == Finish(0, "length", 400)


# --- HTTP API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(engine, tok):
    with TestClient(create_app(engine, tok, "tiny-test")) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": HI, **body})


def sse_events(text: str) -> list:
    lines = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_non_streaming_shape_and_usage(client, tok):
    r = chat(client, max_tokens=12, temperature=1.0, n=3, seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-test" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c in body["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tok.render_for_completion(HI))
    assert (
        3 <= usage["completion_tokens"] <= 36
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    if all(c["finish_reason"] == "length" for c in body["choices"]):
        assert usage["completion_tokens"] == 36


def test_streaming_reassembles_to_the_non_streaming_text(client):
    plain = chat(client, max_tokens=30, temperature=0, seed=1).json()
    r = chat(client, max_tokens=30, temperature=0, seed=1, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_tool_call_and_stop_through_the_api(scripted, tok):
    engine, _model, say = scripted
    calculator_script(tok, say)
    with TestClient(create_app(engine, tok)) as c:
        body = chat(c).json()
        assert body["choices"][0]["message"]["content"] == "Let me compute\n[calculator] 12*7 = 84\n so 84."
        assert body["choices"][0]["finish_reason"] == "stop"
        body = chat(c, stop="84", stream=True)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(body.text))
        assert text == "Let me compute\n[calculator] 12*7 = "


BAD_REQUESTS = [  # (body or raw bytes, expected status, expected param)
    (b"{", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[]", 400, None),
    (b"[" * 100_000, 400, None),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 501}, 400, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": r, "content": "x"} for r in ("user", "user", "system")]}, 400, "messages[2].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}, 400, "messages[1].role"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0]",
    ),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "messages[0].content"),
    (
        {"messages": [{"role": r, "content": "x" * 7000} for r in ("user", "assistant") * 2 + ("user",)]},
        400,
        "messages",
    ),
    ({"messages": HI, "temperature": 5}, 400, "temperature"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HI, "top_k": 0}, 400, "top_k"),
    ({"messages": HI, "top_k": 10**6}, 400, "top_k"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": 639}, 400, "messages"),  # fits the context alone, not with the prompt
    ({"messages": HI, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"messages": HI, "n": 99}, 400, "n"),
    ({"messages": HI, "n": True}, 400, "n"),
    ({"messages": HI, "seed": "abc"}, 400, "seed"),
    ({"messages": HI, "top_p": 0.5}, 400, "top_p"),
    ({"messages": HI, "stop": ["a"] * 10}, 400, "stop"),
    ({"messages": HI, "stop": 5}, 400, "stop"),
    ({"messages": HI, "stream": "yes"}, 400, "stream"),
    ({"messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
]


def test_malformed_requests_get_json_4xx_and_the_server_stays_up(client):
    for body, status, param in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (body if len(raw) < 200 else raw[:200], r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], (
            raw[:200],
            error,
        )
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}]}'
    r = client.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    chunked = client.post("/v1/chat/completions", content=iter([b"x" * 600_000] * 2))  # no Content-Length to trust
    assert chunked.status_code == 413
    assert client.get("/v1/nope").status_code == 404 and "error" in client.get("/v1/nope").json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
    assert client.put("/v1/models").status_code == 405
    assert chat(client, max_tokens=3, top_p=1, max_completion_tokens=3).status_code == 200


def test_health_and_models(client):
    deadline = time.time() + 10
    while not client.get("/health").json()["ready"] and time.time() < deadline:  # the engine's warm-up generation
        time.sleep(0.01)
    assert client.get("/health").json() == {
        "status": "ok",
        "ready": True,
        "model": "tiny-test",
        "generating": 0,
        "pending": 0,
        "free": 17,
        "max_waiting": 16,
    }
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-test"]
    assert client.get("/v1/models/tiny-test").json()["id"] == "tiny-test"
    assert client.get("/v1/models/other").status_code == 404


def test_api_key(engine, tok):
    with TestClient(create_app(engine, tok, "tiny-test", api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post(
            "/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"}
        )
        assert r.status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200  # for load balancers; reveals only the model name


# --- a live server: concurrency, disconnects, the mounted UI --------------------------------------


@contextlib.contextmanager
def live_server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def full_server(engine, tok):
    from nanochat.serving.webui import mount_ui

    app = create_app(engine, tok, "tiny-test")
    with live_server(mount_ui(app)) as url:
        yield url, app


def test_eight_concurrent_streams_all_complete(full_server):
    url, app = full_server

    async def one(client, i):
        body = {"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 20, "stream": True, "seed": i}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            return sse_events("".join([chunk async for chunk in r.aiter_text()]))

    async def all_of_them():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(all_of_them())
    assert len(results) == 8
    assert all(events[-1]["choices"][0]["finish_reason"] in ("stop", "length") for events in results)
    assert app.state.queue.pending == 0


def test_disconnected_client_stops_generation_and_full_queue_is_503(scripted, tok):
    engine, model, say = scripted
    say("Hello world", end=False)  # never ends by itself
    model.delay = 0.005
    app = create_app(engine, tok, limits=ServerLimits(max_waiting=0))
    body = {"messages": HI, "max_tokens": 500, "stream": True}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # kept: a discarded iterator can close the connection, i.e. disconnect
            next(lines)
            busy = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
        deadline = time.time() + 10
        while app.state.queue.pending and time.time() < deadline:
            time.sleep(0.02)
        assert app.state.queue.pending == 0
        steps = model.calls
        time.sleep(0.2)
        assert model.calls == steps < 250  # stopped early (500 steps take 2.5 s), and for good
        assert client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_gradio_ui_mounted_on_the_api_server_answers(full_server):
    from gradio_client import Client

    url, _app = full_server
    reply = Client(url + "/", verbose=False).predict("Hello there", 0.0, 50, 16, api_name="/chat")
    assert reply and reply[0]["role"] == "assistant"
    assert httpx.get(url + "/health").json()["ready"] is True


def test_gradio_shows_tool_calls_apart_and_replays_them(scripted, tok):
    from gradio_client import Client

    from nanochat.serving.webui import TOOL_TITLE, build_ui

    engine, model, say = scripted
    calculator_script(tok, say)
    demo = build_ui(GenerationQueue(engine, tok), tok, engine.max_context, "scripted")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, ssr_mode=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        reply = client.predict("What is 12*7?", 0.0, 50, 64, api_name="/chat")
        assert [m["content"] for m in reply] == ["Let me compute", "12*7", " so 84."]
        assert reply[1]["metadata"]["title"] == TOOL_TITLE and reply[1]["metadata"]["log"] == "= 84"
        say("Sure")
        assert client.predict("And again?", 0.0, 50, 64, api_name="/chat")[0]["content"] == "Sure"
        t = tok.token_id
        replayed = model.prompts[-1]
        call = [
            t("<|python_start|>"),
            *tok.encode("12*7"),
            t("<|python_end|>"),
            t("<|output_start|>"),
            *tok.encode("84"),
            t("<|output_end|>"),
        ]
        assert any(
            replayed[i : i + len(call)] == call for i in range(len(replayed))
        )  # the tool tokens, not marker text
    finally:
        demo.close()


def test_ui_requires_the_api_key_when_one_is_set(engine, tok):
    from nanochat.serving.webui import mount_ui

    app = mount_ui(create_app(engine, tok, api_key="s3cret"), api_key="s3cret")
    with TestClient(app) as c:
        assert c.get("/config").status_code == 401
        assert c.post("/login/", data={"username": "me", "password": "wrong"}).status_code == 400
        assert c.post("/login/", data={"username": "me", "password": "s3cret"}).status_code == 200
        assert c.get("/config").status_code == 200


# --- CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cli_one_shot_and_interactive_commands(export_dir, precision):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "nanochat", "chat", str(export_dir), "--max-tokens", "12", "--precision", precision]
    one_shot = subprocess.Popen(
        [*cmd, "-p", "Hello there", "--temperature", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    script = "Hello\n/temperature 5\n/temperature 0\n/topk 10\nAgain\n/clear\n/bogus\nOnce more\n/quit\nnever read\n"
    interactive = subprocess.run(cmd, input=script, env=env, capture_output=True, text=True, timeout=60)
    out, err = one_shot.communicate(timeout=60)
    assert one_shot.returncode == 0, err
    assert out.strip() and "User:" not in out and "nanochat:" not in out  # the reply only
    assert err.startswith(f"precision: {precision} (precision={precision}") and err.count("\n") == 1  # said on stderr
    assert interactive.returncode == 0, interactive.stderr
    lines = interactive.stdout
    assert lines.count("Assistant: ") == 3
    assert "error: temperature must be in 0..2" in lines and "temperature = 0" in lines and "top-k = 10" in lines
    assert "(conversation cleared)" in lines and "unknown command /bogus" in lines
    missing = subprocess.run(
        [sys.executable, "-m", "nanochat", "chat", "/no/such/dir", "-p", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1


def test_cli_session_keeps_the_conversation_with_tool_tokens(scripted, tok):
    import io

    from nanochat.serving.chat_cli import ChatSession, parse_args, repl

    engine, model, say = scripted
    calculator_script(tok, say)
    session = ChatSession(engine, tok, temperature=0)
    out = io.StringIO()
    repl(session, stdin=io.StringIO("What is 12*7?\nThanks\n/clear\n"), out=out)
    assert "Let me compute\n[calculator] 12*7 = 84\n so 84." in out.getvalue()
    second_prompt = model.prompts[1]
    assert tok.token_id("<|python_start|>") in second_prompt and tok.token_id("<|output_start|>") in second_prompt
    assert session.messages == []
    args = parse_args(["runs/x", "-p", "a=b", "--top-k", "3", "--seed", "1"])
    assert (args.ckpt, args.prompt, args.top_k, args.seed, args.max_tokens) == ("runs/x", "a=b", 3, 1, 512)


def test_cli_internal_failure_is_one_line_and_exit_1(export_dir, monkeypatch, capsys):
    import nanochat.serving as serving
    from nanochat.serving.chat_cli import main

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(serving, "load_engine", broken)
    monkeypatch.delenv("NANOCHAT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main([str(export_dir), "-p", "hi"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == (
        "error: internal error (RuntimeError: CUDA error: an illegal memory access was encountered); "
        "NANOCHAT_TRACEBACK=1 shows the traceback\n"
    )
    monkeypatch.setenv("NANOCHAT_TRACEBACK", "1")
    with pytest.raises(SystemExit):
        main([str(export_dir), "-p", "hi"])
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_an_engine_failure_is_a_json_500_logged_with_its_traceback_and_the_server_keeps_serving(scripted, tok, caplog):
    engine, model, say = scripted
    say("Fine again.")
    with TestClient(create_app(engine, tok, "tiny-test"), raise_server_exceptions=False) as c:
        deadline = time.time() + 20
        while c.get("/health").status_code != 200:  # the warm-up generation ran
            assert time.time() < deadline
            time.sleep(0.02)
        model.fail = True
        with caplog.at_level(logging.ERROR):
            r = chat(c)
            streamed = chat(c, stream=True)
        assert r.status_code == 500
        assert r.json() == {
            "error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}
        }
        assert "simulated device failure" in caplog.text and "Traceback (most recent call last)" in caplog.text
        assert streamed.status_code == 200  # already streaming: the error arrives in-band, then [DONE]
        assert sse_events(streamed.text)[-1]["error"]["type"] == "server_error"
        model.fail = False
        ok = chat(c)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Fine again."
        assert c.get("/health").status_code == 200


def test_an_export_missing_weights_is_one_line_and_exit_2(export_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from nanochat.serving.chat_cli import main

    broken = Path(shutil.copytree(export_dir, tmp_path / "export"))
    state = load_file(str(broken / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(broken), "-p", "hi"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {broken / 'model.safetensors'} does not hold this model's weights "
        "(missing ['lm_head.weight'], unexpected []); re-export it\n"
    )


def test_serve_without_a_model_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "serve.py"), f"ckpt={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
