"""``shadowmmu.guest``: a Linux-2.6-like guest kernel and its workloads.

Everything here runs on a vCPU through guest memory accesses (no back door), and
nothing here reads the hypervisor's counters: measuring a run is
``shadowmmu.analysis`` (``run.py``, ``fault_meter.py``)::

    from shadowmmu.guest import boot, WORKLOADS, GUEST_FORMATS
    kernel = boot(vm, guest="64", seed=0)
    WORKLOADS["demand"].setup(kernel, 16, 0)
    kernel.run()
"""

from .kernel import GuestKernelError, Image, Kernel, Segfault
from .paging import GUEST_FORMATS, guest_paging
from .user import MemoryCheckError
from .workloads import WORKLOADS, boot

__all__ = ["boot", "WORKLOADS", "GUEST_FORMATS", "Kernel", "Image", "Segfault",
           "GuestKernelError", "MemoryCheckError", "guest_paging"]
