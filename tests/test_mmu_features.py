"""Shadow MMU mechanisms one by one: write protection, flooding, misaligned writes,
MMIO, dirty logging, reclaim bound, 5-level guests, audit, and bad input."""

import pytest

from shadowmmu.guest.minimal import USER_BASE, A, D, MiniGuest, P, U, W
from shadowmmu.mmu import AuditError
from shadowmmu.vm import VM, GuestCrash
from shadowmmu.x86 import PageFault
from shadowmmu.x86.bits import ACC_USER, ACC_WRITE, PF_P, PF_U, PF_W
from shadowmmu.x86.builder import control_registers
from shadowmmu.x86.formats import PagingMode


def booted(guest="64", **kw):
    vm = VM(16 << 20, **kw)
    return vm, MiniGuest(vm, guest)


def with_a_shadowed_user_page():
    """A booted guest whose user page table is shadowed (one user page touched); CPL0."""
    vm, g = booted()
    v = vm.vcpu
    v.set_cpl(3)
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    return vm, g, v


def test_a_shadowed_page_table_is_never_writable_through_any_spte():
    vm, g, v = with_a_shadowed_user_page()
    pt = g.pte_addr(USER_BASE) >> 12
    assert vm.mmu.is_shadowed(pt)
    assert pt not in vm.mmu.rmap                   # no writable spte maps it
    before = vm.events.exits["pte_write"]
    v.store(g.pte_addr(USER_BASE + 8 * 4096), 0, 8)     # kernel store to the table: trapped
    assert vm.events.exits["pte_write"] == before + 1
    vm.audit()


def test_three_consecutive_writes_to_one_table_unshadow_it():
    """The fork/flood detector: at the third emulated write in a row to one gfn, its
    shadow pages are zapped and the guest writes it freely from then on."""
    vm, g, v = with_a_shadowed_user_page()
    pt_addr = g.pte_addr(USER_BASE + 4096)
    pt = pt_addr >> 12
    for i in range(3):
        assert vm.mmu.is_shadowed(pt)
        v.store(pt_addr + 8 * (10 + i), 0, 8)
    assert not vm.mmu.is_shadowed(pt)
    assert vm.mmu.stats["flooded"] == 1
    # the table is an ordinary page now: one fault makes the kernel's read-only spte for
    # it writable, then stores to it cost nothing
    exits = dict(vm.events.exits)
    v.store(pt_addr + 8 * 20, 0, 8)
    assert {r: n - exits.get(r, 0) for r, n in vm.events.exits.items() if n != exits.get(r, 0)} == {"pf_fixed": 1}
    exits = vm.events.total_exits
    v.store(pt_addr + 8 * 21, 0, 8)
    assert vm.events.total_exits == exits
    vm.audit()


def test_a_guest_fault_in_between_resets_the_flood_count():
    """Two writes, a guest fault whose handler writes the same table (the third write
    in a row without the reset), one more write: no flood, the same shadow page.  (The
    table being shadowed at the end proves nothing: the retried access re-shadows it.)"""
    vm, g, v = with_a_shadowed_user_page()
    pt_addr = g.pte_addr(USER_BASE)
    (sp,) = vm.mmu.shadowed[pt_addr >> 12]
    v.store(pt_addr + 8 * 10, 0, 8)
    v.store(pt_addr + 8 * 11, 0, 8)
    v.set_cpl(3)
    v.load(USER_BASE + 40 * 4096, 8)           # demand fault: injected, count reset
    v.set_cpl(0)
    v.store(pt_addr + 8 * 12, 0, 8)
    assert vm.mmu.stats["flooded"] == 0
    assert not sp.zapped and vm.mmu.shadowed[pt_addr >> 12] == [sp]
    vm.audit()


@pytest.mark.parametrize("size,offset,zapped", [(2, 0, True), (4, 4, False), (8, 4, True), (1, 7, True)])
def test_a_misaligned_pte_write_zaps_and_a_partial_one_clears(size, offset, zapped):
    """KVM's rule: a write shorter than 4 bytes or crossing a pte boundary zaps the
    shadow page; an aligned 4-byte write into an 8-byte pte only clears that spte."""
    vm, g, v = with_a_shadowed_user_page()
    pt_addr = g.pte_addr(USER_BASE)
    (sp,) = vm.mmu.shadowed[pt_addr >> 12]
    assert sp.spt[0]                                     # the spte of USER_BASE
    zaps = vm.mmu.stats["pte_zaps"]
    v.store(pt_addr + offset, 0, size)
    assert vm.mmu.stats["misaligned_zaps"] == int(zapped)
    assert vm.mmu.is_shadowed(pt_addr >> 12) is not zapped
    assert sp.zapped is zapped
    if not zapped:                                       # the one spte the write covers is cleared
        assert vm.mmu.stats["pte_zaps"] == zaps + 1 and sp.spt[0] == 0
    v.set_cpl(3)
    got = v.load(USER_BASE, 8)                 # the guest's edit took effect, whatever it was
    vm.audit()
    nv, ng = VM(16 << 20, native=True), None
    ng = MiniGuest(nv, "64")
    nv.vcpu.set_cpl(3)
    nv.vcpu.store(USER_BASE, 1, 8)
    nv.vcpu.set_cpl(0)
    nv.vcpu.store(ng.pte_addr(USER_BASE) + offset, 0, size)
    nv.vcpu.invalidate_all()
    nv.vcpu.set_cpl(3)
    assert nv.vcpu.load(USER_BASE, 8) == got


