"""Token data on disk: one folder with the tokenizer and the three id streams.

    DATA/tokenizer.json     byte-level BPE (tokenizer.py)
    DATA/train.npy          uint16 ids, documents separated by EOS
    DATA/heldout.npy        held-out stdlib files, same format
    DATA/prose.npy          docstrings + comments of the held-out files
    DATA/manifest.json      seed, python version, file and token counts

Built once (`tilecomp train data`) and carried to the training machine, so
every machine trains and evaluates on the very same ids.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tilecomp.errors import TilecompError

from . import corpus as corpus_mod
from . import tokenizer as tok_mod

SPLITS = ("train", "heldout", "prose")


def prepare_data(out_dir: Path, lib_dir: Path | None = None, seed: int = corpus_mod.DEFAULT_SEED,
                 vocab_size: int = tok_mod.DEFAULT_VOCAB, limit: int | None = None) -> dict:
    """Corpus -> tokenizer -> id streams in `out_dir`; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_mod.build_corpus(lib_dir, seed=seed, limit=limit)
    tok = tok_mod.train_tokenizer([text for _, text in corpus.train], vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    manifest = {"seed": seed, "python": platform.python_version(), "vocab_size": tok.get_vocab_size(),
                "corpus": corpus.summary(), "heldout_files": [rel for rel, _ in corpus.heldout]}
    for split in SPLITS:
        docs = getattr(corpus, split)
        ids = tok_mod.encode_documents(tok, [text for _, text in docs])
        np.save(out_dir / f"{split}.npy", ids)
        manifest["corpus"][split]["tokens"] = int(len(ids))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class TokenData:
    folder: Path
    train: np.ndarray
    heldout: np.ndarray
    prose: np.ndarray
    vocab_size: int

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise TilecompError(f"data split: expected one of {SPLITS}, found {name!r}")
        return getattr(self, name)


def load_data(folder: Path) -> TokenData:
    folder = Path(folder)
    arrays = {}
    for split in SPLITS:
        path = folder / f"{split}.npy"
        if not path.is_file():
            raise TilecompError(f"{path}: missing (build the data folder with `tilecomp train data --out {folder}`)")
        arrays[split] = np.load(path, mmap_mode="r")
    tok = tok_mod.load_tokenizer(folder / "tokenizer.json")
    return TokenData(folder, arrays["train"], arrays["heldout"], arrays["prose"], tok.get_vocab_size())


def random_windows(ids: np.ndarray, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, length] int64 windows at uniformly random offsets of the stream."""
    if len(ids) <= length:
        raise TilecompError(f"token stream of {len(ids)} ids is shorter than a window of {length}")
    starts = torch.randint(0, len(ids) - length, (batch,), generator=gen).tolist()
    return torch.from_numpy(np.stack([np.asarray(ids[s:s + length], dtype=np.int64) for s in starts]))


def sequential_windows(ids: np.ndarray, length: int, max_windows: int | None = None):
    """Non-overlapping [length] windows from the start (for held-out loss)."""
    n = len(ids) // length
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        yield torch.from_numpy(np.asarray(ids[i * length:(i + 1) * length], dtype=np.int64))


def document_starts(ids: np.ndarray, eos_id: int = tok_mod.EOS_ID) -> list[int]:
    """Index of the first id of each document in an EOS-separated stream."""
    ends = np.flatnonzero(np.asarray(ids) == eos_id)
    starts = [0] + (ends + 1).tolist()
    return [s for s in starts if s < len(ids)]
