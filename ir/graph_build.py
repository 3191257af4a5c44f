"""GraphBuilder: append ops with inferred result types and unique readable names.

Used by the tracer and the graph passes so that no caller writes result types
by hand: `infer_types` (the verifier's shape rules) computes them.
"""
from __future__ import annotations

from .graph import Graph, Op, OpKind, TensorType, Value
from .graph_verify import infer_types


class GraphBuilder:
    def __init__(self, name: str):
        self.graph = Graph(name)
        self._types: dict[str, TensorType] = {}
        self._taken: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        """A new `%name` built from `hint` (suffixed .1, .2, ... when taken)."""
        base = "%" + hint.lstrip("%")
        n = self._taken.get(base, 0)
        self._taken[base] = n + 1
        name = base if n == 0 else f"{base}.{n}"
        while name in self._types:          # a hint that collides with a suffixed name
            n += 1
            self._taken[base] = n + 1
            name = f"{base}.{n}"
        return name

    def input(self, hint: str, ttype: TensorType) -> str:
        name = self.fresh(hint)
        self.graph.inputs.append(Value(name, ttype))
        self._types[name] = ttype
        return name

    def param(self, checkpoint_name: str, ttype: TensorType) -> str:
        """Declare (once) the parameter named as the checkpoint tensor."""
        name = "@" + checkpoint_name
        if name not in self._types:
            self.graph.params.append(Value(name, ttype))
            self._types[name] = ttype
        return name

    def type(self, name: str) -> TensorType:
        return self._types[name]

    def op(self, kind: OpKind, args, hint: str, kwargs=None, **attrs):
        """Append `kind(args, kwargs) {attrs}`; returns the result name (or a tuple of names)."""
        kw = tuple((k, v) for k, v in (kwargs or {}).items() if v is not None)
        op = Op(kind, tuple(args), (), kw, dict(attrs))
        types = infer_types(op, self._types)
        if isinstance(hint, (list, tuple)):
            hints = list(hint)
            assert len(hints) == len(types), f"{kind.value}: {len(types)} results, {len(hints)} names"
        else:
            hints = [hint] if len(types) == 1 else [f"{hint}.{i}" for i in range(len(types))]
        names = [self.fresh(h) for h in hints]
        op.outputs = tuple(Value(n, t) for n, t in zip(names, types))
        self._types.update(zip(names, types))
        self.graph.ops.append(op)
        return names[0] if len(names) == 1 else tuple(names)

    def ret(self, *names: str) -> Graph:
        self.graph.outputs = list(names)
        return self.graph
