"""The shadow MMU is invisible to the guest: native and shadow runs of the same
program agree on every value, fault, MMIO access and byte of guest memory (with
the TLB latitude the SDM gives a guest that does not invalidate); audit() holds
after every step.  Named regressions: bugs a reviewer planted that the earlier
generator could not see, each as the short program that exposes it."""

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shadowmmu.verify.choosers import HypothesisChooser, RandomChooser
from shadowmmu.verify.lockstep import (
    DATA, GUESTS, ROOTS, Generator, Lockstep, Op, campaign, compose_va, generate_program, initial_tree, shrink,
)
from shadowmmu.x86.formats import PagingMode


def execute_read(vm, va):
    from shadowmmu.verify.lockstep import execute
    return execute(vm, Op("read", (va, 0, 8)), PagingMode.LEVEL4)

FORMATS = ("32", "pae", "64", "la57")
POLICIES = ("zap", "update")


def path(mode, indices):
    """[(table gfn, index), ...] of the initial tree along a test address, top first."""
    tree = initial_tree(mode)
    table, out = ROOTS[0], []
    for idx in indices:
        out.append((table, idx))
        table = tree.get((table, idx))
    return out


def entry_addr(mode, table, idx):
    return (table << 12) + idx * (4 if mode is PagingMode.BITS32 else 8)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("guest", FORMATS)
# no shrink phase: a failing program is printed whole by the assertion, and hypothesis
# would spend minutes shrinking it (the campaign's own shrinker does that in seconds)
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_native_and_shadow_are_indistinguishable(guest, policy, data):
    mode = GUESTS[guest]
    gen = Generator(HypothesisChooser(data), mode)
    ls = Lockstep(mode, policy)
    program = []
    for _ in range(data.draw(st.integers(5, 25))):
        for op in gen.generate():
            program.append(op)
            d = ls.step(len(program) - 1, op, program)
            assert d is None, str(d)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("guest", FORMATS)
def test_seeded_campaign_with_a_tiny_shadow_pool(guest, policy):
    """Reclaim under pressure (16 pages, so LRU zaps happen all the time) never breaks correctness."""
    mode = GUESTS[guest]
    reclaimed = 0
    for n in range(3):
        program = generate_program(RandomChooser(100 + n), mode, 150)
        ls = Lockstep(mode, policy, pool_pages=16)
        d = ls.run(program)
        assert d is None, str(d)
        reclaimed += ls.shadow.mmu.stats["reclaimed"]
        assert ls.shadow.mmu.nr_pages <= ls.shadow.mmu.pool_size
    assert reclaimed > 0


def test_the_seed_update_pte_bug_is_found_by_the_checker_on_its_own():
    """The seed's update_pte passes U|W, ignoring the upper levels: a user pte written
    under a supervisor-only directory becomes user-accessible in the shadow.  The
    campaign finds it, and the shrinker cuts it to a short story in seconds."""
    for guest in FORMATS:
        d, steps = campaign(GUESTS[guest], "update", steps=3_000, seed=5, seed_bug=True)
        assert d is not None, f"{guest}: the seed bug went unnoticed for {steps} steps"
        if guest == "64":
            short = shrink(d, GUESTS[guest], "update", seed_bug=True)
            assert short.step < 12, str(short)
        # the same program is clean without the bug
        assert Lockstep(GUESTS[guest], "update").run(d.program[:d.step + 1]) is None


