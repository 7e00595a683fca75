"""A Linux-2.6-like guest kernel: memory management, processes, page faults.

It runs on a vCPU and has no back door: every read and write of its page tables,
every page it zeroes, copies or fills, is a load or store at CPL0 through the
direct map; user work is loads/stores/fetches at CPL3 (``user.py``).  It never
looks at ``vm.gmem`` or ``vm.host``.  The same code runs on native paging and on
the shadow MMU, for the 32-bit, PAE and 4-level formats (``paging.py``).

What it does, as Linux 2.6 (~2.6.22, the seed's era) did it, simplified:

Boot.  Paging is off (gva == gpa): the first MB is reserved (BIOS, kernel image),
boot page tables come from a bump allocator above it ("bootmem", zeroed with
stores) and map all RAM at PAGE_OFFSET with large pages (4 MB with CR4.PSE on
the 32-bit format, 2 MB otherwise), supervisor-only, global, A and D set.  CR4.PGE
is on.  Frames are cleared when they are allocated (clear_page of a fresh
anonymous page, as Linux does), never all at boot -- unless ``frames="warm"``:
then boot also zeroes every free frame through the direct map, as init_on_free
would do (Linux 2.6 had no such option).  That touches every 4 KB piece of the
direct map once, so under shadow paging the direct map is fully shadowed before
any workload starts: the kernel's clear_page of a frame later costs no exit, as
for a frame recycled in a long-running guest.  ``frames="cold"`` (every frame
touched for the first time when allocated) is a freshly booted guest: the first
kernel touch of each frame's direct-map piece takes a hidden #PF.  Cold boot
costs time and host memory for the pages touched only, so a 64 GiB guest boots
in well under a second.  Boot exits are reported apart from the workload's.

Frames.  A LIFO free list (the last frame freed is the next allocated, like the
per-CPU hot list) in front of the never-used frames, handed out in ascending
order; a reference count per frame (4 bytes each, like a slim struct page).  A page-cache frame holds a
reference for the cache; the zero page is pinned and never counted.

Address spaces.  pgd_alloc zeroes the user half of a new root and copies the
kernel half from swapper_pg_dir (pgd_ctor's clone_pgd_range).  64-bit: one
kernel PML4 entry, the kernel PDPT below it shared.  PAE: the root is a PDPT
(given a whole frame here; Linux used a 32-byte slab object) whose three user
PMDs are preallocated (as 2.6 PAE did, so PDPTEs never change under a loaded
CR3) and whose fourth entry is the kernel PMD, shared by every process.
32-bit: the 256 kernel PDEs (4 MB pages) are copied.  User entries are written
with A set, D set when the fault was a write (the PAGE_* protections include
_PAGE_ACCESSED), NX on non-executable pages of the 8-byte formats.

Faults.  find_vma; a bad access (no VMA, wrong rights, a kernel address) is
SIGSEGV: the process dies, the kernel goes on.  Not-present pte: anonymous →
demand zero (a read maps the shared ZERO_PAGE read-only, a write a freshly
zeroed page); file → page cache (hit, or "read": fill a new frame with the file's
content by 512 stores), mapped read-only, or copied at once for a write to a
private mapping.  Present read-only pte and a write in a writable VMA → copy on
write: reuse the page when the faulting process holds the only reference,
otherwise copy it (from the zero page: zero a new one).  Each changed pte is
one store (ptep_establish) followed by INVLPG; a new pte needs no flush.

fork copies VMAs and ptes, write-protecting private writable ptes in the parent
(each a guest store) and the child (pte_wrprotect + pte_mkold), then flushes
the parent's TLB with a CR3 reload (dup_mmap's flush_tlb_mm).  exit loads
swapper_pg_dir (leave_mm), clears every present pte (one store each), frees the
pages, then frees the page tables, clearing each upper entry that pointed to one
(free_pgtables), and the root.  exec builds the new image's VMAs, switches CR3
to it and tears the old one down.  munmap/mprotect: one store and one INVLPG per
present pte.  A context switch is a CR3 write (which flushes the non-global TLB).

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

from array import array
from collections import deque

from ..x86.bits import (
    CR4_PGE, PF_ID, PF_U, PF_W, PTE_A, PTE_D, PTE_P, PTE_U, PTE_W,
)
from ..x86.builder import control_registers
from .files import K_WORD, M64, File, file_key
from .measure import FaultMeter
from .paging import guest_paging
from .user import (
    PROT_EXEC, PROT_READ, PROT_WRITE, SYS_BRK, SYS_EXEC, SYS_EXIT, SYS_FORK, SYS_GETPID, SYS_MMAP,
    SYS_MPROTECT, SYS_MUNMAP, SYS_READ, SYS_WAIT, SYS_WRITE, SYS_YIELD, User,
)

FRAMES = ("warm", "cold")        # boot zeroes all RAM (warm) or frames are first touched when allocated
RESERVED_FRAMES = 0x100          # the first MB: BIOS, kernel image
STACK_PAGES = 8                  # initial stack VMA
STACK_LIMIT = 8 << 20            # RLIMIT_STACK
SIGSEGV = 11

EVENT_NAMES = ("demand_faults", "file_faults", "cow_faults", "segv", "spurious_faults", "forks", "execs",
               "process_exits", "context_switches", "pte_writes", "invlpgs", "cr3_writes", "user_accesses",
               "kernel_accesses", "pages_zeroed", "pages_copied", "pages_read", "cow_reused",
               "zero_page_maps", "page_cache_hits", "page_tables_allocated", "page_tables_freed",
               "syscalls", "verified_qwords")


class Segfault(Exception):
    """SIGSEGV: raised by the fault handler, it leaves the user program (the
    generator) and the kernel kills the process."""

    def __init__(self, pid: int, address: int, error_code: int, why: str):
        super().__init__(f"pid {pid}: SIGSEGV at {address:#x} (error code {error_code:#x}): {why}")
        self.address, self.error_code, self.why = address, error_code, why


class GuestKernelError(RuntimeError):
    """The guest kernel hit a condition it cannot handle (out of memory, a fault in kernel code)."""


class Vma:
    __slots__ = ("start", "end", "prot", "file", "pgoff", "kind", "growsdown")

    def __init__(self, start, end, prot, file=None, pgoff=0, kind="anon", growsdown=False):
        self.start, self.end, self.prot, self.file, self.pgoff = start, end, prot, file, pgoff
        self.kind, self.growsdown = kind, growsdown

    def copy(self) -> "Vma":
        return Vma(self.start, self.end, self.prot, self.file, self.pgoff, self.kind, self.growsdown)

    def __repr__(self) -> str:
        p = "".join(c if self.prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
        return f"Vma({self.start:#x}-{self.end:#x} {p} {self.kind}{' ' + self.file.name if self.file else ''})"


class Mm:
    __slots__ = ("pgd", "vmas", "start_brk", "brk", "mmap_base", "tables")

    def __init__(self, pgd: int):
        self.pgd = pgd
        self.vmas: list[Vma] = []
        self.start_brk = self.brk = 0
        self.mmap_base = 0
        self.tables = 1

    def find_vma(self, addr: int):
        """The first VMA ending above addr (Linux's find_vma)."""
        for v in self.vmas:
            if v.end > addr:
                return v
        return None

    def insert(self, vma: Vma) -> None:
        self.vmas.append(vma)
        self.vmas.sort(key=lambda v: v.start)


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


class Kernel:
    def __init__(self, vm, guest: str = "64", seed: int = 0, *, mem: int | None = None,
                 pae_halves: bool = True, frames: str = "warm", boot_progress=None):
        if frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
        self.frames = frames
        self.vm = vm
        self.vcpu = vm.vcpu
        self.pg = pg = guest_paging(guest)
        self.guest = pg.name
        self.seed = seed
        self.pae_halves = pae_halves and pg.name == "pae"
        ram = vm.ram_pages << 12
        if mem is not None:
            ram = min(ram, mem & ~0xFFF)
        if ram > pg.max_lowmem:
            raise ValueError(f"the {pg.name} guest kernel maps at most {pg.max_lowmem >> 20} MB of lowmem; "
                             f"give it less RAM (mem=) than {ram >> 20} MB")
        self.nframes = ram >> 12
        if self.nframes < RESERVED_FRAMES + 64:
            raise ValueError(f"guest RAM of {ram >> 10} KB is too small for the guest kernel")
        self.events = dict.fromkeys(EVENT_NAMES, 0)
        self.ref = array("I", bytes(4 * self.nframes))
        self.in_cache = bytearray(self.nframes)
        self.free: list[int] = []          # frames freed since boot (LIFO)
        self.fresh = self.nframes          # frames >= fresh were never allocated
        self.page_cache: dict[tuple[int, int], int] = {}
        self.files: dict[str, File] = {}
        self.procs: dict[int, Process] = {}
        self.next_pid = 1
        self.runq: deque = deque()
        self.current: Process | None = None
        self.loaded_pgd = 0
        self.meter = FaultMeter(self)
        self.segfaults: list[str] = []
        self.po = pg.page_offset
        self.psz = pg.pte_size
        self.pmask = pg.pte_mask
        self.nx = pg.nx
        self._boot(boot_progress)

    # ================================================================ boot
    def _boot(self, progress=None) -> None:
        v, pg = self.vcpu, self.pg
        st = v.store
        bump = RESERVED_FRAMES

        def boot_alloc() -> int:
            nonlocal bump
            pa = bump << 12
            bump += 1
            for a in range(pa, pa + 4096, 8):        # paging is off: gva == gpa
                st(a, 0)
            return pa

        ram = self.nframes << 12
        large = 1 << pg.large_shift
        nlarge = (ram + large - 1) >> pg.large_shift
        po = self.po
        self.swapper = swapper = boot_alloc()
        if pg.name == "64":
            pdpt = boot_alloc()
            st(swapper + 8 * ((po >> 39) & 511), pdpt | pg.kernel_table)
            pd = 0
            for i in range(nlarge):
                va = po + i * large
                if i % 512 == 0:
                    pd = boot_alloc()
                    st(pdpt + 8 * ((va >> 30) & 511), pd | pg.kernel_table)
                st(pd + 8 * ((va >> 21) & 511), (i * large) | pg.kernel_large)
            self.kernel_pgd_range = (256, 512)
        elif pg.name == "pae":
            for i in range(3):
                st(swapper + 8 * i, boot_alloc() | PTE_P)
            self.kernel_pmd = kpmd = boot_alloc()
            st(swapper + 24, kpmd | PTE_P)
            for i in range(nlarge):
                st(kpmd + 8 * i, (i * large) | pg.kernel_large)
        else:
            for i in range(nlarge):
                st(swapper + 4 * (768 + i), (i * large) | pg.kernel_large, 4)
            self.kernel_pgd_range = (768, 1024)
        self.bootmem_end = bump
        regs = control_registers(pg.mode, swapper, wp=True, nxe=bool(pg.nx), pse=True, extra_cr4=CR4_PGE)
        v.setup_paging(**regs)
        self.loaded_pgd = swapper
        v.set_fault_handler(self._page_fault)
        self.meter.install()
        # Hand every remaining frame to the allocator; "warm": zero them all now.
        self.fresh = bump
        if self.frames == "warm":
            n = self.nframes - bump
            for pfn in range(bump, self.nframes):
                self._clear_page(pfn << 12)
                if progress is not None and not (pfn - bump) & 4095:
                    progress((pfn - bump) / n)
            self.boot_pages_zeroed = self.nframes - bump
            self.zero_page = self._alloc_page(zero=False)   # already zero
        else:
            self.boot_pages_zeroed = 0
            self.zero_page = self._alloc_page(zero=True)
        self.ref[self.zero_page >> 12] = 1
        self.boot_exits = dict(self.vm.events.exits)
        self.boot_free = self.nr_free()
        self.events = dict.fromkeys(EVENT_NAMES, 0)

    # ============================================================== frames
    def nr_free(self) -> int:
        return len(self.free) + self.nframes - self.fresh

    def _alloc_page(self, zero: bool = True) -> int:
        if self.free:
            pfn = self.free.pop()
        elif self.fresh < self.nframes:
            pfn = self.fresh
            self.fresh = pfn + 1
        else:
            raise GuestKernelError(f"out of memory: all {self.nframes} frames in use")
        self.ref[pfn] = 1
        pa = pfn << 12
        if zero:
            self._clear_page(pa)
        return pa

    def _put_page(self, pa: int) -> None:
        pfn = pa >> 12
        if pa == self.zero_page:
            return
        r = self.ref[pfn] - 1
        if r < 0:
            raise GuestKernelError(f"frame {pfn:#x} freed twice")
        self.ref[pfn] = r
        if r == 0:
            self.free.append(pfn)

    def _clear_page(self, pa: int) -> None:
        self.vcpu.rep_stos(self.po + pa, 0, 512)            # clear_page: rep stosq
        ev = self.events
        ev["pages_zeroed"] += 1
        ev["kernel_accesses"] += 512

    def _copy_page(self, dst: int, src: int) -> None:
        self.vcpu.rep_movs(self.po + dst, self.po + src, 512)    # copy_page: rep movsq
        ev = self.events
        ev["pages_copied"] += 1
        ev["kernel_accesses"] += 1024

    def _fill_page(self, pa: int, file: File, index: int) -> None:
        """Read page ``index`` of ``file`` from disk: 512 stores of its content."""
        st = self.vcpu.store
        va = self.po + pa
        base = (file.base() + (index << 9) * K_WORD) & M64
        for i in range(512):
            st(va + 8 * i, (base + i * K_WORD) & M64)
        ev = self.events
        ev["pages_read"] += 1
        ev["kernel_accesses"] += 512

    # ========================================================= page tables
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

    # ========================================================== page faults
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
        case = (ptep - self.po) & ~0xFFF, ev["page_tables_allocated"] != tables     # for the fault meter
        if not pte & PTE_P:
            if vma.file is not None:
                self.meter.kind("file", *case)
                ev["file_faults"] += 1
                self._do_file_fault(mm, vma, addr, ptep, write)
            else:
                self.meter.kind("demand", *case)
                ev["demand_faults"] += 1
                if write:
                    new = self._alloc_page(zero=True)
                    self._set_pte(ptep, new | self._pte_flags(vma, True))
                else:
                    ev["zero_page_maps"] += 1
                    self._set_pte(ptep, self.zero_page | self._pte_flags(vma, False))
        elif write and not pte & PTE_W:
            self.meter.kind("cow", *case)
            ev["cow_faults"] += 1
            self._do_wp_page(vma, addr, ptep, pte)
        else:
            # The pte already allows the access: a stale TLB entry (never with our flushing).
            self.meter.kind("spurious", *case)
            ev["spurious_faults"] += 1
            self._invlpg(addr)

    def _segv(self, p: Process, addr: int, err: int, why: str):
        self.meter.kind("segv")
        self.events["segv"] += 1
        exc = Segfault(p.pid, addr, err, why)
        self.segfaults.append(str(exc))
        raise exc

    def _find_get_page(self, file: File, index: int) -> int:
        key = (file.ino, index)
        pa = self.page_cache.get(key)
        if pa is None:
            pa = self._alloc_page(zero=False)
            self._fill_page(pa, file, index)
            self.in_cache[pa >> 12] = 1
            self.page_cache[key] = pa               # the cache's reference
        else:
            self.events["page_cache_hits"] += 1
        return pa

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

    # ============================================================ processes
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

    def _switch_to(self, p: Process) -> None:
        if p is not self.current:
            self.events["context_switches"] += 1
            self.current = p
        if self.loaded_pgd != p.mm.pgd:
            self._write_cr3(p.mm.pgd)

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

    # ============================================================ syscalls
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

    def _syscall(self, p: Process, req) -> bool:
        """Carry out a request; True if p keeps the CPU."""
        ev = self.events
        ev["syscalls"] += 1
        nr = req[0]
        mm = p.mm
        if nr == SYS_EXIT:
            self._do_exit(p, req[1])
            return False
        if nr == SYS_FORK:
            p.ret = self._do_fork(p, req[1], req[2]).pid
            return True
        if nr == SYS_WAIT:
            for c in p.children:
                if c.state == "zombie":
                    p.ret = self._reap(p, c)
                    return True
            if not p.children:
                p.ret = (-1, None)
                return True
            p.state = "waiting"
            return False
        if nr == SYS_EXEC:
            ev["user_accesses"] += p.user.naccesses
            self._do_exec(p, req[1], req[2], req[3])
            return True
        if nr == SYS_BRK:
            new = req[1]
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
                        p.ret = mm.brk
                        return True
                    if heap is None:
                        mm.insert(Vma(old_end, new_end, PROT_READ | PROT_WRITE, None, 0, "heap"))
                    else:
                        heap.end = new_end
                mm.brk = new
            p.ret = mm.brk
            return True
        if nr == SYS_MMAP:
            _, npages, prot, file, pgoff = req
            addr = self._find_free_area(mm, npages)
            if addr >= 0:
                mm.insert(Vma(addr, addr + (npages << 12), prot, file, pgoff, "mmap"))
            p.ret = addr
            return True
        if nr == SYS_MUNMAP:
            addr, npages = req[1], req[2]
            self._munmap(mm, addr, addr + (npages << 12))
            p.user.forget(addr, npages)
            p.ret = 0
            return True
        if nr == SYS_MPROTECT:
            _, addr, npages, prot = req
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
            p.ret = 0
            return True
        if nr == SYS_YIELD:
            self.runq.append(p)
            return False
        if nr == SYS_READ:
            _, file, buf, npages, pgoff = req
            st = self.vcpu.store
            ld = self.vcpu.load
            po = self.po
            for i in range(npages):
                src = po + self._find_get_page(file, pgoff + i)
                dst = buf + (i << 12)
                for off in range(0, 4096, 8):               # copy_to_user (may fault: demand)
                    st(dst + off, ld(src + off))
            ev["kernel_accesses"] += 1024 * npages
            p.user.forget(buf, npages)
            p.ret = npages
            return True
        if nr == SYS_WRITE:
            _, file, buf, npages = req
            ld, st = self.vcpu.load, self.vcpu.store
            po = self.po
            for i in range(npages):
                key = (file.ino, i)
                pa = self.page_cache.get(key)
                if pa is None:
                    pa = self._alloc_page(zero=False)        # a whole page is written: no read
                    self.in_cache[pa >> 12] = 1
                    self.page_cache[key] = pa
                dst = po + pa
                src = buf + (i << 12)
                for off in range(0, 4096, 8):               # copy_from_user
                    st(dst + off, ld(src + off))
            for i in range(npages, file.npages):             # truncate: drop the cache's pages
                pa = self.page_cache.pop((file.ino, i), None)
                if pa is not None:
                    self.in_cache[pa >> 12] = 0
                    self._put_page(pa)
            file.npages = npages
            ev["kernel_accesses"] += 1024 * npages
            p.ret = npages
            return True
        if nr == SYS_GETPID:
            p.ret = p.pid
            return True
        raise GuestKernelError(f"pid {p.pid}: unknown system call {req!r}")

    # ============================================================ scheduler
    def new_file(self, name: str, npages: int, key: int | None = None) -> File:
        f = File(name, npages, file_key(name, self.seed) if key is None else key, len(self.files) + 1)
        self.files[name] = f
        return f

    def run(self, progress=None, total_hint: int = 0) -> None:
        """Run every process to completion."""
        v = self.vcpu
        runq = self.runq
        ev = self.events
        done = 0
        while runq:
            p = runq.popleft()
            if p.state != "runnable":
                continue
            self._switch_to(p)
            while True:
                v.set_cpl(3)
                try:
                    req = p.gen.send(p.ret)
                except StopIteration:
                    req = (SYS_EXIT, 0)
                except Segfault:
                    v.set_cpl(0)
                    self._do_exit(p, 128 + SIGSEGV)
                    break
                v.set_cpl(0)
                p.ret = None
                if req[0] == SYS_EXIT:
                    done += 1
                    if progress is not None and total_hint:
                        progress(min(1.0, done / total_hint))
                if not self._syscall(p, req):
                    break
        if self.loaded_pgd != self.swapper:
            self._write_cr3(self.swapper)
        self.current = None
        ev["user_accesses"] += sum(q.user.naccesses for q in self.procs.values() if q.user is not None)
