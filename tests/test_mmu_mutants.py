"""Rules of the shadow MMU and the x86 walker that mutation testing showed no other
fast test pinned down (docs/mutation.md lists which mutant each test kills).

Each test states one rule and checks it exactly: exit counts, error codes, spte
values, statistics.  The file is part of `make mutate`'s fast selection, so it
stays well under ten seconds."""

from itertools import islice

import pytest

from shadowmmu.guest.minimal import USER_BASE, MiniGuest
from shadowmmu.mmu import MMUError
from shadowmmu.mmu.mmu import ShadowMMU
from shadowmmu.mmu.spte import R_DIRTY, SPTE_NX, Role
from shadowmmu.verify.choosers import RandomChooser
from shadowmmu.verify.lockstep import GUESTS, Lockstep, generate_program
from shadowmmu.vm import VM
from shadowmmu.x86 import CpuState, NonCanonicalAddress, PageFault
from shadowmmu.x86.bits import ACC_FETCH, ACC_USER, ACC_WRITE, R_U, R_W, R_X, CR0_WP, CR4_PKE, CR4_SMAP, CR4_SMEP, EFER_NXE
from shadowmmu.x86.builder import control_registers
from shadowmmu.x86.formats import PagingMode
from shadowmmu.x86.walker import translate
from test_mmu_features import Device
from test_x86_rules import RIGHTS_PARAMS, check, presence_cases, reserved_cases, rights_cases
from x86_helpers import BITS32, LEVEL4, MODES, PKEY_SHIFT, Env, Tables

FORMATS = ("32", "pae", "64", "la57")


# ---------------------------------------------------------------------------
# Helpers (the patterns of test_mmu_features.py)

P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63


def shadowed(guest="64", policy="update", **kw):
    """A booted guest whose first user page table is shadowed (one user page touched); CPL0."""
    vm = VM(16 << 20, pte_write=policy, **kw)
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    return vm, g, v


def leaf_spte(vm, va):
    """The last spte the hardware walk of va reads in vCPU 0's shadow tables."""
    try:
        t = translate(vm.host, vm.vcpu.hw, va, 0, set_ad=False)
    except PageFault as pf:
        return pf.entries[-1][2]
    return t.entries[-1][2]


def zap_everything(mmu):
    """Zap every cached shadow page, roots in use included (as a CR4.PSE toggle once did)."""
    for sp in list(mmu.pages.values()):
        mmu.zap_page(sp)
    mmu.flush_tlbs()


def notes(vm, kind):
    return [line for k, line in vm.events.trace if k == kind]


# ---------------------------------------------------------------------------
# Narration: what the trace says about shadow pages and pte writes


def test_a_role_describes_itself_level_kind_quadrant_rights_and_wp0():
    assert Role(level=1, glevels=4).describe() == "L1 g4 q0 WUX"
    assert Role(level=2, glevels=2, quadrant=3, access=R_U, cr0_wp=False).describe() == "L2 g2 q3 -U- wp0"
    assert Role(level=1, glevels=3, direct=True, access=R_W | R_X | R_DIRTY).describe() == "L1 direct q0 W-XD"
    assert Role(level=1, glevels=3, direct=True, access=R_U).describe() == "L1 direct q0 -U-"
    # only a direct page records the large page's dirtiness
    assert Role(level=1, glevels=4, access=R_W | R_U | R_X | R_DIRTY).describe() == "L1 g4 q0 WUX"
    assert Role(level=2, glevels=2, pse=True).describe() == "L2 g2 q0 WUX pse"


@pytest.mark.parametrize("policy", ("zap", "update"))
def test_the_trace_narrates_each_pte_write_with_the_policy_and_what_it_does(policy):
    vm, g, v = shadowed(policy=policy, tracing=True)
    pt_addr = g.pte_addr(USER_BASE)
    pt = pt_addr >> 12
    vm.events.clear_trace()
    zaps, updates = vm.mmu.stats["pte_zaps"], vm.mmu.stats["pte_updates"]
    v.store(pt_addr + 8, (0x300 << 12) | P | W | U | A | D, 8)      # a whole pte
    v.store(pt_addr + 16, 0, 4)                                     # half a pte: nothing to install
    act = "install the spte from it" if policy == "update" else "clear the spte"
    assert notes(vm, "pte write") == [
        f"  pte write: guest writes 0x300067 to its level-1 table gfn {pt:#x} +0x8; policy '{policy}': {act}",
        f"  pte write: guest writes 0x0 to its level-1 table gfn {pt:#x} +0x10; policy '{policy}': clear the spte",
    ]
    assert vm.mmu.stats["pte_zaps"] == zaps + 2
    assert vm.mmu.stats["pte_updates"] == updates + (1 if policy == "update" else 0)


def test_a_write_to_an_upper_level_table_is_narrated_as_a_clear_even_under_update():
    vm, g, v = shadowed(policy="update", tracing=True)
    # the page directory entry for USER_BASE, from the guest's own walk
    t = translate(vm.gmem, v.guest, USER_BASE, 0, set_ad=False)
    lvl, pde_addr, pde, _ = t.entries[-2]
    assert lvl == 2
    vm.events.clear_trace()
    v.store(pde_addr + 8, pde, 8)            # the next PDE: same table below, a level-2 write
    assert notes(vm, "pte write") == [
        f"  pte write: guest writes {pde:#x} to its level-2 table gfn {pde_addr >> 12:#x} "
        f"+{(pde_addr & 0xFFF) + 8:#x}; policy 'update': clear the spte"]
    assert vm.mmu.stats["pte_updates"] == 0


def test_the_trace_names_why_a_pte_write_zapped_a_shadow_page():
    vm, g, v = shadowed(tracing=True)
    pt_addr = g.pte_addr(USER_BASE)
    pt = pt_addr >> 12
    vm.events.clear_trace()
    v.store(pt_addr + 3, 0, 2)                                      # misaligned: zap
    assert notes(vm, "zap on pte write") == [f"  zap on pte write: gfn {pt:#x}: misaligned"]
    assert notes(vm, "shadow page zapped") == [f"  shadow page zapped: gfn {pt:#x} L1 g4 q0 WUX"]
    v.set_cpl(3)
    v.load(USER_BASE, 8)                                            # shadowed again
    assert notes(vm, "shadow page created") == [f"  shadow page created: gfn {pt:#x} L1 g4 q0 WUX"]
    v.set_cpl(0)
    vm.events.clear_trace()
    for i in range(3):
        v.store(pt_addr + 8 * (40 + i), 0, 8)
    assert notes(vm, "zap on pte write") == [f"  zap on pte write: gfn {pt:#x}: flood"]
    assert vm.mmu.stats["flooded"] == 1 and vm.mmu.stats["misaligned_zaps"] == 1


# ---------------------------------------------------------------------------
# pte_write: flood detection, misalignment, counts


