"""Where a megakernel step's time goes: per-task globaltimer stamps, summarised.

A step launched with `StepProgram.launch(arenas, trace=buf)` writes, for every
task record, three %globaltimer stamps: when its program reached it, when its
waits were met, when its signals were sent. `summarize` turns them into
per-kind totals of waiting and working time, per-program busy fractions and
the longest tasks, which is what `tilecomp bench --trace` prints and saves.

Each kind's work is also split by what ran before it on its program: a task after one of
another kind ("switch") against a task after one of the same kind ("repeat"). A kind whose
switch tasks take much longer than its repeat tasks of the same size pays for starting up
(code not in the SM's instruction cache, a pipeline's first loads), not for its bytes.
"""
from __future__ import annotations

import collections

import torch

from tilecomp.codegen import layout as L

KIND_NAMES = {k.id: name for name, k in L.KINDS.items()}


def summarize(step, trace: torch.Tensor, top: int = 15) -> dict:
    """step: a StepProgram launched once with `trace`; trace: int64 [n_tasks (+ programs), W]:
    the tasks' stamps, then (where the kernel wrote them) each program's entry and exit. W = 4
    (layout.TRACE_WORDS): (start, wait done, work done, signalled), and each kind's and op's
    release (work done -> signalled: the fences and atomics that publish a task) is reported;
    W = 3: the traces of earlier versions, (start, wait done, signalled)."""
    records = step.records[:, :2].cpu().tolist()                # (kind, task)
    bounds = step.queue.cpu().tolist()
    stamps = trace.cpu().tolist()
    stamps, entries = stamps[:len(records)], stamps[len(records):]
    four = bool(stamps) and len(stamps[0]) >= 4
    if not four:    # (start, ready, done) -> (start, ready, -, done)
        stamps = [[s[0], s[1], None, s[2]] for s in stamps]
        entries = [[e[0], e[1], None, e[2]] for e in entries]
    t_min = min(s[0] for s in stamps if s[0] > 0)
    span_ns = max(s[3] for s in stamps) - t_min
    kinds = collections.defaultdict(lambda: {"tasks": 0, "wait_us": 0.0, "work_us": 0.0, "release_us": 0.0,
                                             "switch_tasks": 0, "switch_work_us": 0.0,
                                             "repeat_tasks": 0, "repeat_work_us": 0.0})
    programs, longest = [], []
    ops = collections.defaultdict(lambda: {"kinds": [], "tasks": 0, "first_start_us": float("inf"),
                                           "first_ready_us": float("inf"), "last_done_us": 0.0,
                                           "work_us": 0.0, "wait_us": 0.0, "release_us": 0.0})
    for p in range(len(bounds) - 1):
        busy = 0
        prev = None
        for qi in range(bounds[p], bounds[p + 1]):
            start, ready, computed, done = stamps[qi]
            kind, task = records[qi]
            kind_name = KIND_NAMES.get(kind, str(kind))
            wait_us, work_us = (ready - start) / 1e3, (done - ready) / 1e3
            release_us = (done - computed) / 1e3 if computed else 0.0     # part of work_us
            k = kinds[kind_name]
            k["tasks"] += 1
            k["wait_us"] += wait_us
            k["work_us"] += work_us
            k["release_us"] += release_us
            side = "repeat" if kind == prev else "switch"
            k[f"{side}_tasks"] += 1
            k[f"{side}_work_us"] += work_us
            prev = kind
            busy += done - ready
            name = step.task_names.get(task, f"t{task}")
            longest.append((work_us, (ready - t_min) / 1e3, p, name))
            o = ops[step.task_ops.get(task, name)]
            if kind_name not in o["kinds"]:     # an op lowered to several kinds (e.g. the experts)
                o["kinds"].append(kind_name)
            o["tasks"] += 1
            o["first_start_us"] = min(o["first_start_us"], (start - t_min) / 1e3)
            o["first_ready_us"] = min(o["first_ready_us"], (ready - t_min) / 1e3)
            o["last_done_us"] = max(o["last_done_us"], (done - t_min) / 1e3)
            o["work_us"] += work_us
            o["wait_us"] += wait_us
            o["release_us"] += release_us
        programs.append(busy / span_ns if span_ns else 0.0)
    longest.sort(reverse=True)
    total_work = sum(k["work_us"] for k in kinds.values()) or 1.0
    for k in kinds.values():
        k["work_share"] = k["work_us"] / total_work
        k["work_us_per_task"] = k["work_us"] / k["tasks"]
        k["release_us_per_task"] = k["release_us"] / k["tasks"] if four else None
        for side in ("switch", "repeat"):
            n = k[f"{side}_tasks"]
            k[f"{side}_us_per_task"] = k[f"{side}_work_us"] / n if n else None
    kernel = {}
    if len(entries) == len(bounds) - 1 and all(e[0] > 0 and e[3] > 0 for e in entries):
        # the kernel's own life around the tasks: programs starting, finding their first task,
        # and leaving after the last one (time no task stamp covers)
        first_start = [stamps[bounds[p]][0] if bounds[p + 1] > bounds[p] else e[3]
                       for p, e in enumerate(entries)]
        kernel = {"kernel_span_us": (max(e[3] for e in entries) - min(e[0] for e in entries)) / 1e3,
                  "entry_spread_us": (max(e[0] for e in entries) - min(e[0] for e in entries)) / 1e3,
                  "entry_to_first_task_us": (t_min - min(e[0] for e in entries)) / 1e3,
                  "mean_entry_to_own_first_task_us": sum(f - e[0] for f, e in zip(first_start, entries))
                  / 1e3 / len(entries),
                  "last_task_to_exit_us": (max(e[3] for e in entries) - max(s[3] for s in stamps)) / 1e3}
    return {"span_us": span_ns / 1e3, "programs": len(programs), **kernel, "release_stamped": four,
            "mean_program_busy": sum(programs) / max(len(programs), 1),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["work_us"])),
            # the step's timeline: each op's tasks from the first one ready to the last one done,
            # in the order they became ready (which ops overlap; where the chain is)
            "ops": [{"op": name, "kind": "+".join(o.pop("kinds")), **o}
                    for name, o in sorted(ops.items(), key=lambda kv: kv[1]["first_ready_us"])],
            "longest_tasks": [{"work_us": w, "start_us": s, "program": p, "task": n}
                              for w, s, p, n in longest[:top]]}


