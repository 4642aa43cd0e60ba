"""Models in and out, on the command line.

    nanochat export hf <run dir, export dir or spec> <out dir> [--dtype bfloat16] [--push-to-hub <repo>]
    nanochat export import <spec>

`hf` writes a directory transformers loads with no custom code (AutoModelForCausalLM, AutoTokenizer) plus a model
card, and with --push-to-hub uploads it (needs a token and the network). `import` converts a spec such as
hf:karpathy/nanochat-d32 or nanochat:~/.cache/nanochat/chatsft_checkpoints/d20 into an export dir (as any stage
would on first use) and prints its path.
"""

from __future__ import annotations

import argparse

from nanochat.errors import exit_on_error

DTYPES = ("float32", "bfloat16")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="nanochat export", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    hf = verbs.add_parser("hf", help="write a Hugging Face transformers dir (NanoChatForCausalLM)")
    hf.add_argument("src", help="a run dir, an export dir, or a spec (hf:..., nanochat:...)")
    hf.add_argument("out", help="the directory to write (created, or replaced if it holds an earlier HF export)")
    hf.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights (default float32)")
    hf.add_argument("--push-to-hub", metavar="REPO", help="upload the directory to this Hub repo (owner/name)")
    hf.add_argument("--private", action="store_true", help="create the Hub repo as private")
    imp = verbs.add_parser("import", help="convert hf:<dir or repo id> or nanochat:<checkpoint dir>[@step] once")
    imp.add_argument("spec")
    return parser.parse_args(argv)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    import logging

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.verb == "import":
        from nanochat.export import find_export, imports

        spec = args.spec if imports.is_spec(args.spec) else f"hf:{args.spec}"
        print(find_export(spec))
        return
    import torch

    from nanochat.export.hf import export_hf

    out = export_hf(args.src, args.out, getattr(torch, args.dtype), repo_id=args.push_to_hub)
    print(f"wrote {out}")
    if args.push_to_hub:
        from nanochat.export.hub import push_to_hub

        print(f"pushed to {args.push_to_hub}: {push_to_hub(out, args.push_to_hub, private=args.private)}")


if __name__ == "__main__":
    main()
