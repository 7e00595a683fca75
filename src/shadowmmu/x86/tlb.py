"""A TLB: cached translations, page-size aware, with global pages.

An entry caches what SDM 4.10.2.2 says a TLB entry holds: the physical page, the
effective rights of the walk (AND of R/W and U/S, OR of XD), the dirty bit, the
protection key and G.  Permission checks on a hit use those cached rights with
the *current* CR0.WP/SMEP/SMAP/CPL/AC, as the hardware does, so toggling CR0.WP
without a flush behaves as it does on a CPU.  A hit that would fault, or a write
through an entry cached with D=0, drops the entry and walks again: the processor
invalidates the entry for a faulting address and re-walks to set D, so the
fault (or the D update) comes from the paging structures in memory.
"""

from __future__ import annotations

from .bits import ACC_IMPLICIT, ACC_USER, ACC_WRITE
from .cpu import A_SMAP_OVERRIDE, R_U, CpuState
from .walker import _pkey_denies, translate

_LARGE_SHIFTS = (21, 22, 30)


class Tlb:
    """Translation cache keyed by virtual page number per page size.

    Entry: (page base paddr, rights index, dirty, global, pkey, leaf value for PK checks)."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self.small: dict[int, tuple] = {}                    # vaddr >> 12 -> entry
        self.large: dict[int, dict[int, tuple]] = {s: {} for s in _LARGE_SHIFTS}
        self.nr_large = 0
        self.hits = 0
        self.misses = 0

    # --- lookup ---------------------------------------------------------------
    def lookup(self, vaddr: int) -> tuple | None:
        e = self.small.get(vaddr >> 12)
        if e is None and self.nr_large:
            for shift, d in self.large.items():
                e = d.get(vaddr >> shift)
                if e is not None:
                    break
        return e

    def translate(self, mem, cpu: CpuState, vaddr: int, access: int = 0) -> int:
        """Physical address of ``vaddr`` for ``access``: from the TLB when a valid entry
        allows it, else by a walk (filling the TLB).  Raises PageFault like translate()."""
        e = self.small.get(vaddr >> 12)
        if e is None and self.nr_large:
            e = self.lookup(vaddr)
        if e is not None:
            acc = ((access & 6) << 2) | ((access & 16) << 1)
            if cpu.ac and not access & (ACC_USER | ACC_IMPLICIT):
                acc |= A_SMAP_OVERRIDE
            r = e[1]
            if not cpu.perm[r | acc] and (e[2] or not access & ACC_WRITE) and not (
                    cpu.pk_active and r & R_U and not access & 16
                    and _pkey_denies(cpu, e[5], access & ACC_WRITE, access)):
                self.hits += 1
                return e[0] | (vaddr & e[6])
            self.invlpg(vaddr)
        self.misses += 1
        t = translate(mem, cpu, vaddr, access)
        self.fill(t)
        return t.paddr

    def fill(self, t) -> None:
        shift = t.page_shift
        size_mask = (1 << shift) - 1
        leaf = t.entries[-1][2] if t.entries else 0
        entry = (t.paddr & ~size_mask, int(t.writable) | (int(t.user) << 1) | (int(t.executable) << 2),
                 t.dirty or not t.entries, t.global_page, t.pkey, leaf, size_mask)
        if shift == 12:
            d = self.small
        else:
            d = self.large[shift]
            self.nr_large += (vaddr_key := t.vaddr >> shift) not in d
            d[vaddr_key] = entry
            return
        if len(d) >= self.capacity:
            d.clear()           # a crude but correct replacement policy: dropping entries is always allowed
        d[t.vaddr >> 12] = entry

    # --- invalidation ---------------------------------------------------------
    def invlpg(self, vaddr: int) -> None:
        """INVLPG: drop every entry, of any page size, that maps vaddr (global ones too)."""
        self.small.pop(vaddr >> 12, None)
        if self.nr_large:
            for shift, d in self.large.items():
                if d.pop(vaddr >> shift, None) is not None:
                    self.nr_large -= 1

    def flush(self) -> None:
        """Drop everything (CR4.PGE toggle, paging mode change, INVPCID all)."""
        self.small.clear()
        for d in self.large.values():
            d.clear()
        self.nr_large = 0

    def flush_nonglobal(self) -> None:
        """A CR3 load: global entries survive when CR4.PGE is set by the caller's choice."""
        self.small = {k: e for k, e in self.small.items() if e[3]}
        for shift in _LARGE_SHIFTS:
            self.large[shift] = {k: e for k, e in self.large[shift].items() if e[3]}
        self.nr_large = sum(len(d) for d in self.large.values())

    def on_cr3_write(self, cpu: CpuState) -> None:
        """What a MOV to CR3 does to the TLB: non-global entries go; with CR4.PGE
        global entries stay, without it everything goes."""
        if cpu.cr4 & 0x80:
            self.flush_nonglobal()
        else:
            self.flush()

    def __len__(self) -> int:
        return len(self.small) + self.nr_large
