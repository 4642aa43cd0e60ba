"""Request validation shared by the HTTP API, the web UI and the CLI.

Every check names the field at fault, so the API can answer with an OpenAI-style error whose `param` points
at it (`messages[2].role`, `temperature`, ...). The limits keep one request from monopolising the single
engine: they bound the work per request, not the quality of the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nanochat.errors import UserError
from nanochat.settings import SamplingConfig
from nanochat.tokenizer.chat_format import out_of_turn

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TEMPERATURE = 2.0
MAX_SAMPLES = 8
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 100
MIN_TEMPERATURE = 1e-6  # below this, sampling is greedy in all but name (see validate_chat)
SHOWN_CHARS = 60  # how much of a bad value an error message quotes
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for a system message


class RequestError(UserError):
    """A request the caller must fix; `field` names the offending parameter (None when it is the whole body)."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: plain-string messages and sampling settings the engine can take as they are."""

    messages: list[dict]
    temperature: float
    top_k: int
    max_tokens: int
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prompt_ids: list[int] = field(default_factory=list)


def shown(value) -> str:
    """A bad value as an error message quotes it: its repr, cut short (a client may send megabytes)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int in Python, not in JSON


def _is_number(value) -> bool:
    # Ints are finite: math.isfinite(10**400) would raise OverflowError converting it to float.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def int_in(name: str, value, low: int, high: int) -> int:
    if not _is_int(value):
        raise RequestError(name, f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise RequestError(name, f"{name}={shown(value)} is outside the allowed range {low}..{high}")
    return value


TOOL_PARTS = ("python", "python_output")  # nanochat's calculator call / result parts (assistant messages only)


def message_content(content, where: str, role: str) -> str | list[dict]:
    """A message's content as the chat renderer takes it.

    A string stays a string. OpenAI's list of {"type": "text", "text": ...} parts is joined by newlines.
    Assistant messages may also carry nanochat's own `python` / `python_output` parts (a calculator call and
    its result, as the web UI sends back); such a list is kept as parts so the tokens match training.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(where, f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    allowed = ("text", *TOOL_PARTS) if role == "assistant" else ("text",)
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in allowed or not isinstance(part.get("text"), str):
            kinds = " or ".join(repr(k) for k in allowed)
            raise RequestError(f"{where}[{j}]", f"{where}[{j}] must be a {{'type': {kinds}, 'text': str}} part")
    if all(part["type"] == "text" for part in content):
        return "\n".join(part["text"] for part in content)
    return [{"type": part["type"], "text": part["text"]} for part in content]


def content_chars(content: str | list[dict]) -> int:
    return len(content) if isinstance(content, str) else sum(len(part["text"]) for part in content)


def merged(first: str | list[dict], second: str | list[dict]) -> str | list[dict]:
    """Two consecutive messages of one role as one: texts joined by a blank line, part lists concatenated."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second

    def parts(content):
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    return parts(first) + parts(second)


def validate_messages(messages) -> list[dict]:
    """Plain {"role", "content"} messages in the order the chat renderer accepts, or a RequestError.

    A `developer` message is a system message. Consecutive messages of one role are merged into one (clients
    such as OpenWebUI and agent frameworks send them). The renderer then wants an optional leading system
    message, then user/assistant turns alternating and ending with the user's turn (the one the model
    answers), so that is what is enforced here; an error names the message as the client numbered it.
    """
    if not isinstance(messages, list):
        raise RequestError("messages", f"messages must be a list of messages, got {type(messages).__name__}")
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise RequestError("messages", f"messages must hold 1..{MAX_MESSAGES} messages, got {len(messages)}")
    clean, origin, total = [], [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(where, f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {shown(role)}")
        role = "system" if role == "developer" else role
        content = message_content(message.get("content"), f"{where}.content", role)
        chars = content_chars(content)
        # An assistant turn may be empty (the model can end its turn at once); a question may not.
        if role != "assistant" and (chars == 0 or isinstance(content, str) and not content.strip()):
            raise RequestError(f"{where}.content", f"{where}.content is empty")
        if chars > MAX_MESSAGE_CHARS:
            raise RequestError(
                f"{where}.content", f"{where}.content has {chars:,} characters; the limit is {MAX_MESSAGE_CHARS:,}"
            )
        total += chars
        if clean and clean[-1]["role"] == role:
            clean[-1]["content"] = merged(clean[-1]["content"], content)
        else:
            clean.append({"role": role, "content": content})
            origin.append(i)
    if total > MAX_TOTAL_CHARS:
        raise RequestError("messages", f"messages hold {total:,} characters in all; the limit is {MAX_TOTAL_CHARS:,}")
    if (bad := out_of_turn(clean)) is not None:
        i, expected = bad
        at = f"messages[{origin[i]}].role"
        raise RequestError(
            at,
            f"{at} is {clean[i]['role']!r} but {expected!r} was expected: after an optional first "
            "system message, user and assistant messages must alternate, starting and ending with user",
        )
    if clean[-1]["role"] != "user":
        raise RequestError("messages", "the last message must be the user's")
    return clean


def validate_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError("stop", f"stop holds {len(stops)} sequences; the limit is {MAX_STOP_SEQUENCES}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError("stop", f"each stop sequence must have 1..{MAX_STOP_CHARS} characters")
    return tuple(stops)


def validate_sampling(temperature, top_k, n, seed, stop, vocab_size: int) -> tuple[float, int, int, int | None, tuple]:
    """(temperature, top_k, n, seed, stops) checked; None for temperature, top_k or n means the default."""
    temperature = SamplingConfig.temperature if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            "temperature", f"temperature must be a number in 0..{MAX_TEMPERATURE:g}, got {shown(temperature)}"
        )
    if temperature < MIN_TEMPERATURE:  # logits / 1e-40 overflow float32 into inf and NaN probabilities: greedy it is
        temperature = 0.0
    top_k = int_in("top_k", SamplingConfig.top_k if top_k is None else top_k, 1, vocab_size)
    n = int_in("n", 1 if n is None else n, 1, MAX_SAMPLES)
    if seed is not None:
        seed = int_in("seed", seed, 0, 2**63 - 1)
    return float(temperature), top_k, n, seed, validate_stop(stop)


def validate_chat(
    messages,
    temperature=None,
    top_k=None,
    max_tokens=None,
    n=None,
    seed=None,
    stop=None,
    *,
    tokenizer,
    max_context: int,
    default_max_tokens: int = SamplingConfig.max_tokens,
) -> ChatRequest:
    """Check a chat request against the limits and the model; render its prompt.

    `None` for temperature, top_k or n means "default". An absent max_tokens means "up to
    `default_max_tokens`, or whatever room the context has left"; an explicit one that does not fit next to
    the prompt is an error on `messages`, since the conversation is what has grown too long.
    """
    clean = validate_messages(messages)
    temperature, top_k, n, seed, stops = validate_sampling(temperature, top_k, n, seed, stop, tokenizer.vocab_size)
    if max_tokens is not None:
        max_tokens = int_in("max_tokens", max_tokens, 1, max_context)

    prompt_ids = tokenizer.render_for_completion(clean)
    room = max_context - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        wanted = f" + max_tokens={max_tokens}" if max_tokens is not None else ""
        raise RequestError(
            "messages",
            f"the conversation is {len(prompt_ids)} tokens{wanted}, "
            f"more than the model's context of {max_context} tokens; "
            "shorten it or ask for fewer tokens",
        )
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    return ChatRequest(clean, temperature, top_k, max_tokens, n, seed, stops, prompt_ids)
