"""``shadowmmu.guest``: a Linux-2.6-like guest kernel and its workloads.

Everything here runs on a vCPU through guest memory accesses (no back door)::

    from shadowmmu.guest import boot, run_workload, WORKLOADS, GUEST_FORMATS
    kernel = boot(vm, guest="64", seed=0)
    result = run_workload(vm, "kbuild", guest="64", size=None, seed=0)
"""

from .kernel import GuestKernelError, Image, Kernel, Segfault
from .paging import GUEST_FORMATS, guest_paging
from .user import MemoryCheckError
from .workloads import WORKLOADS, boot, run_workload

__all__ = ["boot", "run_workload", "WORKLOADS", "GUEST_FORMATS", "Kernel", "Image", "Segfault",
           "GuestKernelError", "MemoryCheckError", "guest_paging"]
