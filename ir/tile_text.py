"""Text form of the tile IR: `print_tile` and `parse_tile` (see tile.py for the grammar).

The printer writes one statement per line; the parser reads common lines with
whole-line regexes and falls back to a tokenizer that names the line and the
column of anything unexpected (IRError).
"""
from __future__ import annotations

import functools
import json
import re

from tilecomp.errors import IRError

from .text import LineTokens
from .tile import TILE_VERSION, AttrValue, Buffer, Counter, Dim, Region, Task, TileProgram


# ----------------------------------------------------------------------------- printer

def _fmt_value(v: AttrValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    raise IRError(f"tile IR: attribute value {v!r} has unsupported type {type(v).__name__}")


def _fmt_dim(d: Dim) -> str:
    if d.index is None:
        return f"{d.lo}:{d.hi}"
    if d.lo == 0:
        return f"${d.index}:{d.hi}"
    return f"${d.index}+{d.lo}:{d.hi}"


def format_region(r: Region) -> str:
    return f"{r.buffer}[{', '.join(_fmt_dim(d) for d in r.dims)}]"


def _fmt_task(t: Task) -> str:
    coords = ", ".join(f"{k}={v}" for k, v in t.coords.items())
    head = f"task {t.name} = {t.kind}[{coords}] rank={t.rank}"
    if t.attrs:
        head += " {" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in t.attrs.items()) + "}"
    lines = [head]
    if t.reads:
        lines.append("  reads " + ", ".join(format_region(r) for r in t.reads))
    if t.writes:
        lines.append("  writes " + ", ".join(format_region(r) for r in t.writes))
    if t.waits:
        lines.append("  waits " + ", ".join(f"{c} >= {n}" for c, n in t.waits))
    if t.signals:
        lines.append("  signals " + ", ".join(f"{c} += {n}" for c, n in t.signals))
    return "\n".join(lines)


