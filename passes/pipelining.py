"""Pipelining annotations: which loads of a task can be issued before its wait.

A read is independent of the wait when no task of the step writes an
overlapping region: weights always, plus read-only state. The codegen issues
those loads first, so HBM streams while the producer finishes. Each task gets
`prefetch` (indices into its reads) and `prefetch_bytes`; the program gets
`prefetch_fraction` (the share of all bytes read that can move early).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

from tilecomp.ir.tile import Region, TileProgram, verify_tile
from tilecomp.ir.tile_verify import regions_overlap, WriterIndex


def _written_regions(tp: TileProgram) -> dict[str, WriterIndex]:
    written: dict[str, dict] = defaultdict(dict)
    for t in tp.tasks:
        for r in t.writes:
            written[r.buffer].setdefault(r, (r, t))
    return {b: WriterIndex(list(regions.values())) for b, regions in written.items()}


def prefetchable(tp: TileProgram, region: Region, written: dict[str, WriterIndex]) -> bool:
    if tp.buffers[region.buffer].kind == "weight":
        return True
    index = written.get(region.buffer)
    return index is None or not any(regions_overlap(w, region) for w, _ in index.candidates(region))


def pipeline_loads(tp: TileProgram) -> TileProgram:
    """Return a copy of `tp` whose tasks carry `prefetch` / `prefetch_bytes` attributes."""
    written = _written_regions(tp)
    tasks, early, total = [], 0, 0
    memo: dict[Region, bool] = {}
    for t in tp.tasks:
        for r in t.reads:
            if r not in memo:
                memo[r] = prefetchable(tp, r, written)
        idx = [i for i, r in enumerate(t.reads) if memo[r]]
        nbytes = sum(tp.region_bytes(t.reads[i]) for i in idx)
        early += nbytes
        total += sum(tp.region_bytes(r) for r in t.reads)
        attrs = {k: v for k, v in t.attrs.items() if k not in ("prefetch", "prefetch_bytes")}
        attrs.update(prefetch=idx, prefetch_bytes=nbytes)
        tasks.append(dataclasses.replace(t, attrs=attrs))
    notes = dict(tp.annotations, prefetch_fraction=round(early / total, 4) if total else 0.0)
    return verify_tile(dataclasses.replace(tp, tasks=tasks, annotations=notes))


def pipelining_pass(tp: TileProgram, options=None) -> TileProgram:
    """Pipeline entry (no options)."""
    return pipeline_loads(tp)
