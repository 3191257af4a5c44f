"""Helpers shared by the training tests (imported by name: tests/ has no packages)."""
import numpy as np

VOCAB = 64


def repeating_stream(n: int = 4000, seed: int = 0):
    """A learnable id stream: a few short 'documents' repeated, EOS (0) between them."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, VOCAB, size=int(rng.integers(5, 12))).tolist() for _ in range(6)]
    out = []
    while len(out) < n:
        out += docs[int(rng.integers(0, len(docs)))] + [0]
    return np.asarray(out[:n], dtype=np.uint16)
