"""Running a workload: boot the guest kernel on a VM, run the workload, and measure what it cost.

The guest (``shadowmmu.guest``) only runs: it counts its own events (faults by
kind, forks, pte writes, ...) and never reads a hypervisor counter.  This module
is the harness around it: it reads the VM's exit counters before and after the
workload (boot's exits are reported apart), attaches the fault meter
(``fault_meter.py``: VM exits per guest page fault, by kind and case) and puts
the guest's and the VM's figures in one result (docs/json.md lists its keys).
"""

from __future__ import annotations

import time

from ..guest import WORKLOADS, boot, guest_paging
from .fault_meter import FaultMeter


def run_workload(vm, workload: str, guest: str = "64", size: int | None = None, seed: int = 0,
                 progress=None, **kwargs) -> dict:
    """Boot, run ``workload`` to completion, and report what the guest did and what it cost.
    ``progress(fraction)`` is called as the workload's processes exit; with warm frames
    also ``progress(fraction, "boot: zeroing RAM")`` during boot and ``progress(0.0, None)``
    when the workload starts."""
    try:
        w = WORKLOADS[workload]
    except KeyError:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}") from None
    guest = guest_paging(guest).name          # accepts 64 as well as "64"; one clear error otherwise
    size = w.default_size if size is None else int(size)
    if size < 1:
        raise ValueError(f"workload size must be at least 1, got {size}")
    t0 = time.perf_counter()
    if progress is not None and kwargs.get("frames", "warm") == "warm":
        kwargs["boot_progress"] = lambda frac: progress(frac, "boot: zeroing RAM")
    k = boot(vm, guest, seed, **kwargs)
    t1 = time.perf_counter()
    exits0 = dict(vm.events.exits)           # boot's exits, reported apart
    mmu = vm.mmu
    stats0 = dict(mmu.stats) if mmu is not None else {}
    tlb0 = sum(v.tlb.misses for v in vm.vcpus)
    walks0 = _tdp_walks(vm)
    meter = FaultMeter.attach(k)
    nexit = w.setup(k, size, seed)
    if progress is not None:
        progress(0.0, None)
    k.run(progress, nexit)
    t2 = time.perf_counter()
    if progress is not None:
        progress(1.0)
    ev = k.events
    after = vm.events.exits
    reasons = sorted(set(after) | set(exits0))
    during = {r: after.get(r, 0) - exits0.get(r, 0) for r in reasons}
    accesses = ev["user_accesses"] + ev["kernel_accesses"]
    stats = ({k: n - stats0.get(k, 0) for k, n in mmu.stats.items() if isinstance(n, int)}
             if mmu is not None else None)
    return {
        "workload": workload,
        "guest": k.guest,
        "policy": vm.policy,
        "size": size,
        "seed": seed,
        "guest_events": dict(ev),
        "fault_exits": meter.report(),
        "exits_during_workload": during,
        "total_exits_during_workload": sum(during.values()),
        "boot_exits": {r: n for r, n in sorted(exits0.items())},
        "mmu_stats_during_workload": stats or None,          # MMU counters (resyncs, 2-D walks, ...)
        "tlb_misses_during_workload": sum(v.tlb.misses for v in vm.vcpus) - tlb0,
        "tlb_entries": vm.vcpus[0].tlb.capacity if vm.vcpus else None,
        "boot": {"frames": k.nframes, "pages_zeroed": k.boot_pages_zeroed, "seconds": round(t1 - t0, 3)},
        "frames": {"free_after_boot": k.boot_free, "free_at_end": k.nr_free(),
                   "page_cache": len(k.page_cache)},
        "segfaults": list(k.segfaults),
        "memory_check": "ok",
        "seconds": round(t2 - t1, 3),
        "accesses": accesses,
        "accesses_per_second": round(accesses / (t2 - t1)) if t2 > t1 else None,
        "tdp": _tdp_delta(walks0, _tdp_walks(vm)),
    }


_TDP_COUNTS = ("tlb_misses", "walk_refs", "complete_walks", "complete_walk_refs", "ept_violations", "ept_zaps")


def _tdp_walks(vm) -> dict | None:
    """Two-dimensional paging: the 2-D walk counters (mmu/tdp.py), None otherwise."""
    mmu = vm.mmu
    if mmu is None or not getattr(mmu, "tdp", False):
        return None
    s = mmu.stats
    return {k: s[k] for k in (*_TDP_COUNTS, "ept_pages")}


def _tdp_delta(before: dict | None, after: dict | None) -> dict | None:
    """The workload's share of the 2-D walks (boot excluded): TLB misses (walks started,
    EPT violations restart them), entries read, and per complete walk n*m + n + m with
    no paging-structure caches (the worst case); ept_pages is the EPT's size at the end."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in _TDP_COUNTS}
    d["refs_per_miss"] = d["complete_walk_refs"] / d["complete_walks"] if d["complete_walks"] else None
    d["ept_pages"] = after["ept_pages"]
    return d
