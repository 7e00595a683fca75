"""Differential testing of the paging model against QEMU's MMU (``qemu_oracle``).

A *case* is one memory access under one random configuration: a paging mode,
the control-register bits that change translation (CR0.WP, CR4.PSE/SMEP/SMAP/
PKE/PGE, EFER.NXE), CPL, RFLAGS.AC, PKRU, a page-table tree in a handful of
frames with random flags at every level (large pages, NX, G, PAT, protection
keys, ignored bits, sometimes one reserved bit, tables shared between levels,
a data page that is also a page table) and an access (read, write or fetch of
1, 2, 4 or 8 bytes, rarely one that crosses into the next page, rarely a
non-canonical address).  ``run_case`` performs the access on our model
(``PhysicalMemory`` + ``CpuState`` + ``translate``) and in QEMU, and
``compare`` checks that both agree on the fault (CR2 and error code), the
bytes read and every byte of every page (A/D bits, the bytes written).

Random decisions go through a ``Chooser`` (``choosers``): ``RandomChooser``
for the seeded campaign of ``selfcheck``, ``HypothesisChooser`` so that
hypothesis can shrink a failing case.  Every decision is drawn so that its
smallest value is the simplest choice (flags shrink to clear, indices to 0,
frames to the low region); flags are ``permille`` draws.

Where QEMU departs from the SDM the comparison makes a narrow, named
allowance and asserts the SDM behaviour on our side (see ``compare``):

``1g-leaf-accessed``
    SDM 4.8: a walk that faults leaves the leaf entry unchanged.  QEMU sets A
    in a PDPTE before it looks at PS, so a 1 GB leaf gains A when the access
    then faults (protection, or a reserved bit in 29:13).  Allowed: exactly
    that A bit, on exactly that entry; our leaf must be unchanged.
``pae-pdpte-reserved``
    SDM 4.4.1: PAE PDPTEs are loaded when CR3 is loaded and a present PDPTE
    with a reserved bit makes the load #GP.  QEMU reads the PDPTE on every walk,
    ignores bits 2:1 and 8:5 and reports bits 62:MAXPHYADDR and 63 as #PF(RSVD).
    Asserted: our CR3 load raises #GP.  QEMU is compared with our model run the
    QEMU way (``run_model(case, qemu_pdptes=True)``).

The other documented QEMU facts need no allowance: upper-level entries gain A
on a walk that faults lower down (our model does the same); a page-crossing
access is translated page by page in address order, the first page gaining A/D
before the second faults (``run_model`` does the same); frames absent from the
oracle's ``pages`` read as zero (the generator puts every frame a walk can reach
in ``pages``).
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from ..x86 import walker as _walker
from ..x86.bits import (
    ACC_FETCH, ACC_USER, ACC_WRITE, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PGE, CR4_PKE,
    CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE, PF_P, PF_RSVD, PTE_A, PTE_NX, PTE_P,
    PTE_PS, describe_error_code, mask,
)
from ..x86.cpu import CpuState
from ..x86.faults import GeneralProtection, NonCanonicalAddress, PageFault
from ..x86.formats import LEVEL_NAMES, PagingMode
from ..x86.memory import PhysicalMemory
from .choosers import Chooser, HypothesisChooser, RandomChooser, permille
from .qemu_oracle import HARNESS_PHYS_BASE, HARNESS_PHYS_END, RESERVED_SLOT, RESERVED_VIRT, QemuMmu

__all__ = [
    "MODES", "FEATURES", "MAXPHYADDR", "Case", "Outcome", "Verdict", "Mismatch", "cases", "draw_case",
    "case_for", "run_case", "compare", "check_case", "describe_case", "qemu_engine", "selfcheck",
]

#: Paging modes a case can use (``PagingMode`` values).
MODES = ("none", "32-bit", "pae", "4-level", "5-level")
#: QEMU's physical-address width (TCG_PHYS_ADDR_BITS); the model runs with the same.
MAXPHYADDR = 40

_PAGE = 4096
_ORACLE_MODE = {"none": "off", "32-bit": "32bit", "pae": "pae", "4-level": "4level", "5-level": "5level"}
_TOP_LEVEL = {"32-bit": 2, "pae": 3, "4-level": 4, "5-level": 5}
_VA_BITS = {"4-level": 48, "5-level": 57}
_HARNESS_PFNS = range(HARNESS_PHYS_BASE >> 12, HARNESS_PHYS_END >> 12)
_ADDR_40 = mask(12, MAXPHYADDR - 1)       # address field of an 8-byte entry, MAXPHYADDR 40
_HIGH_RSVD = mask(MAXPHYADDR, 51)         # address bits at and above MAXPHYADDR
_MAX_PFN_8 = 1 << (MAXPHYADDR - 12)       # frames an 8-byte entry (or PSE-36) can reach
_MAX_PFN_4 = 1 << 20                      # frames a 4-byte entry / 32-bit CR3 can reach


def cases(**kwargs):
    """A hypothesis strategy of Cases; kwargs as for ``draw_case``."""
    from hypothesis import strategies as st

    @st.composite
    def _cases(draw):
        return draw_case(HypothesisChooser(draw), **kwargs)

    return _cases()


# ----------------------------------------------------------------------------
# the case
# ----------------------------------------------------------------------------
@dataclass(eq=False)
class Case:
    """One access under one configuration.  ``pages`` (pfn -> 4096 bytes) is the
    whole physical memory both sides start from; ``walks`` lists, per page the
    access touches, the entries the generator placed on its walk as (level,
    physical address) top down (for the description only)."""

    mode: str                 # one of MODES
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    ac: bool
    pkru: int
    kind: str                 # "read", "write" or "fetch"
    size: int                 # 1, 2, 4 or 8 (1 for a fetch)
    vaddr: int
    value: bytes | None       # bytes written (write) or None
    pages: dict = field(repr=False)
    walks: tuple = field(default=(), repr=False)
    notes: tuple = ()         # what the generator did on purpose ("reserved bit 45 in PDE", ...)

    @property
    def access_flags(self) -> int:
        acc = {"read": 0, "write": ACC_WRITE, "fetch": ACC_FETCH}[self.kind]
        return acc | (ACC_USER if self.cpl == 3 else 0)

    @property
    def entry_size(self) -> int:
        return 4 if self.mode == "32-bit" else 8

    def pieces(self) -> list[tuple[int, int, int]]:
        """The access split at page boundaries: (linear address, offset into the access, length)."""
        return _pieces(self.vaddr, self.size)

    def __repr__(self) -> str:
        # short: the full dump is describe_case(); hypothesis prints this one
        return (f"Case({self.mode}, {self.kind} {self.size} at {self.vaddr:#x}, CPL{self.cpl}, "
                f"CR0={self.cr0:#x} CR3={self.cr3:#x} CR4={self.cr4:#x} EFER={self.efer:#x}, "
                f"pages {' '.join(f'{p:#x}' for p in sorted(self.pages))})")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def _pieces(vaddr: int, size: int) -> list[tuple[int, int, int]]:
    out, va, pos, left = [], vaddr, 0, size
    while left:
        n = min(left, _PAGE - (va & 0xFFF))
        out.append((va, pos, n))
        va, pos, left = va + n, pos + n, left - n
    return out


# ----------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------
class _Gen:
    """Draws one Case.

    The tree is built by following the walk of the access structurally (which
    entry is read next and where it points, without permission or reserved-bit
    rules): an entry placed earlier is reused as it is, a missing one is drawn.
    A table frame is only reused for the same or a lower level than it was
    first used for, so an entry is only ever re-read as a lower-level entry
    (a self-map); everything the walk can reach ends up in ``pages``."""

    P_PRESENT = 0.93          # per entry drawn
    P_LARGE = 0.3             # a PDE (PDPTE in long mode) that can map a page does
    P_RESERVED = 0.05         # per entry drawn: one reserved bit
    P_REUSE_TABLE = 0.08      # a table frame used again lower down (self-maps, shared tables)
    P_DATA_IN_TABLE = 0.06    # a 4 KB page that is one of the table frames
    P_CROSS = 0.05            # an access that crosses into the next page
    P_NONCANONICAL = 0.02

    def __init__(self, ch: Chooser, mode: str | None, kind: str | None, cpl: int | None,
                 features: dict | None = None, probabilities: dict | None = None):
        self.ch = ch
        self.features = dict(features or {})
        bad = set(self.features) - set(FEATURES)
        if bad:
            raise ValueError(f"unknown features {sorted(bad)}; choose from {', '.join(FEATURES)}")
        for name, p in (probabilities or {}).items():
            attr = "P_" + name.upper()
            if not hasattr(_Gen, attr) or not 0 <= p <= 1:
                raise ValueError(f"bad probability {name}={p!r}")
            setattr(self, attr, p)
        if mode is None:
            mode = ch.choice(("4-level", "32-bit", "pae", "5-level") * 3 + ("none",))
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if kind not in (None, "read", "write", "fetch"):
            raise ValueError(f"unknown access kind {kind!r}")
        if cpl not in (None, 0, 3):
            raise ValueError("cpl must be 0 or 3")
        self.mode, self.kind_arg, self.cpl_arg = mode, kind, cpl
        self.wide = mode != "32-bit"
        self.esize = 8 if self.wide else 4
        self.long = mode in ("4-level", "5-level")
        self.pages: dict[int, bytearray] = {}
        self.table_level: dict[int, int] = {}    # table frame -> highest level it serves
        self.assigned: dict[int, int] = {}       # entry address -> level it was drawn for
        self.injected: dict[int, int] = {}       # entry address -> level where it has a reserved bit
        self.data_pfns: set[int] = set()
        self.page_pfn: dict[int, int] = {}       # linear page number -> frame its walk reached
        self.walks: list[tuple] = []
        self.notes: list[str] = []
        self.top_pfn = self.slot_addr = None

    # --- helpers ----------------------------------------------------------
    def flag(self, p: float) -> bool:
        return permille(self.ch, p)

    def feature(self, name: str, p: float) -> bool:
        forced = self.features.get(name)
        return bool(forced) if forced is not None else self.flag(p)

    def fresh_frame(self, limit: int) -> int:
        """An unused frame below ``limit``, outside the oracle's window."""
        ch = self.ch
        r = ch.integer(0, 9)
        if r < 6:
            pfn = ch.integer(0, 0x3FF)
        elif r < 8 or limit <= 0x100000:
            pfn = ch.integer(0x400, min(limit, 0x100000) - 1)
        else:
            pfn = ch.integer(0x100000, limit - 1)
        while pfn in self.pages or pfn in self.data_pfns or pfn in _HARNESS_PFNS:
            pfn = (pfn + 1) % limit
        return pfn

    def index(self, level: int, va: int) -> int:
        if self.mode == "32-bit":
            return (va >> (12 + 10 * (level - 1))) & 0x3FF
        if self.mode == "pae" and level == 3:
            return (va >> 30) & 3
        return (va >> (12 + 9 * (level - 1))) & 0x1FF

    def read_entry(self, ea: int) -> int:
        return struct.unpack_from("<Q" if self.wide else "<I", self.pages[ea >> 12], ea & 0xFFF)[0]

    def write_entry(self, ea: int, value: int) -> None:
        page = self.pages.setdefault(ea >> 12, bytearray(_PAGE))
        struct.pack_into("<Q" if self.wide else "<I", page, ea & 0xFFF, value)

    def junk(self, present: bool) -> int:
        """A never-walked entry: random bits, not pointing into the oracle's window."""
        v = 0 if self.flag(0.4) else self.ch.integer(0, (1 << (8 * self.esize)) - 1)
        v = v | PTE_P if present else v & ~PTE_P
        if not v & mask(32, 39):
            v &= ~(1 << 31)
        return v

    # --- the whole case ---------------------------------------------------
    def draw(self) -> Case:
        ch, mode = self.ch, self.mode
        cpl = self.cpl_arg if self.cpl_arg is not None else (3 if self.flag(0.5) else 0)
        kind = self.kind_arg or ch.choice(("read", "write", "fetch"))
        size = 1 if kind == "fetch" else ch.choice((1, 2, 4, 8))
        self.kind, self.size = kind, size
        f = self.feature
        wp, nxe, pse = f("wp", 0.5), f("nxe", 0.6), f("pse", 0.6)
        smep, smap, pke, pge, ac = f("smep", 0.4), f("smap", 0.4), f("pke", 0.4), f("pge", 0.3), f("ac", 0.5)
        self.nxe, self.pse = nxe, pse
        # half of the cases keep the upper levels permissive, so that the leaf decides
        self.lenient = f("lenient", 0.5)
        cr0 = CR0_PE | (CR0_WP if wp else 0) | (CR0_PG if mode != "none" else 0)
        cr4 = ((CR4_PSE if pse else 0) | (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0)
               | (CR4_PKE if pke else 0) | (CR4_PGE if pge else 0))
        efer = EFER_NXE if nxe else 0
        if mode in ("pae", "4-level", "5-level"):
            cr4 |= CR4_PAE
        if self.long:
            efer |= EFER_LME | EFER_LMA
        if mode == "5-level":
            cr4 |= CR4_LA57
        pkru = ch.integer(0, (1 << 32) - 1) if pke else 0

        if mode == "none":
            cr3 = ch.integer(0, 0xFFFFF) << 12 if self.flag(0.2) else 0     # unused
            vaddr = self.draw_physical_access()
        else:
            cr3 = self.draw_root()
            vaddr = self.draw_vaddr()
            for va, _, _ in _pieces(vaddr, size):
                if self.noncanonical(va):
                    break
                self.walk(va)
            vaddr = self.fix_offset(vaddr)
            self.fill_noise()
        self.fill_data()
        value = None
        if kind == "write":
            value = ch.integer(0, (1 << (8 * size)) - 1).to_bytes(size, "little")
        if kind == "fetch" and vaddr >> 12 in self.page_pfn:
            # the target must decode as a one-byte instruction (nop)
            self.pages[self.page_pfn[vaddr >> 12]][vaddr & 0xFFF] = 0x90
        return Case(mode=mode, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, cpl=cpl, ac=ac, pkru=pkru,
                    kind=kind, size=size, vaddr=vaddr, value=value,
                    pages={pfn: bytes(b) for pfn, b in sorted(self.pages.items())},
                    walks=tuple(self.walks), notes=tuple(self.notes))

    def noncanonical(self, va: int) -> bool:
        if not self.long:
            return False
        top = va >> (_VA_BITS[self.mode] - 1)
        return top not in (0, (1 << (65 - _VA_BITS[self.mode])) - 1)

    def draw_offset(self) -> int:
        ch, size = self.ch, self.size
        if size > 1 and self.flag(self.P_CROSS):
            self.notes.append("page-crossing access")
            return _PAGE - ch.integer(1, size - 1)
        if self.flag(0.5):
            return ch.integer(0, (_PAGE - size) // size) * size    # aligned
        return ch.integer(0, _PAGE - size)

    def drop_crossing(self, va: int) -> int:
        """Move an access that would cross into the oracle's range to the page end."""
        if "page-crossing access" in self.notes:
            self.notes.remove("page-crossing access")
        return (va & ~0xFFF) | (_PAGE - self.size)

    # --- paging off -------------------------------------------------------
    def draw_physical_access(self) -> int:
        off = self.draw_offset()
        pfn = self.fresh_frame(HARNESS_PHYS_BASE >> 12)
        va = (pfn << 12) | off
        if off + self.size > _PAGE and pfn + 1 in _HARNESS_PFNS:
            va = self.drop_crossing(va)
        for piece_va, _, _ in _pieces(va, self.size):
            self.data_pfns.add(piece_va >> 12)
            self.page_pfn[piece_va >> 12] = piece_va >> 12
        return va

    # --- paging structures ------------------------------------------------
    def draw_root(self) -> int:
        ch, mode = self.ch, self.mode
        pfn = self.fresh_frame(_MAX_PFN_4 if mode in ("32-bit", "pae") else _MAX_PFN_8)
        self.pages[pfn] = bytearray(_PAGE)
        self.top = _TOP_LEVEL[mode]
        self.table_level[pfn] = self.top
        self.top_pfn = pfn
        noise = ch.integer(0, 0xFFF) & ~0x18 if self.flag(0.3) else 0    # ignored CR3 bits
        cache = ch.integer(0, 3) << 3 if self.flag(0.3) else 0           # PWT, PCD
        slot_off, _ = RESERVED_SLOT[_ORACLE_MODE[mode]]
        if mode == "pae":
            self.top_base = (pfn << 12) | (ch.integer(0, 127) << 5)     # a 32-byte aligned PDPT
            cr3 = self.top_base | (noise & 0x7) | cache
        else:
            self.top_base = pfn << 12
            cr3 = self.top_base | noise | cache
        # the oracle's slot must not be present; its other bits are the caller's
        self.slot_addr = self.top_base + slot_off
        self.write_entry(self.slot_addr, self.junk(False))
        return cr3

    def draw_vaddr(self) -> int:
        ch, mode = self.ch, self.mode
        off = self.draw_offset()
        if mode == "32-bit":
            idx = [ch.integer(0, 1022)]
            idx.append(idx[0] if self.flag(0.15) else ch.integer(0, 1023))
            va = (idx[0] << 22) | (idx[1] << 12)
        else:
            idx = [ch.integer(0, 2) if mode == "pae" else ch.integer(0, 510)]
            for _ in range(self.top - 1):
                idx.append(idx[-1] if self.flag(0.15) and idx[-1] < 512 else ch.integer(0, 511))
            va = 0
            for i in idx:
                va = (va << 9) | i
            va <<= 12
            if self.long:
                bits = _VA_BITS[mode]
                if va >> (bits - 1):
                    va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
                if self.flag(self.P_NONCANONICAL):
                    va ^= 1 << ch.integer(bits, 63)
                    self.notes.append("non-canonical address")
        va |= off
        lo, hi = RESERVED_VIRT[_ORACLE_MODE[mode]]
        last = va + self.size - 1
        if last > hi or last >= lo > va:
            va = self.drop_crossing(va)
        # The top-level table may serve a lower level only if no walk can read
        # the oracle's slot through it.
        slot_idx = (self.slot_addr & 0xFFF) // self.esize
        lower = {self.index(lvl, a) for lvl in range(1, self.top) for a in (va, va + self.size - 1)}
        self.top_reusable = mode != "pae" and slot_idx not in lower
        return va

    def walk(self, va: int) -> None:
        """Place (or reuse) every entry of the walk of va, then its data frame."""
        level, base = self.top, self.top_base
        path = []
        while True:
            ea = base + self.index(level, va) * self.esize
            path.append((level, ea))
            if ea in self.assigned:
                e = self.read_entry(ea)
            else:
                e = self.draw_entry(level, ea, va)
                self.write_entry(ea, e)
                self.assigned[ea] = level
            if not e & PTE_P or self.injected.get(ea) == level:
                break
            shift = self.leaf_shift(level, e)
            if shift:
                pfn = self.leaf_frame(shift, e, va)
                if pfn in _HARNESS_PFNS:
                    raise AssertionError(f"generator bug: data frame {pfn:#x} in the oracle's window")
                self.data_pfns.add(pfn)
                self.page_pfn.setdefault(va >> 12, pfn)
                break
            if self.wide and e & _HIGH_RSVD:
                break         # an address bit >= MAXPHYADDR is reserved at every level
            nxt = (e & (_ADDR_40 if self.wide else 0xFFFFF000)) >> 12
            if nxt in _HARNESS_PFNS:
                raise AssertionError(f"generator bug: table frame {nxt:#x} in the oracle's window")
            self.pages.setdefault(nxt, bytearray(_PAGE))
            self.table_level.setdefault(nxt, level - 1)
            base = nxt << 12
            level -= 1
        self.walks.append((va, tuple(path)))

    def leaf_shift(self, level: int, e: int) -> int:
        """Page shift if e maps a page at this level, else 0 (structure only)."""
        if level == 1:
            return 12
        if level == 2 and e & PTE_PS:
            if self.mode == "32-bit":
                return 22 if self.pse else 0
            return 21
        if level == 3 and self.long and e & PTE_PS:
            return 30
        return 0

    def leaf_frame(self, shift: int, e: int, va: int) -> int:
        if shift == 22:
            base = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32)
        elif self.wide:
            base = e & _ADDR_40 & ~((1 << shift) - 1)
        else:
            base = e & 0xFFFFF000
        return (base | (va & ((1 << shift) - 1))) >> 12

    def conflict(self, pfn: int, off: int, n: int) -> bool:
        """Would the access's bytes [off, off+n) in frame pfn break the case?"""
        if pfn == self.top_pfn:
            s = self.slot_addr & 0xFFF
            if off < s + self.esize and s < off + n:
                return True       # the oracle's slot holds its own entry during the run
            t = self.top_base & 0xFFF
            if self.mode == "pae" and self.kind == "fetch" and off < t + 32 and t < off + n:
                return True       # the nop would change a PDPTE
        if self.kind == "fetch" and pfn in self.table_level:
            for ea in self.assigned:
                if ea >> 12 == pfn and off < (ea & 0xFFF) + self.esize and (ea & 0xFFF) < off + n:
                    return True   # the nop would change an entry of the walk
        return False

    def fix_offset(self, va: int) -> int:
        """Keep a data page that is also a page table clear of the oracle's slot
        (and a fetch target clear of the walk's entries): the page offset does
        not take part in the walk, so it can move."""
        pfn = self.page_pfn.get(va >> 12)
        off = va & 0xFFF
        if pfn is None or not self.conflict(pfn, off, min(self.size, _PAGE - off)):
            return va
        for k in range(1, _PAGE):
            o = (off + k) % _PAGE
            if o + self.size <= _PAGE and not self.conflict(pfn, o, self.size):
                break
        if off + self.size > _PAGE:
            self.notes.remove("page-crossing access")
            self.walks = self.walks[:1]
        self.notes.append(f"offset moved from {off:#x} to {o:#x} (frame {pfn:#x} is a page table)")
        return (va & ~0xFFF) | o

    def draw_entry(self, level: int, ea: int, va: int) -> int:
        ch, mode = self.ch, self.mode
        if mode == "pae" and level == 3:
            return self.draw_pdpte()
        if not self.flag(self.P_PRESENT):
            return self.junk(False)
        if level == 1:
            shift = 12
        elif level == 2 and (self.wide or self.pse) and self.flag(self.P_LARGE):
            shift = 22 if mode == "32-bit" else 21
        elif level == 3 and self.long and self.flag(self.P_LARGE):
            shift = 30
        else:
            shift = 0
        v = PTE_P
        p_wu = 0.97 if self.lenient and not shift else 0.8
        v |= 2 if self.flag(p_wu) else 0         # W
        v |= 4 if self.flag(p_wu) else 0         # U
        v |= 8 if self.flag(0.15) else 0         # PWT
        v |= 0x10 if self.flag(0.15) else 0      # PCD
        v |= 0x20 if self.flag(0.5) else 0       # A
        v |= 0x40 if self.flag(0.5 if shift else 0.2) else 0     # D (ignored in a table pointer)
        v |= 0x100 if self.flag(0.3) else 0      # G (ignored in a table pointer)
        if self.flag(0.3):
            v |= ch.integer(0, 7) << 9           # available to software
        if shift == 12:
            v |= 0x80 if self.flag(0.2) else 0   # PAT
        elif shift:
            v |= PTE_PS | (0x1000 if self.flag(0.2) else 0)      # PS, PAT
        elif mode == "32-bit" and level == 2 and not self.pse and self.flag(0.2):
            v |= PTE_PS                          # ignored without CR4.PSE
        if self.wide and self.nxe and self.flag(0.03 if self.lenient and not shift else 0.15):
            v |= PTE_NX
        if self.long:
            if self.flag(0.15):
                v |= ch.integer(0, 127) << 52    # ignored
            if self.flag(0.6 if shift else 0.2):
                v |= ch.integer(0, 15) << 59     # protection key (ignored in a table pointer)
        if shift == 0:
            v |= self.table_target(level - 1) << 12
        elif shift == 12:
            v |= self.page_frame() << 12
        else:
            v |= self.large_base(shift)
        if self.flag(self.P_RESERVED):
            bit = self.reserved_bit(level, shift)
            if bit is not None:
                v |= 1 << bit
                self.injected[ea] = level
                self.notes.append(f"reserved bit {bit} in the {LEVEL_NAMES[PagingMode(mode)][level]}")
        return v

    def draw_pdpte(self) -> int:
        """A PAE PDPTE: only P, PWT, PCD, bits 11:9 and the address are defined."""
        if not self.flag(0.95):
            return self.junk(False)
        v = PTE_P | (8 if self.flag(0.15) else 0) | (0x10 if self.flag(0.15) else 0)
        if self.flag(0.3):
            v |= self.ch.integer(0, 7) << 9
        v |= self.table_target(2) << 12
        if self.flag(self.P_RESERVED):
            bit = self.ch.choice((1, 2, 5, 6, 7, 8, None))
            bit = self.bit_in(MAXPHYADDR, 63) if bit is None else bit
            v |= 1 << bit
            # not in self.injected: QEMU ignores some of these and walks on
            self.notes.append(f"reserved bit {bit} in a PDPTE (SDM: #GP at CR3 load)")
        return v

    def table_target(self, level: int) -> int:
        """Frame for a table holding level-``level`` entries."""
        if self.flag(self.P_REUSE_TABLE):
            cands = [pfn for pfn, lvl in sorted(self.table_level.items())
                     if lvl >= level and (pfn != self.top_pfn or self.top_reusable)]
            if cands:
                pfn = self.ch.choice(cands)
                self.notes.append(f"table frame {pfn:#x} reused for level {level}")
                return pfn
        pfn = self.fresh_frame(_MAX_PFN_8 if self.wide else _MAX_PFN_4)
        self.pages[pfn] = bytearray(_PAGE)
        self.table_level[pfn] = level
        return pfn

    def page_frame(self) -> int:
        if self.flag(self.P_DATA_IN_TABLE):
            pfn = self.ch.choice(sorted(self.table_level))
            self.notes.append(f"data page in table frame {pfn:#x}")
            return pfn
        pfn = self.fresh_frame(_MAX_PFN_8 if self.wide else _MAX_PFN_4)
        self.data_pfns.add(pfn)
        return pfn

    def large_base(self, shift: int) -> int:
        """Entry bits holding the base of a large page, outside the oracle's window."""
        ch = self.ch
        if shift == 22:
            hi = ch.integer(1, 0xFF) if self.flag(0.3) else 0      # PSE-36: address bits 39:32
            lo = ch.integer(0, 0x3FF)
            if hi == 0 and lo << 22 == HARNESS_PHYS_BASE:
                lo -= 1
            return (lo << 22) | (hi << 13)
        span = MAXPHYADDR - shift
        idx = ch.integer(0, (1 << span) - 1) if self.flag(0.3) else ch.integer(0, 7)
        while idx << shift < HARNESS_PHYS_END and (idx + 1) << shift > HARNESS_PHYS_BASE:
            idx -= 1
        return idx << shift

    def reserved_bit(self, level: int, shift: int) -> int | None:
        opts = []
        if self.wide:
            opts.append((MAXPHYADDR, 51))
            if not self.nxe:
                opts.append((63, 63))
        if self.mode == "pae":
            opts.append((52, 62))
        if self.long and level >= 4:
            opts.append((7, 7))                  # PS in a PML4E / PML5E
        if shift == 21:
            opts.append((13, 20))
        elif shift == 30:
            opts.append((13, 29))
        elif shift == 22:
            opts.append((21, 21))                # PSE-36 with MAXPHYADDR 40
        if not opts:
            return None
        lo, hi = self.ch.choice(opts)
        return self.bit_in(lo, hi)

    def bit_in(self, lo: int, hi: int) -> int:
        """A bit of lo..hi, the ends (where off-by-one mistakes are) half of the time."""
        end = self.ch.choice((None, lo, hi))
        return self.ch.integer(lo, hi) if end is None else end

    # --- the rest of memory -----------------------------------------------
    def fill_noise(self) -> None:
        """A few never-walked entries in every table frame."""
        ch = self.ch
        per = _PAGE // self.esize
        for pfn in sorted(self.table_level):
            for _ in range(ch.integer(0, 3)):
                ea = (pfn << 12) + ch.integer(0, per - 1) * self.esize
                if ea in self.assigned or ea == self.slot_addr:
                    continue
                if self.mode == "pae" and self.top_base <= ea < self.top_base + 32:
                    # an unused PDPTE is loaded at CR3 load too: no reserved bits
                    v = self.junk(False)
                    if self.flag(0.5):
                        v = PTE_P | (self.fresh_frame(_MAX_PFN_8) << 12)
                else:
                    v = self.junk(self.flag(0.5))
                self.write_entry(ea, v)

    def fill_data(self) -> None:
        seed = self.ch.integer(0, (1 << 32) - 1)
        for pfn in sorted(self.data_pfns):
            if pfn not in self.pages:
                self.pages[pfn] = bytearray(random.Random(seed ^ pfn).randbytes(_PAGE))


