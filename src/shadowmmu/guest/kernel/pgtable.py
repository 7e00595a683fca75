"""Page tables: pte stores, TLB flushes, allocating, walking and freeing tables.

Address spaces.  pgd_alloc zeroes the user half of a new root and copies the
kernel half from swapper_pg_dir (pgd_ctor's clone_pgd_range).  64-bit: one
kernel PML4 entry, the kernel PDPT below it shared.  PAE: the root is a PDPT
(given a whole frame here; Linux used a 32-byte slab object) whose three user
PMDs are preallocated (as 2.6 PAE did, so PDPTEs never change under a loaded
CR3) and whose fourth entry is the kernel PMD, shared by every process.
32-bit: the 256 kernel PDEs (4 MB pages) are copied.  User entries are written
with A set, D set when the fault was a write (the PAGE_* protections include
_PAGE_ACCESSED), NX on non-executable pages of the 8-byte formats.

PAE pte stores (``pae_halves``, on by default): i386 PAE Linux writes an 8-byte
pte with 4-byte stores -- set_pte writes the high half, then (after a barrier)
the low half; ptep_get_and_clear the low then the high half; ptep_set_wrprotect
is a 4-byte clear_bit on the low word.  No such store covers a whole pte, so the
seed's update_pte (which acts on whole-pte writes only) never fires on a PAE
Linux guest: a demand fault costs 4 exits under *both* policies (#PF, two
emulated half writes, the #PF that installs the spte).  ``pae_halves=False`` is
the explicit variant of a guest that writes whole 8-byte ptes (as 64-bit Linux
does, and as cmpxchg8b-based PAE code could).
"""

from __future__ import annotations

from ...x86.bits import PTE_A, PTE_D, PTE_P, PTE_U, PTE_W
from ..user import PROT_EXEC
from .mm import Mm, Vma


