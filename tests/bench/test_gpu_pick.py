"""bench/gpu.sh's `pick` step: the bench-* steps after it take a candidate's flags only when every
run of the candidate timed below every named base by 0.5% AND its token check found no
unexplained divergence.
Runs the script's own bash (no GPU: only the pick steps, on hand-written result files)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"
# a token check as tilecomp.bench.tokens writes it (one part per mode: plain decode and DFlash)
TOKENS = ROOT / "bench" / "results" / "2026-12-05-h100-v14-tokens-tiny-wl.json"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_picks(tmp_path, ms: dict, unexplained: int, *steps) -> str:
    for name, value in ms.items():
        (tmp_path / f"var-{name}.json").write_text(json.dumps({"results": {"megakernel": {"median_ms": value}}}))
    tokens = json.loads(TOKENS.read_text())
    tokens["summary"]["dflash"]["unexplained"] = unexplained      # a divergence in one mode is enough
    (tmp_path / "tokens-tiny-c.json").write_text(json.dumps(tokens))
    out = subprocess.run(["bash", str(SCRIPT), *steps], env={"OUT": str(tmp_path), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith("=== pick")][-1]


def test_faster_candidate_with_clean_tokens_sets_the_bench_flags(tmp_path):
    got = run_picks(tmp_path, {"base": 10.4, "c": 9.4}, 0, "pick base c tokens-tiny-c --tile AFRAG=1")
    assert got.endswith("bench flags now: --tile AFRAG=1")


def test_slower_candidate_or_divergent_tokens_keep_the_defaults(tmp_path):
    assert run_picks(tmp_path, {"base": 10.4, "c": 10.5}, 0, "pick base c tokens-tiny-c --tile AFRAG=1").endswith("(defaults)")
    # faster by less than the 0.5% margin: inside the noise of separate runs
    assert run_picks(tmp_path, {"base": 10.4, "c": 10.36}, 0, "pick base c tokens-tiny-c --tile AFRAG=1").endswith("(defaults)")
    # every run of a repeated candidate must win
    assert run_picks(tmp_path, {"base": 10.4, "c": 9.4, "c2": 10.5}, 0,
                     "pick base c,c2 tokens-tiny-c --tile AFRAG=1").endswith("(defaults)")
    assert run_picks(tmp_path, {"base": 10.4, "c": 9.4}, 1, "pick base c tokens-tiny-c --tile AFRAG=1").endswith("(defaults)")


def test_a_later_pick_must_beat_every_base_named(tmp_path):
    steps = ("pick base a tokens-tiny-c --tile AFRAG=1",
             "pick base,a c tokens-tiny-c --tile AFRAG=1 --lower expert_operands=1")
    ms = {"base": 10.4, "a": 9.4, "c": 9.6}        # c beats base but not a: a's flags stay
    assert run_picks(tmp_path, ms, 0, *steps).endswith("bench flags now: --tile AFRAG=1")
    ms["c"] = 9.0
    assert run_picks(tmp_path, ms, 0, *steps).endswith("--tile AFRAG=1 --lower expert_operands=1")


def test_dry_run_checks_a_planned_call_without_a_gpu(tmp_path):
    """DRY=1: every tilecomp bench / tokens step parses its flags and stops (a misspelled tile
    fails here, not after a GPU machine started); steps that need the GPU machine are skipped;
    the call still packs its logs."""
    env = {"OUT": str(tmp_path), "DRY": "1", "BUDGET_S": "200", "PATH": os.environ["PATH"],
           "HOME": os.environ.get("HOME", str(tmp_path))}
    subprocess.run(["bash", str(SCRIPT), "install", "var good 8 8 --tile XFLAT=1 --lower qkv_rows=64",
                    "ab ab1 8 8 --ab-tile STAGES_C=8", "var bad 8 8 --tile BLOCK_DD=4",
                    "tokensv tk --tile BLOCK_NC=128"],
                   env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    import tarfile
    with tarfile.open(tmp_path / "logs.tgz") as tar:       # finalize packed the logs at exit
        steps = tar.extractfile("steps.log").read().decode()
    assert "install skipped (DRY=1" in steps
    assert "=== var-good rc=0" in steps and "=== ab-ab1 rc=0" in steps and "=== tokens-tk rc=0" in steps
    assert "=== var-bad rc=2" in steps
    assert (tmp_path / "logs.tgz").exists() and not list(tmp_path.glob("*.json"))


def run_abpick(tmp_path, ci: tuple, unexplained: int) -> list[str]:
    """The call's step lines after an `ab span` result with 95% interval `ci` and a token check."""
    (tmp_path / "var-ab-span.json").write_text(json.dumps({"ab": {"diff_median_ms": sum(ci) / 2,
                                                                  "diff_ci95_ms": list(ci)}}))
    tokens = json.loads(TOKENS.read_text())
    tokens["summary"]["plain"]["unexplained"] = unexplained
    (tmp_path / "tokens-tiny-span.json").write_text(json.dumps(tokens))
    out = subprocess.run(["bash", str(SCRIPT), "abpick span tokens-tiny-span --lower qkv_span=128", "bench-flash-8"],
                         env={"OUT": str(tmp_path), "DRY": "1", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith("===")]


def test_abpick_takes_a_won_ab_with_clean_tokens_else_skips_the_benches(tmp_path):
    """abpick: the bench steps after it run with the variant's flags when the A/B's whole 95%
    interval is below 0 and the tokens agree; otherwise they are skipped (not run at the defaults)."""
    won = run_abpick(tmp_path, (-0.25, -0.15), 0)
    assert won[0].endswith("bench flags now: --lower qkv_span=128")
    assert won[1].startswith("=== bench-flash-8 (limit") and won[1].endswith("--lower qkv_span=128")
    for ci, bad in (((-0.25, 0.01), 0), ((-0.25, -0.15), 1)):     # the interval reaches 0; a divergence
        lost = run_abpick(tmp_path, ci, bad)
        assert "not picked" in lost[0] and lost[1] == "=== bench-flash-8 skipped (abpick: not picked)"


def test_flags_step_sets_the_bench_flags_of_the_steps_after_it(tmp_path):
    """'flags FLAGS...': the bench-* steps after it run with FLAGS (a call that measures variants
    chosen in an earlier call); the ones before it with the defaults."""
    out = subprocess.run(["bash", str(SCRIPT), "bench-small-8", "flags --tile UPLOOP=1 --tile BLOCK_NH=128",
                          "bench-small-1"],
                         env={"OUT": str(tmp_path), "DRY": "1", "PATH": os.environ["PATH"],
                              "HOME": os.environ.get("HOME", str(tmp_path))},
                         capture_output=True, text=True, check=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("=== bench-small-") and "limit" in line]
    assert len(lines) == 2
    assert "--tile" not in lines[0]
    assert lines[1].endswith("--json " + str(tmp_path / "small-ctx4096-b1.json") + " --tile UPLOOP=1 --tile BLOCK_NH=128")
    assert "=== flags: bench flags now: --tile UPLOOP=1 --tile BLOCK_NH=128" in out.stdout
