"""`tilecomp ir`: check and measure a dumped IR stage (graph or tile, by its header line).

    tilecomp ir check FILE                 parse + verify; exit 2 with `error: FILE:LINE: ...`
    tilecomp ir stats FILE [--gbps 3000]   op / task counts by kind, bytes, bandwidth floor

A graph file starts with `graph NAME {`, a tile file with `tile v1`.
"""
from __future__ import annotations

from tilecomp.errors import IRError, TilecompError


def add_parser(subparsers):
    p = subparsers.add_parser("ir", help="check or measure a dumped IR file",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="ir_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="parse and verify a graph or tile IR file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=run_check)
    stats = sub.add_parser("stats", help="counts by kind, bytes moved and the bandwidth floor")
    stats.add_argument("file", metavar="FILE")
    stats.add_argument("--gbps", type=float, default=3000.0, help="memory bandwidth in GB/s (default 3000)")
    stats.set_defaults(func=run_stats)
    p.set_defaults(func=run_check)
    return p


def read_stage(path: str) -> tuple[str, str]:
    """(kind, text) where kind is "graph" or "tile", from the first non-comment line."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise TilecompError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise IRError(f"{path}: not a text file") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        head = line.strip()
        if not head or head.startswith("#"):
            continue
        if head.startswith("graph "):
            return "graph", text
        if head.startswith("tile "):
            return "tile", text
        raise IRError(f"{path}:{lineno}: expected a header 'graph NAME {{' or 'tile v1', found {head[:40]!r}")
    raise IRError(f"{path}: empty file, expected a header 'graph NAME {{' or 'tile v1'")


def load_stage(path: str):
    """Parse and verify; returns (kind, IR object). Errors name the file and line."""
    kind, text = read_stage(path)
    if kind == "graph":
        from tilecomp.ir.graph import parse_graph, verify_graph
        return kind, verify_graph(parse_graph(text, path), path)
    from tilecomp.ir.tile import parse_tile
    from tilecomp.ir.tile_verify import verify_schedule, verify_tile
    try:
        program = verify_tile(parse_tile(text))
        if program.programs is not None:      # a schedule made for the interpreter must keep its order
            in_order = program.annotations.get("schedule") == "interpreter_order"
            verify_schedule(program, interpreter_order=in_order)
    except TilecompError as err:
        raise type(err)(f"{path}: {err}") from None
    return kind, program


def run_check(args) -> int:
    kind, ir = load_stage(args.file)
    if kind == "graph":
        print(f"{args.file}: ok (graph {ir.name}: {len(ir.ops)} ops, {len(ir.params)} params)")
    else:
        scheduled = "" if ir.programs is None else f", scheduled on {len(ir.programs)} programs"
        print(f"{args.file}: ok (tile: {len(ir.tasks)} tasks, {len(ir.counters)} counters{scheduled})")
    return 0


def run_stats(args) -> int:
    if not args.gbps > 0:
        raise TilecompError(f"--gbps: expected a positive bandwidth, found {args.gbps}")
    kind, ir = load_stage(args.file)
    if kind == "graph":
        from tilecomp.ir.graph_stats import format_graph_stats, graph_stats
        print(format_graph_stats(ir, graph_stats(ir), args.gbps), end="")
    else:
        from tilecomp.stats import format_tile_stats
        print(format_tile_stats(ir, args.gbps), end="")
    return 0
