"""QEMU's x86 MMU as an oracle: perform ONE memory access and report what happened.

The access is a real instruction executed by QEMU's emulated CPU (through the
``unicorn`` package, QEMU 5.0 inside) at the requested CPL, with the requested
control registers, so the translation, the permission checks, the #PF error
code and the accessed/dirty bits all come from QEMU's page walker
(``handle_mmu_fault`` in ``target/i386/excp_helper.c``), not from this module.

Harness and reservations (the caller must respect them)
--------------------------------------------------------
The instruction performing the access, the code that switches to CPL3 (an
IRET from a CPL0 stub), the GDT and the IRET frame live in a few *harness*
pages.  With paging on they are fetched through the caller's page tables, so
the oracle links its own page-table subtree into ONE reserved slot of the
caller's top-level table for the duration of the run, and puts the slot's
original bytes back before reporting ``memory``:

============  ===========================  ===================================
paging mode   reserved top-level slot      reserved virtual range
============  ===========================  ===================================
off           (none)                       none (harness code runs at its
                                           physical address, see below)
32-bit        PDE 1023 (``cr3 + 0xffc``)   ``0xffc00000 .. 0xffffffff``
PAE           PDPTE 3 (``(cr3 & ~0x1f)     ``0xc0000000 .. 0xffffffff``
              + 0x18``)
4-level       PML4E 511 (``pml4 + 0xff8``) ``0xffffff8000000000 .. 2**64-1``
5-level       PML5E 511 (``pml5 + 0xff8``) ``0xffff000000000000 .. 2**64-1``
============  ===========================  ===================================

* The slot must be *not present* (bit 0 clear) in the caller's top-level
  table, the top-level table must be one of the caller's ``pages``, ``vaddr``
  (and ``vaddr + size - 1``) must lie outside the reserved virtual range, and
  the caller's walk of ``vaddr`` must not read the slot (i.e. the top-level
  table page must not double as a lower-level table at that index).  A
  violation of the first three raises ``ValueError``.
* Physical frames ``[HARNESS_PHYS_BASE, HARNESS_PHYS_END)`` (the 4 MiB just
  below 4 GiB) belong to the oracle: no caller page may lie there and no
  caller entry may point there.  Any other physical frame, including frames
  above 4 GiB (PSE-36, PAE, long mode), may be used by the caller.
* Harness code runs at virtual ``HARNESS_VIRT_BASE`` (32-bit engine, also the
  physical address, so the same code serves paging off) or
  ``HARNESS_VIRT_BASE_64`` (long-mode engine).  All harness entries have
  A=1 (and D=1 on leaves), U=1 on every non-leaf level, NX=0 and pkey 0, so
  QEMU never writes to a caller page because of the harness and SMEP, SMAP,
  NX and PKU of the caller's configuration do not hinder it: CPL0 code runs
  from a supervisor page, CPL3 code from a user page, the GDT and the IRET
  frame are in a supervisor page and are only touched at CPL0.

Accesses
--------
``read``/``write`` execute ``mov`` of 1, 2, 4 or 8 bytes at ``[rdi]``/``[edi]``
(8 bytes in the 32-bit engine use MMX ``movq``; to make that possible the
oracle clears CR0.EM and CR0.TS, which play no part in paging).  CR0.PE is
forced on (the harness needs protected mode).  ``fetch`` IRETs to ``vaddr``
with EFLAGS.TF set (so QEMU translates exactly one instruction there) and a
code hook stops the CPU *before* that instruction executes: the oracle only
learns whether the fetch walk succeeded, ``data`` is None.  The bytes at
``vaddr`` must decode as one instruction that does not cross into the next
page (QEMU decodes it while translating); put a one-byte instruction there,
e.g. ``0x90`` (nop), ``0xf4`` (hlt) or ``0xc3`` (ret).  It never executes.

Exceptions are never delivered to a guest IDT: a #PF stops the run and is
reported as ``fault=(cr2, error_code)``; any other exception or emulator
failure is reported in ``other`` (e.g. ``"#GP(0x0)"`` for a non-canonical
address in long mode, ``"unicorn error: Invalid memory read
(UC_ERR_READ_UNMAPPED)"`` when the translation leads to a frame that is not
in ``pages``).  QEMU keeps ``env->error_code`` in the saved CPU context; see
``ERROR_CODE_OFFSET``.

Each call is independent: the caller's pages are (re)written, pages of the
previous call that are absent are unmapped, a clean CPU context (no pending
exception, so no #DF) is restored, the control registers are written in the
order CR4, EFER, CR3, CR0, and QEMU's TLB (and, for fetches, its translated
code) is flushed.  About 20 000 accesses/s with a handful of pages.

Harness layout (offsets from ``HARNESS_PHYS_BASE`` and from the harness
virtual base; only the first three pages are mapped virtually)::

    +0x0000  supervisor code: wrpkru; iret; CPL0 access instructions
    +0x1000  user code: CPL3 access instructions
    +0x2000  supervisor data: GDT, IRET frame (the CPL0 stack)
    +0x3000  PT   (8-byte entries) mapping the three pages above
    +0x4000  PD   entry 510 -> PT      (PAE: the PDPTE 3 target)
    +0x5000  PDPT entry 511 -> PD      (4-level: the PML4E 511 target)
    +0x6000  PML4 entry 511 -> PDPT    (5-level: the PML5E 511 target)
    +0x7000  PT32 (4-byte entries)     (32-bit: the PDE 1023 target)

QEMU behaviour worth knowing when comparing with the SDM (QEMU 5.0 in
unicorn 2.1.4, Icelake-Server model, MAXPHYADDR 40):

* A is set on every non-leaf entry the walk passes, also when the walk then
  faults at a lower level.
* A 1 GiB PDPTE leaf gains A even when the access then faults (protection
  or reserved bit); 2 MiB/4 MiB/4 KiB leaves stay untouched on a fault.
* PAE PDPTEs are read on every walk, not at CR3 load; their reserved bits
  2:1 and 8:5 are ignored, and bits >= MAXPHYADDR or bit 63 give a #PF with
  RSVD instead of a #GP at MOV CR3.
* A page-crossing access whose second page faults first sets A (and D for a
  write) on the first page's leaf, then faults with CR2 = the second page;
  nothing is written.
* A paging-structure entry that points to a frame not in ``pages`` reads as
  0 (not present); no error is reported for it.
* No #AC: a misaligned CPL3 access with CR0.AM=1 and EFLAGS.AC=1 succeeds.
* The engine runs the Icelake-Server model (1 GiB pages, LA57, PKU, SMEP,
  SMAP); on unicorn's default model CR4.SMAP would be silently ignored.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INTR,
    UC_MODE_32,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import unicorn_const as _uc_const
from unicorn import x86_const as _x86

__all__ = [
    "OracleOutcome",
    "QemuMmu",
    "HARNESS_PHYS_BASE",
    "HARNESS_PHYS_END",
    "HARNESS_VIRT_BASE",
    "HARNESS_VIRT_BASE_64",
    "RESERVED_SLOT",
    "RESERVED_VIRT",
    "ERROR_CODE_OFFSET",
    "paging_mode",
    "derive_error_code_offset",
]

PAGE = 0x1000

# --------------------------------------------------------------------------
# Reservations
# --------------------------------------------------------------------------

#: First physical address owned by the oracle (the harness frames).
HARNESS_PHYS_BASE = 0xFFC0_0000
#: End (exclusive) of the physical window owned by the oracle.
HARNESS_PHYS_END = 0x1_0000_0000
#: Virtual base of the harness for the 32-bit engine (paging off, 32-bit, PAE).
HARNESS_VIRT_BASE = 0xFFC0_0000
#: Virtual base of the harness for the long-mode engine (4- and 5-level).
HARNESS_VIRT_BASE_64 = 0xFFFF_FFFF_FFC0_0000

#: paging mode -> (byte offset of the reserved slot in the top-level table,
#:                 entry size in bytes)
RESERVED_SLOT = {
    "32bit": (1023 * 4, 4),
    "pae": (3 * 8, 8),
    "4level": (511 * 8, 8),
    "5level": (511 * 8, 8),
}
#: paging mode -> (first, last) virtual address the caller must not access.
RESERVED_VIRT = {
    "32bit": (0xFFC0_0000, 0xFFFF_FFFF),
    "pae": (0xC000_0000, 0xFFFF_FFFF),
    "4level": (0xFFFF_FF80_0000_0000, 0xFFFF_FFFF_FFFF_FFFF),
    "5level": (0xFFFF_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF),
}

# Harness frames (offsets from HARNESS_PHYS_BASE); the first three are also
# mapped virtually at the same offsets from the harness virtual base.
_S_CODE = 0x0000  # supervisor code: wrpkru; iret; CPL0 access instructions
_U_CODE = 0x1000  # user code: CPL3 access instructions
_S_DATA = 0x2000  # supervisor data: GDT at +0, IRET frame at +_FRAME
_PT = 0x3000  # 8-byte-entry page table mapping the three pages above
_PD = 0x4000  # 8-byte page directory, entry 510 -> _PT
_PDPT = 0x5000  # 4-level PDPT, entry 511 -> _PD
_PML4 = 0x6000  # PML4 used under the caller's PML5 (5-level), entry 511 -> _PDPT
_PT32 = 0x7000  # 4-byte-entry page table (32-bit paging)
_HARNESS_SIZE = 0x8000
_FRAME = 0xF00  # offset of the IRET frame inside _S_DATA

_OFF_WRPKRU = 0x000
_OFF_IRET = 0x003
_OFF_FETCH_UNTIL = 0x801  # `until` of fetch runs (never page-aligned)

# GDT selectors
_SEL_KCODE64 = 0x08
_SEL_KDATA = 0x10
_SEL_KCODE32 = 0x18
_SEL_UCODE32 = 0x23
_SEL_UDATA = 0x2B
_SEL_UCODE64 = 0x33
_GDT = (
    0,
    0x00AF9B000000FFFF,  # 0x08 kernel code, 64-bit (L=1), accessed
    0x00CF93000000FFFF,  # 0x10 kernel data, flat 4 GiB, accessed
    0x00CF9B000000FFFF,  # 0x18 kernel code, 32-bit, accessed
    0x00CFFB000000FFFF,  # 0x20 user code, 32-bit, DPL3, accessed
    0x00CFF3000000FFFF,  # 0x28 user data, DPL3, accessed
    0x00AFFB000000FFFF,  # 0x30 user code, 64-bit, DPL3, accessed
)

# Access instructions, all addressing [rdi] / [edi]: reads load rax/eax,
# writes store rbx/ebx (rax carries PKRU for wrpkru); 8-byte accesses in
# 32-bit mode go through mm0.
_INSN_64 = {
    ("read", 1): b"\x8a\x07",  # mov al, [rdi]
    ("read", 2): b"\x66\x8b\x07",  # mov ax, [rdi]
    ("read", 4): b"\x8b\x07",  # mov eax, [rdi]
    ("read", 8): b"\x48\x8b\x07",  # mov rax, [rdi]
    ("write", 1): b"\x88\x1f",  # mov [rdi], bl
    ("write", 2): b"\x66\x89\x1f",  # mov [rdi], bx
    ("write", 4): b"\x89\x1f",  # mov [rdi], ebx
    ("write", 8): b"\x48\x89\x1f",  # mov [rdi], rbx
}
_INSN_32 = dict(_INSN_64)
_INSN_32[("read", 8)] = b"\x0f\x6f\x07"  # movq mm0, [edi]
_INSN_32[("write", 8)] = b"\x0f\x7f\x07"  # movq [edi], mm0
_INSN_OFFSET = {key: 0x10 + 0x10 * i for i, key in enumerate(sorted(_INSN_64))}

_WRPKRU = b"\x0f\x01\xef"
_IRETQ = b"\x48\xcf"
_IRETD = b"\xcf"

# Entry bits
_P, _W, _U, _A, _D = 0x1, 0x2, 0x4, 0x20, 0x40
_NONLEAF = _P | _W | _U | _A
_LEAF_S = _P | _W | _A | _D
_LEAF_U = _LEAF_S | _U

_CR0_PE, _CR0_EM, _CR0_TS, _CR0_WP = 1 << 0, 1 << 2, 1 << 3, 1 << 16
_CR0_PG = 1 << 31
_CR4_PAE, _CR4_LA57, _CR4_PKE = 1 << 5, 1 << 12, 1 << 22
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
_EFER_MSR = 0xC000_0080
_RFLAGS_FIXED, _RFLAGS_TF, _RFLAGS_AC = 1 << 1, 1 << 8, 1 << 18

_EXC_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD",
    7: "#NM", 8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP",
    14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM",
}
_EXC_WITH_CODE = {8, 10, 11, 12, 13, 14, 17}

#: Offset of QEMU's ``CPUX86State.error_code`` (a 32-bit int) inside the
#: bytes of a unicorn context (``bytes(uc.context_save())``, unicorn's context
#: header included), unicorn 2.1.4, x86.  Found by experiment: 17 page faults
#: with known, distinct error codes (0, 1, 2, 3, 4, 5, 6, 7, 9, 0xf, 0x11, 0x15,
#: 0x21, 0x25, 0x27: not-present, protection, RSVD, NX, SMAP, SMEP, PKU) were
#: provoked in both the 32-bit (PAE) and the long-mode engine, and every byte
#: offset of the context was tested for the expected little-endian int32; 5424
#: was the only offset matching in all of them (``derive_error_code_offset()``
#: repeats that search).  ``QemuMmu`` re-verifies it at construction
#: (``_self_check``: three faults with codes 6, 0, 4 in a row, which also
#: proves that no #DF builds up) and raises RuntimeError if it does not hold.
ERROR_CODE_OFFSET = 5424


def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    """Name the paging mode the control registers select."""
    if not cr0 & _CR0_PG:
        return "off"
    if not cr4 & _CR4_PAE:
        return "32bit"
    if efer & (_EFER_LMA | _EFER_LME):
        return "5level" if cr4 & _CR4_LA57 else "4level"
    return "pae"


@dataclass(frozen=True)
class OracleOutcome:
    """What QEMU did for one access."""

    fault: tuple[int, int] | None  # (cr2, error_code) of a #PF, or None
    data: bytes | None  # bytes read (successful read), else None
    memory: dict[int, bytes]  # pfn -> final 4096 bytes of every caller page
    other: str | None = None  # any non-#PF exception / failure, described


class QemuMmu:
    """One unicorn engine, reused across accesses."""

    def __init__(self, long_mode: bool):
        self.long_mode = bool(long_mode)
        self._mode = UC_MODE_64 if self.long_mode else UC_MODE_32
        self._vbase = HARNESS_VIRT_BASE_64 if self.long_mode else HARNESS_VIRT_BASE
        self._insns = _INSN_64 if self.long_mode else _INSN_32
        uc = Uc(UC_ARCH_X86, self._mode)
        # Must precede the first use of the engine.  On the default model CR4.SMAP
        # reads back set but is not enforced; Icelake-Server (26) has SMAP,
        # SMEP, PKU, NX, 1 GiB pages and LA57.
        uc.ctl_set_cpu_model(_x86.UC_CPU_X86_ICELAKE_SERVER)
        self._uc = uc
        self._mapped: set[int] = set()
        self._build_harness()
        self._intno: int | None = None
        self._fetched = False
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        # Every address outside the harness: only a fetch target runs there.
        uc.hook_add(UC_HOOK_CODE, self._on_code, begin=0, end=self._vbase - 1)
        self._clean = uc.context_save()
        self._scratch = uc.context_save()
        if self._scratch.size < ERROR_CODE_OFFSET + 4:
            raise RuntimeError("unicorn context too small for ERROR_CODE_OFFSET")
        self._err_addr = self._scratch.context.value + ERROR_CODE_OFFSET
        self._self_check()

    # ------------------------------------------------------------------ setup
    def _build_harness(self) -> None:
        uc = self._uc
        base = HARNESS_PHYS_BASE
        uc.mem_map(base, _HARNESS_SIZE)
        fill = b"\xcc" * PAGE  # int3 everywhere else: a stray jump stops as #BP
        for off in (_S_CODE, _U_CODE):
            uc.mem_write(base + off, fill)
        iret = _IRETQ if self.long_mode else _IRETD
        uc.mem_write(base + _S_CODE + _OFF_WRPKRU, _WRPKRU + iret)
        for key, insn in self._insns.items():
            for off in (_S_CODE, _U_CODE):
                uc.mem_write(base + off + _INSN_OFFSET[key], insn)
        uc.mem_write(base + _S_DATA, b"".join(struct.pack("<Q", d) for d in _GDT))
        # 8-byte tables (PAE, 4-level, 5-level)
        pt = struct.pack("<QQQ", base + _S_CODE | _LEAF_S, base + _U_CODE | _LEAF_U,
                         base + _S_DATA | _LEAF_S)
        uc.mem_write(base + _PT, pt)
        uc.mem_write(base + _PD + 510 * 8, struct.pack("<Q", base + _PT | _NONLEAF))
        uc.mem_write(base + _PDPT + 511 * 8, struct.pack("<Q", base + _PD | _NONLEAF))
        uc.mem_write(base + _PML4 + 511 * 8, struct.pack("<Q", base + _PDPT | _NONLEAF))
        # 4-byte table (32-bit paging)
        pt32 = struct.pack("<III", base + _S_CODE | _LEAF_S, base + _U_CODE | _LEAF_U,
                           base + _S_DATA | _LEAF_S)
        uc.mem_write(base + _PT32, pt32)
        # The entry linked into the caller's reserved top-level slot.
        self._slot_entry = {
            "32bit": struct.pack("<I", base + _PT32 | _NONLEAF),
            "pae": struct.pack("<Q", base + _PD | _P),  # PDPTE: only P is allowed
            "4level": struct.pack("<Q", base + _PDPT | _NONLEAF),
            "5level": struct.pack("<Q", base + _PML4 | _NONLEAF),
        }
        gdtr = (0, self._vbase + _S_DATA, len(_GDT) * 8 - 1, 0)
        uc.reg_write(_x86.UC_X86_REG_GDTR, gdtr)
        if not self.long_mode:
            # Paging is off here, so the descriptors are read at the harness's
            # physical address, which equals its virtual address.  DS/ES get a
            # DPL3 data segment so that an IRET to CPL3 keeps them.
            uc.reg_write(_x86.UC_X86_REG_SS, _SEL_KDATA)
            uc.reg_write(_x86.UC_X86_REG_DS, _SEL_UDATA)
            uc.reg_write(_x86.UC_X86_REG_ES, _SEL_UDATA)

    # ------------------------------------------------------------------ hooks
    def _on_intr(self, uc, intno, _user):
        if self._intno is None:
            self._intno = intno
        uc.emu_stop()

    def _on_code(self, uc, address, size, _user):
        self._fetched = True
        uc.emu_stop()

    # ------------------------------------------------------------- the access
    def access(self, pages: dict[int, bytes], *, cr0: int, cr3: int, cr4: int,
               efer: int, cpl: int, ac: bool, pkru: int, vaddr: int, kind: str,
               size: int = 1, value: bytes | None = None) -> OracleOutcome:
        uc = self._uc
        mode = paging_mode(cr0, cr4, efer)
        if self.long_mode != (mode in ("4level", "5level")):
            raise ValueError(f"paging mode {mode!r} needs a QemuMmu(long_mode="
                             f"{not self.long_mode})")
        if cpl not in (0, 3):
            raise ValueError("cpl must be 0 or 3")
        if kind not in ("read", "write", "fetch"):
            raise ValueError(f"bad kind {kind!r}")
        if kind != "fetch" and size not in (1, 2, 4, 8):
            raise ValueError("size must be 1, 2, 4 or 8")
        if kind == "write":
            if value is None or len(value) != size:
                raise ValueError("write needs `value` of `size` bytes")
        addr_mask = (1 << 64) - 1 if self.long_mode else 0xFFFF_FFFF
        if not 0 <= vaddr <= addr_mask:
            raise ValueError(f"vaddr {vaddr:#x} does not fit the engine's address size")
        last = vaddr + (size - 1 if kind != "fetch" else 0)
        if mode == "off":
            lo, hi = HARNESS_PHYS_BASE, HARNESS_PHYS_END - 1
        else:
            lo, hi = RESERVED_VIRT[mode]
        if not (last < lo or vaddr > hi):
            raise ValueError(f"vaddr {vaddr:#x} is in the oracle's reserved range "
                             f"{lo:#x}..{hi:#x}")

        # ---- physical memory
        self._load_pages(pages)
        slot = None
        if mode != "off":
            off, width = RESERVED_SLOT[mode]
            if mode == "pae":
                top = cr3 & 0xFFFF_FFE0
            elif mode == "32bit":
                top = cr3 & 0xFFFF_F000
            else:
                top = cr3 & 0x000F_FFFF_FFFF_F000
            slot_addr = top + off
            if (slot_addr >> 12) not in pages:
                raise ValueError(f"top-level table at {top:#x} is not in `pages`")
            page = pages[slot_addr >> 12]
            o = slot_addr & 0xFFF
            original = bytes(page[o:o + width])
            if original[0] & _P:
                raise ValueError(f"reserved top-level slot {mode} at {slot_addr:#x} "
                                 "is present in the caller's table")
            entry = self._slot_entry[mode]
            uc.mem_write(slot_addr, entry)
            slot = (slot_addr, original, entry)

        # ---- CPU state
        uc.context_restore(self._clean)
        cr0_eff = (cr0 | _CR0_PE) & ~(_CR0_EM | _CR0_TS)
        if self.long_mode:
            uc.reg_write(_x86.UC_X86_REG_CR4, cr4)
            uc.msr_write(_EFER_MSR, efer)
            uc.reg_write(_x86.UC_X86_REG_CR3, cr3)
            uc.reg_write(_x86.UC_X86_REG_CR0, cr0_eff)
        else:
            uc.reg_write(_x86.UC_X86_REG_CR4, cr4 & 0xFFFF_FFFF)
            uc.msr_write(_EFER_MSR, efer)
            uc.reg_write(_x86.UC_X86_REG_CR3, cr3 & 0xFFFF_FFFF)
            uc.reg_write(_x86.UC_X86_REG_CR0, cr0_eff & 0xFFFF_FFFF)
        uc.ctl(_uc_const.UC_CTL_TLB_FLUSH, _uc_const.UC_CTL_IO_WRITE)

        code = self._vbase + (_U_CODE if cpl == 3 else _S_CODE)
        rflags = _RFLAGS_FIXED | (_RFLAGS_AC if ac else 0)
        if kind == "fetch":
            target = vaddr
            until = code + _OFF_FETCH_UNTIL
            rflags |= _RFLAGS_TF
            uc.ctl_flush_tb()  # the bytes at vaddr may have changed
        else:
            target = code + _INSN_OFFSET[(kind, size)]
            until = target + len(self._insns[(kind, size)])
        if self.long_mode:
            cs, ss = (_SEL_UCODE64, _SEL_UDATA) if cpl == 3 else (_SEL_KCODE64, _SEL_KDATA)
            frame = struct.pack("<QQQQQ", target, cs, rflags,
                                self._vbase + _U_CODE + 0x800, ss)
        elif cpl == 3:
            frame = struct.pack("<IIIII", target, _SEL_UCODE32, rflags,
                                self._vbase + _U_CODE + 0x800, _SEL_UDATA)
        else:
            frame = struct.pack("<III", target, _SEL_KCODE32, rflags)
        uc.mem_write(HARNESS_PHYS_BASE + _S_DATA + _FRAME, frame)
        sp = self._vbase + _S_DATA + _FRAME
        reg_sp = _x86.UC_X86_REG_RSP if self.long_mode else _x86.UC_X86_REG_ESP
        reg_di = _x86.UC_X86_REG_RDI if self.long_mode else _x86.UC_X86_REG_EDI
        uc.reg_write(reg_sp, sp)
        uc.reg_write(reg_di, vaddr)
        if kind == "write":
            v = int.from_bytes(value, "little")
            if size == 8 and not self.long_mode:
                # mm0 is the significand of x87 register R0 (unicorn's MM0
                # register id is a no-op in 2.1.4; FP0 works)
                uc.reg_write(_x86.UC_X86_REG_FP0, (v, 0xFFFF))
            elif self.long_mode:
                uc.reg_write(_x86.UC_X86_REG_RBX, v)
            else:
                uc.reg_write(_x86.UC_X86_REG_EBX, v)
        begin = self._vbase + _S_CODE + _OFF_IRET
        if cr4 & _CR4_PKE:
            begin = self._vbase + _S_CODE + _OFF_WRPKRU
            if self.long_mode:
                uc.reg_write(_x86.UC_X86_REG_RAX, pkru & 0xFFFF_FFFF)
                uc.reg_write(_x86.UC_X86_REG_RCX, 0)
                uc.reg_write(_x86.UC_X86_REG_RDX, 0)
            else:
                uc.reg_write(_x86.UC_X86_REG_EAX, pkru & 0xFFFF_FFFF)
                uc.reg_write(_x86.UC_X86_REG_ECX, 0)
                uc.reg_write(_x86.UC_X86_REG_EDX, 0)

        # ---- run
        self._intno = None
        self._fetched = False
        fault = data = other = None
        try:
            uc.emu_start(begin, until)
        except UcError as exc:
            other = f"unicorn error: {exc}"
        intno = self._intno
        if intno is not None:
            if intno == 14:
                cr2 = uc.reg_read(_x86.UC_X86_REG_CR2) & addr_mask
                fault = (cr2, self._error_code())
                if cr2 >= self._vbase and (mode != "off" or cr2 < HARNESS_PHYS_END):
                    # cannot happen with a caller that respects the reservations
                    other = f"#PF({fault[1]:#x}) in the harness at {cr2:#x}"
                    fault = None
            elif other is None:
                name = _EXC_NAMES.get(intno, f"vector {intno}")
                if intno in _EXC_WITH_CODE:
                    name += f"({self._error_code():#x})"
                other = name
        elif other is None:
            if kind == "fetch":
                if not self._fetched:
                    other = "fetch target not reached"
            else:
                pc = uc.reg_read(_x86.UC_X86_REG_RIP if self.long_mode
                                 else _x86.UC_X86_REG_EIP)
                if pc != until:
                    other = f"run ended at {pc:#x}, not after the access"
                elif kind == "read":
                    data = self._read_result(size)

        # ---- report
        if slot is not None:
            slot_addr, original, entry = slot
            if bytes(uc.mem_read(slot_addr, len(entry))) == entry:
                uc.mem_write(slot_addr, original)
        memory = {pfn: bytes(uc.mem_read(pfn << 12, PAGE)) for pfn in pages}
        return OracleOutcome(fault=fault, data=data, memory=memory, other=other)

    # ---------------------------------------------------------------- helpers
    def _load_pages(self, pages: dict[int, bytes]) -> None:
        uc = self._uc
        lo, hi = HARNESS_PHYS_BASE >> 12, HARNESS_PHYS_END >> 12
        for pfn, content in pages.items():
            if lo <= pfn < hi:
                raise ValueError(f"pfn {pfn:#x} is in the oracle's physical window")
            if len(content) != PAGE:
                raise ValueError(f"page {pfn:#x} is not {PAGE} bytes")
        for pfn in self._mapped - pages.keys():
            uc.mem_unmap(pfn << 12, PAGE)
        for pfn in pages.keys() - self._mapped:
            uc.mem_map(pfn << 12, PAGE)
        self._mapped = set(pages)
        for pfn, content in pages.items():
            uc.mem_write(pfn << 12, bytes(content))

    def _read_result(self, size: int) -> bytes:
        uc = self._uc
        if size == 8 and not self.long_mode:
            v = uc.reg_read(_x86.UC_X86_REG_FP0)[0]
        elif self.long_mode:
            v = uc.reg_read(_x86.UC_X86_REG_RAX)
        else:
            v = uc.reg_read(_x86.UC_X86_REG_EAX)
        return (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _context_bytes(self) -> bytes:
        self._uc.context_update(self._scratch)
        return bytes(self._scratch)

    def _error_code(self) -> int:
        self._uc.context_update(self._scratch)
        return ctypes.c_int32.from_address(self._err_addr).value

    def _self_check(self) -> None:
        """Provoke two #PFs with known error codes; verify ERROR_CODE_OFFSET
        and that a clean context is restored between runs (no #DF)."""
        if self.long_mode:
            cr3, cr0, cr4, efer = 0x1000, _CR0_PG | _CR0_PE, _CR4_PAE, _EFER_LME | _EFER_LMA
        else:
            cr3, cr0, cr4, efer = 0x1000, _CR0_PG | _CR0_PE, 0, 0
        pages = {1: bytes(PAGE)}  # empty top-level table: nothing is present
        for cpl, kind, expected in ((3, "write", 0x6), (0, "read", 0x0), (3, "read", 0x4)):
            out = self.access(pages, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, cpl=cpl,
                              ac=False, pkru=0, vaddr=0x5008, kind=kind, size=1,
                              value=b"\0" if kind == "write" else None)
            if out.fault != (0x5008, expected) or out.other is not None:
                raise RuntimeError(
                    "QemuMmu self-check failed: expected #PF (cr2=0x5008, error code "
                    f"{expected:#x}) for a CPL{cpl} {kind} of a not-present page, got "
                    f"fault={out.fault} other={out.other!r}.  The unicorn build differs "
                    f"from the one ERROR_CODE_OFFSET={ERROR_CODE_OFFSET} was found on "
                    "(unicorn 2.1.4); re-derive the offset.")
            if out.memory != pages:
                raise RuntimeError("QemuMmu self-check failed: the caller's page changed")
        self._load_pages({})


class _UncheckedQemuMmu(QemuMmu):
    def _self_check(self) -> None:
        pass


def derive_error_code_offset() -> list[int]:
    """Re-derive ``ERROR_CODE_OFFSET`` (e.g. for another unicorn release):
    provoke #PFs with known, distinct error codes in both engines and return
    every context offset whose int32 matched all of them (expect one)."""
    p, w, u, nx, rsvd = _P, _W, _U, 1 << 63, 1 << 51
    cases = [  # (pte flags, cpl, kind, cr4 extra, pkru, expected error code)
        (0, 0, "read", 0, 0, 0x0), (0, 0, "write", 0, 0, 0x2),
        (0, 3, "read", 0, 0, 0x4), (0, 3, "write", 0, 0, 0x6),
        (p | w, 3, "read", 0, 0, 0x5), (p, 0, "write", 0, 0, 0x3),
        (p | u, 3, "write", 0, 0, 0x7), (p | w | u | nx, 3, "fetch", 0, 0, 0x15),
        (p | w | rsvd, 0, "read", 0, 0, 0x9), (p | w | u | rsvd, 3, "write", 0, 0, 0xF),
        (p | w | u, 0, "read", 1 << 21, 0, 0x1), (p | w | u | nx, 0, "fetch", 0, 0, 0x11),
        (p | w | u | (1 << 59), 3, "read", _CR4_PKE, 0b1100, 0x25),
        (p | w | u | (1 << 59), 3, "write", _CR4_PKE, 0b1000, 0x27),
    ]
    va = 0x405123
    candidates: set[int] | None = None
    for long_mode in (True, False):
        mmu = _UncheckedQemuMmu(long_mode)
        for leaf, cpl, kind, cr4x, pkru, expected in cases:
            if cr4x & _CR4_PKE and not long_mode:
                continue
            tables = {}

            def put(pfn, idx, val):
                page = tables.setdefault(pfn, bytearray(PAGE))
                struct.pack_into("<Q", page, idx * 8, val)

            if long_mode:  # PML4 0x10 -> PDPT 0x11 -> PD 0x12 -> PT 0x13
                put(0x10, 0, 0x11000 | p | w | u)
                put(0x11, 0, 0x12000 | p | w | u)
                efer, cr3 = _EFER_LME | _EFER_LMA | 0x800, 0x10000
            else:  # PAE: PDPT at 0x10000 -> PD 0x12 -> PT 0x13
                put(0x10, 0, 0x12000 | p)
                efer, cr3 = 0x800, 0x10000
            put(0x12, 2, 0x13000 | p | w | u)
            put(0x13, 5, 0x20000 | leaf)
            tables[0x20] = bytearray(b"\x90" * PAGE)
            out = mmu.access({k: bytes(v) for k, v in tables.items()},
                             cr0=_CR0_PG | _CR0_WP | _CR0_PE,
                             cr3=cr3, cr4=_CR4_PAE | cr4x, efer=efer, cpl=cpl, ac=False,
                             pkru=pkru, vaddr=va, kind=kind, size=1,
                             value=b"\0" if kind == "write" else None)
            if out.fault is None or out.fault[0] != va:
                raise RuntimeError(f"expected a #PF at {va:#x} for {(leaf, cpl, kind)}, "
                                   f"got fault={out.fault} other={out.other}")
            raw = mmu._context_bytes()
            hits = {i for i in range(len(raw) - 3)
                    if struct.unpack_from("<i", raw, i)[0] == expected}
            candidates = hits if candidates is None else candidates & hits
    return sorted(candidates or ())
