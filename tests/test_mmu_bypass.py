"""Bypass of guest not-present faults (+bypass, KVM c7addb902054, Sep 2007): sptes
whose guest pte is not present are 0 and their faults go straight to the guest
(VT-x PFEC mask/match); every other non-mapping is the trap value, whose RSVD fault
always exits."""

import pytest

from shadowmmu.guest.minimal import USER_BASE, A, D, MiniGuest, P, U, W
from shadowmmu.mmu.audit import AuditError, audit
from shadowmmu.mmu.roots import pf_exits
from shadowmmu.mmu.spte import SPTE_TRAP
from shadowmmu.vm import VM
from shadowmmu.x86.bits import PF_ID, PF_P, PF_RSVD, PF_U, PF_W
from shadowmmu.x86.faults import PageFault

from test_mmu_prefetch import spte_of


def steady_demand_fault(policy: str, guest: str, *, write: bool = True):
    """One demand fault in a table the guest already uses (shadowed): (exits by reason, guest faults seen)."""
    vm = VM(16 << 20, policy=policy)
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    v.set_cpl(3)
    for i in range(3):
        v.store(USER_BASE + i * 4096, i + 1, 8)
    before = dict(vm.exits)
    seen = len(g.handled)
    va = USER_BASE + 3 * 4096
    if write:
        v.store(va, 0x77, 8)
    else:
        v.load(va, 8)
    vm.audit()
    return {r: n - before.get(r, 0) for r, n in vm.exits.items() if n != before.get(r, 0)}, g.handled[seen:]


@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_a_steady_demand_fault_costs_one_exit_with_update_and_two_with_zap(guest):
    exits, faults = steady_demand_fault("update+bypass", guest)
    assert exits == {"pte_write": 1}                      # the guest's fault and retry cost nothing
    assert faults == [(USER_BASE + 3 * 4096, PF_U | PF_W)]  # the hardware's error code is the guest's
    exits, faults = steady_demand_fault("zap+bypass", guest)
    assert exits == {"pte_write": 1, "pf_fixed": 1}
    assert faults == [(USER_BASE + 3 * 4096, PF_U | PF_W)]
    assert steady_demand_fault("update", guest)[0] == {"pf_injected": 1, "pte_write": 1}


def test_a_fetch_fault_exits_when_the_guest_would_not_report_id():
    """The hardware runs with EFER.NXE=1 and reports I/D on a fetch; a 32-bit guest
    without SMEP must not see it, so its fetch faults exit and are injected."""
    vm = VM(16 << 20, policy="update+bypass")
    g = MiniGuest(vm, "32")
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)                     # the table is shadowed
    assert vm.vcpu.pfec_filter == (PF_P | PF_ID, 0, False)
    before = vm.exits.get("pf_injected", 0)
    v.fetch(USER_BASE + 4096)
    assert vm.exits["pf_injected"] == before + 1
    assert g.handled[-1] == (USER_BASE + 4096, PF_U)      # no I/D: what native 32-bit paging reports
    vm64 = VM(16 << 20, policy="update+bypass")
    g64 = MiniGuest(vm64, "64")
    assert vm64.vcpu.pfec_filter == (PF_P, PF_P, True)     # KVM's: only P=1 faults exit
    vm64.vcpu.set_cpl(3)
    vm64.vcpu.store(USER_BASE, 1, 8)
    before = dict(vm64.exits)
    vm64.vcpu.fetch(USER_BASE + 4096)
    assert vm64.exits.get("pf_injected", 0) == before.get("pf_injected", 0)
    assert g64.handled[-1] == (USER_BASE + 4096, PF_U | PF_ID)


def test_the_filter_rule_is_the_vmcs_rule():
    """SDM 25.2: a #PF exits iff ((error code & PFEC_MASK) == PFEC_MATCH) equals bit 14 of
    the exception bitmap.  Check both settings against every error code's P and I/D."""
    kvm, no_id = (PF_P, PF_P, True), (PF_P | PF_ID, 0, False)
    for ec in range(64):
        assert pf_exits(kvm, ec) == bool(ec & PF_P)
        assert pf_exits(no_id, ec) == bool(ec & (PF_P | PF_ID))
    # the bitmap bit inverts the decision
    assert pf_exits((PF_P, PF_P, False), PF_P) is False and pf_exits((PF_P, PF_P, False), 0) is True


