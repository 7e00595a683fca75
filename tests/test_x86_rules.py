"""The x86 paging rules, exhaustively: the model's walker against the SDM written out plainly.

In the spirit of kvm-unit-tests ``x86/access``: every legal combination of named
flags (entries' P/W/U/NX/A/D/PS and reserved bits; read/write/fetch, user/supervisor,
implicit; CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP with RFLAGS.AC, CR4.PKE with PKRU),
a legality filter with reasons, readable case ids, each access done twice.  The
expectations come from ``x86_helpers.expected_outcome`` (the SDM rules, spelled out
without the model's tables).  Then named sub-cases from REFERENCE.md section 3.

A matrix runs many cases inside one test function (per-case pytest items would cost
more than the cases); a failure lists the ids of the cases that disagree.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import product

import pytest

from shadowmmu.x86 import CpuState, GeneralProtection, NonCanonicalAddress, PageFault, Tlb, translate
from x86_helpers import (
    A, ACCESSES, BITS32, CR0_WP, CR4_SMAP, D, EC_ID, EC_P, EC_PK, EC_RSVD, EC_U, EC_W, G, LEAF_FRAME, LEVEL4,
    LEVEL5, MODE_LEVELS, MODES, NX, P, PAE, PAT_4K, PAT_LARGE, PKEY_SHIFT, PS, SUP_FETCH, SUP_READ, SUP_WRITE,
    U, USER_FETCH, USER_READ, USER_WRITE, W, Env, Tables, bit, bits, build, canonical, compose, default_flags,
    index_at, is_wide, level_shift, make_cpu, maps_page, model_access, read_entry, report, reserved_bits,
    run_matrix,
)

# ---------------------------------------------------------------------------
# Legality filter: combinations that cannot be expressed, with the reason.

ILLEGAL_REASONS: dict[str, int] = {}


def illegal(env: Env, flags: dict) -> str | None:
    """Why (env, flags) is not a legal case, or None."""
    mode = env.mode
    if mode == BITS32 and any(f & NX for f in flags.values()):
        return "32-bit paging has 4-byte entries: there is no XD bit"
    for level, f in flags.items():
        leaf = maps_page(env, level, f | P) and not (mode == PAE and level == 3)
        address_field = bits(12, 51) if is_wide(mode) else bits(12, 31)
        if not leaf and f & P and f & address_field & ~reserved_bits(env, level, False):
            # e.g. bit 40 with MAXPHYADDR=52: a valid address, of a table the test did not build
            return "flags that move a table pointer to a table the test did not build (not a paging rule)"
    return None


def legal(cases):
    for env, flags, access in cases:
        reason = illegal(env, flags)
        if reason:
            ILLEGAL_REASONS[reason] = ILLEGAL_REASONS.get(reason, 0) + 1
            continue
        yield env, flags, access


def check(name: str, cases, *, tlb: bool = False) -> int:
    n, failures = run_matrix(legal(cases), tlb=tlb)
    assert n > 0
    assert not failures, report(name, n, failures)
    return n


# ---------------------------------------------------------------------------
# Environments


def pk_settings(mode: str, full: bool = True):
    """(CR4.PKE, PKRU).  The test leaf of an IA-32e mode carries key 5.  ``full=False``
    keeps the three settings that decide outcomes (off, AD, WD) to save time where the
    key logic is not new (5-level, large leaves)."""
    if mode in (LEVEL4, LEVEL5):
        ad5, wd5 = 1 << 10, 2 << 10
        if not full:
            return ((False, 0xFFFF_FFFF), (True, ad5), (True, wd5))
        return ((False, 0xFFFF_FFFF),            # PKRU ignored without CR4.PKE
                (True, 0),
                (True, ad5),
                (True, wd5),
                (True, 0xFFFF_FFFF & ~(ad5 | wd5)))  # every other key denied
    # Protection keys apply to IA-32e paging only: CR4.PKE has no effect here.
    return ((False, 0), (True, 0xFFFF_FFFF))


LEAF_PKEY = 5


def rights_envs(mode: str, full_pk: bool = True):
    for wp, nxe, smep, smap, ac in product((False, True), repeat=5):
        for pke, pkru in pk_settings(mode, full_pk):
            yield Env(mode, wp=wp, nxe=nxe, smep=smep, smap=smap, ac=ac, pke=pke, pkru=pkru)


def subsets(*flags):
    for chosen in product((0, 1), repeat=len(flags)):
        yield sum(f for f, c in zip(flags, chosen) if c)


# ---------------------------------------------------------------------------
# Matrix 1: rights.  Leaf and parent entry each take every subset of W, U, NX (P set,
# A and D clear, so the A bits the walk sets are visible) × every access × CR0.WP ×
# EFER.NXE × CR4.SMEP × CR4.SMAP × RFLAGS.AC × PKE/PKRU.

LEAF_SIZES = {BITS32: ("4K", "4M"), PAE: ("4K", "2M"), LEVEL4: ("4K", "2M", "1G"), LEVEL5: ("4K", "2M", "1G")}
LEAF_LEVEL = {"4K": 1, "2M": 2, "4M": 2, "1G": 3}


def rights_cases(mode: str, size: str):
    leaf_level = LEAF_LEVEL[size]
    ps = PS if leaf_level > 1 else 0
    pkey = LEAF_PKEY << PKEY_SHIFT if mode in (LEVEL4, LEVEL5) else 0
    parent = leaf_level + 1 if leaf_level + 1 in MODE_LEVELS[mode] and not (mode == PAE and leaf_level == 2) \
        else None
    nx_choices = (W, U, NX)
    for env in rights_envs(mode, full_pk=(mode != LEVEL5 and size == "4K")):
        for leaf_rights in subsets(*nx_choices):
            for parent_rights in (subsets(*nx_choices) if parent else (None,)):
                flags = {leaf_level: P | ps | pkey | leaf_rights}
                if parent:
                    flags[parent] = P | parent_rights
                for access in ACCESSES:
                    yield env, flags, access


RIGHTS_PARAMS = [(m, s) for m in MODES for s in LEAF_SIZES[m]]


@pytest.mark.parametrize("mode,size", RIGHTS_PARAMS, ids=[f"{m}-{s}" for m, s in RIGHTS_PARAMS])
def test_rights_matrix(mode, size):
    check(f"rights matrix {mode} {size}", rights_cases(mode, size), tlb=True)


# ---------------------------------------------------------------------------
# Matrix 2: present and accessed/dirty bits at every level of the chain, exhaustively,
# with D also set in the non-leaf entries (where bit 6 is ignored), × every access × CR0.WP.


def presence_cases(mode: str, size: str):
    leaf_level = LEAF_LEVEL[size]
    levels = [lvl for lvl in MODE_LEVELS[mode] if lvl >= leaf_level]
    ps = PS if leaf_level > 1 else 0
    for wp in (False, True):
        env = Env(mode, wp=wp, nxe=True)
        for present in product((0, P), repeat=len(levels)):
            for accessed in product((0, A), repeat=len(levels)):
                for leaf_dirty, upper_dirty in product((0, D), repeat=2):
                    flags = {}
                    for lvl, p, a in zip(levels, present, accessed):
                        if mode == PAE and lvl == 3:
                            flags[lvl] = p              # a PAE PDPTE has only P
                        elif lvl == leaf_level:
                            flags[lvl] = p | W | U | a | ps | leaf_dirty
                        else:
                            flags[lvl] = p | W | U | a | upper_dirty
                    if mode == PAE and 3 in flags and accessed[0]:
                        continue                        # same case as accessed[0] == 0
                    for access in ACCESSES:
                        yield env, flags, access


@pytest.mark.parametrize("mode,size", RIGHTS_PARAMS, ids=[f"{m}-{s}" for m, s in RIGHTS_PARAMS])
def test_present_accessed_dirty_matrix(mode, size):
    check(f"present/A/D matrix {mode} {size}", presence_cases(mode, size), tlb=True)


# ---------------------------------------------------------------------------
# Matrix 3: one reserved (or deliberately not reserved) bit at a time, at every level,
# × the entry present or not × the leaf below present or not × full rights or a
# supervisor read-only top level × every access × EFER.NXE × CR4.SMEP × MAXPHYADDR.

MAXPHYADDRS = {BITS32: (32, 36, 40, 52), PAE: (36, 40, 52), LEVEL4: (36, 40, 52), LEVEL5: (36, 40, 52)}


def reserved_specs(mode: str):
    """(level of the entry, bits added, level of the leaf, env overrides, what it shows)."""
    specs = []
    if mode == BITS32:
        for b in (13, 16, 17, 20, 21):
            specs.append((2, bit(b), 2, {}, "PSE-36 4 MB pde: address bit or reserved by MAXPHYADDR"))
        specs.append((2, PS, 1, {"pse": False}, "PS of a pde is ignored with CR4.PSE=0"))
        specs.append((1, PAT_4K, 1, {}, "bit 7 of a pte is PAT"))
        specs.append((2, PAT_LARGE, 2, {}, "bit 12 of a 4 MB pde is PAT"))
        return specs
    high = (36, 40, 51, 52, 62, 63)
    walk_levels = [lvl for lvl in MODE_LEVELS[mode] if not (mode == PAE and lvl == 3)]
    for level in walk_levels:
        for b in high:
            specs.append((level, bit(b), 1, {}, "high bit of an entry of a 4 KB walk"))
    for b in (12, 13, 20, 21) + high:
        specs.append((2, bit(b), 2, {}, "bit of a 2 MB leaf"))
    specs.append((1, PAT_4K, 1, {}, "bit 7 of a pte is PAT"))
    if mode in (LEVEL4, LEVEL5):
        for b in (12, 13, 20, 21, 29, 30) + high:
            specs.append((3, bit(b), 3, {}, "bit of a 1 GB leaf"))
        specs.append((3, PS, 3, {"gbpages": False}, "PS in a PDPTE without 1 GB pages"))
        specs.append((4, PS, 1, {}, "PS in a PML4E"))
        if mode == LEVEL5:
            specs.append((5, PS, 1, {}, "PS in a PML5E"))
    return specs


def reserved_cases(mode: str):
    top = MODE_LEVELS[mode][0] if mode != PAE else 2
    for level, extra, leaf_level, overrides, _ in reserved_specs(mode):
        ps = PS if leaf_level > 1 else 0
        for m, nxe, smep in product(MAXPHYADDRS[mode], (False, True), (False, True)):
            env = Env(mode, nxe=nxe, smep=smep, maxphyaddr=m, **overrides)
            for entry_present, lower_present, restricted in product((0, P), (0, P), (False, True)):
                flags = {leaf_level: P | W | U | A | ps}
                if level != leaf_level:
                    flags[leaf_level] = lower_present | W | U | A | ps
                elif not lower_present:
                    continue                            # no entry below the leaf
                if restricted:
                    flags[top] = flags.get(top, default_flags(mode, top)) & ~(W | U)
                flags[level] = (flags.get(level, default_flags(mode, level)) | extra) & ~P | entry_present
                for access in ACCESSES:
                    yield env, flags, access


@pytest.mark.parametrize("mode", MODES)
def test_reserved_bit_matrix(mode):
    check(f"reserved-bit matrix {mode}", reserved_cases(mode))


# ---------------------------------------------------------------------------
# Named sub-cases (REFERENCE.md section 3).  Each names the rule it checks.

LARGE_SHIFT = {BITS32: 22, PAE: 21, LEVEL4: 21, LEVEL5: 21}
USER_RW = P | W | U


def walk(tb: Tables, cpu, vaddr: int, access) -> int:
    """Physical address by a walk (raises PageFault)."""
    cpu.cpl = 3 if access.user else 0
    return translate(tb.mem, cpu, vaddr, access.flags).paddr


def via_tlb(tlb: Tlb):
    def go(tb: Tables, cpu, vaddr: int, access) -> int:
        cpu.cpl = 3 if access.user else 0
        return tlb.translate(tb.mem, cpu, vaddr, access.flags)
    return go


def fault_code(fn, *args) -> int | None:
    """The #PF error code ``fn`` raises, or None if it returns."""
    try:
        fn(*args)
    except PageFault as pf:
        return pf.error_code
    return None


