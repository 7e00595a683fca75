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

Each fault also gets a *case*, defined by what happened, so that a headline
"exits per fault" is not a vote among the faults of a run:

- ``steady``      the page table holding the pte existed before the fault and,
                  under shadow paging, was shadowed when the handler ran and still
                  is when the access completes, and no shadow page was created or
                  zapped meanwhile (the seed's case: 3 exits with zap, 2 with
                  update, for whole-pte stores and warm frames);
- ``new_table``   the handler had to allocate the page table (possibly a recycled
                  frame whose old shadow is still there);
- ``unshadowed``  the table existed but was not shadowed when the handler ran
                  (a child's table that fork filled, before the child's first
                  access completed; or one KVM's flood detector unshadowed): the
                  pte write does not exit;
- ``flooded``     the table was shadowed when the handler ran but not when the
                  access completed: this fault's own writes unshadowed it;
- ``new_shadow``  otherwise steady, but the MMU created or zapped shadow pages
                  during the fault (the other half of a 32-bit table, the direct
                  map's shadow for a frame touched for the first time, reclaim).

On native paging (and under two-dimensional paging) there is no shadow: a fault
whose table existed is ``steady``.
The meter asks the MMU whether a gfn is shadowed, as a debugger would.  The guest
kernel knows nothing of the meter: its fault handler tells whoever set
``Kernel.fault_observer`` the kind of the fault, which page table holds the pte
and whether it allocated that table (``guest/kernel/fault.py``), and the meter is
that observer.  The dependency goes one way: analysis reads the guest and the VM,
the guest reads no hypervisor counter.
"""

from __future__ import annotations

from collections import Counter

from ..guest.kernel.fault import FAULT_KINDS as KINDS
CASES = ("steady", "new_table", "unshadowed", "flooded", "new_shadow")


class FaultMeter:
    @classmethod
    def attach(cls, kernel) -> "FaultMeter":
        """A meter installed on a booted ``kernel`` and its vCPU (see ``install``)."""
        meter = cls(kernel)
        meter.install()
        return meter

    def __init__(self, kernel):
        self.kernel = kernel
        self._kind = None
        self._case = None
        self._table_gfn = -1
        self._shadow_churn = 0
        self._busy = False
        self.enabled = True
        self.faults = {k: 0 for k in KINDS}
        self.exits = {k: 0 for k in KINDS}
        self.by_reason = {k: Counter() for k in KINDS}
        self.histogram = {k: Counter() for k in KINDS}
        self.cases = {k: {c: Counter() for c in CASES} for k in KINDS}     # kind -> case -> exits histogram
        self.case_reasons = {k: {c: Counter() for c in CASES} for k in KINDS}  # kind -> case -> exits by reason
        self.samples: dict[str, list] = {k: [] for k in KINDS}   # (exits, by_reason) of recent faults
        self.keep_samples = 0

    def on_fault(self, kind: str, table_gpa: int | None, new_table: bool) -> None:
        """The kernel's ``fault_observer``: its handler classified the fault being taken.
        ``table_gpa``: the guest-physical address of the page table holding the faulting
        pte (None: no pte involved, e.g. SIGSEGV); ``new_table``: the handler allocated it."""
        if self._kind is not None:
            return
        self._kind = kind
        mmu = self._shadow_mmu()
        if table_gpa is None:
            self._case, self._table_gfn = None, -1
        elif new_table:
            self._case, self._table_gfn = "new_table", -1
        else:
            self._table_gfn = table_gpa >> 12
            self._case = "steady" if mmu is None or mmu.is_shadowed(self._table_gfn) else "unshadowed"
            if mmu is not None:
                self._shadow_churn = mmu.stats["pages_created"] + mmu.stats["pages_zapped"]

    def _shadow_mmu(self):
        """The shadow MMU, or None when nothing is shadowed (native, and two-dimensional
        paging: there, as natively, a fault whose table existed is steady)."""
        mmu = self.kernel.vm.mmu
        return None if mmu is None or getattr(mmu, "tdp", False) else mmu

    def reset(self) -> None:
        for k in KINDS:
            self.faults[k] = self.exits[k] = 0
            self.by_reason[k].clear()
            self.histogram[k].clear()
            self.samples[k].clear()
            for c in CASES:
                self.cases[k][c].clear()
                self.case_reasons[k][c].clear()

    def install(self) -> None:
        """Observe the kernel's fault handler and bracket the vCPU's slow-path accesses."""
        self.kernel.fault_observer = self.on_fault
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
        case = self._case
        mmu = self._shadow_mmu()
        if case == "steady" and mmu is not None:
            if not mmu.is_shadowed(self._table_gfn):
                case = "flooded"
            elif mmu.stats["pages_created"] + mmu.stats["pages_zapped"] != self._shadow_churn:
                case = "new_shadow"
        if case is not None:
            self.cases[kind][case][total] += 1
            self.case_reasons[kind][case].update(delta)
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
                    "exits_per_fault": self.exits[k] / self.faults[k] if self.faults[k] else None,
                    "by_reason": dict(sorted(self.by_reason[k].items())) or None,
                    "histogram": {str(n): c for n, c in sorted(self.histogram[k].items())} or None,
                    "cases": {c: _case_summary(h, self.case_reasons[k][c]) for c, h in self.cases[k].items()},
                }
        return out


def _case_summary(hist: Counter, reasons: Counter) -> dict:
    faults = sum(hist.values())
    exits = sum(n * c for n, c in hist.items())
    return {"faults": faults, "exits": exits,
            "exits_per_fault": exits / faults if faults else None,
            "by_reason": dict(sorted(reasons.items())) or None,
            "histogram": {str(n): c for n, c in sorted(hist.items())} or None}
