"""`tilecomp bench`: the megakernel step against eager, torch.compile and the floor, in ONE run.

Every figure in the JSON names the GPU, the model shape, the context and the
block, and each time comes with its ratio to the floor and achieved GB/s.
"""
import gc
import json
import platform
import statistics
import time

import torch

from tilecomp import __version__
from tilecomp.errors import TilecompError

from .acceptance import checkpoint_tokenizer, measure_acceptance
from .eager_step import EagerStep
from .floor import step_bytes
from .static_step import StaticStep
from .timing import copy_bandwidth_gbps, summarize, sync, time_steps


def describe_device() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()})"


def entry(stats: dict, floor_ms: float, nbytes: int, tokens_per_step: float) -> dict:
    ms = stats["median_ms"]
    return {**stats, "ratio_to_floor": ms / floor_ms, "achieved_gbps": nbytes / (ms * 1e-3) / 1e9,
            "steps_per_s": 1e3 / ms, "tokens_per_s": 1e3 / ms * tokens_per_step}


def load_models(args, device):
    from tilecomp.models import load_pretrained, preset
    from .random_model import random_draft, random_target
    if args.checkpoint:
        target, draft = load_pretrained(args.checkpoint, dtype=torch.bfloat16, device=device)
        return target.config, (draft.config if draft is not None else None), target, draft
    cfg, dcfg = preset(args.preset, args.layers)
    target = random_target(cfg, device)
    draft = random_draft(dcfg, cfg, device) if args.block > 1 else None
    return cfg, dcfg, target, draft


def _megakernel_step(cfg, dcfg, target, draft, args, tiles=None, lower=None, share_experts=None):
    """(engine, step, run, compile_s): a megakernel engine on the bench's weights with `tiles` /
    `lower` (default: the command line's), its step program, and `run(trace=None)`, one step as
    generation runs it from the same saved step state (so each sees `args.context` positions)."""
    from tilecomp.codegen import layout as L
    from tilecomp.passes.pipeline import compile_model, engine_options
    from tilecomp.runtime.megakernel import MegakernelEngine
    tiles = args.tiles if tiles is None else tiles
    lower = getattr(args, "lower_options", None) if lower is None else lower
    use_draft = draft is not None and args.block > 1
    max_len = args.context + 4 * args.block
    programs = args.programs or (torch.cuda.get_device_properties(0).multi_processor_count
                                 if torch.cuda.is_available() else 1)
    schedule, compile_s = None, 0.0
    if use_draft:
        t0 = time.time()
        options = engine_options(max_len, programs, not torch.cuda.is_available(), args.qkv_q_heads, lower)
        schedule = compile_model(cfg, dcfg, options)        # all three programs: no second compile
        compile_s = time.time() - t0
    engine = MegakernelEngine(target, draft if use_draft else None, max_len=max_len,
                              programs=programs, schedule=schedule, num_warps=args.num_warps,
                              tiles=tiles, qkv_q_heads=args.qkv_q_heads, lower=lower,
                              cuda_graph=getattr(args, "cuda_graph", None), share_experts=share_experts)
    engine._set_state(pos=args.context, last=1, n_ctx=1 if use_draft else 0, ctx_pos=args.context - 1,
                      temp_bits=0, top_p_bits=L.float_bits(1.0), seed=0)
    block = engine.arenas.view("block")
    block.fill_(dcfg.mask_token_id if use_draft else 0)
    block[0] = 1
    engine.bench_saved = [engine.arenas.view(n).clone() for n in ("state", "block")]
    step = engine.step_program(_step_kind(engine))
    return engine, step, _runner(engine, step), compile_s


def _step_kind(engine) -> str:
    return "dflash" if engine.draft is not None else "plain"


