"""Event delivery in software: what the CPU does between an exception (or INT n)
and the first instruction of its handler (SDM vol. 3A §6.12-6.15).

Unicorn never delivers an event to the guest's IDT: every exception reaches a
hook with its vector.  A hypervisor model built on it must do the delivery
itself, as the hardware would: read the gate, check it, switch stacks on a
privilege change, push the frame, load CS:RIP.  ``deliver`` does that for
IA-32e mode (16-byte gates, TSS.RSPn or IST, 16-byte aligned frames) and for
32-bit protected mode (8-byte gates, TSS.SS0:ESP0), and applies the
double-fault table (§6.15, table 6-5) to a fault raised while delivering.

The CPU it works on is any object with the ``DeliveryCpu`` methods below; the
real vCPU provides them over unicorn (guest linear memory through the guest's
own page tables, segment caches through the saved context).
"""

from __future__ import annotations

from typing import Protocol

from ..x86.faults import PageFault

# vectors
DE, DB, NMI, BP, OF, BR, UD, NM, DF = range(9)
TS, NP, SS_FAULT, GP, PF = range(10, 15)
VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
                19: "#XM", 20: "#VE", 21: "#CP"}
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})

# RFLAGS bits delivery clears
TF, IF, NT, RF, VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17


class TripleFault(Exception):
    """A fault while delivering #DF: the processor shuts down."""

    def __init__(self, chain: list[str], rip: int):
        super().__init__(f"triple fault: {chain[0]} at RIP {rip:#x} could not be delivered "
                         f"({' -> '.join(chain)}); the CPU shuts down")
        self.chain, self.rip = chain, rip


class DeliveryFault(Exception):
    """A fault raised by the delivery itself (bad gate, bad segment, stack fault)."""

    def __init__(self, vector: int, error_code: int, cr2: int | None = None):
        super().__init__(vector, error_code)
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class DeliveryCpu(Protocol):
    long_mode: bool               # EFER.LMA

    def read_linear(self, vaddr: int, size: int) -> int: ...          # supervisor, may raise PageFault
    def write_linear(self, vaddr: int, value: int, size: int) -> None: ...
    def cpl(self) -> int: ...
    def reg(self, name: str) -> int: ...                               # rip, rsp, rflags
    def segment(self, which: str) -> tuple[int, int, int, int]: ...  # selector, base, limit, flags
    def set_cr2(self, value: int) -> None: ...
    def enter_handler(self, *, cs: tuple, ss: tuple | None, rsp: int, rip: int, rflags: int) -> None: ...


def _descriptor(cpu: DeliveryCpu, selector: int, ext: int) -> tuple[int, int]:
    """(low, high) dwords of the GDT/LDT descriptor of ``selector``; #GP(selector) if
    it lies beyond the table's limit."""
    table = "ldt" if selector & 4 else "gdt"
    _, base, limit, _ = cpu.segment(table)
    index = selector & ~7
    if selector & ~3 == 0 or index + 7 > limit:
        raise DeliveryFault(GP, (selector & ~3) | ext)
    value = cpu.read_linear(base + index, 8)
    return value & 0xFFFFFFFF, value >> 32


def _seg_cache(selector: int, low: int, high: int) -> tuple[int, int, int, int]:
    """A segment cache as QEMU keeps it: base and the G-scaled limit from the
    descriptor, flags = the descriptor's high dword (its access bits)."""
    base = (low >> 16) | ((high & 0xFF) << 16) | (high & 0xFF000000)
    limit = (low & 0xFFFF) | (high & 0xF0000)
    if high & (1 << 23):
        limit = (limit << 12) | 0xFFF
    return selector, base, limit, high


def _gate(cpu: DeliveryCpu, vector: int, ext: int, software: bool) -> tuple[int, int, int, int]:
    """(target selector, offset, type, IST) of the IDT gate of ``vector``, checked."""
    _, idt_base, idt_limit, _ = cpu.segment("idt")
    size = 16 if cpu.long_mode else 8
    code = vector * 8 + 2 + ext              # IDT bit set: the error code names a gate
    if vector * size + size - 1 > idt_limit:
        raise DeliveryFault(GP, code)
    low = cpu.read_linear(idt_base + vector * size, 8)
    gate_type = (low >> 40) & 0xF
    dpl = (low >> 45) & 3
    present = (low >> 47) & 1
    if cpu.long_mode:
        if gate_type not in (0xE, 0xF):
            raise DeliveryFault(GP, code)
        high = cpu.read_linear(idt_base + vector * 16 + 8, 8)
        offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF0000) | ((high & 0xFFFFFFFF) << 32)
    else:
        if gate_type not in (0xE, 0xF):
            # 16-bit gates and task gates: no test kernel here uses them
            raise DeliveryFault(GP, code)
        offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF0000)
    # INT n, INT3, INTO from a less privileged level than the gate allows: #GP (§6.12.1.1)
    if software and dpl < cpu.cpl():
        raise DeliveryFault(GP, code)
    if not present:
        raise DeliveryFault(NP, code)
    return (low >> 16) & 0xFFFF, offset, gate_type, (low >> 32) & 7 if cpu.long_mode else 0


