"""Out-of-sync shadow pages (+unsync, KVM 2008): a guest leaf table written directly,
its sptes resynced at INVLPG, CR3 loads and TLB flushes; never for a gfn shadowed
with several roles."""

import pytest

from shadowmmu.guest.minimal import USER_BASE, A, D, MiniGuest, P, U, W
from shadowmmu.mmu.audit import AuditError, audit
from shadowmmu.mmu.spte import SPTE_ADDR, SPTE_P, SPTE_TRAP, SPTE_W
from shadowmmu.vm import VM
from shadowmmu.x86.bits import PF_U, PF_W
from shadowmmu.x86.faults import PageFault
from shadowmmu.x86.walker import translate

from test_mmu_prefetch import spte_of

OLD, NEW, NEWER = 0x300, 0x301, 0x302       # guest frames a pte points at


def world(policy: str, guest: str):
    """A guest whose user page va -> frame OLD is mapped and used (its spte installed)."""
    vm = VM(16 << 20, policy=policy)
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    for gfn, value in ((OLD, 0x11), (NEW, 0x22), (NEWER, 0x33)):
        v.store(gfn << 12, value, 8)
    v.store(g.pte_addr(USER_BASE), (OLD << 12) | P | W | U | A | D, g.esz)
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == 0x11
    v.set_cpl(0)
    return vm, g, v


def delta(vm, before):
    return {r: n - before.get(r, 0) for r, n in vm.exits.items() if n != before.get(r, 0)}


def rewrite(vm, g, v, gfn):
    v.store(g.pte_addr(USER_BASE), (gfn << 12) | P | W | U | A | D, g.esz)


def user_load(v):
    v.set_cpl(3)
    try:
        return v.load(USER_BASE, 8)
    finally:
        v.set_cpl(0)


@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_a_leaf_table_goes_out_of_sync_and_invlpg_resyncs_its_pte(guest):
    """The named bug class: a missed resync on INVLPG (the guest would keep the old frame)."""
    vm, g, v = world("update+unsync", guest)
    before = dict(vm.exits)
    rewrite(vm, g, v, NEW)                       # the first write to the table: one fault, the page goes unsync
    assert delta(vm, before) == {"pf_fixed": 1}
    assert vm.mmu.stats["unsync_pages"] == 1
    before = dict(vm.exits)
    rewrite(vm, g, v, NEWER)                     # lands without an exit
    assert delta(vm, before) == {}
    assert user_load(v) == 0x11                  # no invalidation yet: the old translation (allowed)
    assert (spte_of(vm, g, USER_BASE) & SPTE_ADDR) >> 12 == vm.gmem.gfn_to_pfn(OLD)
    v.invlpg(USER_BASE)
    assert delta(vm, before) == {"invlpg": 1}
    assert vm.mmu.stats["resynced_ptes"] == 1
    assert user_load(v) == 0x33                  # invalidated: must be the new one
    audit(vm.mmu)


@pytest.mark.parametrize("how", ["cr3", "pge_toggle", "invpcid"])
def test_a_cr3_load_or_a_full_flush_resyncs_every_reachable_unsync_page(how):
    vm, g, v = world("zap+unsync", "64")
    rewrite(vm, g, v, NEW)
    rewrite(vm, g, v, NEWER)
    assert user_load(v) == 0x11
    before = dict(vm.exits)
    if how == "cr3":
        v.write_cr3(v.guest.cr3)
        assert delta(vm, before) == {"cr_access": 1}
    elif how == "pge_toggle":
        v.write_cr4(v.guest.cr4 | 0x80)
        v.write_cr4(v.guest.cr4 & ~0x80)
        assert delta(vm, before) == {"cr_access": 2}
    else:
        v.invalidate_all()
        assert delta(vm, before) == {"invlpg": 1}
    assert vm.mmu.stats["synced_pages"] == 1 and not vm.mmu.unsync_pages
    assert user_load(v) == 0x33
    before = dict(vm.exits)
    rewrite(vm, g, v, OLD)                       # in sync again: write-protected, the next write faults
    assert delta(vm, before) == {"pf_fixed": 1}
    audit(vm.mmu)


def test_not_present_to_present_in_an_unsync_table_needs_no_invalidation():
    """No TLB caches a not-present entry (SDM 4.10.4.3): the new pte must be used at
    once, so the sptes of an unsync page never let a fault bypass the MMU."""
    vm, g, v = world("update+bypass+unsync", "64")
    rewrite(vm, g, v, NEW)                       # table out of sync
    assert vm.mmu.unsync_pages
    assert spte_of(vm, g, USER_BASE + 4096) == SPTE_TRAP    # was 0 (notrap) while in sync
    v.store(g.pte_addr(USER_BASE + 4096), (NEWER << 12) | P | W | U | A | D, 8)   # no exit, no INVLPG
    v.set_cpl(3)
    handled = len(g.handled)
    assert v.load(USER_BASE + 4096, 8) == 0x33
    assert len(g.handled) == handled             # the guest saw no fault
    audit(vm.mmu)


def second_role(vm, g, v, table):
    """Point the PDE after USER_BASE's at the same page table, supervisor-only, and use it:
    the table gets a second shadow page (its inherited access differs)."""
    pde_addr = translate(vm.gmem, v.guest, USER_BASE, 0, set_ad=False).entries[-2][1]
    v.store(pde_addr + 8, (table << 12) | P | W | A, 8)
    v.invlpg(USER_BASE + (2 << 20))
    return v.load(USER_BASE + (2 << 20), 8)


