"""audit() names the invariant a broken shadow MMU state violates.

Each case builds a small, real MMU state (a minimal guest that touched a few pages
of one leaf table: an MMIO page, a user page, supervisor read-write and read-only
pages, a no-execute page, a high-half kernel page), checks that audit() accepts it,
then breaks exactly one invariant the audit claims (mmu/audit.py; the spte
invariants listed in mmu/spte.py) behind the MMU's back, and expects AuditError
whose whole message names that invariant, the spte, the address and the shadow
page.  A weakened check, a check at the wrong place or a wrong message then fails
here: these tests are in `make mutate`'s selection for mmu/audit.py's mutants
(docs/mutation.md).  Corruptions go through the MMU's one spte writer
(``ShadowMMU.set_spte``) when the bookkeeping must stay exact, so that only the
invariant under test breaks; raw writes (``sp.spt[idx] = ...``, guest memory
written without the write-protection trap) when the point is to bypass it."""

import importlib

import pytest

from shadowmmu.guest.minimal import USER_BASE, A, D, MiniGuest, P, U, W
from shadowmmu.mmu import AuditError, audit
from shadowmmu.mmu.spte import SPTE_A, SPTE_ADDR, SPTE_NX, SPTE_U, SPTE_W
from shadowmmu.vm import VM
from shadowmmu.x86.bits import CR4_PKE, CR4_SMAP, CR4_SMEP, PTE_PKEY_MASK, PTE_PKEY_SHIFT
from shadowmmu.x86 import PageFault
from shadowmmu.x86.walker import translate
from test_mmu_features import Device

audit_module = importlib.import_module("shadowmmu.mmu.audit")   # the package exports the function

NX = 1 << 63
MMIO_GPA = 0xFEE00000
# one guest leaf table, so one shadow leaf table; the MMIO page comes first, so the
# table's first non-zero spte is a non-present one (an MMIO spte) the audit must step over
MMIO_VA = USER_BASE
USER_VA = USER_BASE + 0x1000        # user read-write, written at CPL 3: a writable, dirty spte
KRW_VA = USER_BASE + 0x2000         # supervisor read-write, read at CPL 0 (the guest pte is dirty)
KRO_VA = USER_BASE + 0x3000         # supervisor read-only
NX_VA = USER_BASE + 0x4000          # user read-write no-execute (8-byte formats)
URO_VA = USER_BASE + 0x5000         # user read-only (no-execute in 8-byte formats)
HIGH_VA = 0xFFFF800000001000        # supervisor read-write in the upper half (4-level guest)


@pytest.fixture(autouse=True)
def cold_probe_cache(monkeypatch):
    """audit() caches its probe CPUs across calls; each test starts with an empty
    cache, so that it exercises the probe construction rather than a CPU another
    test's audit left there."""
    monkeypatch.setattr(audit_module, "_probes", {})