def test_the_seed_bug_is_a_guest_visible_privilege_escalation():
    """Without the audit, the divergence is what the guest sees: a user read of a
    page under a supervisor-only directory succeeds in the shadow, faults natively."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 1))
    (_, _), (_, _), (pd, pd_i), (pt, pt_i) = path(mode, (1, 0, 0, 1))
    program = [
        Op("write_entry", (entry_addr(mode, pd, pd_i), (pt << 12) | 0x23, 8)),   # PDE: P|W|A, U=0
        Op("read", (va - 0x1000, 0, 8)),                                          # supervisor: shadows the PT
        Op("write_entry", (entry_addr(mode, pt, pt_i), (DATA[5] << 12) | 0x67, 8)),  # PTE: P|W|U|A|D
        Op("read", (va, 3, 8)),                                                   # user read: must #PF
    ]
    assert Lockstep(mode, "update", audit=False).run(program) is None
    d = Lockstep(mode, "update", seed_bug=True, audit=False).run(program)
    assert d is not None and d.step == 3
    assert d.native == ("#PF", va, 0x5)              # P|U: protection, user read
    assert d.shadow[0] == "value"


# --- named regressions: each program is short, and each was checked to fail with the
# --- reviewer's bug planted in mmu.py (see docs/verification.md)

def test_a_write_to_the_upper_half_of_a_32bit_page_table_leaves_the_lower_quadrant_alone():
    """pte_write must skip the shadow page of the other quadrant: entry 512 of a
    1024-entry guest table is entry 0 of the second 512-entry shadow page, and
    without the check it lands on entry 0 of the first (a user read then returns
    another page's data)."""
    mode = PagingMode.BITS32
    (_, _), (pt, _) = path(mode, (1, 0))
    va0 = compose_va(mode, (1, 0))
    program = [
        Op("read", (va0, 3, 8)),                                                   # shadows quadrant 0
        Op("write_entry", (entry_addr(mode, pt, 512), (DATA[4] << 12) | 0x67, 4)),  # entry 512: quadrant 1
        Op("read", (va0, 3, 8)),
    ]
    for policy in POLICIES:
        assert Lockstep(mode, policy).run(program) is None
    ls = Lockstep(mode, "update")
    ls.run(program[:1])
    assert ls.native.vcpu.load(va0, 8) == 0x1111111111111111


def test_update_pte_never_fills_a_shadow_page_cached_for_another_nxe_setting():
    """A page shadowed under EFER.NXE=0 stays cached when the guest sets NXE; a pte
    written then with bit 63 (NX under NXE=1) must not be installed into it, or,
    back under NXE=0, the shadow maps a pte that natively has a reserved bit."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 0))
    (_, _), (_, _), (_, _), (pt, pt_i) = path(mode, (1, 0, 0, 0))
    program = [
        Op("nxe", (False,)),
        Op("read", (va, 0, 8)),                                   # shadow the PT under NXE=0
        Op("nxe", (True,)),
        Op("write_entry", (entry_addr(mode, pt, pt_i), (1 << 63) | (DATA[2] << 12) | 0x67, 8)),
        Op("invlpg", (va,)),
        Op("nxe", (False,)),
        Op("read", (va, 0, 8)),                                   # natively: #PF RSVD
    ]
    ls = Lockstep(mode, "update")
    assert ls.run(program) is None
    assert ls.native.vcpu.guest.efer & (1 << 11) == 0


def test_a_wp0_supervisor_write_to_a_user_page_under_smap_is_emulated_not_mapped():
    """CR0.WP=0 lets the kernel write a read-only page; the MMU's trick (a writable,
    supervisor-only spte) would hide the page's U bit from SMAP, so under SMAP the
    write must be emulated: a later supervisor read with AC=0 must still fault."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 0))
    program = [
        Op("smep_smap", (False, True)),
        Op("wp", (False,)),
        Op("map", (va, 1, (DATA[3] << 12) | 0x65)),              # P|U|A|D, read-only
        Op("invlpg", (va,)),
        Op("ac", (True,)),
        Op("store", (va, 0, 8, 0x4242424242424242)),             # allowed: WP=0, AC=1
        Op("ac", (False,)),
        Op("read", (va, 0, 8)),                                   # SMAP: #PF
    ]
    ls = Lockstep(mode, "update")
    assert ls.run(program) is None
    assert ls.shadow.events.exits["emulate"] >= 1


@pytest.mark.parametrize("policy", POLICIES)
def test_a_pte_write_flushes_the_other_vcpus_tlb_when_the_guest_does_not(policy):
    """vCPU 1 holds a translation; vCPU 0 changes the pte and the guest sends no
    shootdown (allowed: vCPU 1 may keep using the old one).  The MMU must still
    flush vCPU 1's hardware TLB: its entry rests on an spte that is gone, and the
    audit's TLB check (now reachable, since the guest does not flush) says so."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 0))
    (_, _), (_, _), (_, _), (pt, pt_i) = path(mode, (1, 0, 0, 0))
    program = [
        Op("read", (va, 0, 8), vcpu=1),
        Op("write_entry", (entry_addr(mode, pt, pt_i), (DATA[6] << 12) | 0x67, 8), vcpu=0),
        Op("read", (va, 0, 8), vcpu=1),
    ]
    ls = Lockstep(mode, policy)
    assert ls.run(program) is None
    assert ls.shadow.events.exits["pte_write"] >= 1


def test_a_guest_that_skips_invlpg_may_see_the_old_translation_and_nothing_else():
    """TLB latitude in the checker: natively the stale translation is used, the
    shadow (write-protected tables) already has the new one; both are allowed.
    A third answer is a divergence."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 0))
    (_, _), (_, _), (_, _), (pt, pt_i) = path(mode, (1, 0, 0, 0))
    program = [
        Op("read", (va, 0, 8)),
        Op("write_entry", (entry_addr(mode, pt, pt_i), (DATA[6] << 12) | 0x67, 8)),
        Op("read", (va, 0, 8)),
    ]
    ls = Lockstep(mode, "update")
    assert ls.run(program) is None
    assert ls.stale_ok == 1                   # native answered from its stale entry first
    # the checker is not a rubber stamp: make the shadow side answer from a third frame
    ls2 = Lockstep(mode, "update")
    ls2.run(program[:2])
    sp_pte = ls2.shadow.mmu.gva_to_gpa(ls2.shadow.vcpu, va)
    assert sp_pte >> 12 == DATA[6]
    ls2.shadow.gmem.write_u64(DATA[6] << 12, 0xBAD)       # behind the guest's back
    d = ls2.step(2, program[2], program)
    assert d is not None and d.what == "different outcome"
    assert d.shadow == ("value", 0xBAD) and d.native == ("value", 0x1111111111111111)


