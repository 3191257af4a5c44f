"""Property tests: any graph prints to text that parses back to an equal graph."""
from hypothesis import given, settings
from hypothesis import strategies as st

from tilecomp.ir.graph import DType, Graph, Op, OpKind, TensorType, Value, parse_graph, print_graph, verify_graph
from tilecomp.ir.graph_build import GraphBuilder

names = st.text("abcXYZ019_.-", min_size=1, max_size=12)
idents = st.builds(lambda head, tail: head + tail, st.sampled_from("abz_Q"), st.text("az_09Q", max_size=8))
types = st.builds(TensorType, st.sampled_from(list(DType)),
                  st.lists(st.integers(0, 5000), max_size=4).map(tuple))
scalars = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.booleans(),
                    st.none(), st.text(max_size=12))
attr_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)


@st.composite
def graphs(draw):
    g = Graph(draw(idents))
    pool = []
    for name in draw(st.lists(names, max_size=4, unique=True)):
        g.inputs.append(Value("%in." + name, draw(types)))
        pool.append("%in." + name)
    for name in draw(st.lists(names, max_size=4, unique=True)):
        g.params.append(Value("@" + name, draw(types)))
        pool.append("@" + name)
    for i in range(draw(st.integers(0, 6))):
        args, kwargs = (), ()
        if pool:
            operands = st.sampled_from(pool)
            args = tuple(draw(st.lists(operands, max_size=3)))
            keys = draw(st.lists(idents, max_size=2, unique=True))
            kwargs = tuple((k, draw(operands)) for k in keys)
        outs = tuple(Value(f"%v{i}.{j}", draw(types)) for j in range(draw(st.integers(1, 3))))
        attrs = draw(st.dictionaries(idents, attr_values, max_size=3))
        g.ops.append(Op(draw(st.sampled_from(list(OpKind))), args, outs, kwargs, attrs))
        pool += [v.name for v in outs]
    g.outputs = draw(st.lists(st.sampled_from(pool), max_size=3)) if pool else []
    return g


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_any_graph_round_trips(g):
    text = print_graph(g)
    again = parse_graph(text)
    assert again == g
    assert print_graph(again) == text


@st.composite
def verified_chains(draw):
    """A random verified chain of elementwise / norm / linear / slice ops."""
    t = draw(st.integers(1, 9))
    d = draw(st.sampled_from([8, 16, 32]))
    dtype = draw(st.sampled_from([DType.BF16, DType.F16, DType.F32]))
    b = GraphBuilder("chain")
    x = b.input("x", TensorType(dtype, (t, d)))
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["norm", "linear", "silu", "add", "slice"]))
        width = b.type(x).shape[1]
        if kind == "norm":
            x = b.op(OpKind.RMSNORM, [x, b.param(f"n{i}", TensorType(dtype, (width,)))], "h",
                     eps=draw(st.floats(1e-7, 1e-3)))
        elif kind == "linear":
            n = draw(st.sampled_from([8, 16, 24]))
            x = b.op(OpKind.LINEAR, [x, b.param(f"w{i}", TensorType(dtype, (n, width)))], "y")
        elif kind == "silu":
            x = b.op(OpKind.SILU, [x], "a")
        elif kind == "add":
            x = b.op(OpKind.ADD, [x, x], "s")
        else:
            x = b.op(OpKind.SLICE, [x], "c", axis=1, start=0, stop=max(1, width // 2))
    return b.ret(x)


@settings(max_examples=40, deadline=None)
@given(verified_chains())
def test_verified_graphs_stay_verified_after_round_trip(g):
    verify_graph(g)
    again = verify_graph(parse_graph(print_graph(g)))
    assert again == g
