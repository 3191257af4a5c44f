"""Fixtures of the engine tests."""
import pytest
import torch

from tilecomp.runtime import buffers

GUARD = 1024
SENTINEL = 77


@pytest.fixture
def arena_guards(monkeypatch):
    """Arenas built with SENTINEL-filled guard zones on both sides; call the returned function
    to assert that no task stored outside any arena."""
    guards = {}

    def build(self, device="cpu", share=None, share_names=()):
        assert not share_names, "guarded arenas are the engine's own (no shared arena)"
        data = {}
        for arena in buffers.ARENAS:
            n = max(self._sizes[arena], buffers.ALIGN)
            base = torch.full((n + 2 * GUARD,), SENTINEL, dtype=self.dtype(arena), device=device)
            guards.setdefault(arena, []).append((base, n))
            data[arena] = base[GUARD:GUARD + n]
        arenas = buffers.Arenas(data, dict(self.slots))
        for name, tensor in self._init.items():
            arenas.view(name).copy_(tensor.to(arenas.view(name).dtype))
        return arenas

    monkeypatch.setattr(buffers.ArenaBuilder, "build", build)

    def check():
        assert guards, "no arenas were built"
        for arena, built in guards.items():
            for base, n in built:
                outside = torch.cat([base[:GUARD], base[GUARD + n:]])
                assert (outside == SENTINEL).all(), f"a task stored outside the {arena} arena"
    return check
