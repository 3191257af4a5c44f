"""Graph IR: printer/parser round trip, verifier messages (op + line), bytes."""
import pytest

from tilecomp.errors import IRError
from tilecomp.ir.graph import DType, OpKind, TensorType, parse_graph, print_graph, verify_graph
from tilecomp.ir.graph_build import GraphBuilder

BF16, F32, I32 = DType.BF16, DType.F32, DType.I32


def small_graph():
    b = GraphBuilder("small")
    x = b.input("x", TensorType(BF16, (4, 16)))
    pos = b.input("pos", TensorType(I32, ()))
    w = b.param("model.layers.0.self_attn.q_proj.weight", TensorType(BF16, (32, 16)))
    n = b.param("model.layers.0.input_layernorm.weight", TensorType(BF16, (16,)))
    kc = b.input("k_cache", TensorType(BF16, (2, 64, 16)))
    h = b.op(OpKind.RMSNORM, [x, n], "h", eps=1e-5)
    q = b.op(OpKind.LINEAR, [h, w], "q")
    q = b.op(OpKind.ROPE, [q, pos], "q_rot", n_heads=2, head_dim=16, rope_dim=6, theta=10000.0)
    k2 = b.op(OpKind.KV_WRITE, [kc, q, pos], "k_cache.new", value_scale=0.707)
    return b.ret(q, k2)


def test_print_parse_round_trip_is_equal():
    g = verify_graph(small_graph())
    text = print_graph(g)
    again = parse_graph(text)
    assert again == g
    assert print_graph(again) == text
    assert "param @model.layers.0.self_attn.q_proj.weight: bf16[32, 16]" in text
    assert "%q: bf16[4, 32] = linear(%h, @model.layers.0.self_attn.q_proj.weight)" in text


def test_attribute_values_round_trip():
    b = GraphBuilder("attrs")
    x = b.input("x", TensorType(F32, (2, 8)))
    b.op(OpKind.SLICE, [x], "s", axis=1, start=0, stop=4)
    g = b.ret()
    g.ops[0].attrs.update(axis=1, start=0, stop=4)
    text = print_graph(g).replace("stop=4}", 'stop=4, note="a \\"b\\"", big=1e+300, neg=-inf, '
                                  'flag=false, none_=none, dims=[1, [2, 3.5]]}')
    parsed = parse_graph(text)
    assert parsed.ops[0].attrs == {"axis": 1, "start": 0, "stop": 4, "note": 'a "b"', "big": 1e300,
                                   "neg": float("-inf"), "flag": False, "none_": None,
                                   "dims": (1, (2, 3.5))}
    assert parse_graph(print_graph(parsed)) == parsed


def test_mxfp4_param_bytes():
    t = TensorType(DType.MXFP4, (4, 64, 128))
    assert t.nbytes == 4 * 64 * 128 // 2 + 4 * 64 * 128 // 32
    assert TensorType(BF16, (3, 5)).nbytes == 30
    assert TensorType(I32, ()).nbytes == 4


def _line_of(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_verifier_names_line_and_op_on_shape_error():
    text = print_graph(small_graph())
    bad = text.replace("%q: bf16[4, 32] = linear", "%q: bf16[4, 31] = linear")
    with pytest.raises(IRError, match=rf"<graph>:{_line_of(text, '= linear')}: op linear -> %q: "
                                      r"declared result types bf16\[4, 31\], expected bf16\[4, 32\]"):
        verify_graph(parse_graph(bad), source="<graph>")


def test_verifier_rejects_use_before_def():
    lines = print_graph(small_graph()).splitlines()
    i = next(i for i, line in enumerate(lines) if "= rmsnorm" in line)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]          # linear now uses %h before rmsnorm
    with pytest.raises(IRError, match=rf"g:{i + 1}: op linear -> %q uses %h before its definition on line {i + 2}"):
        verify_graph(parse_graph("\n".join(lines)), source="g")


def test_verifier_rejects_undefined_and_wrong_operands():
    text = print_graph(small_graph())
    with pytest.raises(IRError, match="uses undefined value %nope"):
        verify_graph(parse_graph(text.replace("rmsnorm(%x,", "rmsnorm(%nope,")))
    with pytest.raises(IRError, match="expected 2 operands, found 3"):
        verify_graph(parse_graph(text.replace("rmsnorm(%x,", "rmsnorm(%pos, %x,")))
    with pytest.raises(IRError, match="missing attribute eps"):
        verify_graph(parse_graph(text.replace(" {eps=1e-05}", "")))
    with pytest.raises(IRError, match="unknown attribute colour"):
        verify_graph(parse_graph(text.replace("{eps=1e-05}", "{eps=1e-05, colour=1}")))
    with pytest.raises(IRError, match="unknown keyword operand sink="):
        verify_graph(parse_graph(text.replace("q_proj.weight)", "q_proj.weight, sink=%x)")))
    with pytest.raises(IRError, match="redefines %h"):
        verify_graph(parse_graph(text.replace("%q: bf16[4, 32] = linear", "%h: bf16[4, 32] = linear")))


def test_verifier_checks_dtypes():
    text = print_graph(small_graph())
    bad = text.replace("input %pos: i32[]", "input %pos: f32[]")
    with pytest.raises(IRError, match=r"op rope -> %q_rot: pos: expected an integer scalar, found f32\[\]"):
        verify_graph(parse_graph(bad))


@pytest.mark.parametrize("broken, message", [
    ("graph g {\n  input %x bf16[2]\n}\n", r"t:2: expected :, found 'bf16'"),
    ("graph g {\n  input %x: q7[2]\n}\n", r"t:2: unknown dtype 'q7'"),
    ("graph g {\n  input %x: f32[2]\n  %y: f32[2] = frobnicate(%x)\n}\n", r"t:3: unknown op kind 'frobnicate'"),
    ("graph g {\n  input %x: f32[2]\n  %y: f32[2] = silu(%x\n}\n", r"t:3: line ends early"),
    ("graph g {\n  input %x: f32[2]\n", r"t: missing closing '}' of graph g"),
    ("graph g {\n  input %x: f32[2]\n  %y: f32[2] = silu(%x) $\n}\n", r"t:3: unexpected character '\$'"),
    ("", "t: empty text"),
    ("graph g {\n}\nmore\n", r"t:3: text after the closing"),
])
def test_parser_errors_name_the_line(broken, message):
    with pytest.raises(IRError, match=message):
        parse_graph(broken, source="t")


def test_comments_and_blank_lines_keep_real_line_numbers():
    text = "# a dump\n\n" + print_graph(small_graph()).replace("%q: bf16[4, 32]", "%q: bf16[4, 30]")
    with pytest.raises(IRError, match=rf"f:{_line_of(text, '= linear')}: op linear"):
        verify_graph(parse_graph(text, "f"), "f")
