"""Exact VM exits of one steady-state guest demand fault: the seed's claim.

        guest                               zap                     update
    1   user touches va (no pte)            #PF exit: inject        #PF exit: inject
    2   handler writes the pte              exit: emulate, clear    exit: emulate, install spte
    3   user touches va again               #PF exit: install       (no exit)
"""

import pytest

from shadowmmu.guest.minimal import USER_BASE, MiniGuest
from shadowmmu.vm import VM


def _demand_fault_exits(guest: str, policy: str, *, write: bool):
    vm = VM(16 << 20, native=policy == "native", pte_write="update" if policy == "native" else policy,
            tracing=True)
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    v.set_cpl(3)
    # warm up: the first faults shadow the user page table and the tables the handler reads
    for i in range(3):
        v.store(USER_BASE + i * 4096, i + 1, 8)
    vm.audit()
    vm.events.clear_trace()
    before = vm.events.total_exits
    mark = len(vm.events.trace)
    va = USER_BASE + 3 * 4096
    if write:
        v.store(va, 0xFEED, 8)
    else:
        v.load(va, 8)
    vm.audit()
    exits = [line for kind, line in vm.events.trace[mark:] if kind == "exit"]
    assert vm.events.total_exits - before == len(exits)
    assert g.handled[-1] == (va, 6 if write else 4)        # the guest saw a user not-present #PF
    if write:
        assert v.load(va, 8) == 0xFEED
    return [e.split("(")[1].split(")")[0] for e in exits]


@pytest.mark.parametrize("write", [True, False], ids=["write", "read"])
@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_a_demand_fault_costs_three_exits_with_zap(guest, write):
    assert _demand_fault_exits(guest, "zap", write=write) == ["pf_injected", "pte_write", "pf_fixed"]


@pytest.mark.parametrize("write", [True, False], ids=["write", "read"])
@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_a_demand_fault_costs_two_exits_with_update(guest, write):
    assert _demand_fault_exits(guest, "update", write=write) == ["pf_injected", "pte_write"]


@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_a_demand_fault_costs_no_exit_natively(guest):
    assert _demand_fault_exits(guest, "native", write=True) == []


def test_update_does_not_fire_for_a_pte_written_with_a_clear():
    """A=0 must still trap so the A bit gets set: the seed's condition, and the saving is lost."""
    vm = VM(16 << 20, pte_write="update")
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    pte_addr = g.pte_addr(USER_BASE + 4096)
    updates, pte_writes = vm.mmu.stats["pte_updates"], vm.events.exits["pte_write"]
    v.store(pte_addr, (0x300 << 12) | 0x7, 8)          # P|W|U, A=0, D=0
    assert vm.events.exits["pte_write"] == pte_writes + 1
    assert vm.mmu.stats["pte_updates"] == updates      # the trapped write installed nothing
    before = dict(vm.events.exits)
    v.set_cpl(3)
    assert v.load(USER_BASE + 4096, 8) == 0
    assert vm.events.exits["pf_fixed"] == before.get("pf_fixed", 0) + 1
    v.set_cpl(0)
    assert v.load(pte_addr, 8) == (0x300 << 12) | 0x27   # the guest's A bit got set (a read: D stays 0)
    vm.audit()
