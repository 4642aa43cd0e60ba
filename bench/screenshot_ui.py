"""Screenshot the chat page as a browser shows it: serve a model, chat twice in headless Chromium, save a PNG.

    python bench/screenshot_ui.py [--ckpt <run or export dir>] [--out docs/ui.png]

Without --ckpt it serves a tiny random-weight export built on the spot, so the replies are gibberish: the
picture is about the page (streamed replies, history, buttons, sampling controls), not the model.
Needs the Python `playwright` package and a Chromium/Chrome binary on PATH (e.g. `apt-get install chromium`);
playwright drives that binary, so no browser download (`playwright install`) is needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def tiny_export(out: Path) -> Path:
    """A 1-layer GPT with large random weights and a 600-token BPE trained on a few stdlib sources."""
    import inspect
    import json
    import textwrap

    import torch

    from nanochat.export import save_export
    from nanochat.models.components import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    texts = [inspect.getsource(m)[:4000] for m in (argparse, json.decoder, textwrap, inspect)]
    tok = Tokenizer.train(texts, vocab_size=600, show_progress=False)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    return save_export(model, tok, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve.py exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("serve.py did not become healthy in time")


def screenshot(url: str, out: Path, browser: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
        page.goto(url + "/", wait_until="domcontentloaded")  # "networkidle" never comes: Gradio keeps a stream open
        box = page.locator("textarea").first
        box.wait_for(timeout=60_000)
        for i, question in enumerate(["Hi! Who are you?", "What is 12*7?"]):
            box.fill(question)
            box.press("Enter")
            page.locator(".message-row.bot-row, .bot-row, [data-testid='bot']").nth(i).wait_for(timeout=60_000)
            page.wait_for_timeout(2500)  # let the reply finish streaming
        page.get_by_text("Sampling").first.click()  # open the temperature / top-k / max-tokens controls
        page.wait_for_timeout(800)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        chromium.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="run or export dir to serve (default: a tiny random export)")
    parser.add_argument("--out", default=str(REPO / "docs" / "ui.png"))
    args = parser.parse_args()
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        raise SystemExit(f"no Chromium/Chrome found on PATH (looked for {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or str(tiny_export(Path(tmp) / "export"))
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        cmd = [sys.executable, str(REPO / "serve.py"), f"ckpt={ckpt}", f"port={port}"]
        if not args.ckpt:  # short replies: re-encoded gibberish grows, and the tiny context is 640 tokens
            cmd += ["model_name=nanochat-tiny-random", "sampling.max_tokens=40"]
        server = subprocess.Popen(cmd, cwd=REPO, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server)
            screenshot(f"http://127.0.0.1:{port}", Path(args.out), browser)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
