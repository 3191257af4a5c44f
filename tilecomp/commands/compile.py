"""`tilecomp compile`: compile a model's DFlash decode step and write every stage.

    tilecomp compile (--checkpoint DIR | --preset NAME [--layers N]) --out OUT [--programs P]

Needs only the config (a checkpoint's config.json, or a preset), never the
weights. Writes OUT/graph.ir (the traced decode step), OUT/graph.fused.ir
(after the graph passes), OUT/prefill.graph.ir and OUT/prefill.graph.fused.ir
(the prefill chunk), OUT/tile.ir (lowered), OUT/schedule.ir (scheduled and
annotated), OUT/schedule.html (programs x time), OUT/prefill.tile.ir and
OUT/prefill.schedule.ir (the prefill chunk's), OUT/plain.graph.ir,
OUT/plain.graph.fused.ir, OUT/plain.tile.ir and OUT/plain.schedule.ir (the plain,
no-draft, decode step's), OUT/kernels/*.py and
OUT/manifest.json. Progress goes to stderr; `--dump DIR` also writes every
pass's output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from tilecomp.errors import TilecompError


def add_parser(subparsers):
    from tilecomp.models.presets import PRESETS
    from tilecomp.trace import COMPUTE_DTYPES
    p = subparsers.add_parser("compile", help="compile the decode step and write every IR stage",
                              description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (reads config.json only)")
    source.add_argument("--preset", choices=list(PRESETS), help="a built-in model shape")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="keep the first N target layers (--preset)")
    p.add_argument("--out", required=True, metavar="OUT", help="directory for the stages")
    p.add_argument("--programs", type=int, default=132, metavar="P", help="persistent programs (default 132)")
    p.add_argument("--max-len", type=int, default=4096, metavar="L", help="KV cache positions (default 4096)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bf16",
                   help="weights / activations / KV dtype (experts stay MXFP4)")
    p.add_argument("--interpreter-order", action="store_true",
                   help="schedule for the CPU interpreter: one program, one topological queue")
    p.add_argument("--dump", metavar="DIR", default=None,
                   help="also write every pass's output to DIR as {step}.{NN}.{pass}.ir")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--target", metavar="SM", default=None,
                   help="also build OUT/kernels/*.py for this GPU (e.g. sm_90) without a GPU")
    p.add_argument("--qkv-q-heads", type=int, default=-1, metavar="N",
                   help="query heads per qkv task (0: a whole KV group; default: 1, as the engine on a GPU; "
                        "a whole group with --interpreter-order)")
    p.add_argument("--lower", action="append", default=[], metavar="NAME=N",
                   help="override a lowering option (passes/lower.py LowerOptions), as `tilecomp bench --lower`, "
                        "e.g. --lower expert_parts=0 or --lower qkv_split_rope=1")
    p.add_argument("--report", action="store_true",
                   help="with --target: print registers, spills, shared memory, occupancy per kernel")
    p.set_defaults(func=run)
    return p


def load_configs(args):
    """(target config, draft config, source description) from --checkpoint or --preset."""
    from tilecomp.models.presets import preset
    if args.checkpoint is not None:
        from tilecomp.models.checkpoint import load_config
        if args.layers is not None:
            raise TilecompError("--layers: only with --preset (a checkpoint compiles as it is)")
        if not os.path.isdir(args.checkpoint):
            raise TilecompError(f"--checkpoint: {args.checkpoint} is not a directory")
        cfg, dcfg = load_config(args.checkpoint)
        if dcfg is None:
            raise TilecompError(f"--checkpoint: {args.checkpoint} has no dflash/config.json; "
                                f"the compiled step needs the DFlash draft")
        return cfg, dcfg, {"checkpoint": os.path.abspath(args.checkpoint)}
    cfg, dcfg = preset(args.preset, args.layers)
    return cfg, dcfg, {"preset": args.preset, "layers": args.layers}


def _check_options(args):
    if args.programs < 1:
        raise TilecompError(f"--programs: expected a positive number of programs, found {args.programs}")
    if args.max_len < 1:
        raise TilecompError(f"--max-len: expected a positive number of positions, found {args.max_len}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise TilecompError(f"--out: {args.out} exists and is not a directory")


def stage_texts(compiled) -> dict[str, str]:
    """File name -> text of every stage that `compiled` holds."""
    from tilecomp.ir.graph import print_graph
    from tilecomp.ir.tile import print_tile
    texts = {}
    # (file prefix, graph, fused graph, tile IR, schedule) of each compiled program
    programs = (("", compiled.graph, compiled.fused, compiled.tile, compiled.schedule),
                ("prefill.", compiled.prefill, compiled.prefill_fused, compiled.prefill_tile,
                 compiled.prefill_schedule),
                ("plain.", compiled.plain, compiled.plain_fused, compiled.plain_tile,
                 compiled.plain_schedule))
    for prefix, graph, fused, tile, schedule in programs:
        if graph is not None:
            texts[f"{prefix}graph.ir"] = print_graph(graph)
            texts[f"{prefix}graph.fused.ir"] = print_graph(fused)
        if tile is not None:
            texts[f"{prefix}tile.ir"] = print_tile(tile)
            texts[f"{prefix}schedule.ir"] = print_tile(schedule)
    if compiled.schedule is not None:
        from tilecomp.viz import schedule_html
        texts["schedule.html"] = schedule_html(compiled.schedule)
    return texts


def no_progress(line: str):
    """--quiet: progress lines go nowhere (even at TILECOMP_DEBUG >= 1)."""


def schedule_summary(program) -> dict:
    """Task counts by kind, counters, queues and the scheduler's annotations."""
    by_kind: dict[str, int] = {}
    for task in program.tasks:
        by_kind[task.kind] = by_kind.get(task.kind, 0) + 1
    return {"tasks": len(program.tasks), "tasks_by_kind": dict(sorted(by_kind.items())),
            "counters": len(program.counters), "buffers": len(program.buffers),
            "programs": None if program.programs is None else len(program.programs),
            "annotations": dict(program.annotations)}


