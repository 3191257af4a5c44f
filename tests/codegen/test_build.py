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


# The sm_90 builds below run in a subprocess: under TRITON_INTERPRET=1 (tests/conftest.py) a
# noinline function cannot be compiled. BUILD_PRELUDE builds a flash-shaped kernel of accept and
# one kind (KIND) as `module`; a script's last line prints its result as JSON.
BUILD_PRELUDE = """
import json, os, tempfile
import triton
from tilecomp.codegen import layout as L
from tilecomp.codegen.build import compile_kernel
from tilecomp.codegen.kernels import constexprs_for
from tilecomp.codegen.triton_gen import generate_kernel, load_kernel_module
from tilecomp.models.presets import preset
cfg, dcfg = preset("mimo-v2-flash", layers=2)
module = load_kernel_module(generate_kernel(["accept", KIND], constexprs=constexprs_for(cfg, dcfg, 8)),
                            tempfile.mkdtemp())
"""


def build_in_subprocess(kind: str, script: str, first_on_path=None):
    """The JSON a build script printed, run after BUILD_PRELUDE for `kind` in a fresh interpreter
    (without TRITON_INTERPRET and DISABLE_MMA_V3; `first_on_path` ahead of this one's path)."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DISABLE_MMA_V3")}
    if first_on_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(first_on_path)] + [p for p in sys.path if p])
    code = f"KIND = {kind!r}\n" + BUILD_PRELUDE + script
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inline_mask_keeps_the_expert_wgmma_asynchronous_under_noinline():
    # ptxas serializes every wgmma of a kernel that has one inside a called device function
    # (C7510): NOINLINE 1 alone does that to the expert K loops; INLINE's mask keeps them inlined.
    serial, inlined = build_in_subprocess("expert_down", """
logs = [compile_kernel(module, 90, tiles=dict(XACT=1, NOINLINE=1, INLINE=mask, MMAV2=0))[1]
        for mask in (0, L.inline_mask("expert_down"))]
print(json.dumps(logs))
""")
    if "ptxas info" not in serial:
        pytest.skip("this Triton does not expose the ptxas log")
    assert "C7510" in serial and "wgmma" in serial
    assert "C7510" not in inlined and "ptxas info" in inlined


def test_inline_mask_of_kind_names():
    from tilecomp.codegen import layout as L
    assert L.inline_mask() == 0
    assert L.inline_mask("expert_up_gate", "expert_down") == (1 << L.KIND_IDS["expert_up_gate"]) | (1 << L.KIND_IDS["expert_down"])
    with pytest.raises(Exception, match="'nope'"):
        L.inline_mask("nope")


def test_mmav2_builds_the_expert_dots_as_mma_sync():
    # MMAV2 1 builds the kernel with Triton's wgmma off: the expert K loops' dots become mma.sync
    # (no warpgroup arrive / wait, so no C7510 serialization under NOINLINE 1); the build leaves
    # the process environment as it found it.
    v3, v2 = build_in_subprocess("expert_up_gate", """
out = []
for mma in (0, 1):
    compiled, log = compile_kernel(module, 90, tiles=dict(XACT=1, NOINLINE=1, MMAV2=mma))
    ptx = compiled.asm["ptx"]
    out.append(dict(wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync.aligned"), log=log,
                    env=os.environ.get("DISABLE_MMA_V3")))
print(json.dumps(out))
""")
    assert v3["wgmma"] > 0 and v2["wgmma"] == 0
    assert v2["mma"] > 0
    assert v3["env"] is None and v2["env"] is None       # restored after each build
    if "ptxas info" in v3["log"]:
        assert "C7510" in v3["log"] and "C7510" not in v2["log"]


def test_mmav2_expert_operand_needs_no_warp_shuffles_on_the_gpus_triton(tmp_path):
    # The GPU machines run Triton 3.6, whose mma.sync operand sizing (kWidth) read MX_DOT 9's joins
    # and converted the dequantized weight tile with warp shuffles every K step (64 SHFL.IDX per
    # up_gate step); the identity move in _mxfp4.j2 ends that chain. Built with the 3.6 wheel when
    # this machine has it (unpacked into tmp_path, first on the path of the subprocess).
    import glob
    import sys
    import zipfile
    wheels = sorted(glob.glob("/opt/pypi/files/triton-3.6.0-cp311-*.whl"))
    if not wheels or sys.version_info[:2] != (3, 11):
        pytest.skip("no Triton 3.6 wheel for this Python on this machine")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tmp_path, [n for n in z.namelist() if n.startswith("triton/")])
    for tool in (tmp_path / "triton" / "backends" / "nvidia" / "bin").iterdir():
        tool.chmod(0o755)                # zipfile drops the executable bits (ptxas, cuobjdump)
    got = build_in_subprocess("expert_up_gate", """
ptx = compile_kernel(module, 90, tiles=dict(XACT=1, MMAV2=1))[0].asm["ptx"]
print(json.dumps(dict(version=triton.__version__, idx=ptx.count("shfl.sync.idx"), mma=ptx.count("mma.sync.aligned"))))
""", first_on_path=tmp_path)
    assert got["version"].startswith("3.6")
    assert got["mma"] > 0 and got["idx"] == 0, got
