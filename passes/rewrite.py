"""Shared plumbing of the graph passes: use lists, pattern claims, rebuilding.

A fusion pass finds patterns, then replaces each with ONE op placed at the
position of the pattern's last op; the fused op reuses the names of the
values the pattern exported, so no use is renamed. Everything is linear in
the number of ops.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from tilecomp.ir.graph import Graph, Op, OpKind, Value, infer_types, verify_graph

GRAPH_OUTPUT = -1        # pseudo user index: the value is returned by the graph


def graph_pass(fn: Callable[[Graph], Graph]) -> Callable[[Graph], Graph]:
    """Verify the graph going in and coming out of a pass (messages name the pass)."""

    @functools.wraps(fn)
    def run(graph: Graph) -> Graph:
        verify_graph(graph, source=f"{graph.name} (input of {fn.__name__})")
        out = fn(graph)
        if any(op.line is not None for op in out.ops):      # parsed line numbers no longer hold
            out = dataclasses.replace(out, ops=[dataclasses.replace(op, line=None) for op in out.ops])
        return verify_graph(out, source=f"{out.name} (output of {fn.__name__})")

    return run


class Uses:
    """Who defines and who uses each value of a graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer: dict[str, int] = {}
        self.users: dict[str, list[int]] = {}
        for i, op in enumerate(graph.ops):
            for v in op.outputs:
                self.producer[v.name] = i
            for name in op.operands():
                self.users.setdefault(name, []).append(i)
        for name in graph.outputs:
            self.users.setdefault(name, []).append(GRAPH_OUTPUT)

    def op(self, name: str, kind: OpKind | None = None) -> Op | None:
        """The op defining `name` (None for inputs / params, or when not of `kind`)."""
        i = self.producer.get(name)
        if i is None:
            return None
        op = self.graph.ops[i]
        return op if kind is None or op.kind is kind else None

    def index(self, op: Op) -> int:
        return self.producer[op.outputs[0].name]

    def only_user(self, name: str, op: Op) -> bool:
        """`name` is used exactly once, by `op`, and is not a graph output."""
        return self.users.get(name, []) == [self.index(op)]

    def single_user(self, name: str, kind: OpKind) -> Op | None:
        """The one op using `name`, if it is of `kind`, takes `name` as its first arg and
        `name` is not a graph output; else None."""
        users = self.users.get(name, [])
        if len(users) != 1 or users[0] == GRAPH_OUTPUT:
            return None
        op = self.graph.ops[users[0]]
        return op if op.kind is kind and op.args[0] == name else None

    def used_only_after(self, names: list[str], position: int) -> bool:
        """Every user of these values sits after `position` (or is the graph output)."""
        return all(u == GRAPH_OUTPUT or u > position for n in names for u in self.users.get(n, []))


class Rewriter:
    """Collects non-overlapping replacements and rebuilds the graph once."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.uses = Uses(graph)
        self.replace: dict[int, Op | None] = {}
        self.taken_names = set(graph.types())

    def claim(self, pattern: list[Op], fused: Op) -> bool:
        """Replace the ops of `pattern` by `fused` at the last one's position. False if overlapping
        an earlier claim or if a value the fused op defines is used before that position."""
        idx = sorted(self.uses.index(op) for op in pattern)
        if any(i in self.replace for i in idx):
            return False
        if not self.uses.used_only_after([v.name for v in fused.outputs], idx[-1]):
            return False
        for i in idx[:-1]:
            self.replace[i] = None
        self.replace[idx[-1]] = fused
        return True

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.taken_names:
            n += 1
            name = f"{base}.{n}"
        self.taken_names.add(name)
        return name

    def result(self) -> Graph:
        ops = []
        for i, op in enumerate(self.graph.ops):
            new = self.replace.get(i, op)
            if new is not None:
                ops.append(new)
        return dataclasses.replace(self.graph, ops=ops, inputs=list(self.graph.inputs),
                                   params=list(self.graph.params), outputs=list(self.graph.outputs))


def make_op(kind: OpKind, args, out_names, types: dict, kwargs=None, **attrs) -> Op:
    """An op whose result types are inferred; `out_names` name its results in order."""
    kw = tuple((k, v) for k, v in (kwargs or {}).items() if v is not None)
    op = Op(kind, tuple(args), (), kw, {k: v for k, v in attrs.items() if v is not None})
    result_types = infer_types(op, types)
    op.outputs = tuple(Value(n, t) for n, t in zip(out_names, result_types))
    return op
