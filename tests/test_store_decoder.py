"""Which bytes an instruction writes (vm/store_decoder.py), decoded before it runs:
the widths and addresses the pte-write emulation hands to the MMU."""

import pytest
import unicorn.x86_const as X

from shadowmmu.vm.store_decoder import UnsupportedInstruction, decode, operand_address, planned_writes

REGS = {X.UC_X86_REG_RAX: 0x1111, X.UC_X86_REG_RBX: 0x5000, X.UC_X86_REG_RCX: 3, X.UC_X86_REG_RDX: 0,
        X.UC_X86_REG_RSP: 0x8000, X.UC_X86_REG_RDI: 0x6000, X.UC_X86_REG_RSI: 0x7000,
        X.UC_X86_REG_R8: 0xFFFF_FFFF_0000_1000}


def writes(hex_bytes: str, bitness: int = 64, regs=None, seg=lambda i: 0x100 if i == 4 else 0):
    r = {**REGS, **(regs or {})}
    return planned_writes(decode(bytes.fromhex(hex_bytes), bitness, 0x1000), lambda u: r.get(u, 0), seg)


@pytest.mark.parametrize("code,bitness,expected", [
    ("48894cd910", 64, [(3 + 0x5000 * 8 + 0x10, 8)]),       # mov [rcx+rbx*8+0x10], rcx
    ("89 0b", 32, [(0x5000, 4)]),                           # mov [ebx], ecx
    ("66 89 0b", 32, [(0x5000, 2)]),                        # mov [ebx], cx
    ("88 0b", 32, [(0x5000, 1)]),                           # mov [ebx], cl
    ("48 87 03", 64, [(0x5000, 8)]),                        # xchg [rbx], rax
    ("f0 48 0f b1 0b", 64, [(0x5000, 8)]),                  # lock cmpxchg [rbx], rcx (always writes)
    ("f0 0f c7 0b", 32, [(0x5000, 8)]),                     # lock cmpxchg8b [ebx]
    ("f0 48 09 03", 64, [(0x5000, 8)]),                     # lock or [rbx], rax
    ("f0 48 0f ab 03", 64, [(0x5000 + (0x1111 >> 6) * 8, 8)]),   # lock bts [rbx], rax: bit 0x1111 of the string
    ("f0 0f ab 0b", 32, [(0x5000, 4)]),                     # lock bts [ebx], ecx: bit 3, in the operand
    ("f3 ab", 32, [(0x6000, 4)]),                           # rep stosd: one element per step
    ("f3 48 a5", 64, [(0x6000, 8)]),                        # rep movsq: the store of one element
    ("50", 64, [(0x8000 - 8, 8)]),                          # push rax
    ("50", 32, [(0x8000 - 4, 4)]),                          # push eax
    ("64 48 89 03", 64, [(0x5100, 8)]),                     # mov fs:[rbx], rax (FS base 0x100)
    ("41 89 00", 64, [(0xFFFF_FFFF_0000_1000, 4)]),         # mov [r8], eax
    ("67 89 03", 64, [(0x5000, 4)]),                        # mov [ebx], eax (32-bit address size)
])
def test_planned_writes(code, bitness, expected):
    assert writes(code.replace(" ", ""), bitness) == expected


def test_rep_with_a_zero_count_writes_nothing():
    assert writes("f3ab", 32, {X.UC_X86_REG_RCX: 0}) == []
    # the count register is ECX in 32-bit addressing: bits above are not part of it
    assert writes("f3ab", 32, {X.UC_X86_REG_RCX: 1 << 32}) == []


def test_reads_are_not_writes():
    assert writes("488b03") == []          # mov rax, [rbx]
    assert writes("483903") == []          # cmp [rbx], rax


def test_bts_with_a_negative_bit_offset_moves_down():
    assert writes("f00fab0b", 32, {X.UC_X86_REG_RCX: 0xFFFFFFFF}) == [(0x5000 - 4, 4)]     # bit -1


def test_undecodable_bytes_are_refused():
    with pytest.raises(UnsupportedInstruction):
        decode(b"\x0f\xff", 64, 0x1000)


def test_invlpg_operand():
    regs = {X.UC_X86_REG_RAX: 0x12345678, X.UC_X86_REG_R8: 0x1000, X.UC_X86_REG_RCX: 2}
    get = lambda u: regs.get(u, 0)                                      # noqa: E731
    assert operand_address(decode(bytes.fromhex("0f0138"), 32, 0x1000), get, lambda i: 0, 32) == 0x12345678
    assert operand_address(decode(bytes.fromhex("410f017c8810"), 64, 0x1000), get, lambda i: 0, 64) == 0x1018
    # RIP-relative: the displacement is from the next instruction
    assert operand_address(decode(bytes.fromhex("0f013d00100000"), 64, 0x1000), get, lambda i: 0, 64) == 0x2007