def _deliver_once(cpu: DeliveryCpu, vector: int, error_code: int | None, software: bool, ext: int) -> None:
    selector, offset, gate_type, ist = _gate(cpu, vector, ext, software)
    low, high = _descriptor(cpu, selector, ext)
    dpl = (high >> 13) & 3
    # the target must be a present code segment no less privileged than the CPL
    if not high & (1 << 12) or not high & (1 << 11) or dpl > cpu.cpl():
        raise DeliveryFault(GP, (selector & ~3) | ext)
    if not high & (1 << 15):
        raise DeliveryFault(NP, (selector & ~3) | ext)
    if cpu.long_mode and not (high >> 21) & 1:
        raise DeliveryFault(GP, (selector & ~3) | ext)        # IA-32e gates need a 64-bit code segment
    old_cpl = cpu.cpl()
    rip, rsp, rflags = cpu.reg("rip"), cpu.reg("rsp"), cpu.reg("rflags")
    old_ss = cpu.segment("ss")[0]
    old_cs = cpu.segment("cs")[0]
    _, tss_base, tss_limit, _ = cpu.segment("tr")
    new_ss = None
    if cpu.long_mode:
        if ist:
            new_rsp = cpu.read_linear(tss_base + 0x24 + 8 * (ist - 1), 8)
        elif dpl < old_cpl:
            new_rsp = cpu.read_linear(tss_base + 4 + 8 * dpl, 8)
        else:
            new_rsp = rsp
        if dpl < old_cpl:
            new_ss = (dpl, 0, 0, dpl << 13)                # a null SS with RPL = the new CPL
        new_rsp &= ~0xF
        frame = [old_ss, rsp, rflags, old_cs, rip]
        if error_code is not None:
            frame.append(error_code)
        width = 8
        mask = (1 << 64) - 1
    else:
        width = 4
        mask = 0xFFFFFFFF
        if dpl < old_cpl:
            if 8 * dpl + 12 > tss_limit:
                raise DeliveryFault(TS, (cpu.segment("tr")[0] & ~3) | ext)
            new_rsp = cpu.read_linear(tss_base + 4 + 8 * dpl, 4)
            ss_sel = cpu.read_linear(tss_base + 8 + 8 * dpl, 2)
            ss_low, ss_high = _descriptor(cpu, ss_sel, ext)
            # SS must be a writable data segment with DPL = RPL = the new CPL
            if (ss_sel & 3) != dpl or (ss_high >> 13) & 3 != dpl or ss_high & (1 << 11) or not ss_high & (1 << 9):
                raise DeliveryFault(TS, (ss_sel & ~3) | ext)
            if not ss_high & (1 << 15):
                raise DeliveryFault(SS_FAULT, (ss_sel & ~3) | ext)
            new_ss = _seg_cache(ss_sel, ss_low, ss_high)
            frame = [old_ss, rsp & mask, rflags & mask, old_cs, rip & mask]
        else:
            new_rsp = rsp
            frame = [rflags & mask, old_cs, rip & mask]
        if error_code is not None:
            frame.append(error_code)
    # push, highest address first (a fault here is a fault during delivery)
    sp = new_rsp
    for value in frame:
        sp = (sp - width) & mask
        cpu.write_linear(sp, value & mask, width)
    cleared = TF | NT | RF | VM | (IF if gate_type == 0xE else 0)
    cs_cache = _seg_cache((selector & ~3) | dpl, low, high)
    cpu.enter_handler(cs=cs_cache, ss=new_ss, rsp=sp, rip=offset, rflags=rflags & ~cleared)


def deliver(cpu: DeliveryCpu, vector: int, error_code: int | None = None, *, software: bool = False,
            cr2: int | None = None) -> None:
    """Deliver ``vector`` to the guest.  ``software``: INT n / INT3 / INTO (the gate's
    DPL is checked, no error code).  ``cr2``: set with a #PF.  A fault while
    delivering follows the double-fault table; a fault while delivering #DF raises
    TripleFault."""
    if error_code is None and vector in HAS_ERROR_CODE and not software:
        error_code = 0
    rip = cpu.reg("rip")
    chain = [_name(vector)]
    ext = 0 if software else 1
    while True:
        try:
            if cr2 is not None:
                cpu.set_cr2(cr2)
            _deliver_once(cpu, vector, error_code, software, ext)
            return
        except PageFault as pf:
            second, second_code, second_cr2 = PF, pf.error_code, pf.address
        except DeliveryFault as f:
            second, second_code, second_cr2 = f.vector, f.error_code, f.cr2
        chain.append(_name(second))
        if vector == DF:
            raise TripleFault(chain, rip)
        # SDM table 6-5: contributory after contributory, or #PF/contributory after #PF: #DF
        if (vector in CONTRIBUTORY and second in CONTRIBUTORY) or (vector == PF and (second == PF
                                                                                   or second in CONTRIBUTORY)):
            vector, error_code, cr2 = DF, 0, None
            chain.append(_name(DF))
        else:
            vector, error_code, cr2 = second, second_code, second_cr2
        software, ext = False, 1


def _name(vector: int) -> str:
    return VECTOR_NAMES.get(vector, f"vector {vector:#x}")
