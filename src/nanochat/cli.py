"""`nanochat <verb> ...`: one command for the whole pipeline.

    nanochat train  [key=value ...]   train a stage or run a recipe (Hydra overrides: stage=, model=, experiment=)
    nanochat eval   [key=value ...]   evaluate an exported model (nanochat train stage=eval ...)
    nanochat serve  [key=value ...]   web chat + OpenAI-compatible API for a model (Hydra overrides: ckpt=, port=)
    nanochat chat   CKPT [-p PROMPT]  chat in the terminal
    nanochat export ...               write a model in another format (nanochat export --help)
    nanochat data   ...               download or prepare data (nanochat data --help)
    nanochat tokenizer ...            train or measure a tokenizer (nanochat tokenizer --help)

Each verb has one argument style: the Hydra verbs take `key=value` overrides (and Hydra's --help, --cfg job, -m),
the others take options. `python train.py ...` and `python serve.py ...` in a checkout are the same as
`nanochat train ...` and `nanochat serve ...`.
"""

from __future__ import annotations

import sys

HYDRA_VERBS = {"train": "train", "eval": "train", "serve": "serve"}  # verb -> its config
OPTION_VERBS = {
    "chat": "nanochat.serving.chat_cli",
    "export": "nanochat.export.__main__",
    "data": "nanochat.data.__main__",
    "tokenizer": "nanochat.tokenizer.__main__",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return
    verb, rest = argv[0], argv[1:]
    if verb in HYDRA_VERBS:
        run_hydra(verb, ["stage=eval", *rest] if verb == "eval" else rest)
    elif verb in OPTION_VERBS:
        import importlib

        importlib.import_module(OPTION_VERBS[verb]).main(rest)
    else:
        print(
            f"error: unknown command {verb!r}; the commands are {', '.join([*HYDRA_VERBS, *OPTION_VERBS])} "
            "(nanochat --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def run_hydra(verb: str, args: list[str]) -> None:
    """Compose the verb's config from the packaged conf/ and the overrides, and run it."""
    import hydra

    from nanochat.configs import CONF_DIR, register_resolvers

    register_resolvers()
    sys.argv = [f"nanochat {verb}", *args]  # what Hydra parses (and shows in --help)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=HYDRA_VERBS[verb])
    def app(cfg) -> None:
        if verb == "serve":
            from nanochat.errors import exit_on_error
            from nanochat.serving.server import run

            exit_on_error(run)(cfg)
        else:
            from nanochat.stages import run_stage

            run_stage(cfg)

    app()
