"""The built-in corpus: docstrings of Python's standard library, available offline.

It is built on first use from the interpreter's own standard-library sources (parsed with
``ast``, never imported) and from ``pydoc_data`` (the help topics of the Python docs),
then cached as JSONL. Documents are deduplicated; a document is held out for evaluation
when a hash of its text says so, so the split is fixed and independent of file order.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import tempfile

CORPUS_VERSION = 1
MIN_CHARS = 40  # shorter docstrings ("Return x.") carry little text
HELD_OUT_ONE_IN = 20  # 5% of documents are the validation split
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def cache_dir() -> pathlib.Path:
    """Root of t2x's caches: ``$T2X_CACHE_DIR`` or ``~/.cache/t2x``."""
    return pathlib.Path(os.environ.get("T2X_CACHE_DIR") or pathlib.Path.home() / ".cache" / "t2x")


def corpus_dir() -> pathlib.Path:
    """Folder of the built-in corpus for this Python version (built if absent)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = cache_dir() / "corpus" / f"stdlib-docstrings-{version}-v{CORPUS_VERSION}"
    if not (path / "train.jsonl").exists():
        _build(path)
    return path


def split_file(split: str) -> str:
    """Path of the built-in corpus file for ``train`` or ``validation``."""
    if split not in ("train", "validation"):
        raise ValueError(f"the built-in corpus has splits 'train' and 'validation', not {split!r}")
    return str(corpus_dir() / f"{split}.jsonl")


def _stdlib_docstrings():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS.intersection(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _help_topics():
    try:
        from pydoc_data import topics
    except ImportError:
        return
    for _, text in sorted(topics.topics.items()):
        yield text.strip()


def _build(path: pathlib.Path) -> None:
    seen = set()
    splits = {"train": [], "validation": []}
    for text in (*_stdlib_docstrings(), *_help_topics()):
        if len(text) < MIN_CHARS:
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        split = "validation" if int.from_bytes(digest[:8], "little") % HELD_OUT_ONE_IN == 0 else "train"
        splits[split].append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
    for split, texts in splits.items():
        with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    try:
        staging.rename(path)
    except OSError:  # another process finished first; its copy is identical
        for file in staging.iterdir():
            file.unlink()
        staging.rmdir()


# A labelled set for fine-tuning: which standard-library package a docstring comes from.
TOPICS = ("tkinter", "asyncio", "email", "logging", "xml")


def build_topics(path: str | os.PathLike) -> dict[str, int]:
    """Write ``train.jsonl`` and ``validation.jsonl`` of ``{"text", "label"}`` examples to
    ``path``: the docstrings (of at least ``MIN_CHARS``) of the packages in ``TOPICS``,
    labelled with the package, held out by the same text hash as the corpus.

    The repository ships the set this made from Python 3.11's standard library
    (``t2x/data/sets/stdlib_topics``), so examples do not vary with the interpreter.

    Returns:
      Examples per split.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    seen, splits = set(), {"train": [], "validation": []}
    for topic in TOPICS:
        for file in sorted((root / topic).rglob("*.py")):
            if SKIPPED_DIRS.intersection(file.relative_to(root).parts):
                continue
            tree = ast.parse(file.read_bytes())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    digest = hashlib.sha256((doc or "").encode("utf-8")).digest()
                    if doc and len(doc) >= MIN_CHARS and digest not in seen:
                        seen.add(digest)
                        held_out = int.from_bytes(digest[:8], "little") % 5 == 0  # 20%
                        splits["validation" if held_out else "train"].append({"text": doc, "label": topic})
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        with open(path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    return {split: len(examples) for split, examples in splits.items()}


if __name__ == "__main__":  # python -m t2x.data.corpus OUTPUT_DIR: rebuild the labelled topic set
    print(build_topics(sys.argv[1]))