class World:
    """A booted minimal guest that touched every page above once; audit() accepts it."""

    def __init__(self, guest="64", cr4=0, pkey=0):
        self.vm = vm = VM(16 << 20)
        vm.add_mmio(MMIO_GPA, 0x1000, Device())
        self.g = g = MiniGuest(vm, guest)
        self.v = v = vm.vcpu
        if cr4:
            v.write_cr4(v.guest.cr4 | cr4)
        key = pkey << PTE_PKEY_SHIFT
        pages = [(MMIO_VA, MMIO_GPA >> 12, P | W | U | A | D), (USER_VA, None, P | W | U | A | D | key),
                 (KRW_VA, None, P | W | A | D), (KRO_VA, None, P | A | D), (URO_VA, None, P | U | A | D)]
        if g.wide:
            pages[-1] = (URO_VA, None, P | U | A | D | NX)
            pages.append((NX_VA, None, P | W | U | A | D | NX | key))
        if guest == "64":
            pages.append((HIGH_VA, None, P | W | A | D))
        self.pte, self.frame = {}, {}
        for va, gfn, flags in pages:
            gfn = g.alloc() if gfn is None else gfn
            self.pte[va], self.frame[va] = g.pte_addr(va), gfn
            v.store(self.pte[va], (gfn << 12) | flags, g.esz)
        v.set_cpl(3)
        v.store(MMIO_VA, 1, 4)
        v.store(USER_VA, 1, 8)
        v.load(URO_VA, 8)
        if g.wide:
            v.store(NX_VA, 1, 8)
        v.set_cpl(0)
        v.load(KRW_VA, 8)
        v.load(KRO_VA, 8)
        if guest == "64":
            v.load(HIGH_VA, 8)
        # the user page's frame through the kernel's identity map: its second writable spte
        v.store(self.frame[USER_VA] << 12, 2, 8)
        vm.audit()

    @property
    def mmu(self):
        return self.vm.mmu

    def leaf(self, va):
        """(shadow page, index) of the leaf spte the hardware walk of va reads."""
        try:
            entries = translate(self.vm.host, self.v.hw, va, 0, set_ad=False).entries
        except PageFault as pf:           # SMAP: a supervisor read of a user page faults at the leaf
            entries = pf.entries
        addr = entries[-1][1]
        return self.mmu.by_hpfn[addr >> 12], (addr & 0xFFF) >> 3

    def spte(self, va):
        sp, idx = self.leaf(va)
        return sp.spt[idx]

    def where(self, va):
        """How the audit names the leaf of va (read after the corruption)."""
        sp, idx = self.leaf(va)
        return f"spte {sp.spt[idx]:#x} for gva {va:#x} in {sp!r}"

    def touch(self):
        """Access the user and the read-only page again: both in the hardware TLB."""
        self.v.set_cpl(3)
        self.v.load(USER_VA, 8)
        self.v.set_cpl(0)
        self.v.load(KRO_VA, 8)
        assert USER_VA >> 12 in self.v.tlb.small and KRO_VA >> 12 in self.v.tlb.small
        self.vm.audit()

    def set_spte(self, va, value):
        """Through the MMU's one writer: rmap, parent links and counts stay exact."""
        sp, idx = self.leaf(va)
        self.mmu.set_spte(sp, idx, value)

    def set_gpte(self, va, value):
        """The guest pte of va, written without the write-protection trap."""
        self.vm.gmem.write_uint(self.pte[va], value, self.g.esz)

    def gpte(self, va):
        return self.vm.gmem.read_uint(self.pte[va], self.g.esz)

    def parent(self, va):
        """(leaf shadow page of va, address of the one spte pointing at it)."""
        sp, _ = self.leaf(va)
        (addr,) = sp.parents
        return sp, addr


def audit_message(vm) -> str:
    with pytest.raises(AuditError) as e:
        vm.audit()
    return str(e.value)


# ---------------------------------------------------------------------------
# Structure: the pool, zapped pages, frames, parent links, rmap, counts


def test_the_pool_may_be_full_but_not_exceeded():
    w = World()
    n = len(w.mmu.pages)
    w.mmu.pool_size = n
    w.vm.audit()
    w.mmu.pool_size = n - 1
    assert audit_message(w.vm) == f"{n} shadow pages exceed the pool of {n - 1}"


def test_a_zapped_page_still_cached():
    w = World()
    sp = w.mmu.by_hpfn[w.v.hw.cr3 >> 12]     # the root: no parent spte names it first
    assert sp.root_count == 1 and not sp.parents
    sp.zapped = True
    assert audit_message(w.vm) == f"{sp!r} is zapped but still cached"


@pytest.mark.parametrize("end", ["low", "high"])
def test_a_page_outside_the_pool(end):
    w = World()
    mmu = w.mmu
    pages = sorted(mmu.pages.values(), key=lambda sp: sp.hpfn)
    # the pool's bounds moved to the lowest / highest page in use: still inside
    if end == "low":
        sp = pages[0]
        mmu.pool_lo = sp.hpfn
        w.vm.audit()
        mmu.pool_lo = sp.hpfn + 1
    else:
        sp = pages[-1]
        mmu.pool_hi = sp.hpfn + 1
        w.vm.audit()
        mmu.pool_hi = sp.hpfn
    assert audit_message(w.vm) == f"{sp!r} lives outside the shadow pool"