#: Case-level switches ``draw_case(features=...)`` can force on or off: CR0.WP,
#: EFER.NXE, CR4.PSE/SMEP/SMAP/PKE/PGE, RFLAGS.AC, and ``lenient`` (upper-level
#: entries nearly always W, U and not NX, so that the leaf decides).
FEATURES = ("wp", "nxe", "pse", "smep", "smap", "pke", "pge", "ac", "lenient")


def draw_case(ch: Chooser, *, mode: str | None = None, kind: str | None = None, cpl: int | None = None,
              features: dict | None = None, probabilities: dict | None = None) -> Case:
    """Draw one random case from chooser ``ch`` (``RandomChooser`` or
    ``HypothesisChooser``).  ``mode``/``kind``/``cpl`` fix those choices;
    ``features`` forces case-level switches (see FEATURES); ``probabilities``
    overrides the generator's: present, large, reserved, reuse_table,
    data_in_table, cross, noncanonical (per entry / per case, 0..1)."""
    return _Gen(ch, mode, kind, cpl, features, probabilities).draw()


def case_for(seed: int, index: int, *, modes=None) -> Case:
    """Case number ``index`` of the campaign with ``seed`` (what ``selfcheck`` runs)."""
    ch = RandomChooser(f"shadowmmu-differential/{seed}/{index}")
    return draw_case(ch, mode=ch.choice(tuple(modes)) if modes else None)


