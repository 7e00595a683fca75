"""REP STOS / REP MOVS on the vCPU do exactly what the same stores one by one do:
same memory, same faults delivered, same exits."""

import pytest

from shadowmmu.guest.minimal import USER_BASE, MiniGuest
from shadowmmu.vm import VM

POLICIES = ("native", "zap", "update")


def setup(policy):
    vm = VM(16 << 20, native=policy == "native", pte_write="update" if policy == "native" else policy)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 0x11, 8)                  # page 0 present; pages 1-3 demand-faulted on the way
    return vm, g, v


def run(policy, op):
    vm, g, v = setup(policy)
    if op == "stos":
        v.rep_stos(USER_BASE + 0x800, 0xABCD, 1024)                # crosses into two more pages
    elif op == "stos-loop":
        for i in range(1024):
            v.store(USER_BASE + 0x800 + 8 * i, 0xABCD, 8)
    elif op == "movs":
        v.rep_stos(USER_BASE + 0x3000, 0x77, 512)
        v.rep_movs(USER_BASE + 0x800, USER_BASE + 0x3000, 600)
    elif op == "movs-loop":
        for i in range(512):
            v.store(USER_BASE + 0x3000 + 8 * i, 0x77, 8)
        for i in range(600):
            v.store(USER_BASE + 0x800 + 8 * i, v.load(USER_BASE + 0x3000 + 8 * i, 8), 8)
    data = [v.load(USER_BASE + 8 * i, 8) for i in range(5 * 512)]
    vm.audit()
    return data, dict(vm.events.exits), len(g.handled)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("op", ["stos", "movs"])
def test_a_string_instruction_equals_its_stores_one_by_one(policy, op):
    assert run(policy, op) == run(policy, op + "-loop")


@pytest.mark.parametrize("policy", ["zap", "update"])
def test_rep_stos_into_a_shadowed_page_table_is_emulated_store_by_store(policy):
    vm, g, v = setup(policy)
    v.set_cpl(0)
    pt = g.pte_addr(USER_BASE) & ~0xFFF
    assert vm.mmu.is_shadowed(pt >> 12)
    before = vm.events.exits["pte_write"]
    v.rep_stos(pt + 8 * 100, 0, 2)               # two emulated writes: below the flood threshold
    assert vm.events.exits["pte_write"] == before + 2
    v.rep_stos(pt + 8 * 200, 0, 8)               # the third consecutive write unshadows the table
    assert not vm.mmu.is_shadowed(pt >> 12)
    vm.audit()
