"""Event delivery in software (vm/delivery.py) against the SDM's rules, on a CPU
stand-in whose memory is a flat byte array (linear = physical, nothing faults
unless a test says so)."""

from __future__ import annotations

import struct

import pytest

from shadowmmu.vm import delivery as D
from shadowmmu.x86.faults import PageFault

GDT, IDT, TSS, STACK0, STACK3 = 0x1000, 0x2000, 0x3000, 0x9000, 0x7000
KCODE64, KCODE32, KDATA, UCODE, UDATA = 0x08, 0x18, 0x10, 0x20 | 3, 0x28 | 3


def desc(base=0, limit=0xFFFFF, typ=0xA, s=1, dpl=0, p=1, l=0, db=1, g=1) -> int:
    lo = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16)
    hi = (typ << 8) | (s << 12) | (dpl << 13) | (p << 15) | (limit & 0xF0000) | (l << 21) | (db << 22) | \
         (g << 23) | (base & 0xFF000000)
    return lo | (hi << 32)


class Cpu:
    """The DeliveryCpu protocol over a bytearray: registers, segment caches, faults on demand."""

    def __init__(self, long_mode: bool, cpl: int = 0):
        self.long_mode = long_mode
        self.mem = bytearray(0x10000)
        self.regs = {"rip": 0x4000, "rsp": STACK3 if cpl == 3 else 0x8800, "rflags": 0x202 | D.TF}
        cs = UCODE if cpl == 3 else KCODE64 if long_mode else KCODE32
        ss = UDATA if cpl == 3 else KDATA
        self.segs = {"cs": (cs, 0, 0xFFFFFFFF, cpl << 13), "ss": (ss, 0, 0xFFFFFFFF, cpl << 13),
                     "gdt": (0, GDT, 0x3F, 0), "idt": (0, IDT, 0xFFF, 0), "tr": (0x30, TSS, 0x67, 0),
                     "ldt": (0, 0, 0, 0)}
        self.cr2 = None
        self.entered = None
        self.unmapped: set[int] = set()       # pages whose accesses raise #PF
        for sel, d in ((KCODE64, desc(l=1, db=0)), (KDATA, desc(typ=2)), (KCODE32, desc()),
                       (UCODE & ~3, desc(dpl=3, l=int(long_mode), db=int(not long_mode))),
                       (UDATA & ~3, desc(typ=2, dpl=3))):
            self.put(GDT + sel, d, 8)
        if long_mode:
            self.put(TSS + 4, STACK0, 8)                 # RSP0
            self.put(TSS + 0x24, 0x5008, 8)              # IST1 (not 16-byte aligned on purpose)
        else:
            self.put(TSS + 4, STACK0, 4)                 # ESP0
            self.put(TSS + 8, KDATA, 2)                  # SS0

    def put(self, addr, value, size):
        self.mem[addr:addr + size] = value.to_bytes(size, "little")

    def gate(self, vector, offset=0x6000, sel=None, typ=0xE, dpl=0, p=1, ist=0):
        sel = sel if sel is not None else (KCODE64 if self.long_mode else KCODE32)
        lo = (offset & 0xFFFF) | (sel << 16) | (ist << 32) | (typ << 40) | (dpl << 45) | (p << 47) | \
             ((offset >> 16) & 0xFFFF) << 48
        if self.long_mode:
            self.put(IDT + 16 * vector, lo, 8)
            self.put(IDT + 16 * vector + 8, offset >> 32, 8)
        else:
            self.put(IDT + 8 * vector, lo, 8)

    def _check(self, vaddr, size, write):
        for a in (vaddr, vaddr + size - 1):
            if a >> 12 in self.unmapped:
                raise PageFault(a, 2 if write else 0)

    def read_linear(self, vaddr, size):
        self._check(vaddr, size, False)
        return int.from_bytes(self.mem[vaddr:vaddr + size], "little")

    def write_linear(self, vaddr, value, size):
        self._check(vaddr, size, True)
        self.put(vaddr, value, size)

    def cpl(self):
        return self.segs["ss"][3] >> 13 & 3

    def reg(self, name):
        return self.regs[name]

    def segment(self, which):
        return self.segs[which]

    def set_cr2(self, value):
        self.cr2 = value

    def enter_handler(self, *, cs, ss, rsp, rip, rflags):
        self.entered = dict(cs=cs, ss=ss, rsp=rsp, rip=rip, rflags=rflags)

    def stack(self, rsp, n, width):
        return [int.from_bytes(self.mem[rsp + i * width:rsp + (i + 1) * width], "little") for i in range(n)]


def test_ia32e_fault_from_ring3_switches_to_rsp0_and_pushes_the_frame():
    c = Cpu(True, cpl=3)
    c.gate(14, offset=0xFFFF800000006000)
    D.deliver(c, 14, 0x6, cr2=0x1234)
    e = c.entered
    assert c.cr2 == 0x1234
    assert e["rip"] == 0xFFFF800000006000 and e["cs"][0] == KCODE64 and e["ss"] == (0, 0, 0, 0)
    assert e["rsp"] == STACK0 - 6 * 8
    # error code, RIP, CS, RFLAGS, RSP, SS from the lowest address up
    assert c.stack(e["rsp"], 6, 8) == [0x6, 0x4000, UCODE, 0x202 | D.TF, STACK3, UDATA]
    assert e["rflags"] == 0x2          # interrupt gate: IF cleared; TF cleared


