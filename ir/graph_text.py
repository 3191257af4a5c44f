"""Text form of the graph IR: `print_graph` and `parse_graph` (exact round trip).

One line per input, parameter and op:

    graph NAME {
      input %pos: i32[]
      param @model.norm.weight: bf16[4096]
      %a: f32[8, 16], %b: i32[8] = kind(%x, @w, norm=@n) {eps=1e-05, causal=true}
      return %a, %b
    }

Blank lines and lines starting with `#` are ignored by the parser.
Attribute values: ints, floats (always with `.`, `e`, `inf` or `nan`),
`true`/`false`, `none`, "strings" and [lists].
"""
from __future__ import annotations

import json
import math
import re

from tilecomp.errors import IRError

from .graph import DType, Graph, Op, OpKind, TensorType, Value
from .text import LineTokens

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<ref>[%@][A-Za-z0-9_.\-]+)
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<num>-?(?:(?:inf|nan)\b|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>[\[\](){}:,=])
    )""",
    re.VERBOSE,
)
_DTYPES = {d.value: d for d in DType}
_KINDS = {k.value: k for k in OpKind}
_CONSTANTS = {"true": True, "false": False, "none": None}


# ---------------------------------------------------------------- printing

def format_attr(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    raise IRError(f"attribute value {value!r}: expected int, float, bool, str, none or tuple")


def format_op(op: Op) -> str:
    outs = ", ".join(f"{v.name}: {v.type}" for v in op.outputs)
    operands = list(op.args) + [f"{k}={name}" for k, name in op.kwargs]
    text = f"{outs} = {op.kind.value}({', '.join(operands)})"
    if op.attrs:
        text += " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in op.attrs.items()) + "}"
    return text


def print_graph(graph: Graph) -> str:
    """The graph as text; `parse_graph(print_graph(g)) == g`."""
    lines = [f"graph {graph.name} {{"]
    lines += [f"  input {v.name}: {v.type}" for v in graph.inputs]
    lines += [f"  param {v.name}: {v.type}" for v in graph.params]
    lines += ["  " + format_op(op) for op in graph.ops]
    lines.append("  return " + ", ".join(graph.outputs) if graph.outputs else "  return")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- parsing

class _Line(LineTokens):
    """Tokens of one line with a cursor; errors name SOURCE:LINE."""

    def __init__(self, text: str, lineno: int, source: str):
        self.lineno, self.source = lineno, source
        super().__init__(_TOKEN, text, lambda msg: f"{source}:{lineno}: {msg}")


def _parse_type(ln: _Line) -> TensorType:
    name = ln.take("ident")
    if name not in _DTYPES:
        ln.fail(f"unknown dtype {name!r}: expected one of {', '.join(_DTYPES)}")
    ln.take(text="[")
    shape = []
    while not ln.accept("]"):
        dim = ln.take("num")
        if not dim.isdigit():
            ln.fail(f"dimension {dim!r}: expected a non-negative integer")
        shape.append(int(dim))
        if ln.peek() != "]":
            ln.take(text=",")
    return TensorType(_DTYPES[name], tuple(shape))


def _parse_attr(ln: _Line):
    if ln.accept("["):
        items = []
        while not ln.accept("]"):
            items.append(_parse_attr(ln))
            if ln.peek() != "]":
                ln.take(text=",")
        return tuple(items)
    kind, text = ln.tokens[ln.i] if ln.i < len(ln.tokens) else (None, None)
    ln.i += 1
    if kind == "str":
        return json.loads(text)
    if kind == "num":
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        return float(text)
    if kind == "ident" and text in _CONSTANTS:
        return _CONSTANTS[text]
    ln.fail(f"bad attribute value {text!r}")


def _parse_value_decl(ln: _Line, sigil: str) -> Value:
    name = ln.take("ref")
    if not name.startswith(sigil):
        ln.fail(f"name {name!r} should start with {sigil!r}")
    ln.take(text=":")
    return Value(name, _parse_type(ln))


def _parse_op(ln: _Line) -> Op:
    outputs = [_parse_value_decl(ln, "%")]
    while ln.accept(","):
        outputs.append(_parse_value_decl(ln, "%"))
    ln.take(text="=")
    kind_name = ln.take("ident")
    if kind_name not in _KINDS:
        ln.fail(f"unknown op kind {kind_name!r}")
    ln.take(text="(")
    args, kwargs = [], []
    while not ln.accept(")"):
        if ln.tokens[ln.i][0] == "ident":
            key = ln.take("ident")
            ln.take(text="=")
            kwargs.append((key, ln.take("ref")))
        elif kwargs:
            ln.fail("positional operand after a keyword operand")
        else:
            args.append(ln.take("ref"))
        if ln.peek() != ")":
            ln.take(text=",")
    attrs = {}
    if ln.accept("{"):
        while not ln.accept("}"):
            key = ln.take("ident")
            ln.take(text="=")
            attrs[key] = _parse_attr(ln)
            if ln.peek() != "}":
                ln.take(text=",")
    ln.done()
    return Op(_KINDS[kind_name], tuple(args), tuple(outputs), tuple(kwargs), attrs, line=ln.lineno)


def parse_graph(text: str, source: str = "<graph>") -> Graph:
    """Parse graph IR text. Raises IRError naming `source:line` on any problem."""
    graph: Graph | None = None
    closed = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        ln = _Line(stripped, lineno, source)
        if closed:
            ln.fail("text after the closing '}'")
        head = ln.peek()
        if graph is None:
            ln.take(text="graph")
            graph = Graph(ln.take("ident"))
            ln.take(text="{")
            ln.done()
        elif head == "input" or head == "param":
            ln.take()
            value = _parse_value_decl(ln, "%" if head == "input" else "@")
            ln.done()
            (graph.inputs if head == "input" else graph.params).append(value)
        elif head == "return":
            ln.take()
            while ln.peek() is not None:
                graph.outputs.append(ln.take("ref"))
                if ln.peek() is not None:
                    ln.take(text=",")
        elif head == "}":
            ln.take()
            ln.done()
            closed = True
        else:
            graph.ops.append(_parse_op(ln))
    if graph is None:
        raise IRError(f"{source}: empty text, expected 'graph NAME {{'")
    if not closed:
        raise IRError(f"{source}: missing closing '}}' of graph {graph.name}")
    return graph
