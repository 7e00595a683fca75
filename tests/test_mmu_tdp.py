"""Two-dimensional paging (EPT): exact exits, references per TLB miss, dirty logging
through the EPT's D bits, the audit, the bounded pool, MMIO, and lockstep with native.

The expectations are the architecture's, not the model's: a guest walk of n levels
on an m = 4 level EPT reads n*m + n + m entries (each guest table's gfn is itself
translated, m each; the n guest entries; the final gpa, m); the guest's own faults
never exit; the first touch of each guest frame is one EPT violation, and no other.
"""

import pytest

from shadowmmu.guest.minimal import USER_BASE, MiniGuest
from shadowmmu.mmu import AuditError
from shadowmmu.mmu.tdp import EPT_D, TdpMMU
from shadowmmu.verify.lockstep import (
    DATA, GUESTS, RAM_SIZE, Lockstep, Op, build_world, campaign, compose_va, execute, generate_program,
)
from shadowmmu.verify.choosers import RandomChooser
from shadowmmu.vm import VM
from shadowmmu.x86.bits import CR0_PG

from test_mmu_features import Device         # an MMIO register page that logs its accesses

P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
FORMATS = ("32", "pae", "64", "la57")

# entries per complete walk, from the formats: levels the guest walk reads from memory
# (PAE: PD and PT; its PDPTEs are registers loaded at CR3 load), n*4 + n + 4
REFS_PER_MISS = {"32": 2 * 4 + 2 + 4, "pae": 2 * 4 + 2 + 4, "64": 4 * 4 + 4 + 4, "la57": 5 * 4 + 5 + 4}
assert REFS_PER_MISS == {"32": 14, "pae": 14, "64": 24, "la57": 29}
# a test address the lockstep world maps with 4 KB pages: the first index of each level
FIRST_VA_INDICES = {"32": (1, 0), "pae": (1, 1, 0), "64": (1, 0, 0, 0), "la57": (1, 0, 0, 0, 0)}


def world(guest, **kw):
    vm = VM(RAM_SIZE, policy="tdp", nr_vcpus=1, **kw)
    build_world(vm, GUESTS[guest])
    return vm


def nonzero(exits):
    return {r: n for r, n in exits.items() if n}


# ---------------------------------------------------------------- references
@pytest.mark.parametrize("guest", FORMATS)
def test_a_tlb_miss_reads_n_times_m_plus_n_plus_m_entries(guest):
    vm = world(guest)
    native = VM(RAM_SIZE, native=True, nr_vcpus=1)
    build_world(native, GUESTS[guest])
    v, mmu = vm.vcpu, vm.mmu
    va = compose_va(GUESTS[guest], FIRST_VA_INDICES[guest])
    assert v.load(va, 8) == native.vcpu.load(va, 8)          # first touch: EPT violations
    assert v.load(va, 8) in {0x1111111111111111 * (i + 1) for i in range(len(DATA))}
    v.invalidate_all()
    s0, exits0 = mmu.stats, dict(vm.exits)
    v.load(va, 8)
    s1 = mmu.stats
    assert s1["tlb_misses"] - s0["tlb_misses"] == 1
    assert s1["walk_refs"] - s0["walk_refs"] == REFS_PER_MISS[guest]
    assert s1["complete_walk_refs"] - s0["complete_walk_refs"] == REFS_PER_MISS[guest]
    assert dict(vm.exits) == exits0                          # every frame is mapped: no exit
    v.load(va + 8, 8)                                        # a TLB hit reads nothing
    assert mmu.stats["walk_refs"] == s1["walk_refs"]


def test_a_guest_large_page_walk_reads_one_level_less():
    """A 2 MB guest page ends the guest walk at level 2: n = 3, so 3*4 + 3 + 4 = 19."""
    vm = world("64")
    v = vm.vcpu
    va = compose_va(GUESTS["64"], (1, 0, 0, 0))
    assert execute(vm, Op("map", (va, 2, (0x200 << 12) | P | W | U | A | PS)), GUESTS["64"])[0] == "mapped"
    v.invlpg(va)
    v.load(va + 0x3008, 8)
    v.invalidate_all()
    before = vm.mmu.stats["walk_refs"]
    v.load(va + 0x3008, 8)
    assert vm.mmu.stats["walk_refs"] - before == 3 * 4 + 3 + 4