def test_pkru_write_disable_does_not_bind_a_supervisor_write_under_cr0_wp0():
    """PKRU.WD binds supervisor writes only with CR0.WP=1; the hardware under a shadow
    MMU always runs with WP=1, so the MMU must emulate the write the guest allows
    (found by the pkeys scenario: the MMU used to 'fix' the fault forever)."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 0))
    program = [
        Op("pke", (True,)),
        Op("pkru", (0x80000000,)),                                # key 15: write-disable
        Op("wp", (False,)),
        Op("map", (va, 1, (15 << 59) | (DATA[0] << 12) | 0x67)),  # user page, key 15
        Op("store", (va | 0xFFC, 0, 1, 0x10)),                    # supervisor write: allowed
        Op("read", (va | 0xFFC, 0, 1)),
    ]
    for policy in POLICIES:
        ls = Lockstep(mode, policy)
        assert ls.run(program) is None
        assert ls.native.vcpu.load(va | 0xFFC, 1) == 0x10


def test_the_wp0_trick_never_hides_a_user_page_from_its_protection_key():
    """The CR0.WP=0 trick maps a read-only page writable and supervisor-only; for a
    user page under CR4.PKE that would exempt supervisor accesses from PKRU (keys bind
    user pages only), so the write is emulated and the page stays a user page."""
    mode = PagingMode.LEVEL4
    va = compose_va(mode, (1, 0, 0, 0))
    program = [
        Op("pke", (True,)),
        Op("wp", (False,)),
        Op("map", (va, 1, (1 << 59) | (DATA[0] << 12) | 0x65)),   # read-only user page, key 1
        Op("store", (va, 0, 8, 0x4242)),                          # supervisor write, WP=0: allowed
        Op("pkru", (0x4,)),                                       # key 1: access-disable
        Op("read", (va, 0, 8)),                                   # natively #PF with PK
    ]
    for policy in POLICIES:
        ls = Lockstep(mode, policy)
        assert ls.run(program) is None
    ls = Lockstep(mode, "update", audit=False)
    ls.run(program[:-1])
    assert execute_read(ls.native, va) == ("#PF", va, 0x21)       # PK | P, supervisor read


def test_two_large_pages_of_one_frame_with_different_protection_keys_do_not_share_sptes():
    """Found by a campaign (64 zap, seed 7077): two 2 MB guest pages of one frame, with
    the same rights but different protection keys, shared one direct shadow page, so
    the second carried the first one's key.  The key is part of a direct page's role."""
    mode = PagingMode.LEVEL4
    program = [
        Op("pke", (True,)),
        Op("map", (0xffff800000000000, 2, 0x28000000002000e7)),   # 2 MB at 0x200000, key 5
        Op("fetch", (0x8000001008, 0, 8), vcpu=1),
        Op("map", (0xffff807fc03ff000, 2, 0x2010a7)),              # 2 MB at 0x200000, key 0
        Op("store", (0xffff807fc03ffffe, 3, 8, 0x3535353535353535)),
        Op("pkru", (0x4 << 8,)),                                   # key 5: access-disable
        Op("read", (0xffff807fc0201000, 3, 8)),                    # key 0: still readable
        Op("read", (0xffff800000001000, 3, 8)),                    # key 5: #PF with PK
    ]
    for policy in POLICIES:
        ls = Lockstep(mode, policy)
        assert ls.run(program) is None
    assert execute_read(ls.native, 0xffff800000001000)[0] == "#PF"