def test_only_consecutive_writes_to_the_same_table_count_as_a_flood():
    """Writes alternating between two shadowed tables never flood either."""
    vm, g, v = shadowed()
    v.set_cpl(3)
    v.store(USER_BASE + (2 << 20), 1, 8)              # a second user page table
    v.set_cpl(0)
    a, b = g.pte_addr(USER_BASE), g.pte_addr(USER_BASE + (2 << 20))
    assert a >> 12 != b >> 12
    zaps = vm.mmu.stats["pte_zaps"]
    for i in range(3):
        v.store(a + 8 * (10 + i), 0, 8)
        v.store(b + 8 * (10 + i), 0, 8)
    assert vm.mmu.stats["flooded"] == 0
    assert vm.mmu.is_shadowed(a >> 12) and vm.mmu.is_shadowed(b >> 12)
    assert vm.mmu.stats["pte_zaps"] == zaps + 6
    vm.audit()


def test_a_write_that_crosses_a_pte_boundary_by_one_byte_zaps():
    """offset 5, 4 bytes: bytes 5..8 touch two 8-byte ptes."""
    vm, g, v = shadowed()
    pt_addr = g.pte_addr(USER_BASE)
    zapped = vm.mmu.stats["pages_zapped"]
    v.store(pt_addr + 8 * 10 + 5, 0, 4)
    assert vm.mmu.stats["misaligned_zaps"] == 1
    assert not vm.mmu.is_shadowed(pt_addr >> 12)
    v.set_cpl(3)
    v.load(USER_BASE, 8)                               # shadow it again
    v.set_cpl(0)
    v.store(pt_addr + 8 * 20 + 1, 0, 1)                # a 1-byte write zaps as well
    assert vm.mmu.stats["misaligned_zaps"] == 2
    assert vm.mmu.stats["pages_zapped"] == zapped + 2
    vm.audit()


def test_a_4mb_guest_pde_write_clears_both_2mb_shadow_pdes():
    """32-bit guest: one 4-byte PDE covers 4 MB = two 512-entry shadow PDEs."""
    vm = VM(16 << 20, pte_write="update")
    g = MiniGuest(vm, "32")
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.store(USER_BASE + (2 << 20), 2, 8)               # the other half of the same 4 MB
    v.set_cpl(0)
    t = translate(vm.gmem, v.guest, USER_BASE, 0, set_ad=False)
    _, pde_addr, pde, _ = t.entries[0]
    zaps = vm.mmu.stats["pte_zaps"]
    v.store(pde_addr, pde, 4)                          # rewrite the PDE as it is
    assert vm.mmu.stats["pte_zaps"] == zaps + 2
    exits = vm.events.total_exits
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == 1 and v.load(USER_BASE + (2 << 20), 8) == 2
    assert vm.events.total_exits == exits + 2          # both halves refault: both sptes were cleared
    vm.audit()


# ---------------------------------------------------------------------------
# Construction, the pool, statistics


def test_a_new_shadow_mmu_has_the_documented_defaults_and_zeroed_statistics():
    vm = VM(1 << 20, native=True)                       # just memory to build an MMU on
    frames = list(range(0x100, 0x110))                 # 16: the minimum
    mmu = ShadowMMU(vm.host, vm.gmem, frames)
    assert (mmu.policy, mmu.seed_access_bug, mmu.events, mmu.prefetch_ptes) == ("update", False, None, 0)
    assert (mmu.trap_spte, mmu.unsync_enabled, mmu.unsync_pages, mmu.spec.name) == (0, False, set(), "update")
    assert (mmu.pool_lo, mmu.pool_hi, mmu.pool_size) == (0x100, 0x110, 16)
    assert mmu.stats == dict.fromkeys(("pages_created", "pages_zapped", "reclaimed", "flooded",
                                       "unshadowed_user_write", "tlb_flushes", "pte_updates", "pte_zaps",
                                       "misaligned_zaps", "prefetched", "unsync_pages", "synced_pages",
                                       "resynced_ptes", "unsync_zapped"), 0)
    mmu.flush_tlbs()                                   # nothing changed: nothing to flush
    assert mmu.stats["tlb_flushes"] == 0
    with pytest.raises(ValueError, match="^the shadow page pool needs at least 16 frames, got 15$"):
        ShadowMMU(vm.host, vm.gmem, frames[:15])
    with pytest.raises(ValueError, match=r"^pte_write policy must be one of \('zap', 'update'\), got 'clear'$"):
        ShadowMMU(vm.host, vm.gmem, frames, pte_write="clear")


def test_each_vcpu_takes_one_pool_frame_for_its_pae_root_table():
    vm = VM(16 << 20, pool_pages=16, nr_vcpus=2)       # 18 frames: 16 shadow pages + 2 PAE roots
    assert vm.mmu.pool_size == 16
    assert len(vm.mmu.free) + vm.mmu.nr_pages == 16


def test_a_root_zapped_while_in_use_returns_its_frame_when_released():
    vm, g, v = shadowed()
    mmu = vm.mmu
    zapped = mmu.stats["pages_zapped"]
    n = mmu.nr_pages
    zap_everything(mmu)
    assert mmu.nr_pages == 0 and mmu.stats["pages_zapped"] == zapped + n
    assert len(mmu.free) == mmu.pool_size - 1          # the root keeps its frame while loaded
    root = mmu.by_hpfn[v.hw.cr3 >> 12]
    assert root.zapped is True and v.mmu_roots_invalid
    v.write_cr3(v.guest.cr3)                           # release the old root, load a new one
    assert len(mmu.free) + mmu.nr_pages == mmu.pool_size
    assert root.hpfn not in mmu.by_hpfn or mmu.by_hpfn[root.hpfn] is not root
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == 1
    vm.audit()


# ---------------------------------------------------------------------------
# update_pte: which guest ptes are installed, with what


def test_update_installs_a_written_pte_with_its_nx_bit_in_every_wide_format():
    for guest in ("pae", "64"):
        vm, g, v = shadowed(guest)
        va = USER_BASE + 5 * 4096
        frame = g.alloc()
        before = vm.mmu.stats["pte_updates"]
        v.store(g.pte_addr(va), (frame << 12) | P | W | U | A | D | NX, 8)
        v.store(g.pte_addr(va + 4096), (g.alloc() << 12) | P | U | A | NX, 8)
        assert vm.mmu.stats["pte_updates"] == before + 2, guest
        spte = leaf_spte(vm, va)
        assert spte & SPTE_NX and spte & P and spte & W, (guest, hex(spte))
        exits = vm.events.total_exits
        v.set_cpl(3)
        assert v.load(va, 8) == 0
        assert vm.events.total_exits == exits, guest          # installed: no exit
        vm.audit()


def test_update_skips_a_pte_with_a_reserved_bit_and_leaves_the_fault_to_the_guest_walk():
    for guest, bit in (("pae", 1 << 52), ("64", 1 << 45)):
        vm, g, v = shadowed(guest)
        va = USER_BASE + 6 * 4096
        before = vm.mmu.stats["pte_updates"]
        v.store(g.pte_addr(va), (g.alloc() << 12) | P | W | U | A | D | bit, 8)
        assert vm.mmu.stats["pte_updates"] == before, guest
        assert not leaf_spte(vm, va) & P
        vm.audit()


