"""bench/sass_loops.py's parsing (the sm_90 build itself is exercised by the codegen build tests)."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("sass_loops", Path(__file__).parents[2] / "bench" / "sass_loops.py")
sass_loops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_loops)

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/                   STS.128 [R3], R4 ;
        /*0030*/                   HGMMA.64x16x16.F32.BF16 R8, gdesc[UR4], R8 ;
        /*0040*/              @!P0 BRA 0x10 ;
        /*0050*/                   IADD3 R1, R1, 1, RZ ;
        /*0060*/                   BRA 0x50 ;
"""


def test_loops_with_mma_are_found_with_their_ops():
    loops = sass_loops.mma_loops(sass_loops.instructions(SASS))
    assert len(loops) == 1                       # the second loop has no MMA
    start, end, ops = loops[0]
    assert (start, end) == (0x10, 0x40)
    assert ops["LDS.128"] == 1 and ops["STS.128"] == 1 and ops["BRA"] == 1 and sum(ops.values()) == 4


def test_variants_parse_and_name_a_bad_item():
    assert sass_loops.parse_tiles("AFRAG=0,BLOCK_KX=256") == {"AFRAG": 0, "BLOCK_KX": 256}
    assert sass_loops.parse_tiles("") == {}
    with pytest.raises(SystemExit, match="'AFRAG'"):
        sass_loops.parse_tiles("AFRAG")


def test_code_bytes_counts_sixteen_bytes_an_instruction():
    assert sass_loops.code_bytes(sass_loops.instructions(SASS)) == 7 * 16