def format_summary(s: dict) -> str:
    lines = [f"step span {s['span_us']:.1f} us on {s['programs']} programs, mean busy "
             f"{100 * s['mean_program_busy']:.1f}%"]
    if "kernel_span_us" in s:
        lines.append(f"kernel span {s['kernel_span_us']:.1f} us: programs entered over "
                     f"{s['entry_spread_us']:.1f} us, first task {s['entry_to_first_task_us']:.1f} us after the "
                     f"first entry (mean per program {s['mean_entry_to_own_first_task_us']:.1f} us), last exit "
                     f"{s['last_task_to_exit_us']:.1f} us after the last task")
    if "traced_step_ms" in s:
        lines.append(f"the traced step took {s['traced_step_ms']:.3f} ms (CUDA events around the launch)")
    rel = s.get("release_stamped", False)
    lines.append(f"{'kind':<22}{'tasks':>7}{'work us':>12}{'share':>8}{'us/task':>10}{'wait us':>12}"
                 f"{'switch us/task':>16}{'repeat us/task':>16}" + (f"{'release us/task':>17}" if rel else ""))

    def per(k, side):
        v = k.get(f"{side}_us_per_task")
        return f"{v:>9.2f} ({k[side + '_tasks']:>4})" if v is not None else f"{'-':>16}"
    for name, k in s["kinds"].items():
        lines.append(f"{name:<22}{k['tasks']:>7}{k['work_us']:>12.1f}{100 * k['work_share']:>7.1f}%"
                     f"{k['work_us_per_task']:>10.2f}{k['wait_us']:>12.1f}{per(k, 'switch')}{per(k, 'repeat')}"
                     + (f"{k['release_us_per_task']:>17.2f}" if rel else ""))
    ops = s.get("ops", [])
    if ops:
        lines.append("the longest ops (first task ready -> last task done):")
        for o in sorted(ops, key=lambda o: o["first_ready_us"] - o["last_done_us"])[:8]:
            lines.append(f"  {o['op']:<24}{o['kind']:<16}{o['tasks']:>5} tasks  {o['first_ready_us']:9.1f} -> "
                         f"{o['last_done_us']:9.1f} us  work {o['work_us'] / max(o['tasks'], 1):7.1f} us/task")
    lines.append("longest tasks:")
    for t in s["longest_tasks"][:8]:
        lines.append(f"  {t['work_us']:9.1f} us  from {t['start_us']:9.1f} us  program {t['program']:>3}  "
                     f"{t['task']}")
    return "\n".join(lines)
