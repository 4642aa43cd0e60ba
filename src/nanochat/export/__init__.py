"""Models in and out of the project.

- `export_dir`: the export directory every stage writes and every stage, server and CLI reads.
- `hf`: to and from Hugging Face transformers' NanoChat format (`nanochat export hf ...`).
- `nanochat_checkpoint`: nanochat's own `model_<step>.pt` + `meta_<step>.json` + `tokenizer.pkl`.
- `imports`: `hf:<dir or repo id>` and `nanochat:<checkpoint dir>[@step]` wherever a checkpoint is taken, converted
  once into an ordinary export directory under the nanochat home.
- `hub`: the model card and the upload to the Hugging Face Hub.
"""

from nanochat.export.export_dir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_export,
    load_export,
    load_weights,
    parent_meta,
    read_export_config,
    recover_export,
    save_export,
    stage_tokenizer,
)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "find_export",
    "load_export",
    "load_weights",
    "parent_meta",
    "read_export_config",
    "recover_export",
    "save_export",
    "stage_tokenizer",
]
