"""The benchmark's pieces on CPU: the compiled baseline's static step computes the
reference's logits, the floor adds up, and `run_bench` produces a complete report."""
import argparse

import pytest
import torch

from tilecomp.bench.eager_step import EagerStep
from tilecomp.bench.floor import MXFP4_BYTES_PER_ELEM, kv_read_positions, step_bytes
from tilecomp.bench.random_model import random_draft, random_target
from tilecomp.bench.run import bf16_layers_that_fit, format_table, run_bench
from tilecomp.bench.static_step import StaticStep
from tilecomp.models import preset


@pytest.fixture(scope="module")
def tiny():
    cfg, dcfg = preset("tiny")
    torch.manual_seed(0)
    target = random_target(cfg, "cpu", dtype=torch.float32)
    for p in target.parameters():                    # non-trivial norms and sinks
        if p.ndim == 1:
            p.data.normal_(1.0, 0.1)
    return cfg, dcfg, target


def test_static_step_verify_matches_reference_forward(tiny):
    """The static-cache, gathered-expert verify gives the module's own logits, across the window."""
    cfg, _, target = tiny
    T, ctx = 8, 21                                   # context > sliding window (8)
    ids = torch.randint(0, cfg.vocab_size, (ctx + T,))
    want = target(ids[None])[0]                      # full-sequence forward [ctx + T, V]
    step = StaticStep(target, None, context=ctx, block=T)
    with torch.no_grad():
        step.verify(ids[:ctx], torch.arange(ctx))    # fills the static caches
        got, _ = step.verify(ids[ctx:], torch.arange(ctx, ctx + T))
    torch.testing.assert_close(got, want[ctx:], rtol=1e-4, atol=1e-4)


def test_static_step_dflash_call_runs_and_accepts_prefix(tiny):
    cfg, dcfg, target = tiny
    draft = random_draft(dcfg, cfg, "cpu", dtype=torch.float32)
    step = StaticStep(target, draft, context=30, block=8)
    ids = torch.full((8,), dcfg.mask_token_id)
    ids[0] = 5
    with torch.no_grad():
        block, posterior, acc = step(ids, torch.tensor(30))
    assert block[0] == 5 and (block[1:] != dcfg.mask_token_id).all()
    n = int(acc)
    assert 0 <= n <= 7 and torch.equal(block[1:1 + n], posterior[:n])
    assert n == 7 or block[1 + n] != posterior[n]


def test_floor_counts_routed_experts_and_window():
    cfg, dcfg = preset("mimo-v2-flash", layers=8)
    unique = [0] + [64] * 7
    b8 = step_bytes(cfg, dcfg, context=4096, block=8, unique_experts=unique)
    per_expert = 3 * 2048 * 4096 * MXFP4_BYTES_PER_ELEM
    assert b8.parts["experts_routed"] == int(7 * 64 * per_expert) or \
        abs(b8.parts["experts_routed"] - 7 * 64 * per_expert) < 8
    assert b8.parts["lm_head"] == 152576 * 4096 * 2
    assert kv_read_positions(128, 4096, 8) == 135 and kv_read_positions(None, 4096, 8) == 4096
    b1 = step_bytes(cfg, dcfg, context=4096, block=1, unique_experts=[0] + [8] * 7)
    assert "draft_weights" not in b1.parts and b1.total < b8.total
    assert b8.total == sum(b8.parts.values())