def manifest(compiled, source: dict, files: dict[str, str]) -> dict:
    """What was compiled, from what, with which options, and what each file holds."""
    from tilecomp import __version__
    from tilecomp.ir.graph_stats import graph_stats
    g = compiled.fused
    stats = graph_stats(g)
    return {
        "tilecomp_version": __version__,
        "source": source,
        "options": {"dtype": compiled.options.dtype, "max_len": compiled.options.max_len,
                    "programs": compiled.options.programs,
                    "interpreter_order": compiled.options.interpreter_order,
                    "lower": dataclasses.asdict(compiled.options.lower)},
        "config": compiled.config.to_dict(),
        "draft_config": compiled.draft_config.to_dict(),
        "decode_step": {
            "inputs": [{"name": v.name, "type": str(v.type)} for v in g.inputs],
            "outputs": [{"name": n, "type": str(g.types()[n])} for n in g.outputs],
            "ops_by_kind": stats.ops_by_kind,
            "param_bytes": stats.param_bytes,
            "step_weight_bytes": stats.step_weight_bytes,
        },
        "schedule": None if compiled.schedule is None else schedule_summary(compiled.schedule),
        "prefill_schedule": (None if compiled.prefill_schedule is None
                             else schedule_summary(compiled.prefill_schedule)),
        "plain_schedule": (None if compiled.plain_schedule is None
                           else schedule_summary(compiled.plain_schedule)),
        "files": {name: {"bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
                  for name, text in sorted(files.items())},
    }


def run(args) -> int:
    from tilecomp.passes.pipeline import compile_model, stderr_progress
    from tilecomp.settings import Settings, settings as read_settings
    _check_options(args)
    cfg, dcfg, source = load_configs(args)
    from tilecomp.commands.bench import parse_lower, parse_qkv_q_heads
    from tilecomp.passes.pipeline import engine_options
    # the options an engine compiles its own steps with, so the stages written are what runs
    options = dataclasses.replace(
        engine_options(args.max_len, args.programs, args.interpreter_order,
                       parse_qkv_q_heads(args.qkv_q_heads), parse_lower(args.lower)),
        dtype=args.dtype)
    dumps = read_settings() if args.dump is None else Settings(dump_dir=args.dump, debug=2)
    compiled = compile_model(cfg, dcfg, options, progress=no_progress if args.quiet else stderr_progress,
                             settings=dumps)
    os.makedirs(args.out, exist_ok=True)
    texts = stage_texts(compiled)
    for name, text in texts.items():
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest(compiled, source, texts), f, indent=2, sort_keys=False)
        f.write("\n")
    if not args.quiet:
        written = ", ".join(sorted(texts) + ["manifest.json"])
        print(f"wrote {written} to {args.out}")
    from tilecomp.codegen.build import compile_kernels
    for line in compile_kernels(cfg, dcfg, args.out, args.programs, args.target):
        if args.report:
            print(line)
    return 0
