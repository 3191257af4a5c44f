"""The GPU diagnostics' host side: trace summaries and the token check's bookkeeping."""
import json
from types import SimpleNamespace

import pytest
import torch

from tilecomp.bench.tokens import first_difference
from tilecomp.bench.trace import format_summary, summarize
from tilecomp.codegen import layout as L


def fake_step(kinds_by_program):
    rows, bounds, names = [], [0], {}
    for tasks in kinds_by_program:
        for kind in tasks:
            task = len(rows)
            rows.append([L.KIND_IDS[kind], task])
            names[task] = f"{kind} t{task}"
        bounds.append(len(rows))
    records = torch.zeros(len(rows), L.RECORD_WORDS, dtype=torch.int64)
    records[:, :2] = torch.tensor(rows)
    return SimpleNamespace(records=records, queue=torch.tensor(bounds, dtype=torch.int32), task_names=names,
                           task_ops={})


def test_summary_splits_wait_and_work_per_kind():
    step = fake_step([["linear", "lm_head"], ["linear"]])
    ns = 1000                                             # stamps in ns: (start, ready, done)
    trace = torch.tensor([[1 * ns, 2 * ns, 5 * ns],         # linear: waits 1 us, works 3 us
                          [5 * ns, 5 * ns, 9 * ns],         # lm_head: works 4 us
                          [1 * ns, 4 * ns, 6 * ns]])        # linear: waits 3 us, works 2 us
    s = summarize(step, trace)
    assert s["span_us"] == 8.0 and s["programs"] == 2
    lin = s["kinds"]["linear"]
    assert (lin["tasks"], lin["wait_us"], lin["work_us"]) == (2, 4.0, 5.0)
    assert s["kinds"]["lm_head"]["work_us"] == 4.0
    assert list(s["kinds"]) == ["linear", "lm_head"]      # ordered by work
    assert s["longest_tasks"][0] == {"work_us": 4.0, "start_us": 4.0, "program": 0, "task": "lm_head t1"}
    assert abs(s["mean_program_busy"] - ((7 / 8) + (2 / 8)) / 2) < 1e-9
    assert "lm_head" in format_summary(s)


def test_summary_splits_kind_switches_from_repeats():
    # program 0: linear (switch, 3 us), linear (repeat, 1 us), lm_head (switch, 4 us)
    step = fake_step([["linear", "linear", "lm_head"], ["lm_head"]])
    ns = 1000
    trace = torch.tensor([[0, 0, 3 * ns], [3 * ns, 3 * ns, 4 * ns], [4 * ns, 4 * ns, 8 * ns],
                          [0, 1 * ns, 3 * ns]])
    s = summarize(step, trace)
    lin, head = s["kinds"]["linear"], s["kinds"]["lm_head"]
    assert (lin["switch_tasks"], lin["switch_us_per_task"]) == (1, 3.0)
    assert (lin["repeat_tasks"], lin["repeat_us_per_task"]) == (1, 1.0)
    assert (head["switch_tasks"], head["switch_us_per_task"], head["repeat_us_per_task"]) == (2, 3.0, None)
    text = format_summary(s)
    assert "switch us/task" in text and "3.00 (   1)" in text


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


def test_divergence_reports_margin_deviation_and_the_fp32_verdict():
    from tilecomp.bench.tokens import divergence, full_logits
    from tilecomp.models.mimo import MiMoForCausalLM
    from tilecomp.models.presets import preset
    torch.manual_seed(0)
    target = MiMoForCausalLM(preset("tiny", 2)[0]).eval()
    prefix = [5, 9, 11, 3]
    logits = full_logits(target, prefix)
    top2 = torch.topk(logits, 2)
    a, b = top2.indices.tolist()
    shift = torch.zeros_like(logits)
    shift[b] = 1.5 * (top2.values[0] - top2.values[1]).item() + 1e-3   # flips the argmax
    mk = SimpleNamespace(prompt_logits=lambda ids: full_logits(target, ids) + shift)
    out = divergence(target, target, mk, prefix, a, b)
    assert abs(out["ref_margin"] - (top2.values[0] - top2.values[1]).item()) < 1e-6
    assert abs(out["mk_deviation"] - shift[b].item()) < 1e-5
    # the flip is smaller than the megakernel's own error there: a rounding flip, not a bug
    assert out["explained"] and out["fp32_gap"] <= out["combined_error"]
    far = int(torch.argmin(logits))
    assert not divergence(target, target, SimpleNamespace(prompt_logits=lambda ids: full_logits(target, ids)),
                          prefix, a, far)["explained"]


