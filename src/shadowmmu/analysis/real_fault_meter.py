"""VM exits per guest page fault on real x86 code (the real vCPU), measured the
way ``fault_meter`` measures them on the Python guest, so the two can be
compared row by row.

The real vCPU reports two things to an observer: every #PF exit before it is
counted (``before_pf_exit``), and every event delivered to the guest
(``deliver``).  A guest fault is a #PF delivered from CPL3; it owns the exit
that found the guest pte missing, every exit taken at CPL0 while its handler
runs, and a user-mode exit for the same page afterwards (the retried access:
under "zap" one more exit installs the spte).  It ends at the first user-mode
exit for another page or the next event delivered from CPL3.

Kind, from the error code the guest receives (what its handler looks at):
``demand`` (not present), ``cow`` (a write to a present read-only page), ``other``.
Case, as ``fault_meter`` defines it: ``steady`` when the guest page table
holding the pte existed (the guest walk read a level-1 entry), was shadowed when
the fault was delivered and still is when it ends, and no shadow page was
created or zapped meanwhile; ``new_table``, ``unshadowed``, ``flooded`` and
``new_shadow`` otherwise.  On native paging a fault whose table existed is
``steady`` and costs no exit.
"""

from __future__ import annotations

from collections import Counter

from ..x86.faults import PageFault
from ..x86.walker import translate
from .fault_meter import CASES

KINDS = ("demand", "cow", "other")


class RealFaultMeter:
    def __init__(self, cpu):
        self.cpu = cpu
        self.exits = cpu.events.exits
        self.mmu = cpu.vm.mmu
        self.histogram = {k: {c: Counter() for c in CASES} for k in KINDS}
        self.by_reason = {k: {c: Counter() for c in CASES} for k in KINDS}
        self._current = None
        self._snap = None
        cpu.observer = self

    def _churn(self) -> int:
        s = self.mmu.stats if self.mmu is not None else {}
        return s.get("pages_created", 0) + s.get("pages_zapped", 0)

    def before_pf_exit(self, vaddr: int, cpl: int) -> None:
        cur = self._current
        self._snap = dict(self.exits)
        if cur is not None and cpl == 3 and vaddr >> 12 != cur[1]:
            self._close(self._snap)

    def deliver(self, vector: int, error_code, cr2, cpl: int) -> None:
        if cpl != 3:
            return
        before = dict(self.exits)
        if self._current is not None:
            self._close(self._snap if vector == 14 and self._snap is not None else before)
        if vector != 14:
            return
        start = self._snap if self._snap is not None and self.mmu is not None else before
        kind = "demand" if not error_code & 1 else "cow" if error_code & 2 else "other"
        g = self.cpu.guest
        try:
            entries = translate(self.cpu.gmem, g, cr2, 0, set_ad=False).entries
        except PageFault as pf:
            entries = pf.entries
        table = entries[-1][1] >> 12 if entries and entries[-1][0] == 1 else None
        if table is None:
            case = "new_table"
        elif self.mmu is None or self.mmu.is_shadowed(table):
            case = "steady"
        else:
            case = "unshadowed"
        self._current = (kind, cr2 >> 12, table, case, self._churn(), start)
        self._snap = None

    def _close(self, after: dict) -> None:
        kind, _, table, case, churn, start = self._current
        self._current = None
        if case == "steady" and self.mmu is not None:
            if not self.mmu.is_shadowed(table):
                case = "flooded"
            elif self._churn() != churn:
                case = "new_shadow"
        delta = Counter({r: n - start.get(r, 0) for r, n in after.items() if n != start.get(r, 0)})
        self.histogram[kind][case][sum(delta.values())] += 1
        self.by_reason[kind][case].update(delta)

    def finish(self) -> None:
        if self._current is not None:
            self._close(dict(self.exits))

    def summary(self) -> dict:
        """kind -> {faults, steady: {faults, exits histogram, mean}, cases: {case: faults}}."""
        out = {}
        for k in KINDS:
            cases = {c: sum(h.values()) for c, h in self.histogram[k].items()}
            steady = self.histogram[k]["steady"]
            n = sum(steady.values())
            out[k] = {"faults": sum(cases.values()), "cases": cases,
                      "steady": {"faults": n, "histogram": dict(sorted(steady.items())),
                                 "mean": sum(e * c for e, c in steady.items()) / n if n else None,
                                 "by_reason": dict(self.by_reason[k]["steady"])}}
        return out