def test_without_guest_paging_a_miss_is_one_ept_walk():
    vm = world("64")
    v = vm.vcpu
    v.write_cr0(v.guest.cr0 & ~CR0_PG)
    v.store(0x345008, 0xAB, 8)
    v.invalidate_all()
    before = vm.mmu.stats["walk_refs"]
    assert v.load(0x345008, 8) == 0xAB
    assert vm.mmu.stats["walk_refs"] - before == 4
    assert vm.gmem.read_u64(0x345008) == 0xAB


# --------------------------------------------------------------------- exits
def minimal(guest="64", **kw):
    vm = VM(16 << 20, policy="tdp", **kw)
    g = MiniGuest(vm, guest)
    vm.vcpu.set_cpl(3)
    return vm, g, vm.vcpu


@pytest.mark.parametrize("write", [True, False], ids=["write", "read"])
@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_each_demand_fault_on_a_new_frame_is_one_ept_violation_and_the_guest_fault_never_exits(guest, write):
    vm, g, v = minimal(guest)
    native = VM(16 << 20, native=True)
    gn = MiniGuest(native, guest)
    native.vcpu.set_cpl(3)
    for vcpu in (v, native.vcpu):
        vcpu.store(USER_BASE, 1, 8)                    # the user page table exists from here on
    before = dict(vm.exits)
    n = 6
    for i in range(1, n + 1):
        for vcpu in (v, native.vcpu):
            if write:
                vcpu.store(USER_BASE + i * 4096, i, 8)
            else:
                assert vcpu.load(USER_BASE + i * 4096, 8) == 0
    delta = {r: vm.exits[r] - before[r] for r in vm.exits if vm.exits[r] != before[r]}
    assert delta == {"ept_violation": n}              # the data frames, each touched once
    assert g.handled == gn.handled                    # the same faults, the same error codes
    assert g.handled[-n:] == [(USER_BASE + i * 4096, 6 if write else 4) for i in range(1, n + 1)]
    assert v.stats["guest_page_faults"] == n + 1
    assert [v.load(USER_BASE + i * 4096, 8) for i in range(n + 1)] == [1, *(range(1, n + 1) if write else [0] * n)]
    assert vm.guest_memory() == native.guest_memory()


def test_the_first_fault_in_a_new_region_exits_once_per_frame_it_first_touches():
    """The handler makes a page directory and a page table (its stores are the first
    touch of each frame), then the retried access touches the new data frame: three."""
    vm, g, v = minimal("64")
    before = dict(vm.exits)
    v.store(USER_BASE, 7, 8)
    assert {r: vm.exits[r] - before[r] for r in vm.exits if vm.exits[r] != before[r]} == {"ept_violation": 3}
    assert v.load(USER_BASE, 8) == 7


def test_a_protection_fault_is_the_guests_with_the_native_error_code_and_no_exit():
    vm, g, v = minimal("64")
    v.store(USER_BASE, 1, 8)
    v.set_cpl(0)
    pte = g.pte_addr(USER_BASE)
    v.store(pte, v.load(pte, 8) & ~W, 8)               # read-only now
    v.invlpg(USER_BASE)
    v.set_cpl(3)
    seen = []
    v.set_fault_handler(lambda vcpu, addr, err: (seen.append((addr, err)), vcpu.store(pte, vcpu.load(pte, 8) | W, 8),
                                                 vcpu.invlpg(addr)))
    before = dict(vm.exits)
    v.store(USER_BASE + 8, 2, 8)
    assert seen == [(USER_BASE + 8, P | W | U)]
    assert dict(vm.exits) == before
    assert v.load(USER_BASE + 8, 8) == 2


def test_cr3_loads_and_invlpg_do_not_exit_cr0_and_cr4_writes_do():
    vm, g, v = minimal("64")
    v.set_cpl(0)
    before = dict(vm.exits)
    v.write_cr3(v.guest.cr3)
    v.invlpg(USER_BASE)
    assert dict(vm.exits) == before
    v.write_cr4(v.guest.cr4)
    v.write_cr0(v.guest.cr0)
    assert vm.exits["cr_access"] == before["cr_access"] + 2


