"""`tilecomp compile` and `tilecomp ir check / stats` from the command line."""
import argparse
import json
import re

import pytest

from tilecomp.commands import compile as compile_command
from tilecomp.commands import ir as ir_command
from tilecomp.errors import TilecompError
from tilecomp.ir.graph import parse_graph, verify_graph


def tilecomp(*argv):
    """Run a subcommand the way tilecomp.cli does (error: ... and exit 2 on TilecompError)."""
    parser = argparse.ArgumentParser(prog="tilecomp")
    sub = parser.add_subparsers(dest="command", required=True)
    compile_command.add_parser(sub)
    ir_command.add_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    try:
        return args.func(args) or 0
    except TilecompError as err:
        print(f"error: {err}")
        return 2


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert tilecomp("compile", "--preset", "tiny", "--out", out, "--programs", 4, "--max-len", 64) == 0
    return out


def test_compile_writes_every_stage_and_a_manifest(tiny_out, capsys):
    for name in ("graph.ir", "graph.fused.ir", "prefill.graph.ir", "prefill.graph.fused.ir", "tile.ir",
                 "schedule.ir", "schedule.html", "prefill.tile.ir", "prefill.schedule.ir", "plain.graph.ir",
                 "plain.graph.fused.ir", "plain.tile.ir", "plain.schedule.ir", "manifest.json"):
        assert (tiny_out / name).is_file(), name
    manifest = json.loads((tiny_out / "manifest.json").read_text())
    assert manifest["source"] == {"preset": "tiny", "layers": None}
    lower = manifest["options"].pop("lower")
    assert manifest["options"] == {"dtype": "bf16", "max_len": 64, "programs": 4, "interpreter_order": False}
    # the engine's own GPU options: one query head per qkv task, k and v apart
    assert lower["qkv_q_heads"] == 1 and lower["qkv_split_kv"] == 1 and lower["expert_parts"] == -1
    # 5 MoE layers x (the router split over the 4 programs + the plan task)
    assert manifest["schedule"]["programs"] == 4 and manifest["schedule"]["tasks_by_kind"]["moe_route"] == 5 * 5
    assert sum(manifest["schedule"]["tasks_by_kind"].values()) == manifest["schedule"]["tasks"]
    for name in ("tile.ir", "schedule.ir", "prefill.tile.ir", "prefill.schedule.ir", "plain.tile.ir",
                 "plain.schedule.ir", "plain.graph.ir", "plain.graph.fused.ir"):
        assert tilecomp("ir", "check", tiny_out / name) == 0, name
    assert manifest["prefill_schedule"]["programs"] == 4
    assert manifest["plain_schedule"]["programs"] == 4 and manifest["plain_schedule"]["tasks_by_kind"]["accept"] == 1
    assert manifest["config"]["num_hidden_layers"] == 6
    assert manifest["decode_step"]["ops_by_kind"]["qkv_rope_kv"] == 8
    assert {i["name"] for i in manifest["decode_step"]["inputs"]} >= {"%block", "%pos", "%n_new", "%seed"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == len((tiny_out / name).read_bytes())
    for name in ("graph.ir", "graph.fused.ir"):
        g = verify_graph(parse_graph((tiny_out / name).read_text()))
        assert g.name == "decode_step"


def test_compile_is_deterministic(tiny_out, tmp_path):
    assert tilecomp("compile", "--preset", "tiny", "--out", tmp_path, "--programs", 4, "--max-len", 64,
                    "--quiet") == 0
    for name in ("graph.ir", "graph.fused.ir", "manifest.json"):
        assert (tmp_path / name).read_text() == (tiny_out / name).read_text()


def test_compile_from_a_checkpoint_reads_only_the_config(tmp_path):
    from tilecomp.models.checkpoint import save_pretrained
    from tilecomp.models.dflash import DFlashDraft
    from tilecomp.models.mimo import MiMoForCausalLM
    from tilecomp.models.presets import preset
    cfg, dcfg = preset("tiny", layers=2)
    save_pretrained(MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg), tmp_path / "ckpt")
    for weights in (tmp_path / "ckpt").rglob("*.safetensors"):
        weights.write_bytes(b"not read")                      # compiling must not touch weights
    assert tilecomp("compile", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "out", "--quiet") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["num_hidden_layers"] == 2 and "checkpoint" in manifest["source"]


