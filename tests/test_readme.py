"""README set-up commands stay in sync with CI, and the Python API example runs."""
import pathlib
import re
import runpy

from tilecomp.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up: two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_two_setup_commands_and_ci_runs_the_same_tests():
    commands = setup_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "examples/quickstart.sh" in main_job and (ROOT / "examples/quickstart.sh").exists()
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()
    assert ci[-1] == tests


def test_python_api_example_runs(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    example = runpy.run_path(str(ROOT / "examples/generate_api.py"))
    example["main"](str(ckpt))                   # asserts DFlash == plain greedy inside
    out = capsys.readouterr().out
    assert "committed" in out and "mean" in out and "sampled" in out