def mmio_world():
    """A tdp VM whose 64-bit guest maps gva 0x7000_0000 to a device's register page."""
    vm = VM(16 << 20, policy="tdp")
    dev = Device()
    vm.add_mmio(0xFEE00000, 0x1000, dev)
    g = MiniGuest(vm, "64")
    v = vm.vcpu
    v.store(g.pte_addr(0x7000_0000), 0xFEE00000 | 0x63, 8)
    return vm, dev, v, g


def test_mmio_accesses_reach_the_device_every_time_and_exit_every_time():
    vm, dev, v, g = mmio_world()
    before = dict(vm.exits)
    for _ in range(3):
        assert v.load(0x7000_0010, 4) == 0xAB
    v.store(0x7000_0020, 5, 4)
    assert dev.log == [("r", 0xFEE00010, 4)] * 3 + [("w", 0xFEE00020, 4, 5)]
    assert vm.exits["mmio"] - before["mmio"] == 4      # no EPT entry is ever made: every access exits
    assert vm.exits["ept_violation"] == before["ept_violation"]
    assert vm.mmu.leaf(0xFEE00) == 0
    vm.audit()


# ----------------------------------------------------------------- dirty log
def guest_tables(vm, g, va):
    """The gfns of the 4-level walk of va, read straight from guest RAM."""
    table, out = g.root, []
    for level in (4, 3, 2, 1):
        out.append(table)
        e = vm.gmem.read_u64((table << 12) + 8 * ((va >> (12 + 9 * (level - 1))) & 511))
        assert e & P
        table = (e & 0x000FFFFFFFFFF000) >> 12
    return out, table


def changed(before, after):
    return {gfn for gfn in before.keys() | after.keys() if before.get(gfn) != after.get(gfn)}


def test_dirty_log_through_ept_d_bits():
    vm, g, v = minimal("64")
    for i in range(8):
        v.store(USER_BASE + i * 4096, i + 1, 8)        # dirty TLB entries before logging starts
    slot = vm.slots[0]
    tables, page1 = guest_tables(vm, g, USER_BASE + 4096)
    page = {i: guest_tables(vm, g, USER_BASE + i * 4096)[1] for i in range(8)}
    vm.mmu.enable_dirty_log(slot)
    # a read walks the guest's tables (with EPT A/D, walks are writes to them) and
    # reads the page: the tables are logged, the page is not
    assert v.load(USER_BASE + 4096, 8) == 2
    assert vm.mmu.get_dirty_log(slot) == sorted(tables)
    # a write after the get through a translation the TLB held dirty before it: logged
    v.store(USER_BASE + 3 * 4096, 0x55, 8)
    vm.mmu.get_dirty_log(slot)
    before = vm.guest_memory()
    v.store(USER_BASE + 3 * 4096 + 8, 0x66, 8)
    assert changed(before, vm.guest_memory()) == {page[3]}
    log = vm.mmu.get_dirty_log(slot)
    assert page[3] in log and set(log) == {page[3], *tables}
    assert vm.mmu.get_dirty_log(slot) == []            # nothing since: the log and the D bits are clear
    vm.mmu.disable_dirty_log(slot)
    assert not vm.mmu.dirty_logging
    with pytest.raises(ValueError, match="not enabled"):
        vm.mmu.get_dirty_log(slot)


def test_a_write_through_a_clean_ept_leaf_sets_ept_d_without_walking_the_guest_again():
    """Guest D set, EPT D clear (logging just began): the write's EPT walk sets D (m
    entries, no TLB miss), and the guest's translation stays the cached one -- as on
    native, where a guest that changed the pte without INVLPG still writes the old page."""
    vm, g, v = minimal("64")
    v.store(USER_BASE, 1, 8)
    old = guest_tables(vm, g, USER_BASE)[1]
    slot = vm.slots[0]
    vm.mmu.enable_dirty_log(slot)
    assert v.load(USER_BASE, 8) == 1                    # TLB: guest dirty, EPT leaf clean
    v.set_cpl(0)
    pte = g.pte_addr(USER_BASE)
    v.store(pte, (0x3F0 << 12) | P | W | U | A | D, 8)  # no INVLPG
    v.set_cpl(3)
    s0 = vm.mmu.stats
    v.store(USER_BASE + 8, 0x77, 8)
    s1 = vm.mmu.stats
    assert vm.gmem.read_u64((old << 12) + 8) == 0x77    # the cached translation: the old page
    assert s1["tlb_misses"] == s0["tlb_misses"] and s1["walk_refs"] == s0["walk_refs"]
    assert s1["ept_d_assists"] - s0["ept_d_assists"] == 1
    assert s1["ept_d_assist_refs"] - s0["ept_d_assist_refs"] == 4
    assert old in vm.mmu.get_dirty_log(slot)
    vm.audit()