def test_ir_check_accepts_dumps_and_names_the_broken_line(tiny_out, tmp_path, capsys):
    assert tilecomp("ir", "check", tiny_out / "graph.fused.ir") == 0
    assert "ok (graph decode_step" in capsys.readouterr().out
    lines = (tiny_out / "graph.fused.ir").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if "= attention(" in line)
    lines[n] = re.sub(r"window=\d+", "window=-3", lines[n])
    broken = tmp_path / "broken.ir"
    broken.write_text("\n".join(lines) + "\n")
    assert tilecomp("ir", "check", broken) == 2
    out = capsys.readouterr().out
    assert f"error: {broken}:{n + 1}: op attention" in out and "window must be >= 0" in out


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("hello\n", ":1: expected a header 'graph NAME {' or 'tile v1'"),
    ("graph g {\n  input %x: f32[2]\n  %y: f32[3] = silu(%x)\n  return %y\n}\n", ":3: op silu -> %y: declared"),
    ("tile v1\nbogus line\n", "line 2"),
])
def test_ir_check_rejects_bad_files(tmp_path, capsys, text, message):
    path = tmp_path / "f.ir"
    path.write_text(text)
    assert tilecomp("ir", "check", path) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and message in out and str(path) in out


def test_ir_stats_of_a_graph(tiny_out, capsys):
    assert tilecomp("ir", "stats", tiny_out / "graph.fused.ir", "--gbps", 1000) == 0
    out = capsys.readouterr().out
    assert re.search(r"moe_experts +5\n", out) and "mxfp4" in out
    assert "bandwidth floor at 1000 GB/s" in out
    assert tilecomp("ir", "stats", tiny_out / "graph.fused.ir", "--gbps", 0) == 2


def test_bad_compile_arguments(tmp_path, capsys):
    assert tilecomp("compile", "--preset", "tiny", "--layers", 99, "--out", tmp_path) == 2
    assert "--layers: expected 1..6" in capsys.readouterr().out
    assert tilecomp("compile", "--checkpoint", tmp_path / "nope", "--out", tmp_path) == 2
    assert "is not a directory" in capsys.readouterr().out
    assert tilecomp("compile", "--preset", "tiny", "--programs", 0, "--out", tmp_path) == 2
    assert "--programs: expected a positive" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    assert tilecomp("compile", "--preset", "tiny", "--out", tmp_path / "a_file", "--quiet") == 2
    assert f"--out: {tmp_path / 'a_file'} exists and is not a directory" in capsys.readouterr().out
    assert tilecomp("compile", "--preset", "tiny", "--out", tmp_path, "--lower", "qkv_split_rop=1") == 2
    assert "--lower" in capsys.readouterr().out
    assert tilecomp("compile", "--preset", "tiny", "--out", tmp_path, "--qkv-q-heads", -3) == 2
    assert "--qkv-q-heads: expected N >= 0" in capsys.readouterr().out


def test_compile_takes_the_engines_lowering_switches(tiny_out, tmp_path):
    """--qkv-q-heads 0 (whole KV groups) and --lower qkv_split_rope=1 change the written
    schedule, and the manifest records the options used."""
    counts = {}
    for name, extra in (("default", ()), ("groups", ("--qkv-q-heads", 0)), ("rope", ("--lower", "qkv_split_rope=1"))):
        out = tmp_path / name
        assert tilecomp("compile", "--preset", "tiny", "--out", out, "--programs", 4, "--max-len", 64,
                        "--quiet", *extra) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        counts[name] = manifest["schedule"]["tasks_by_kind"]["qkv_rope_kv"]
        assert manifest["options"]["lower"]["qkv_split_rope"] == (name == "rope")
    assert counts["groups"] < counts["default"] < counts["rope"]