def test_bf16_expert_layers_fit_next_to_the_rest():
    """The bf16-experts baseline's layer count: what fits beside the embedding, LM head, the
    routed experts' transient copies and 2 GiB; more memory never fits fewer layers, at least one."""
    cfg, _ = preset("mimo-v2-flash", layers=8)
    per_layer = 3 * cfg.n_routed_experts * cfg.moe_intermediate_size * cfg.hidden_size * 2   # 12.9 GB
    counts = [bf16_layers_that_fit(cfg, 8, int(g * 1e9)) for g in (1, 20, 40, 60, 80, 400)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 8
    n = bf16_layers_that_fit(cfg, 8, int(76e9))
    assert 3 * per_layer < n * per_layer < 76e9 - 2 * cfg.vocab_size * cfg.hidden_size * 2 - (2 << 30)
    assert bf16_layers_that_fit(cfg, 1, int(60e9)) >= bf16_layers_that_fit(cfg, 8, int(60e9))


def test_bf16_experts_retry_one_layer_fewer_after_an_out_of_memory(monkeypatch):
    """measure_bf16_experts (GPU only; its control flow checked here with the GPU calls faked):
    the layer count from bf16_layers_that_fit, an out-of-memory retried with one layer fewer and
    recorded, ms per layer from the layers that ran; every try out of memory is an error entry."""
    import tilecomp.bench.random_model as random_model
    import tilecomp.bench.run as run
    cfg, _ = preset("mimo-v2-flash", layers=8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(60e9), int(80e9)))
    built = []
    monkeypatch.setattr(random_model, "random_target", lambda c, device, experts: built.append(
        (c.num_hidden_layers, device, experts)) or object())
    calls = iter([torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB\nmore"),
                  {"median_ms": 12.0}])

    def compiled(model, draft, args):
        r = next(calls)
        if isinstance(r, Exception):
            raise r
        return dict(r)
    monkeypatch.setattr(run, "measure_compiled", compiled)
    args = argparse.Namespace(block=8)
    n = bf16_layers_that_fit(cfg, 8, int(60e9))
    stats = run.measure_bf16_experts(cfg, args)
    assert built == [(n, "cuda", "dense"), (n - 1, "cuda", "dense")]
    assert stats["layers"] == n - 1 and stats["ms_per_layer"] == 12.0 / (n - 1)
    assert stats["retries"] == [f"out of memory at {n} layers: CUDA out of memory. Tried to allocate 1 GiB"]
    monkeypatch.setattr(run, "measure_compiled", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    out = run.measure_bf16_experts(cfg, args)
    assert set(out) == {"error"} and out["error"].count("out of memory at") == n


def test_eager_step_records_unique_experts(tiny):
    cfg, dcfg, target = tiny
    draft = random_draft(dcfg, cfg, "cpu", dtype=torch.float32)
    step = EagerStep(target, draft, context=40, block=8)
    committed = step()
    assert 1 <= committed <= 8
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe(i):
            assert cfg.num_experts_per_tok <= step.unique_experts[i] <= cfg.n_routed_experts
    step.close()


def test_run_bench_report_on_cpu():
    """Every measured step runs (the megakernel in Triton's interpreter, on the compiler's
    scheduled DFlash step, through the --cuda-graph launch path) and the report carries floor
    ratios for each."""
    args = argparse.Namespace(checkpoint=None, preset="tiny", layers=None, context=20, block=8,
                              acceptance=6.3, programs=None, iters=1, eager_iters=2, skip_compile=False,
                              skip_megakernel=False, skip_bf16=True, json=None,
                              num_warps=4, tiles={"BLOCK_K": 32}, qkv_q_heads=-1, trace=False,
                              lower_options={"kv_chunk": 8, "expert_operands": 1}, cuda_graph=True)
    report = run_bench(args)
    mk = report["results"]["megakernel"]
    assert mk["lower"] == {"kv_chunk": 8, "expert_operands": 1} and mk["num_warps"] == 4
    # the constexprs the timed kernel ran with, those the program decides (XACT) included
    assert mk["tiles"]["BLOCK_K"] == 32 and mk["tiles"]["XACT"] == 1
    # --cuda-graph: the interpreter runs the graph's two operations directly (device epoch)
    assert mk["cuda_graph"] is True
    assert report["floor"]["ms"] > 0 and report["copy_bandwidth_gbps"] > 0
    for name in ("eager", "torch_compile", "megakernel"):
        r = report["results"][name]
        assert r["median_ms"] > 0 and r["ratio_to_floor"] > 0, (name, r)
    assert report["results"]["megakernel"]["schedule"] == "compiled"
    assert set(report["speedup_of_megakernel"]) == {"eager", "torch_compile"}
    assert "floor" in format_table(report)


def test_interleaved_ab_times_two_engines_and_names_its_verdict(monkeypatch):
    """--ab-tile / --ab-lower: the step as given (A) and with the overrides on top (B), built on
    the same weights and timed alternately; the per-pair differences give the median, a 95%
    interval and a verdict. The B engine really gets the overrides (its kernel's constexprs);
    --skip-megakernel leaves out the plain timing, not the A/B."""
    import tilecomp.bench.run as run_mod
    built = []
    real = run_mod._megakernel_step

    engines = []

    def spy(*a, **k):
        out = real(*a, **k)
        built.append(dict(out[1].kernel.constexprs))
        engines.append(out[0])
        return out
    monkeypatch.setattr(run_mod, "_megakernel_step", spy)
    args = argparse.Namespace(checkpoint=None, preset="tiny", layers=None, context=20, block=1,
                              acceptance=6.3, programs=None, iters=3, eager_iters=1, skip_compile=True,
                              skip_megakernel=True, skip_bf16=True, json=None,
                              num_warps=4, tiles={"BLOCK_K": 32}, qkv_q_heads=-1, trace=False,
                              lower_options={}, cuda_graph=None,
                              ab_tiles={"STAGES_C": 2}, ab_lower={"kv_chunk": 8})
    report = run_bench(args)
    ab = report["ab"]
    assert [c["BLOCK_K"] for c in built[:2]] == [32, 32]
    assert built[0]["STAGES_C"] == 3 and built[1]["STAGES_C"] == 2
    assert ab["pairs"] == 3 and ab["a"]["n"] == 3 and ab["b"]["n"] == 3
    lo, hi = ab["diff_ci95_ms"]
    assert lo <= ab["diff_median_ms"] <= hi
    assert ab["verdict"] in ("B faster", "B slower", "inside the noise")
    assert ab["b_tiles"] == {"STAGES_C": 2} and ab["b_lower"] == {"kv_chunk": 8}
    assert "A/B (3 interleaved pairs)" in format_table(report) and "--tile STAGES_C=2" in format_table(report)
    assert "megakernel" not in report["results"]       # --skip-megakernel: the A/B alone
    # another lowering: a second engine, which reuses the first one's MXFP4 arena (no second copy
    # of the experts) and writes its own of everything else
    a_eng, b_eng = engines
    assert b_eng.arenas.data["u8"] is a_eng.arenas.data["u8"]
    assert b_eng.arenas.data["w"].data_ptr() != a_eng.arenas.data["w"].data_ptr()


def test_ab_of_tile_sizes_only_is_a_second_program_on_one_engine(monkeypatch):
    """--ab-tile alone: B is engine.variant_program on A's engine (one copy of the weights), its
    kernel launched with the override while A's program keeps the engine's; both run without a
    timeout (the A/B checks both scoreboards). Switches that change the arena's weights, and
    unknown names, are refused there."""
    import tilecomp.bench.run as run_mod
    from tilecomp.errors import TilecompError
    engines, variants = [], []
    real_step = run_mod._megakernel_step

    def spy(*a, **k):
        out = real_step(*a, **k)
        engines.append(out[0])
        return out
    monkeypatch.setattr(run_mod, "_megakernel_step", spy)
    from tilecomp.runtime.megakernel import MegakernelEngine
    real_variant = MegakernelEngine.variant_program

    def spy_variant(self, kind, tiles):
        prog = real_variant(self, kind, tiles)
        variants.append((kind, dict(prog.kernel.constexprs)))
        return prog
    monkeypatch.setattr(MegakernelEngine, "variant_program", spy_variant)
    args = argparse.Namespace(checkpoint=None, preset="tiny", layers=None, context=20, block=1,
                              acceptance=6.3, programs=None, iters=2, eager_iters=1, skip_compile=True,
                              skip_megakernel=True, skip_bf16=True, json=None,
                              num_warps=4, tiles={}, qkv_q_heads=-1, trace=False,
                              lower_options={}, cuda_graph=None,
                              ab_tiles={"STAGES_C": 2}, ab_lower={})
    report = run_bench(args)
    assert len(engines) == 1 and len(variants) == 1
    kind, consts = variants[0]
    assert kind == "plain" and consts["STAGES_C"] == 2
    assert engines[0].step_program("plain").kernel.constexprs["STAGES_C"] == 3
    assert report["ab"]["pairs"] == 2
    with pytest.raises(TilecompError, match="MX_DOT.*arena"):
        engines[0].variant_program("plain", {"MX_DOT": 0})
    with pytest.raises(TilecompError, match="BLOCK_DD"):
        engines[0].variant_program("plain", {"BLOCK_DD": 4})


def test_every_gpu_default_switch_can_be_turned_back_by_tile():
    """Each GPU_TUNING switch that has a CPU default (TUNING_DEFAULTS) parses at both values, so
    `--tile NAME=<CPU value>` (e.g. QKV_LOOP=0, COMB_GATHER=0) can A/B a GPU default off."""
    from tilecomp.codegen import layout as L
    from tilecomp.commands.bench import parse_tiles
    shared = sorted(set(L.GPU_TUNING) & set(L.TUNING_DEFAULTS))
    assert {"QKV_LOOP", "COMB_GATHER", "MMAV2"} <= set(shared)
    for name in shared:
        for value in (L.GPU_TUNING[name], L.TUNING_DEFAULTS[name]):
            assert parse_tiles([f"{name}={value}"]) == {name: value}


def test_bench_switches_parse_and_name_bad_values():
    from tilecomp.commands.bench import parse_lower, parse_tiles
    from tilecomp.errors import TilecompError
    assert parse_tiles(["BLOCK_K=256", "BLOCK_KX=128"]) == {"BLOCK_K": 256, "BLOCK_KX": 128}
    assert parse_tiles(["MX_DOT=0", "STAGES=3", "STAGES_X=5"]) == {"MX_DOT": 0, "STAGES": 3, "STAGES_X": 5}
    assert parse_tiles(["MX_DOT=3", "L2PF=0"]) == {"MX_DOT": 3, "L2PF": 0}
    assert parse_tiles(["MX_DOT=7", "NORM_F32=0"]) == {"MX_DOT": 7, "NORM_F32": 0}
    assert parse_tiles(["MX_DOT=9"]) == {"MX_DOT": 9}
    assert parse_tiles(["INLINE=expert_up_gate+expert_down"]) == {"INLINE": 768}
    assert parse_tiles(["INLINE=768", "WPF=96"]) == {"INLINE": 768, "WPF": 96}
    with pytest.raises(TilecompError, match="'INLINE=expert_upgate'"):
        parse_tiles(["INLINE=expert_upgate"])
    with pytest.raises(TilecompError, match="'MX_DOT=10'"):
        parse_tiles(["MX_DOT=10"])
    with pytest.raises(TilecompError, match="'NORM_F32=2'"):
        parse_tiles(["NORM_F32=2"])
    with pytest.raises(TilecompError, match="'L2PF=-1'"):
        parse_tiles(["L2PF=-1"])
    with pytest.raises(TilecompError, match="'STAGES=0'"):
        parse_tiles(["STAGES=0"])
    assert parse_lower(["programs=0", "kv_chunk=512"]) == {"programs": 0, "kv_chunk": 512}
    with pytest.raises(TilecompError, match="--tile: .*power of two.*'BLOCK_K=96'"):
        parse_tiles(["BLOCK_K=96"])
    with pytest.raises(TilecompError, match="--lower: .*'vocab=4'"):
        parse_lower(["vocab=4"])
    with pytest.raises(TilecompError, match="--lower: .*'programs=-1'"):
        parse_lower(["programs=-1"])


def test_bench_reports_tokens_per_s_at_the_measured_acceptance_of_a_checkpoint(tmp_path, monkeypatch):
    """A --checkpoint with a draft and a tokenizer.json: after its timing, the megakernel engine
    generates greedily from held-out stdlib prompts; the report carries that acceptance (the
    reference engine's on the same prompts) and tokens/s at it next to the assumed ones. Without
    the megakernel (first run) the reference engine measures it; --acceptance-prompts 0 measures
    none."""
    from tilecomp.bench.acceptance import heldout_prompts
    from tilecomp.cli import main
    from tilecomp.models import load_pretrained
    from tilecomp.train.corpus import stdlib_dir
    from tilecomp.train.evaluate import acceptance
    from tilecomp.train.tokenizer import load_tokenizer, train_tokenizer
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt), "--seed", "3"]) == 0
    texts = [(stdlib_dir() / name).read_text() for name in ("textwrap.py", "bisect.py", "heapq.py")]
    train_tokenizer(texts, vocab_size=512).save(str(ckpt / "tokenizer.json"))
    tok = load_tokenizer(ckpt / "tokenizer.json")
    target, draft = load_pretrained(ckpt, dtype=torch.float32)
    args = argparse.Namespace(checkpoint=str(ckpt), preset=None, layers=None, context=24, block=8,
                              acceptance=6.3, programs=None, iters=1, eager_iters=1, skip_compile=True,
                              skip_megakernel=True, skip_bf16=True, json=None, num_warps=4,
                              tiles={"BLOCK_K": 32}, qkv_q_heads=-1, trace=False,
                              lower_options={"kv_chunk": 8}, acceptance_prompts=3,
                              acceptance_prompt_len=12, acceptance_tokens=12)
    report = run_bench(args)
    m = report["measured_acceptance"]
    assert (m["engine"], m["prompts"], m["new_tokens"]) == ("reference", 3, 12)
    want = acceptance(target, draft, heldout_prompts(tok, 3, 12), 12, max_len=64)
    assert (m["steps"], m["mean_acceptance"]) == (want["steps"], want["mean_acceptance"])
    r = report["results"]["eager"]
    assert r["tokens_per_s_measured"] == pytest.approx(r["steps_per_s"] * m["mean_acceptance"])
    assert r["tokens_per_s"] == pytest.approx(r["steps_per_s"] * 6.3)
    assert "measured acceptance" in format_table(report)
    # with the megakernel, its own engine (the one whose step was timed) generates; that engine's
    # greedy tokens equal the reference's (tests/runtime), so here only which engine is checked
    seen = []

    def fake(engine, tokenizer, args, block_size, engine_name):
        seen.append(type(engine).__name__)
        return dict(want, engine=engine_name, new_tokens=args.acceptance_tokens)
    monkeypatch.setattr("tilecomp.bench.run.measure_acceptance", fake)
    args.skip_megakernel = False
    report = run_bench(args)
    assert seen == ["MegakernelEngine"] and report["measured_acceptance"]["engine"] == "megakernel"
    mk = report["results"]["megakernel"]
    assert mk["tokens_per_s_measured"] == pytest.approx(mk["steps_per_s"] * want["mean_acceptance"])
    args.acceptance_prompts, args.skip_megakernel = 0, True
    assert "measured_acceptance" not in run_bench(args) and seen == ["MegakernelEngine"]


