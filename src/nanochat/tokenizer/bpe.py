"""Train a byte-level BPE with HF `tokenizers` and export it to a `tiktoken.Encoding` for fast encoding.

Conventions (nanochat's): the GPT-4 split regex with digit groups of 1-2, the 256 byte values as the base
alphabet with id == byte value, merges numbered 256, 257, ... in the order they were learned, and the 9
special tokens appended after the merges, so `vocab_size = 256 + merges + 9`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cache

import tiktoken
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from nanochat.errors import UserError

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = (
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the calculator / python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's result, forced into the stream by the engine
    "<|output_end|>",
)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@cache
def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up.

    HF's ByteLevel pre-tokenizer stores tokens as strings over this alphabet; we need it to recover raw bytes.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _hf_tokenizer(model: BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class TrainingText:
    """A trainer's input texts, counted while the trainer reads them, so that an empty corpus gets one clear error."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            yield text

    def check(self) -> None:
        if self.chars == 0:
            raise UserError("no training text: the inputs contain no non-empty documents")


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size={vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )


def train_hf_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = True) -> Tokenizer:
    """Learn `vocab_size - 265` merges from `texts` and return an HF tokenizer with the special tokens appended.

    Raises UserError when vocab_size is below 265 or no text arrives. If the corpus runs out of pairs before
    reaching vocab_size, the vocabulary is smaller; callers read the real size from the result.
    """
    check_vocab_size(vocab_size)
    corpus = TrainingText(texts)

    # ignore_merges: a whole pre-token that is in the vocab maps straight to its id, as tiktoken does.
    tok = _hf_tokenizer(BPE(ignore_merges=True))
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=0,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(iter(corpus), trainer=trainer)
    corpus.check()
    return _renumber_bytes_first(tok)


def _renumber_bytes_first(trained: Tokenizer) -> Tokenizer:
    """Give byte b the id b (HF numbers its alphabet in sorted character order), merges 256+ in learned order."""
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = _hf_tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def hf_to_tiktoken(hf: Tokenizer, name: str = "nanochat") -> tiktoken.Encoding:
    """The same tokenizer as a tiktoken Encoding: ranks are the HF ids, specials keep their ids."""
    unicode_to_byte = {ch: b for b, ch in byte_to_unicode().items()}
    vocab = hf.get_vocab(with_added_tokens=False)
    ranks = {bytes(unicode_to_byte[ch] for ch in token): idx for token, idx in vocab.items()}
    specials = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
    return make_encoding(ranks, specials, name)


def tiktoken_to_hf(enc: tiktoken.Encoding) -> Tokenizer:
    """The HF `tokenizers` version of a tiktoken Encoding that follows these conventions (the inverse of
    hf_to_tiktoken). tiktoken merges whichever adjacent pair forms the lowest-ranked token, so every split of a
    token into two tokens becomes a merge, ordered by the rank of the token it forms."""
    to_unicode = byte_to_unicode()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab - len(SPECIAL_TOKENS))}
    text = {rank: "".join(to_unicode[b] for b in token) for token, rank in ranks.items()}
    merges = sorted(
        (rank, ranks[token[:i]], ranks[token[i:]])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    model = BPE(
        vocab={t: rank for rank, t in text.items()},
        merges=[(text[a], text[b]) for _, a, b in merges],
        ignore_merges=True,
    )
    tok = _hf_tokenizer(model)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def make_encoding(ranks: dict[bytes, int], specials: dict[str, int], name: str = "nanochat") -> tiktoken.Encoding:
    expected = list(range(len(ranks), len(ranks) + len(SPECIAL_TOKENS)))
    if sorted(ranks.values()) != list(range(len(ranks))) or [specials[t] for t in SPECIAL_TOKENS] != expected:
        raise UserError("tokenizer ids are not contiguous: ranks must be 0..n-1 with the 9 special tokens after them")
    return tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