class Device:
    def __init__(self):
        self.log = []

    def read(self, gpa, size):
        self.log.append(("r", gpa, size))
        return 0xAB

    def write(self, gpa, size, value):
        self.log.append(("w", gpa, size, value))


@pytest.mark.parametrize("native", [False, True])
def test_mmio_accesses_reach_the_device_every_time(native):
    vm = VM(16 << 20, native=native)
    dev = Device()
    vm.add_mmio(0xFEE00000, 0x1000, dev)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.store(g.pte_addr(0x7000_0000), 0xFEE00000 | 0x63, 8)      # kernel maps the device
    for _ in range(3):
        assert v.load(0x7000_0010, 4) == 0xAB
    v.store(0x7000_0020, 5, 4)
    assert dev.log == [("r", 0xFEE00010, 4)] * 3 + [("w", 0xFEE00020, 4, 5)]
    if not native:
        assert vm.events.exits["mmio"] == 4         # an MMIO spte never maps: every access exits
        vm.audit()


def guest_walk(vm, g, va):
    """(gfn of the page table, gfn of the page) for va, read straight from guest RAM
    (4-level tables): independent of the MMU and of the x86 walker."""
    table = g.root
    for level in (4, 3, 2, 1):
        e = vm.gmem.read_u64((table << 12) + 8 * ((va >> (12 + 9 * (level - 1))) & 511))
        assert e & 1, f"{va:#x}: no level-{level} entry"
        pt, table = table, (e & 0x000FFFFFFFFFF000) >> 12
    return pt, table


def changed_pages(before, after):
    return {gfn for gfn in before.keys() | after.keys() if before.get(gfn) != after.get(gfn)}


def test_dirty_log_reports_exactly_the_pages_written_since_the_last_get():
    vm, g = booted()
    v = vm.vcpu
    slot = vm.slots[0]
    v.set_cpl(3)
    for i in range(8):
        v.store(USER_BASE + i * 4096, i + 1, 8)       # writable sptes before logging starts
    vm.mmu.enable_dirty_log(slot)
    vm.audit()
    before = vm.guest_memory()
    for i in (1, 3, 5, 9):                            # page 9 is new: a demand fault writes its pte
        v.store(USER_BASE + i * 4096 + 16, 0x55, 8)
    after = vm.guest_memory()
    pt = guest_walk(vm, g, USER_BASE)[0]
    page = {i: guest_walk(vm, g, USER_BASE + i * 4096)[1] for i in (1, 3, 5, 9)}
    dirty = vm.mmu.get_dirty_log(slot)
    assert changed_pages(before, after) <= set(dirty)           # no page that changed is missed
    assert sorted(dirty) == sorted({page[1], page[3], page[5], page[9], pt})
    assert vm.mmu.get_dirty_log(slot) == []                     # get cleared the log
    # after get-and-clear the pages are write-protected again: a new write is logged,
    # and only it (the pages written before the get, and the table, are not)
    before = vm.guest_memory()
    v.store(USER_BASE + 3 * 4096, 7, 8)
    assert changed_pages(before, vm.guest_memory()) == {page[3]}
    assert vm.mmu.get_dirty_log(slot) == [page[3]]
    vm.audit()


def test_dirty_log_reports_a_table_whose_accessed_bit_the_mmu_set():
    """A page the MMU changes for the guest is a page written: a guest pte with A=0,
    then a guest access after the get; the MMU's walk sets A in the guest's page
    table, so that table is dirty (else a migration would copy it stale)."""
    vm, g, v = with_a_shadowed_user_page()
    pte_addr = g.pte_addr(USER_BASE + 4096)
    v.store(pte_addr, (0x300 << 12) | P | W | U, 8)       # A=0, D=0
    slot = vm.slots[0]
    vm.mmu.enable_dirty_log(slot)
    vm.mmu.get_dirty_log(slot)
    before = vm.guest_memory()
    v.set_cpl(3)
    v.load(USER_BASE + 4096, 8)
    assert changed_pages(before, vm.guest_memory()) == {pte_addr >> 12}    # only the A bit changed
    assert vm.mmu.get_dirty_log(slot) == [pte_addr >> 12]


