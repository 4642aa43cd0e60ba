"""The runtime tokenizer: tiktoken for fast encoding, plus special tokens, chat rendering and save/load.

A saved tokenizer is a directory:
- `tokenizer.tiktoken`: the mergeable ranks in tiktoken's format (base64 token bytes, space, id; one per line),
- `tokenizer_config.json`: split pattern, special tokens and their ids, vocab size,
- `tokenizer.json`: the HF `tokenizers` version of the same tokenizer, for interoperability and parity checks.
No pickles: loading a tokenizer never executes code from the file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import tiktoken
import torch

from nanochat.errors import UserError
from nanochat.io import atomic_write
from nanochat.settings import TokenizerConfig, check_tokenizer_trainer
from nanochat.tokenizer import chat_format
from nanochat.tokenizer.bpe import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    hf_to_tiktoken,
    make_encoding,
    tiktoken_to_hf,
    train_hf_bpe,
)

RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, hf=None):
        self.enc = encoding
        self.hf = hf  # tokenizers.Tokenizer with the same ids, when available
        self._specials = {t: encoding.encode_single_token(t) for t in SPECIAL_TOKENS}
        self._token_bytes: torch.Tensor | None = None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(
        cls, texts, vocab_size: int = 65536, *, show_progress: bool = True, trainer: str = TokenizerConfig.trainer
    ) -> Tokenizer:
        """BPE from `texts`: `trainer` rustbpe (default, the faster) or hf (HF `tokenizers`); the same conventions and
        files either way."""
        if trainer == "rustbpe":
            from nanochat.tokenizer.rustbpe_trainer import train_rustbpe

            ranks = train_rustbpe(texts, vocab_size, show_progress=show_progress)
            enc = make_encoding(ranks, {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)})
            return cls(enc, tiktoken_to_hf(enc))
        check_tokenizer_trainer(trainer)
        hf = train_hf_bpe(texts, vocab_size, show_progress=show_progress)
        return cls(hf_to_tiktoken(hf), hf)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        n_ranks = self.vocab_size - len(self._specials)  # ranks are ids 0..n-1; specials follow
        lines = (f"{base64.b64encode(self.enc.decode_single_token_bytes(i)).decode()} {i}" for i in range(n_ranks))
        atomic_write(directory / RANKS_FILE, "\n".join(lines) + "\n")
        config = {"pattern": SPLIT_PATTERN, "special_tokens": self._specials, "vocab_size": self.vocab_size}
        atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2))
        if self.hf is not None:
            atomic_write(directory / HF_FILE, self.hf.to_str())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        ranks_path, config_path = directory / RANKS_FILE, directory / CONFIG_FILE
        if not ranks_path.is_file() or not config_path.is_file():
            raise UserError(
                f"no tokenizer in {directory} (expected {RANKS_FILE} and {CONFIG_FILE}); "
                "train one with `nanochat tokenizer train --input <text>`"
            )
        try:
            config = json.loads(config_path.read_text())
            pattern, specials = config["pattern"], config["special_tokens"]
            ranks = {}
            for line in ranks_path.read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, KeyError, TypeError) as e:  # binascii and JSON errors are ValueErrors
            raise UserError(f"tokenizer files in {directory} are corrupt ({type(e).__name__}: {e})") from None
        if pattern != SPLIT_PATTERN:
            raise UserError(f"{config_path} uses a different split pattern than this version of nanochat")
        encoding = make_encoding(ranks, specials)
        hf = None
        if (directory / HF_FILE).is_file():
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_file(str(directory / HF_FILE))
        return cls(encoding, hf)

    def hf_tokenizer(self):
        """The HF `tokenizers` version (tokenizer.json): the one trained or loaded, else converted from the ranks."""
        if self.hf is None:
            self.hf = tiktoken_to_hf(self.enc)
        return self.hf

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def same_as(self, other: Tokenizer) -> bool:
        """Whether both map every id to the same bytes and the same special tokens (what a model's weights assume)."""
        if self.vocab_size != other.vocab_size or self._specials != other._specials:
            return False
        decode_a, decode_b = self.enc.decode_single_token_bytes, other.enc.decode_single_token_bytes
        specials = set(self._specials.values())
        return all(decode_a(i) == decode_b(i) for i in range(self.vocab_size) if i not in specials)

    def token_id(self, special: str) -> int:
        """The id of a special token such as '<|bos|>'."""
        try:
            return self._specials[special]
        except KeyError:
            raise UserError(f"unknown special token {special!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    @property
    def bos_token_id(self) -> int:
        return self._specials["<|bos|>"]

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab_size,): raw UTF-8 byte length of each token, 0 for special tokens (for bits per byte)."""
        if self._token_bytes is None:
            special_ids = set(self._specials.values())
            lengths = [
                0 if i in special_ids else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)
            ]
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes

    # --- encode / decode ----------------------------------------------------------------------
    def _id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.token_id(token)

    def encode(self, text: str, prepend: int | str | None = None, append: int | str | None = None) -> list[int]:
        """Encode text as ordinary text: special-token strings inside it are not parsed as special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_batch for lists")
        ids = self.enc.encode_ordinary(text)
        if prepend is not None:
            ids.insert(0, self._id(prepend))
        if append is not None:
            ids.append(self._id(append))
        return ids

    def encode_batch(
        self, texts: list[str], prepend: int | str | None = None, append: int | str | None = None, num_threads: int = 8
    ) -> list[list[int]]:
        batch = self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        head = [self._id(prepend)] if prepend is not None else []
        tail = [self._id(append)] if append is not None else []
        return [head + ids + tail for ids in batch] if head or tail else batch

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    # --- chat ---------------------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) for a conversation; mask 1 marks tokens trained on. See nanochat.tokenizer.chat_format."""
        return chat_format.render_conversation(self, conversation, max_tokens)

    def render_for_completion(self, conversation) -> list[int]:
        return chat_format.render_for_completion(self, conversation)