@pytest.mark.parametrize("use_tlb", [False, True], ids=["walk", "tlb"])
@pytest.mark.parametrize("mode", MODES)
def test_two_large_mappings_of_one_frame_keep_their_own_rights(mode, use_tlb):
    """One 2 MB (4 MB) frame mapped twice, writable at one address and read-only at the
    other: each address has its own rights and its own A/D bits."""
    env = Env(mode, wp=True, nxe=mode != BITS32)
    tb = Tables(env)
    shift = LARGE_SHIFT[mode]
    frame = LEAF_FRAME[shift]
    va_rw = 0x4000_0000
    va_ro = va_rw + (1 << shift)
    off = 0x12345
    rw = tb.map(va_rw, 2, USER_RW, frame)[2]
    ro = tb.map(va_ro, 2, P | U, frame)[2]
    cpu = tb.cpu()
    go = via_tlb(Tlb()) if use_tlb else walk

    assert go(tb, cpu, va_rw + off, USER_WRITE) == frame + off
    assert go(tb, cpu, va_ro + off, USER_READ) == frame + off
    assert fault_code(go, tb, cpu, va_ro + off, USER_WRITE) == EC_P | EC_W | EC_U
    assert fault_code(go, tb, cpu, va_ro + off, SUP_WRITE) == EC_P | EC_W          # CR0.WP=1
    assert go(tb, cpu, va_rw + off, USER_WRITE) == frame + off                    # still fine
    assert tb.get(rw) == frame | USER_RW | PS | A | D
    assert tb.get(ro) == frame | P | U | PS | A                                   # never dirty


