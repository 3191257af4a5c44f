"""bench/ncu_source.py: the summary of ncu's source page ranks rows by each counter it knows."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("ncu_source", ROOT / "bench" / "ncu_source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_are_ranked_by_excessive_sectors_and_stalls(tmp_path, capsys):
    page = tmp_path / "page.csv"
    page.write_text('"Kernel Name","phase_linear"\n'
                    '"#","Address","Source","L2 Theoretical Sectors Global Excessive","Warp Stall Sampling (All Samples)"\n'
                    '"1","0x10","LDGSTS.E [R1], desc[UR4][R2.64]","1,200","5"\n'
                    '"2","0x20","HMMA.16816.F32.BF16 R4, R8, R12, R4","0","90"\n'
                    '"3","0x30","LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]","300","5"\n')
    assert _module().main([str(page), "--top", "2"]) == 0
    out = capsys.readouterr().out
    sectors = out.split("== top 2 by L2 Theoretical Sectors Global Excessive (total 1,500)")[1].split("==")[0]
    assert sectors.index("LDGSTS.E [R1]") < sectors.index("LDGSTS.E.BYPASS.128") and "HMMA" not in sectors
    assert "80.0%" in sectors
    stalls = out.split("by Warp Stall Sampling (All Samples)")[1]
    assert stalls.index("HMMA") < stalls.index("LDGSTS")


def test_a_page_without_a_header_is_named(tmp_path, capsys):
    page = tmp_path / "empty.csv"
    page.write_text("no,header\n")
    assert _module().main([str(page)]) == 1
    assert "empty.csv: no header row" in capsys.readouterr().out


def test_stall_reasons_are_summed_over_the_kernel(tmp_path, capsys):
    page = tmp_path / "step.csv"
    page.write_text('"#","Address","Source","stall_no_inst","stall_long_sb","stall_no_inst (Not Issued)"\n'
                    '"1","0x10","LDG.E R1, desc[UR4][R2.64]","10","30","99"\n'
                    '"2","0x20","FFMA R4, R8, R12, R4","50","10","99"\n')
    assert _module().main([str(page), "--stalls"]) == 0
    out = capsys.readouterr().out.split("== stall reasons over the whole kernel (100 samples)")[1]
    assert out.index("no_inst") < out.index("long_sb")           # ranked; 'Not Issued' copies left out
    assert "60.0%" in out and "40.0%" in out
