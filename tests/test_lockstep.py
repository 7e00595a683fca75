"""The shadow MMU is invisible to the guest: native and shadow runs of the same
program agree on every value, fault and byte of guest memory; audit() holds
after every step.  The seed's original update_pte rights are caught."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowmmu.vm.lockstep import (
    GUESTS, HypothesisChooser, Lockstep, Op, RandomChooser, campaign, generate_op,
)

FORMATS = ("32", "pae", "64", "la57")
POLICIES = ("zap", "update")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("guest", FORMATS)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_native_and_shadow_are_indistinguishable(guest, policy, data):
    mode = GUESTS[guest]
    ch = HypothesisChooser(data)
    ls = Lockstep(mode, policy)
    program = []
    for i in range(data.draw(st.integers(20, 80))):
        program.append(generate_op(ch, mode))
        d = ls.step(i, program[-1], program)
        assert d is None, str(d)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("guest", FORMATS)
def test_seeded_campaign_with_a_tiny_shadow_pool(guest, policy):
    """Reclaim under pressure (16 pages, so LRU zaps happen all the time) never breaks correctness."""
    mode = GUESTS[guest]
    reclaimed = 0
    for n in range(4):
        ch = RandomChooser(100 + n)
        program = [generate_op(ch, mode) for _ in range(150)]
        ls = Lockstep(mode, policy, pool_pages=16)
        d = ls.run(program)
        assert d is None, str(d)
        reclaimed += ls.shadow.mmu.stats["reclaimed"]
        assert ls.shadow.mmu.nr_pages <= ls.shadow.mmu.pool_size
    assert reclaimed > 0


def test_the_seed_update_pte_bug_is_found_by_the_checker_on_its_own():
    """The seed's update_pte passes U|W, ignoring the upper levels: a user pte written
    under a supervisor-only directory becomes user-accessible in the shadow."""
    found = {}
    for guest in FORMATS:
        d, steps = campaign(GUESTS[guest], "update", steps=20_000, seed=5, seed_bug=True)
        assert d is not None, f"{guest}: the seed bug went unnoticed for {steps} steps"
        found[guest] = d
    # the same campaigns are clean without the bug
    for guest in FORMATS:
        d, _ = campaign(GUESTS[guest], "update", steps=found[guest].step + 200, seed=5)
        assert d is None, str(d)


def test_the_seed_bug_is_a_guest_visible_privilege_escalation():
    """Without the audit, the divergence is what the guest sees: a user read of a
    page under a supervisor-only directory succeeds in the shadow, faults natively."""
    mode = GUESTS["64"]
    # directory entry for 0x8000000000 (PML4[1] -> PDPT 0x20 -> PD 0x22 -> PT 0x25):
    # make the PD entry supervisor-only, shadow the PT with a supervisor access, then
    # write a fresh user pte (present, accessed) into the shadowed PT
    program = [
        Op("write_entry", (0x22000, 0x25023, 8)),         # PDE: P|W|A, U=0
        Op("read", (0x8000000000, 0, 8)),                  # supervisor: shadows PT 0x25
        Op("write_entry", (0x25008, 0x31067, 8)),          # PTE[1]: P|W|U|A|D
        Op("read", (0x8000001000, 3, 8)),                  # user read: must #PF (U=0 above)
    ]
    ok = Lockstep(mode, "update", audit=False).run(program)
    assert ok is None, str(ok)
    ls = Lockstep(mode, "update", seed_bug=True, audit=False)
    d = ls.run(program)
    assert d is not None and d.step == 3
    assert d.native == ("#PF", 0x8000001000, 0x5)              # P|U: protection, user read
    assert d.shadow[0] == "value"
