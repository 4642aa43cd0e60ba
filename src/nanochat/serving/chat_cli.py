"""Chat in the terminal: `nanochat chat <run or export dir> [-p "prompt"]`.

Interactive mode keeps the whole conversation (re-rendered each turn, calculator calls included as the
tool tokens the model was trained on) and streams each reply as it is generated. Commands:
/clear (start over), /temperature <v>, /topk <k>, /help, /quit (also `quit`, `exit`, Ctrl-D). Ctrl-C stops
the reply being generated and keeps what was written so far. `-p "prompt"` answers once and prints only the
reply, for scripts.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.errors import UserError, exit_on_error
from nanochat.serving.generation import TextDelta, ToolUse, generate_events, tool_marker
from nanochat.serving.limits import MAX_TEMPERATURE, RequestError, validate_chat
from nanochat.settings import SamplingConfig

HELP = "commands: /clear  /temperature <0..2>  /topk <k>  /help  /quit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nanochat chat", description=__doc__.split("\n")[0], epilog=HELP)
    parser.add_argument("ckpt", help="a stage run dir (holding export/) or an export dir")
    parser.add_argument("-p", "--prompt", help="answer this one prompt, print only the reply, and exit")
    parser.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    parser.add_argument("--top-k", dest="top_k", type=int, default=SamplingConfig.top_k)
    parser.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=int,
        default=SamplingConfig.max_tokens,
        help="most new tokens per reply (fewer when the context is nearly full)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument(
        "--precision",
        default="auto",
        help="auto | fp32 | bf16 (auto: NANOCHAT_PRECISION if set, else bf16 where the device runs it natively)",
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a new one per reply)")
    parser.add_argument("--no-tools", dest="tools", action="store_false", help="do not run calculator calls")
    return parser.parse_args(argv)


class ChatSession:
    """A conversation with the engine: messages in the chat format, settings, and one streamed reply at a time."""

    def __init__(
        self,
        engine,
        tokenizer,
        temperature=SamplingConfig.temperature,
        top_k=SamplingConfig.top_k,
        max_tokens=SamplingConfig.max_tokens,
        seed=None,
    ):
        self.engine, self.tokenizer = engine, tokenizer
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        self.messages: list[dict] = []

    def set_temperature(self, value: str) -> str:
        t = float(value)
        if not 0 <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in 0..{MAX_TEMPERATURE:g}")
        self.temperature = t
        return f"temperature = {t:g}"

    def set_top_k(self, value: str) -> str:
        k = int(value)
        if not 1 <= k <= self.tokenizer.vocab_size:
            raise ValueError(f"top-k must be in 1..{self.tokenizer.vocab_size}")
        self.top_k = k
        return f"top-k = {k}"

    def reply(self, text: str, out) -> str:
        """Stream the answer to `text` into `out`; the exchange joins the conversation, even when interrupted."""
        messages = [*self.messages, {"role": "user", "content": text}]
        request = validate_chat(
            messages,
            self.temperature,
            self.top_k,
            None,
            seed=self.seed,
            tokenizer=self.tokenizer,
            max_context=self.engine.max_context,
            default_max_tokens=self.max_tokens,
        )
        parts: list[dict] = []
        shown = []
        try:
            for event in generate_events(self.engine, self.tokenizer, request, tools_as_text=False):
                if isinstance(event, TextDelta):
                    piece = event.text
                    if parts and parts[-1]["type"] == "text":
                        parts[-1]["text"] += piece
                    else:
                        parts.append({"type": "text", "text": piece})
                elif isinstance(event, ToolUse):
                    piece = tool_marker(event.expression, event.output)
                    parts.append({"type": "python", "text": event.expression})
                    if event.output is not None:
                        parts.append({"type": "python_output", "text": event.output})
                else:
                    continue
                shown.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # the generator's cleanup closes the engine's; keep the partial reply
            out.write(" [stopped]")
        self.messages = [*messages, {"role": "assistant", "content": parts}]
        return "".join(shown)


def repl(session: ChatSession, stdin=None, out=None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    out.write(f"nanochat: {HELP}\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # EOF (Ctrl-D or the end of piped input)
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        command, _, arg = text.partition(" ")
        try:
            if command in ("/quit", "/exit", "quit", "exit"):
                return
            if command == "/clear":
                session.messages = []
                out.write("(conversation cleared)\n")
            elif command == "/temperature":
                out.write(session.set_temperature(arg) + "\n")
            elif command == "/topk":
                out.write(session.set_top_k(arg) + "\n")
            elif command == "/help":
                out.write(HELP + "\n")
            elif command.startswith("/"):
                out.write(f"unknown command {command}; {HELP}\n")
            else:
                out.write("Assistant: ")
                session.reply(text, out)
                out.write("\n")
        except ValueError as e:  # bad command argument, or a RequestError (a UserError is a ValueError)
            hint = (
                " (use /clear to start a new conversation)"
                if isinstance(e, RequestError) and e.field == "messages"
                else ""
            )
            out.write(f"error: {e}{hint}\n")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from nanochat.serving import load_engine

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character should not end the chat
    engine, tokenizer, _meta, precision = load_engine(args.ckpt, args.device, args.tools, args.precision)
    print(f"{precision} on {engine.device}", file=sys.stderr)  # stderr: -p's stdout is the reply alone
    session = ChatSession(engine, tokenizer, args.temperature, args.top_k, args.max_tokens, args.seed)
    try:
        session.set_temperature(str(args.temperature))
        session.set_top_k(str(args.top_k))
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if args.prompt is not None:
        session.reply(args.prompt, sys.stdout)
        sys.stdout.write("\n")
        return
    repl(session)
