"""Chat rendering: conversations -> token ids plus a mask of which tokens the model is trained on.

Rules (nanochat's): BOS first; a leading system message is merged into the first user
message; user turns are never trained on; in assistant turns the text, python tool calls and the closing
<|assistant_end|> are trained (mask 1) while tool outputs are not (the engine forces them at inference);
both lists are truncated to max_tokens. `tok` is a nanochat Tokenizer (its `encode`, `token_id` and
`bos_token_id`; this module is below it, so it does not import it). Message text is encoded without parsing
special-token strings, so a user typing "<|assistant_end|>" gets ordinary text tokens.
"""

from __future__ import annotations

from nanochat.errors import UserError

PART_DELIMITERS = {
    "python": ("<|python_start|>", "<|python_end|>"),
    "python_output": ("<|output_start|>", "<|output_end|>"),
}
PART_TRAINED = {"text": 1, "python": 1, "python_output": 0}


def out_of_turn(messages: list) -> tuple[int, str] | None:
    """(index, expected role) of the first message that breaks the chat order, or None when the order is right.

    The order the renderer accepts: an optional leading system message, then user and assistant alternating,
    starting with user. Non-dict entries count as out of turn.
    """
    first = 1 if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if not isinstance(messages[i], dict) or messages[i].get("role") != expected:
            return i, expected
    return None


def _messages(conversation) -> list[dict]:
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError("a conversation must be a non-empty list of message dicts (or a dict with 'messages')")
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise UserError("a system message must be followed by a user message")
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
    if (bad := out_of_turn(messages)) is not None:
        i = bad[0]
        raise UserError(f"message {i} has role {messages[i].get('role')!r}; roles must alternate user/assistant")
    return messages


def render_conversation(tok, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], trained: int) -> None:
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    def special(name: str) -> list[int]:
        return [tok.token_id(name)]

    add([tok.bos_token_id], 0)
    for message in _messages(conversation):
        content = message["content"]
        if message["role"] == "user":
            if not isinstance(content, str):
                raise UserError("user message content must be a string")
            add(special("<|user_start|>") + tok.encode(content) + special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            kind = part.get("type")
            if kind not in PART_TRAINED:
                raise UserError(f"assistant content part type {kind!r} is not one of {sorted(PART_TRAINED)}")
            body = tok.encode(part["text"])
            if kind in PART_DELIMITERS:
                start, end = PART_DELIMITERS[kind]
                body = special(start) + body + special(end)
            add(body, PART_TRAINED[kind])
        add(special("<|assistant_end|>"), 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tok, conversation) -> list[int]:
    """The prompt for sampling the assistant's reply: drop the final assistant message, open a new one."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tok, messages, max_tokens=10**9)
    return ids + [tok.token_id("<|assistant_start|>")]
