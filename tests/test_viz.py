"""The schedule picture: one rectangle per task on its program's row, kinds coloured, bytes in tooltips."""
import re

import pytest

from tilecomp.errors import ScheduleError
from tilecomp.models.presets import preset
from tilecomp.passes.lower import lower
from tilecomp.passes.pipeline import compile_model
from tilecomp.passes.schedule import ScheduleOptions, schedule
from tilecomp.viz import KIND_COLOUR, ROW, TOP, schedule_html


def test_html_has_every_task_on_its_program_row():
    cfg, dcfg = preset("tiny")
    tp = lower(compile_model(cfg, dcfg).fused)
    s = schedule(tp, ScheduleOptions(programs=5))
    html = schedule_html(s)
    rects = re.findall(r'<rect x="[\d.]+" y="(\d+)" width="[\d.]+" height="\d+" fill="(#\w+)"><title>t(\d+) (\w+)\[.*?\n([\d,]+) bytes',
                       html, flags=re.S)
    assert len(rects) == len(s.tasks)
    program_of = {i: p for p, q in enumerate(s.programs) for i in q}
    for y, colour, tid, kind, nbytes in rects:
        t = s.tasks[int(tid)]
        assert kind == t.kind and colour == KIND_COLOUR[kind]
        assert int(y) == TOP + ROW * program_of[t.id]
        assert int(nbytes.replace(",", "")) == s.task_bytes(t)
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html


def test_unscheduled_program_has_no_picture():
    cfg, dcfg = preset("tiny")
    with pytest.raises(ScheduleError, match="no schedule"):
        schedule_html(lower(compile_model(cfg, dcfg).fused))
