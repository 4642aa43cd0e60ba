from nanochat.models.components.gpt_config import GPTConfig
from nanochat.models.components.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
