"""The hidden state of unicorn's x86 CPU, reached through a saved context.

Unicorn's register API reaches the general registers, RIP, RFLAGS and the
control registers, but not what a hypervisor must set to deliver an event or
start a multiboot kernel: segment caches, CPL (QEMU's ``hflags``), the TR
cache, and the bookkeeping QEMU keeps about the exception it is raising
(``error_code``, ``exception_is_int``, ``old_exception``).  ``bytes(context)``
of a saved context is a 40-byte header followed by QEMU's ``CPUX86State``;
the offsets below were found by experiment on unicorn 2.1.4 (REFERENCE.md §6)
and ``check_layout`` re-derives what it can at start-up, because a wrong
offset would silently corrupt a run.

``HiddenState`` edits one persistent context in place (ctypes views on its
bytes): ``load()`` copies the CPU into it, the accessors read and write it,
``store()`` copies it back into the CPU (about a microsecond each way).
"""

from __future__ import annotations

import ctypes

import unicorn as uc_mod
import unicorn.x86_const as X

HEADER = 40
OFF_REGS = 0
OFF_EIP = 128
OFF_EFLAGS = 136
OFF_HFLAGS = 176
OFF_SEGS = 184          # ES, CS, SS, DS, FS, GS: 24 bytes each (selector, base, limit, flags)
OFF_LDT, OFF_TR, OFF_GDT, OFF_IDT = 328, 352, 376, 400
OFF_CR = 424            # CR0..CR8, 8 bytes each
OFF_EFER = 592
OFF_PKRU = 5304
OFF_ERROR_CODE = 5384
OFF_EXCEPTION_IS_INT = 5388
OFF_OLD_EXCEPTION = 5496

ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# QEMU's hflags bits (target/i386/cpu.h)
HF_CPL_MASK = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15

# descriptor flag bits as QEMU keeps them in a segment cache (the descriptor's high dword)
DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23


class LayoutError(RuntimeError):
    """The unicorn release does not keep its CPU state where this module expects."""


