"""A picture of a schedule: one self-contained HTML page with an SVG timeline.

Rows are programs, x is the predicted time (the scheduler's cost model: bytes
at one program's share of the bandwidth + a per-task overhead), each task a
rectangle coloured by kind; hovering shows task, coordinates, bytes and times.
"""
from __future__ import annotations

from html import escape

from tilecomp.errors import ScheduleError
from tilecomp.ir.tile import TASK_KINDS, TileProgram
from tilecomp.passes.schedule import ScheduleOptions, simulate
from tilecomp.stats import format_tile_stats

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#d62728", "#2ca02c", "#8c564b", "#17becf", "#7f7f7f")
KIND_COLOUR = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(TASK_KINDS)}

WIDTH, ROW, LEFT, TOP = 1600, 12, 70, 30


def _task_label(tp: TileProgram, i: int, start: float, finish: float) -> str:
    t = tp.tasks[i]
    coords = ", ".join(f"{k}={v}" for k, v in t.coords.items())
    op = t.attrs.get("op", "")
    return (f"{t.name} {t.kind}[{coords}] {op}\n{tp.task_bytes(t):,} bytes\n"
            f"{start:,.2f} - {finish:,.2f} us")


def schedule_svg(tp: TileProgram, options: ScheduleOptions | None = None) -> str:
    if tp.programs is None:
        raise ScheduleError("schedule picture: the tile program has no schedule (no program queues)")
    options = options or ScheduleOptions(programs=len(tp.programs),
                                         hbm_gbps=float(tp.annotations.get("hbm_gbps", ScheduleOptions.hbm_gbps)))
    start, finish = simulate(tp, options)
    span = max(finish, default=0.0) or 1.0
    scale = (WIDTH - LEFT - 10) / span
    height = TOP + ROW * len(tp.programs) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-size="10">']
    for p, queue in enumerate(tp.programs):
        y = TOP + p * ROW
        out.append(f'<text x="2" y="{y + ROW - 3}">program {p}</text>')
        for i in queue:
            x, w = LEFT + start[i] * scale, max(0.5, (finish[i] - start[i]) * scale)
            colour = KIND_COLOUR.get(tp.tasks[i].kind, "#000")
            out.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW - 2}" fill="{colour}">'
                       f'<title>{escape(_task_label(tp, i, start[i], finish[i]))}</title></rect>')
    out.append(f'<text x="{LEFT}" y="{TOP - 8}">0 us</text>'
               f'<text x="{WIDTH - 90}" y="{TOP - 8}">{span:,.1f} us</text></svg>')
    return "\n".join(out)


def schedule_html(tp: TileProgram, options: ScheduleOptions | None = None,
                  gbps: float = ScheduleOptions.hbm_gbps) -> str:
    kinds = sorted({t.kind for t in tp.tasks}, key=TASK_KINDS.index)
    legend = " ".join(f'<span style="background:{KIND_COLOUR[k]};padding:1px 6px;margin:2px">{k}</span>'
                      for k in kinds)
    notes = ", ".join(f"{k}={v}" for k, v in tp.annotations.items())
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tilecomp schedule</title></head>"
            "<body style=\"font-family:sans-serif\">\n"
            f"<h3>tilecomp schedule: {len(tp.tasks)} tasks on {len(tp.programs or [])} programs</h3>\n"
            f"<p>{escape(notes)}</p>\n<p>{legend}</p>\n"
            f"<pre>{escape(format_tile_stats(tp, gbps))}</pre>\n"
            f"{schedule_svg(tp, options)}\n</body></html>\n")