# ----------------------------------------------------------------------------
# running a case on both sides
# ----------------------------------------------------------------------------
@dataclass(eq=False)
class Outcome:
    """What one side did: a #PF (cr2, error code), the bytes read, the final
    content of every page of the case, any other exception (``other``)."""

    fault: tuple[int, int] | None = None
    data: bytes | None = None
    memory: dict = field(default_factory=dict, repr=False)
    other: str | None = None
    detail: object = field(default=None, repr=False)   # ours: PageFault / GeneralProtection / Translations
    variant: Outcome | None = field(default=None, repr=False)   # ours, run QEMU's PDPTE way

    def summary(self) -> str:
        if self.other is not None:
            return self.other
        if self.fault is not None:
            return f"#PF cr2={self.fault[0]:#x} error code {describe_error_code(self.fault[1])}"
        return "no fault" + (f", read {self.data.hex()}" if self.data is not None else "")


_ENGINES: dict[bool, QemuMmu] = {}


def qemu_engine(long_mode: bool) -> QemuMmu:
    """The module's QemuMmu for 32-bit (paging off, 32-bit, PAE) or long mode, created once."""
    eng = _ENGINES.get(bool(long_mode))
    if eng is None:
        eng = _ENGINES[bool(long_mode)] = QemuMmu(long_mode=bool(long_mode))
    return eng


