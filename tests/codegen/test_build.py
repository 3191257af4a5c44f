"""Hopper build without a GPU: triton.compile(..., GPUTarget("cuda", 90, 32)) + ptxas report."""
import dataclasses

import pytest

from tilecomp.codegen.build import build_report, compile_kernels
from tilecomp.codegen.triton_gen import generate_kernel
from tilecomp.errors import TilecompError
from tilecomp.models.presets import preset


def test_frame_with_linear_builds_for_sm90_and_reports_resources(tmp_path):
    path = tmp_path / "decode_step.py"
    path.write_text(generate_kernel(["linear", "accept"], constexprs=dict(BLOCK_T=16, BLOCK_N=64, BLOCK_K=64)))
    report = build_report(path, programs=132, target="sm_90")
    assert 0 < report.registers <= 255
    assert report.blocks_per_sm >= 1 and report.max_resident == 132 * report.blocks_per_sm
    assert report.fits
    too_many = dataclasses.replace(report, programs=report.max_resident + 1)
    assert not too_many.fits and "NOT CO-RESIDENT" in too_many.line()


def test_unknown_target_is_a_user_error(tmp_path):
    path = tmp_path / "k.py"
    path.write_text(generate_kernel(["accept"], constexprs=dict(BLOCK_T=16)))
    with pytest.raises(TilecompError, match="--target 'hopper'"):
        build_report(path, programs=1, target="hopper")


def test_compile_writes_the_step_kernels(tmp_path):
    cfg, dcfg = preset("tiny")
    assert compile_kernels(cfg, dcfg, tmp_path, programs=4) == []
    for name in ("decode_step", "prefill_chunk"):
        source = (tmp_path / "kernels" / f"{name}.py").read_text()
        assert source.count("@triton.jit") == 1 and f"def {name}(" in source


@pytest.mark.slow
def test_cli_compile_target_sm90_report_builds_the_engine_megakernels(tmp_path, capsys):
    # the whole megakernel (13 task kinds) through ptxas: minutes on a 2-core machine
    from tilecomp.cli import main
    assert main(["compile", "--preset", "tiny", "--out", str(tmp_path), "--quiet",
                 "--target", "sm_90", "--report"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": sm_90 " in line]
    assert len(lines) == 2 and all(line.endswith(" ok") for line in lines), lines
    assert (tmp_path / "kernels" / "report.json").is_file()
