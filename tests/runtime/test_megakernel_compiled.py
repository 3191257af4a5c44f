"""The compiler's scheduled step programs (passes/pipeline.compile_model: DFlash step, prefill
chunk, plain step) run by MegakernelEngine on CPU, given or compiled by the engine itself: the
same tokens as ReferenceEngine, and no store outside the arenas."""
import pytest
import torch

from tilecomp.errors import TilecompError
from tilecomp.models.dflash import DFlashDraft
from tilecomp.models.mimo import MiMoForCausalLM
from tilecomp.models.presets import preset
from tilecomp.passes.pipeline import CompileOptions, compile_model
from tilecomp.runtime.megakernel import MegakernelEngine
from tilecomp.runtime.reference import ReferenceEngine

MAX_LEN = 64


def test_compiled_schedule_gives_reference_tokens_and_stays_in_bounds(arena_guards):
    torch.manual_seed(7)
    cfg, dcfg = preset("tiny", layers=2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    compiled = compile_model(cfg, dcfg, CompileOptions(max_len=MAX_LEN, programs=1,
                                                       interpreter_order=True))
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, schedule=compiled.schedule)
    ids = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(8)).tolist()
    got = engine.generate(ids, 5)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 5)
    assert got.tokens == ref.tokens and got.acceptance == ref.acceptance
    assert engine.step_program("dflash").records.shape[0] == len(compiled.schedule.tasks)
    arena_guards()


def _compiled_engine(seed: int):
    torch.manual_seed(seed)
    cfg, dcfg = preset("tiny", layers=2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    compiled = compile_model(cfg, dcfg, CompileOptions(max_len=MAX_LEN, programs=1, interpreter_order=True))
    return target, draft, compiled, MegakernelEngine(target, draft, max_len=MAX_LEN, schedule=compiled)


def test_prompt_runs_through_the_compiled_prefill_schedule(arena_guards):
    target, draft, compiled, engine = _compiled_engine(9)
    rows = compiled.prefill_schedule.buffers["ids"].shape[0]
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN)
    # 11 tokens: a full chunk, then the last `rows` tokens again; 3 tokens: one padded chunk
    for n, launches in ((11, 2), (3, 1)):
        ids = torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        before = engine.step_program("prefill").epoch
        got = engine.generate(ids, 4)
        want = ref.generate(ids, 4)
        assert got.tokens == want.tokens and got.acceptance == want.acceptance, n
        assert engine.step_program("prefill").epoch - before == launches
    prefill = engine.step_program("prefill")
    assert prefill.records.shape[0] == len(compiled.prefill_schedule.tasks)
    assert prefill.counter_names == list(compiled.prefill_schedule.counters)
    assert sorted(engine._steps) == ["dflash", "prefill"]      # one program per kind, any prompt length
    arena_guards()


