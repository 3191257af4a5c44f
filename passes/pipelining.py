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
from tilecomp.ir.tile_verify import _overlap


def _written_regions(tp: TileProgram) -> dict[str, list[Region]]:
    written: dict[str, list[Region]] = defaultdict(list)
    for t in tp.tasks:
        for r in t.writes:
            if r not in written[r.buffer]:
                written[r.buffer].append(r)
    return written


def prefetchable(tp: TileProgram, region: Region, written: dict[str, list[Region]]) -> bool:
    if tp.buffers[region.buffer].kind == "weight":
        return True
    return not any(_overlap(w, region) for w in written.get(region.buffer, ()))


def pipeline_loads(tp: TileProgram) -> TileProgram:
    """Return a copy of `tp` whose tasks carry `prefetch` / `prefetch_bytes` attributes."""
    written = _written_regions(tp)
    tasks, early, total = [], 0, 0
    for t in tp.tasks:
        idx = [i for i, r in enumerate(t.reads) if prefetchable(tp, r, written)]
        nbytes = sum(tp.region_bytes(t.reads[i]) for i in idx)
        early += nbytes
        total += sum(tp.region_bytes(r) for r in t.reads)
        attrs = {k: v for k, v in t.attrs.items() if k not in ("prefetch", "prefetch_bytes")}
        attrs.update(prefetch=idx, prefetch_bytes=nbytes)
        tasks.append(dataclasses.replace(t, attrs=attrs))
    notes = dict(tp.annotations, prefetch_fraction=round(early / total, 4) if total else 0.0)
    return verify_tile(dataclasses.replace(tp, tasks=tasks, annotations=notes))
