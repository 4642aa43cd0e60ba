from nanochat.models.components.config import GPTConfig
from nanochat.models.components.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