def test_ia32e_trap_gate_keeps_if_and_same_privilege_aligns_the_stack():
    c = Cpu(True, cpl=0)
    c.regs["rsp"] = 0x8808              # not 16-byte aligned
    c.gate(0x80, typ=0xF)
    D.deliver(c, 0x80, software=True)
    e = c.entered
    assert e["rsp"] == 0x8800 - 5 * 8 and e["ss"] is None
    assert c.stack(e["rsp"], 5, 8) == [0x4000, KCODE64, 0x202 | D.TF, 0x8808, KDATA]
    assert e["rflags"] == 0x202         # trap gate: IF kept


def test_ist_stack_is_used_and_aligned():
    c = Cpu(True, cpl=0)
    c.gate(8, ist=1)
    D.deliver(c, 8, 0)
    assert c.entered["rsp"] == 0x5000 - 6 * 8


def test_int_n_from_ring3_through_a_dpl0_gate_is_gp_naming_the_gate():
    c = Cpu(True, cpl=3)
    c.gate(0x80, dpl=0)
    c.gate(13, offset=0x6100)
    D.deliver(c, 0x80, software=True)
    e = c.entered
    assert e["rip"] == 0x6100
    # #GP's error code: the IDT vector (vector*8 + 2), EXT=0 for a software interrupt
    assert c.stack(e["rsp"], 1, 8) == [0x80 * 8 + 2]


def test_not_present_gate_is_np_with_ext_for_an_exception():
    c = Cpu(True, cpl=0)
    c.gate(6, p=0)                      # #UD is benign: its gate's #NP is delivered
    c.gate(11, offset=0x6200)
    D.deliver(c, 6)
    assert c.entered["rip"] == 0x6200 and c.stack(c.entered["rsp"], 1, 8) == [6 * 8 + 2 + 1]


def test_contributory_then_np_is_a_double_fault():
    c = Cpu(True, cpl=0)
    c.gate(0, p=0)                      # #DE, then #NP: both contributory (SDM table 6-5)
    c.gate(8, offset=0x6250)
    D.deliver(c, 0)
    assert c.entered["rip"] == 0x6250 and c.stack(c.entered["rsp"], 1, 8) == [0]


def test_pf_while_delivering_pf_is_a_double_fault():
    c = Cpu(True, cpl=3)
    c.gate(14)
    c.gate(8, offset=0x6300, ist=1)
    c.unmapped.add(STACK0 - 8 >> 12)     # the RSP0 stack is not mapped
    D.deliver(c, 14, 0x4, cr2=0x1000)
    assert c.entered["rip"] == 0x6300 and c.stack(c.entered["rsp"], 1, 8) == [0]


def test_pf_while_delivering_a_benign_exception_delivers_the_pf():
    c = Cpu(True, cpl=3)
    c.gate(6)
    c.gate(14, offset=0x6400, ist=1)
    c.unmapped.add(STACK0 - 8 >> 12)
    D.deliver(c, 6)
    assert c.entered["rip"] == 0x6400 and c.cr2 == STACK0 - 8


def test_fault_while_delivering_df_is_a_triple_fault():
    c = Cpu(True, cpl=0)
    c.gate(13, p=0)                     # #GP -> #NP (gate not present): contributory twice -> #DF
    c.gate(8, p=0)
    with pytest.raises(D.TripleFault) as ei:
        D.deliver(c, 13, 0)
    assert ei.value.chain == ["#GP", "#NP", "#DF", "#NP"]
    assert "RIP 0x4000" in str(ei.value)


def test_protected_mode_privilege_change_loads_ss0_esp0():
    c = Cpu(False, cpl=3)
    c.gate(14, offset=0x6500)
    D.deliver(c, 14, 0x5, cr2=0x2000)
    e = c.entered
    assert e["ss"][0] == KDATA and e["rsp"] == STACK0 - 6 * 4
    assert c.stack(e["rsp"], 6, 4) == [0x5, 0x4000, UCODE, 0x202 | D.TF, STACK3, UDATA]
    assert e["cs"][1:3] == (0, 0xFFFFFFFF)          # base and G-scaled limit from the descriptor


def test_protected_mode_same_privilege_pushes_three_words():
    c = Cpu(False, cpl=0)
    c.gate(0x30, offset=0x6600)
    D.deliver(c, 0x30, software=True)
    assert c.stack(c.entered["rsp"], 3, 4) == [0x4000, KCODE32, 0x202 | D.TF] and c.entered["ss"] is None


def test_gate_beyond_the_idt_limit_is_gp():
    c = Cpu(True, cpl=0)
    c.segs["idt"] = (0, IDT, 16 * 20 - 1, 0)      # vectors 0..19
    c.gate(13, offset=0x6700)
    D.deliver(c, 20)                               # #VE (benign) has no gate: #GP naming it
    assert c.entered["rip"] == 0x6700 and c.stack(c.entered["rsp"], 1, 8) == [20 * 8 + 2 + 1]


def test_a_gate_to_a_32bit_code_segment_in_long_mode_is_gp():
    c = Cpu(True, cpl=0)
    c.gate(3, sel=KCODE32)
    c.gate(13, offset=0x6800)
    D.deliver(c, 3, software=True)
    assert c.entered["rip"] == 0x6800 and c.stack(c.entered["rsp"], 1, 8) == [KCODE32]
