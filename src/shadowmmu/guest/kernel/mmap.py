"""The memory-mapping system calls (mmap.c, mprotect.c): brk, mmap, munmap, mprotect.

munmap/mprotect: one store and one INVLPG per present pte.
"""

from __future__ import annotations

from ...x86.bits import PTE_A, PTE_D, PTE_P, PTE_U
from ..user import PROT_EXEC, PROT_READ, PROT_WRITE
from .mm import STACK_LIMIT, Mm, Vma


class MemoryMap:
    def _find_free_area(self, mm: Mm, npages: int) -> int:
        addr = mm.mmap_base
        size = npages << 12
        for v in mm.vmas:
            if v.end <= addr:
                continue
            if v.start >= addr + size:
                break
            addr = max(addr, v.end)
        if addr + size > self.pg.user_top - STACK_LIMIT:
            return -1
        return addr

    def _split(self, mm: Mm, addr: int) -> None:
        for i, v in enumerate(mm.vmas):
            if v.start < addr < v.end:
                w = v.copy()
                w.start = addr
                if w.file is not None:
                    w.pgoff += (addr - v.start) >> 12
                v.end = addr
                mm.vmas.insert(i + 1, w)
                return

    def _munmap(self, mm: Mm, addr: int, end: int) -> None:
        self._split(mm, addr)
        self._split(mm, end)
        keep = []
        for v in mm.vmas:
            if v.start >= addr and v.end <= end:
                self._zap_range(mm, v.start, v.end, flush=self.loaded_pgd == mm.pgd)
            else:
                keep.append(v)
        mm.vmas = keep

    def _sys_brk(self, p, new: int) -> int:
        """brk(new): grow or shrink the heap VMA; 0 (or below the heap's start) asks the
        current break.  Returns the break, unchanged when the new heap would overlap a mapping."""
        mm = p.mm
        if new and new >= mm.start_brk:
            old_end = (mm.brk + 0xFFF) & ~0xFFF
            new_end = (new + 0xFFF) & ~0xFFF
            if new_end < old_end:
                self._munmap(mm, new_end, old_end)
                p.user.forget(new_end, (old_end - new_end) >> 12)
            elif new_end > old_end:
                nxt = mm.find_vma(mm.start_brk)
                heap = nxt if nxt is not None and nxt.kind == "heap" and nxt.end == old_end else None
                clash = mm.find_vma(old_end)
                if clash is not None and clash.start < new_end:
                    return mm.brk
                if heap is None:
                    mm.insert(Vma(old_end, new_end, PROT_READ | PROT_WRITE, None, 0, "heap"))
                else:
                    heap.end = new_end
            mm.brk = new
        return mm.brk

    def _sys_mmap(self, mm: Mm, npages: int, prot: int, file, pgoff: int) -> int:
        """A new VMA in the first free gap above mmap_base: its address, or -1 (no room)."""
        addr = self._find_free_area(mm, npages)
        if addr >= 0:
            mm.insert(Vma(addr, addr + (npages << 12), prot, file, pgoff, "mmap"))
        return addr

    def _sys_munmap(self, p, addr: int, npages: int) -> int:
        self._munmap(p.mm, addr, addr + (npages << 12))
        p.user.forget(addr, npages)
        return 0

    def _sys_mprotect(self, mm: Mm, addr: int, npages: int, prot: int) -> int:
        end = addr + (npages << 12)
        self._split(mm, addr)
        self._split(mm, end)
        for v in mm.vmas:
            if v.start >= addr and v.end <= end:
                v.prot = prot
                for va, ptep, pte in self._pte_range(mm, v.start, v.end):
                    # private mappings: writes always go through the fault path (PAGE_COPY)
                    # PROT_NONE keeps the page but takes U away (the fault path says SIGSEGV)
                    new = (pte & (self.pmask | PTE_A | PTE_D)) | PTE_P
                    if prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
                        new |= PTE_U
                    if not prot & PROT_EXEC:
                        new |= self.nx
                    if new != pte:
                        self._set_pte(ptep, new)
                        self._invlpg(va)
        return 0