class HiddenState:
    """One persistent saved context of ``uc`` and typed views on its fields."""

    def __init__(self, uc):
        self.uc = uc
        self.ctx = uc.context_save()
        size = self.ctx.size
        if size < HEADER + OFF_OLD_EXCEPTION + 4:
            raise LayoutError(f"unicorn's saved context is {size} bytes, too small for QEMU's CPUX86State "
                              f"as unicorn 2.1.4 lays it out")
        base = ctypes.cast(self.ctx.context, ctypes.c_void_p).value + HEADER
        self.base = base
        self._hflags = ctypes.c_uint32.from_address(base + OFF_HFLAGS)
        self._error_code = ctypes.c_int32.from_address(base + OFF_ERROR_CODE)
        self._is_int = ctypes.c_int32.from_address(base + OFF_EXCEPTION_IS_INT)
        self._old_exception = ctypes.c_int32.from_address(base + OFF_OLD_EXCEPTION)

    # --- moving the state between the CPU and the context ---------------------------
    def load(self) -> HiddenState:
        self.uc.context_update(self.ctx)
        return self

    def store(self) -> None:
        self.uc.context_restore(self.ctx)

    # --- fields ----------------------------------------------------------------
    @property
    def hflags(self) -> int:
        return self._hflags.value

    @hflags.setter
    def hflags(self, v: int) -> None:
        self._hflags.value = v

    @property
    def efer(self) -> int:
        return ctypes.c_uint64.from_address(self.base + OFF_EFER).value

    @efer.setter
    def efer(self, v: int) -> None:
        ctypes.c_uint64.from_address(self.base + OFF_EFER).value = v

    @property
    def cr2(self) -> int:
        return ctypes.c_uint64.from_address(self.base + OFF_CR + 16).value

    @cr2.setter
    def cr2(self, v: int) -> None:
        ctypes.c_uint64.from_address(self.base + OFF_CR + 16).value = v

    @property
    def eflags(self) -> int:
        """EFLAGS without the arithmetic flags, which QEMU computes lazily (AC, TF, IF are here)."""
        return ctypes.c_uint64.from_address(self.base + OFF_EFLAGS).value

    @property
    def pkru(self) -> int:
        """PKRU (the register API has no name for it in unicorn 2.1.4)."""
        return ctypes.c_uint32.from_address(self.base + OFF_PKRU).value

    @property
    def cpl(self) -> int:
        return self._hflags.value & HF_CPL_MASK

    @property
    def error_code(self) -> int:
        return self._error_code.value & 0xFFFFFFFF

    @property
    def exception_is_int(self) -> bool:
        return bool(self._is_int.value)

    @property
    def old_exception(self) -> int:
        return self._old_exception.value

    def clear_old_exception(self) -> None:
        """The event was handled outside QEMU: forget it, or QEMU's double-fault
        logic would turn the next #PF/#GP into a #DF."""
        self._old_exception.value = -1

    def segment(self, which: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of ES..GS (0..5), or of LDT/TR/GDT/IDT by offset."""
        a = self._segment_address(which)
        return (ctypes.c_uint32.from_address(a).value, ctypes.c_uint64.from_address(a + 8).value,
                ctypes.c_uint32.from_address(a + 16).value, ctypes.c_uint32.from_address(a + 20).value)

    def set_segment(self, which: int, selector: int, base: int, limit: int, flags: int) -> None:
        a = self._segment_address(which)
        ctypes.c_uint32.from_address(a).value = selector
        ctypes.c_uint64.from_address(a + 8).value = base
        ctypes.c_uint32.from_address(a + 16).value = limit
        ctypes.c_uint32.from_address(a + 20).value = flags

    def _segment_address(self, which: int) -> int:
        """ES..GS are 0..5; LDT/TR/GDT/IDT are named by their offsets (OFF_LDT, ...)."""
        return self.base + (OFF_SEGS + 24 * which if which < 6 else which)

    def recompute_segment_hflags(self) -> None:
        """CPL, CS32/SS32/CS64 and ADDSEG from the CS and SS caches, as QEMU's
        ``cpu_x86_load_seg_cache`` derives them after a segment load."""
        h = self._hflags.value
        cs_flags = self.segment(CS)[3]
        ss_flags = self.segment(SS)[3]
        h &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG)
        h |= (ss_flags >> DESC_DPL_SHIFT) & 3
        if h & HF_LMA and cs_flags & DESC_L:
            h |= HF_CS32 | HF_SS32 | HF_CS64
        else:
            if cs_flags & DESC_B:
                h |= HF_CS32
            if ss_flags & DESC_B:
                h |= HF_SS32
            if not h & HF_PE or not h & HF_CS32:
                h |= HF_ADDSEG
            elif self.segment(DS)[1] | self.segment(ES)[1] | self.segment(SS)[1]:
                h |= HF_ADDSEG
        self._hflags.value = h


_checked = False


def check_layout() -> None:
    """Once per process (the result cannot change): ``_probe_layout``."""
    global _checked
    if not _checked:
        _probe_layout()
        _checked = True


def _probe_layout() -> None:
    """Provoke known state in a scratch engine and check the offsets against it:
    the register fields against the register API, ``error_code``/``exception_is_int``/
    ``old_exception`` against a #GP with a known error code and an INT n.
    Raises LayoutError naming the first field found elsewhere."""
    uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_32)
    uc.ctl_set_cpu_model(X.UC_CPU_X86_ICELAKE_SERVER)
    uc.mem_map(0, 0x2000)
    # mov ax, 0x1234 ; mov ds, ax   (#GP(0x1234): selector & 0xfffc, beyond the GDT limit) ; int 0x21
    uc.mem_write(0x1000, bytes.fromhex("66b83412" "8ed8" "cd21" "f4"))
    # xor ecx, ecx ; xor edx, edx ; mov eax, 0x5555000c ; wrpkru ; hlt  (CR4.PKE set below)
    uc.mem_write(0x1100, bytes.fromhex("31c9" "31d2" "b80c005555" "0f01ef" "f4"))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x100, 0x17, 0))
    uc.reg_write(X.UC_X86_REG_EAX, 0x5A5A1234)
    uc.reg_write(X.UC_X86_REG_CR4, 0x200)
    uc.reg_write(X.UC_X86_REG_CR2, 0x12345000)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x40002)           # AC
    st = HiddenState(uc).load()
    found = []

    def expect(name, got, want):
        if got != want:
            raise LayoutError(f"unicorn {uc_mod.__version__}: {name} reads {got:#x} at its offset, expected "
                              f"{want:#x}: this release lays out QEMU's CPU state differently from 2.1.4")

    expect("EAX", ctypes.c_uint32.from_address(st.base + OFF_REGS).value, 0x5A5A1234)
    expect("CR4", ctypes.c_uint64.from_address(st.base + OFF_CR + 32).value, 0x200)
    expect("GDTR.limit", st.segment(OFF_GDT)[2], 0x17)
    expect("EFER", ctypes.c_uint64.from_address(st.base + OFF_EFER).value, uc.msr_read(0xC0000080))
    expect("CR2", st.cr2, 0x12345000)
    # unicorn's 32-bit mode starts in flat protected mode at CPL 0
    expect("hflags (PE, CS32, SS32, CPL)", st.hflags & (HF_PE | HF_CS32 | HF_SS32 | HF_CPL_MASK),
           HF_PE | HF_CS32 | HF_SS32)
    expect("EFLAGS.AC", st.eflags & 0x40000, 0x40000)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)

    def on_intr(u, intno, _):
        st.load()
        found.append((intno, st.error_code, st.exception_is_int, st.old_exception,
                      ctypes.c_uint32.from_address(st.base + OFF_EIP).value))
        st.clear_old_exception()
        st.store()
        u.emu_stop()

    uc.reg_write(X.UC_X86_REG_CR4, 0x200 | 1 << 22)
    uc.emu_start(0x1100, 0x1fff, count=4)
    expect("PKRU", st.load().pkru, 0x5555000C)
    uc.reg_write(X.UC_X86_REG_CR4, 0x200)
    h = uc.hook_add(uc_mod.UC_HOOK_INTR, on_intr)
    uc.emu_start(0x1000, 0x1fff, count=3)
    uc.emu_start(0x1006, 0x1fff, count=2)
    uc.hook_del(h)
    if len(found) != 2:
        raise LayoutError(f"unicorn {uc_mod.__version__}: the layout probe saw {len(found)} events, expected 2")
    (v1, ec1, int1, old1, eip1), (v2, _, int2, _, eip2) = found
    expect("the probe's first vector", v1, 13)
    expect("error_code", ec1, 0x1234)
    expect("exception_is_int of a fault", int1, 0)
    expect("old_exception after a #GP", old1, 13)
    expect("EIP of a fault", eip1, 0x1004)
    expect("the probe's second vector", v2, 0x21)
    expect("exception_is_int of INT n", int2, 1)
    expect("EIP after INT n", eip2, 0x1008)