def run_qemu(case: Case) -> Outcome:
    out = qemu_engine(case.mode in ("4-level", "5-level")).access(
        case.pages, cr0=case.cr0, cr3=case.cr3, cr4=case.cr4, efer=case.efer, cpl=case.cpl,
        ac=case.ac, pkru=case.pkru, vaddr=case.vaddr, kind=case.kind, size=case.size, value=case.value)
    return Outcome(fault=out.fault, data=out.data, memory=dict(out.memory), other=out.other)


# QEMU's reserved bits of a PAE PDPTE, checked at every walk: 62:MAXPHYADDR and 63.
_QEMU_PDPTE_RSVD = mask(MAXPHYADDR, 63)
# SDM table 4-8: the reserved bits of a PAE PDPTE (MAXPHYADDR 40), cleared for the QEMU-way load.
_PDPTE_RSVD = mask(1, 2) | mask(5, 8) | mask(MAXPHYADDR, 63)


def run_model(case: Case, *, qemu_pdptes: bool = False) -> Outcome:
    """Perform the access on our model.  ``qemu_pdptes`` runs a PAE case the way
    QEMU treats PDPTEs (read at the walk, bits 2:1 and 8:5 ignored, bits 63:40
    #PF(RSVD)) instead of the SDM's #GP at CR3 load."""
    mem = PhysicalMemory(1 << MAXPHYADDR, maxphyaddr=MAXPHYADDR)
    for pfn, content in case.pages.items():
        mem.write(pfn << 12, content)
    cpu = CpuState(maxphyaddr=MAXPHYADDR, cpl=case.cpl, ac=case.ac, pkru=case.pkru)

    def snapshot() -> dict:
        return {pfn: mem.frame_bytes(pfn) for pfn in case.pages}

    pdpt = case.cr3 & 0xFFFFFFE0
    try:
        if qemu_pdptes:
            for i in range(4):
                mem.write_u64(pdpt + 8 * i, mem.read_u64(pdpt + 8 * i) & ~_PDPTE_RSVD)
        cpu.load(mem, cr0=case.cr0, cr3=case.cr3, cr4=case.cr4, efer=case.efer)
    except GeneralProtection as exc:
        return Outcome(memory=snapshot(), other=f"#GP at CR3 load: {exc}", detail=exc)
    finally:
        if qemu_pdptes:
            mem.write(pdpt, case.pages[pdpt >> 12][pdpt & 0xFFF:(pdpt & 0xFFF) + 32])
    acc = case.access_flags
    pieces = case.pieces()
    translations = []
    try:
        for va, _, _ in pieces:
            if qemu_pdptes:
                e = mem.read_u64(pdpt + 8 * ((va >> 30) & 3))
                if e & PTE_P and e & _QEMU_PDPTE_RSVD:
                    raise PageFault(va, _walker.fault_error_code(cpu, acc, PF_RSVD | PF_P))
            translations.append(_walker.translate(mem, cpu, va, acc))
    except PageFault as pf:
        return Outcome(fault=(pf.address, pf.error_code), memory=snapshot(), detail=pf)
    except NonCanonicalAddress as exc:
        return Outcome(memory=snapshot(), other="#GP(0x0)", detail=exc)
    data = None
    if case.kind == "read":
        data = b"".join(mem.read(t.paddr, n) for t, (_, _, n) in zip(translations, pieces))
    elif case.kind == "write":
        for t, (_, pos, n) in zip(translations, pieces):
            mem.write(t.paddr, case.value[pos:pos + n])
    return Outcome(data=data, memory=snapshot(), detail=tuple(translations))


