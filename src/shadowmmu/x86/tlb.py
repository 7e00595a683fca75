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

from .bits import ACC_WRITE, R_U
from .cpu import CpuState, access_index
from .walker import _pkey_denies, translate

_LARGE_SHIFTS = (21, 22, 30)


class Tlb:
    """Translation cache keyed by 4 KB virtual page number.

    A 2 MB / 4 MB / 1 GB translation is cached as 4 KB pieces ("splinters", as
    real TLBs may do), each filled on its first use, and indexed by the large
    page so that INVLPG of any address inside it drops every piece: the
    architectural effect of invalidating the large entry.  One dict lookup then
    serves every hit, whatever the page size.

    Entry: (page base paddr, rights index, dirty, global, protection key)."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self.small: dict[int, tuple] = {}                         # vaddr >> 12 -> entry
        self.large: dict[int, dict[int, set[int]]] = {s: {} for s in _LARGE_SHIFTS}   # large key -> vpns
        self.nr_large = 0
        self.hits = 0
        self.misses = 0

    # --- lookup ---------------------------------------------------------------
    def lookup(self, vaddr: int) -> tuple | None:
        return self.small.get(vaddr >> 12)

    def translate(self, mem, cpu: CpuState, vaddr: int, access: int = 0, probe: bool = False) -> int:
        """Physical address of ``vaddr`` for ``access``: from the TLB when a valid entry
        allows it, else by a walk (filling the TLB).  Raises PageFault like translate(),
        or with ``probe`` returns -1 instead."""
        e = self.small.get(vaddr >> 12)
        if e is not None:
            r = e[1]
            if not cpu.perm[r | access_index(access, cpu.ac)] and (e[2] or not access & ACC_WRITE) and not (
                    cpu.pk_active and r & R_U and not access & 16
                    and _pkey_denies(cpu, e[4], access & ACC_WRITE, access)):
                self.hits += 1
                return e[0] | (vaddr & 0xFFF)
            self.invlpg(vaddr)
        self.misses += 1
        t = translate(mem, cpu, vaddr, access, record=False, probe=probe)
        if t is None:
            return -1
        self.fill(t)
        return t.paddr

    def fill(self, t) -> None:
        shift = t.page_shift
        vpn = t.vaddr >> 12
        entry = (t.paddr & ~0xFFF, t.rights, t.dirty, t.global_page, t.pkey)
        if len(self.small) >= self.capacity:
            self.flush()        # a crude but correct replacement policy: dropping entries is always allowed
        self.small[vpn] = entry
        if shift != 12:
            pieces = self.large[shift].setdefault(t.vaddr >> shift, set())
            if not pieces:
                self.nr_large += 1
            pieces.add(vpn)

    # --- invalidation ---------------------------------------------------------
    def invlpg(self, vaddr: int) -> None:
        """INVLPG: drop every entry, of any page size, that maps vaddr (global ones too)."""
        small = self.small
        small.pop(vaddr >> 12, None)
        if self.nr_large:
            for shift, index in self.large.items():
                pieces = index.pop(vaddr >> shift, None)
                if pieces is not None:
                    self.nr_large -= 1
                    for vpn in pieces:
                        small.pop(vpn, None)

    def flush(self) -> None:
        """Drop everything (CR4.PGE toggle, paging mode change, INVPCID all)."""
        self.small.clear()
        for d in self.large.values():
            d.clear()
        self.nr_large = 0

    def flush_nonglobal(self) -> None:
        """Drop the non-global entries (a CR3 load with CR4.PGE set)."""
        self.small = {k: e for k, e in self.small.items() if e[3]}
        for shift in _LARGE_SHIFTS:
            index = self.large[shift]
            for key in list(index):
                pieces = {vpn for vpn in index[key] if vpn in self.small}
                if pieces:
                    index[key] = pieces
                else:
                    del index[key]
        self.nr_large = sum(len(d) for d in self.large.values())

    def on_cr3_write(self, cpu: CpuState) -> None:
        """What a MOV to CR3 does to the TLB: non-global entries go; with CR4.PGE
        global entries stay, without it everything goes."""
        if cpu.cr4 & 0x80:
            self.flush_nonglobal()
        else:
            self.flush()

    def __len__(self) -> int:
        return len(self.small)