def test_a_gfn_with_two_roles_never_goes_out_of_sync():
    """The named bug class: unsync with two roles (KVM's kvm_unsync_page refuses it)."""
    vm, g, v = world("update+unsync", "64")
    table = g.pte_addr(USER_BASE) >> 12
    assert second_role(vm, g, v, table) == 0x11
    roles = [sp.role for sp in vm.mmu.shadowed[table]]
    assert len(roles) == 2 and roles[0].access != roles[1].access
    before = dict(vm.exits)
    rewrite(vm, g, v, NEW)
    assert delta(vm, before) == {"pte_write": 1}                  # emulated: not unsync
    assert vm.mmu.stats["unsync_pages"] == 0 and not vm.mmu.unsync_pages
    audit(vm.mmu)


def test_a_second_role_zaps_an_unsync_page():
    vm, g, v = world("update+unsync", "64")
    table = g.pte_addr(USER_BASE) >> 12
    rewrite(vm, g, v, NEW)
    assert [sp.unsync for sp in vm.mmu.shadowed[table]] == [True]
    assert second_role(vm, g, v, table) == 0x22
    assert vm.mmu.stats["unsync_zapped"] == 1
    assert [sp.unsync for sp in vm.mmu.shadowed[table]] == [False]
    assert user_load(v) == 0x22                                   # the zapped page took its stale sptes along
    audit(vm.mmu)


def test_the_audit_checks_unsync_children_and_stale_leaves_are_not_checked():
    vm, g, v = world("zap+unsync", "64")
    rewrite(vm, g, v, NEW)
    rewrite(vm, g, v, NEWER)
    audit(vm.mmu)                               # the stale spte of an unsync page is the architecture's latitude
    leaf = next(iter(vm.mmu.unsync_pages))
    parent = vm.mmu.by_hpfn[next(iter(leaf.parents)) >> 12]
    assert parent.unsync_children == 1
    parent.unsync_children = 0                  # planted: a resync from the root would not find the page
    with pytest.raises(AuditError, match=r"counts \d unsync children, has \d"):
        audit(vm.mmu)
    parent.unsync_children = 1
    leaf.unsync = False                         # planted: out of the set, sptes stale, gfn writable
    with pytest.raises(AuditError):
        audit(vm.mmu)


@pytest.mark.parametrize("guest", ["32", "64"])
def test_a_demand_fault_under_unsync_costs_two_exits(guest):
    """Out of sync does not help a demand fault (its pte goes not-present -> present, which
    must exit to be seen): inject, then the retried access fixes the shadow."""
    vm = VM(16 << 20, policy="zap+unsync")
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    v.set_cpl(3)
    for i in range(3):
        v.store(USER_BASE + i * 4096, i + 1, 8)
    before = dict(vm.exits)
    v.store(USER_BASE + 3 * 4096, 4, 8)
    assert delta(vm, before) == {"pf_injected": 1, "pf_fixed": 1}
    assert spte_of(vm, g, USER_BASE + 3 * 4096) & SPTE_P
    audit(vm.mmu)


def test_a_page_fault_drops_the_stale_spte_of_its_page():
    """SDM 4.10.4.1: a #PF invalidates the TLB entries of the faulting page.  The guest
    makes its pte not present (no INVLPG) in an unsync table, then writes the page:
    the stale spte is read-only (the old pte was clean), the write faults, the guest's
    walk says not present, and after that #PF a read must fault too (found by the
    lockstep campaign, pae modern seed 7202)."""
    vm, g, v = world("modern", "pae")
    v.store(g.pte_addr(USER_BASE), (OLD << 12) | P | W | U | A, 8)     # clean; the table goes out of sync
    assert vm.mmu.unsync_pages
    v.invlpg(USER_BASE)                                                   # resync: the spte is read-only now
    assert spte_of(vm, g, USER_BASE) & (SPTE_P | SPTE_W) == SPTE_P
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == 0x11
    v.set_cpl(0)
    v.store(g.pte_addr(USER_BASE), 0, 8)                                  # not present, no invalidation
    v.set_fault_handler(None)
    v.set_cpl(3)
    with pytest.raises(PageFault) as pf:
        v.store(USER_BASE, 5, 8)
    assert pf.value.error_code == PF_U | PF_W
    with pytest.raises(PageFault):
        v.load(USER_BASE, 8)                                              # not the old frame
    audit(vm.mmu)


def test_a_table_under_two_directory_entries_is_resynced_once_and_shows_the_new_pte_at_both():
    """One page (same role) linked by two PDEs: the resync from the root meets it twice."""
    vm, g, v = world("zap+unsync", "64")
    table = g.pte_addr(USER_BASE) >> 12
    pde_addr = translate(vm.gmem, v.guest, USER_BASE, 0, set_ad=False).entries[-2][1]
    pde = v.load(pde_addr, 8)
    v.store(pde_addr + 8, pde, 8)                         # the same table, the same rights: the same page
    v.set_cpl(3)
    assert v.load(USER_BASE + (2 << 20), 8) == 0x11
    v.set_cpl(0)
    assert len(vm.mmu.shadowed[table]) == 1
    sp = vm.mmu.shadowed[table][0]
    assert len(sp.parents) == 2
    rewrite(vm, g, v, NEW)
    rewrite(vm, g, v, NEWER)
    assert sp.unsync and vm.mmu.by_hpfn[next(iter(sp.parents)) >> 12].unsync_children == 2
    v.write_cr3(v.guest.cr3)
    assert vm.mmu.stats["synced_pages"] == 1 and not sp.unsync
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == v.load(USER_BASE + (2 << 20), 8) == 0x33
    audit(vm.mmu)
