"""pte prefetch (KVM 2010, FNAME(pte_prefetch)): on a fault that installs a leaf,
the other ptes of its aligned group of 8 that are present, accessed and free of
reserved bits are mapped too; a clean one read-only; nothing else."""

import pytest

from shadowmmu.guest.minimal import USER_BASE, A, D, MiniGuest, P, U, W
from shadowmmu.mmu.policy import MmuPolicy, parse_policy
from shadowmmu.mmu.spte import SPTE_P, SPTE_W
from shadowmmu.vm import VM

FRAME = 0x300                      # guest frames the ptes point at (inside the minimal guest's RAM)


def setup(guest: str, prefetch: int, ptes: dict[int, int]):
    """A minimal guest whose user table holds ``ptes`` (index -> flags) before any fault."""
    vm = VM(16 << 20, prefetch=prefetch)
    g = MiniGuest(vm, guest)
    v = vm.vcpu
    for i, flags in ptes.items():
        v.store(g.pte_addr(USER_BASE + i * 4096), ((FRAME + i) << 12) | flags, g.esz)
    return vm, g, v


def spte_of(vm, g, va):
    """The leaf spte mapping va (0 if none), read from the shadow tables."""
    from shadowmmu.x86.faults import PageFault
    from shadowmmu.x86.walker import translate
    try:
        t = translate(vm.host, vm.vcpu.hw, va, 0, set_ad=False)
        return t.entries[-1][2]
    except PageFault as pf:
        return pf.entries[-1][2] if pf.entries and pf.entries[-1][0] == 1 else 0


RSVD_64 = 1 << 51                  # above MAXPHYADDR 40: reserved in a PAE/4-level pte


@pytest.mark.parametrize("guest", ["32", "pae", "64"])
def test_prefetch_maps_the_accessed_neighbours_of_the_group_only(guest):
    wide = guest != "32"
    ptes = {8: P | W | U | A | D,          # the faulting one (group 8..15)
            9: P | W | U | A | D,          # accessed, dirty: writable
            10: P | W | U | A,             # accessed, clean: read-only (the first write must set D)
            11: P | W | U,                 # never accessed: left to fault (its A must be set by an access)
            12: W | U | A,                 # not present
            15: P | U | A | D,             # read-only in the guest
            16: P | W | U | A | D}         # the next group: not touched
    if wide:
        ptes[13] = P | W | U | A | D | RSVD_64     # a reserved bit: must fault with RSVD, never be mapped
    vm, g, v = setup(guest, 8, ptes)
    v.set_cpl(3)
    before = vm.mmu.stats["prefetched"]          # the kernel's own faults prefetch too
    v.load(USER_BASE + 8 * 4096, 8)
    prefetched = vm.mmu.stats["prefetched"] - before
    s = {i: spte_of(vm, g, USER_BASE + i * 4096) for i in range(8, 17)}
    assert s[9] & SPTE_P and s[9] & SPTE_W and (s[9] >> 12) == vm.gmem.gfn_to_pfn(FRAME + 9)
    assert s[10] & SPTE_P and not s[10] & SPTE_W
    assert not s[11] & SPTE_P and not s[12] & SPTE_P and not s[16] & SPTE_P
    assert s[15] & SPTE_P and not s[15] & SPTE_W
    assert prefetched == 3
    vm.audit()
    if wide:
        assert not s[13] & SPTE_P
        v.load(USER_BASE + 13 * 4096, 8)          # the guest sees its RSVD fault (user read, present)
        assert g.handled[-1] == (USER_BASE + 13 * 4096, 0x8 | 0x4 | 0x1)
    # a prefetched page costs no exit on its first access; a clean one exits on its first write
    exits = vm.events.total_exits
    v.load(USER_BASE + 9 * 4096, 8)
    v.load(USER_BASE + 10 * 4096, 8)
    assert vm.events.total_exits == exits
    v.store(USER_BASE + 10 * 4096, 1, 8)
    assert vm.events.exits["pf_fixed"] >= 1 and vm.events.total_exits == exits + 1
    vm.audit()


def test_without_prefetch_each_neighbour_faults_once():
    ptes = {i: P | W | U | A | D for i in range(8)}
    for prefetch, expected in ((0, 8), (8, 1)):
        vm, g, v = setup("64", prefetch, ptes)
        v.set_cpl(3)
        before = vm.events.exits["pf_fixed"]
        for i in range(8):
            v.load(USER_BASE + i * 4096, 8)
        assert vm.events.exits["pf_fixed"] - before == expected


def test_prefetch_takes_the_inherited_rights():
    """A pte under a supervisor-only PDE is mapped supervisor-only, whatever its own U."""
    vm, g, v = setup("64", 8, {0: P | W | U | A | D, 1: P | W | U | A | D})
    pde = g.pte_addr(USER_BASE)          # the table exists; find its PDE and drop U there
    table_va = USER_BASE
    # the PDE is the level-2 entry of USER_BASE: rewrite it without U through the walk
    from shadowmmu.x86.walker import translate
    t = translate(vm.gmem, v.guest, table_va, 0, set_ad=False)
    pde_addr, pde_val = t.entries[-2][1], t.entries[-2][2]
    v.store(pde_addr, pde_val & ~U, 8)
    before = vm.mmu.stats["prefetched"]
    v.load(USER_BASE, 8)                 # supervisor access: allowed, installs 0 and prefetches 1
    assert vm.mmu.stats["prefetched"] - before == 1
    assert spte_of(vm, g, USER_BASE + 4096) & SPTE_P and not spte_of(vm, g, USER_BASE + 4096) & U
    vm.audit()
    del pde


def test_policy_names():
    assert parse_policy("update+prefetch") == MmuPolicy("update", 8)
    assert parse_policy("zap+prefetch4") == MmuPolicy("zap", 4)
    assert parse_policy("zap") == MmuPolicy("zap", 0)
    assert parse_policy("prefetch+zap".split("+")[1] + "+unsync+prefetch") == parse_policy("modern")
    assert parse_policy("modern").label == "modern (zap+unsync+prefetch)"
    assert parse_policy("update+prefetch2+bypass").name == "update+bypass+prefetch2"
    assert parse_policy("tdp").tdp and parse_policy("tdp").name == "tdp"
    for bad in ("update+bogus", "swap", "update+prefetch3", "zap+unsync+unsync", "update+prefetchx"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    with pytest.raises(ValueError):
        VM(16 << 20, prefetch=3)
    assert VM(16 << 20, policy="update+prefetch").policy == "update+prefetch"
    assert VM(16 << 20, policy="zap+prefetch16").policy == "zap+prefetch16"


def test_compare_has_a_prefetch_row(capsys, monkeypatch):
    import json

    from shadowmmu.cli import main
    from shadowmmu.mmu.mmu import ShadowMMU
    monkeypatch.setattr(ShadowMMU, "audit_by_default", 4096)     # whole guest boots: sampled, as in test_cli
    assert main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "cold", "--prefetch",
                 "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    assert [r["policy"] for r in reports] == ["native", "zap", "update", "update+prefetch"]
    # a demand fault writes one pte: its neighbours are never present yet, nothing to prefetch
    assert reports[3]["exits"] == reports[2]["exits"]
