from nanochat.models.components.gpt import GPT
from nanochat.models.components.gpt_config import GPTConfig

__all__ = ["GPT", "GPTConfig"]
