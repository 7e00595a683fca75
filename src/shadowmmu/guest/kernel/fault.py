"""The page-fault handler (do_page_fault, handle_mm_fault): demand zero, file faults, copy on write.

Faults.  find_vma; a bad access (no VMA, wrong rights, a kernel address) is
SIGSEGV: the process dies, the kernel goes on.  Not-present pte: anonymous →
demand zero (a read maps the shared ZERO_PAGE read-only, a write a freshly
zeroed page); file → page cache (hit, or "read": fill a new frame with the file's
content by 512 stores), mapped read-only, or copied at once for a write to a
private mapping.  Present read-only pte and a write in a writable VMA → copy on
write: reuse the page when the faulting process holds the only reference,
otherwise copy it (from the zero page: zero a new one).  Each changed pte is
one store (ptep_establish) followed by INVLPG; a new pte needs no flush.

The handler tells ``Kernel.fault_observer`` (None, or a callable set from outside
the guest, e.g. ``analysis/fault_meter.py``) what only it knows, once per fault
and before it acts: ``observer(kind, table_gpa, new_table)`` -- the kind it
classified (``FAULT_KINDS``), the guest-physical address of the page table holding
the faulting pte (None for SIGSEGV) and whether it allocated that table for this
fault.  Like a tracepoint, the call reads nothing back and changes nothing the
kernel does; the kernel itself never reads a hypervisor counter.
"""

from __future__ import annotations

from ...x86.bits import PF_ID, PF_U, PF_W, PTE_A, PTE_D, PTE_P, PTE_W
from ..user import PROT_EXEC, PROT_READ, PROT_WRITE
from .errors import GuestKernelError, Segfault
from .mm import STACK_LIMIT, Mm, Vma
from .process import Process

# What the handler tells its observer a fault was (``Kernel.fault_observer``):
FAULT_KINDS = ("demand", "cow", "file", "segv", "spurious")


class Faults:
    def _page_fault(self, vcpu, addr: int, err: int) -> None:
        p = self.current
        if p is None or p.mm is None:
            raise GuestKernelError(f"page fault at {addr:#x} (error code {err:#x}) with no user context")
        mm = p.mm
        if addr >= self.pg.user_top:
            if not err & PF_U:
                raise GuestKernelError(f"kernel oops: fault at kernel address {addr:#x} error {err:#x}")
            self._segv(p, addr, err, "user access to a kernel address")
        vma = mm.find_vma(addr)
        if vma is None:
            self._segv(p, addr, err, "no mapping")
        if addr < vma.start:
            if not vma.growsdown or addr < vma.start - (64 << 10) or vma.end - (addr & ~0xFFF) > STACK_LIMIT:
                self._segv(p, addr, err, "no mapping")
            vma.start = addr & ~0xFFF                       # expand_stack
        write = err & PF_W
        if write:
            if not vma.prot & PROT_WRITE:
                self._segv(p, addr, err, "write to a read-only mapping")
        elif err & PF_ID:
            if not vma.prot & PROT_EXEC:
                self._segv(p, addr, err, "execute from a non-executable mapping")
        elif not vma.prot & (PROT_READ | PROT_EXEC):
            self._segv(p, addr, err, "read of a PROT_NONE mapping")
        ev = self.events
        tables = ev["page_tables_allocated"]
        ptep = self._pte_alloc(mm, addr)
        pte = self._ld(ptep)
        if not pte & PTE_P:
            kind = "demand" if vma.file is None else "file"
        elif write and not pte & PTE_W:
            kind = "cow"
        else:
            kind = "spurious"      # the pte already allows the access: a stale TLB entry (never with our flushing)
        obs = self.fault_observer
        if obs is not None:
            # what the handler knows: the kind, the page table holding the pte, whether it had to allocate it
            obs(kind, (ptep - self.po) & ~0xFFF, ev["page_tables_allocated"] != tables)
        if kind == "demand":
            ev["demand_faults"] += 1
            if write:
                new = self._alloc_page(zero=True)
                self._set_pte(ptep, new | self._pte_flags(vma, True))
            else:
                ev["zero_page_maps"] += 1
                self._set_pte(ptep, self.zero_page | self._pte_flags(vma, False))
        elif kind == "file":
            ev["file_faults"] += 1
            self._do_file_fault(mm, vma, addr, ptep, write)
        elif kind == "cow":
            ev["cow_faults"] += 1
            self._do_wp_page(vma, addr, ptep, pte)
        else:
            ev["spurious_faults"] += 1
            self._invlpg(addr)

    def _segv(self, p: Process, addr: int, err: int, why: str):
        obs = self.fault_observer
        if obs is not None:
            obs("segv", None, False)
        self.events["segv"] += 1
        exc = Segfault(p.pid, addr, err, why)
        self.segfaults.append(str(exc))
        raise exc

    def _do_file_fault(self, mm: Mm, vma: Vma, addr: int, ptep: int, write: int) -> None:
        index = vma.pgoff + ((addr - vma.start) >> 12)
        if index >= vma.file.npages:
            self._segv(self.current, addr, PF_U, f"beyond the end of {vma.file.name} (SIGBUS)")
        pa = self._find_get_page(vma.file, index)
        if write:                                    # private mapping: copy at once
            new = self._alloc_page(zero=False)
            self._copy_page(new, pa)
            self._set_pte(ptep, new | self._pte_flags(vma, True))
        else:
            self.ref[pa >> 12] += 1
            self._set_pte(ptep, pa | self._pte_flags(vma, False))

    def _do_wp_page(self, vma: Vma, addr: int, ptep: int, pte: int) -> None:
        old = pte & self.pmask
        pfn = old >> 12
        if old != self.zero_page and self.ref[pfn] == 1 and not self.in_cache[pfn]:
            self.events["cow_reused"] += 1
            self._set_pte(ptep, pte | PTE_W | PTE_D | PTE_A)
        else:
            if old == self.zero_page:
                new = self._alloc_page(zero=True)
            else:
                new = self._alloc_page(zero=False)
                self._copy_page(new, old)
            self._set_pte(ptep, new | self._pte_flags(vma, True))
            self._put_page(old)
        self._invlpg(addr)