@pytest.mark.parametrize("user_page", [False, True], ids=["supervisor-page", "user-page"])
@pytest.mark.parametrize("mode", MODES)
def test_cr0_wp0_supervisor_write_to_read_only_large_page_sets_dirty(mode, user_page):
    """CR0.WP=0: a supervisor write to a read-only 2 MB / 4 MB page succeeds and sets D
    in the PDE, also when the TLB already holds the page from a read (D was 0 then)."""
    u = U if user_page else 0
    env = Env(mode, wp=False, nxe=mode != BITS32)
    tb = Tables(env)
    shift = LARGE_SHIFT[mode]
    frame = LEAF_FRAME[shift]
    va = 0x4000_0000 + 0x5678
    pde = tb.map(va, 2, P | u, frame)[2]
    cpu = tb.cpu()
    tlb = Tlb()
    go = via_tlb(tlb)

    assert go(tb, cpu, va, SUP_READ) == frame + 0x5678
    assert tb.get(pde) == frame | P | u | PS | A
    assert go(tb, cpu, va, SUP_WRITE) == frame + 0x5678
    assert tb.get(pde) == frame | P | u | PS | A | D
    assert fault_code(go, tb, cpu, va, USER_WRITE) == EC_P | EC_W | EC_U
    # The same write with CR0.WP=1 faults and leaves D alone.
    tb2 = Tables(replace(env, wp=True))
    pde2 = tb2.map(va, 2, P | u, frame)[2]
    assert fault_code(walk, tb2, tb2.cpu(), va, SUP_WRITE) == EC_P | EC_W
    assert tb2.get(pde2) == frame | P | u | PS


@pytest.mark.parametrize("mode", MODES)
def test_smep_still_applies_with_cr0_wp0(mode):
    """CR4.SMEP with CR0.WP=0: a supervisor write to a read-only user page succeeds (and
    sets D), but a supervisor fetch from that page must still fault (P|I/D), however the
    write was carried out (KVM once made such pages supervisor pages in its shadow)."""
    env = Env(mode, wp=False, smep=True, nxe=mode != BITS32)
    tb = Tables(env)
    va = 0x4020_1000 + 0x80
    frame = LEAF_FRAME[12]
    pte = tb.map(va, 1, P | U, frame)[1]
    cpu = tb.cpu()
    go = via_tlb(Tlb())

    assert go(tb, cpu, va, SUP_WRITE) == frame + 0x80
    assert tb.get(pte) == frame | P | U | A | D
    assert fault_code(go, tb, cpu, va, SUP_FETCH) == EC_P | EC_ID
    assert go(tb, cpu, va, USER_READ) == frame + 0x80
    assert go(tb, cpu, va, USER_FETCH) == frame + 0x80
    assert fault_code(go, tb, cpu, va, USER_WRITE) == EC_P | EC_W | EC_U
    assert fault_code(go, tb, cpu, va, SUP_FETCH) == EC_P | EC_ID