def test_gva_to_gpa_has_no_side_effects_and_faults_like_the_guest():
    """A debugger's translation: guest memory stays bit-exact (no A/D bit set at any
    level, on a walk that succeeds or faults), no exit, no shadow page; its #PF
    carries the error code the guest gets when it makes the access itself."""
    vm, g = booted()
    v = vm.vcpu
    # a fresh 4-level path with A=0 at every level: va -> rw frame (W, D=0), va + 4K -> ro frame
    va = 1 << 39                                         # PML4 entry 1
    pdpt, pd, pt, rw, ro = (g.alloc() for _ in range(5))
    for table, index, nxt in ((g.root, 1, pdpt), (pdpt, 0, pd), (pd, 0, pt)):
        v.store((table << 12) + 8 * index, (nxt << 12) | P | W | U, 8)
    v.store(pt << 12, (rw << 12) | P | W | U, 8)
    v.store((pt << 12) + 8, (ro << 12) | P | U, 8)
    v.store((rw << 12) + 0x120, 0x5A5A, 8)
    entries = [((g.root << 12) + 8, pdpt), (pdpt << 12, pd), (pd << 12, pt), (pt << 12, rw), ((pt << 12) + 8, ro)]
    memory, exits, pages = vm.guest_memory(), vm.events.total_exits, vm.mmu.nr_pages
    uw = ACC_USER | ACC_WRITE
    assert vm.mmu.gva_to_gpa(v, va + 0x123, uw) == (rw << 12) | 0x123
    with pytest.raises(PageFault) as ro_fault:
        vm.mmu.gva_to_gpa(v, va + 4096, uw)               # protection: present, write, user
    assert (ro_fault.value.address, ro_fault.value.error_code) == (va + 4096, PF_P | PF_W | PF_U)
    with pytest.raises(PageFault) as np_fault:
        vm.mmu.gva_to_gpa(v, va + 2 * 4096, uw)           # not present, write, user
    assert (np_fault.value.address, np_fault.value.error_code) == (va + 2 * 4096, PF_W | PF_U)
    assert [hex(vm.gmem.read_u64(a)) for a, _ in entries] == [
        hex((n << 12) | P | W | U) for n in (pdpt, pd, pt, rw)] + [hex((ro << 12) | P | U)]   # A=0, D=0
    assert changed_pages(memory, vm.guest_memory()) == set()     # and every other byte is as it was
    assert vm.events.total_exits == exits and vm.mmu.nr_pages == pages
    # the guest's own accesses: the same faults, and a real walk does set A (and D)
    v.set_cpl(3)
    v.store(va + 0x128, 1, 8)
    assert v.load(va + 0x120, 8) == 0x5A5A
    assert [vm.gmem.read_u64(a) & (A | D) for a, _ in entries[:4]] == [A, A, A, A | D]
    v.store(va + 4096, 1, 8)
    v.store(va + 2 * 4096, 1, 8)
    assert g.handled == [(va + 4096, PF_P | PF_W | PF_U), (va + 2 * 4096, PF_W | PF_U)]
    vm.audit()


def test_a_five_level_guest_runs_on_five_level_shadow_tables():
    vm = VM(16 << 20)
    v = vm.vcpu
    # tables by guest stores, paging off: PML5 0x100 -> PML4 0x101 -> PDPT 0x102 -> PD 0x103 -> PT 0x104
    for lvl in range(4):
        v.store((0x100 + lvl) << 12, ((0x101 + lvl) << 12) | 0x27, 8)
    v.store(0x104 << 12, (0x200 << 12) | 0x67, 8)          # va 0 -> gfn 0x200
    v.store(0x200 << 12, 0x1234, 8)
    v.setup_paging(**control_registers(PagingMode.LEVEL5, 0x100 << 12))
    assert vm.vcpu.hw.mode is PagingMode.LEVEL5
    assert v.load(0x10, 8) == 0 and v.load(0, 8) == 0x1234
    assert v.load(0x0, 8) == 0x1234
    vm.audit()


def test_audit_catches_a_corrupted_rmap_and_a_stale_writable_spte():
    vm, g, v = with_a_shadowed_user_page()
    gfn = next(iter(vm.mmu.rmap))
    vm.mmu.rmap[gfn].add(0xDEAD000)
    with pytest.raises(AuditError, match="rmap is not exact"):
        vm.audit()
    vm.mmu.rmap[gfn].discard(0xDEAD000)
    vm.audit()
    # make a shadowed table writable behind the MMU's back
    pt = g.pte_addr(USER_BASE) >> 12
    for sp in vm.mmu.pages.values():
        for i, spte in enumerate(sp.spt):
            if sp.role.level == 1 and spte & 1 and vm.gmem.pfn_to_gfn(spte >> 12) == pt:
                sp.spt[i] = spte | 2
                with pytest.raises(AuditError):
                    vm.audit()
                return
    pytest.fail("no spte maps the page table")


