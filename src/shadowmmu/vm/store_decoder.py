"""Which bytes an instruction is about to write: the part of an x86 emulator a
hypervisor needs to emulate a store to a write-protected page table.

KVM decodes the trapped instruction and hands ``emulator_write_phys`` the
address and size of each write.  The real vCPU executes the instruction itself
(single-stepped, with the page mapped to a scratch copy), so the only question
left is where and how wide each of its writes is: iced-x86 decodes it and lists
the memory it writes (explicit operands and implicit ones: pushes, string
stores); this module turns that into linear addresses from the registers as they
are *before* the instruction runs.  The MEM_WRITE hook of unicorn 2.1.4 is not
used for this: it reports the wrong size for some 8-byte stores after a TLB hit
(an ``mov [rbx+rcx*8], rcx`` loop reported sizes 8, 4, 4 for three 8-byte stores).
"""

from __future__ import annotations

import iced_x86 as iced
import unicorn.x86_const as X

_WRITES = {iced.OpAccess.WRITE, iced.OpAccess.COND_WRITE, iced.OpAccess.READ_WRITE,
           iced.OpAccess.READ_COND_WRITE}
_INFO = iced.InstructionInfoFactory()

# iced register -> (unicorn register, mask): every name of a general register
# reads the full register, masked to the name's width
_GPR: dict[int, tuple[int, int]] = {}
for _n64, _n32, _n16, _n8 in (("RAX", "EAX", "AX", "AL"), ("RCX", "ECX", "CX", "CL"), ("RDX", "EDX", "DX", "DL"),
                              ("RBX", "EBX", "BX", "BL"), ("RSP", "ESP", "SP", "SPL"), ("RBP", "EBP", "BP", "BPL"),
                              ("RSI", "ESI", "SI", "SIL"), ("RDI", "EDI", "DI", "DIL")) + tuple(
        (f"R{i}", f"R{i}D", f"R{i}W", f"R{i}L") for i in range(8, 16)):
    _u = getattr(X, f"UC_X86_REG_{_n64}")
    for _name, _mask in ((_n64, (1 << 64) - 1), (_n32, 0xFFFFFFFF), (_n16, 0xFFFF), (_n8, 0xFF)):
        _GPR[getattr(iced.Register, _name)] = (_u, _mask)
_SEGMENTS = {getattr(iced.Register, n): i for i, n in enumerate(("ES", "CS", "SS", "DS", "FS", "GS"))}
_NONE = iced.Register.NONE
_BIT_STRING = {iced.Mnemonic.BTS, iced.Mnemonic.BTR, iced.Mnemonic.BTC}


class UnsupportedInstruction(Exception):
    """An instruction whose writes this decoder cannot list (a far write, a
    gather/scatter): emulating it would guess."""


def decode(code: bytes, bitness: int, rip: int) -> iced.Instruction:
    insn = iced.Decoder(bitness, code, ip=rip).decode()
    if insn.code == iced.Code.INVALID:
        raise UnsupportedInstruction(f"undecodable instruction bytes {code[:15].hex()} at {rip:#x}")
    return insn


def planned_writes(insn: iced.Instruction, reg, seg_base) -> list[tuple[int, int]]:
    """(linear address, size) of each write ``insn`` will make, from the current
    registers (``reg(uc_register)``) and segment bases (``seg_base(index)``).
    A REP string instruction makes one element's write per step (the vCPU
    single-steps, and the CPU traps after each iteration), none if the count is 0."""
    writes = []
    for m in _INFO.info(insn).used_memory():
        if m.access not in _WRITES:
            continue
        size = iced.MemorySizeExt.size(m.memory_size) or iced.MemorySizeExt.size(insn.memory_size)
        if not size:
            raise UnsupportedInstruction(f"cannot tell the width of the writes of '{insn}'")
        asize = (16, 32, 64)[m.address_size - 1] if m.address_size else 64
        amask = (1 << asize) - 1
        if insn.has_rep_prefix or insn.has_repe_prefix or insn.has_repne_prefix:
            count_reg = X.UC_X86_REG_RCX
            if not reg(count_reg) & amask:
                continue
        if m.vsib_size:
            raise UnsupportedInstruction(f"'{insn}' writes through a vector index")
        address = linear_address(m, reg, seg_base)
        if insn.mnemonic in _BIT_STRING and insn.op1_kind == iced.OpKind.REGISTER:
            # BTS/BTR/BTC with a register bit offset address a bit string: the operand
            # moves by the offset's signed quotient by the operand's width (SDM "BTS")
            u, mask = _GPR[insn.op1_register]
            bits = 8 * size
            offset = reg(u) & mask
            if offset & (mask + 1) >> 1:
                offset -= mask + 1
            address = (address + (offset // bits) * size) & ((1 << 64) - 1)
        writes.append((address, size))
    return writes


def linear_address(m: iced.UsedMemory, reg, seg_base) -> int:
    """The linear address of a memory operand iced lists as used."""
    asize = (16, 32, 64)[m.address_size - 1] if m.address_size else 64
    return _address(m.base, m.index, m.scale, m.displacement, m.segment, asize, reg, seg_base)


def operand_address(insn: iced.Instruction, reg, seg_base, bitness: int) -> int:
    """The linear address ``insn``'s memory operand names, for an instruction that names
    one without accessing it (INVLPG: iced lists no used memory for it).  A RIP-relative
    operand's displacement is already absolute."""
    base = insn.memory_base
    if base in (iced.Register.RIP, iced.Register.EIP):
        base = _NONE
    return _address(base, insn.memory_index, insn.memory_index_scale, insn.memory_displacement,
                    insn.memory_segment, 64 if bitness == 64 else 32, reg, seg_base)


def _address(base: int, index: int, scale: int, disp: int, segment: int, asize: int, reg, seg_base) -> int:
    """segment base + (base + index * scale + displacement, wrapped to the address size)."""
    ea = disp
    if base != _NONE:
        u, mask = _GPR[base]
        ea += reg(u) & mask
    if index != _NONE:
        u, mask = _GPR[index]
        ea += (reg(u) & mask) * scale
    seg = _SEGMENTS.get(segment)
    return ((seg_base(seg) if seg is not None else 0) + (ea & ((1 << asize) - 1))) & ((1 << 64) - 1)