@pytest.mark.parametrize("how", ["no-page-there", "page-zapped"])
def test_an_upper_spte_pointing_at_no_live_shadow_page(how):
    w = World()
    sp, addr = w.parent(USER_VA)
    parent = w.mmu.by_hpfn[addr >> 12]
    pidx = (addr & 0xFFF) >> 3
    if how == "no-page-there":        # the frame holds no shadow page
        del w.mmu.by_hpfn[sp.hpfn]
    else:                       # zapped and uncached, but its parent spte was never cleared
        sp.zapped = True
        del w.mmu.pages[(sp.gfn, sp.role)]
    assert audit_message(w.vm) == (f"{parent!r}[{pidx}] = {parent.spt[pidx]:#x} "
                                   f"points at no live shadow page")


def test_a_leaf_spte_mapping_a_host_frame_outside_guest_ram():
    w = World()
    sp, idx = w.leaf(USER_VA)
    bad = (sp.spt[idx] & ~SPTE_ADDR) | (w.mmu.pool_lo << 12)     # a shadow-pool frame
    sp.spt[idx] = bad
    assert audit_message(w.vm) == (f"{sp!r}[{idx}] = {bad:#x} maps host frame {w.mmu.pool_lo:#x} "
                                   f"outside guest RAM")


def test_a_writable_spte_onto_a_shadowed_page_table():
    w = World()
    table = w.pte[USER_VA] >> 12            # the guest leaf table: shadowed
    assert w.mmu.is_shadowed(table)
    va = table << 12                        # the kernel's identity map of it
    assert not w.spte(va) & SPTE_W
    w.set_spte(va, w.spte(va) | SPTE_W)     # rmap now lists it: only the W rule breaks
    sp, idx = w.leaf(va)
    assert audit_message(w.vm) == f"{sp!r}[{idx}] maps shadowed page table gfn {table:#x} writable"


def test_nr_present_off_by_one():
    w = World()
    sp, _ = w.leaf(USER_VA)
    n = sp.nr_present
    sp.nr_present = n + 1
    assert audit_message(w.vm) == f"{sp!r} counts {n + 1} present sptes, has {n}"


def rmap_message(missing, stale):
    return f"rmap is not exact: missing {missing}, stale {stale}"


def test_rmap_missing_one_of_two_writable_sptes_of_a_gfn():
    w = World()
    gfn = w.frame[USER_VA]
    sp, idx = w.leaf(USER_VA)
    user = sp.spte_addr(idx)
    assert len(w.mmu.rmap[gfn]) == 2 and user in w.mmu.rmap[gfn]     # user and kernel mappings
    w.mmu.rmap[gfn].discard(user)
    assert audit_message(w.vm) == rmap_message({gfn: {user}}, {})


def test_rmap_missing_a_gfn():
    w = World()
    gfn = w.frame[KRW_VA]
    sp, idx = w.leaf(KRW_VA)
    assert w.mmu.rmap[gfn] == {sp.spte_addr(idx)}
    del w.mmu.rmap[gfn]
    assert audit_message(w.vm) == rmap_message({gfn: {sp.spte_addr(idx)}}, {})


@pytest.mark.parametrize("gfn_has_writable_sptes", [True, False])
def test_rmap_listing_a_read_only_spte(gfn_has_writable_sptes):
    w = World()
    sp, idx = w.leaf(KRO_VA)
    ro = sp.spte_addr(idx)
    gfn = w.frame[USER_VA] if gfn_has_writable_sptes else w.frame[KRO_VA]
    w.mmu.rmap.setdefault(gfn, set()).add(ro)
    assert audit_message(w.vm) == rmap_message({}, {gfn: {ro}})


def test_a_missing_parent_link():
    w = World()
    sp, addr = w.parent(USER_VA)
    sp.parents.discard(addr)
    assert audit_message(w.vm) == f"{sp!r} parent links [] != sptes pointing at it ['{addr:#x}']"


def test_a_parent_link_on_a_page_nothing_points_at():
    w = World()
    sp, addr = w.parent(USER_VA)
    root = w.mmu.by_hpfn[w.v.hw.cr3 >> 12]
    root.parents.add(addr)
    assert audit_message(w.vm) == f"{root!r} parent links ['{addr:#x}'] != sptes pointing at it []"


