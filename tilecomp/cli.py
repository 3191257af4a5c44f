"""`tilecomp` console script: one subcommand per module in tilecomp/commands/.

Each command module has `add_parser(subparsers)` (which sets `func=run` on its
parser) and `run(args) -> int | None`. A TilecompError (bad user input) prints
`error: <message>` on stderr and exits 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys

from tilecomp import __version__
from tilecomp.commands import generate, init
from tilecomp.errors import TilecompError

# The subcommands, in the order `tilecomp --help` lists them (one line each).
COMMANDS = [
    init,
    generate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilecomp",
        description="Compile a MiMo-style MoE LLM and its DFlash speculative-decoding step "
                    "into one persistent GPU megakernel per decode step.")
    parser.add_argument("--version", action="version", version=f"tilecomp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
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
