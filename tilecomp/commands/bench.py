"""tilecomp bench: time the decode step (megakernel, eager, torch.compile) against the floor."""
import argparse

from tilecomp.errors import TilecompError


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time one decode step against eager, torch.compile and the floor")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (weights loaded to the GPU)")
    src.add_argument("--preset", help="random weights of a preset, created on the GPU")
    p.add_argument("--layers", type=int, help="keep the first N target layers (with --preset)")
    p.add_argument("--context", type=int, default=4096, help="committed tokens before the step")
    p.add_argument("--block", type=int, default=8, choices=(1, 8), help="8: DFlash step; 1: plain decode")
    p.add_argument("--acceptance", type=float, default=6.3,
                   help="tokens per DFlash step assumed for tokens/s (labelled as assumed)")
    p.add_argument("--acceptance-prompts", type=int, default=8, metavar="N",
                   help="with --checkpoint holding a draft and tokenizer.json, block 8: also measure the "
                        "acceptance by greedy generation from N held-out stdlib prompts and report tokens/s "
                        "at it (0: off)")
    p.add_argument("--acceptance-prompt-len", type=int, default=64, metavar="T", help="tokens per prompt")
    p.add_argument("--acceptance-tokens", type=int, default=128, metavar="M", help="new tokens per prompt")
    p.add_argument("--programs", type=int, help="megakernel programs (default: one per SM)")
    p.add_argument("--iters", type=int, default=100, help="timed steps of the megakernel and torch.compile")
    p.add_argument("--eager-iters", type=int, default=20, help="timed steps of eager PyTorch")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--skip-megakernel", action="store_true", help="leave out the megakernel")
    p.add_argument("--skip-bf16", action="store_true", help="leave out the bf16-experts baseline")
    p.add_argument("--num-warps", type=int, help="warps per megakernel program (default: 8, "
                   "codegen/layout.py GPU_NUM_WARPS)")
    p.add_argument("--tile", action="append", default=[], metavar="NAME=N",
                   help="override a megakernel tile size or code-path switch (repeatable), e.g. "
                        "--tile BLOCK_K=256, --tile MX_DOT=9 (expert dequantization: 0-9), "
                        "--tile NORM_F32=1 (fp32 RMSNorm gains), --tile NOINLINE=1 (each task kind a "
                        "device function), --tile PTX_ASM=0 (MX_DOT 9 without inline PTX), --tile ROUTE_DOT=0 (the router's fp32 FMA dot), --tile XPIPE=1 (the expert K loops software-pipelined, STAGES_X deep), --tile WLEFT=1 (MX_DOT 9: the dequantized weights as the dots' left operand), --tile STILE=1 (the expert scales tiled by K words), --tile AFRAG=1 (MX_DOT 9's codes in the wgmma register operand's order), --tile UPLOOP=1 (linear tasks without a SwiGLU up matrix run a loop without it; 2: tasks without a norm too, a loop without the norm gains), --tile WPF=128 [--tile WPFL=1] (cross-task weight prefetch into L2, KB per range), --tile INLINE=expert_up_gate+expert_down (kinds kept inlined under NOINLINE 1), --tile XFLAT=1 (each expert task's units as one pipelined loop), --tile STAGES_C=8 --tile BLOCK_NC=128 (moe_combine's slot pipeline and column tile), --tile MMAV2=1 (the expert dots as mma.sync, no wgmma), --tile COMB_GATHER=1 (moe_combine adds each row's chosen slots only), --tile QKV_LOOP=1 (qkv_rope_kv's chunks through one projection loop), --tile XEVEN=1 (the expert loads drop their bounds masks on whole tiles), --tile XTILE=1 (the expert codes stored tile by tile, one contiguous run per K step); codegen/layout.py TUNING_DEFAULTS says what each does")
    p.add_argument("--lower", action="append", default=[], metavar="NAME=N",
                   help="override a lowering option (passes/lower.py LowerOptions), e.g. --lower programs=0 "
                        "(fixed tile sizes, no balancing over the programs) or --lower kv_chunk=512")
    p.add_argument("--ab-tile", action="append", default=[], metavar="NAME=N",
                   help="also time an interleaved A/B: the megakernel as given (A) against the same with these "
                        "--tile overrides on top (B), alternating steps, per-pair differences with a 95%% "
                        "interval (repeatable; --iters pairs; --skip-megakernel leaves out the plain timing)")
    p.add_argument("--ab-lower", action="append", default=[], metavar="NAME=N",
                   help="the A/B's --lower overrides for B (repeatable)")
    p.add_argument("--qkv-q-heads", type=int, default=-1, metavar="N",
                   help="query heads per qkv task (0: a whole KV group; default: 1 on a GPU)")
    p.add_argument("--trace", action="store_true",
                   help="also run one step with per-task timers and report where its time goes (GPU)")
    p.add_argument("--phases", action="store_true",
                   help="also time each task kind alone, waits removed, with GB/s where its bytes are "
                        "modelled: is a step slow in its phases or in the chain between them (GPU)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="run each megakernel step as the replay of a CUDA graph (no per-step host "
                        "launch work; the measured acceptance's generation too). Default: on a GPU")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    return p


def run(args) -> int:
    import os

    import torch
    if not torch.cuda.is_available():      # a CPU smoke run: the megakernel runs in Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tilecomp.bench import format_table, run_bench, write_json
    if args.layers is not None and args.checkpoint:
        raise TilecompError("--layers: only with --preset (a checkpoint has its own layer count)")
    args.tiles = parse_tiles(args.tile)
    args.lower_options = parse_lower(args.lower)
    args.ab_tiles, args.ab_lower = parse_tiles(args.ab_tile), parse_lower(args.ab_lower)
    check_num_warps(args.num_warps)
    args.qkv_q_heads = parse_qkv_q_heads(args.qkv_q_heads)
    for flag, value, least in (("--acceptance-prompts", args.acceptance_prompts, 0),
                               ("--acceptance-prompt-len", args.acceptance_prompt_len, 1),
                               ("--acceptance-tokens", args.acceptance_tokens, 1)):
        if value < least:
            raise TilecompError(f"{flag}: expected an integer >= {least}, found {value}")
    if dry_run():
        return 0
    report = run_bench(args)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _name_values(items: list[str], flag: str, ok, expected: str) -> dict:
    """NAME=N items of a repeatable flag -> {NAME: N}; `ok(name, n)` says whether one is valid."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or not ok(name, n):
            raise TilecompError(f"{flag}: expected NAME=N with {expected}, found {item!r}")
        out[name] = n
    return out


SWITCHES = {"MX_DOT": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), "NORM_F32": (0, 1), "NOINLINE": (0, 1), "PTX_ASM": (0, 1),
            "ROUTE_DOT": (0, 1, 2), "XPIPE": (0, 1), "WLEFT": (0, 1), "STILE": (0, 1), "AFRAG": (0, 1), "UPLOOP": (0, 1, 2),
            "WPFL": (0, 1), "XFLAT": (0, 1), "MMAV2": (0, 1), "COMB_GATHER": (0, 1),
            "QKV_LOOP": (0, 1), "XEVEN": (0, 1), "XTILE": (0, 1)}   # code paths (codegen/layout.py TUNING_DEFAULTS)
COUNTS = ("STAGES", "STAGES_X", "STAGES_C")   # pipeline depths: any N >= 1
OPTIONAL_COUNTS = ("L2PF",)        # depths where 0 turns the feature off: any N >= 0
KB32 = ("WPF",)                    # KB in bulk operations of layout.WPF_CHUNK_KB: a multiple of it, 0 = off
MASKS = ("INLINE",)                # kind masks: N >= 0, or kind names joined by '+' (layout.inline_mask)


def parse_tiles(items: list[str]) -> dict:
    """--tile NAME=N ... -> {NAME: N}; N a power of two (tile sizes), a listed value for SWITCHES,
    >= 1 for COUNTS, a kind mask for MASKS (INLINE=expert_up_gate+expert_down or its integer)."""
    from tilecomp.codegen import layout as L
    items = list(items)
    for i, item in enumerate(items):
        name, _, value = item.partition("=")
        if name in MASKS and value and not value.lstrip("-").isdigit():
            try:
                items[i] = f"{name}={L.inline_mask(*value.split('+'))}"
            except TilecompError as e:       # an unknown kind name (layout.kind_abi)
                raise TilecompError(f"--tile {item!r}: {e}") from None
    from tilecomp.codegen.kernels import check_tile_names
    try:        # the engine's own check, before any work (a DRY=1 gpu.sh call relies on it)
        check_tile_names([item.partition("=")[0] for item in items if item.partition("=")[0]], tile_names())
    except TilecompError as e:
        raise TilecompError(f"--tile {' '.join(items)}: {e}") from None

    def ok(name, n):
        if name in MASKS:
            return n >= 0
        if name in KB32:
            return n >= 0 and n % L.WPF_CHUNK_KB == 0
        if name in SWITCHES:
            return n in SWITCHES[name]
        if name in COUNTS:
            return n >= 1
        if name in OPTIONAL_COUNTS:
            return n >= 0
        return bool(name) and n > 0 and not n & (n - 1)
    return _name_values(items, "--tile", ok, f"N a power of two (e.g. BLOCK_K=256), {SWITCHES}, "
                        f">= 1 for {COUNTS}, >= 0 for {OPTIONAL_COUNTS}, "
                        f"a kind mask (N >= 0 or kind+kind) for {MASKS}, a multiple of {L.WPF_CHUNK_KB} for {KB32}")


def tile_names() -> set:
    """Every name --tile can set: the kernels' tile sizes and switches (codegen/kernels.py
    constexprs_for; the same names for every model)."""
    from tilecomp.codegen.kernels import constexprs_for
    from tilecomp.models.presets import preset
    cfg, dcfg = preset("tiny")
    return set(constexprs_for(cfg, dcfg, 8))


def dry_run() -> bool:
    """TILECOMP_DRY_RUN=1: check a command line's arguments and stop before any work (bench/gpu.sh
    DRY=1 runs a planned GPU call this way on a CPU, so a bad flag costs no device time)."""
    import os
    if os.environ.get("TILECOMP_DRY_RUN") == "1":
        print("dry run: arguments OK", flush=True)
        return True
    return False


def check_num_warps(n: int | None) -> None:
    """--num-warps N: a power of two up to 16 (None: the default, GPU_NUM_WARPS)."""
    if n is not None and n not in (1, 2, 4, 8, 16):
        raise TilecompError(f"--num-warps: expected 1, 2, 4, 8 or 16, found {n}")


def parse_qkv_q_heads(n: int) -> int | None:
    """--qkv-q-heads N -> engine_options' qkv_q_heads: 0 a whole KV group per task (None), -1 the
    engine's default, N query heads per task."""
    if n < -1:
        raise TilecompError(f"--qkv-q-heads: expected N >= 0 (0: a whole KV group), found {n}")
    return None if n == 0 else n


def parse_lower(items: list[str]) -> dict:
    """--lower NAME=N ... -> {NAME: N} for integer fields of LowerOptions."""
    import dataclasses

    from tilecomp.passes.lower import LowerOptions
    fields = {f.name for f in dataclasses.fields(LowerOptions)} - {"qkv_q_heads", "ranks"}
    return _name_values(items, "--lower", lambda name, n: name in fields and n >= 0,
                        f"NAME one of {sorted(fields)} and N >= 0")