def test_a_zap_does_not_lose_dirty_bits():
    vm, g, v = minimal("64")
    v.store(USER_BASE, 1, 8)
    slot = vm.slots[0]
    vm.mmu.enable_dirty_log(slot)
    v.store(USER_BASE + 8, 2, 8)
    data = guest_tables(vm, g, USER_BASE)[1]
    vm.mmu.zap_all()
    assert data in vm.mmu.get_dirty_log(slot)


# --------------------------------------------------------------------- audit
def test_audit_catches_a_wrong_ept_entry_a_foreign_entry_and_a_missed_flush():
    vm, g, v = minimal("64")
    v.store(USER_BASE, 1, 8)
    vm.audit()
    mmu = vm.mmu
    data = guest_tables(vm, g, USER_BASE)[1]
    leaf_table = next(view for level, base, view in mmu.tables.values() if level == 1 and base <= data < base + 512)
    good = leaf_table[data & 511]
    leaf_table[data & 511] = good + (1 << 12)          # the next host frame: another guest frame's
    with pytest.raises(AuditError, match="memslot says"):
        vm.audit()
    leaf_table[data & 511] = good
    pt = leaf_table
    pd = next(view for level, base, view in mmu.tables.values() if level == 2)
    # the same page table reached twice (at the 2 MB region of 16 MB too)
    outside = 0x1000                                    # 16 MB of RAM end at gfn 0x1000
    pd[(outside >> 9) & 511] = pd[(data >> 9) & 511]
    with pytest.raises(AuditError, match="reached twice|sits at level"):
        vm.audit()
    # an entry for a gfn no memslot backs, in a page table of its own
    hp = mmu._new_table(1, outside)
    pd[(outside >> 9) & 511] = (hp << 12) | 7
    mmu.tables[hp][2][0] = good
    with pytest.raises(AuditError, match="no memslot"):
        vm.audit()
    pd[(outside >> 9) & 511] = 0
    mmu.tables.pop(hp)[2][0] = 0
    mmu.free.append(hp)
    vm.audit()
    # a TLB entry that stays after its EPT entry goes (a zap without INVEPT)
    v.load(USER_BASE, 8)
    assert v.tlb.small
    pt[data & 511] = 0
    with pytest.raises(AuditError, match="missed flush"):
        vm.audit()
    pt[data & 511] = good
    # a dirty TLB entry over a clean EPT leaf: a write would skip the dirty log
    v.store(USER_BASE, 3, 8)
    pt[data & 511] = good & ~EPT_D
    with pytest.raises(AuditError, match="dirty"):
        vm.audit()
    pt[data & 511] = good | EPT_D
    vm.audit()


# ---------------------------------------------------------------- the pool
def test_the_ept_stays_within_its_pool_and_a_full_pool_zaps_and_recovers():
    """16 frames: the root, a PDPT, a PD and 13 page tables (one per 2 MB of guest
    memory).  Touching one frame in each of 40 regions with paging off: the first
    region takes 3 new tables, each next one 1, so the pool is full after region 12;
    region 13 zaps (everything but the root) and starts over with 3, ... -> zaps at
    regions 13, 26 and 39."""
    vm = VM(128 << 20, policy="tdp", pool_pages=15)           # + 1 frame per vCPU = 16
    assert vm.mmu.pool_size == 16
    v = vm.vcpu
    regions = range(40)
    for r in regions:
        v.store((r << 21) + 8 * r, r + 1, 8)
        assert vm.mmu.nr_pages <= 16
    assert vm.mmu.stats["ept_zaps"] == 3
    assert vm.exits["ept_violation"] == 40
    assert [v.load((r << 21) + 8 * r, 8) for r in regions] == [r + 1 for r in regions]
    assert [vm.gmem.read_u64((r << 21) + 8 * r) for r in regions] == [r + 1 for r in regions]
    vm.audit()


