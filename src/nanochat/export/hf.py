"""Hugging Face transformers' NanoChat format (model_type "nanochat", NanoChatForCausalLM), both directions.

NanoChatForCausalLM is this project's GPT: rotary embeddings then QK-norm with the same rotation sign, a
parameter-free RMSNorm (also right after the embedding), ReLU^2 MLP of 4x width, untied head, logit softcap.
Weight names map one to one (`KEY_MAP`). Our norm is `F.rms_norm` without an eps, which takes the input dtype's
machine epsilon; transformers' norm computes in fp32 with `rms_norm_eps`, so the export writes float32's epsilon
(1.1920929e-07) and fp32 logits agree to rounding.

    <out>/
      config.json              NanoChatConfig (+ "nanochat": the export's stage, step and metrics)
      model.safetensors        the weights under transformers' names (fp32 unless asked otherwise)
      generation_config.json   stops at <|assistant_end|> or <|bos|>, as the engine does
      tokenizer.json           the same BPE; encoding text puts <|bos|> in front, as every training document had
      tokenizer_config.json    special tokens and a chat template rendering exactly the ids of render_for_completion

Importing reads such a dir (ours or the Hub's) back into an export dir: the tiktoken runtime is built from
tokenizer.json and must give the same ids as it on a probe text.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from nanochat.errors import UserError
from nanochat.io import atomic_write

MODEL_TYPE = "nanochat"
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm(x, shape) uses for fp32 x when given no eps
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# GPTConfig fields NanoChatConfig has an equivalent for; any other field must keep its default to export.
EXPORTED_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "rope_base", "softcap")
LAYER_KEYS = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
META_KEYS = ("stage", "step", "tokens", "metrics")  # what an export's meta carries into the HF config and back
PROBE = (
    "The year 1984 had 365 days; 3.14159 is π. Le cœur a ses raisons. 日本語と中文。 Привет, мир! 🤖\n"
    "def f(x):\n    return x**2  # comment\n\n\t  trailing   spaces   \r\nI'm sure they'll've done it."
)

# Mirrors nanochat.tokenizer.chat_format: <|bos|>, a leading system (or developer) message merged into the first user
# message with a blank line, user/assistant alternating, assistant parts text / python / python_output.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- if not messages or messages[0]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- else -%}{%- set system = none -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant after an optional first system message') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}{%- if loop.first and system is not none -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{%- for part in parts -%}{{- ('' if loop.first else '\\n') + part['text'] -}}{%- endfor -%}"
    "{{- '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('assistant content parts are text, python or python_output') -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


# --- the model ---------------------------------------------------------------------------------------------------
def key_map(n_layer: int) -> dict[str, str]:
    """Our state-dict name -> transformers' name."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in LAYER_KEYS.items():
            names[f"transformer.h.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def hf_refusals(config) -> list[str]:
    """The features of `config` NanoChatForCausalLM lacks: what the config says of itself (`hf_unsupported`), plus
    every field without a NanoChatConfig equivalent that differs from its default (so new switches are refused
    until the export learns them)."""
    found = list(config.hf_unsupported()) if hasattr(config, "hf_unsupported") else []
    for f in fields(config):
        if f.name in EXPORTED_FIELDS:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(config, f.name)
        if default is MISSING or value != default:
            found.append(f"{f.name}={value!r}")
    return found


def hf_config(config, tokenizer, meta: dict, dtype: torch.dtype) -> dict:
    t = tokenizer.token_id
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "attention_dropout": 0.0,
        "attention_bias": False,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "final_logit_softcapping": float(config.softcap),
        "tie_word_embeddings": False,
        "bos_token_id": t("<|bos|>"),
        "eos_token_id": t("<|assistant_end|>"),
        "pad_token_id": None,  # the embedding must not freeze a row (transformers zeroes the padding row's gradient)
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "nanochat": {k: meta[k] for k in META_KEYS if k in meta},
    }


