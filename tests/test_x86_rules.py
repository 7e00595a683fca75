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

from itertools import product

import pytest

from shadowmmu.x86 import GeneralProtection, NonCanonicalAddress, PageFault, PhysicalMemory, Tlb, translate
from x86_helpers import (
    A, ACCESSES, BITS32, CR0_WP, CR4_SMAP, D, EC_ID, EC_P, EC_PK, EC_RSVD, EC_U, EC_W, G, IMPLICIT_READ,
    IMPLICIT_WRITE, LEVEL4, LEVEL5, MODE_LEVELS, MODES, NX, P, PAE, PAT_4K, PAT_LARGE, PKEY_SHIFT, PS,
    SUP_FETCH, SUP_READ, SUP_WRITE, U, USER_FETCH, USER_READ, USER_WRITE, W, Env, bit, bits, build, default_flags,
    entry_addr, expected_outcome, is_wide, level_shift, make_cpu, maps_page, model_access, read_entry,
    report, reserved_bits, run_matrix, table_addr,
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
        if not leaf and f & P and f & bits(32, 51) & ~reserved_bits(env, level, False):
            # e.g. bit 40 with MAXPHYADDR=52: a valid address, of a table the test did not build
            return "a table pointer to an address above the test memory (not a paging rule)"
    return None


def legal(cases):
    for env, flags, access in cases:
        reason = illegal(env, flags)
        if reason:
            ILLEGAL_REASONS[reason] = ILLEGAL_REASONS.get(reason, 0) + 1
            continue
        yield env, flags, access


def check(name: str, cases) -> int:
    n, failures = run_matrix(legal(cases))
    assert n > 0
    assert not failures, report(name, n, failures)
    return n


# ---------------------------------------------------------------------------
# Environments


def pk_settings(mode: str):
    """(CR4.PKE, PKRU).  The test leaf of an IA-32e mode carries key 5."""
    if mode in (LEVEL4, LEVEL5):
        ad5, wd5 = 1 << 10, 2 << 10
        return ((False, 0xFFFF_FFFF),            # PKRU ignored without CR4.PKE
                (True, 0),
                (True, ad5),
                (True, wd5),
                (True, 0xFFFF_FFFF & ~(ad5 | wd5)))  # every other key denied
    # Protection keys apply to IA-32e paging only: CR4.PKE has no effect here.
    return ((False, 0), (True, 0xFFFF_FFFF))


LEAF_PKEY = 5


def rights_envs(mode: str):
    for wp, nxe, smep, smap, ac in product((False, True), repeat=5):
        for pke, pkru in pk_settings(mode):
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
    for env in rights_envs(mode):
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
    check(f"rights matrix {mode} {size}", rights_cases(mode, size))


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
    check(f"present/A/D matrix {mode} {size}", presence_cases(mode, size))


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