def run_case(case: Case) -> tuple[Outcome, Outcome]:
    """Perform the case's access on our model and in QEMU: (ours, qemu)."""
    ours = run_model(case)
    if case.mode == "pae" and isinstance(ours.detail, GeneralProtection):
        ours.variant = run_model(case, qemu_pdptes=True)
    return ours, run_qemu(case)


# ----------------------------------------------------------------------------
# comparing
# ----------------------------------------------------------------------------
@dataclass
class Verdict:
    problems: list = field(default_factory=list)     # readable differences; empty: agreement
    allowances: list = field(default_factory=list)   # names of the QEMU departures that applied

    @property
    def ok(self) -> bool:
        return not self.problems


def _word(memory: dict, addr: int, width: int) -> int | None:
    page = memory.get(addr >> 12)
    if page is None:
        return None
    return int.from_bytes(page[addr & 0xFFF:(addr & 0xFFF) + width], "little")


def _sdm_checks(case: Case, ours: Outcome) -> list[str]:
    """SDM rules checked on our side alone, where QEMU is no reference."""
    pf = ours.detail
    if case.mode == "pae":
        # SDM 4.4.1 and table 4-8: loading CR3 in PAE mode loads the four PDPTEs;
        # a present one with a reserved bit (2:1, 8:5, 63:MAXPHYADDR) is #GP.
        # QEMU ignores 2:1 and 8:5, so only this check can catch a model that does.
        pdpt = case.cr3 & 0xFFFFFFE0
        bad = [(i, e) for i in range(4) if (e := _word(case.pages, pdpt + 8 * i, 8) or 0) & PTE_P
               and e & _PDPTE_RSVD]
        gp = isinstance(pf, GeneralProtection)
        if bad and not gp:
            return [f"SDM 4.4.1 (our model): PDPTE{bad[0][0]} = {bad[0][1]:#x} has reserved bits "
                    f"{bad[0][1] & _PDPTE_RSVD:#x}, but loading CR3 did not #GP"]
        if gp and not bad:
            return [f"SDM 4.4.1 (our model): CR3 load #GP without a reserved PDPTE bit: {pf}"]
    if isinstance(pf, PageFault) and pf.entries and len(case.pieces()) == 1:
        level, ea, value, _ = pf.entries[-1]
        if case.mode == "pae" and level == 3:
            return []           # the PDPTE register, not memory
        if any(e[1] == ea for e in pf.entries[:-1]):
            return []           # a self-map: the entry was also passed as a table pointer (A)
        width = case.entry_size
        orig, now = _word(case.pages, ea, width), _word(ours.memory, ea, width)
        if orig is not None and now != orig:
            return [f"SDM 4.8 (our model): the faulting walk changed its last entry at {ea:#x} "
                    f"from {orig:#x} to {now:#x}"]
    return []