@pytest.mark.parametrize("mode", MODES)
def test_cr0_wp_toggled_without_tlb_flush_uses_the_current_wp(mode):
    """A TLB entry caches the page's rights, not the outcome: after MOV to CR0 changes WP
    (which flushes nothing), a cached read-only page is writable by the supervisor
    exactly when CR0.WP=0."""
    env = Env(mode, wp=True, nxe=mode != BITS32)
    tb = Tables(env)
    va = 0x4020_1000 + 0x10
    frame = LEAF_FRAME[12]
    pte = tb.map(va, 1, P | A, frame)[1]            # supervisor, read-only
    cpu = tb.cpu()
    tlb = Tlb()
    go = via_tlb(tlb)

    assert go(tb, cpu, va, SUP_READ) == frame + 0x10
    assert fault_code(go, tb, cpu, va, SUP_WRITE) == EC_P | EC_W
    cpu.write_cr0(cpu.cr0 & ~CR0_WP, tb.mem)
    assert go(tb, cpu, va, SUP_WRITE) == frame + 0x10
    assert tb.get(pte) == frame | P | A | D
    cpu.write_cr0(cpu.cr0 | CR0_WP, tb.mem)
    assert fault_code(go, tb, cpu, va, SUP_WRITE) == EC_P | EC_W
    assert go(tb, cpu, va, SUP_READ) == frame + 0x10
    cpu.write_cr0(cpu.cr0 & ~CR0_WP, tb.mem)
    assert go(tb, cpu, va, SUP_WRITE) == frame + 0x10
    assert fault_code(go, tb, cpu, va, USER_READ) == EC_P | EC_U


SHARING = [(BITS32, 2), (PAE, 2), (LEVEL4, 2), (LEVEL4, 3), (LEVEL4, 4), (LEVEL5, 5), (LEVEL5, 3)]


@pytest.mark.parametrize("use_tlb", [False, True], ids=["walk", "tlb"])
@pytest.mark.parametrize("first", ["full", "restricted"])
@pytest.mark.parametrize("mode,level", SHARING, ids=[f"{m}-level{lvl}" for m, lvl in SHARING])
def test_two_upper_entries_with_different_rights_sharing_one_lower_table(mode, level, first, use_tlb):
    """Two entries of one table, one P|W|U and one supervisor read-only, point at the same
    lower table: each path has its own effective rights, whichever is used first and
    whether or not the TLB holds the other (KVM's CVE-2021-38198 class of bug)."""
    env = Env(mode, wp=True, nxe=mode != BITS32)
    tb = Tables(env)
    frame = LEAF_FRAME[12]
    va_full = 0x4020_1000 + 0x40 if mode in (BITS32, PAE) else canonical(mode, compose(mode, {
        lvl: 0x11 for lvl in MODE_LEVELS[mode]}, 0x40))
    addrs = tb.map(va_full, 1, USER_RW, frame)
    # the other index at `level`, same entries below it
    step = 1 << level_shift(mode, level)
    va_ro = va_full + step
    assert index_at(mode, level, va_ro) != index_at(mode, level, va_full)
    full_entry = tb.get(addrs[level])
    ro_addr = addrs[level] + (8 if is_wide(mode) else 4)
    tb.put(ro_addr, (full_entry & ~0xFFF) | P)
    cpu = tb.cpu()
    go = via_tlb(Tlb()) if use_tlb else walk

    def check_full():
        assert go(tb, cpu, va_full, USER_WRITE) == frame + 0x40

    def check_restricted():
        assert fault_code(go, tb, cpu, va_ro, USER_READ) == EC_P | EC_U
        assert fault_code(go, tb, cpu, va_ro, SUP_WRITE) == EC_P | EC_W
        assert go(tb, cpu, va_ro, SUP_READ) == frame + 0x40

    for _ in range(2):
        if first == "full":
            check_full()
            check_restricted()
        else:
            check_restricted()
            check_full()


@pytest.mark.parametrize("mode", [LEVEL4, LEVEL5])
def test_a_table_that_maps_itself_walks_correctly(mode):
    """A self-referencing top-level entry (recursive mapping): the address whose every
    index is R maps the top table itself; (R, i, j, ...) maps the page table of the
    region (i, j, ...).  A and D land in the entries the walk uses, including the
    self entry acting as leaf."""
    env = Env(mode, wp=True, nxe=True)
    tb = Tables(env)
    levels = MODE_LEVELS[mode]
    top = levels[0]
    r = 0x1FE
    self_slot = tb.root + r * 8
    tb.put(self_slot, tb.root | P | W)              # supervisor, no A yet
    va = compose(mode, {lvl: 0x23 + lvl for lvl in levels}, 0x9A8)
    addrs = tb.map(va, 1, USER_RW, LEAF_FRAME[12])
    cpu = tb.cpu()

    all_r = compose(mode, {lvl: r for lvl in levels}, 0x18)
    assert walk(tb, cpu, all_r, SUP_READ) == tb.root + 0x18
    assert tb.get(self_slot) == tb.root | P | W | A
    assert walk(tb, cpu, all_r, SUP_WRITE) == tb.root + 0x18
    assert tb.get(self_slot) == tb.root | P | W | A | D
    assert fault_code(walk, tb, cpu, all_r, USER_READ) == EC_P | EC_U

    # (R, va's upper indexes) -> the page table holding va's pte
    shifted = {top: r}
    for lvl in levels[1:]:
        shifted[lvl] = index_at(mode, lvl + 1, va)
    via_self = compose(mode, shifted, addrs[1] & 0xFFF)
    assert walk(tb, cpu, via_self, SUP_READ) == addrs[1]        # the pte of va, in its table
    # and the translation of va itself is unaffected
    assert walk(tb, cpu, va, USER_READ) == LEAF_FRAME[12] + 0x9A8


