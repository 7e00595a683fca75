"""Every shadow MMU a test builds runs its audit points.  The shadow MMU's own
tests run first, the short named ones before the random campaigns: a broken MMU
then fails `make test` early, before the slower workload and CLI tests have run
(pytest-xdist hands tests to its workers in collection order)."""

import pytest

from shadowmmu.mmu.mmu import ShadowMMU
from shadowmmu.mmu.tdp import TdpMMU

FIRST = ("test_mmu_exits.py", "test_mmu_features.py", "test_audit_detects.py", "test_lockstep.py", "test_mmu_mutants.py",
         "test_mmu_tdp.py")
CAMPAIGNS = ("test_native_and_shadow_are_indistinguishable", "test_seeded_campaign",
             "test_the_seed_update_pte_bug_is_found")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name not in FIRST:
            return (2, 0)
        return (int(item.name.startswith(CAMPAIGNS)), FIRST.index(name))
    items.sort(key=rank)         # stable: the order within each group is kept


# Every audit point in the tests of the MMU, its audit, the vCPU and lockstep.  Elsewhere the
# VMs mostly boot the Linux-like guest: tens of thousands of exits, and an audit
# walks every spte of its direct map (~0.3 s for a 64 MB guest on this machine),
# so there every 4096th point (docs/design.md, Invariants).
FULL_AUDIT = ("test_mmu", "test_audit", "test_lockstep", "test_vcpu")
SAMPLE_INTERVAL = 4096


@pytest.fixture(autouse=True)
def audit_every_mmu(request, monkeypatch):
    """The audit points of every ShadowMMU built without an explicit ``audit=``
    (KVM's mmu_audit.c): a broken invariant fails the test at the exit where it
    breaks, not later where it shows."""
    every = True if request.path.name.startswith(FULL_AUDIT) else SAMPLE_INTERVAL
    monkeypatch.setattr(ShadowMMU, "audit_by_default", every)
    monkeypatch.setattr(TdpMMU, "audit_by_default", every)


@pytest.fixture(params=("dict", "mmap"))
def memory_backend(request):
    """A PhysicalMemory backend: the memory tests run on both, which must not differ in behaviour."""
    return request.param