def test_update_installs_nothing_for_a_pte_that_points_outside_guest_ram():
    """A gpa above 4 GB with no memslot behind it: an MMIO spte is never installed by
    update_pte (the access faults and is emulated); the high gfn bits are not lost."""
    for guest in ("pae", "64"):
        vm, g, v = shadowed(guest)
        va = USER_BASE + 7 * 4096
        before = vm.mmu.stats["pte_updates"]
        v.store(g.pte_addr(va), (1 << 32) | (0x105 << 12) | P | W | U | A | D, 8)
        assert vm.mmu.stats["pte_updates"] == before, guest
        assert leaf_spte(vm, va) == 0
        vm.audit()


def test_update_installs_a_32bit_guest_pte_with_its_rights():
    vm, g, v = shadowed("32")
    va = USER_BASE + 5 * 4096
    frame = g.alloc()
    before = vm.mmu.stats["pte_updates"]
    v.store(g.pte_addr(va), (frame << 12) | P | U | A, 4)       # read-only, clean
    assert vm.mmu.stats["pte_updates"] == before + 1
    spte = leaf_spte(vm, va)
    assert (spte >> 12, spte & 0xFFF, spte >> 63) == (vm.gmem.gfn_to_pfn(frame), P | U | A, 0)
    vm.audit()


# ---------------------------------------------------------------------------
# gva_to_gpa, dirty log errors


def test_gva_to_gpa_checks_the_access_and_sets_no_accessed_bit():
    vm, g, v = shadowed()
    va = USER_BASE + 9 * 4096
    frame = g.alloc()
    pte_addr = g.pte_addr(va)
    v.store(pte_addr, (frame << 12) | P | U, 8)           # read-only, A=0
    assert vm.mmu.gva_to_gpa(v, va + 0x10) == (frame << 12) | 0x10
    with pytest.raises(PageFault) as e:
        vm.mmu.gva_to_gpa(v, va, ACC_WRITE)
    assert e.value.error_code == P | W
    assert v.load(pte_addr, 8) == (frame << 12) | P | U    # the walk left A clear


def test_the_accessed_bits_a_guest_walk_sets_are_in_the_dirty_log_faulting_or_not():
    vm, g, v = shadowed()
    slot = vm.slots[0]
    va = USER_BASE + 20 * 4096
    pte_addr = g.pte_addr(va)
    v.store(pte_addr, (g.alloc() << 12) | P | W | U, 8)          # A=0: the walk will set it
    vm.mmu.enable_dirty_log(slot)
    vm.mmu.get_dirty_log(slot)
    v.set_cpl(3)
    assert v.load(va, 8) == 0
    assert pte_addr >> 12 in vm.mmu.get_dirty_log(slot)           # the table the walk wrote A into
    v.set_cpl(0)
    pml4e_addr = (g.root << 12) + 8 * ((USER_BASE >> 39) & 511)
    v.store(pml4e_addr, v.load(pml4e_addr, 8) & ~A, 8)            # clear A in the top entry
    vm.mmu.get_dirty_log(slot)
    v.set_fault_handler(None)
    v.set_cpl(3)
    assert fault_code(v.load, USER_BASE + (10 << 20), 8) == U    # not present below: a fault,
    assert g.root in vm.mmu.get_dirty_log(slot)                   # but A was set on the way down
    vm.mmu.disable_dirty_log(slot)
    assert slot.dirty_bitmap is None and not vm.mmu.dirty_logging
    with pytest.raises(ValueError, match="^dirty logging is not enabled on memslot 0$"):
        vm.mmu.get_dirty_log(slot)
    vm.audit()


def test_reading_the_dirty_log_of_a_slot_that_does_not_log_is_a_clear_error():
    vm, g, v = shadowed()
    with pytest.raises(ValueError, match="^dirty logging is not enabled on memslot 0$"):
        vm.mmu.get_dirty_log(vm.slots[0])


def test_update_accepts_the_pat_bit_of_a_five_level_guests_pte():
    """Bit 7 of a 4 KB pte is PAT, not reserved; the reserved mask update_pte checks is
    the level-1 one (a PML4E's includes bit 7)."""
    vm = VM(16 << 20, pte_write="update")
    v = vm.vcpu
    for lvl in range(4):                              # PML5 0x100 -> ... -> PT 0x104
        v.store((0x100 + lvl) << 12, ((0x101 + lvl) << 12) | P | W | U | A, 8)
    v.store(0x104 << 12, (0x200 << 12) | P | W | U | A | D, 8)        # va 0 -> 0x200
    v.store((0x104 << 12) + 8, (0x104 << 12) | P | W | A | D, 8)      # va 0x1000 -> the PT itself
    v.setup_paging(**control_registers(PagingMode.LEVEL5, 0x100 << 12))
    assert v.load(0, 8) == 0                          # shadows the PT
    before = vm.mmu.stats["pte_updates"]
    v.store(0x1000 + 16, (0x201 << 12) | P | W | U | A | D | PS, 8)   # va 0x2000, PAT set
    assert vm.mmu.stats["pte_updates"] == before + 1
    exits = vm.events.total_exits
    assert v.load(0x2000, 8) == 0
    assert vm.events.total_exits == exits
    vm.audit()


# ---------------------------------------------------------------------------
# A user write to a shadowed page table: unshadow it, unless it is in use


def test_a_user_write_to_a_shadowed_table_it_does_not_walk_unshadows_it():
    vm, g, v = shadowed()
    v.set_cpl(3)
    v.store(USER_BASE + (2 << 20), 1, 8)
    v.set_cpl(0)
    b = g.pte_addr(USER_BASE + (2 << 20)) >> 12        # a second user page table
    assert vm.mmu.is_shadowed(b)
    x = USER_BASE + 8 * 4096
    v.store(g.pte_addr(x), (b << 12) | P | W | U | A | D, 8)       # user mapping of that table
    v.set_cpl(3)
    assert v.load(x + 8 * 100, 8) == 0                 # reading it changes nothing
    assert vm.mmu.is_shadowed(b) and vm.mmu.stats["unshadowed_user_write"] == 0
    before = dict(vm.events.exits)
    v.store(x + 8 * 100, 0x5A5A, 8)
    assert not vm.mmu.is_shadowed(b)
    assert vm.mmu.stats["unshadowed_user_write"] == 1
    assert vm.events.exits["pte_write"] == before["pte_write"]     # not emulated
    assert vm.events.exits["pf_fixed"] == before["pf_fixed"] + 1
    exits = vm.events.total_exits
    v.store(x + 8 * 101, 0x6B6B, 8)                    # writable now: no exit
    assert vm.events.total_exits == exits
    assert v.load(x + 8 * 100, 8) == 0x5A5A
    v.store(USER_BASE + (1 << 30), 1, 8)               # a third user page table
    v.set_cpl(0)
    c = g.pte_addr(USER_BASE + (1 << 30)) >> 12
    assert vm.mmu.is_shadowed(c)
    v.store(g.pte_addr(x + 4096), (c << 12) | P | W | U | A | D, 8)
    v.set_cpl(3)
    v.store(x + 4096 + 8 * 100, 1, 8)
    assert vm.mmu.stats["unshadowed_user_write"] == 2 and not vm.mmu.is_shadowed(c)
    vm.audit()