def test_a_mapping_that_needs_more_tables_than_are_free_zaps_first():
    """Region 0 takes the PDPT, a PD and a page table (12 of 16 frames free); 11 more
    regions of the first GB leave 1 free; a frame in the second GB needs a new PD and
    a page table: 2 > 1, so the EPT is zapped first, and only then."""
    vm = VM(2 << 30, policy="tdp", pool_pages=15)
    v = vm.vcpu
    for r in range(12):
        v.store(r << 21, r + 1, 8)
    assert len(vm.mmu.free) == 1 and vm.mmu.stats["ept_zaps"] == 0
    v.store(1 << 30, 99, 8)
    assert vm.mmu.stats["ept_zaps"] == 1 and len(vm.mmu.free) == 12
    assert [v.load(r << 21, 8) for r in range(12)] + [v.load(1 << 30, 8)] == [*range(1, 13), 99]
    vm.audit()


def test_a_pool_below_the_minimum_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 16"):
        TdpMMU(None, None, list(range(0x100, 0x10F)))
    with pytest.raises(ValueError, match="shadow-MMU options"):
        VM(16 << 20, policy="tdp", prefetch=8)


# ----------------------------------------------------------------- lockstep
@pytest.mark.parametrize("guest", FORMATS)
def test_lockstep_with_native(guest):
    d, steps = campaign(GUESTS[guest], "tdp", steps=400, seed=11)
    assert d is None, str(d)
    assert steps == 400


@pytest.mark.parametrize("guest", FORMATS)
def test_lockstep_with_an_ept_pool_that_keeps_zapping(guest):
    """Five EPT pages (root, PDPT, PD, two page tables) while the guest's tables live in
    the first 2 MB of its memory and its data alternates between large pages at 4 MB
    and at 8 MB: every switch zaps the EPT, and the guest still cannot tell."""
    mode = GUESTS[guest]
    ls = Lockstep(mode, "tdp")
    mmu = ls.shadow.mmu
    keep = 5 - len(mmu.tables)
    assert keep > 0
    mmu.free = mmu.free[len(mmu.free) - keep:]
    mmu.pool_size = len(mmu.tables) + len(mmu.free)
    va = compose_va(mode, FIRST_VA_INDICES[guest])
    switches = []
    for i, frame in enumerate((0x400, 0x800, 0x400, 0x800)):
        switches += [Op("map", (va, 2, (frame << 12) | P | W | U | A | PS)), Op("invlpg", (va,)),
                     Op("read", (va + 8 * i, 3, 8)), Op("store", (va + 0x1000 * i, 3, 8, i + 1))]
    program = switches + generate_program(RandomChooser(5), mode, 200)
    assert ls.run(program) is None
    assert mmu.stats["ept_zaps"] >= 3
    exits = nonzero(ls.shadow.exits)
    assert not {"pf_fixed", "pf_injected", "pte_write", "invlpg"} & exits.keys()


# regressions lockstep found (la57, seed 2026), shrunk: a loop through the root makes
# the kernel window's translations stale, which the guest never invalidates
_STALE_WINDOW = [Op("write_entry", (0x21008, 0x10027, 8), 1), Op("map", (0x1008000001000, 1, 0x35021), 1)]
_LARGE = Op("map", (0xff00008000000000, 2, 0x7800000000000085), 1)
_LAST = Op("map", (0xff000080403ff000, 1, 0x34027), 1)


def test_a_write_through_a_stale_entry_sets_ept_d_and_stays_stale_as_on_native():
    """The last store goes through a cached window translation whose EPT leaf is clean:
    re-walking the guest there (as the first version did) faults on the broken window,
    where native writes through its cached translation."""
    program = [*_STALE_WINDOW, _LARGE, _LAST]
    assert Lockstep(GUESTS["la57"], "tdp").run(program) is None


