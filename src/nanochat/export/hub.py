"""The Hugging Face Hub: fetching a repo for `hf:<owner>/<name>`, the model card, and `--push-to-hub`.

Fetching goes through huggingface_hub's cache (`snapshot_download`), so a repo is downloaded once and
`HF_HUB_OFFLINE=1` works from the cache. Uploading needs a token (`hf auth login` or HF_TOKEN) and the network.
The model card is built from the export's meta and, when the export belongs to a run, from the run's report card
(runs/<run>/report/*.json): the summary metrics and each training stage's settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.errors import UserError

SMALL_FILES = ["*.json", "*.jinja", "tokenizer.pkl", "token_bytes.pt"]  # configs, tokenizers, nanochat's meta_*.json
HF_WEIGHTS = ["*.safetensors"]


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("the Hugging Face Hub needs huggingface_hub: pip install 'nanochat[hf]'") from None
    return huggingface_hub


def snapshot(repo: str, revision: str | None = None) -> Path:
    """The local snapshot dir of a Hub repo with the files an import reads: small files first, then the weights of
    whichever format the repo holds (transformers' safetensors, or nanochat's latest model_<step>.pt)."""
    from nanochat.export import nanochat_checkpoint

    hub = _hub()
    from huggingface_hub import errors

    def download(patterns: list[str]) -> Path:
        try:
            return Path(hub.snapshot_download(repo, revision=revision, allow_patterns=patterns))
        except errors.RepositoryNotFoundError:
            raise UserError(
                f"no Hugging Face repo {repo} (if it is private or gated, log in with `hf auth login`)"
            ) from None
        except errors.RevisionNotFoundError:
            raise UserError(f"the Hugging Face repo {repo} has no revision {revision!r}") from None
        except errors.LocalEntryNotFoundError:
            fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
            why = "HF_HUB_OFFLINE is set" if hub.constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
            raise UserError(
                f"hf:{repo} is not in the Hugging Face cache and {why}; fetch it once with network access "
                f"(`{fetch}`) and run again"
            ) from None
        except errors.HfHubHTTPError as e:
            raise UserError(f"downloading {repo} from the Hugging Face Hub failed ({str(e).splitlines()[0]})") from None

    small = download(SMALL_FILES)
    if (small / "config.json").is_file():
        return download(SMALL_FILES + HF_WEIGHTS)
    metas = sorted(small.glob("meta_*.json"))
    if metas:
        step = max(int(p.stem.removeprefix("meta_")) for p in metas if p.stem.removeprefix("meta_").isdigit())
        path = download(SMALL_FILES + [f"model_{step:06d}.pt", f"model_{step}.pt"])
        nanochat_checkpoint.model_file(path, step)  # refuses a repo whose weights file is missing
        return path
    raise UserError(
        f"the Hugging Face repo {repo} holds neither a transformers model (config.json) nor a nanochat "
        "checkpoint (meta_<step>.json)"
    )


# --- the model card ----------------------------------------------------------------------------------------------
def run_root(export: Path) -> Path | None:
    """runs/<run>/ when `export` is runs/<run>/<stage>/export of a run with a report card, else None."""
    root = export.parent.parent
    return root if export.name == "export" and (root / "report").is_dir() else None


def report_sections(root: Path) -> dict[str, dict]:
    sections = {}
    for path in sorted((root / "report").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the card is a summary: a broken section is left out rather than failing the export
        if isinstance(data, dict) and path.stem != "header":
            sections[path.stem] = data
    return sections


def _table(header: list[str], rows: list[list]) -> str:
    from nanochat.report import format_value

    def cell(v) -> str:
        return format_value(v).replace("|", "\\|").replace("\n", " ")

    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    )


def metrics_table(sections: dict[str, dict]) -> str | None:
    """The report card's summary: each headline metric per stage, a standalone evaluation before training's number."""
    from nanochat.report import STAGE_COLUMNS, SUMMARY_METRICS

    def value(stage: str, metric: str):
        for key in (f"{stage}-eval", stage):
            v = sections.get(key, {}).get("metrics", {}).get(metric)
            if v is not None:
                return v
        return "-"

    stages = [s for s in STAGE_COLUMNS if s in sections or f"{s}-eval" in sections]
    rows = [[label] + [value(s, m) for s in stages] for label, m in SUMMARY_METRICS]
    rows = [r for r in rows if any(c != "-" for c in r[1:])]
    return _table(["Metric", *(s.upper() for s in stages)], rows) if rows else None


def model_card(export: Path, config, meta: dict, repo_id: str | None = None) -> str:
    """README.md for the Hub: what the model is, how to use it, its metrics and how it was trained."""
    from nanochat.report import SECTION_ORDER, STAGE_NAMES
    from nanochat.serving import default_model_name

    name = repo_id or default_model_name(export)
    stage, step = meta.get("stage"), meta.get("step")
    lines = [
        "---",
        "library_name: transformers",
        "license: mit",
        "pipeline_tag: text-generation",
        "tags:",
        "- nanochat",
        "---",
        "",
        f"# {name}",
        "",
    ]
    trained = f"the {STAGE_NAMES.get(stage, stage)} stage" if stage else "a nanochat run"
    lines += [
        f"A nanochat GPT ({config.summary()}) from {trained}"
        + (f" at step {step}" if step is not None else "")
        + ", in transformers' NanoChat format (`NanoChatForCausalLM`, no custom code).",
        "",
    ]
    repo = repo_id or "<this repo>"
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        'messages = [{"role": "user", "content": "Why is the sky blue?"}]',
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        'print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "With nanochat: fine-tune, evaluate or serve it by naming it where a checkpoint is taken:",
        "",
        "```bash",
        f"nanochat train stage=sft init_from=hf:{repo} model=d{config.n_layer} ...",
        f"nanochat serve ckpt=hf:{repo}",
        "```",
        "",
    ]
    root = run_root(export)
    sections = report_sections(root) if root is not None else {}
    table = metrics_table(sections)
    if table:
        lines += ["## Evaluation", "", f"From the report card of the run `{root.name}`.", "", table, ""]
    elif meta.get("metrics"):
        lines += ["## Evaluation", "", _table(["Metric", "Value"], [[k, v] for k, v in meta["metrics"].items()]), ""]
    training = [k for k in SECTION_ORDER if not k.endswith("-eval") and sections.get(k, {}).get("items")]
    if training:
        lines += ["## Training", ""]
        for key in training:
            items = sections[key]["items"]
            rows = [[k, v] for k, v in items.items()]
            lines += [f"### {STAGE_NAMES.get(key, key)}", "", _table(["Setting", "Value"], rows), ""]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` as the model repo `repo_id` (created if needed); the URL of the commit."""
    hub = _hub()
    from huggingface_hub import errors

    if hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set and the upload needs the network")
    api = hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload a nanochat model (nanochat export hf)",
        )
    except errors.LocalTokenNotFoundError:
        raise UserError(
            f"pushing to {repo_id} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"
        ) from None
    except errors.HfHubHTTPError as e:
        raise UserError(f"pushing to {repo_id} failed ({str(e).splitlines()[0]})") from None
    return str(getattr(commit, "commit_url", commit))
