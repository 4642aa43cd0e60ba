from nanochat.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN
from nanochat.tokenizer.tokenizer import Tokenizer

__all__ = ["SPECIAL_TOKENS", "SPLIT_PATTERN", "Tokenizer"]
