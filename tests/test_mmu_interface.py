"""The MMU's interface after the redesign: the walk record, the one error-code rule,
page_fault's reasons, the pure spte builder, pte-write steps, audit points, mode names."""

import pytest

from shadowmmu.guest.minimal import USER_BASE, MiniGuest
from shadowmmu.mmu import AuditError, PfResult
from shadowmmu.mmu.pte_write import PteWrites
from shadowmmu.mmu.spte import SPTE_GUEST_W, SPTE_MMIO, SPTE_NX, SPTE_P, SPTE_U, SPTE_W, Role, make_spte
from shadowmmu.vm import VM
from shadowmmu.x86 import CpuState, PageFault, PhysicalMemory
from shadowmmu.x86.bits import (
    ACC_FETCH, ACC_USER, ACC_WRITE, CR0_PE, CR0_PG, CR4_PAE, CR4_SMEP, EFER_LME, EFER_NXE, PF_ID, PF_P, PF_RSVD,
    PF_U, PF_W, R_U, R_W, R_X,
)
from shadowmmu.x86.formats import GUEST_MODES, PagingMode
from shadowmmu.x86.walker import fault_error_code, translate

P, W, U, A, D, NX = 1, 2, 4, 0x20, 0x40, 1 << 63


# --- the walk record -------------------------------------------------------------
def _four_level(pml4e_bits, pdpte_bits, pde_bits, pte_bits):
    """A 4-level walk for va 0 through tables at frames 1..4, to frame 5."""
    mem = PhysicalMemory(1 << 24)
    for frame, bits in ((1, pml4e_bits), (2, pdpte_bits), (3, pde_bits), (4, pte_bits)):
        mem.write_u64(frame << 12, ((frame + 1) << 12) | P | bits)
    cpu = CpuState()
    cpu.load(mem, cr4=CR4_PAE, efer=EFER_LME | EFER_NXE, cr3=1 << 12, cr0=CR0_PE | CR0_PG)
    return mem, cpu


def test_each_walk_step_carries_its_table_entry_and_the_rights_so_far():
    mem, cpu = _four_level(W | U, U | NX, W | U, W | U)
    t = translate(mem, cpu, 0x123, 0)
    assert [(s.level, s.table_gfn, s.addr, s.value & 0xFFF) for s in t.steps] == [
        (4, 1, 0x1000, P | W | U | A), (3, 2, 0x2000, P | U | A), (2, 3, 0x3000, P | W | U | A),
        (1, 4, 0x4000, P | W | U | A)]
    # W lost at level 3, X lost at level 3 (NX), U kept throughout
    assert [s.rights for s in t.steps] == [R_W | R_U | R_X, R_U, R_U, R_U]
    assert t.rights == R_U and not t.writable and t.user and not t.executable
    assert t.leaf == t.steps[-1].value and t.paddr == 0x5123
    assert [t.at_level(n) for n in (4, 3, 2, 1)] == list(t.steps)
    assert t.at_level(5) is None and t.at_level(0) is None


def test_a_large_page_walk_has_no_step_below_its_leaf():
    mem, cpu = _four_level(W | U, W | U, W | U | 0x80, 0)       # PS in the PDE: a 2 MB page
    mem.write_u64(3 << 12, 0x20_0000 | P | W | U | 0x80)
    t = translate(mem, cpu, 0x1234, 0)
    assert t.page_shift == 21 and t.at_level(2).value & 0x80 and t.at_level(1) is None


def test_a_fault_carries_the_steps_up_to_the_faulting_entry():
    mem, cpu = _four_level(W | U, W | U, 0, W | U)
    mem.write_u64(3 << 12, 0)                                   # the PDE is not present
    with pytest.raises(PageFault) as e:
        translate(mem, cpu, 0x123, ACC_USER)
    assert [(s.level, s.addr, s.value) for s in e.value.steps] == [
        (4, 0x1000, (2 << 12) | P | W | U | A), (3, 0x2000, (3 << 12) | P | W | U | A), (2, 0x3000, 0)]
    assert e.value.error_code == PF_U


