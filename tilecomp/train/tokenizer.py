"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the train split.

Byte-level: every string round-trips, whatever its characters. Special
tokens come first so their ids are fixed: 0 = end of text (document
separator), 1 = the DFlash mask token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tilecomp.errors import TilecompError

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN]
EOS_ID, MASK_ID = 0, 1
DEFAULT_VOCAB = 4096


def train_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    """BPE over bytes; deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    check_specials(tok, "trained tokenizer")
    return tok


def check_specials(tok: Tokenizer, source: str) -> None:
    for name, want in ((EOS_TOKEN, EOS_ID), (MASK_TOKEN, MASK_ID)):
        got = tok.token_to_id(name)
        if got != want:
            raise TilecompError(f"{source}: token {name!r} has id {got}, expected {want}")


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TilecompError(f"{path}: tokenizer.json not found")
    tok = Tokenizer.from_file(str(path))
    check_specials(tok, str(path))
    return tok


def encode_documents(tok: Tokenizer, texts, dtype=np.uint16) -> np.ndarray:
    """One flat id stream: each document followed by EOS."""
    if tok.get_vocab_size() > np.iinfo(dtype).max + 1:
        raise TilecompError(f"vocab {tok.get_vocab_size()} does not fit {np.dtype(dtype).name}")
    parts = []
    for enc in tok.encode_batch(list(texts)):
        parts.append(np.asarray(enc.ids + [EOS_ID], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)