def _qemu_1g_allowance(case: Case, ours: Outcome) -> dict:
    """{entry address: value QEMU may leave there} for departure ``1g-leaf-accessed``.

    SDM 4.8: a walk that faults leaves the leaf unchanged (our model; checked by
    _sdm_checks).  QEMU sets A in a PDPTE right after its P and reserved-bit checks
    (bits 51:MAXPHYADDR, 63 without NXE) and only then looks at PS, so a 1 GB leaf
    gains A if the access faults afterwards: protection faults and reserved bits
    29:13."""
    pf = ours.detail
    if case.mode not in ("4-level", "5-level") or not isinstance(pf, PageFault) or not pf.entries:
        return {}
    level, ea, value, _ = pf.entries[-1]
    if level != 3 or not value & PTE_PS or not pf.error_code & PF_P or value & PTE_A:
        return {}
    early = _HIGH_RSVD | (0 if case.efer & EFER_NXE else PTE_NX)
    if pf.error_code & PF_RSVD and value & early:
        return {}
    return {ea: value | PTE_A}


def compare(case: Case, ours: Outcome, qemu: Outcome) -> Verdict:
    """Compare both sides; departures of QEMU from the SDM are allowed narrowly
    (see the module docstring) and our side is held to the SDM there."""
    v = Verdict()
    v.problems += _sdm_checks(case, ours)
    if isinstance(ours.detail, GeneralProtection) and not isinstance(ours.detail, NonCanonicalAddress):
        # SDM 4.4.1: a present PAE PDPTE with a reserved bit makes the CR3 load #GP
        # (our model: asserted here).  QEMU reads PDPTEs at each walk instead.
        if case.mode != "pae" or ours.variant is None or "PDPTE" not in str(ours.detail):
            v.problems.append(f"our model: unexpected #GP at CR3 load: {ours.detail}")
            return v
        if ours.memory != case.pages:
            v.problems.append("our model: memory changed although the CR3 load faulted")
        v.allowances.append("pae-pdpte-reserved")
        ours = ours.variant
        if isinstance(ours.detail, GeneralProtection):
            v.problems.append(f"our model, run QEMU's PDPTE way: #GP at CR3 load: {ours.detail}")
            return v
    if ours.other != qemu.other:
        v.problems.append(f"other: ours {ours.other!r}, QEMU {qemu.other!r}")
    if ours.fault != qemu.fault:
        v.problems.append(f"fault: ours {ours.summary()}; QEMU {qemu.summary()}")
    if ours.data != qemu.data:
        v.problems.append(f"data read: ours {_hex(ours.data)}, QEMU {_hex(qemu.data)}")
    allowed = _qemu_1g_allowance(case, ours)
    width = 8 if case.mode == "none" else case.entry_size
    for pfn in sorted(case.pages):
        a, b = ours.memory.get(pfn), qemu.memory.get(pfn)
        if a == b:
            continue
        if a is None or b is None:
            v.problems.append(f"page {pfn:#x} missing from {'ours' if a is None else 'QEMU'}")
            continue
        for off in range(0, _PAGE, width):
            if a[off:off + width] == b[off:off + width]:
                continue
            addr = (pfn << 12) | off
            ov, qv = _word(ours.memory, addr, width), _word(qemu.memory, addr, width)
            if allowed.get(addr) == qv:
                v.allowances.append("1g-leaf-accessed")
                continue
            v.problems.append(f"memory at {addr:#x}: was {_word(case.pages, addr, width):#x}, "
                              f"ours {ov:#x}, QEMU {qv:#x}{_bit_diff(ov, qv)}")
    return v


