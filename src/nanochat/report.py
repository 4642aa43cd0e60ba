"""The report card of one pipeline run: each stage stores a JSON section, `generate` renders them into report.md.

Sections live as `<run_root>/report/<key>.json` so that a stage can be re-run (or resumed) and simply replace
its own section; report.md is always re-rendered from all of them, never appended to. Callers under DDP
write from rank zero only.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from collections import Counter
from datetime import datetime
from importlib import metadata
from pathlib import Path

from nanochat.errors import UserError
from nanochat.io import atomic_write

REPO = Path(__file__).resolve().parents[2]

SECTION_ORDER = ("tokenizer", "base", "base-eval", "mid", "mid-eval", "sft", "sft-eval", "rl", "rl-eval")
SUMMARY_METRICS = (
    ("CORE", "core/score"),
    ("ARC-Easy", "chat/arc_easy"),
    ("ARC-Challenge", "chat/arc_challenge"),
    ("MMLU", "chat/mmlu"),
    ("GSM8K", "chat/gsm8k"),
    ("GSM8K pass@1 (T=1)", "chat/gsm8k_pass@1"),
    ("HumanEval", "chat/humaneval"),
    ("SpellingBee", "chat/spelling_bee"),
    ("Arithmetic (built-in)", "chat/arithmetic"),
    ("Arithmetic pass@1 (T=1)", "chat/arithmetic_pass@1"),
    ("ChatCORE", "chat/chatcore"),
)
STAGE_COLUMNS = ("base", "mid", "sft", "rl")
STAGE_NAMES = {"tokenizer": "Tokenizer", "base": "Base model", "mid": "Midtraining", "sft": "SFT", "rl": "RL"}
TRAINING_TITLES = {"tokenizer": "Tokenizer training", "base": "Base model training"}


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def write_section(run_root, key: str, section: dict) -> Path:
    """Store one section as report/<key>.json (replacing an earlier one), then regenerate report.md."""
    if not key or "/" in key or "\\" in key or key.startswith(".") or key == "header":
        raise UserError(f"report section key {key!r} is not a plain name like 'base' or 'sft-eval'.")
    report_dir = Path(run_root) / "report"
    section = {**section}
    section.setdefault("timestamp", _now())
    start_run(run_root)  # normally done when the first stage started; this covers a section written on its own
    # default=str keeps a stray Path or numpy scalar from losing the whole section.
    atomic_write(report_dir / f"{key}.json", json.dumps(section, indent=2, default=str))
    return generate(run_root)


def start_run(run_root) -> None:
    """Record when the run started and on what machine and code: once, when its first stage starts."""
    path = Path(run_root) / "report" / "header.json"
    if not path.exists():
        atomic_write(path, json.dumps(header(), indent=2))


def _load(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(
            f"report section {path} is not valid JSON ({e.msg}, line {e.lineno}); "
            "fix it or delete it and re-run its stage."
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"report section {path} holds a JSON {type(data).__name__}, not an object.")
    return data


def generate(run_root) -> Path:
    """Render header + sections (known stages in pipeline order, others after, sorted) + summary into report.md."""
    run_root = Path(run_root)
    report_dir = run_root / "report"
    head_path = report_dir / "header.json"
    head = _load(head_path) if head_path.exists() else {}
    sections = {p.stem: _load(p) for p in sorted(report_dir.glob("*.json")) if p.name != "header.json"}
    keys = [k for k in SECTION_ORDER if k in sections] + sorted(k for k in sections if k not in SECTION_ORDER)
    parts = [_render_header(run_root.name, head)]
    parts += [_render_section(k, sections[k]) for k in keys]
    parts.append(_render_summary({k: sections[k] for k in keys}))
    out = run_root / "report.md"
    atomic_write(out, "\n\n".join(parts) + "\n")
    return out


def header() -> dict:
    return {"started": _now(), "system": system_info(), "git": git_info(REPO), "code_size": code_size(REPO)}


def system_info() -> dict:
    import torch  # lazily: rendering a report should not pay for torch's import

    cpu = platform.processor() or "unknown"
    try:  # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo has the model name
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        ram_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # sysconf is POSIX-only
        ram_gib = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    try:
        lightning = metadata.version("lightning")
    except metadata.PackageNotFoundError:
        lightning = "not installed"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "lightning": lightning,
    }


def git_info(repo) -> dict:
    unknown = dict.fromkeys(("commit", "branch", "dirty", "message"), "unknown")
    # Without this check git would walk up and describe whatever repository encloses `repo`.
    if not (Path(repo) / ".git").exists():
        return unknown

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain")),
            "message": git("log", "-1", "--format=%s"),
        }
    except (OSError, subprocess.SubprocessError):
        return unknown


def code_size(repo) -> dict:
    repo = Path(repo)
    found = {*repo.glob("src/nanochat/**/*.py"), *repo.glob("conf/**/*.yaml"), *repo.glob("*.py")}
    texts = [
        p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(found)
        if p.is_file()
        and not any(
            part in ("tests", "__pycache__") or part.endswith(".egg-info") for part in p.relative_to(repo).parts
        )
    ]
    chars = sum(len(t) for t in texts)
    return {
        "characters": chars,
        "lines": sum(len(t.splitlines()) for t in texts),
        "files": len(texts),
        "tokens": chars // 4,
    }


def format_value(v) -> str:
    if isinstance(v, bool) or v is None:  # bool before int: True is an int
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v)


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _cell(v) -> str:
    return format_value(v).replace("|", "\\|").replace("\n", " ")


def _table(columns, rows) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def _title(key: str) -> str:
    if key.endswith("-eval"):
        stage = key[: -len("-eval")]
        return f"{STAGE_NAMES.get(stage, stage.capitalize())} evaluation"
    return TRAINING_TITLES.get(key) or STAGE_NAMES.get(key) or key.capitalize()


def _render_header(run: str, head: dict) -> str:
    sysi, git, size = head.get("system", {}), head.get("git", {}), head.get("code_size", {})
    gpus = Counter(f"{g['name']} ({g['memory_gib']} GiB)" for g in sysi.get("gpus", []))
    dirty = {True: "dirty", False: "clean"}.get(git.get("dirty"), "dirty: unknown")
    lines = [
        "# nanochat report card",
        "",
        f"- Run: {run}",
        f"- Generated: {_now()}",
        f"- Run started: {head.get('started', 'unknown')}",
        (
            f"- Git: {git.get('commit', 'unknown')} on {git.get('branch', 'unknown')} ({dirty}): "
            f"{git.get('message', 'unknown')}"
        ),
        f"- Platform: {sysi.get('platform', 'unknown')}",
        f"- CPU: {sysi.get('cpu', 'unknown')}, {sysi.get('cpu_cores', 'unknown')} cores",
        f"- RAM: {ram} GiB" if (ram := sysi.get("ram_gib")) else "- RAM: unknown",
        f"- GPUs: {', '.join(f'{n} x {g}' for g, n in gpus.items()) or 'none'}",
        (
            f"- Python {sysi.get('python', 'unknown')}, PyTorch {sysi.get('torch', 'unknown')}, "
            f"CUDA {sysi.get('cuda', 'unknown')}, Lightning {sysi.get('lightning', 'unknown')}"
        ),
    ]
    if size:
        lines.append(
            f"- Code size: {format_value(size['characters'])} characters, {format_value(size['lines'])} "
            f"lines, {size['files']} files, ≈{format_value(size['tokens'])} tokens"
        )
    return "\n".join(lines)


def _render_section(key: str, sec: dict) -> str:
    parts = [f"## {sec.get('title') or _title(key)}"]
    when = [f"timestamp: {sec['timestamp']}"] if "timestamp" in sec else []
    if isinstance(sec.get("wall_time_s"), (int, float)):
        when.append(f"wall time: {_duration(sec['wall_time_s'])}")
    if when:
        parts.append(", ".join(when))
    if sec.get("items"):
        parts.append("\n".join(f"- {k}: {format_value(v)}" for k, v in sec["items"].items()))
    for t in sec.get("tables", []):
        parts.append(f"### {t.get('title', '')}\n\n{_table(t['columns'], t['rows'])}")
    # Per-task scores (core/<task>, chat/<task>) are stored for the summary but listed only in the tables above.
    shown = {
        k: v
        for k, v in sec.get("metrics", {}).items()
        if not (sec.get("tables") and k.startswith(("core/", "chat/")) and k not in ("core/score", "chat/chatcore"))
    }
    if shown:
        parts.append("### Final metrics\n\n" + "\n".join(f"- {k}: {format_value(v)}" for k, v in shown.items()))
    parts += [f"![{sec.get('title') or _title(key)}]({Path(p).as_posix()})" for p in sec.get("plots", [])]
    if sec.get("notes"):
        parts.append("\n".join(sec["notes"]))
    return "\n\n".join(parts)


def _render_summary(sections: dict) -> str:
    def value(stage: str, metric: str):
        for key in (f"{stage}-eval", stage):  # a dedicated evaluation beats the number logged during training
            v = sections.get(key, {}).get("metrics", {}).get(metric)
            if v is not None:
                return format_value(v)
        return "-"

    rows = [[label] + [value(s, m) for s in STAGE_COLUMNS] for label, m in SUMMARY_METRICS]
    rows = [r for r in rows if any(c != "-" for c in r[1:])]
    parts = ["## Summary"]
    parts.append(
        _table(["Metric", *(s.upper() for s in STAGE_COLUMNS)], rows)
        if rows
        else "No summary metrics were recorded yet."
    )
    if rows and any(k.endswith("-eval") for k in sections):
        parts.append(
            "Where a stage has a standalone evaluation section, its numbers are shown here rather than "
            "the ones measured at the end of training."
        )
    timed = [k for k, s in sections.items() if isinstance(s.get("wall_time_s"), (int, float))]
    if timed:
        total = sum(sections[k]["wall_time_s"] for k in timed)
        parts.append(f"Total wall clock time: {_duration(total)} ({', '.join(timed)})")
    else:
        parts.append("Total wall clock time: unknown (no section recorded wall_time_s)")
    return "\n\n".join(parts)


def _read_curves(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """Metric -> {step: value}; a resumed run re-logs some steps, and its later value is the one that counts."""
    curves: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            for name, value in row.items():
                try:
                    curves.setdefault(name, {})[step] = float(value or "")
                except (TypeError, ValueError):  # the sparse rows: this metric was not logged on this row
                    pass
    curves.pop("step", None)
    return {name: dict(sorted(points.items())) for name, points in curves.items() if points}


AXIS_LABELS = {
    "train/loss": "train/loss (nats per token)",
    "val/bpb": "val/bpb (bits per byte, held out)",
    "val/loss": "val/loss (nats per token, held out)",
    "rl/reward": "rl/reward (mean per sample)",
    "rl/seq_len": "rl/seq_len (generated tokens per sample)",
}


def plot_curves(metrics_csv, out_png, title: str, names: tuple[str, ...] = ("train/loss", "val/bpb")) -> Path | None:
    """One panel per metric against step (default: train loss, validation bpb, or val/loss where no bpb was
    logged), as a PNG; None when none of them was logged."""
    metrics_csv, out_png = Path(metrics_csv), Path(out_png)
    if not metrics_csv.is_file():
        return None
    curves = _read_curves(metrics_csv)
    names = tuple("val/loss" if n == "val/bpb" and n not in curves else n for n in names)
    if not any(n in curves for n in names):
        return None
    # The Figure API with no pyplot keeps no global figure list and never touches a display or the
    # process-wide backend, so this is safe headless and inside a long-running training process.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(names), 3.5), dpi=100, layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(AXIS_LABELS.get(name, name))
        ax.grid(True, alpha=0.3)
        if name in curves:
            marker = None if len(curves[name]) > 20 else "o"  # sparse evaluations as points
            ax.plot(list(curves[name]), list(curves[name].values()), marker=marker, markersize=4)
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(out_png, buf.getvalue())
    return out_png
