"""Exit accounting and the event trace of a VM.

Exit reasons (one count per VM exit):

- ``pf_fixed``     hidden #PF: the MMU fixed the shadow and the guest never knew
- ``pf_injected``  #PF injected into the guest (its own tables say fault)
- ``pte_write``    a guest store to a write-protected page table, emulated
- ``mmio``         an access to a gpa with no memslot, emulated
- ``ept_violation`` two-dimensional paging: the first touch of a guest frame the
                   EPT does not map yet (the MMU maps it and the access restarts)
- ``emulate``      another access the MMU chose to emulate (CR0.WP=0 write under SMAP)
- ``cr_access``    a write to CR0/CR3/CR4/EFER
- ``invlpg``       an intercepted INVLPG (not in the 2007 configuration)
- ``io``           a port access (the real vCPU's devices)
- ``msr``          an intercepted RDMSR of EFER, or a CR3 read (the real vCPU)
"""

from __future__ import annotations

from collections import Counter

EXIT_REASONS = ("pf_fixed", "pf_injected", "pte_write", "mmio", "emulate", "cr_access", "invlpg", "io", "msr",
                "ept_violation")


class EventLog:
    """Counts exits by reason always; keeps a trace of events when ``tracing``."""

    def __init__(self, tracing: bool = False, limit: int = 100_000):
        self.exits: Counter = Counter()
        self.tracing = tracing
        self.limit = limit
        self.trace: list[tuple[str, str]] = []

    def _add(self, kind: str, text: str) -> None:
        if self.tracing and len(self.trace) < self.limit:
            self.trace.append((kind, text))

    def mark(self) -> int:
        """Where the next event will go: pass it to exit() so the exit line comes
        before what the hypervisor did while handling it."""
        return len(self.trace)

    def exit(self, reason: str, text: str, at: int | None = None) -> None:
        self.exits[reason] += 1
        if self.tracing:
            self.exit_line(reason, text, at)

    def exit_line(self, reason: str, text: str, at: int | None = None) -> None:
        """The trace line of an exit already counted (the hot path counts first and
        formats only when tracing)."""
        if len(self.trace) < self.limit:
            line = ("exit", f"VM exit #{self.total_exits} ({reason}): {text}")
            if at is None:
                self.trace.append(line)
            else:
                self.trace.insert(at, line)

    def note(self, kind: str, text: str) -> None:
        if self.tracing:
            self._add(kind, f"  {kind}: {text}")

    def spte(self, sp, idx, old, new) -> None:
        if self.tracing:
            self._add("spte", f"  spte [{idx}] of shadow page gfn {sp.gfn:#x} ({sp.role.describe()}): "
                              f"{old:#x} -> {new:#x}")

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    def by_reason(self) -> dict[str, int]:
        return {r: self.exits.get(r, 0) for r in EXIT_REASONS}

    def clear_trace(self) -> None:
        self.trace.clear()

    def narrative(self) -> str:
        return "\n".join(text for _, text in self.trace)