def test_the_console_script_lists_and_runs_both_commands(tiny_out, capsys):
    from tilecomp.cli import main
    assert main(["ir", "check", str(tiny_out / "graph.ir")]) == 0
    assert main(["ir", "stats", str(tiny_out / "nope.ir")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    assert "--checkpoint DIR" in capsys.readouterr().out


def _tile_text(queues, annotations=None):
    from tilecomp.ir.tile import Buffer, Counter, Dim, Region, Task, TileProgram, print_tile
    bufs = [Buffer("x", "bf16", (8, 64), "activation"),
            Buffer("w", "bf16", (128, 64), "weight", "model.layers.0.mlp.up_proj.weight"),
            Buffer("y", "fp32", (8, 128), "activation")]
    tasks = [Task(0, "embed", writes=[Region("x", (Dim(0, 8), Dim(0, 64)))], signals=[("c.x", 1)]),
             Task(1, "linear", coords={"n": 0},
                  reads=[Region("x", (Dim(0, 8), Dim(0, 64))), Region("w", (Dim(0, 128), Dim(0, 64)))],
                  writes=[Region("y", (Dim(0, 8), Dim(0, 128)))], waits=[("c.x", 1)])]
    return print_tile(TileProgram({b.name: b for b in bufs}, {"c.x": Counter("c.x", 1, 0)}, tasks, queues,
                                  annotations or {}))


def test_ir_check_and_stats_of_tile_files(tmp_path, capsys):
    good, unordered = tmp_path / "schedule.ir", tmp_path / "bad.ir"
    good.write_text(_tile_text([[0, 1]]))
    unordered.write_text(_tile_text([[1, 0]]))                 # waits on a later task of its queue
    assert tilecomp("ir", "check", good) == 0
    assert "ok (tile: 2 tasks, 1 counters, scheduled on 1 programs)" in capsys.readouterr().out
    assert tilecomp("ir", "check", unordered) == 2
    assert capsys.readouterr().out.startswith(f"error: {unordered}: ")
    later = tmp_path / "later.ir"            # the consumer runs in program 0, its producer in program 1
    later.write_text(_tile_text([[1], [0]]))
    assert tilecomp("ir", "check", later) == 0                 # fine for co-resident programs
    later.write_text(_tile_text([[1], [0]], {"schedule": "interpreter_order"}))
    assert tilecomp("ir", "check", later) == 2                 # not in the CPU interpreter's pid order
    assert "interpreter order: task t1" in capsys.readouterr().out
    assert tilecomp("ir", "stats", good, "--gbps", 1) == 0
    out = capsys.readouterr().out
    moved = 8 * 64 * 2 + (8 * 64 * 2 + 128 * 64 * 2 + 8 * 128 * 4)
    assert re.search(rf"total +2 +{moved:,}\n", out) and f"{moved / 1e9 * 1e6:,.1f} us" in out


def test_interpreter_order_and_per_pass_dumps(tmp_path, capsys):
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    assert tilecomp("compile", "--preset", "tiny", "--layers", 2, "--out", out, "--interpreter-order",
                    "--dump", dumps, "--quiet") == 0
    assert capsys.readouterr().err == ""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schedule"]["programs"] == 1 and manifest["options"]["interpreter_order"] is True
    names = sorted(p.name for p in dumps.iterdir())
    assert "decode_step.01.fuse_router.ir" in names and "decode_step.schedule.ir" in names
    for name in names:
        assert tilecomp("ir", "check", dumps / name) == 0, name


@pytest.mark.slow
def test_mimo_v2_flash_compiles_and_every_dump_checks(tmp_path, capsys):
    """The full 48-layer model (decode step + prefill chunk). Its compile time is reported by
    `tilecomp compile` (manifest seconds), not bounded here: speed belongs to benchmarks."""
    assert tilecomp("compile", "--preset", "mimo-v2-flash", "--out", tmp_path, "--quiet") == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["num_hidden_layers"] == 48 and manifest["schedule"]["programs"] == 132
    for name in ("graph.ir", "graph.fused.ir", "prefill.graph.fused.ir", "schedule.ir"):
        assert tilecomp("ir", "check", tmp_path / name) == 0, name
