"""The scheduler: a run queue of processes, each run until it blocks, yields or exits.

A context switch is a CR3 write (which flushes the non-global TLB).
"""

from __future__ import annotations

from ..user import SYS_EXIT
from .errors import SIGSEGV, Segfault
from .process import Process


class Scheduler:
    def _switch_to(self, p: Process) -> None:
        if p is not self.current:
            self.events["context_switches"] += 1
            self.current = p
        if self.loaded_pgd != p.mm.pgd:
            self._write_cr3(p.mm.pgd)

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
