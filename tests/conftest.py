"""Run the shadow MMU's own tests first, the short named ones before the random
campaigns: a broken MMU then fails `make test` early, before the slower workload
and CLI tests have run (pytest-xdist hands tests to its workers in collection order)."""

FIRST = ("test_mmu_exits.py", "test_mmu_features.py", "test_audit_detects.py", "test_lockstep.py", "test_mmu_mutants.py")
CAMPAIGNS = ("test_native_and_shadow_are_indistinguishable", "test_seeded_campaign",
             "test_the_seed_update_pte_bug_is_found")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name not in FIRST:
            return (2, 0)
        return (int(item.name.startswith(CAMPAIGNS)), FIRST.index(name))
    items.sort(key=rank)         # stable: the order within each group is kept