def test_a_stale_parent_link():
    w = World()
    sp, addr = w.parent(USER_VA)
    sp.parents.add(addr + 8)
    assert audit_message(w.vm) == (f"{sp!r} parent links ['{addr:#x}', '{addr + 8:#x}'] != "
                                   f"sptes pointing at it ['{addr:#x}']")


# ---------------------------------------------------------------------------
# Semantics: each leaf reachable from the roots agrees with the guest's tables


def test_a_present_spte_whose_guest_pte_is_not_present():
    w = World()
    w.set_gpte(USER_VA, 0)
    assert audit_message(w.vm).startswith(f"{w.where(USER_VA)}: present, but the guest walk faults (")


def test_a_spte_mapping_another_frame_than_the_guest_pte():
    w = World()
    other = w.g.alloc()
    w.set_gpte(USER_VA, (w.gpte(USER_VA) & 0xFFF) | (other << 12))
    assert audit_message(w.vm) == f"{w.where(USER_VA)}: guest maps gpa {other << 12:#x}, spte maps another frame"


def test_a_spte_whose_guest_pte_has_a_clear():
    w = World()
    w.set_gpte(USER_VA, w.gpte(USER_VA) & ~A)
    # only the walks that check the guest's tables see it
    audit(w.mmu, guest_walks=False)
    assert audit_message(w.vm) == f"{w.where(USER_VA)}: guest pte has A=0, an access would not set it"
    assert not w.gpte(USER_VA) & A                      # the audit's walk set nothing


def test_a_writable_spte_whose_guest_pte_is_clean():
    w = World()
    w.set_gpte(USER_VA, w.gpte(USER_VA) & ~D)
    assert audit_message(w.vm) == f"{w.where(USER_VA)}: writable while the guest pte is clean"


def allows(w, va, what):
    return f"{w.where(va)}: the hardware allows a {what} that the guest's tables forbid"


@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_a_spte_granting_more_rights_than_the_guest(guest):
    w = World(guest)
    # W on a read-only supervisor page (CR0.WP=1: the guest forbids supervisor writes)
    w.set_spte(KRO_VA, w.spte(KRO_VA) | SPTE_W)
    assert audit_message(w.vm) == allows(w, KRO_VA, "supervisor write")
    w.set_spte(KRO_VA, w.spte(KRO_VA) & ~SPTE_W)
    w.vm.audit()
    # W on a read-only user page (no-execute too in 8-byte formats: W is judged apart from X)
    w.set_spte(URO_VA, w.spte(URO_VA) | SPTE_W)
    assert audit_message(w.vm) == allows(w, URO_VA, "supervisor write")
    w.set_spte(URO_VA, w.spte(URO_VA) & ~SPTE_W)
    w.vm.audit()
    # U on a supervisor page
    w.set_spte(KRW_VA, w.spte(KRW_VA) | SPTE_U)
    assert audit_message(w.vm) == allows(w, KRW_VA, "user read")
    w.set_spte(KRW_VA, w.spte(KRW_VA) & ~SPTE_U)
    w.vm.audit()
    if w.g.wide:               # X on a no-execute page
        w.set_spte(NX_VA, w.spte(NX_VA) & ~SPTE_NX)
        assert audit_message(w.vm) == allows(w, NX_VA, "supervisor fetch")


def test_a_spte_granting_more_in_the_upper_half_names_the_canonical_address():
    w = World()
    w.set_spte(HIGH_VA, w.spte(HIGH_VA) | SPTE_U)
    assert audit_message(w.vm) == allows(w, HIGH_VA, "user read")     # gva 0xffff800000001000, sign-extended


@pytest.mark.parametrize("feature, denied", [(CR4_SMEP, "supervisor fetch"), (CR4_SMAP, "supervisor read")],
                         ids=["smep", "smap"])
def test_a_user_page_made_supervisor_only_under_smep_or_smap(feature, denied):
    """The CR0.WP=0 trick's hazard: a supervisor-only spte for a user page lets the
    kernel fetch (SMEP) or read (SMAP) what the guest forbids it."""
    w = World(cr4=feature)
    w.set_spte(USER_VA, w.spte(USER_VA) & ~SPTE_U)
    assert audit_message(w.vm) == allows(w, USER_VA, denied)