def _runner(engine, step):
    """run(trace=None): one step of `step` on `engine`'s arenas as generation runs it, from the
    step state _megakernel_step saved (so every step sees the same positions)."""
    from tilecomp.codegen import layout as L
    state, tokens = engine.arenas.view("state"), engine.arenas.view("out_tokens")
    n_out = L.STATE["n_out"]

    def run(trace=None):
        engine.arenas.view("state").copy_(engine.bench_saved[0])
        engine.arenas.view("block").copy_(engine.bench_saved[1])
        step.launch(engine.arenas, trace=trace)
        step.read_back(state[n_out:n_out + 1], tokens)    # the host read-back, as generation does it
    return run


def measure_megakernel(cfg, dcfg, target, draft, args, iters: int, tokenizer=None) -> dict:
    """The generated megakernel's step as generation runs it: one launch, then the read-back of
    the committed tokens. The DFlash step runs the compiler's schedule (`compile_model`); every
    timed step starts from the same saved step state, so each sees `args.context` positions.
    With a tokenizer (a checkpoint with a trained draft), the same engine then generates from
    held-out prompts: stats["measured_acceptance"]."""
    use_draft = draft is not None and args.block > 1
    engine, step, run, compile_s = _megakernel_step(cfg, dcfg, target, draft, args)
    programs = engine.programs
    run()
    step.check()
    stats = time_steps(run, iters, warmup=min(10, iters))
    step.check()
    from tilecomp.codegen.harness import interpreting
    from tilecomp.passes.pipeline import lower_overrides
    # what the timed kernel was launched with: its constexprs (the ones derived from the program,
    # ARRIVE / XACT, included) and the lowering options (GPU_LOWER under the user's --lower)
    stats.update(num_warps=engine.num_warps, tiles=dict(step.kernel.constexprs), cuda_graph=engine.cuda_graph,
                 qkv_q_heads=engine.qkv_q_heads,
                 lower=lower_overrides(interpreting(), getattr(args, "lower_options", None)),
                 programs=programs, compile_s=compile_s, schedule="compiled" if use_draft else "engine",
                 tasks=int(step.records.shape[0]), counters=len(step.counter_names))
    if getattr(args, "trace", False) and torch.cuda.is_available():
        from .trace import format_summary, summarize
        buf = step.new_trace()
        run(trace=buf)                     # a separate build with timers; not in the timings
        buf.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run(trace=buf)                     # built: this launch's stamps, timed like a step
        b.record()
        b.synchronize()
        step.check()
        stats["trace"] = summarize(step, buf)
        stats["trace"]["traced_step_ms"] = a.elapsed_time(b)
        print(format_summary(stats["trace"]), flush=True)
    if tokenizer is not None and use_draft:
        stats["measured_acceptance"] = measure_acceptance(engine, tokenizer, args, dcfg.block_size, "megakernel")
    if getattr(args, "phases", False) and torch.cuda.is_available():
        from .phases import format_phases, replay_phases
        stats["phases"] = replay_phases(step, engine.arenas, alone=True, graph=engine.cuda_graph)
        print(format_phases(stats["phases"]), flush=True)
    return stats


