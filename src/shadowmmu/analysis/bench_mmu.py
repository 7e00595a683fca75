"""``shadowmmu bench mmu``: demand faults and warm accesses per second.

A demand fault is the full cycle: the user access, its VM exits (shadow), the
guest's fault handler writing the pte with guest stores, and the retried access.
Warm accesses run on pages already mapped: TLB hits, and TLB misses (the hardware
TLB is emptied before every access -- as by eviction, not by a guest flush, which
exits under +unsync -- so each one walks the shadow -- or, natively,
the guest's; under tdp, the guest's and the second dimension's -- tables in
hardware, without an exit).

One row per policy: native, zap, update and tdp by default, or what KVM did after the seed
(``HISTORY``: +bypass, +unsync, modern, tdp) when this build's VM runs them.
"""

from __future__ import annotations

import time

from ..guest.minimal import USER_BASE, MiniGuest
from ..vm import VM

POLICIES = ("native", "zap", "update", "tdp")
HISTORY = ("native", "zap", "update", "update+bypass", "zap+unsync", "update+unsync", "modern", "tdp")


def _vm(policy: str, guest: str, pages: int):
    vm = VM(max(64 << 20, (pages + 8192) << 12), policy=policy, pool_pages=4096)
    g = MiniGuest(vm, guest, kernel_frames=pages + pages // 256 + 0x400)
    vm.vcpu.set_cpl(3)
    return vm, g


def _demand_faults(policy: str, guest: str, pages: int):
    """A fresh VM, ``pages`` demand faults; returns (vm, faults per second)."""
    vm, g = _vm(policy, guest, pages)
    store = vm.vcpu.store
    t0 = time.perf_counter()
    for i in range(pages):
        store(USER_BASE + (i << 12), i, 8)
    return vm, pages / (time.perf_counter() - t0)


def bench_mmu(guest: str = "64", pages: int = 4000, warm_rounds: int = 30, repeat: int = 3,
              policies=POLICIES) -> list[dict]:
    """Per policy: the median of ``repeat`` demand-fault runs, then warm accesses on the last VM."""
    rows = []
    for policy in policies:
        runs = [_demand_faults(policy, guest, pages) for _ in range(repeat)]
        faults_s = sorted(r for _, r in runs)[len(runs) // 2]
        vm = runs[-1][0]
        v = vm.vcpu
        load = v.load
        exits = vm.events.total_exits
        by_reason = {r: n for r, n in sorted(vm.events.exits.items()) if n}
        vas = [USER_BASE + (i << 12) + 8 * (i & 7) for i in range(pages)]
        t0 = time.perf_counter()
        for _ in range(warm_rounds):
            for va in vas:
                load(va, 8)
        hit_s = pages * warm_rounds / (time.perf_counter() - t0)
        inv = v.tlb.flush          # a capacity miss, not a guest flush (which exits under +unsync)
        n_miss = min(pages, 2000) * 5
        t0 = time.perf_counter()
        for r in range(5):
            for va in vas[:2000]:
                inv()
                load(va, 8)
        miss_s = n_miss / (time.perf_counter() - t0)
        assert vm.events.total_exits == exits, "warm accesses must not exit"
        for i in range(0, pages, 97):
            assert load(USER_BASE + (i << 12), 8) == i
        rows.append({"policy": vm.policy, "guest": guest, "demand_faults_per_s": faults_s,
                     "tlb_hit_per_s": hit_s, "tlb_miss_per_s": miss_s,
                     "exits_per_fault": exits / pages if policy != "native" else 0.0,
                     "exits_by_reason": by_reason or None})
    return rows