def test_a_user_write_to_a_table_of_its_own_walk_is_emulated_and_stays_shadowed():
    vm, g, v = shadowed()
    a = g.pte_addr(USER_BASE) >> 12                    # the page table that maps y below
    y = USER_BASE + 9 * 4096
    v.store(g.pte_addr(y), (a << 12) | P | W | U | A | D, 8)
    v.set_cpl(3)
    before = dict(vm.events.exits)
    v.store(y + 8 * 100, 0, 8)                         # pte 100 of its own page table
    assert vm.mmu.is_shadowed(a)
    assert vm.mmu.stats["unshadowed_user_write"] == 0
    assert vm.events.exits["pte_write"] == before["pte_write"] + 1
    vm.audit()


def test_a_user_write_to_another_vcpus_root_table_is_emulated_and_it_stays_shadowed():
    vm = VM(16 << 20, nr_vcpus=2, pte_write="update")
    g = MiniGuest(vm, "64")
    v0, v1 = vm.vcpus
    r2 = g.alloc()                                     # a copy of the root for vCPU 1
    for i in range(512):
        e = v0.load((g.root << 12) + 8 * i, 8)
        if e:
            v0.store((r2 << 12) + 8 * i, e, 8)
    v1.setup_paging(**control_registers(PagingMode.LEVEL4, r2 << 12, nxe=True))
    assert vm.mmu.is_shadowed(r2)
    x = USER_BASE + 8 * 4096
    v0.store(g.pte_addr(x), (r2 << 12) | P | W | U | A | D, 8)
    v0.set_cpl(3)
    before = dict(vm.events.exits)
    v0.store(x + 8 * 300, 0, 8)                        # an unused PML4 entry of vCPU 1's root
    assert vm.mmu.is_shadowed(r2)
    assert vm.mmu.stats["unshadowed_user_write"] == 0
    assert vm.events.exits["pte_write"] == before["pte_write"] + 1
    vm.audit()


# ---------------------------------------------------------------------------
# Roots and the fault path


def test_without_paging_four_direct_roots_map_the_four_gigabytes():
    """Paging off: one direct level-2 root per GB (KVM's nonpaging roots), each keyed
    by the first frame it maps; accesses in different GBs never share a root entry."""
    vm = VM(2 << 30, tracing=True)
    assert notes(vm, "shadow page created")[:4] == [
        f"  shadow page created: gfn {gb << 18:#x} L2 direct q0 WUX wp0" for gb in range(4)]   # reset: WP=0
    v = vm.vcpu
    v.store(0x1000, 0x11, 8)
    v.store(0x4000_1000, 0x22, 8)                      # the same root index in the next GB
    assert (v.load(0x1000, 8), v.load(0x4000_1000, 8)) == (0x11, 0x22)
    assert not any(vm.mmu.is_shadowed(gb << 18) for gb in range(4))
    vm.audit()


def test_two_vcpus_on_one_cr3_share_a_root_counted_twice():
    vm = VM(16 << 20, nr_vcpus=2)
    g = MiniGuest(vm, "64")
    v0, v1 = vm.vcpus
    v1.setup_paging(**control_registers(PagingMode.LEVEL4, g.root << 12, nxe=True))
    root = v0.mmu_state.roots[0]
    assert v1.mmu_state.roots[0] is root and root.root_count == 2
    assert not v0.mmu_roots_invalid and not v1.mmu_roots_invalid
    v1.setup_paging(**control_registers(PagingMode.LEVEL4, g.alloc() << 12, nxe=True))
    assert root.root_count == 1
    vm.mmu.make_room(vm.mmu.pool_size - 2)             # reclaim everything reclaimable
    assert not root.zapped and vm.mmu.by_hpfn[root.hpfn] is root
    v0.set_cpl(3)
    v0.store(USER_BASE, 5, 8)
    assert v0.load(USER_BASE, 8) == 5
    vm.audit()


@pytest.mark.parametrize("free,reclaims", [(6, 0), (5, 1)])
def test_a_fault_reclaims_only_below_six_free_frames(free, reclaims):
    """page_fault tops up the pool to 6 free frames first: with 6 free nothing is
    reclaimed, with 5 exactly one page is."""
    vm, g, v = shadowed(pool_pages=16)
    mmu = vm.mmu
    v.set_cpl(3)
    for i in range(1, 6):
        v.store(USER_BASE + i * (2 << 20), i, 8)
    while len(mmu.free) < free:
        mmu.zap_page(next(sp for sp in mmu.lru if not sp.root_count))
    assert len(mmu.free) == free
    reclaimed = mmu.stats["reclaimed"]
    exits = vm.events.total_exits
    assert v.load(USER_BASE + 3 * (2 << 20) + 4096, 8) == 0     # a page never touched: it faults
    assert vm.events.total_exits > exits
    assert mmu.stats["reclaimed"] == reclaimed + reclaims
    vm.audit()


def test_a_fault_reloads_roots_that_were_zapped_while_in_use():
    vm, g, v = shadowed()
    zap_everything(vm.mmu)
    assert v.mmu_roots_invalid
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == 1
    assert not v.mmu_roots_invalid and not v.mmu_state.roots[0].zapped
    vm.audit()


def test_a_32bit_guests_pages_record_its_cr4_pse():
    from shadowmmu.x86.bits import CR4_PSE
    vm, g, v = shadowed("32", tracing=True)
    assert v.mmu_state.roots[0].role.describe() == "L2 g2 q0 WUX pse"
    v.write_cr4(v.guest.cr4 & ~CR4_PSE)
    assert v.mmu_state.roots[0].role.describe() == "L2 g2 q0 WUX"
    v.set_cpl(3)
    assert v.load(USER_BASE, 8) == 1
    vm.audit()


def test_without_paging_smep_and_smap_do_not_reach_the_hardware():
    """CR4.SMEP/SMAP apply only with paging; the identity map's sptes are user pages,
    which must not fault supervisor fetches and reads."""
    vm = VM(16 << 20)
    v = vm.vcpu
    v.write_cr4(CR4_SMEP | CR4_SMAP)
    v.store(0x5000, 0xC3, 8)
    assert v.load(0x5000, 8) == 0xC3 and v.fetch(0x5000) == 0xC3
    assert vm.vcpu.hw.cr4 & (CR4_SMEP | CR4_SMAP) == 0
    vm.audit()


def test_a_page_table_is_shadowed_under_its_full_address_above_4gb():
    vm = VM(8 << 30)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    pt_gfn = 0x100010                                  # a page table just above 4 GB
    frame = g.alloc()
    vm.gmem.write_uint((pt_gfn << 12) + 8 * 5, (frame << 12) | P | W | U | A | D, 8)
    va = 0x8000_0000 + 5 * 4096
    g.pte_addr(va)                                     # builds PDPT[2] -> PD -> PT; repoint the PDE
    pd_entry = next(a for lvl, a, *_ in fault_entries(vm, v, va) if lvl == 2)
    v.store(pd_entry, (pt_gfn << 12) | P | W | U | A, 8)
    v.set_cpl(3)
    assert v.load(va, 8) == 0
    assert vm.mmu.is_shadowed(pt_gfn) and not vm.mmu.is_shadowed(pt_gfn & 0xFFFFF)
    vm.audit()


def fault_entries(vm, v, va):
    try:
        return translate(vm.gmem, v.guest, va, 0, set_ad=False).entries
    except PageFault as pf:
        return pf.entries