NON_CANONICAL = [(LEVEL4, 1 << 47), (LEVEL4, 0xFFFF_7FFF_FFFF_F000), (LEVEL4, 0x0000_FFFF_FFFF_FFFF + 1),
                 (LEVEL4, 0x8000_0000_0000_0000), (LEVEL5, 1 << 56), (LEVEL5, 0xFE00_0000_0000_0000),
                 (LEVEL5, 0x7FFF_FFFF_FFFF_FFFF)]


@pytest.mark.parametrize("mode,vaddr", NON_CANONICAL, ids=[f"{m}-{v:#x}" for m, v in NON_CANONICAL])
def test_non_canonical_address_raises_non_canonical_not_page_fault(mode, vaddr):
    """4/5-level paging: a linear address whose bits above 47 (56) are not copies of bit
    47 (56) is a #GP before any walk: NonCanonicalAddress, never PageFault; nothing in
    memory changes, for every access kind, walk or TLB."""
    env = Env(mode, wp=True, nxe=True)
    mem, layout = build(env, {lvl: P | W | U for lvl in MODE_LEVELS[mode]})
    cpu = make_cpu(env, mem)
    before = {lvl: read_entry(mem, mode, a) for lvl, a in layout.addrs.items()}
    tlb = Tlb()
    for access in ACCESSES:
        for fn in (lambda: translate(mem, cpu, vaddr, access.flags),
                   lambda: tlb.translate(mem, cpu, vaddr, access.flags)):
            with pytest.raises(NonCanonicalAddress) as info:
                fn()
            assert isinstance(info.value, GeneralProtection)
            assert not isinstance(info.value, PageFault)
    assert {lvl: read_entry(mem, mode, a) for lvl, a in layout.addrs.items()} == before


def test_an_address_canonical_only_with_57_bits_walks_in_5_level_mode():
    """0x0000_8000_0000_0000 is non-canonical in 4-level mode but a plain (here
    unmapped) address in 5-level mode: PageFault, not NonCanonicalAddress."""
    env = Env(LEVEL5, wp=True, nxe=True)
    mem, layout = build(env, {})
    cpu = make_cpu(env, mem)
    with pytest.raises(PageFault) as info:
        translate(mem, cpu, 1 << 47, 0)
    assert info.value.error_code == 0


PDPTE_RESERVED = [1, 2, 5, 6, 7, 8, 36, 40, 51, 52, 62, 63]
PDPTE_ALLOWED = [3, 4, 9, 10, 11, 35]


@pytest.mark.parametrize("bitno", PDPTE_RESERVED)
def test_pae_pdpte_with_a_reserved_bit_raises_gp_at_cr3_load(bitno):
    """PAE paging (SDM 4.4.1): the four PDPTEs are loaded when CR3 is loaded; a present
    PDPTE with a reserved bit (2:1, 8:5, 63:MAXPHYADDR) makes the MOV to CR3 #GP, and the
    CPU keeps its previous CR3 and PDPTE registers.  A not-present PDPTE may hold anything."""
    env = Env(PAE, wp=True, nxe=True, maxphyaddr=36)
    tb = Tables(env)
    va = 0x4020_1000
    tb.map(va, 1, USER_RW, LEAF_FRAME[12])
    cpu = tb.cpu()
    old = (cpu.cr3, cpu.pdptes)
    bad = tb.alloc()
    good_pd = tb.get(tb.root + 8) & ~0xFFF
    tb.put(bad + 8, good_pd | P | bit(bitno))
    with pytest.raises(GeneralProtection):
        cpu.write_cr3(bad, tb.mem)
    assert (cpu.cr3, cpu.pdptes) == old
    assert walk(tb, cpu, va, USER_READ) == LEAF_FRAME[12]
    # enabling paging with such a PDPTE faults the same way
    fresh = CpuState(maxphyaddr=env.maxphyaddr)
    with pytest.raises(GeneralProtection):
        fresh.load(tb.mem, **env.registers(bad))
    assert not fresh.paging
    # not present: loaded without complaint
    tb.put(bad + 8, (good_pd | bit(bitno)) & ~P)
    cpu.write_cr3(bad, tb.mem)
    assert fault_code(walk, tb, cpu, va, USER_READ) == EC_U


@pytest.mark.parametrize("bitno", PDPTE_ALLOWED)
def test_pae_pdpte_bits_that_are_not_reserved_load_fine(bitno):
    """PWT, PCD, the ignored bits 11:9 and address bits below MAXPHYADDR load without #GP;
    a walk through the PDPTE register leaves the PDPTE in memory untouched (no A bit)."""
    env = Env(PAE, wp=True, nxe=True, maxphyaddr=36)
    tb = Tables(env)
    va = 0x4020_1000
    tb.map(va, 1, USER_RW, LEAF_FRAME[12])
    pdpte = tb.root + 8
    value = tb.get(pdpte) | bit(bitno)
    tb.put(pdpte, value)
    cpu = tb.cpu()
    assert cpu.pdptes[1] == value
    if bitno < 12:
        assert walk(tb, cpu, va, USER_WRITE) == LEAF_FRAME[12]
        assert tb.get(pdpte) == value                 # a PDPTE has no A bit to set