def print_tile(tp: TileProgram) -> str:
    out = [TILE_VERSION]
    for k, v in tp.annotations.items():
        out.append(f"annotation {k} = {_fmt_value(v)}")
    for b in tp.buffers.values():
        line = f"buffer {b.name} : {b.dtype}[{', '.join(map(str, b.shape))}] {b.kind}"
        if b.param is not None:
            line += f" param={json.dumps(b.param)}"
        out.append(line)
    for c in tp.counters.values():
        out.append(f"counter {c.name} expected={c.expected} slot={c.slot}")
    out.extend(_fmt_task(t) for t in tp.tasks)
    if tp.programs is not None:
        out.append(f"schedule programs={len(tp.programs)}")
        for p, queue in enumerate(tp.programs):
            out.append(f"program {p}:" + "".join(f" t{i}" for i in queue))
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- parser

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<num>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)|-?inf|nan)
    | (?P<name>\$?[A-Za-z_][A-Za-z0-9_.]*)
    | (?P<op>>=|\+=|[\[\]{}(),:=+])
    )""", re.VERBOSE)


class _Line(LineTokens):
    """Tokens of one line with a cursor; errors name the line number and quote the line."""

    def __init__(self, text: str, lineno: int):
        self.lineno, self.text = lineno, text
        super().__init__(_TOKEN, text, lambda msg: f"tile IR line {lineno}: {msg}: {text.strip()!r}")

    def next(self, kind: str | None = None) -> str:
        return self.take(kind)

    def expect(self, text: str):
        self.take(text=text)

    def int(self) -> int:
        v = self.next("num")
        try:
            return int(v)
        except ValueError:
            self.fail(f"expected an integer, found {v!r}")

    def value(self) -> AttrValue:
        k, v = self.tokens[self.i] if self.i < len(self.tokens) else (None, None)
        if v == "[":
            self.i += 1
            items: list = []
            while not self.accept("]"):
                items.append(self.value())
                if self.peek() != "]":
                    self.expect(",")
            return items
        self.next()
        if k == "str":
            return json.loads(v)
        if k == "num":
            return float(v) if any(c in v for c in ".eEn") else int(v)
        if v in ("true", "false"):
            return v == "true"
        self.fail(f"expected a value, found {v!r}")

    def name(self) -> str:
        v = self.next("name")
        if v.startswith("$"):
            self.fail(f"name {v!r} may not start with '$'")
        return v

    def sep_list(self, item, *, brace: str | None = None) -> list:
        items = []
        closing = {"[": "]", "{": "}"}.get(brace)
        if closing and self.accept(closing):
            return items
        while True:
            items.append(item())
            if closing and self.accept(closing):
                return items
            if closing is None and self.peek() is None:
                return items
            self.expect(",")


def _parse_dim(ln: _Line) -> Dim:
    index, lo = None, 0
    if (ln.peek() or "").startswith("$"):
        index = ln.next("name")[1:]
        if ln.accept("+"):
            lo = ln.int()
    else:
        lo = ln.int()
    ln.expect(":")
    return Dim(lo, ln.int(), index)


def _parse_region(ln: _Line) -> Region:
    name = ln.name()
    ln.expect("[")
    return Region(name, tuple(ln.sep_list(lambda: _parse_dim(ln), brace="[")))


def _parse_pair(ln: _Line, op: str) -> tuple[str, int]:
    name = ln.name()
    ln.expect(op)
    return name, ln.int()


def _parse_kv(ln: _Line, value) -> tuple[str, AttrValue]:
    key = ln.name()
    ln.expect("=")
    return key, value()


def _parse_task_head(ln: _Line) -> Task:
    ln.expect("task")
    tname = ln.name()
    if not re.fullmatch(r"t\d+", tname):
        ln.fail(f"task name must be t<id>, found {tname!r}")
    ln.expect("=")
    kind = ln.name()
    ln.expect("[")
    coords = dict(ln.sep_list(lambda: _parse_kv(ln, ln.int), brace="["))
    ln.expect("rank")
    ln.expect("=")
    rank = ln.int()
    attrs: dict = {}
    if ln.accept("{"):
        attrs = dict(ln.sep_list(lambda: _parse_kv(ln, ln.value), brace="{"))
    ln.done()
    return Task(int(tname[1:]), kind, rank, coords, attrs=attrs)


def _parse_task_body(ln: _Line, task: Task):
    word = ln.next("name")
    if word == "reads":
        task.reads = ln.sep_list(lambda: _parse_region(ln))
    elif word == "writes":
        task.writes = ln.sep_list(lambda: _parse_region(ln))
    elif word == "waits":
        task.waits = ln.sep_list(lambda: _parse_pair(ln, ">="))
    elif word == "signals":
        task.signals = ln.sep_list(lambda: _parse_pair(ln, "+="))
    else:
        ln.fail(f"expected reads/writes/waits/signals, found {word!r}")
    ln.done()


def _parse_buffer(ln: _Line) -> Buffer:
    name = ln.name()
    ln.expect(":")
    dtype = ln.name()
    ln.expect("[")
    shape = tuple(ln.sep_list(ln.int, brace="["))
    kind = ln.name()
    param = None
    if ln.accept("param"):
        ln.expect("=")
        param = json.loads(ln.next("str"))
    ln.done()
    return Buffer(name, dtype, shape, kind, param)


def _parse_counter(ln: _Line) -> Counter:
    name = ln.name()
    fields = {}
    while ln.peek() is not None:
        k, v = _parse_kv(ln, ln.int)
        fields[k] = v
    if set(fields) != {"expected", "slot"}:
        ln.fail(f"counter needs expected= and slot=, found {sorted(fields)}")
    return Counter(name, fields["expected"], fields["slot"])


# ----------------------------------------------------------------------------- fast paths
# Whole-line regexes for the common statements; a line they do not match goes
# through the tokenizer above, which gives the precise error message.

_N = r"[A-Za-z_][A-Za-z0-9_.]*"
_DIM = rf"(?:\$?{_N}(?:\+\d+)?|\d+):\d+"
_REGION = rf"{_N}\[(?:{_DIM}(?:, {_DIM})*)?\]"
_FAST_REGIONS = re.compile(rf"  (reads|writes) ({_REGION}(?:, {_REGION})*)")
_FAST_PAIRS = re.compile(rf"  (waits|signals) ({_N} (?:>=|\+=) \d+(?:, {_N} (?:>=|\+=) \d+)*)")
_FAST_HEAD = re.compile(rf"task t(\d+) = ({_N})\[((?:{_N}=-?\d+(?:, )?)*)\] rank=(\d+)(?: \{{(.*)\}})?")
_FIND_REGION = re.compile(rf"({_N})\[([^\]]*)\]")
_FIND_PAIR = re.compile(rf"({_N}) (?:>=|\+=) (\d+)")
_FIND_ATTR = re.compile(rf'({_N})=("(?:[^"\\]|\\.)*"|\[[^\]"\[{{}}]*\]|[^,"\[\]{{}}]+)(?:, |$)')
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
_BAD = object()


@functools.lru_cache(maxsize=1 << 16)
def _fast_dim(text: str) -> Dim:
    start, hi = text.rsplit(":", 1)
    if start[0] != "$":
        return Dim(int(start), int(hi))
    index, _, lo = start[1:].partition("+")
    return Dim(int(lo) if lo else 0, int(hi), index)


def _fast_regions(body: str) -> list[Region]:
    return [Region(name, tuple(_fast_dim(d) for d in dims.split(", ")) if dims else ())
            for name, dims in _FIND_REGION.findall(body)]


@functools.lru_cache(maxsize=1 << 16)
def _fast_scalar(text: str):
    """An immutable attribute value (cached: names and sizes repeat on many lines)."""
    if text[0] == '"':
        return json.loads(text) if "\\" in text else text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    return _BAD


def _fast_value(text: str):
    if text[0] == "[":
        items = [_fast_scalar(x) for x in text[1:-1].split(", ")] if len(text) > 2 else []
        return _BAD if any(x is _BAD or isinstance(x, bool) for x in items) else items
    return _fast_scalar(text)


def _fast_attrs(body: str) -> dict | None:
    found = _FIND_ATTR.findall(body)
    if sum(len(k) + len(v) + 3 for k, v in found) - 2 != len(body):
        return None
    attrs = {}
    for k, v in found:
        value = _fast_value(v)
        if value is _BAD or k in attrs:
            return None
        attrs[k] = value
    return attrs


def _fast_head(line: str) -> Task | None:
    m = _FAST_HEAD.fullmatch(line)
    if m is None:
        return None
    tid, kind, coords, rank, attr_text = m.groups()
    attrs = _fast_attrs(attr_text) if attr_text else {}
    if attrs is None:
        return None
    pairs = [c.split("=") for c in coords.split(", ")] if coords else []
    return Task(int(tid), kind, int(rank), {k: int(v) for k, v in pairs}, attrs=attrs)


def _fast_body(line: str, task: Task) -> bool:
    m = _FAST_REGIONS.fullmatch(line)
    if m is not None:
        setattr(task, m.group(1), _fast_regions(m.group(2)))
        return True
    m = _FAST_PAIRS.fullmatch(line)
    if m is not None and (m.group(1) == "waits") == (">=" in m.group(2)) and \
            (m.group(1) == "signals") == ("+=" in m.group(2)):
        setattr(task, m.group(1), [(c, int(n)) for c, n in _FIND_PAIR.findall(m.group(2))])
        return True
    return False


def parse_tile(text: str) -> TileProgram:
    """Parse the text form; raises IRError naming the line on malformed input."""
    tp = TileProgram()
    current: Task | None = None
    seen_header, n_programs = False, 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        body = raw.split("#", 1)[0] if '"' not in raw else raw
        if not body.strip():
            continue
        if not seen_header:
            if body.strip() != TILE_VERSION:
                raise IRError(f"tile IR line {lineno}: expected header {TILE_VERSION!r}, found {body.strip()!r}")
            seen_header = True
            continue
        if body[0].isspace():
            if current is not None and _fast_body(body.rstrip(), current):
                continue
            ln = _Line(body, lineno)
            if current is None:
                ln.fail("indented line outside a task")
            _parse_task_body(ln, current)
            continue
        if body.startswith("task "):
            current = _fast_head(body.rstrip())
            if current is not None:
                tp.tasks.append(current)
                continue
        ln = _Line(body, lineno)
        current = None
        word = ln.peek()
        if word == "task":
            current = _parse_task_head(ln)
            tp.tasks.append(current)
        elif word in ("buffer", "counter"):
            ln.next()
            item, table = (_parse_buffer(ln), tp.buffers) if word == "buffer" else (_parse_counter(ln), tp.counters)
            if item.name in table:
                ln.fail(f"{word} {item.name!r} defined twice")
            table[item.name] = item
        elif word == "annotation":
            ln.next()
            k, v = _parse_kv(ln, ln.value)
            ln.done()
            tp.annotations[k] = v
        elif word == "schedule":
            ln.next()
            ln.expect("programs")
            ln.expect("=")
            n_programs = ln.int()
            ln.done()
            tp.programs = []
        elif word == "program":
            ln.next()
            p = ln.int()
            ln.expect(":")
            if tp.programs is None:
                ln.fail("program queue before the 'schedule programs=N' line")
            if p != len(tp.programs):
                ln.fail(f"expected program {len(tp.programs)}, found program {p}")
            queue = []
            while ln.peek() is not None:
                t = ln.name()
                if not re.fullmatch(r"t\d+", t):
                    ln.fail(f"expected a task name t<id>, found {t!r}")
                queue.append(int(t[1:]))
            tp.programs.append(queue)
        else:
            ln.fail(f"expected task/buffer/counter/annotation/schedule/program, found {word!r}")
    if not seen_header:
        raise IRError(f"tile IR line 1: expected header {TILE_VERSION!r}, found an empty text")
    if tp.programs is not None and len(tp.programs) != n_programs:
        raise IRError(f"tile IR: 'schedule programs={n_programs}' but {len(tp.programs)} program lines follow")
    return tp
