"""Pipelining annotations: weights are always prefetched, data written in the step never is."""
import pytest

from tilecomp.ir.tile import parse_tile, print_tile
from tilecomp.passes.pipelining import pipeline_loads


@pytest.fixture(scope="module")
def tiny_piped(tiny_tile):
    return tiny_tile, pipeline_loads(tiny_tile)


def test_weights_always_prefetched_activations_never(tiny_piped):
    tp, piped = tiny_piped
    written = {r.buffer for t in tp.tasks for r in t.writes}
    for t in piped.tasks:
        pre = set(t.attrs["prefetch"])
        for i, r in enumerate(t.reads):
            kind = piped.buffers[r.buffer].kind
            if kind == "weight":
                assert i in pre, f"{t.name} weight read {r.buffer} not prefetched"
            if r.buffer in written and kind != "kv_cache":
                assert i not in pre, f"{t.name} prefetches {r.buffer}, written in this step"
        assert t.attrs["prefetch_bytes"] == sum(piped.region_bytes(t.reads[i]) for i in pre)
    assert 0.0 < piped.annotations["prefetch_fraction"] < 1.0   # tiny: KV caches dominate the reads


def test_kv_positions_written_this_step_are_not_prefetched(tiny_piped):
    _, piped = tiny_piped
    part = next(t for t in piped.tasks if t.kind == "attn_partial")
    cache_reads = [i for i, r in enumerate(part.reads) if r.buffer == part.attrs["k_cache"]]
    assert cache_reads and not set(cache_reads) & set(part.attrs["prefetch"])


def test_pure_and_round_trips(tiny_piped):
    tp, piped = tiny_piped
    assert all("prefetch" not in t.attrs for t in tp.tasks)
    assert parse_tile(print_tile(piped)) == piped
    assert pipeline_loads(piped) == piped        # idempotent