@pytest.mark.parametrize("cr4,efer,access,expected", [
    (0, 0, ACC_FETCH, 0),                              # no SMEP, no NX: I/D not reported
    (CR4_PAE, EFER_NXE, ACC_FETCH, PF_ID),             # NX in a PAE-format walk: reported
    (CR4_SMEP, 0, ACC_FETCH | ACC_USER, PF_ID | PF_U),
    (CR4_PAE, EFER_NXE, ACC_WRITE | ACC_USER, PF_W | PF_U),
])
def test_the_error_code_rule_is_in_one_place(cr4, efer, access, expected):
    cpu = CpuState(cr4=cr4, efer=efer)
    assert fault_error_code(cpu, access) == expected
    assert fault_error_code(cpu, access, PF_P | PF_RSVD) == expected | PF_P | PF_RSVD


# --- page_fault's reasons -------------------------------------------------------------
def _guest(policy="update"):
    vm = VM(16 << 20, pte_write=policy)
    g = MiniGuest(vm, "64")
    return vm, g, vm.vcpu


def test_page_fault_says_inject_and_leaves_the_guest_fault_for_the_vcpu():
    vm, g, v = _guest()
    v.set_cpl(3)
    assert vm.mmu.page_fault(v, USER_BASE, ACC_USER | ACC_WRITE) is PfResult.INJECT
    pf = v.mmu_state.fault
    assert (pf.address, pf.error_code) == (USER_BASE, PF_U | PF_W)
    assert PfResult.INJECT.exit_reason == "pf_injected"


def test_page_fault_says_fixed_when_the_shadow_now_maps_the_access():
    vm, g, v = _guest()
    v.set_cpl(3)
    v.store(USER_BASE, 7, 8)                          # demand-paged by the guest
    gpa = vm.mmu.gva_to_gpa(v, USER_BASE)
    v.set_cpl(0)
    vm.mmu.unshadow(g.pte_addr(USER_BASE) >> 12)     # the spte is gone with its page
    v.set_cpl(3)
    assert vm.mmu.page_fault(v, USER_BASE, ACC_USER) is PfResult.FIXED
    assert v.load(USER_BASE, 8) == 7 and vm.mmu.gva_to_gpa(v, USER_BASE) == gpa


def test_page_fault_says_pte_write_for_a_store_to_a_shadowed_table():
    vm, g, v = _guest()
    v.set_cpl(3)
    v.load(USER_BASE, 8)
    v.set_cpl(0)
    ptep = g.pte_addr(USER_BASE)                      # kernel va == gpa: identity map
    assert vm.mmu.is_shadowed(ptep >> 12)
    v.tlb.flush()
    assert vm.mmu.page_fault(v, ptep, ACC_WRITE) is PfResult.PTE_WRITE
    assert v.mmu_state.gpa == ptep


def test_page_fault_says_mmio_where_no_memslot_is():
    vm, g, v = _guest()
    vm.add_mmio(0x2000_0000, 0x1000, lambda *a: 0)
    v.store(g.pte_addr(0x5000_0000), 0x2000_0000 | P | W | A | D, 8)
    assert vm.mmu.page_fault(v, 0x5000_0000, 0) is PfResult.MMIO
    assert v.mmu_state.gpa == 0x2000_0000


# --- the spte builder and the pte-write steps ------------------------------------
def test_make_spte_is_a_function_of_its_facts():
    assert make_spte(None, 0x77, R_W, dirty=True, write_protect=False, pkey_bits=0) == SPTE_MMIO | 0x77000
    base = (0x99 << 12) | SPTE_P | 0x20
    assert make_spte(0x99, 1, R_W | R_U | R_X, dirty=True, write_protect=False, pkey_bits=0) == \
        base | SPTE_U | SPTE_GUEST_W | SPTE_W | 0x40
    assert make_spte(0x99, 1, R_W | R_U | R_X, dirty=False, write_protect=False, pkey_bits=0) == \
        base | SPTE_U | SPTE_GUEST_W                                   # clean: the first write traps
    assert make_spte(0x99, 1, R_W, dirty=True, write_protect=True, pkey_bits=0) == \
        base | SPTE_GUEST_W | SPTE_NX                                  # a page table: read-only
    assert make_spte(0x99, 1, R_X, dirty=True, write_protect=False, pkey_bits=3 << 59) == base | 3 << 59