def export_hf(src, out_dir: str | Path, dtype: torch.dtype = torch.float32, repo_id: str | None = None) -> Path:
    """Write the model of `src` (anything `find_export` takes) as a transformers NanoChat dir at `out_dir`, with a
    model card (README.md) titled `repo_id` when given."""
    from safetensors.torch import save_file

    from nanochat.export.export_dir import find_export, load_export, staged_dir
    from nanochat.export.hub import model_card

    export = find_export(src)
    model, tokenizer, meta = load_export(export)
    refused = hf_refusals(model.config)
    if refused:
        raise UserError(
            f"the model in {src} uses {', '.join(refused)}, which transformers' NanoChatForCausalLM does "
            "not have; it cannot be exported to the Hugging Face format"
        )
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not is_nanochat_hf_dir(out_dir):
        raise UserError(f"{out_dir} exists and is not a Hugging Face NanoChat export; choose a new or empty directory")
    names = key_map(model.config.n_layer)
    state = {names[k]: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    with staged_dir(out_dir) as staging:
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        write_json(staging / "config.json", hf_config(model.config, tokenizer, meta, dtype))
        t = tokenizer.token_id
        write_json(
            staging / "generation_config.json",
            {
                "bos_token_id": t("<|bos|>"),
                "eos_token_id": [t("<|assistant_end|>"), t("<|bos|>")],
                "pad_token_id": t("<|assistant_end|>"),
            },
        )
        write_tokenizer(tokenizer, staging, model.config.sequence_len)
        atomic_write(staging / "README.md", model_card(export, model.config, meta, repo_id))
    return out_dir


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = HFTokenizer.from_str(tokenizer.hf_tokenizer().to_str())  # a copy: our own never adds <|bos|> by itself
    bos = tokenizer.bos_token_id
    hf.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    atomic_write(out / TOKENIZER, hf.to_str())
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|bos|>",
            "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>",
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_length,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def is_nanochat_hf_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


# --- importing -----------------------------------------------------------------------------------------------------
def source_files(src: Path) -> list[Path]:
    """The files of an HF dir an import reads (for its fingerprint)."""
    names = ["config.json", WEIGHTS, WEIGHTS_INDEX, TOKENIZER, "tokenizer_config.json"]
    return [src / n for n in names if (src / n).is_file()] + sorted(src.glob("model-*.safetensors"))


def read_config(src: Path) -> dict:
    try:
        config = json.loads((src / "config.json").read_text())
    except OSError as e:
        raise UserError(f"{src} has no readable config.json ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{src / 'config.json'} holds no JSON object")
    if config.get("model_type") != MODEL_TYPE:
        raise UserError(
            f"{src} holds a Hugging Face {config.get('model_type')!r} model; only model_type "
            f"{MODEL_TYPE!r} (NanoChatForCausalLM, nanochat's architecture) converts to this project's GPT"
        )
    return config


def gpt_config(hf: dict, src: Path):
    """Our GPTConfig for an HF NanoChatConfig dict; a feature our GPT lacks is refused, naming it."""
    from nanochat.models.components import GPTConfig

    def refuse(feature: str):
        raise UserError(f"{src / 'config.json'} uses {feature}, which this project's GPT does not have")

    try:
        width, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        layers, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{src / 'config.json'} lacks a valid {e} for the model's shape") from None
    if hf.get("hidden_act", "relu2") != "relu2":
        refuse(f"hidden_act={hf['hidden_act']!r} (ours is relu2)")
    if hf.get("attention_bias"):
        refuse("attention biases")
    if hf.get("tie_word_embeddings"):
        refuse("tied input and output embeddings")
    if hf.get("intermediate_size", 4 * width) != 4 * width:
        refuse(f"intermediate_size={hf['intermediate_size']} (ours is 4 x hidden_size = {4 * width})")
    if hf.get("head_dim") not in (None, width // heads):
        refuse(f"head_dim={hf['head_dim']} (ours is hidden_size / num_attention_heads = {width // heads})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"rope_type={rope.get('rope_type', rope.get('type'))!r} (ours is the default rotary embedding)")
    softcap = hf.get("final_logit_softcapping", 15.0)
    if softcap is None:
        refuse("no logit softcap")
    return GPTConfig(
        sequence_len=int(hf.get("max_position_embeddings", 2048)),
        vocab_size=vocab,
        n_layer=layers,
        n_head=heads,
        n_kv_head=int(hf.get("num_key_value_heads") or heads),
        n_embd=width,
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        softcap=float(softcap),
    )


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (src / WEIGHTS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((src / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{src / WEIGHTS_INDEX} is not a valid safetensors index ({e})") from None
    elif (src / WEIGHTS).is_file():
        shards = [WEIGHTS]
    elif any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise UserError(
            f"{src} holds its weights as pickles (.bin/.pt); only safetensors weights are read from a "
            "Hugging Face dir (pickles can run code)"
        )
    else:
        raise UserError(f"{src} holds no weights ({WEIGHTS} or {WEIGHTS_INDEX})")
    state = {}
    for shard in shards:
        try:
            state.update(load_file(str(src / shard)))
        except Exception as e:  # safetensors raises its own error types for missing or truncated files
            raise UserError(f"{src / shard} is unreadable ({e})") from None
    return state


def checked_state(hf_state: dict[str, torch.Tensor], model, where: Path) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from `hf_state`, whose names and shapes must be exactly `model`'s."""
    names = {theirs: ours for ours, theirs in key_map(model.config.n_layer).items()}
    missing, unexpected = sorted(set(names) - set(hf_state)), sorted(set(hf_state) - set(names))
    if missing or unexpected:
        raise UserError(
            f"the weights in {where} do not match config.json's NanoChat model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    expected = model.state_dict()
    state = {}
    for theirs, tensor in hf_state.items():
        ours = names[theirs]
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise UserError(
                f"{theirs} in {where} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[ours].shape)}: the weights and the config disagree"
            )
        state[ours] = tensor.to(torch.float32)
    return state


def tokenizer_from_hf(path: Path, vocab_size: int):
    """The runtime Tokenizer for an HF tokenizer.json, refused unless it is nanochat's kind of BPE with `vocab_size`
    ids and its tiktoken conversion gives the same ids on the probe text."""
    from tokenizers import Tokenizer as HFTokenizer

    from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
    from nanochat.tokenizer.bpe import hf_to_tiktoken

    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}: the model's tokenizer must come with it")
    try:
        data = json.loads(path.read_text())
        data["post_processor"] = None  # ours adds no <|bos|> by itself; callers prepend it
        hf = HFTokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    patterns = [
        p.get("pattern", {}).get("Regex")
        for p in (data.get("pre_tokenizer") or {}).get("pretokenizers", [])
        if p.get("type") == "Split"
    ]
    if patterns != [SPLIT_PATTERN]:
        raise UserError(
            f"{path} splits text with {patterns or 'no Split pattern'}, not nanochat's pattern; "
            "it is not a nanochat tokenizer"
        )
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        raise UserError(f"{path} lacks nanochat's special tokens {', '.join(missing)}")
    try:
        encoding = hf_to_tiktoken(hf)
    except KeyError:
        raise UserError(
            f"{path} is not a byte-level BPE (a token holds a character outside the byte alphabet)"
        ) from None
    tokenizer = Tokenizer(encoding, hf)
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"{path} has {tokenizer.vocab_size:,} tokens but the model's vocab_size is {vocab_size:,}: "
            "the tokenizer does not belong to these weights"
        )
    check_probe(tokenizer, path)
    return tokenizer


def check_probe(tokenizer, where: Path) -> None:
    """The tiktoken runtime and the HF tokenizer must agree on the probe text (ids, and decoding back)."""
    ours = tokenizer.encode(PROBE)
    theirs = tokenizer.hf_tokenizer().encode(PROBE, add_special_tokens=False).ids
    if ours != theirs or tokenizer.decode(ours) != PROBE:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise UserError(
            f"the tokenizer of {where} gives different ids under tiktoken and under tokenizers from "
            f"token {at} of a probe text on; it cannot be converted faithfully"
        )


def import_hf(src: Path, out: Path, source: dict) -> Path:
    """Convert the HF NanoChat dir `src` into the export dir `out`."""
    from nanochat.export.export_dir import save_export
    from nanochat.models.components import GPT

    hf = read_config(src)
    config = gpt_config(hf, src)
    tokenizer = tokenizer_from_hf(src / TOKENIZER, config.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(checked_state(read_weights(src), model, src), assign=True)
    carried = hf.get("nanochat") if isinstance(hf.get("nanochat"), dict) else {}
    meta = {**{k: carried[k] for k in META_KEYS if k in carried}, "source": source}
    return save_export(model, tokenizer, out, meta)