def large_page_guest(ram=16 << 20):
    vm = VM(ram, tracing=True, pte_write="update")
    g = MiniGuest(vm, "64")
    return vm, g, vm.vcpu


def map_large(vm, g, v, va, level, frame):
    """Make the level-`level` entry for va a large page (P|W|U|A|PS, clean) at frame."""
    g.pte_addr(va)                                     # build the tables down to a PT
    addr = next(a for lvl, a, *_ in fault_entries(vm, v, va) if lvl == level)
    v.store(addr, frame | P | W | U | A | PS, 8)
    return addr


def test_2mb_guest_pages_map_through_direct_pages_a_clean_one_then_its_dirty_twin():
    vm, g, v = large_page_guest()
    va = 0x8000_0000
    map_large(vm, g, v, va, 2, 0x40_0000)
    map_large(vm, g, v, va + (2 << 20), 2, 0x60_0000)
    for k in range(4):
        vm.gmem.write_uint(0x40_0000 + k * 4096, 0x1000 + k, 8)
        vm.gmem.write_uint(0x60_0000 + k * 4096, 0x2000 + k, 8)
    v.store(g.pte_addr(va + (4 << 20)), (g.alloc() << 12) | P | W | U | A | D, 8)   # a 4K page beside
    vm.events.clear_trace()
    v.set_cpl(3)
    assert [v.load(va + k * 4096, 8) for k in range(3)] == [0x1000, 0x1001, 0x1002]
    assert [v.load(va + (2 << 20) + k * 4096, 8) for k in range(3)] == [0x2000, 0x2001, 0x2002]
    assert [n for n in notes(vm, "shadow page created") if "direct" in n] == [
        "  shadow page created: gfn 0x400 L1 direct q0 -UX",     # clean: without W
        "  shadow page created: gfn 0x600 L1 direct q0 -UX"]
    vm.events.clear_trace()
    v.store(va + 4096, 0x77, 8)                        # the first write sets D: the dirty twin
    assert notes(vm, "shadow page created") == ["  shadow page created: gfn 0x400 L1 direct q0 WUXD"]
    assert vm.gmem.read_uint(0x40_1000, 8) == 0x77
    v.load(va + (4 << 20), 8)
    exits = vm.events.total_exits
    vm.events.clear_trace()
    for _ in range(2):                                 # warm: neither the large page nor the 4K page
        v.load(va + 4096, 8)                           # beside it in the same directory exits again
        v.load(va + (4 << 20), 8)
        v.load(va + 2 * 4096, 8)
    assert vm.events.total_exits == exits + 1          # the one read of the twin's second 4K page
    assert len(notes(vm, "spte")) == 1                 # ... which installs one leaf and relinks nothing
    vm.audit()


def test_a_1gb_guest_page_maps_through_two_levels_of_direct_pages():
    vm, g, v = large_page_guest(2 << 30)
    va = 0xC000_0000
    map_large(vm, g, v, va, 3, 0x4000_0000)
    for k in (0, 1, 513):
        vm.gmem.write_uint(0x4000_0000 + k * 4096, 0x3000 + k, 8)
    v.set_cpl(3)
    v.store(USER_BASE, 9, 8)
    for _ in range(2):
        assert [v.load(va + k * 4096, 8) for k in (0, 1, 513)] == [0x3000, 0x3001, 0x3201]
        assert v.load(USER_BASE, 8) == 9
        exits = vm.events.total_exits
    assert [v.load(va + k * 4096, 8) for k in (0, 1, 513)] == [0x3000, 0x3001, 0x3201]
    assert v.load(USER_BASE, 8) == 9
    assert vm.events.total_exits == exits
    v.store(va + 513 * 4096 + 8, 0x55, 8)
    assert vm.gmem.read_uint(0x4000_0000 + 513 * 4096 + 8, 8) == 0x55
    vm.audit()


def test_a_handled_fault_restarts_the_flood_count_at_zero():
    vm, g, v = shadowed(policy="zap")
    pt_addr = g.pte_addr(USER_BASE)
    v.set_cpl(3)
    v.load(USER_BASE + 40 * 4096, 8)                   # demand fault: the handler writes a pte (zap),
    v.set_cpl(0)                                       # the access refaults and is fixed: count 0
    v.store(pt_addr + 8 * 10, 0, 8)
    v.store(pt_addr + 8 * 11, 0, 8)                    # two in a row: not a flood yet
    assert vm.mmu.is_shadowed(pt_addr >> 12) and vm.mmu.stats["flooded"] == 0
    vm.audit()


def test_nx_in_a_pae_page_directory_entry_forbids_fetches_below_it():
    vm, g, v = shadowed("pae")
    va = USER_BASE + (6 << 20)
    v.set_cpl(3)
    v.store(va, 0xC3, 8)                               # a new page table, under a new PDE
    v.set_cpl(0)
    t = translate(vm.gmem, v.guest, va, 0, set_ad=False)
    _, pde_addr, pde, _ = t.entries[1]
    v.store(pde_addr, pde | NX, 8)
    v.set_fault_handler(None)
    v.set_cpl(3)
    assert v.load(va, 8) == 0xC3
    assert fault_code(v.fetch, va) == P | U | 0x10
    v.set_cpl(0)                                       # a pte installed by update_pte under that PDE
    v.store(g.pte_addr(va + 4096), (g.alloc() << 12) | P | W | U | A | D, 8)
    v.set_cpl(3)
    assert fault_code(v.fetch, va + 4096) == P | U | 0x10
    vm.audit()


def test_update_installs_a_pte_with_the_rights_of_the_entries_above_not_of_another_pte():
    """The shadow page of a table carries the rights of the entries above it only: a
    read-only pte that was faulted in first does not make the next pte read-only."""
    vm, g, v = shadowed()
    va0, va2 = USER_BASE + (8 << 20), USER_BASE + (8 << 20) + 2 * 4096
    v.store(g.pte_addr(va0), (g.alloc() << 12) | P | U | A | D, 8)   # read-only
    v.set_cpl(3)
    v.load(va0, 8)                                     # shadows the table through the read-only pte
    v.set_cpl(0)
    v.store(g.pte_addr(va2), (g.alloc() << 12) | P | W | U | A | D, 8)
    spte = leaf_spte(vm, va2)
    assert spte & (P | W | U) == P | W | U, hex(spte)
    vm.audit()


def test_a_pae_walk_through_a_pdpte_with_no_shadow_root_is_a_clear_internal_error():
    vm, g, v = shadowed("pae")
    v.mmu_state.roots[1] = None                        # break the invariant on purpose
    with pytest.raises(MMUError, match="^guest walk succeeded through a PDPTE that has no shadow root$"):
        vm.mmu.page_fault(v, USER_BASE, 0)


# ---------------------------------------------------------------------------
# The walker: argument errors, 32-bit address range, protection keys


def test_translate_rejects_an_invalid_access_with_a_clear_error():
    tb = Tables(Env(LEVEL4))
    cpu = tb.cpu()
    with pytest.raises(ValueError, match="^invalid access flags 0x12$"):
        translate(tb.mem, cpu, 0, ACC_FETCH | ACC_WRITE)


