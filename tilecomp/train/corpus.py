"""The training corpus: the running interpreter's own standard library.

Every machine with Python has it, so training needs no download. Files are
split BY FILE into train / held-out with a hash of the path relative to
`Lib/` and a seed, so the split of a given file is the same on every Python
version. The prose set is the docstrings and comments of the held-out files
(text the model never saw as code context).
"""
from __future__ import annotations

import ast
import hashlib
import io
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from tilecomp.errors import TilecompError

DEFAULT_SEED = 1234
DEFAULT_HELDOUT_FRACTION = 0.05
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
MAX_FILE_BYTES = 400_000          # a few generated tables are larger than useful


@dataclass
class Corpus:
    """Documents as (path relative to Lib, text), in sorted path order."""
    train: list[tuple[str, str]] = field(default_factory=list)
    heldout: list[tuple[str, str]] = field(default_factory=list)
    prose: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict:
        def size(docs):
            return {"files": len(docs), "chars": sum(len(t) for _, t in docs)}
        return {"train": size(self.train), "heldout": size(self.heldout), "prose": size(self.prose)}


def stdlib_dir() -> Path:
    """The running interpreter's `Lib/` directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(lib_dir: Path) -> list[str]:
    """Relative POSIX paths of every .py file under `lib_dir`, sorted, minus site-packages."""
    lib_dir = Path(lib_dir)
    if not lib_dir.is_dir():
        raise TilecompError(f"corpus: {lib_dir} is not a directory (expected a Python Lib/ folder)")
    out = []
    for path in lib_dir.rglob("*.py"):
        rel = path.relative_to(lib_dir)
        if SKIPPED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def is_heldout(rel_path: str, seed: int = DEFAULT_SEED,
               fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Stable split: sha256(seed, relative path) read as a number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def read_source(path: Path) -> str | None:
    """UTF-8 text of a source file, or None for undecodable / oversized files."""
    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def extract_prose(source: str) -> str:
    """Docstrings (via ast) and comments (via tokenize) of one file, in file order."""
    pieces: list[tuple[int, str]] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                line = node.body[0].lineno if node.body else 0
                pieces.append((line, doc.strip()))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if len(text) > 2 and not text.startswith(("!", "-*-", "noqa", "type:", "pragma")):
                    pieces.append((tok.start[0], text))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(text for _, text in pieces)


def build_corpus(lib_dir: Path | None = None, seed: int = DEFAULT_SEED,
                 fraction: float = DEFAULT_HELDOUT_FRACTION, limit: int | None = None) -> Corpus:
    """Read and split the stdlib; `limit` keeps only the first N files (tests)."""
    lib_dir = Path(lib_dir) if lib_dir is not None else stdlib_dir()
    corpus = Corpus()
    for rel in list_sources(lib_dir)[:limit]:
        text = read_source(lib_dir / rel)
        if not text or not text.strip():
            continue
        if is_heldout(rel, seed, fraction):
            corpus.heldout.append((rel, text))
            prose = extract_prose(text)
            if prose:
                corpus.prose.append((rel, prose))
        else:
            corpus.train.append((rel, text))
    if not corpus.train or not corpus.heldout:
        raise TilecompError(f"corpus: {lib_dir} gave {len(corpus.train)} train and "
                            f"{len(corpus.heldout)} held-out files (expected both non-empty)")
    return corpus