def _hex(b: bytes | None) -> str:
    return "none" if b is None else b.hex()


def _bit_diff(a: int, b: int) -> str:
    d = a ^ b
    bits = [i for i in range(64) if d >> i & 1]
    names = {0: "P", 1: "W", 2: "U", 5: "A", 6: "D", 7: "PS"}
    return " (bits differ: " + ", ".join(names.get(i, str(i)) for i in bits) + ")"


class Mismatch(AssertionError):
    """Our model and QEMU disagree beyond the documented departures."""

    def __init__(self, case: Case, ours: Outcome, qemu: Outcome, verdict: Verdict):
        self.case, self.ours, self.qemu, self.verdict = case, ours, qemu, verdict
        super().__init__(report(case, ours, qemu, verdict))


def check_case(case: Case) -> Verdict:
    """Run and compare one case; raise Mismatch (an AssertionError) on disagreement."""
    ours, qemu = run_case(case)
    verdict = compare(case, ours, qemu)
    if verdict.problems:
        raise Mismatch(case, ours, qemu, verdict)
    return verdict


# ----------------------------------------------------------------------------
# describing
# ----------------------------------------------------------------------------
_CR0_NAMES = ((CR0_PE, "PE"), (CR0_WP, "WP"), (CR0_PG, "PG"))
_CR4_NAMES = ((CR4_PSE, "PSE"), (CR4_PAE, "PAE"), (CR4_PGE, "PGE"), (CR4_LA57, "LA57"),
              (CR4_SMEP, "SMEP"), (CR4_SMAP, "SMAP"), (CR4_PKE, "PKE"))
_EFER_NAMES = ((EFER_LME, "LME"), (EFER_LMA, "LMA"), (EFER_NXE, "NXE"))


def _names(value: int, table) -> str:
    return "|".join(n for bit, n in table if value & bit) or "-"


