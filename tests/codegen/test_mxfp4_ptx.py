"""MX_DOT 8's and 9's inline-PTX dequantizations (codegen/mxfp4_ptx.py): the programs the GPU runs,
executed instruction by instruction on CPU, give the bf16 values of models/mxfp4 for every
code at every position of a word (MX_DOT 9 on the words as the engine repacks them); the expert
kinds build for sm_90 with them."""
import pytest
import torch

from tilecomp.codegen import mxfp4_ptx as M
from tilecomp.models.mxfp4 import dequantize_mxfp4


def reference_bf16(word: int, scale: int) -> list[int]:
    blocks = torch.tensor(list(word.to_bytes(4, "little")) + [0] * 12, dtype=torch.uint8).view(1, 1, 16)
    values = dequantize_mxfp4(blocks, torch.tensor([[scale]], dtype=torch.uint8))[0, :8]
    return [b & 0xFFFF for b in values.to(torch.bfloat16).view(torch.int16).tolist()]


def unpack(e01, e23, o01, o23) -> list[int]:
    """Element order of the tile: even registers hold elements 0, 2 | 4, 6, odd ones 1, 3 | 5, 7."""
    return [e01 & 0xFFFF, o01 & 0xFFFF, e01 >> 16, o01 >> 16, e23 & 0xFFFF, o23 & 0xFFFF, e23 >> 16, o23 >> 16]


@pytest.mark.parametrize("scale", [M.SCALE_RANGE[0], 100, 118, 127, 128, 190, M.SCALE_RANGE[1]])
def test_every_code_at_every_position_matches_the_reference(scale):
    gen = torch.Generator().manual_seed(scale)
    words = [b * 0x01010101 for b in range(256)]                        # every byte in every position
    words += [int(w) for w in torch.randint(0, 2**32, (256,), generator=gen, dtype=torch.int64)]
    for word in words:
        assert unpack(*M.emulate(word, scale)) == reference_bf16(word, scale), (hex(word), scale)


def test_tables_hold_the_e2m1_magnitudes_and_the_block_is_well_formed():
    for m, bits in enumerate(M.MAGNITUDES):
        value = torch.tensor([bits], dtype=torch.int16).view(torch.bfloat16).item()
        assert value == [0, 0.5, 1, 1.5, 2, 3, 4, 6][m]
    asm = M.ptx()
    assert asm.startswith("{") and asm.endswith("}")
    assert M.CONSTRAINTS.count("=r") == 4 and M.CONSTRAINTS.count(",r") == 2
    assert all(f"${i}" in asm for i in range(6)) and "$6" not in asm
    assert asm.count("prmt.b32") == 12 and asm.count("fma.rn.bf16x2") == 4


def test_a_wrong_table_is_caught():
    """The emulator runs PROGRAM itself: a changed table byte changes its results."""
    word, scale = 0x76543210, 127
    good = unpack(*M.emulate(word, scale))
    program = M.PROGRAM
    try:
        M.PROGRAM = tuple(("mov", "lb", M.LO_B ^ 0x40) if op[:2] == ("mov", "lb") else op for op in program)
        assert unpack(*M.emulate(word, scale)) != good
    finally:
        M.PROGRAM = program


