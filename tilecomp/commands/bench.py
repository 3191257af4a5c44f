"""tilecomp bench: time the decode step (megakernel, eager, torch.compile) against the floor."""
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
    p.add_argument("--programs", type=int, help="megakernel programs (default: one per SM)")
    p.add_argument("--iters", type=int, default=100, help="timed steps of the megakernel and torch.compile")
    p.add_argument("--eager-iters", type=int, default=20, help="timed steps of eager PyTorch")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--skip-megakernel", action="store_true", help="leave out the megakernel")
    p.add_argument("--skip-bf16", action="store_true", help="leave out the bf16-experts baseline")
    p.add_argument("--trace", action="store_true",
                   help="also run one step with per-task timers and report where its time goes (GPU)")
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
    report = run_bench(args)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
