"""Warp-specialization roles: streaming tasks get producer/consumer warps, small ones do not."""
import pytest

from tilecomp.errors import ScheduleError
from tilecomp.passes.warp_spec import WarpSpecOptions, specialize_warps


def test_roles_follow_streamed_bytes(tiny_tile):
    opts = WarpSpecOptions(min_stream_bytes=4096, stage_bytes=2048)
    ws = specialize_warps(tiny_tile, opts)
    by_kind = {}
    for t in ws.tasks:
        by_kind.setdefault(t.kind, set()).add(t.attrs["warp_role"])
        if t.attrs["warp_role"] == "producer_consumer":
            assert t.attrs["producer_warps"] == 1 and 2 <= t.attrs["stages"] <= opts.max_stages
            assert t.attrs["smem_bytes"] == t.attrs["stages"] * opts.stage_bytes
    for kind in ("attn_reduce", "moe_combine", "sample_reduce", "accept", "linear_reduce"):
        assert by_kind.get(kind, {"uniform"}) == {"uniform"}
    assert "producer_consumer" in by_kind["lm_head"]           # 512 x 64 bf16 = 64 KiB of weights
    assert ws.annotations["smem_bytes"] == max(t.attrs["smem_bytes"] for t in ws.tasks)


def test_too_much_shared_memory_is_an_error(tiny_tile):
    with pytest.raises(ScheduleError, match="shared memory per program"):
        specialize_warps(tiny_tile, WarpSpecOptions(min_stream_bytes=1, stage_bytes=1 << 20, smem_limit=1 << 20))