class PageTables:
    def _ld(self, va: int) -> int:
        self.events["kernel_accesses"] += 1
        return self.vcpu.load(va, self.psz)

    def _set_pte(self, ptep: int, val: int) -> None:
        """set_pte: one full-width store (PAE with pae_halves: high half, then low half)."""
        ev = self.events
        ev["pte_writes"] += 1
        ev["kernel_accesses"] += 1
        if self.pae_halves:
            ev["kernel_accesses"] += 1
            self.vcpu.store(ptep + 4, val >> 32, 4)
            self.vcpu.store(ptep, val & 0xFFFFFFFF, 4)
        else:
            self.vcpu.store(ptep, val, self.psz)

    def _clear_pte(self, ptep: int) -> None:
        """ptep_get_and_clear (PAE with pae_halves: low half, then high half)."""
        ev = self.events
        ev["pte_writes"] += 1
        ev["kernel_accesses"] += 1
        if self.pae_halves:
            ev["kernel_accesses"] += 1
            self.vcpu.store(ptep, 0, 4)
            self.vcpu.store(ptep + 4, 0, 4)
        else:
            self.vcpu.store(ptep, 0, self.psz)

    def _wrprotect(self, ptep: int, pte: int) -> None:
        """ptep_set_wrprotect: clear R/W (PAE with pae_halves: a 4-byte clear_bit on pte_low)."""
        ev = self.events
        ev["pte_writes"] += 1
        ev["kernel_accesses"] += 1
        if self.pae_halves:
            self.vcpu.store(ptep, (pte & ~PTE_W) & 0xFFFFFFFF, 4)
        else:
            self.vcpu.store(ptep, pte & ~PTE_W, self.psz)

    def _set_entry(self, ep: int, val: int) -> None:
        """A non-leaf entry (pmd_populate, pud_populate, pgd_populate, *_clear)."""
        ev = self.events
        ev["pte_writes"] += 1
        ev["kernel_accesses"] += 1
        self.vcpu.store(ep, val, self.psz)

    def _invlpg(self, va: int) -> None:
        self.events["invlpgs"] += 1
        self.vcpu.invlpg(va)

    def _write_cr3(self, pgd: int) -> None:
        self.events["cr3_writes"] += 1
        self.vcpu.write_cr3(pgd)
        self.loaded_pgd = pgd

    def _pgd_alloc(self) -> int:
        """A new root: user half zero, kernel half copied from swapper_pg_dir."""
        pg, po = self.pg, self.po
        v = self.vcpu
        ld, st = v.load, v.store
        if pg.name == "pae":
            pgd = self._alloc_page(zero=False)
            for i in range(3):
                pmd = self._alloc_page(zero=True)
                self._set_entry(po + pgd + 8 * i, pmd | PTE_P)
            self._set_entry(po + pgd + 24, self.kernel_pmd | PTE_P)
            return pgd
        pgd = self._alloc_page(zero=False)
        lo, hi = self.kernel_pgd_range
        split = lo * self.psz
        base = po + pgd
        for a in range(base, base + split, 8):
            st(a, 0)
        src = po + self.swapper - base
        for a in range(base + split, base + 4096, 8):
            st(a, ld(a + src))
        self.events["kernel_accesses"] += (split >> 3) + 2 * ((4096 - split) >> 3)
        return pgd

    def _pte_alloc(self, mm: Mm, addr: int) -> int:
        """Direct-map address of the pte slot for addr, allocating tables on the way."""
        levels = self.pg.levels
        po, psz, pmask = self.po, self.psz, self.pmask
        table = mm.pgd
        for shift, n in levels[:-1]:
            ep = po + table + ((addr >> shift) & (n - 1)) * psz
            e = self._ld(ep)
            if not e & PTE_P:
                new = self._alloc_page(zero=True)
                self.events["page_tables_allocated"] += 1
                mm.tables += 1
                e = new | self.pg.user_table
                self._set_entry(ep, e)
            table = e & pmask
        return po + table + ((addr >> 12) & (levels[-1][1] - 1)) * psz

    def _pte_range(self, mm: Mm, start: int, end: int):
        """(va, ptep, pte) for every present pte in [start, end) (no allocation)."""
        out = []
        self._walk(mm.pgd, 0, start, end, out)
        return out

    def _walk(self, table: int, depth: int, start: int, end: int, out: list) -> None:
        levels = self.pg.levels
        shift, n = levels[depth]
        po, psz = self.po, self.psz
        last = depth == len(levels) - 1
        span = 1 << shift
        va = start
        while va < end:
            idx = (va >> shift) & (n - 1)
            ep = po + table + idx * psz
            e = self._ld(ep)
            nxt = min(end, (va & ~(span - 1)) + span)
            if e & PTE_P:
                if last:
                    out.append((va, ep, e))
                else:
                    self._walk(e & self.pmask, depth + 1, va, nxt, out)
            va = nxt

    def _free_tables(self, mm: Mm) -> None:
        """free_pgtables + pgd_free for a whole user address space."""
        levels = self.pg.levels
        po, psz, pmask = self.po, self.psz, self.pmask
        top_shift, top_n = levels[0]
        user_entries = (self.pg.user_top + (1 << top_shift) - 1) >> top_shift
        if self.pg.name == "pae":
            user_entries = 3

        def free_below(table: int, depth: int) -> None:
            shift, n = levels[depth]
            for idx in range(n):
                ep = po + table + idx * psz
                e = self._ld(ep)
                if e & PTE_P:
                    child = e & pmask
                    if depth + 1 < len(levels) - 1:
                        free_below(child, depth + 1)
                    self._set_entry(ep, 0)
                    self._put_page(child)
                    self.events["page_tables_freed"] += 1

        for idx in range(min(user_entries, top_n)):
            ep = po + mm.pgd + idx * psz
            e = self._ld(ep)
            if not e & PTE_P:
                continue
            child = e & pmask
            if len(levels) > 2:
                free_below(child, 1)
            if self.pg.name != "pae":                      # PAE: pgd_free frees the PMDs as they are
                self._set_entry(ep, 0)
            self._put_page(child)
            self.events["page_tables_freed"] += 1
        self._put_page(mm.pgd)
        self.events["page_tables_freed"] += 1

    # ========================================================= ptes of VMAs
    def _pte_flags(self, vma: Vma, write: bool) -> int:
        f = PTE_P | PTE_U | PTE_A
        if write:
            f |= PTE_W | PTE_D
        if not vma.prot & PROT_EXEC:
            f |= self.nx
        return f

    def _zap_range(self, mm: Mm, start: int, end: int, flush: bool) -> None:
        for va, ptep, pte in self._pte_range(mm, start, end):
            self._clear_pte(ptep)
            if flush:
                self._invlpg(va)
            self._put_page(pte & self.pmask)