@pytest.mark.parametrize("guest", ["32", "64"])
def test_a_present_pte_without_a_spte_traps_and_a_not_present_one_does_not(guest):
    vm = VM(16 << 20, policy="zap+bypass")
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    v.store(g.pte_addr(USER_BASE + 4096), (0x300 << 12) | P | W | U | A | D, g.esz)   # zap: spte = trap
    assert spte_of(vm, g, USER_BASE + 4096) == SPTE_TRAP
    assert spte_of(vm, g, USER_BASE + 2 * 4096) == 0           # guest pte not present: notrap
    handled = len(g.handled)
    before = dict(vm.exits)
    v.set_cpl(3)
    v.load(USER_BASE + 4096, 8)                                 # RSVD fault -> exit -> fixed
    assert {r: n - before.get(r, 0) for r, n in vm.exits.items() if n != before.get(r, 0)} == {"pf_fixed": 1}
    assert len(g.handled) == handled                            # the guest never saw a fault
    # a guest pte with a reserved bit: its spte stays the trap value, and the guest gets RSVD
    if guest == "64":
        v.set_cpl(0)
        v.store(g.pte_addr(USER_BASE + 5 * 4096), (0x301 << 12) | P | W | U | A | D | (1 << 51), 8)
        v.set_cpl(3)
        v.set_fault_handler(None)
        with pytest.raises(PageFault) as pf:
            v.load(USER_BASE + 5 * 4096, 8)
        assert pf.value.error_code == PF_U | PF_RSVD | PF_P
        assert spte_of(vm, g, USER_BASE + 5 * 4096) == SPTE_TRAP


def test_the_audit_catches_a_notrap_spte_over_a_present_guest_pte():
    vm = VM(16 << 20, policy="update+bypass")
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    audit(vm.mmu)
    sp = next(sp for sp in vm.mmu.pages.values() if sp.role.level == 1 and not sp.role.direct
              and sp.gfn == g.pte_addr(USER_BASE) >> 12)
    sp.spt[0] = 0                        # planted: the guest's pte 0 is present
    with pytest.raises(AuditError, match=r"= 0 \(bypass: not-present faults go to the guest\), but the guest "
                                         r"entry 0x[0-9a-f]+ is present"):
        audit(vm.mmu)


def test_the_flood_detector_tells_demand_faults_from_a_fork_storm():
    """Under bypass the guest's demand faults no longer pass through the MMU, so its pte
    writes come in a row; the detector asks whether the last installed spte was used."""
    vm = VM(16 << 20, policy="update+bypass")
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.set_cpl(3)
    for i in range(12):
        v.store(USER_BASE + i * 4096, i, 8)
    assert vm.mmu.stats["flooded"] == 0
    # three pte writes in a row that nobody uses: a fork's copy, unshadowed as before
    v.set_cpl(0)
    for i in range(20, 23):
        v.store(g.pte_addr(USER_BASE + i * 4096), (0x300 + i << 12) | P | W | U | A | D, 8)
    assert vm.mmu.stats["flooded"] == 1
    vm.audit()


def test_an_mmio_mapping_under_bypass_always_exits():
    vm = VM(16 << 20, policy="update+bypass")

    class Dev:
        def __init__(self):
            self.log = []

        def read(self, gpa, size):
            self.log.append(("r", gpa))
            return 0x5A

        def write(self, gpa, size, value):
            self.log.append(("w", gpa, value))

    dev = Dev()
    vm.add_mmio(0xFEE00000, 4096, dev)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.store(g.pte_addr(USER_BASE), 0xFEE00000 | P | W | A | D, 8)
    for _ in range(3):
        assert v.load(USER_BASE, 4) == 0x5A
    assert vm.exits["mmio"] == 3 and len(dev.log) == 3
    assert spte_of(vm, g, USER_BASE) == SPTE_TRAP
    vm.audit()