def measure_ab(cfg, dcfg, target, draft, args, iters: int) -> dict:
    """An interleaved A/B of the megakernel step: the command line's engine (A) and one with the
    --ab-tile / --ab-lower overrides on top (B), on the same weights, timed alternately A, B, A,
    B, ... so both see the same clocks, temperature and neighbours. Per-pair differences B - A
    give the verdict: their median with a 95% bootstrap interval (a lever of 1% of a step, below
    the spread of separate runs, shows here). Tile overrides alone run B as a second step
    program on A's engine (one copy of the weights); lowering overrides build B's engine on A's
    MXFP4 arena. Both programs' scoreboards are checked for timeouts."""
    import random
    from tilecomp.codegen import layout as L
    tiles_b = dict(args.tiles, **args.ab_tiles)
    lower_b = dict(getattr(args, "lower_options", None) or {}, **args.ab_lower)
    engine_a, step_a, run_a, _ = _megakernel_step(cfg, dcfg, target, draft, args)
    same_arena = not set(args.ab_tiles) & set(L.ARENA_TILES)     # B writes the weights as A does
    if same_arena and not args.ab_lower:
        # kernel-only overrides: B is a second step program on A's engine (one copy of the weights)
        step_b = engine_a.variant_program(_step_kind(engine_a), args.ab_tiles)
        run_b = _runner(engine_a, step_b)
    else:
        # another lowering: an engine of its own, holding no second copy of the experts (two
        # flash 8L engines do not fit in 80 GB beside the bench's weights otherwise)
        _, step_b, run_b, _ = _megakernel_step(cfg, dcfg, target, draft, args, tiles=tiles_b, lower=lower_b,
                                               share_experts=engine_a if same_arena else None)
    for run in (run_a, run_b):
        run()
    step_a.check()
    step_b.check()
    times = {"a": [], "b": []}
    for i in range(iters + min(10, iters)):
        for name, run in (("a", run_a), ("b", run_b)) if i % 2 == 0 else (("b", run_b), ("a", run_a)):
            one = time_steps(run, 1, warmup=0)["median_ms"]
            if i >= min(10, iters):                   # the first pairs warm up
                times[name].append(one)
    step_a.check()
    step_b.check()
    diffs = sorted(b - a for a, b in zip(times["a"], times["b"]))
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(1000))
    lo, hi = boot[25], boot[974]
    base = statistics.median(times["a"])
    verdict = "B faster" if hi < 0 else "B slower" if lo > 0 else "inside the noise"
    return {"a": summarize(times["a"]), "b": summarize(times["b"]),
            "b_tiles": args.ab_tiles, "b_lower": args.ab_lower, "pairs": len(diffs),
            "diff_median_ms": statistics.median(diffs), "diff_ci95_ms": [lo, hi],
            "diff_percent": 100 * statistics.median(diffs) / base if base else None, "verdict": verdict}