def test_protection_keys_a_wrong_key():
    w = World(cr4=CR4_PKE, pkey=3)
    assert (w.spte(USER_VA) & PTE_PKEY_MASK) >> PTE_PKEY_SHIFT == 3
    w.set_spte(USER_VA, (w.spte(USER_VA) & ~PTE_PKEY_MASK) | (5 << PTE_PKEY_SHIFT))
    assert audit_message(w.vm) == f"{w.where(USER_VA)}: protection key 5, the guest's pte has key 3"


def test_protection_keys_a_user_page_made_supervisor_only():
    w = World(cr4=CR4_PKE, pkey=3)
    w.set_spte(USER_VA, w.spte(USER_VA) & ~SPTE_U)
    assert audit_message(w.vm) == (f"{w.where(USER_VA)}: a user page of the guest is supervisor-only in "
                                   f"hardware, which hides it from the guest's protection keys")


def test_protection_keys_in_pkru_do_not_hide_a_page_from_the_audit():
    """WRPKRU does not exit: a key's access-disable bit leaves the sptes as they were,
    and the audit's walks (which ignore keys) still see the pages."""
    w = World(cr4=CR4_PKE, pkey=3)
    w.v.write_pkru(0b11 << 6)              # key 3: access and write disabled
    w.vm.audit()


@pytest.mark.parametrize("guest", ["32", "pae"])
def test_a_leaf_the_hardware_faults_on_grants_nothing_and_the_audit_goes_on(guest):
    """Under PAE-format shadow tables bit 52 of a pte is reserved: the hardware faults
    on every access through such a spte, so the audit accepts it and checks the next one."""
    w = World(guest)
    sp, idx = w.leaf(USER_VA)
    sp.spt[idx] |= 1 << 52
    w.v.tlb.flush()                                         # (its TLB entry would be a missed flush)
    w.vm.audit()
    w.set_gpte(KRW_VA, w.gpte(KRW_VA) & ~A)                  # the next leaf of the same table
    assert audit_message(w.vm) == f"{w.where(KRW_VA)}: guest pte has A=0, an access would not set it"


def test_the_audit_writes_nothing():
    """A spte with A=0 is harmless (the hardware sets A on its next walk); an audit
    that walked with A/D updates would set it, and would hide a guest pte's A=0."""
    w = World()
    w.touch()                   # the TLB check walks it too
    sp, idx = w.leaf(USER_VA)
    sp.spt[idx] &= ~SPTE_A
    host_before = {pfn: w.vm.host.frame_bytes(pfn) for pfn in w.vm.host.allocated_frames()}
    w.vm.audit()
    assert {pfn: w.vm.host.frame_bytes(pfn) for pfn in w.vm.host.allocated_frames()} == host_before


# ---------------------------------------------------------------------------
# The hardware TLB: no entry grants more than the shadow tables do now


def test_a_tlb_entry_whose_spte_is_gone():
    w = World()
    w.touch()
    w.set_spte(USER_VA, 0)                  # cleared, not flushed
    assert audit_message(w.vm) == f"TLB maps {USER_VA:#x} but the shadow tables do not (missed flush)"


def test_a_tlb_entry_still_writable_after_its_spte_lost_w():
    w = World()
    w.touch()
    w.set_spte(USER_VA, w.spte(USER_VA) & ~SPTE_W)      # write-protected, not flushed
    assert audit_message(w.vm) == f"TLB entry for {USER_VA:#x} disagrees with the shadow tables (missed flush)"


@pytest.mark.parametrize("field", ["frame", "dirty"])
def test_a_tlb_entry_disagreeing_with_its_spte(field):
    w = World()
    w.touch()
    tlb = w.v.tlb.small
    paddr, rights, dirty, glob, pkey = tlb[KRO_VA >> 12]
    assert not dirty and not glob       # a read-only spte is clean; MiniGuest has no global pages
    if field == "frame":
        tlb[KRO_VA >> 12] = (paddr + 0x1000, rights, dirty, glob, pkey)
    else:
        tlb[KRO_VA >> 12] = (paddr, rights, True, glob, pkey)
    assert audit_message(w.vm) == f"TLB entry for {KRO_VA:#x} disagrees with the shadow tables (missed flush)"