PDPTE_RELOAD = {
    # MOV to CR0 / CR4 reloads the PDPTEs only when it changes one of CR0.CD, CR0.NW,
    # CR0.PG, CR4.PAE, CR4.PGE, CR4.PSE, CR4.SMEP (SDM 4.4.1); MOV to CR3 always does.
    "cr0.wp": (False, lambda cpu, mem: cpu.write_cr0(cpu.cr0 ^ CR0_WP, mem)),
    "cr4.smap": (False, lambda cpu, mem: cpu.write_cr4(cpu.cr4 ^ CR4_SMAP, mem)),
    "efer.nxe": (False, lambda cpu, mem: cpu.write_efer(cpu.efer ^ (1 << 11), mem)),
    "cr4.pge": (True, lambda cpu, mem: cpu.write_cr4(cpu.cr4 ^ (1 << 7), mem)),
    "cr4.pse": (True, lambda cpu, mem: cpu.write_cr4(cpu.cr4 ^ (1 << 4), mem)),
    "cr4.smep": (True, lambda cpu, mem: cpu.write_cr4(cpu.cr4 ^ (1 << 20), mem)),
    "cr3": (True, lambda cpu, mem: cpu.write_cr3(cpu.cr3, mem)),
}
@pytest.mark.parametrize("write", list(PDPTE_RELOAD))
def test_pae_pdptes_are_reloaded_only_by_the_writes_the_sdm_lists(write):
    """Change a PDPTE in memory (not present, and then with a reserved bit), then write a
    control register: the PDPTE registers change (and the reserved bit is #GP) only if
    the write is one that loads them."""
    reloads, do_write = PDPTE_RELOAD[write]
    env = Env(PAE, wp=True, nxe=True)
    tb = Tables(env)
    va = 0x4020_1000
    addrs = tb.map(va, 1, USER_RW, LEAF_FRAME[12])
    cpu = tb.cpu()
    good = tb.get(addrs[3])
    tb.put(addrs[3], good & ~P)
    do_write(cpu, tb.mem)
    if reloads:
        assert fault_code(walk, tb, cpu, va, USER_READ) == EC_U
    else:
        assert walk(tb, cpu, va, USER_READ) == LEAF_FRAME[12]
    tb.put(addrs[3], good | bit(1))                 # reserved in a PAE PDPTE
    if reloads:
        with pytest.raises(GeneralProtection):
            do_write(cpu, tb.mem)
    else:
        do_write(cpu, tb.mem)


@pytest.mark.parametrize("maxphyaddr,high,expect", [
    (40, 0x2A, (0x2A << 32) | 0x00C0_0000),        # bits 39:32 from PDE bits 20:13
    (40, 0xFF, (0xFF << 32) | 0x00C0_0000),
    (36, 0x0A, (0x0A << 32) | 0x00C0_0000),        # MAXPHYADDR 36: bits 16:13 are the address
    (36, 0x2A, None),                              # bit 18 (address bit 37) is reserved -> RSVD
    (52, 0xFF, (0xFF << 32) | 0x00C0_0000),        # PSE-36 stops at 40 bits
])
def test_pse36_4mb_page_maps_above_4gb(maxphyaddr, high, expect):
    """32-bit paging with CR4.PSE: a 4 MB PDE carries physical-address bits (M'-1):32 in
    bits (M'-20):13, M' = min(MAXPHYADDR, 40); the bits above that up to 21 are reserved."""
    env = Env(BITS32, wp=True, maxphyaddr=maxphyaddr)
    tb = Tables(env, mem_size=1 << min(maxphyaddr, 40))
    va = 0x8040_0000 + 0x1234
    pde = tb.root + index_at(BITS32, 2, va) * 4
    tb.put(pde, 0x00C0_0000 | (high << 13) | P | W | U | PS)
    cpu = tb.cpu()
    if expect is None:
        assert fault_code(walk, tb, cpu, va, USER_READ) == EC_P | EC_U | EC_RSVD
        assert tb.get(pde) & A == 0
        return
    t = translate(tb.mem, cpu, va, USER_WRITE.flags)
    assert (t.paddr, t.page_shift) == (expect + 0x1234, 22)
    assert tb.get(pde) & (A | D) == A | D
    tlb = Tlb()
    assert tlb.translate(tb.mem, cpu, va + 0x1000, 0) == expect + 0x2234


@pytest.mark.parametrize("mode", [LEVEL4, LEVEL5])
def test_1gb_pages_and_ps_in_pdpte_reserved_without_gbpages(mode):
    """A PDPTE with PS maps a 1 GB page when the CPU has 1 GB pages; without them PS is
    reserved there: #PF RSVD|P, the PDPTE unchanged, the entries above it accessed."""
    va = compose(mode, {lvl: 0x31 for lvl in MODE_LEVELS[mode] if lvl >= 3}, 0x2345_6789)
    frame = LEAF_FRAME[30]
    for gbpages in (True, False):
        env = Env(mode, wp=True, nxe=True, gbpages=gbpages)
        tb = Tables(env)
        addrs = tb.map(va, 3, USER_RW, frame)
        cpu = tb.cpu()
        if gbpages:
            t = translate(tb.mem, cpu, va, SUP_WRITE.flags)
            assert (t.paddr, t.page_shift) == (frame + 0x2345_6789, 30)
            assert tb.get(addrs[3]) == frame | USER_RW | PS | A | D
        else:
            assert fault_code(walk, tb, cpu, va, SUP_WRITE) == EC_P | EC_W | EC_RSVD
            assert tb.get(addrs[3]) == frame | USER_RW | PS
            for lvl in MODE_LEVELS[mode]:
                if lvl > 3:
                    assert tb.get(addrs[lvl]) & A


