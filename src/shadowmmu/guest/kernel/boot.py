"""The kernel's state and its boot (start_kernel).

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
"""

from __future__ import annotations

from array import array
from collections import deque

from ...x86.bits import CR4_PGE, PTE_P
from ...x86.builder import control_registers
from ..files import File
from ..paging import guest_paging
from .process import Process

FRAMES = ("warm", "cold")        # boot zeroes all RAM (warm) or frames are first touched when allocated
RESERVED_FRAMES = 0x100          # the first MB: BIOS, kernel image

EVENT_NAMES = ("demand_faults", "file_faults", "cow_faults", "segv", "spurious_faults", "forks", "execs",
               "process_exits", "context_switches", "pte_writes", "invlpgs", "cr3_writes", "user_accesses",
               "kernel_accesses", "pages_zeroed", "pages_copied", "pages_read", "cow_reused",
               "zero_page_maps", "page_cache_hits", "page_tables_allocated", "page_tables_freed",
               "syscalls", "verified_qwords")


class Boot:
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
        self.fault_observer = None         # see fault.py: told the kind of each fault
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
        self.boot_free = self.nr_free()
        self.events = dict.fromkeys(EVENT_NAMES, 0)
