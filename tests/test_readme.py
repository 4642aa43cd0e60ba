"""The README's stage commands run as written, at debug size: a README that drifts from the code fails here.

The block after the `readme-test` marker is read line by line; each `nanochat` command runs with the overrides that
make it small (debug=default and the built-in data, appended) and the README's home directory replaced by a
temporary one. `serve` starts the server and asks it one question; `chat` answers one prompt.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from common import serve_process

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-test:"
HOME = "~/.cache/nanochat"
SMALL = {  # what makes each verb's command a few seconds long
    "train": ["debug=default", "run=d4", "data=builtin", "mixture=builtin"],
    "eval": ["debug=default", "mixture=builtin", "evaluators.chat.max_per_task=2", "evaluators.chat.max_new_tokens=8"],
    "chat": ["--max-tokens", "8", "--seed", "0"],
}


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]


def test_the_readme_block_is_the_stage_sequence():
    commands = readme_commands()
    assert all(c[0] == "nanochat" for c in commands)
    stages = [c[2].removeprefix("stage=") for c in commands if c[1] == "train"]
    assert stages == ["tokenizer", "base", "mid", "sft", "rl"]
    assert [c[1] for c in commands[len(stages) :]] == ["eval", "serve", "chat"]


@pytest.mark.slow
def test_readme_stage_commands_run_at_debug_size(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("NANOCHAT_PRETRAIN_TEXT", None)
    for argv in readme_commands():
        verb, args = argv[1], [a.replace(HOME, str(home)) for a in argv[2:]]
        if verb == "serve":
            ckpt = next(a.split("=", 1)[1] for a in args if a.startswith("ckpt="))
            with serve_process(
                Path(ckpt), [a for a in args if not a.startswith("ckpt=")], env, tmp_path / "serve.log"
            ) as (_, port):
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    timeout=60,
                    json={"messages": [{"role": "user", "content": "What is 12*7?"}], "max_tokens": 8},
                )
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
            continue
        quiet = ["tokenizer.progress=false"] if "stage=tokenizer" in args else []
        cmd = [sys.executable, "-m", "nanochat", verb, *args, *SMALL[verb], *quiet]
        out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr[-3000:]}"
        if verb == "chat":
            assert out.stdout.strip()  # the reply
    for stage in ("base", "mid", "sft", "rl"):
        assert (home / "runs" / "d4" / stage / "export" / "model.safetensors").is_file()
    report = (home / "runs" / "d4" / "report.md").read_text()
    assert all(
        f"## {title}" in report
        for title in ("Tokenizer training", "Base model training", "Midtraining", "SFT", "RL", "SFT evaluation")
    )