def run_bench(args) -> dict:
    if args.block not in (1, 8):
        raise TilecompError(f"--block: expected 8 (DFlash) or 1 (plain decode), found {args.block}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.time()
    cfg, dcfg, target, draft = load_models(args, device)
    report = {"tilecomp": __version__, "torch": torch.__version__, "device": describe_device(),
              "date": time.strftime("%Y-%m-%d"), "model": args.checkpoint or args.preset,
              "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "experts": cfg.n_routed_experts,
              "context": args.context, "block": args.block, "draft": draft is not None,
              "build_s": time.time() - t0}
    bw = copy_bandwidth_gbps()
    report["copy_bandwidth_gbps"] = bw
    results = {}
    dflash = args.block > 1
    tokens_per_step = args.acceptance if dflash else 1.0
    report["assumed_acceptance"] = args.acceptance if dflash else None
    tokenizer = checkpoint_tokenizer(args) if draft is not None else None

    def record(name: str, stats: dict):
        """Add one measurement, print it, and save the report so far (a run cut off by a
        time limit still leaves every finished measurement in --json)."""
        results[name] = stats
        report["results"] = {k: (entry(v, floor_ms, nbytes.total, tokens_per_step) if "median_ms" in v else v)
                             for k, v in results.items() if v is not None}
        r = report["results"][name]
        if "median_ms" in r:
            print(f"[bench] {name}: {r['median_ms']:.3f} ms, {r['ratio_to_floor']:.2f}x floor", flush=True)
        if getattr(args, "json", None):
            write_json(dict(report, partial=True), args.json)

    with torch.no_grad():
        eager = EagerStep(target, draft, args.context, args.block)
        eager_stats = time_steps(eager, args.eager_iters, warmup=2)
        eager.close()
        unique = eager.unique_experts
        del eager
        nbytes = step_bytes(cfg, dcfg if draft is not None else None, args.context, args.block, unique)
        floor_ms = nbytes.total / (bw * 1e9) * 1e3
        report["unique_experts_per_layer"] = unique
        report["floor"] = {"bytes": nbytes.total, "ms": floor_ms, "bytes_by_part": nbytes.parts,
                           "bandwidth_gbps": bw}
        record("eager", eager_stats)
        if getattr(args, "ab_tiles", None) or getattr(args, "ab_lower", None):
            report["ab"] = measure_ab(cfg, dcfg, target, draft, args, args.iters)
            print(format_ab(report["ab"]), flush=True)
        if not args.skip_megakernel:
            mk = measure_megakernel(cfg, dcfg, target, draft, args, args.iters, tokenizer)
            measured = mk.pop("measured_acceptance", None)
            if measured is not None:
                report["measured_acceptance"] = measured
            record("megakernel", mk)
        if tokenizer is not None and "measured_acceptance" not in report:   # no megakernel run
            from tilecomp.runtime.reference import ReferenceEngine
            ref = ReferenceEngine(target, draft, max_len=args.context + 4 * args.block)
            report["measured_acceptance"] = measure_acceptance(ref, tokenizer, args, dcfg.block_size, "reference")
        if not args.skip_compile:
            record("torch_compile", measure_compiled(target, draft, args))
    if not args.skip_bf16 and device == "cuda":
        # the MXFP4 models and the compiled step's CUDA graphs go first: the bf16 experts of one
        # flash layer alone are 12.9 GB
        del target, draft
        release_cuda()
        with torch.no_grad():
            report["bf16_experts"] = measure_bf16_experts(cfg, args)
    gc.collect()
    add_speedups(report)
    add_measured_tokens(report)
    return report


def add_measured_tokens(report: dict):
    """steps/s x the measured acceptance, next to the assumed tokens/s of every timed step."""
    m = report.get("measured_acceptance")
    if not m:
        return
    for r in report["results"].values():
        if "steps_per_s" in r:
            r["tokens_per_s_measured"] = r["steps_per_s"] * m["mean_acceptance"]


def measure_compiled(target, draft, args) -> dict:
    step = StaticStep(target, draft, args.context, args.block)
    ids = torch.randint(0, target.config.vocab_size, (args.block,), device=target.lm_head.weight.device)
    if draft is not None and args.block > 1:
        ids[1:] = draft.config.mask_token_id
    pos0 = torch.tensor(args.context, device=ids.device)
    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True) if ids.is_cuda else step
    t0 = time.time()

    def run():
        out = fn(ids, pos0)
        out[2].item()                                  # the host read-back of the accepted count
    run()
    sync()
    stats = time_steps(run, args.iters, warmup=5)
    stats["compile_s"] = time.time() - t0
    return stats


