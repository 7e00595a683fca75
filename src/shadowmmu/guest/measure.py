"""VM exits per guest page fault, measured from the faulting access to its completion.

A fault's cost under shadow paging is not only the exits inside the guest's
handler: it starts with the exit that found the guest pte missing (the injected
#PF) and ends when the retried access completes (under the "zap" policy, one
more exit to install the spte).  So the meter brackets the *access*: it is the
vCPU's ``access_hook``, called on the slow path (``VCpu._access``, which every
access that misses the TLB and every faulting access goes through; TLB hits never
fault and are not touched), and it measures accesses to user addresses.  For each such access it notes the exit counters
before and after; if the kernel's fault handler ran during it, the exits in
between are the fault's, attributed to the kind the handler classified (the
outermost fault wins; anything nested — the handler's own page-table writes and
their exits — counts to it).  The guest cannot tell: like a performance counter,
the hook observes and changes nothing the vCPU does.
"""

from __future__ import annotations

from collections import Counter

KINDS = ("demand", "cow", "file", "segv", "spurious")


class FaultMeter:
    def __init__(self, kernel):
        self.kernel = kernel
        self._kind = None
        self._busy = False
        self.enabled = True
        self.faults = {k: 0 for k in KINDS}
        self.exits = {k: 0 for k in KINDS}
        self.by_reason = {k: Counter() for k in KINDS}
        self.histogram = {k: Counter() for k in KINDS}
        self.samples: dict[str, list] = {k: [] for k in KINDS}   # (exits, by_reason) of recent faults
        self.keep_samples = 0

    def kind(self, kind: str) -> None:
        """Called by the fault handler: classify the fault being taken."""
        if self._kind is None:
            self._kind = kind

    def reset(self) -> None:
        for k in KINDS:
            self.faults[k] = self.exits[k] = 0
            self.by_reason[k].clear()
            self.histogram[k].clear()
            self.samples[k].clear()

    def install(self) -> None:
        v = self.kernel.vcpu
        exits = self.kernel.vm.events.exits
        user_top = self.kernel.pg.user_top
        meter = self

        def around(inner, vaddr, size, acc, value):
            if vaddr >= user_top or meter._busy:
                return inner(vaddr, size, acc, value)
            meter._busy = True
            meter._kind = None
            before = dict(exits)
            try:
                return inner(vaddr, size, acc, value)
            finally:
                meter._busy = False
                kind = meter._kind
                if kind is not None:
                    meter._kind = None
                    meter._record(kind, before, exits)

        v.access_hook = around

    def _record(self, kind: str, before: dict, exits: Counter) -> None:
        delta = {r: n - before.get(r, 0) for r, n in exits.items() if n != before.get(r, 0)}
        total = sum(delta.values())
        self.faults[kind] += 1
        self.exits[kind] += total
        self.by_reason[kind].update(delta)
        self.histogram[kind][total] += 1
        if self.keep_samples:
            s = self.samples[kind]
            s.append((total, delta))
            if len(s) > self.keep_samples:
                del s[0]

    def report(self) -> dict:
        out = {}
        for k in KINDS:
            if k in ("demand", "cow", "file") or self.faults[k]:
                out[k] = {
                    "faults": self.faults[k],
                    "exits": self.exits[k],
                    "exits_per_fault": round(self.exits[k] / self.faults[k], 3) if self.faults[k] else None,
                    "by_reason": dict(sorted(self.by_reason[k].items())),
                    "histogram": dict(sorted(self.histogram[k].items())),
                }
        return out