@pytest.mark.parametrize("nxe", [False, True], ids=["nonxe", "nxe"])
@pytest.mark.parametrize("smep", [False, True], ids=["nosmep", "smep"])
@pytest.mark.parametrize("mode", MODES)
def test_id_bit_is_reported_only_with_smep_or_pae_format_nx(mode, smep, nxe):
    """I/D (bit 4) is set for a faulting fetch only when CR4.SMEP=1 or (CR4.PAE=1 and
    EFER.NXE=1), whatever the kind of fault; never for a data access."""
    reported = smep or (mode != BITS32 and nxe)
    env = Env(mode, wp=True, nxe=nxe, smep=smep)
    cases = [
        ({1: W | U}, USER_FETCH, EC_U),                          # not present
        ({1: W | U}, SUP_FETCH, 0),
        ({1: P | W}, USER_FETCH, EC_P | EC_U),                   # supervisor page
        ({1: W | U}, USER_READ, EC_U),                           # data: never I/D
        ({1: W | U}, SUP_WRITE, EC_W),
    ]
    if mode != BITS32:
        cases.append(({1: P | W | U | NX}, SUP_FETCH,            # NX (or reserved bit 63)
                      EC_P if nxe else EC_P | EC_RSVD))
    if smep:
        cases.append(({1: P | W | U}, SUP_FETCH, EC_P))          # SMEP
    for flags, access, code in cases:
        mem, layout = build(env, flags)
        cpu = make_cpu(env, mem)
        want = code | (EC_ID if access.fetch and reported else 0)
        got, _ = model_access(mem, cpu, layout.vaddr, access)
        assert got == want, f"{flags} {access.name}: expected {want:#x}, got {got!r}"


@pytest.mark.parametrize("mode", [LEVEL4, LEVEL5])
def test_pku_write_disable_binds_supervisor_writes_only_with_cr0_wp(mode):
    """PKRU.WD of a user page's key: a user write always faults (P|W|U|PK); a supervisor
    write faults (P|W|PK) only with CR0.WP=1.  Reads are unaffected; supervisor pages
    carry no key check; and a cached TLB entry follows a later CR0.WP change."""
    key = 5
    pkru = 2 << (2 * key)
    va = compose(mode, {lvl: 0x42 for lvl in MODE_LEVELS[mode]}, 0x10)
    frame = LEAF_FRAME[12]
    for wp in (False, True):
        env = Env(mode, wp=wp, nxe=True, pke=True, pkru=pkru)
        tb = Tables(env)
        pte = tb.map(va, 1, USER_RW | (key << PKEY_SHIFT), frame)[1]
        sup_va = va + 0x1000
        tb.map(sup_va, 1, P | W | (key << PKEY_SHIFT), frame)
        cpu = tb.cpu()
        tlb = Tlb()
        go = via_tlb(tlb)
        assert go(tb, cpu, va, USER_READ) == frame + 0x10
        assert go(tb, cpu, va, SUP_READ) == frame + 0x10
        assert fault_code(go, tb, cpu, va, USER_WRITE) == EC_P | EC_W | EC_U | EC_PK
        assert go(tb, cpu, sup_va, SUP_WRITE) == frame + 0x10
        if wp:
            assert fault_code(go, tb, cpu, va, SUP_WRITE) == EC_P | EC_W | EC_PK
            assert not tb.get(pte) & D
        else:
            assert go(tb, cpu, va, SUP_WRITE) == frame + 0x10
            assert tb.get(pte) & D
            cpu.write_cr0(cpu.cr0 | CR0_WP, tb.mem)          # no TLB flush
            assert fault_code(go, tb, cpu, va, SUP_WRITE) == EC_P | EC_W | EC_PK


@pytest.mark.parametrize("size", ["4K", "large"])
@pytest.mark.parametrize("pge", [False, True], ids=["nopge", "pge"])
@pytest.mark.parametrize("mode", MODES)
def test_global_pages_survive_cr3_write_only_with_pge(mode, pge, size):
    """MOV to CR3 drops non-global TLB entries; with CR4.PGE entries whose leaf has G stay
    (stale if the tables changed), without CR4.PGE they go too."""
    env = Env(mode, wp=True, nxe=mode != BITS32, pge=pge)
    tb = Tables(env)
    leaf_level = 1 if size == "4K" else 2
    shift = 12 if size == "4K" else LARGE_SHIFT[mode]
    old, new = LEAF_FRAME[shift], LEAF_FRAME[shift] + (4 << shift)
    va_g = 0x4000_0000
    va_n = va_g + (16 << shift)
    g_addrs = tb.map(va_g, leaf_level, USER_RW | G, old)
    n_addrs = tb.map(va_n, leaf_level, USER_RW, old)
    cpu = tb.cpu()
    tlb = Tlb()
    go = via_tlb(tlb)
    assert go(tb, cpu, va_g, USER_READ) == old
    assert go(tb, cpu, va_n, USER_READ) == old
    tb.put(g_addrs[leaf_level], new | USER_RW | G | A | (PS if leaf_level > 1 else 0))
    tb.put(n_addrs[leaf_level], new | USER_RW | A | (PS if leaf_level > 1 else 0))
    cpu.write_cr3(cpu.cr3, tb.mem)
    tlb.on_cr3_write(cpu)
    assert go(tb, cpu, va_n, USER_READ) == new
    assert go(tb, cpu, va_g, USER_READ) == (old if pge else new)
    tlb.flush()                                      # e.g. CR4.PGE toggled: everything goes
    assert go(tb, cpu, va_g, USER_READ) == new


