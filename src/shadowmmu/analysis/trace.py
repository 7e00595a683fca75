"""``shadowmmu trace demand``: one guest demand fault, told by the machine.

The seed's commit message says a demand fault costs three exits before the
change and two after.  This runs one steady-state demand fault (the page
table already shadowed) under a policy, with the event trace on, and prints
what happened: the guest's steps and every exit and shadow-pte change between
them.
"""

from __future__ import annotations

from ..guest.minimal import USER_BASE, MiniGuest
from ..vm import VM

def trace_demand_fault(policy: str, guest: str = "64") -> tuple[list[str], dict]:
    """Returns (narrative lines, exits by reason of the traced fault)."""
    vm = VM(16 << 20, native=policy == "native", pte_write="update" if policy == "native" else policy,
            tracing=True)
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    v.set_cpl(3)
    for i in range(3):                      # warm-up: shadow the page table, warm the kernel's mappings
        v.store(USER_BASE + i * 4096, i + 1, 8)
    events = vm.events
    events.clear_trace()
    before = dict(events.exits)
    va = USER_BASE + 3 * 4096

    def handler(vcpu, address, error_code):
        events.note("guest", f"#PF handler (CPL0): address {address:#x}, error code {error_code:#x}; "
                             f"allocate a frame, write the pte (A set, D for a write)")
        g.on_fault(vcpu, address, error_code)
        events.note("guest", "handler returns (IRET): the user store is retried")

    v.set_fault_handler(handler)
    events.note("guest", f"user mode stores to {va:#x}: no pte yet")
    v.store(va, 0x1234, 8)
    events.note("guest", "the store completed")
    by_reason = {r: n - before.get(r, 0) for r, n in events.exits.items() if n - before.get(r, 0)}
    lines = [text if kind != "guest" else f"guest: {text.split(': ', 1)[1]}" for kind, text in events.trace]
    return lines, by_reason
