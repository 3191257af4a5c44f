"""The last tile pass: prove the schedule deadlock-free (and, when asked, in interpreter order).

The checks live with the tile IR (`tilecomp.ir.tile.verify_schedule`, see
ir/tile_verify.py) so any dumped stage can be re-verified; this pass runs them
in the pipeline and returns the program unchanged.
"""
from __future__ import annotations

from tilecomp.ir.tile import TileProgram, verify_schedule


def verify_schedule_pass(tp: TileProgram, options=None) -> TileProgram:
    return verify_schedule(tp, interpreter_order=getattr(options, "interpreter_order", False))