def test_bad_vm_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 4096"):
        VM(1000)
    with pytest.raises(ValueError, match="64 GiB"):
        VM(128 << 30)
    with pytest.raises(ValueError, match="unknown policy 'clear'"):
        VM(1 << 20, pte_write="clear")
    with pytest.raises(ValueError, match="at least 16"):
        VM(1 << 20, pool_pages=4)
    vm = VM(64 << 30, maxphyaddr=40)                       # 64 GiB, lazily backed
    vm.vcpu.store((4 << 30) - 8, 0x77, 8)                  # paging off: the top of the low 4 GB
    assert vm.vcpu.load((4 << 30) - 8, 8) == 0x77
    assert len(vm.host.allocated_frames()) < 16


def test_a_handler_that_never_fixes_the_fault_is_a_guest_crash_not_a_hang():
    vm, g = booted()
    v = vm.vcpu
    v.set_fault_handler(lambda vcpu, a, e: None)
    v.set_cpl(3)
    with pytest.raises(GuestCrash, match="never resolved"):
        v.load(USER_BASE, 8)


def test_the_shadow_pool_bound_holds_under_a_large_address_space():
    vm = VM(64 << 20, pool_pages=40)
    MiniGuest(vm, "64")
    v = vm.vcpu
    v.set_cpl(3)
    for i in range(64):
        v.store(USER_BASE + i * (2 << 20), i, 8)          # a new page table every 2 MB
        assert vm.mmu.nr_pages <= vm.mmu.pool_size
    assert vm.mmu.stats["reclaimed"] > 0
    for i in range(64):
        assert v.load(USER_BASE + i * (2 << 20), 8) == i
    vm.audit()


@pytest.mark.parametrize("policy", ["zap", "update"])
def test_a_pte_write_on_one_vcpu_flushes_the_other_vcpus_hardware_tlb(policy):
    """kvm_flush_remote_tlbs: an spte that loses rights or goes away is gone from every
    vCPU's hardware TLB, so a second vCPU never runs on a stale shadow translation.

    Set up so that pte_write's own flush is the only thing that can drop vCPU 1's
    entry: the table is shadowed and vCPU 0's read-only mapping of it is final (a
    first trapped write rebuilt it, clearing the D bit it kept from when it was
    writable -- a change that would itself flush), the new frame is mapped, and
    only then does vCPU 1 fill its TLB.  No flush is pending when vCPU 0 remaps."""
    vm = VM(16 << 20, nr_vcpus=2, pte_write=policy)
    g = MiniGuest(vm, "64")
    v0, v1 = vm.vcpus
    v1.setup_paging(**control_registers(PagingMode.LEVEL4, g.root << 12, nxe=True))
    v0.set_cpl(3)
    v0.store(USER_BASE, 0x1111, 8)                       # demand fault: the user table is shadowed
    v0.set_cpl(0)
    pte = g.pte_addr(USER_BASE)
    assert vm.mmu.is_shadowed(pte >> 12)
    v0.store(pte + 8 * 100, 0, 8)                        # a trapped write: v0's read-only spte for the table is final
    new = g.alloc()
    v0.store(new << 12, 0x2222, 8)                       # the frame the guest will remap to
    v1.set_cpl(3)
    exits = vm.events.total_exits
    assert v1.load(USER_BASE, 8) == 0x1111               # v1's TLB now maps the old frame ...
    assert vm.events.total_exits == exits                # ... filled by a hardware walk, no exit
    assert v1.tlb.lookup(USER_BASE) is not None
    assert not vm.mmu.tlb_flush_needed                   # nothing pending that a later fault would flush
    flushes, pte_writes = vm.mmu.stats["tlb_flushes"], vm.events.exits["pte_write"]
    v0.store(pte, (new << 12) | 0x67, 8)                 # remap, on vCPU 0 only
    assert vm.events.exits["pte_write"] == pte_writes + 1
    assert v1.tlb.lookup(USER_BASE) is None
    assert v1.load(USER_BASE, 8) == 0x2222               # the new frame
    assert vm.mmu.stats["tlb_flushes"] == flushes + 1    # pte_write's flush was the only one
    vm.audit()


@pytest.mark.parametrize("native", [False, True])
def test_an_invalid_access_size_is_a_clear_error_on_the_fast_path_too(native):
    vm = VM(16 << 20, native=native)
    v = vm.vcpu
    v.store(0x1000, 5, 8)
    v.load(0x1000, 8)                              # the TLB now holds the page
    for size in (3, 16):
        with pytest.raises(ValueError, match="1, 2, 4 or 8"):
            v.load(0x1000, size)
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        v.store(0x1000, 1, 3)