@pytest.mark.parametrize("scale", [M.WORD_SCALE_RANGE[0], 100, 118, 127, 128, M.WORD_SCALE_RANGE[1]])
def test_repacked_words_give_every_code_at_every_position(scale):
    """MX_DOT 9: the program on a repacked word gives the reference bf16 values x 2^-WORD_SHIFT
    (the expert loop multiplies its accumulator back), element e in register e // 2, half e % 2 (WORD_ELEMENT)."""
    gen = torch.Generator().manual_seed(scale)
    words = [b * 0x01010101 for b in range(256)]
    words += [int(w) for w in torch.randint(0, 2**32, (256,), generator=gen, dtype=torch.int64)]
    for word in words:
        regs = M.emulate_word(M.repack_word(word), scale)
        got = [regs[e // 2] >> (16 * (e % 2)) & 0xFFFF for e in range(8)]
        assert got == [regs[j] >> half & 0xFFFF for j, half in M.WORD_ELEMENT]
        values = torch.tensor(got, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float() * 2.0 ** M.WORD_SHIFT
        want = torch.tensor(reference_bf16(word, scale), dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
        assert torch.equal(values, want), (hex(word), scale)


def test_word_repack_is_a_bit_permutation_and_the_tensor_form_agrees():
    assert sorted(b for bits in M.WORD_DEST for b in bits) == list(range(32))
    blocks = torch.randint(0, 256, (2, 3, 4, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = M.repack_words(blocks)
    assert packed.shape == blocks.shape and packed.dtype == torch.uint8
    src, out = blocks.view(-1, 4).tolist(), packed.view(-1, 4).tolist()
    for a, b in zip(src, out):
        assert M.repack_word(int.from_bytes(bytes(a), "little")) == int.from_bytes(bytes(b), "little")
    asm = M.ptx(M.WORD_PROGRAM, M.WORD_LOCALS)
    assert asm.count("fma.rn.bf16x2") == 4 and asm.count("shf.l.wrap.b32") == 4 and "$6" not in asm
    assert M.WORD_CONSTRAINTS.count("=r") == 4 and M.WORD_CONSTRAINTS.count(",r") == 2


def test_arena_transform_writes_the_repacked_copy_and_leaves_the_model_alone():
    """The engine's MX_DOT 9 path: ArenaBuilder.transform applies repack_words slot by slot at
    build; the added tensor (the model's buffer) is unchanged, and a transform that changes a
    slot's shape is refused with the slot named."""
    from tilecomp.errors import CheckpointError
    from tilecomp.runtime.buffers import ArenaBuilder
    blocks = torch.randint(0, 256, (2, 4, 3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    scales = torch.full((2, 4, 3), 127, dtype=torch.uint8)
    before = blocks.clone()
    b = ArenaBuilder()
    b.add("layer.up_blocks", blocks, "u8")
    b.add("layer.up_scales", scales, "u8")
    b.transform(lambda name, t: M.repack_words(t) if name.endswith("_blocks") else t)
    arenas = b.build()
    assert torch.equal(blocks, before)
    assert torch.equal(arenas.view("layer.up_blocks"), M.repack_words(blocks))
    assert not torch.equal(arenas.view("layer.up_blocks"), blocks)
    assert torch.equal(arenas.view("layer.up_scales"), scales)
    b.transform(lambda name, t: t[:1])
    with pytest.raises(CheckpointError, match="layer.up_blocks"):
        b.build()


def test_a_wrong_route_is_caught():
    """Repack and program both follow ROUTES: changing the program alone changes the values."""
    word, scale = 0x76543210, 127
    good = M.emulate_word(M.repack_word(word), scale)
    program = M.WORD_PROGRAM
    try:
        M.WORD_PROGRAM = tuple(("rotl", "t", "$4", 5) if op == ("rotl", "t", "$4", 4) else op for op in program)
        assert M.emulate_word(M.repack_word(word), scale) != good
    finally:
        M.WORD_PROGRAM = program


@pytest.mark.parametrize("mode", [8, 9])
def test_expert_kinds_build_for_sm90_with_ptx_lookups(tmp_path, mode):
    from tilecomp.codegen.build import build_report
    from tilecomp.codegen.triton_gen import generate_kernel
    path = tmp_path / "decode_step.py"
    path.write_text(generate_kernel(["expert_up_gate", "expert_down"], constexprs=dict(
        BLOCK_T=16, BLOCK_NX=64, BLOCK_KX=128, MX_DOT=mode, SALIGN=4)))
    report = build_report(path, programs=132, target="sm_90")
    assert 0 < report.registers <= 255 and report.fits