@pytest.mark.parametrize("paging", [False, True], ids=["no-paging", "32-bit"])
def test_a_32bit_linear_address_is_0_to_4g_minus_1(paging):
    tb = Tables(Env(BITS32))
    for va in (0, 0xFFFFF000):
        tb.map(va, 1, P | W | U, 0x5000)
    cpu = tb.cpu() if paging else CpuState()
    assert translate(tb.mem, cpu, 0).paddr == (0x5000 if paging else 0)
    t = translate(tb.mem, cpu, 0xFFFFFFFF)
    if paging:                                         # 4-byte entries: index 1023 is at +0xFFC
        assert t.paddr == 0x5FFF
        assert [(lvl, addr & 0xFFF) for lvl, addr, *_ in t.entries] == [(2, 0xFFC), (1, 0xFFC)]
        assert t.pkey == 0                             # no protection keys in this format
    else:                                              # no paging: everything allowed, nothing to set
        assert tuple(t) == (0xFFFFFFFF, 0xFFFFFFFF, 12, R_W | R_U | R_X, 0, False, True, ())
    for va in (1 << 32, (1 << 33) - 1, -1):
        with pytest.raises(ValueError, match=f"^linear address {va:#x} does not fit in 32 bits$"):
            translate(tb.mem, cpu, va)


def test_a_walk_records_the_address_of_each_8_byte_entry_it_read():
    tb = Tables(Env(LEVEL4))
    va = 0x7FFF_FFFF_F000                              # index 255 in the PML4, 511 below
    addrs = tb.map(va, 1, P | W | U, 0x9000)
    t = translate(tb.mem, tb.cpu(), va)
    assert [(lvl, addr) for lvl, addr, *_ in t.entries] == [(lvl, addrs[lvl]) for lvl in (4, 3, 2, 1)]
    assert [addr & 0xFFF for _, addr, *_ in t.entries] == [0x7F8, 0xFF8, 0xFF8, 0xFF8]


def test_a_walk_into_a_frame_never_written_reads_zero_entries():
    """Untouched frames read as zeros (4-byte entries: all 1024 of them)."""
    for mode, va, size in ((BITS32, 0xFFFF_F000, 4), (LEVEL4, 0x7FFF_F000, 8)):
        tb = Tables(Env(mode))
        addrs = tb.map(va, 2, P | W | U, 0x40_0000)    # a large page, then repoint its entry
        tb.put(addrs[2], 0x30_0000 | P | W | U)        # at a table frame nobody wrote
        pf = fault_code_and_entries(tb.mem, tb.cpu(), va, 0)
        assert pf == (0, (1, 0x30_0000 + size * ((va >> 12) & (0x3FF if size == 4 else 0x1FF)), 0)), mode


def fault_code_and_entries(mem, cpu, va, access, record=True):
    with pytest.raises(PageFault) as e:
        translate(mem, cpu, va, access, record=record)
    return e.value.error_code, (e.value.entries[-1][:3] if e.value.entries else None)


def test_a_page_fault_carries_the_entries_read_up_to_the_faulting_one():
    """(level, entry address, value) top down, the faulting entry last: what the MMU logs
    for the dirty log and the narration shows.  record=False: no entries at all."""
    from x86_helpers import PAE
    va = 0x4040_3000                                   # indexes 1, 2, 3 (not 0: addresses must differ)
    for mode in (PAE, LEVEL4, BITS32):
        tb = Tables(Env(mode, nxe=mode != BITS32))
        addrs = tb.map(va, 1, P | U, 0x8000)           # read-only user page
        levels = [lvl for lvl in (5, 4, 3, 2, 1) if lvl in addrs]
        cases = [(ACC_USER | ACC_WRITE, P | W | U, addrs[1])]          # protection: the leaf
        rsvd = (1 << 51) if mode != BITS32 else None
        for access, code, last in cases:
            with pytest.raises(PageFault) as e:
                translate(tb.mem, tb.cpu(), va, access)
            assert e.value.error_code == code
            assert [(lvl, addr) for lvl, addr, *_ in e.value.entries] == [(lvl, addrs[lvl]) for lvl in levels]
            assert e.value.entries[-1][2] == tb.get(last)
            with pytest.raises(PageFault) as e:
                translate(tb.mem, tb.cpu(), va, access, record=False)
            assert e.value.entries == ()
        # not present at the leaf, then a reserved bit in the leaf and in the entry above
        leaf = tb.get(addrs[1])
        tb.put(addrs[1], leaf & ~P)
        assert fault_code_and_entries(tb.mem, tb.cpu(), va, 0) == (0, (1, addrs[1], leaf & ~P))
        assert fault_code_and_entries(tb.mem, tb.cpu(), va, 0, record=False) == (0, None)
        if rsvd is not None:
            tb.put(addrs[1], leaf | rsvd)
            assert fault_code_and_entries(tb.mem, tb.cpu(), va, 0) == (P | 8, (1, addrs[1], leaf | rsvd))
            assert fault_code_and_entries(tb.mem, tb.cpu(), va, 0, record=False) == (P | 8, None)
            tb.put(addrs[1], leaf)
            pde = tb.get(addrs[2])
            tb.put(addrs[2], pde | rsvd)
            assert fault_code_and_entries(tb.mem, tb.cpu(), va, 0) == (P | 8, (2, addrs[2], pde | rsvd))
            assert fault_code_and_entries(tb.mem, tb.cpu(), va, 0, record=False) == (P | 8, None)
            tb.put(addrs[2], pde)
        if mode == PAE:                                # a PDPTE that is not present
            tb.put(addrs[3], 0)
            cpu = tb.cpu()
            assert fault_code_and_entries(tb.mem, cpu, va, 0) == (0, (3, addrs[3], 0))
            assert fault_code_and_entries(tb.mem, cpu, va, 0, record=False) == (0, None)


def test_a_walk_without_set_ad_writes_no_accessed_bit_anywhere():
    tb = Tables(Env(LEVEL4))
    va = 0x4000_0000
    addrs = tb.map(va, 1, P | W | U, 0x8000)           # no A anywhere
    before = {lvl: tb.get(a) for lvl, a in addrs.items()}
    translate(tb.mem, tb.cpu(), va, ACC_USER | ACC_WRITE, set_ad=False)
    assert {lvl: tb.get(a) for lvl, a in addrs.items()} == before
    translate(tb.mem, tb.cpu(), va, ACC_USER | ACC_WRITE)
    assert {lvl: tb.get(a) for lvl, a in addrs.items()} == {
        lvl: v | A | (D if lvl == 1 else 0) for lvl, v in before.items()}


def test_smap_binds_explicit_supervisor_accesses_unless_ac_and_implicit_ones_always():
    from shadowmmu.x86.bits import ACC_IMPLICIT
    va = 0x4000_0000
    for ac in (False, True):
        tb = Tables(Env(LEVEL4, smap=True, ac=ac))
        tb.map(va, 1, P | W | U, 0x8000)
        cpu = tb.cpu()
        for access in (0, ACC_WRITE):
            if ac:
                assert translate(tb.mem, cpu, va, access).paddr == 0x8000
            else:
                assert fault_code_and_entries(tb.mem, cpu, va, access)[0] == P | access
        assert fault_code_and_entries(tb.mem, cpu, va, ACC_IMPLICIT)[0] == P
        assert translate(tb.mem, cpu, va, ACC_USER).paddr == 0x8000


