"""The system-call entry: one request of a user program, dispatched to the kernel's handlers.

A request is a tuple ``(SYS_*, args...)`` that the user program yields
(``user.py`` builds them); the result goes back in ``Process.ret``.  The memory
calls live in ``mmap.py``, read and write in ``filemap.py``, the process calls in
``process.py``; wait and yield are the scheduler's business and stay here.
"""

from __future__ import annotations

from ..user import (
    SYS_BRK, SYS_EXEC, SYS_EXIT, SYS_FORK, SYS_GETPID, SYS_MMAP, SYS_MPROTECT, SYS_MUNMAP, SYS_READ, SYS_WAIT,
    SYS_WRITE, SYS_YIELD,
)
from .errors import GuestKernelError
from .process import Process


class Syscalls:
    def _syscall(self, p: Process, req) -> bool:
        """Carry out a request; True if p keeps the CPU."""
        self.events["syscalls"] += 1
        nr = req[0]
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
            self.events["user_accesses"] += p.user.naccesses
            self._do_exec(p, req[1], req[2], req[3])
            return True
        if nr == SYS_BRK:
            p.ret = self._sys_brk(p, req[1])
            return True
        if nr == SYS_MMAP:
            _, npages, prot, file, pgoff = req
            p.ret = self._sys_mmap(p.mm, npages, prot, file, pgoff)
            return True
        if nr == SYS_MUNMAP:
            p.ret = self._sys_munmap(p, req[1], req[2])
            return True
        if nr == SYS_MPROTECT:
            _, addr, npages, prot = req
            p.ret = self._sys_mprotect(p.mm, addr, npages, prot)
            return True
        if nr == SYS_YIELD:
            self.runq.append(p)
            return False
        if nr == SYS_READ:
            _, file, buf, npages, pgoff = req
            p.ret = self._sys_read(p, file, buf, npages, pgoff)
            return True
        if nr == SYS_WRITE:
            _, file, buf, npages = req
            p.ret = self._sys_write(file, buf, npages)
            return True
        if nr == SYS_GETPID:
            p.ret = p.pid
            return True
        raise GuestKernelError(f"pid {p.pid}: unknown system call {req!r}")
