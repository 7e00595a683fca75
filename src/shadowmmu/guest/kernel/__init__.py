"""A Linux-2.6-like guest kernel: memory management, processes, page faults.

It runs on a vCPU and has no back door: every read and write of its page tables,
every page it zeroes, copies or fills, is a load or store at CPL0 through the
direct map; user work is loads/stores/fetches at CPL3 (``user.py``).  It never
looks at ``vm.gmem`` or ``vm.host``, nor at the VM's exit counters or its MMU:
measuring a run is ``shadowmmu.analysis``'s business (the fault handler only tells
an observer what kind of fault it took, ``fault.py``).  The same code runs on
native paging and on the shadow MMU, for the 32-bit, PAE and 4-level formats
(``paging.py``).

What it does, as Linux 2.6 (~2.6.22, the seed's era) did it, simplified, is told
in the module of each concern.  ``Kernel`` is their mixins combined: one object,
so a hot path pays one attribute lookup per call, as before the split.

- ``boot.py``        the kernel's state and its boot
- ``page_alloc.py``  frames: the allocator, reference counts, clear/copy a page
- ``pgtable.py``     pte stores and flushes, pgd_alloc, table allocation, walks, zap, free
- ``fault.py``       the #PF handler: demand zero, file faults, copy on write, SIGSEGV
- ``filemap.py``     files and the page cache, read() and write()
- ``process.py``     images, spawn, fork, exec, exit, reaping
- ``mmap.py``        brk, mmap, munmap, mprotect
- ``syscalls.py``    the system-call dispatch
- ``sched.py``       the run queue and context switches
- ``mm.py``, ``errors.py``  VMAs and mms; Segfault and GuestKernelError
"""

from __future__ import annotations

from .boot import EVENT_NAMES, FRAMES, RESERVED_FRAMES, Boot
from .errors import SIGSEGV, GuestKernelError, Segfault
from .fault import Faults
from .filemap import FileMap
from .mm import STACK_LIMIT, Mm, Vma
from .mmap import MemoryMap
from .page_alloc import PageAlloc
from .pgtable import PageTables
from .process import STACK_PAGES, Image, Process, Processes
from .sched import Scheduler
from .syscalls import Syscalls


class Kernel(Boot, Scheduler, Syscalls, Processes, MemoryMap, Faults, FileMap, PageTables, PageAlloc):
    """A booted guest kernel on ``vm``'s vCPU (``boot.py`` has the constructor's arguments)."""


__all__ = ["Kernel", "Segfault", "GuestKernelError", "Image", "Process", "Vma", "Mm", "FRAMES",
           "RESERVED_FRAMES", "EVENT_NAMES", "STACK_PAGES", "STACK_LIMIT", "SIGSEGV"]