def test_prompt_logits_from_the_compiled_prefill():
    target, draft, _, engine = _compiled_engine(10)
    ids = torch.randint(0, 500, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    got = engine.prompt_logits(ids)
    want = target(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_plain_decoding_runs_the_compiled_plain_schedule(arena_guards):
    target, draft, compiled, engine = _compiled_engine(11)
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN)
    ids = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    got = engine.generate(ids, 5, use_draft=False)
    want = ref.generate(ids, 5, use_draft=False)
    assert got.tokens == want.tokens and got.acceptance == want.acceptance == []
    # the plain step is the compiler's: its tasks, its counters, one launch per token after the first
    plain = engine.step_program("plain")
    assert plain.records.shape[0] == len(compiled.plain_schedule.tasks)
    assert plain.counter_names == list(compiled.plain_schedule.counters)
    assert all(plain.task_names[t.id].startswith(f"{t.kind} [{t.name} ") for t in compiled.plain_schedule.tasks)
    assert all(plain.task_ops[t.id] == (t.attrs.get("op") or t.name) for t in compiled.plain_schedule.tasks)
    assert plain.epoch == 4
    # sampled: the same shared rule as the reference; a second request continues the epochs
    kw = dict(use_draft=False, temperature=0.9, top_p=0.9, seed=1234)
    sampled = engine.generate(ids, 3, **kw)
    assert sampled.tokens == ref.generate(ids, 3, **kw).tokens
    assert plain.epoch == 6 and engine.step_program("plain") is plain
    arena_guards()


def test_sampled_dflash_through_the_compiled_step():
    # top-p < 1: the compiled sample_reduce re-reads the logits rows (draft and verify)
    target, draft, _, engine = _compiled_engine(12)
    ids = torch.randint(0, 500, (6,), generator=torch.Generator().manual_seed(6)).tolist()
    kw = dict(temperature=0.9, top_p=0.9, seed=77)
    got = engine.generate(ids, 6, **kw)
    want = ReferenceEngine(target, draft, max_len=MAX_LEN).generate(ids, 6, **kw)
    assert got.tokens == want.tokens and got.acceptance == want.acceptance


def test_engine_without_a_schedule_compiles_its_own_with_its_switches(arena_guards):
    torch.manual_seed(13)
    cfg, _ = preset("tiny", layers=2)
    target = MiMoForCausalLM(cfg)
    engine = MegakernelEngine(target, None, max_len=MAX_LEN, qkv_q_heads=1, chunk_len=16)
    options = engine.compile_options()
    assert (options.lower.qkv_q_heads, options.lower.kv_chunk, options.block) == (1, 16, engine.block)
    assert engine.schedule is None and engine.plain_schedule.annotations["step"] == "plain_step"
    partial = [t for t in engine.plain_schedule.tasks if t.kind == "attn_partial"]
    # full attention (64 positions): chunks of 16; the SWA ring (window 8 + 1 row) fits one chunk
    assert {t.attrs["chunk_len"] for t in partial} == {16, 9}
    ids = torch.randint(0, 500, (10,), generator=torch.Generator().manual_seed(13)).tolist()
    got = engine.generate(ids, 4, use_draft=False)
    want = ReferenceEngine(target, None, max_len=MAX_LEN).generate(ids, 4, use_draft=False)
    assert got.tokens == want.tokens
    assert engine.step_program("plain").records.shape[0] == len(engine.plain_schedule.tasks)
    arena_guards()


def test_folded_reduce_gives_reference_tokens(arena_guards):
    # passes/fold_reduce.py: no attn_reduce task; the last of a head's 4 partials (chunks of 16 of
    # 64 positions) to arrive merges them, and the last of a layer's 4 router tasks (4 of its 16
    # experts each) builds the plan. Work done by any other arrival, or none, changes the tokens
    torch.manual_seed(14)
    cfg, dcfg = preset("tiny", layers=2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, chunk_len=16,
                              lower={"fold_reduce": 1, "router_block": 4})
    for tp in (engine.schedule, engine.plain_schedule, engine.prefill_schedule):
        assert not [t for t in tp.tasks if t.kind == "attn_reduce"] and tp.annotations["folded_reduces"] > 0
        assert {t.attrs["n_chunks"] for t in tp.tasks if "arrive" in t.attrs and t.kind == "attn_partial"} >= {4}
        routes = [t for t in tp.tasks if t.kind == "moe_route"]
        assert routes and all(t.attrs["split"] == 1 and t.attrs["n_splits"] == 4 for t in routes)
    assert engine.step_program("dflash").kernel.constexprs["ARRIVE"] == 1
    ids = torch.randint(0, 500, (10,), generator=torch.Generator().manual_seed(13)).tolist()
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN)
    got, want = engine.generate(ids, 6), ref.generate(ids, 6)
    assert got.tokens == want.tokens and got.acceptance == want.acceptance
    assert engine.generate(ids, 3, use_draft=False).tokens == ref.generate(ids, 3, use_draft=False).tokens
    arena_guards()


def test_cuda_graph_steps_read_the_step_number_from_the_device(arena_guards):
    """cuda_graph=True: every step launches with epoch 0 and the kernel reads the step number
    from the program's epoch_buf, which the host (here; a recorded graph on a GPU) advances
    before each launch. With folded reduces the last arrival of each step merges, which it can
    only tell from the step number: a stale or missing one changes the tokens or times out."""
    torch.manual_seed(14)
    cfg, dcfg = preset("tiny", layers=2)
    target, draft = MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg)
    engine = MegakernelEngine(target, draft, max_len=MAX_LEN, chunk_len=16, cuda_graph=True,
                              lower={"fold_reduce": 1, "router_block": 4})
    ids = torch.randint(0, 500, (10,), generator=torch.Generator().manual_seed(13)).tolist()
    ref = ReferenceEngine(target, draft, max_len=MAX_LEN)
    got, want = engine.generate(ids, 6), ref.generate(ids, 6)
    assert got.tokens == want.tokens and got.acceptance == want.acceptance
    assert engine.generate(ids, 4, use_draft=False).tokens == ref.generate(ids, 4, use_draft=False).tokens
    for kind in ("dflash", "plain", "prefill"):
        step = engine.step_program(kind)
        assert step.epoch >= 2 and step.epoch_buf.tolist() == [step.epoch], kind
    with pytest.raises(ValueError, match="epoch 0 reads the step number from epoch_buf"):
        step.kernel.launch(step.records, step.queue, step.counters, step.errors, 0, engine.arenas)
    arena_guards()


