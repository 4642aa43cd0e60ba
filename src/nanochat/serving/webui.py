"""The browser chat: a Gradio 6 ChatInterface on the same engine queue as the API, mounted at "/".

Replies stream in; the chat keeps its history (the whole conversation is re-rendered every turn); the
sliders set temperature, top-k and the most new tokens per reply; the chatbot's own buttons clear the
chat, regenerate the last reply (retry) and undo. A calculator call is shown as its own collapsible message
titled "🧮 calculator" whose body is the expression and whose log is the result, and it is turned back into
`python` / `python_output` parts when the history is sent to the model, so the model sees the tool tokens
it was trained on.

UI users wait in Gradio's own queue (one generation at a time, with a position shown), then take one slot
in the shared engine queue, so API and UI requests never run on the engine at the same time.
"""

from __future__ import annotations

import os
from dataclasses import asdict

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no phoning home

import gradio as gr  # noqa: E402

from nanochat.serving.generation import GenerationQueue, QueueFull, TextDelta, ToolUse  # noqa: E402
from nanochat.serving.limits import MAX_TEMPERATURE, RequestError, validate_chat  # noqa: E402
from nanochat.settings import SamplingConfig  # noqa: E402

TOOL_TITLE = "🧮 calculator"
API_NAME = "chat"
NO_RESULT = "no result"


def _text(content) -> str:
    """The text of a Gradio message: a string, a list of blocks ({"type": "text", "text"} or strings), else ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, list | tuple):
        return "".join(_text(block) for block in content)
    return ""


def tool_message(expression: str, output: str | None) -> gr.ChatMessage:
    log = f"= {output}" if output is not None else NO_RESULT
    return gr.ChatMessage(role="assistant", content=expression.strip(), metadata={"title": TOOL_TITLE, "log": log})


def history_to_messages(history: list) -> list[dict]:
    """Gradio's history -> chat messages; consecutive assistant entries (text and tool calls) become one turn."""
    messages: list[dict] = []
    for entry in history:
        entry = entry if isinstance(entry, dict) else getattr(entry, "__dict__", {})
        role, text, meta = entry.get("role"), _text(entry.get("content")), entry.get("metadata") or {}
        if meta.get("title") == TOOL_TITLE:
            parts = [{"type": "python", "text": text}]
            log = meta.get("log") or ""
            if log.startswith("= "):
                parts.append({"type": "python_output", "text": log[2:]})
        else:  # files and images mean nothing to this model: they count as empty text
            parts = [{"type": "text", "text": text}] if text.strip() else []
        if role == "assistant" and messages and messages[-1]["role"] == "assistant":
            messages[-1]["content"].extend(parts)
        elif role == "assistant" or (role == "user" and parts):
            if role == "user" and messages and messages[-1]["role"] == "user":
                messages.append({"role": "assistant", "content": []})  # a turn that failed: keep turns alternating
            messages.append({"role": role, "content": parts})
    return messages


def build_ui(
    queue: GenerationQueue,
    tokenizer,
    max_context: int,
    model_name: str = "nanochat",
    sampling: SamplingConfig | None = None,
) -> gr.Blocks:
    defaults = asdict(sampling or SamplingConfig())

    async def respond(message, history, temperature, top_k, max_tokens):
        messages = history_to_messages(history) + [{"role": "user", "content": _text(message)}]
        try:
            # max_tokens as the default, not a demand: a long chat gets whatever room the context has left.
            request = validate_chat(
                messages,
                float(temperature),
                int(top_k),
                None,
                tokenizer=tokenizer,
                max_context=max_context,
                default_max_tokens=int(max_tokens),
            )
            job = queue.submit(request, tools_as_text=False)
        except RequestError as e:
            hint = " Clear the chat to start over." if e.field == "messages" else ""
            raise gr.Error(f"{e}.{hint}") from None
        except QueueFull as e:
            raise gr.Error(str(e)) from None
        reply: list[gr.ChatMessage] = []
        async for event in job.events():
            if isinstance(event, TextDelta):
                if not reply or reply[-1].metadata:
                    reply.append(gr.ChatMessage(role="assistant", content=""))
                reply[-1].content += event.text
            elif isinstance(event, ToolUse):
                reply.append(tool_message(event.expression, event.output))
            else:
                continue
            yield reply
        if not reply:  # the model ended its turn at once; show that rather than nothing
            yield [gr.ChatMessage(role="assistant", content="", metadata={"title": "(empty reply)"})]

    top_k_max = min(tokenizer.vocab_size, 1000)
    controls = [
        gr.Slider(
            0.0,
            MAX_TEMPERATURE,
            value=defaults["temperature"],
            step=0.05,
            label="Temperature",
            info="0 = always the most likely token",
        ),
        gr.Slider(
            1,
            top_k_max,
            value=min(defaults["top_k"], top_k_max),
            step=1,
            label="Top-k",
            info="sample among the k most likely tokens",
        ),
        gr.Slider(1, max_context, value=min(defaults["max_tokens"], max_context), step=1, label="Max new tokens"),
    ]
    chatbot = gr.Chatbot(
        label=model_name, placeholder=f"**{model_name}**<br>Ask me anything.", height="70vh", buttons=["copy"]
    )
    demo = gr.ChatInterface(
        respond,
        chatbot=chatbot,
        additional_inputs=controls,
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        title="nanochat",
        description=f"Chatting with **{model_name}**. Calculator calls show as separate “{TOOL_TITLE}” messages.",
        api_name=API_NAME,
        analytics_enabled=False,
        fill_height=True,
        concurrency_limit=1,  # the engine runs one request at a time anyway; the rest wait in Gradio's queue
    )
    demo.queue(max_size=64)
    return demo


def mount_ui(app, *, api_key: str | None = None, path: str = "/"):
    """Mount the chat on the API app (sharing its engine queue). With an API key the UI asks for it as password."""
    import hmac

    demo = build_ui(
        app.state.queue, app.state.tokenizer, app.state.max_context, app.state.model_name, app.state.sampling
    )

    def key_matches(_username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), api_key.encode())

    return gr.mount_gradio_app(
        app,
        demo,
        path=path,
        auth=key_matches if api_key else None,
        auth_message="Any user name; the password is the server's API key.",
        ssr_mode=False,
        footer_links=[],
        mcp_server=False,
    )