@pytest.mark.parametrize("level,quadrant,offset,expected", [
    (1, 0, 0x000, range(0, 1)), (1, 0, 0x7FC, range(511, 512)), (1, 0, 0x800, range(0)),
    (1, 1, 0x800, range(0, 1)), (2, 0, 0x004, range(2, 4)), (2, 3, 0xC00, range(0, 2)),
    (2, 2, 0xC00, range(0)),
])
def test_a_32bit_write_covers_the_sptes_of_its_quadrant(level, quadrant, offset, expected):
    sp = type("SP", (), {"role": Role(level=level, glevels=2, quadrant=quadrant)})()
    assert PteWrites.get_written_sptes(sp, offset) == expected


@pytest.mark.parametrize("glevels,offset,nbytes,misaligned", [
    (4, 8, 8, False), (4, 12, 8, True), (4, 8, 4, False), (4, 8, 2, True), (2, 4, 4, False), (2, 6, 4, True),
])
def test_a_write_that_is_not_within_one_guest_pte_is_misaligned(glevels, offset, nbytes, misaligned):
    sp = type("SP", (), {"role": Role(level=1, glevels=glevels)})()
    assert PteWrites.detect_write_misaligned(sp, offset, nbytes) is misaligned


def test_a_spte_becoming_writable_marks_its_page_dirty():
    vm, g, v = _guest()
    slot = vm.slots[0]
    vm.mmu.enable_dirty_log(slot)
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    gfn = vm.mmu.gva_to_gpa(v, USER_BASE) >> 12
    vm.mmu.get_dirty_log(slot)                         # clears, and write-protects the page again
    assert v.load(USER_BASE, 8) == 1 and gfn not in vm.mmu.get_dirty_log(slot)
    v.store(USER_BASE, 2, 8)                           # faults: the spte becomes writable again
    assert gfn in vm.mmu.get_dirty_log(slot)


# --- audit points ----------------------------------------------------------------
def _stale_rmap_vm(audit):
    """A VM whose spte for USER_BASE lost W behind set_spte's back: the rmap is stale."""
    vm = VM(16 << 20, audit=audit)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    (sp,) = vm.mmu.shadowed[g.pte_addr(USER_BASE) >> 12]
    v.set_cpl(3)
    assert sp.spt[0] & SPTE_W
    sp.spt[0] &= ~SPTE_W
    return vm, v


def test_an_audited_mmu_stops_at_the_exit_after_an_invariant_broke():
    vm, v = _stale_rmap_vm(True)
    with pytest.raises(AuditError, match="rmap is not exact"):
        v.store(USER_BASE + 0x1000, 1, 8)              # the next exit's audit point


def test_an_unaudited_mmu_does_not_notice():
    vm, v = _stale_rmap_vm(False)
    v.store(USER_BASE + 0x1000, 1, 8)
    assert vm.mmu.audit_points == 0
    with pytest.raises(AuditError, match="rmap is not exact"):
        vm.audit()


def test_an_audit_interval_audits_every_nth_point():
    vm = VM(16 << 20, audit=5)
    MiniGuest(vm, "64")
    assert vm.mmu.audit_points > 5


@pytest.mark.parametrize("bad", [1.5, -1, 0, 1, "yes"])
def test_a_bad_audit_setting_is_refused(bad):
    with pytest.raises(ValueError, match="audit must be True, False or an interval of at least 2"):
        VM(16 << 20, audit=bad)


# --- one set of mode names ------------------------------------------------------
@pytest.mark.parametrize("name,mode", [("32", PagingMode.BITS32), ("32-bit", PagingMode.BITS32),
                                       ("PAE", PagingMode.PAE), ("64", PagingMode.LEVEL4),
                                       ("4-level", PagingMode.LEVEL4), ("la57", PagingMode.LEVEL5),
                                       ("5-level", PagingMode.LEVEL5), ("none", PagingMode.NONE)])
def test_a_paging_mode_is_parsed_from_any_of_its_names(name, mode):
    assert PagingMode.parse(name) is mode
    assert PagingMode.parse(mode.short) is mode and PagingMode.parse(mode.value) is mode


def test_an_unknown_mode_name_is_refused_with_the_names_it_could_be():
    with pytest.raises(ValueError, match=r"unknown paging mode '48'; choose one of none, 32, pae, 64, la57"):
        PagingMode.parse("48")
    assert GUEST_MODES == ("32", "pae", "64", "la57")


def test_the_minimal_guest_names_the_formats_it_runs():
    with pytest.raises(ValueError, match="the minimal guest runs 32, pae, 64 paging, not 'la57'"):
        MiniGuest(VM(16 << 20), "la57")