def test_cuda_graph_first_launch_records_without_running_and_runs_the_step_once(monkeypatch):
    """The GPU path of StepProgram.launch(cuda_graph=True) with stand-ins for the CUDA-graph API:
    recording a graph runs nothing, so N launches run the kernel exactly N times, with step
    numbers 1..N read from epoch_buf. (A second replay at the first launch ran step 1 twice:
    generation skipped its first decoded token on a GPU.)"""
    import contextlib
    import tilecomp.runtime.megakernel as mk
    from tilecomp.runtime.megakernel import StepProgram

    class Kernel:
        def __init__(self):
            self.capturing, self.ran, self.recorded = False, [], []

        def warmup(self, *args, **kwargs):
            pass

        def launch(self, records, queue, counters, errors, epoch, arenas, trace=None, epoch_buf=None):
            assert epoch == 0 and epoch_buf is not None
            if self.capturing:
                self.recorded.append(epoch_buf)
            else:
                self.ran.append(int(epoch_buf.item()))

    kernel = Kernel()
    step = StepProgram(kernel, torch.zeros(4, 2), torch.zeros(3, dtype=torch.int32), torch.zeros(4),
                       torch.zeros(2, 2), [], {}, cuda_graph=True)
    graphs = []

    class Graph:
        def __init__(self):
            graphs.append(self)

        def replay(self):
            step._device_epoch_launch(arenas)

    @contextlib.contextmanager
    def record(graph):      # a capture runs nothing: the add on epoch_buf is undone, launches recorded
        before = step.epoch_buf.clone()
        kernel.capturing = True
        yield
        kernel.capturing = False
        step.epoch_buf.copy_(before)

    arenas = object()
    monkeypatch.setattr(mk, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", record)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    for _ in range(3):
        step.launch(arenas)
    assert len(graphs) == 1 and len(kernel.recorded) == 1
    assert kernel.ran == [1, 2, 3] and step.epoch == 3 and step.epoch_buf.tolist() == [3]
    with pytest.raises(mk.TilecompError, match="recorded with other arenas"):
        step.launch(object())


def test_prefetch_ranges_are_contiguous_runs_of_the_tasks_own_weights():
    """WPF's records: every (arena, offset, bytes) range a task carries lies inside one weight
    region the task reads (checked element by element against the region's indices in its
    slot), is 16-byte aligned, and the big streams (LM head, projections, router) carry one."""
    from tilecomp.codegen import layout as L
    from tilecomp.runtime.compiled import RecordBuilder
    torch.manual_seed(3)
    cfg, dcfg = preset("tiny", layers=2)
    engine = MegakernelEngine(MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg), max_len=MAX_LEN)
    tp = engine.schedule
    rb = RecordBuilder(engine.builder, tp)
    with_ranges = set()
    for task in tp.tasks:
        ranges = rb.prefetch_ranges(task)
        words = L.encode_record(L.TaskRecord(task.kind, task.id, prefetch=ranges))
        assert words[L.F_PF0:L.F_PF0 + L.PF_WORDS * len(ranges)] == [w for r in ranges for w in r]
        for arena, offset, nbytes in ranges:
            esize = engine.builder.dtype(L.PF_ARENAS[arena]).itemsize
            assert nbytes >= L.PF_MIN_BYTES and nbytes % 16 == 0 and (offset * esize) % 16 == 0
            want = set(range(offset, offset + nbytes // esize))
            inside = False
            for region in task.reads:
                buf = tp.buffers[region.buffer]
                if buf.kind != "weight":
                    continue
                slot = engine.builder.slots[rb.slot_name(region.buffer)]
                if L.PF_ARENAS[arena] != slot.arena:
                    continue
                idx = (slot.offset + torch.arange(slot.numel)).reshape(buf.shape)
                got = idx[tuple(slice(d.lo, d.hi) for d in region.dims)]
                inside |= want <= set(got.flatten().tolist())
            assert inside, (task.name, task.kind, (arena, offset, nbytes))
            with_ranges.add(task.kind)
    assert {"lm_head", "linear", "qkv_rope_kv", "moe_route"} <= with_ranges
    with pytest.raises(TilecompError, match="WPF=64 prefetches weights into L2 with inline PTX"):
        MegakernelEngine(MiMoForCausalLM(cfg), None, max_len=MAX_LEN, tiles={"WPF": 64})