def _entry_flags(case: Case, level: int, value: int, leaf: bool) -> str:
    if not value & PTE_P:
        return "not present"
    names = [n for bit, n in ((1, "P"), (2, "W"), (4, "U"), (8, "PWT"), (0x10, "PCD"), (0x20, "A"),
                              (0x40, "D"), (0x100, "G")) if value & bit]
    if value & PTE_PS and level > 1:
        names.append("PS")
        if value & 0x1000:
            names.append("PAT")
    elif value & 0x80:
        names.append("PAT" if level == 1 else "PS(bit 7)")
    if case.entry_size == 8:
        if value & PTE_NX:
            names.append("NX")
        if leaf and case.mode in ("4-level", "5-level") and value >> 59 & 0xF:
            names.append(f"pkey={value >> 59 & 0xF}")
    return " ".join(names)


def _points_to(case: Case, level: int, value: int) -> str:
    """Where a present entry leads (the address field as written, reserved bits included)."""
    wide = case.entry_size == 8
    addr = value & (mask(12, 51) if wide else 0xFFFFF000)
    long = case.mode in ("4-level", "5-level")
    if level == 1:
        shift = 12
    elif level == 2 and value & PTE_PS and (wide or case.cr4 & CR4_PSE):
        shift = 21 if wide else 22
    elif level == 3 and long and value & PTE_PS:
        shift = 30
    else:
        return f"-> table {addr:#x}"
    if shift == 22:
        addr = (value & 0xFFC00000) | (((value >> 13) & 0xFF) << 32)
    else:
        addr &= ~((1 << shift) - 1)
    return f"-> {_walker.PAGE_SIZE_NAMES[shift]} page {addr:#x}"


def describe_case(case: Case) -> str:
    lines = [f"mode {case.mode}: CR0={case.cr0:#x} [{_names(case.cr0, _CR0_NAMES)}] "
             f"CR3={case.cr3:#x} CR4={case.cr4:#x} [{_names(case.cr4, _CR4_NAMES)}] "
             f"EFER={case.efer:#x} [{_names(case.efer, _EFER_NAMES)}]",
             f"CPL={case.cpl} RFLAGS.AC={int(case.ac)} PKRU={case.pkru:#010x} MAXPHYADDR={MAXPHYADDR}"]
    acc = f"access: {case.kind}"
    if case.kind != "fetch":
        acc += f" {case.size} byte{'s' if case.size > 1 else ''}"
    acc += f" at {case.vaddr:#x}"
    if case.value is not None:
        acc += f", value {case.value.hex()} (bytes in memory order)"
    if len(case.pieces()) > 1:
        acc += " (crosses a page boundary)"
    lines.append(acc)
    if case.notes:
        lines.append("generator: " + "; ".join(case.notes))
    names = LEVEL_NAMES.get(PagingMode(case.mode), {})
    width = case.entry_size
    for va, path in case.walks:
        lines.append(f"walk of {va:#x}:")
        for level, ea in path:
            value = _word(case.pages, ea, width)
            target = _points_to(case, level, value) if value & PTE_P else ""
            flags = _entry_flags(case, level, value, "page" in target)
            lines.append(f"  {names[level]:<5} at {ea:#012x} = {value:#0{2 + 2 * width}x}  "
                         f"{flags} {target}".rstrip())
    lines.append("pages: " + " ".join(f"{pfn:#x}" for pfn in sorted(case.pages)))
    return "\n".join(lines)


def report(case: Case, ours: Outcome, qemu: Outcome, verdict: Verdict) -> str:
    lines = ["our model and QEMU disagree:"]
    lines += [f"  - {p}" for p in verdict.problems]
    lines.append(describe_case(case))
    lines.append(f"ours: {ours.summary()}")
    if ours.variant is not None:
        lines.append(f"ours, run QEMU's PDPTE way: {ours.variant.summary()}")
    lines.append(f"QEMU: {qemu.summary()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# the seeded campaign
# ----------------------------------------------------------------------------
def selfcheck(cases: int, seed: int = 0, progress=None, *, modes=None) -> dict:
    """Run ``cases`` random cases (``case_for(seed, i)``) on both sides.

    ``progress(done, total)`` is called after every case.  Returns a dict:
    ``seed``, ``cases``, ``seconds``, ``modes`` (mode -> counts of cases, ``ok``
    (no fault), ``page_faults``, ``gp`` and ``mismatches``), ``error_codes``
    (mode -> {error code: count} of our #PFs), ``allowances`` (departure name
    -> cases it applied to) and ``mismatches`` (a list of dicts: ``index``,
    ``mode``, ``problem`` (the first difference) and ``report`` (the whole
    description; ``case_for(seed, index)`` rebuilds the case))."""
    if modes is not None:
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValueError(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    t0 = time.perf_counter()
    per_mode = {m: Counter() for m in MODES}
    codes = {m: Counter() for m in MODES}
    allowances = Counter()
    mismatches = []
    for i in range(cases):
        case = case_for(seed, i, modes=modes)
        stats = per_mode[case.mode]
        stats["cases"] += 1
        try:
            ours, qemu = run_case(case)
            verdict = compare(case, ours, qemu)
        except Exception as exc:      # a harness problem is a finding too; keep going
            stats["mismatches"] += 1
            mismatches.append({"index": i, "mode": case.mode, "problem": f"{type(exc).__name__}: {exc}",
                               "report": f"{type(exc).__name__}: {exc}\n{describe_case(case)}"})
        else:
            if ours.fault is not None:
                stats["page_faults"] += 1
                codes[case.mode][ours.fault[1]] += 1
            elif ours.other is not None:
                stats["gp"] += 1
            else:
                stats["ok"] += 1
            for name in set(verdict.allowances):
                allowances[name] += 1
            if verdict.problems:
                stats["mismatches"] += 1
                mismatches.append({"index": i, "mode": case.mode, "problem": verdict.problems[0],
                                   "report": report(case, ours, qemu, verdict)
                                   + f"\nreplay: shadowmmu.verify.differential.case_for({seed}, {i}"
                                   + (f", modes={tuple(modes)!r})" if modes else ")")})
        if progress is not None:
            progress(i + 1, cases)
    return {
        "seed": seed,
        "cases": cases,
        "seconds": time.perf_counter() - t0,
        "modes": {m: {k: per_mode[m][k] for k in ("cases", "ok", "page_faults", "gp", "mismatches")}
                  for m in MODES if per_mode[m]["cases"]},
        "error_codes": {m: dict(sorted(codes[m].items())) for m in MODES if codes[m]},
        "allowances": dict(allowances),
        "mismatches": mismatches,
    }