def test_heldout_prompts_are_held_out_windows_and_name_a_shortfall(tmp_path):
    from tilecomp.bench.acceptance import heldout_prompts
    from tilecomp.errors import TilecompError
    from tilecomp.train.corpus import is_heldout
    from tilecomp.train.tokenizer import load_tokenizer
    tok = load_tokenizer("examples/model/tokenizer.json")
    prompts = heldout_prompts(tok, 3, 32, seed=1)
    assert len(prompts) == 3 and all(len(p) == 32 for p in prompts)
    assert prompts == heldout_prompts(tok, 3, 32, seed=1) != heldout_prompts(tok, 3, 32, seed=2)
    lib = tmp_path / "Lib"
    lib.mkdir()
    names = [f"m{i}.py" for i in range(400)]
    held = [n for n in names if is_heldout(n)]
    for n in names:
        (lib / n).write_text("def f(x):\n    return x + 1\n" * (40 if n == held[0] else 1))
    assert len(heldout_prompts(tok, 1, 32, lib_dir=lib)) == 1
    with pytest.raises(TilecompError, match="--acceptance-prompts"):
        heldout_prompts(tok, 2, 32, lib_dir=lib)


@pytest.mark.parametrize("flag,value", [("--acceptance-prompts", -1), ("--acceptance-tokens", 0),
                                        ("--acceptance-prompt-len", 0)])
def test_bench_names_a_bad_acceptance_flag(capsys, flag, value):
    from tilecomp.cli import main
    assert main(["bench", "--preset", "tiny", flag, str(value)]) != 0
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