def release_cuda():
    """Free what the models and compiled steps held: torch.compile's graphs (and their CUDA-graph
    pools), unreachable tensors, and the allocator's cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def bf16_layers_that_fit(cfg, block: int, free_bytes: int) -> int:
    """Target layers whose bf16 experts fit in `free_bytes` next to the embedding and LM head, the
    other weights of each layer, and the step's transient copies of the routed experts (the
    reference gathers the chosen experts' matrices; the graph's pool keeps a second copy)."""
    E, F_, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    expert = 3 * F_ * D * 2
    attn = max((cfg.attn(i).n_heads * (cfg.attn(i).head_dim + cfg.attn(i).v_head_dim)
                + 2 * cfg.attn(i).n_kv_heads * cfg.attn(i).head_dim) * D * 2
               for i in range(cfg.num_hidden_layers))
    per_layer = E * expert + attn + E * D * 4                        # experts, attention, router
    fixed = 2 * cfg.vocab_size * D * 2 + 3 * cfg.intermediate_size * D * 2   # embedding, LM head, a dense MLP
    transient = 2 * min(E, block * cfg.num_experts_per_tok) * expert + (2 << 30)
    return max(1, min(cfg.num_hidden_layers, int((free_bytes - fixed - transient) // per_layer)))


def measure_bf16_experts(cfg, args) -> dict:
    """torch.compile step with bf16 experts (what a user without FP4 runs), on as many layers as
    fit once the MXFP4 models are gone; an out-of-memory retries with one layer fewer."""
    from tilecomp.models.presets import first_layers
    from .random_model import random_target
    free, _ = torch.cuda.mem_get_info()
    layers = bf16_layers_that_fit(cfg, args.block, free)
    errors = []
    while layers >= 1:
        model = None
        try:
            model = random_target(first_layers(cfg, layers), "cuda", experts="dense")
            stats = measure_compiled(model, None, args)
            break
        except torch.cuda.OutOfMemoryError as e:
            errors.append(f"out of memory at {layers} layers: {str(e).splitlines()[0]}")
            layers -= 1
        finally:
            del model
            release_cuda()
    else:
        return {"error": "; ".join(errors)}
    stats["layers"] = layers
    stats["ms_per_layer"] = stats["median_ms"] / layers
    if errors:
        stats["retries"] = errors
    return stats


def add_speedups(report: dict):
    res = report["results"]
    mk = res.get("megakernel", {}).get("median_ms")
    if mk:
        for name in ("eager", "torch_compile"):
            if name in res and "median_ms" in res[name]:
                report.setdefault("speedup_of_megakernel", {})[name] = res[name]["median_ms"] / mk


def format_table(report: dict) -> str:
    fl = report["floor"]
    lines = [f"tilecomp bench  {report['device']}  model={report['model']} layers={report['layers']} "
             f"context={report['context']} block={report['block']} draft={report['draft']}",
             f"copy bandwidth {report['copy_bandwidth_gbps']:.0f} GB/s   floor {fl['bytes'] / 1e9:.3f} GB "
             f"-> {fl['ms']:.3f} ms",
             f"{'step':<16}{'median ms':>10}{'p10':>9}{'p90':>9}{'x floor':>9}{'GB/s':>8}{'tok/s':>10}"]
    for name, r in report["results"].items():
        if "median_ms" not in r:
            lines.append(f"{name:<16}{r.get('error', 'n/a')}")
            continue
        lines.append(f"{name:<16}{r['median_ms']:>10.3f}{r['p10_ms']:>9.3f}{r['p90_ms']:>9.3f}"
                     f"{r['ratio_to_floor']:>9.2f}{r['achieved_gbps']:>8.0f}{r['tokens_per_s']:>10.1f}")
    if report.get("assumed_acceptance"):
        lines.append(f"tokens/s assume {report['assumed_acceptance']} tokens per step (--acceptance, assumed)")
    m = report.get("measured_acceptance")
    if m:
        at = ", ".join(f"{name} {r['tokens_per_s_measured']:.1f}" for name, r in report["results"].items()
                       if "tokens_per_s_measured" in r)
        lines.append(f"measured acceptance {m['mean_acceptance']:.2f} tokens per step ({m['engine']} engine, "
                     f"{m['prompts']} held-out stdlib prompts x {m['new_tokens']} greedy tokens): tokens/s {at}")
    for name, s in report.get("speedup_of_megakernel", {}).items():
        lines.append(f"megakernel speedup over {name}: {s:.2f}x")
    if report.get("ab"):
        lines.append(format_ab(report["ab"]))
    b = report.get("bf16_experts")
    if b and "median_ms" in b:
        lines.append(f"bf16 experts (torch.compile, {b['layers']} layers): {b['median_ms']:.3f} ms, "
                     f"{b['ms_per_layer']:.3f} ms/layer")
    return "\n".join(lines)


def format_ab(ab: dict) -> str:
    flags = " ".join([f"--tile {k}={v}" for k, v in ab["b_tiles"].items()] +
                     [f"--lower {k}={v}" for k, v in ab["b_lower"].items()])
    lo, hi = ab["diff_ci95_ms"]
    return (f"A/B ({ab['pairs']} interleaved pairs): A {ab['a']['median_ms']:.3f} ms, B ({flags}) "
            f"{ab['b']['median_ms']:.3f} ms; B - A median {ab['diff_median_ms']:+.3f} ms "
            f"({ab['diff_percent']:+.2f}%), 95% interval [{lo:+.3f}, {hi:+.3f}]: {ab['verdict']}")


def write_json(report: dict, path: str):
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
