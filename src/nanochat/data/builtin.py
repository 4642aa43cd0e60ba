"""The built-in starter data: text every Python installation carries, for a machine with no corpus and no network.

    <root>/text/python_docs.jsonl   one document per row: the reference topics of `pydoc_data.topics` (what
                                    `help("with")` shows), then each standard-library module's docstrings with
                                    the signatures of its classes and functions, and its comment paragraphs
    <root>/words.txt                a word list for the spelling tasks, the frequent lowercase words of that text

Configs name this data with `builtin:<root>` in place of a path (`data.source` of data=builtin, `words_path` of
mixture=builtin). Nothing is generated when a config is composed: `ensure_shards` and the spelling tasks call
`resolve_source` / `resolve_words` when they are about to read, and those write the files once (atomically;
later calls reuse them, even under another Python). Module sources are parsed with `ast`, never imported:
importing `this` or `antigravity` prints or opens a browser. The text depends only on the Python installation,
so the same interpreter always gives the same bytes (~3.3M characters, ~0.9M tokens of a 4,096-token BPE, for
Python 3.11).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sysconfig
from collections import Counter
from pathlib import Path

from nanochat.data.documents import split_text
from nanochat.errors import UserError
from nanochat.io import atomic_write

log = logging.getLogger(__name__)

PREFIX = "builtin:"
CORPUS_NAME = "text/python_docs.jsonl"
WORDS_NAME = "words.txt"
DOC_CHARS = 8000  # module pages are cut at paragraph breaks like .txt files, for more, shuffleable documents
MAX_SIGNATURE_CHARS = 160
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_WORDS = 5000
PROSE_WORD_RE = re.compile(r"[A-Za-z][a-z]+(?:'[a-z]+)?")
# Licence boilerplate, coding cookies and commented-out code are not the prose we want from comments.
NOT_PROSE_RE = re.compile(r"copyright|licen[cs]e|-\*-|[=(){}\[\]:;]{3}", re.I)
# A whole lowercase word that is not part of a dotted name, a call or a quoted identifier.
WORD_RE = re.compile(r"(?<![\w.'\"`])[a-z]{3,14}(?![\w(])(?![.'\"`]\w)")
VOWEL_RE = re.compile(r"[aeiouy]")


def is_builtin(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _root(spec: str) -> Path:
    root = spec[len(PREFIX) :].strip()
    if not root:
        raise UserError(f"{spec!r} names no directory: write builtin:<dir>, e.g. builtin:${{paths.data_dir}}/builtin")
    return Path(root).expanduser()


def resolve_source(spec):
    """`spec` itself, or for `builtin:<root>` the corpus file, generated first if it is not there yet."""
    return ensure_corpus(_root(spec)) if is_builtin(spec) else spec


def resolve_words(spec):
    """`spec` itself, or for `builtin:<root>` the word list, derived (with the corpus) if it is not there yet."""
    return ensure_words(_root(spec)) if is_builtin(spec) else spec


def ensure_corpus(root: str | Path) -> Path:
    path = Path(root) / CORPUS_NAME
    if not path.is_file():
        docs = documents()
        atomic_write(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        log.info(
            f"wrote the built-in starter corpus: {len(docs):,} documents, {sum(map(len, docs)):,} characters "
            f"of Python's documentation, standard-library docstrings and comments -> {path}"
        )
    return path


def ensure_words(root: str | Path) -> Path:
    path = Path(root) / WORDS_NAME
    if not path.is_file():
        corpus = ensure_corpus(root)
        with open(corpus, encoding="utf-8") as f:
            words = word_list(json.loads(line)["text"] for line in f)
        atomic_write(path, "\n".join(words) + "\n")
        log.info(f"wrote {len(words):,} words of the built-in corpus -> {path}")
    return path


def word_list(texts, max_words: int = MAX_WORDS, min_count: int = 3) -> list[str]:
    """The `max_words` most frequent lowercase words (3-14 letters) of the prose lines, sorted."""
    counts = Counter(
        w for text in texts for line in _prose_lines(text) for w in WORD_RE.findall(line) if VOWEL_RE.search(w)
    )
    frequent = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return sorted(frequent[:max_words])


def _prose_lines(text: str):
    # Indented lines and doctest prompts are mostly code: their "words" are identifiers and hex escapes.
    return (
        line for line in text.splitlines() if line and not line[0].isspace() and not line.startswith((">>>", "..."))
    )


def documents() -> list[str]:
    pieces = (piece.strip("\n") for page in module_pages() for piece in split_text(page, DOC_CHARS))
    return topic_documents() + [p for p in pieces if p]


def topic_documents() -> list[str]:
    # A data-only module (one dict of strings): importing it runs nothing else.
    from pydoc_data.topics import topics

    return [f"Python language reference: {name}\n\n{topics[name].strip()}" for name in sorted(topics)]


def module_pages(stdlib: str | Path | None = None) -> list[str]:
    """One page per standard-library source file that has docstrings or prose comments, in sorted path order."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix())
    pages = []
    for path in files:
        rel = path.relative_to(stdlib)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            source = path.read_bytes()
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. deliberately broken files; a page fewer is harmless
        page = module_page(module_name(rel), tree, comment_blocks(source.decode("utf-8", errors="replace")))
        if page:
            pages.append(page)
    return pages


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_page(name: str, tree: ast.Module, notes: list[str] = ()) -> str | None:
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(doc)
    sections += _member_sections(tree.body, name)
    if notes:
        sections.append(f"Comments in the source of {name}:\n\n" + "\n\n".join(notes))
    if not sections:
        return None
    return f"Module {name}\n\n" + "\n\n".join(sections)


def comment_blocks(source: str) -> list[str]:
    """Runs of two or more full-line comments that read as prose, each joined into one paragraph."""
    blocks, run = [], []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            run.append(stripped.lstrip("#").strip())
            continue
        text = " ".join(x for x in run if x)
        if len(run) >= 2 and _reads_as_prose(text):
            blocks.append(text)
        run = []
    return blocks


def _reads_as_prose(text: str) -> bool:
    tokens = text.split()
    words = sum(bool(PROSE_WORD_RE.fullmatch(t.strip(".,;:!?'\"()"))) for t in tokens)
    return words >= 8 and words >= 0.7 * len(tokens) and not NOT_PROSE_RE.search(text)


def _member_sections(body: list[ast.stmt], prefix: str) -> list[str]:
    sections = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                sections.append(f"{prefix}.{node.name}({_signature(node.args)})\n\n{doc}")
        elif isinstance(node, ast.ClassDef):
            qualname = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            members = _member_sections(node.body, qualname)
            if doc or members:
                head = f"class {qualname}" + (f"({bases})" if bases else "")
                sections.append(head + (f"\n\n{doc}" if doc else ""))
                sections += members
    return sections


def _signature(args: ast.arguments) -> str:
    text = ast.unparse(args)
    return text if len(text) <= MAX_SIGNATURE_CHARS else text[:MAX_SIGNATURE_CHARS].rsplit(",", 1)[0] + ", ..."
