"""Processes: executable images, spawn, fork, exec, exit and reaping.

fork copies VMAs and ptes, write-protecting private writable ptes in the parent
(each a guest store) and the child (pte_wrprotect + pte_mkold), then flushes
the parent's TLB with a CR3 reload (dup_mmap's flush_tlb_mm).  exit loads
swapper_pg_dir (leave_mm), clears every present pte (one store each), frees the
pages, then frees the page tables, clearing each upper entry that pointed to one
(free_pgtables), and the root.  exec builds the new image's VMAs, switches CR3
to it and tears the old one down.  munmap/mprotect: one store and one INVLPG per
"""

from __future__ import annotations

from ...x86.bits import PTE_A, PTE_W
from ..files import File
from ..user import PROT_EXEC, PROT_READ, PROT_WRITE, User
from .mm import Mm, Vma

STACK_PAGES = 8                  # initial stack VMA


class Image:
    """An executable: text and data from a file, bss, the shared libraries it maps."""

    def __init__(self, name: str, file: File, text_pages: int, data_pages: int, bss_pages: int = 0,
                 libs: tuple = ()):
        self.name, self.file = name, file
        self.text_pages, self.data_pages, self.bss_pages = text_pages, data_pages, bss_pages
        self.libs = libs          # ((File, text_pages, data_pages), ...)


class Process:
    __slots__ = ("pid", "name", "parent", "children", "mm", "gen", "user", "ret", "state", "status")

    def __init__(self, pid, name, parent):
        self.pid, self.name, self.parent = pid, name, parent
        self.children: list[Process] = []
        self.mm = None
        self.gen = None
        self.user = None
        self.ret = None
        self.state = "runnable"       # runnable | waiting | zombie | dead
        self.status = None


class Processes:
    def _new_process(self, name: str, parent) -> Process:
        p = Process(self.next_pid, name, parent)
        self.next_pid += 1
        self.procs[p.pid] = p
        if parent is not None:
            parent.children.append(p)
        return p

    def _mm_from_image(self, image: Image) -> tuple[Mm, dict]:
        pg = self.pg
        mm = Mm(self._pgd_alloc())
        if pg.name == "pae":
            mm.tables = 4
        lay = {}
        t = pg.text_base
        rx, rw = PROT_READ | PROT_EXEC, PROT_READ | PROT_WRITE
        mm.insert(Vma(t, t + (image.text_pages << 12), rx, image.file, 0, "text"))
        lay["text"], lay["text_pages"] = t, image.text_pages
        t += image.text_pages << 12
        if image.data_pages:
            mm.insert(Vma(t, t + (image.data_pages << 12), rw, image.file, image.text_pages, "data"))
        lay["data"], lay["data_pages"] = t, image.data_pages
        t += image.data_pages << 12
        if image.bss_pages:
            mm.insert(Vma(t, t + (image.bss_pages << 12), rw, None, 0, "bss"))
        lay["bss"], lay["bss_pages"] = t, image.bss_pages
        t += image.bss_pages << 12
        mm.start_brk = mm.brk = t
        lay["heap"] = t
        m = pg.mmap_base
        for i, (f, tp, dp) in enumerate(image.libs):
            mm.insert(Vma(m, m + (tp << 12), rx, f, 0, "lib"))
            lay[f"lib{i}"], lay[f"lib{i}_pages"] = m, tp
            m += tp << 12
            if dp:
                mm.insert(Vma(m, m + (dp << 12), rw, f, tp, "libdata"))
            lay[f"lib{i}_data"], lay[f"lib{i}_data_pages"] = m, dp
            m += dp << 12
        mm.mmap_base = m
        top = pg.user_top & ~0xFFF
        mm.insert(Vma(top - (STACK_PAGES << 12), top, rw, None, 0, "stack", growsdown=True))
        lay["stack_top"] = top
        return mm, lay

    def spawn(self, image: Image, prog, *args, name: str | None = None) -> Process:
        """Start a process running ``prog`` in a fresh image (init's kernel_execve)."""
        p = self._new_process(name or image.name, None)
        p.mm, lay = self._mm_from_image(image)
        p.user = User(self, p)
        p.user.layout = lay
        p.gen = prog(p.user, *args)
        self.runq.append(p)
        return p

    def _do_fork(self, parent: Process, fn, args) -> Process:
        self.events["forks"] += 1
        child = self._new_process(parent.name, parent)
        pm = parent.mm
        cm = Mm(self._pgd_alloc())
        if self.pg.name == "pae":
            cm.tables = 4
        cm.start_brk, cm.brk, cm.mmap_base = pm.start_brk, pm.brk, pm.mmap_base
        pmask = self.pmask
        for vma in pm.vmas:
            cm.vmas.append(vma.copy())
            cow = vma.prot & PROT_WRITE
            for va, ptep, pte in self._pte_range(pm, vma.start, vma.end):
                if cow and pte & PTE_W:
                    self._wrprotect(ptep, pte)
                    pte &= ~PTE_W
                pte &= ~PTE_A                                      # pte_mkold
                cptep = self._pte_alloc(cm, va)
                self._set_pte(cptep, pte)
                frame = pte & pmask
                if frame != self.zero_page:
                    self.ref[frame >> 12] += 1
        self._write_cr3(pm.pgd)                                    # flush_tlb_mm(parent)
        child.mm = cm
        child.user = parent.user.child_copy(child)
        child.gen = fn(child.user, *args)
        self.runq.append(child)
        return child

    def _exit_mmap(self, mm: Mm) -> None:
        if self.loaded_pgd == mm.pgd:
            self._write_cr3(self.swapper)                           # leave_mm
        for vma in mm.vmas:
            self._zap_range(mm, vma.start, vma.end, flush=False)
        self._free_tables(mm)
        mm.vmas = []

    def _do_exec(self, p: Process, image: Image, fn, args) -> None:
        self.events["execs"] += 1
        old = p.mm
        p.mm, lay = self._mm_from_image(image)
        p.name = image.name
        self._write_cr3(p.mm.pgd)                                  # activate_mm
        self._exit_mmap(old)
        p.user = User(self, p)
        p.user.layout = lay
        p.gen = fn(p.user, *args)

    def _do_exit(self, p: Process, status: int) -> None:
        self.events["process_exits"] += 1
        if p.user is not None:
            self.events["user_accesses"] += p.user.naccesses
            p.user.naccesses = 0
        if p.mm is not None:
            self._exit_mmap(p.mm)
            p.mm = None
        p.gen = None
        p.status = status
        for c in p.children:                                        # reparent to init: reaped by nobody
            c.parent = None
            if c.state == "zombie":
                c.state = "dead"
                del self.procs[c.pid]
        p.children = []
        par = p.parent
        if par is None:
            p.state = "dead"
            del self.procs[p.pid]
            return
        p.state = "zombie"
        if par.state == "waiting":
            par.ret = self._reap(par, p)
            par.state = "runnable"
            self.runq.append(par)

    def _reap(self, parent: Process, child: Process):
        parent.children.remove(child)
        child.state = "dead"
        del self.procs[child.pid]
        return (child.pid, child.status)