def test_lockstep_mirrors_the_hypervisors_tlb_flush_on_native():
    """dirty_log(on) empties tdp's TLB; refilled by the next op, it would then hold
    translations younger than native's and older than a fresh walk's."""
    program = [*_STALE_WINDOW, Op("dirty_log", ("on",)), _LARGE, _LAST]
    ls = Lockstep(GUESTS["la57"], "tdp")
    assert ls.run(program) is None
    assert ls.tdp_flushes == ls.shadow.mmu.stats["tlb_flushes"] > 0


def test_audit_catches_a_leaked_ept_page_and_a_tlb_entry_for_another_frame():
    vm, g, v = minimal("64")
    v.store(USER_BASE, 1, 8)
    mmu = vm.mmu
    hp = mmu._new_table(1, 0x800)                       # taken from the pool, linked nowhere
    with pytest.raises(AuditError, match="not reachable"):
        vm.audit()
    mmu.tables.pop(hp)
    mmu.free.append(hp)
    vm.audit()
    e = v.tlb.small[USER_BASE >> 12]
    v.tlb.small[USER_BASE >> 12] = (e[0] + 0x1000, *e[1:])     # the hpa of the next frame, the old gfn
    with pytest.raises(AuditError, match="is not"):
        vm.audit()


def test_the_trace_tells_each_ept_violation_and_mmio_exit():
    vm = VM(16 << 20, policy="tdp", tracing=True)
    vm.add_mmio(0xFEE00000, 0x1000, Device())
    v = vm.vcpu
    v.store(0x5008, 3, 8)                              # paging off: gva == gpa
    v.load(0xFEE00010, 4)
    lines = [line for kind, line in vm.events.trace if kind == "exit"]
    assert lines == ["VM exit #1 (ept_violation): gpa 0x5000 during write of 0x5008: EPT entry made",
                     "VM exit #2 (mmio): read of 0xfee00010 (gpa 0xfee00010): no memslot, emulated"]
    assert vm.mmu.leaf(5) & ~0xFFF == vm.gmem.gfn_to_pfn(5) << 12


def test_a_translation_to_a_gpa_without_memory_stays_cached_as_natively():
    """32-bit, seed 9101, shrunk: native keeps a user translation to unbacked memory
    (0x600000 -> 0x50412000); tdp used to walk again at every access to it, so the
    checker's fresh-walk retry emptied native's TLB while tdp kept an older entry."""
    program = [Op("write_entry", (0x10ffc, 0x10027, 4), 1), Op("store", (0xffc01008, 0, 1, 0x72), 1),
               Op("write_entry", (0x20802, 0x25041, 4)), Op("read", (0x600ffc, 3, 8), 1),
               Op("map", (0x600000, 2, 0x2f021), 1), Op("read", (0x600ffe, 0, 4), 1), Op("fetch", (0xffc01ffc, 3, 4), 1)]
    ls = Lockstep(GUESTS["32"], "tdp")
    assert ls.run(program) is None
    assert ls.stale_ok == 0                             # the twin TLBs never needed the retry


def test_an_mmio_translation_is_cached_exits_every_time_and_goes_with_invlpg():
    vm, dev, v, g = mmio_world()
    v.load(0x7000_0010, 4)
    misses, mmio = vm.mmu.stats["tlb_misses"], vm.exits["mmio"]
    assert v.load(0x7000_0018, 4) == 0xAB               # no walk, one exit
    assert vm.mmu.stats["tlb_misses"] == misses and vm.exits["mmio"] == mmio + 1
    v.store(g.pte_addr(0x7000_0000), 0, 8)              # unmapped, not invalidated: still cached
    assert v.load(0x7000_0018, 4) == 0xAB
    v.invlpg(0x7000_0000)
    seen = []
    v.set_fault_handler(lambda vcpu, addr, err: (seen.append((addr, err)),
                                                 vcpu.store(g.pte_addr(addr), 0xFEE00000 | 0x63, 8)))
    assert v.load(0x7000_0018, 4) == 0xAB
    assert seen == [(0x7000_0018, 0)]                   # now the guest's own not-present fault
    assert dev.log.count(("r", 0xFEE00018, 4)) == 3
    vm.audit()
