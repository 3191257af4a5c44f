"""`tilecomp` console script: one subcommand per module in tilecomp/commands/.

Each command module has `add_parser(subparsers)` (returning its parser; it may
set `func` itself, e.g. per action) and `run(args) -> int | None`, called
with the parsed arguments. A TilecompError (bad user input) prints
`error: <message>` on stderr and exits 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys

from tilecomp import __version__
from tilecomp.commands import compile as compile_command
from tilecomp.commands import bench, generate, init, ir, train
from tilecomp.errors import TilecompError

# The subcommands, in the order `tilecomp --help` lists them (one line each).
COMMANDS = [
    init,
    generate,
    compile_command,
    ir,
    bench,
    train,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilecomp",
        description="Compile a MiMo-style MoE LLM and its DFlash speculative-decoding step "
                    "into one persistent GPU megakernel per decode step.")
    parser.add_argument("--version", action="version", version=f"tilecomp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = command.add_parser(subparsers)
        if sub is not None and sub.get_default("func") is None:
            sub.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TilecompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