INVLPG = [(BITS32, 22), (PAE, 21), (LEVEL4, 21), (LEVEL4, 30), (LEVEL5, 21), (LEVEL5, 30)]


@pytest.mark.parametrize("where", ["base", "next-4k", "middle", "last-byte"])
@pytest.mark.parametrize("mode,shift", INVLPG, ids=[f"{m}-2^{s}" for m, s in INVLPG])
def test_invlpg_drops_a_large_entry_given_any_address_inside_it(mode, shift, where):
    """INVLPG of any linear address inside a 2 MB / 4 MB / 1 GB page drops the page's TLB
    entry (an address outside it does not)."""
    env = Env(mode, wp=True, nxe=mode != BITS32)
    tb = Tables(env)
    level = 2 if shift in (21, 22) else 3
    size = 1 << shift
    base = 0x4000_0000 if mode in (BITS32, PAE) else compose(mode, {lvl: 0x13 for lvl in MODE_LEVELS[mode]
                                                                  if lvl > level})
    old, new = LEAF_FRAME[shift], LEAF_FRAME[shift] + size
    leaf = tb.map(base, level, USER_RW, old)[level]
    cpu = tb.cpu()
    tlb = Tlb()
    go = via_tlb(tlb)
    assert go(tb, cpu, base + 0x123, USER_READ) == old + 0x123
    tb.put(leaf, new | USER_RW | PS | A)
    # cached: stale (the same 4 KB piece; another piece may be walked afresh -- a TLB may
    # splinter a large page, and a miss is always allowed)
    assert go(tb, cpu, base + 0x456, USER_READ) == old + 0x456
    tlb.invlpg(base + size)                                              # outside: no effect
    assert go(tb, cpu, base + 0x123, USER_READ) == old + 0x123
    inside = {"base": 0, "next-4k": 0x1000, "middle": size // 2 + 0x567, "last-byte": size - 1}[where]
    tlb.invlpg(base + inside)
    assert go(tb, cpu, base + 0x123, USER_READ) == new + 0x123


@pytest.mark.parametrize("bitno", [40, 45, 51])
@pytest.mark.parametrize("mode", [LEVEL4, LEVEL5])
def test_cr3_with_an_address_bit_at_or_above_maxphyaddr_is_gp_in_ia32e_mode(mode, bitno):
    """4/5-level paging, MAXPHYADDR 40: CR3 bits 51:40 are reserved; MOV to CR3 with one of
    them set is #GP(0) and CR3 keeps its value (bits 63:52 are left out here: bit 63 is
    the PCID no-flush bit, 62:61 belong to LAM)."""
    env = Env(mode, wp=True, nxe=True, maxphyaddr=40)
    mem, layout = build(env, {})
    cpu = make_cpu(env, mem)
    old = cpu.cr3
    with pytest.raises(GeneralProtection):
        cpu.write_cr3(old | bit(bitno), mem)
    assert cpu.cr3 == old


# ---------------------------------------------------------------------------
# Random entries: every flag bit, PS at any level, high and reserved bits at random,
# in random environments; the same rules must hold.  Deterministic seeds.


def random_cases(mode: str, seed: int, count: int):
    import random
    rng = random.Random(seed)
    levels = MODE_LEVELS[mode]
    for _ in range(count):
        m = rng.choice(MAXPHYADDRS[mode])
        env = Env(mode, wp=rng.random() < .5, nxe=rng.random() < .5, smep=rng.random() < .5,
                  smap=rng.random() < .5, ac=rng.random() < .5, pke=rng.random() < .5,
                  pkru=rng.choice((0, 1 << 10, 2 << 10, rng.getrandbits(32))),
                  pse=rng.random() < .8, gbpages=rng.random() < .7, maxphyaddr=m)
        flags = {}
        for lvl in levels:
            if mode == PAE and lvl == 3:
                flags[lvl] = P if rng.random() < .95 else 0
                continue
            f = rng.getrandbits(12) | (P if rng.random() < .9 else 0)
            if rng.random() < .7:
                f &= ~PS if lvl > 1 and rng.random() < .6 else ~0
            if is_wide(mode):
                f |= rng.getrandbits(12) << 52 if rng.random() < .5 else 0
                if rng.random() < .2:
                    f |= bit(rng.randrange(min(m, 52), 52)) if m < 52 else 0
            if lvl > 1 and maps_page(env, lvl, f | P) and rng.random() < .3:
                f |= bit(rng.randrange(12, level_shift(mode, lvl)))        # inside a large leaf's offset
            flags[lvl] = f
            if maps_page(env, lvl, f | P):
                break
        yield env, flags, rng.choice(ACCESSES)


@pytest.mark.parametrize("mode", MODES)
def test_random_entries_agree_with_the_rules(mode):
    check(f"random entries {mode}", random_cases(mode, seed=0x5EED + MODES.index(mode), count=10000),
          tlb=True)