def test_a_non_canonical_address_names_the_address_width():
    tb = Tables(Env(LEVEL4))
    with pytest.raises(NonCanonicalAddress) as e:
        translate(tb.mem, tb.cpu(), 1 << 47)
    assert (e.value.address, e.value.bits) == (1 << 47, 48)


def test_pkru_access_disable_denies_user_reads_and_write_disable_only_writes():
    key = 3
    va = 0x4000_0000
    for pkru, read_ok, write_ok in ((0, True, True), (1 << (2 * key), False, False),
                                    (2 << (2 * key), True, False)):
        tb = Tables(Env(LEVEL4, pke=True, pkru=pkru))
        tb.map(va, 1, P | W | U | (key << PKEY_SHIFT), 0x7000)
        cpu = tb.cpu()
        for access, ok in ((ACC_USER, read_ok), (ACC_USER | ACC_WRITE, write_ok)):
            if ok:
                assert translate(tb.mem, cpu, va, access).paddr == 0x7000
            else:
                with pytest.raises(PageFault) as e:
                    translate(tb.mem, cpu, va, access)
                assert e.value.error_code == P | access | 0x20          # P, W/U as accessed, PK


# ---------------------------------------------------------------------------
# The page role: guest state the sptes depend on keeps cached pages apart


def read_only_user_page(guest="64"):
    """A booted guest with a read-only, dirty user page at va; the guest's fault handler
    removed so a fault reaches the test; CPL0."""
    vm, g, v = shadowed(guest)
    va = USER_BASE + 12 * 4096
    v.store(g.pte_addr(va), (g.alloc() << 12) | P | U | A | D, 8 if guest != "32" else 4)
    v.set_fault_handler(None)
    return vm, g, v, va


def fault_code(fn, *args):
    with pytest.raises(PageFault) as e:
        fn(*args)
    return e.value.error_code


def test_sptes_made_under_cr0_wp0_are_not_reused_after_wp_is_set_again():
    """CR0.WP=0: a supervisor write to a read-only user page succeeds (the spte is made
    writable, supervisor-only).  Back to WP=1 the same write must fault."""
    vm, g, v, va = read_only_user_page()
    cr0 = v.guest.cr0
    v.write_cr0(cr0 & ~CR0_WP)
    v.store(va, 0x77, 8)
    v.set_cpl(3)
    assert v.load(va, 8) == 0x77                       # the page is still the user's
    assert fault_code(v.store, va, 1, 8) == P | W | U
    v.set_cpl(0)
    v.write_cr0(cr0)
    assert fault_code(v.store, va, 1, 8) == P | W
    assert v.load(va, 8) == 0x77
    vm.audit()


def test_a_wp0_supervisor_write_keeps_the_page_executable_unless_smep():
    """Without SMEP the supervisor-writable spte keeps X: a later supervisor fetch does
    not exit.  With SMEP a supervisor fetch from the (user) page must still fault."""
    for smep in (False, True):
        vm, g, v, va = read_only_user_page()
        if smep:
            v.write_cr4(v.guest.cr4 | CR4_SMEP)
        v.write_cr0(v.guest.cr0 & ~CR0_WP)
        v.store(va, 0x90, 8)
        exits = vm.events.total_exits
        if smep:
            assert fault_code(v.fetch, va) == P | 0x10      # P, I/D
        else:
            assert v.fetch(va) == 0x90
            assert vm.events.total_exits == exits
        vm.audit()


def test_sptes_made_under_wp0_without_smap_are_not_reused_once_smap_is_on():
    vm, g, v, va = read_only_user_page()
    v.write_cr0(v.guest.cr0 & ~CR0_WP)
    v.store(va, 0x55, 8)                               # supervisor-writable, supervisor-only spte
    v.write_cr4(v.guest.cr4 | CR4_SMAP)
    assert fault_code(v.load, va, 8) == P              # SMAP: a supervisor read of a user page
    v.set_ac(True)
    assert v.load(va, 8) == 0x55
    vm.audit()


def test_sptes_made_with_nxe_are_not_reused_after_nxe_is_cleared():
    """With EFER.NXE=0 bit 63 of a pte is reserved: the access must take a RSVD fault."""
    vm, g, v = shadowed()
    va = USER_BASE + 13 * 4096
    v.store(g.pte_addr(va), (g.alloc() << 12) | P | W | U | A | D | NX, 8)
    v.set_cpl(3)
    assert v.load(va, 8) == 0
    v.set_cpl(0)
    v.set_fault_handler(None)
    v.write_efer(v.guest.efer & ~EFER_NXE)
    v.set_cpl(3)
    assert fault_code(v.load, va, 8) == P | U | 8      # P, U, RSVD
    vm.audit()


def test_a_wp0_supervisor_write_to_a_user_page_under_smap_is_emulated_every_time():
    """With SMAP the CR0.WP=0 trick (writable, not user) would hide the page's U bit from
    the SMAP check, so the write is emulated and the spte stays read-only and user."""
    vm, g, v, va = read_only_user_page()
    v.write_cr4(v.guest.cr4 | CR4_SMAP)
    v.write_cr0(v.guest.cr0 & ~CR0_WP)
    v.set_ac(True)
    frame = vm.mmu.gva_to_gpa(v, va) >> 12
    for value in (0x31, 0x32):
        before = vm.events.exits["emulate"]
        v.store(va, value, 8)
        assert vm.events.exits["emulate"] == before + 1
        assert leaf_spte(vm, va) == (vm.gmem.gfn_to_pfn(frame) << 12) | P | U | A
    assert v.load(va, 8) == 0x32
    vm.audit()


def test_the_wp0_trick_maps_the_page_once_for_all_supervisor_writes():
    """Without SMAP (or on a supervisor page) the first write maps the page writable and
    supervisor-only: later supervisor writes do not exit."""
    for user_page, smap in ((True, False), (False, True)):
        vm, g, v = shadowed()
        va = USER_BASE + 14 * 4096
        v.store(g.pte_addr(va), (g.alloc() << 12) | P | (U if user_page else 0) | A | D, 8)
        if smap:
            v.write_cr4(v.guest.cr4 | CR4_SMAP)
        v.write_cr0(v.guest.cr0 & ~CR0_WP)
        v.store(va, 1, 8)
        exits = vm.events.total_exits
        v.store(va + 8, 2, 8)
        assert vm.events.total_exits == exits, (user_page, smap)
        assert leaf_spte(vm, va) & (W | U) == W
        vm.audit()


def test_a_four_level_guests_protection_keys_reach_the_shadow_leaf():
    vm, g, v = shadowed()
    va = USER_BASE + 15 * 4096
    key = 1
    v.store(g.pte_addr(va), (g.alloc() << 12) | P | W | U | A | D | (key << 59), 8)
    v.write_cr4(v.guest.cr4 | CR4_PKE)
    v.write_pkru(1 << (2 * key))                       # access-disable key 1
    v.set_fault_handler(None)
    v.set_cpl(3)
    assert fault_code(v.load, va, 8) == P | U | 0x20   # P, U, PK
    assert leaf_spte(vm, va) >> 59 & 0xF in (0, key)   # (not present yet, or carrying the key)
    v.write_pkru(0)
    assert v.load(va, 8) == 0
    assert leaf_spte(vm, va) >> 59 & 0xF == key
    vm.audit()