def test_token_check_runs_on_a_checkpoint(tmp_path, capsys):
    """`python3 -m tilecomp.bench.tokens --checkpoint DIR`: the checkpoint's target and draft, both
    engines greedy; in fp32 on the CPU they must agree token for token."""
    from tilecomp.bench import tokens
    from tilecomp.errors import TilecompError
    from tilecomp.models.checkpoint import save_pretrained
    from tilecomp.models.dflash import DFlashDraft
    from tilecomp.models.mimo import MiMoForCausalLM
    from tilecomp.models.presets import preset
    torch.manual_seed(1)
    cfg, dcfg = preset("tiny", layers=2)
    save_pretrained(MiMoForCausalLM(cfg), DFlashDraft(dcfg, cfg), tmp_path / "ckpt")
    out = tmp_path / "tokens.json"
    assert tokens.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts", "1", "--prompt-len", "4",
                        "--new-tokens", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(tmp_path / "ckpt") and report["layers"] == 2
    for mode in ("plain", "dflash"):
        assert report["summary"][mode]["identical"] == 1, report["rows"]
    with pytest.raises(TilecompError, match="--layers: only with --preset"):
        tokens.main(["--checkpoint", str(tmp_path / "ckpt"), "--layers", "1"])


def test_summary_reads_the_programs_entry_and_exit_stamps():
    # two programs; rows after the tasks: (entry, 0, exit) per program
    step = fake_step([["linear"], ["lm_head"]])
    ns = 1000
    trace = torch.tensor([[10 * ns, 11 * ns, 20 * ns], [14 * ns, 14 * ns, 30 * ns],
                          [2 * ns, 0, 21 * ns], [4 * ns, 0, 33 * ns]])
    s = summarize(step, trace)
    assert s["span_us"] == 20.0                           # tasks only: 10 .. 30
    assert s["kernel_span_us"] == 31.0 and s["entry_spread_us"] == 2.0
    assert s["entry_to_first_task_us"] == 8.0 and s["last_task_to_exit_us"] == 3.0
    assert s["mean_entry_to_own_first_task_us"] == 9.0    # (10 - 2 + 14 - 4) / 2
    assert "kernel span 31.0 us" in format_summary(s)
    assert "kernel_span_us" not in summarize(step, trace[:2])   # a trace without the rows


def test_four_stamps_give_each_kinds_release():
    """layout.TRACE_WORDS stamps per task (start, wait done, work done, signalled): the release
    (work done -> signalled: fences and atomics) per kind and per op, inside the work time; the
    programs' rows keep their exit in the last column."""
    from tilecomp.codegen import layout as L
    assert L.TRACE_WORDS == 4
    step = fake_step([["linear", "lm_head"], ["linear"]])
    step.task_ops = {0: "L0.o_proj", 1: "logits", 2: "L0.o_proj"}
    ns = 1000
    trace = torch.tensor([[1 * ns, 2 * ns, 4 * ns, 5 * ns],        # linear: release 1 us
                          [5 * ns, 5 * ns, 8 * ns, 9 * ns],        # lm_head: release 1 us
                          [1 * ns, 4 * ns, 5 * ns, 7 * ns],        # linear: release 2 us
                          [1 * ns, 0, 0, 10 * ns], [1 * ns, 0, 0, 8 * ns]])   # programs: entry, exit
    s = summarize(step, trace)
    lin = s["kinds"]["linear"]
    assert (lin["work_us"], lin["release_us"], lin["release_us_per_task"]) == (6.0, 3.0, 1.5)
    assert s["kinds"]["lm_head"]["release_us_per_task"] == 1.0
    assert s["ops"][0]["op"] == "L0.o_proj" and s["ops"][0]["release_us"] == 3.0
    assert s["span_us"] == 8.0 and s["kernel_span_us"] == 9.0 and s["last_task_to_exit_us"] == 1.0
    assert s["release_stamped"] and "release us/task" in format_summary(s)


def test_summary_times_each_op_from_first_ready_to_last_done():
    step = fake_step([["linear", "lm_head"], ["linear"]])
    step.task_ops = {0: "L0.o_proj", 1: "logits", 2: "L0.o_proj"}
    ns = 1000
    trace = torch.tensor([[1 * ns, 2 * ns, 5 * ns], [5 * ns, 6 * ns, 9 * ns], [1 * ns, 4 * ns, 7 * ns]])
    s = summarize(step, trace)
    assert [o["op"] for o in s["ops"]] == ["L0.o_proj", "logits"]        # in the order they became ready
    o = s["ops"][0]
    assert (o["kind"], o["tasks"], o["first_ready_us"], o["last_done_us"], o["work_us"], o["wait_us"]) == \
        ("linear", 2, 1.0, 6.0, 6.0, 4.0)
    assert "L0.o_proj" in format_summary(s)


def test_an_op_lowered_to_several_kinds_names_them_all():
    step = fake_step([["expert_up_gate", "expert_down"]])
    step.task_ops = {0: "L3.out", 1: "L3.out"}
    ns = 1000
    s = summarize(step, torch.tensor([[0, 1 * ns, 3 * ns], [3 * ns, 4 * ns, 6 * ns]]))
    assert [(o["op"], o["kind"], o["tasks"]) for o in s["ops"]] == [("L3.out", "expert_up_gate+expert_down", 2)]
