"""Rules of the shadow MMU and the x86 walker that mutation testing showed no other
fast test pinned down (docs/mutation.md lists which mutant each test kills).

Each test states one rule and checks it exactly: exit counts, error codes, spte
values, statistics.  The file is part of `make mutate`'s fast selection, so it
stays well under ten seconds."""

import pytest

from shadowmmu.vm.lockstep import GUESTS, Lockstep, RandomChooser, generate_op

FORMATS = ("32", "pae", "64", "la57")


@pytest.mark.parametrize("policy", ("zap", "update"))
@pytest.mark.parametrize("guest", FORMATS)
def test_a_short_seeded_program_runs_identically_native_and_shadowed_under_reclaim(guest, policy):
    """The lockstep checker (native vs shadow, audit after every step) on one seeded
    program per format and policy, with the smallest pool so LRU reclaim runs often."""
    mode = GUESTS[guest]
    ch = RandomChooser(7)
    program = [generate_op(ch, mode) for _ in range(120)]
    ls = Lockstep(mode, policy, pool_pages=16)
    d = ls.run(program)
    assert d is None, str(d)
    assert ls.shadow.mmu.stats["reclaimed"] > 0