def test_an_mmio_spte_records_the_gpa_and_dirty_logging_ignores_mmio():
    vm = VM(16 << 20, tracing=True)
    dev = Device()
    vm.add_mmio(0xFEE00000, 0x1000, dev)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.store(g.pte_addr(0x7000_0000), 0xFEE00000 | P | W | A | D, 8)
    vm.mmu.enable_dirty_log(vm.slots[0])
    vm.events.clear_trace()
    v.store(0x7000_0010, 5, 4)
    assert dev.log == [("w", 0xFEE00010, 4, 5)]
    assert any(line.endswith(f": 0x0 -> {0xFEE00000 | 0x200:#x}") for line in notes(vm, "spte"))
    assert 0xFEE00 not in vm.mmu.get_dirty_log(vm.slots[0])
    vm.audit()


# ---------------------------------------------------------------------------
# Roots, reclaim, the pool


def test_a_pae_guest_has_a_root_for_each_present_pdpte_only_and_write_protects_them():
    vm, g, v = shadowed("pae", tracing=True)
    roots = v.mmu_state.roots
    pdptes = v.guest.pdptes
    assert [r is not None for r in roots] == [bool(p & P) for p in pdptes] == [True, True, False, False]
    for r, p in zip(roots, pdptes):
        if r is not None:
            assert r.gfn == (p & 0x000FFFFFFFFFF000) >> 12 and vm.mmu.is_shadowed(r.gfn)
            assert r.role.describe() == "L2 g3 q0 WUX"
    assert vm.mmu.nr_pages == len({id(sp) for sp in vm.mmu.pages.values()})
    before = vm.events.exits["pte_write"]
    pd = roots[1].gfn << 12
    v.store(pd + 8 * 200, 0, 8)                        # a kernel store to a root table: trapped
    assert vm.events.exits["pte_write"] == before + 1
    vm.audit()


def test_loading_roots_reclaims_only_down_to_eight_free_frames():
    vm, g, v = shadowed(pool_pages=16)
    mmu = vm.mmu
    v.set_cpl(3)
    for i in range(1, 6):
        v.store(USER_BASE + i * (2 << 20), i, 8)       # new page tables until the pool is tight
    v.set_cpl(0)
    assert len(mmu.free) < 8
    while len(mmu.free) < 8:
        mmu.zap_page(next(sp for sp in mmu.lru if not sp.root_count))
    reclaimed = mmu.stats["reclaimed"]
    v.write_cr3(v.guest.cr3)
    assert mmu.stats["reclaimed"] == reclaimed
    assert len(mmu.free) == 8
    mmu.make_room(8)
    assert mmu.stats["reclaimed"] == reclaimed         # enough already
    mmu.make_room(10)
    assert mmu.stats["reclaimed"] == reclaimed + 2 and len(mmu.free) == 10
    vm.audit()


def test_a_pool_whose_every_page_is_a_root_is_a_clear_error():
    vm, g, v = shadowed(pool_pages=16)
    mmu = vm.mmu
    for sp in mmu.pages.values():
        sp.root_count += 1                             # as if each were some vCPU's root
    with pytest.raises(MMUError, match="^shadow page pool of 16 pages is too small: every page is a root$"):
        mmu.make_room(len(mmu.free) + 1)
    mmu.free.clear()
    with pytest.raises(MMUError, match=r"^shadow page pool exhausted \(make_room\(\) was not called first\)$"):
        mmu.get_page(0x3FF, Role(level=1, glevels=4))


def test_statistics_count_each_event_once():
    vm, g, v = shadowed(policy="zap")
    s = vm.mmu.stats
    created, flushes = s["pages_created"], s["tlb_flushes"]
    assert created > 0 and flushes > 0
    v.set_cpl(3)
    v.store(USER_BASE + (4 << 20), 1, 8)               # a new 2 MB region: one new page table
    assert s["pages_created"] == created + 1
    v.store(USER_BASE + (2 << 20), 1, 8)               # bit 21 set: still quadrant 0 (64-bit guest)
    assert all(sp.role.quadrant == 0 for sp in vm.mmu.pages.values())
    v.set_cpl(0)
    pt_addr = g.pte_addr(USER_BASE)
    v.store(pt_addr + 8 * 30, 0, 8)                    # warm-up: the kernel's spte of the table settles
    v.store(g.pte_addr(USER_BASE + (4 << 20)) + 8 * 30, 0, 8)  # another table: no flood below
    flushes = s["tlb_flushes"]
    v.store(pt_addr, 0, 8)                             # clears a present spte: one flush
    assert s["tlb_flushes"] == flushes + 1
    v.store(pt_addr + 8 * 31, 0, 8)                    # clears nothing: no flush
    assert s["tlb_flushes"] == flushes + 1
    vm.audit()


def test_the_trace_shows_every_spte_change_with_its_index_and_values():
    vm, g, v = shadowed(policy="zap", tracing=True)
    pt_addr = g.pte_addr(USER_BASE)
    old = leaf_spte(vm, USER_BASE)
    assert old & P
    vm.events.clear_trace()
    v.store(pt_addr, 0, 8)
    lines = notes(vm, "spte")
    assert f"  spte [0] of shadow page gfn {pt_addr >> 12:#x} (L1 g4 q0 WUX): {old:#x} -> 0x0" in lines


# ---------------------------------------------------------------------------
# The walker against the SDM oracle of test_x86_rules.py, on a fixed sample of its
# matrices (every 211th / 61st / 29th case: strides prime to every loop size there,
# about 3,500 cases in all).  The full matrices run in `make test`; this sample is
# what `make mutate` can afford per mutant.


@pytest.mark.parametrize("mode,size", RIGHTS_PARAMS, ids=[f"{m}-{s}" for m, s in RIGHTS_PARAMS])
def test_a_sample_of_the_rights_and_presence_matrices_agrees_with_the_sdm(mode, size):
    check(f"rights sample {mode} {size}", islice(rights_cases(mode, size), 0, None, 211), tlb=True)
    check(f"presence sample {mode} {size}", islice(presence_cases(mode, size), 0, None, 61), tlb=True)


@pytest.mark.parametrize("mode", MODES)
def test_a_sample_of_the_reserved_bit_matrix_agrees_with_the_sdm(mode):
    check(f"reserved sample {mode}", islice(reserved_cases(mode), 0, None, 29))


# ---------------------------------------------------------------------------
# Last (the slowest): the lockstep checker on short seeded programs


@pytest.mark.parametrize("policy", ("zap", "update"))
@pytest.mark.parametrize("guest", FORMATS)
def test_a_short_seeded_program_runs_identically_native_and_shadowed_under_reclaim(guest, policy):
    """The lockstep checker (native vs shadow, audit after every step) on one seeded
    program per format and policy, with the smallest pool so LRU reclaim runs often."""
    mode = GUESTS[guest]
    program = generate_program(RandomChooser(7), mode, 100)
    ls = Lockstep(mode, policy, pool_pages=16)
    d = ls.run(program)
    assert d is None, str(d)
    assert ls.shadow.mmu.stats["reclaimed"] > 0
