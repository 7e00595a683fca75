"""What the guest kernel raises: a user process's fatal fault, and its own failures."""

from __future__ import annotations

SIGSEGV = 11


class Segfault(Exception):
    """SIGSEGV: raised by the fault handler, it leaves the user program (the
    generator) and the kernel kills the process."""

    def __init__(self, pid: int, address: int, error_code: int, why: str):
        super().__init__(f"pid {pid}: SIGSEGV at {address:#x} (error code {error_code:#x}): {why}")
        self.address, self.error_code, self.why = address, error_code, why


class GuestKernelError(RuntimeError):
    """The guest kernel hit a condition it cannot handle (out of memory, a fault in kernel code)."""

