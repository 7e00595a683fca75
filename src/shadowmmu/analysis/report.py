"""Runs, comparisons and the kbuild prediction behind ``shadowmmu run`` and ``compare``.

Every number here says what it rests on:

- *exits per fault* is reported per case of the fault meter (``fault_meter.py``):
  ``steady`` (the pte's page table existed and stayed shadowed: the seed's case)
  apart from faults that needed a new table or met an unshadowed (flooded) one;
- *time* is the cost model (``costs.py``) with its one free parameter, the guest's
  work per user access, fitted per guest format, frames and preset on the default
  ``kbuild`` under ``zap`` to the kernel compile's published 484 s / 265 s.  The
  fitted values are shipped (``CALIBRATION``) and a test re-fits them;
- the *predicted speed-up* of ``update`` over ``zap`` on kbuild is the identity
  (1 - X_update/X_zap) x 219/484 (``costs.speedup_identity``): the fit cancels out,
  so the prediction is shown with its sensitivity to the exit mix instead -- a share
  of kernel-side exit cycles that ``update`` does not remove, cold frames, the price
  of CR-access/INVLPG exits, the other presets.
"""

from __future__ import annotations

from functools import lru_cache

from ..guest import GUEST_FORMATS, WORKLOADS
from ..guest.kernel import FRAMES, RESERVED_FRAMES
from ..mmu.policy import parse_policy
from ..vm import VM
from .costs import (
    CR_WORK, CR_WORK_RANGE, GUEST_WALK_LEVELS, KBUILD_NATIVE_S, KBUILD_SHADOW_S, KBUILD_SLOWDOWN,
    estimate, exit_cycles, extra_walk_refs, fit_work_per_access, get_preset, speedup_identity, with_cr_work,
)
from .run import run_workload

SCHEMA = 2                    # JSON output version (docs/json.md)
POLICIES = ("native", "zap", "update")
# compare --history: what KVM did after the seed, in order (issue 11).  zap: before the seed (3 exits
# per demand fault); update: the seed (2); +bypass: not-present guest faults skip the hypervisor (Sep
# 2007: 1); +unsync: out-of-sync leaf tables (2008), with either pte-write policy, to see how much of
# the seed's saving survives them; modern: KVM's pte-write path today (zap+unsync+prefetch), against
# the same with update; tdp: two-dimensional paging (EPT/NPT), shown at two TLB reaches.
HISTORY = ("native", "zap", "update", "update+bypass", "zap+unsync", "update+unsync", "update+bypass+unsync",
           "modern", "update+unsync+prefetch", "tdp")
DEFAULT_COMPARE = ("demand", "forkwait", "kbuild")
PAE_STORES = ("halves", "whole")
KERNEL_SIDE_SHARES = (0.25, 0.5)      # sensitivity: share of zap's exit cycles that update leaves alone

MAX_RAM_MB = {"32": 512, "pae": 512, "64": 65536}      # 32-bit guests: lowmem only; 64: the VM's limit


def guest_label(guest: str, pae_stores: str = "halves") -> str:
    """The guest format as tables print it: PAE with whole-pte stores is the labelled variant."""
    return "pae8" if guest == "pae" and pae_stores == "whole" else guest


def check_args(workload: str, guest: str, size=None, frames: str = "warm", pae_stores: str = "halves") -> None:
    """Every argument of a run, checked before anything boots (one clear ValueError)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    if guest not in GUEST_FORMATS:
        raise ValueError(f"unknown guest format {guest!r}; choose one of {', '.join(GUEST_FORMATS)}")
    if frames not in FRAMES:
        raise ValueError(f"unknown frames {frames!r}; choose one of {', '.join(FRAMES)}")
    if pae_stores not in PAE_STORES:
        raise ValueError(f"unknown PAE pte stores {pae_stores!r}; choose one of {', '.join(PAE_STORES)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"size must be a positive integer, got {size!r}")
    ram_for(workload, size, guest)


def ram_for(workload: str, size, guest: str) -> int:
    """Guest RAM in bytes for a run: the workload's usual RAM, more if its size needs
    it.  A size that cannot fit the largest guest of this format is refused here,
    before booting, with the largest size that fits."""
    spec = WORKLOADS[workload]
    size = spec.default_size if size is None else size
    frames = RESERVED_FRAMES + 64 + spec.pages(size)               # + bootmem page tables
    cap = MAX_RAM_MB[guest] << 8
    if frames > cap:
        lo, hi = 1, size
        while lo < hi:                                              # the largest size that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if RESERVED_FRAMES + 64 + spec.pages(mid) <= cap else (lo, mid - 1)
        raise ValueError(f"--size {size} does not fit: {workload} needs about {frames:,} frames of guest RAM, "
                         f"and a {guest} guest has at most {MAX_RAM_MB[guest]} MB ({cap:,} frames); the largest "
                         f"{workload} size that fits is {lo:,} {spec.unit}")
    mb = max(spec.ram_mb, -(-frames * 5 // 4 // 256))              # 25% headroom, whole MB
    return min(MAX_RAM_MB[guest], -(-mb // 4) * 4) << 20


def check_policy(policy: str) -> str:
    """The canonical name of a policy (``native`` included); one clear ValueError otherwise."""
    if policy == "native":
        return policy
    try:
        return parse_policy(policy).name
    except ValueError as e:
        raise ValueError(f"{e} (or native)") from None


def is_tdp(policy: str) -> bool:
    return policy != "native" and parse_policy(policy).tdp


def make_vm(policy: str, workload: str, size=None, guest: str = "64", *, tracing: bool = False,
            tlb_entries: int | None = None) -> VM:
    """A VM sized for the workload (see ``ram_for``); ``tlb_entries``: the vCPU TLB's capacity
    (the model's default when None)."""
    check_policy(policy)
    vm = VM(ram_for(workload, size, guest), policy=policy, pool_pages=4096, tracing=tracing)
    if tlb_entries is not None:
        for v in vm.vcpus:
            v.tlb.capacity = tlb_entries
    return vm


def simulate(workload: str, policy: str, guest: str, size=None, seed: int = 0, progress=None, *,
             frames: str = "warm", pae_stores: str = "halves", tlb_entries: int | None = None) -> dict:
    """One run of the guest workload on a fresh VM: the guest's result plus exits.
    Runs are deterministic, so each is done once per process (treat the result as read-only)."""
    check_args(workload, guest, size, frames, pae_stores)
    policy = check_policy(policy)
    key = (workload, policy, guest, size, seed, frames, pae_stores, tlb_entries)
    result = _RUNS.get(key)
    if result is None:
        vm = make_vm(policy, workload, size, guest, tlb_entries=tlb_entries)
        result = run_workload(vm, workload, guest=guest, size=size, seed=seed, progress=progress, frames=frames,
                              pae_halves=pae_stores == "halves")
        result["policy"] = policy
        _RUNS[key] = result
    elif progress is not None:
        progress(1.0)
    return result


_RUNS: dict[tuple, dict] = {}          # runs are deterministic: each is done once per process


def _per_fault(result: dict, kind: str) -> float | None:
    fe = result.get("fault_exits", {}).get(kind)
    if not fe or not fe.get("faults"):
        return None
    return fe["exits"] / fe["faults"]


def steady_text(pf: dict) -> str:
    """The steady-state exits per fault of a ``fault_cases`` result: an integer when
    every such fault cost the same, else their mean; "-" when there were none."""
    if pf["steady"] is None:
        return "-"
    hist = pf["steady_histogram"] or {}
    return str(next(iter(hist))) if len(hist) == 1 else f"{pf['steady']:.2f}"


def fault_cases(result: dict, kind: str) -> dict:
    """Exits per fault of one kind, split by what happened (see fault_meter.py):
    ``steady`` (mean over faults whose table existed and stayed shadowed) and
    ``other`` (every other fault: new table, unshadowed or flooded table)."""
    fe = (result.get("fault_exits") or {}).get(kind) or {}
    cases = fe.get("cases") or {}
    steady = cases.get("steady") or {"faults": 0, "exits": 0, "histogram": None, "by_reason": None}
    others = [c for name, c in cases.items() if name != "steady"]
    of = sum(c["faults"] for c in others)
    ox = sum(c["exits"] for c in others)
    return {"steady": steady["exits"] / steady["faults"] if steady["faults"] else None,
            "steady_faults": steady["faults"], "steady_histogram": steady["histogram"],
            "steady_by_reason": ({r: n / steady["faults"] for r, n in steady["by_reason"].items()}
                                 if steady["faults"] and steady["by_reason"] else None),
            "other": ox / of if of else None, "other_faults": of,
            "other_by_case": {name: c for name, c in cases.items() if name != "steady" and c["faults"]} or None}


# The fitted work per user access, cycles: {(guest, pae_stores, frames): {preset: w}}.
# Regenerate with ``python -m shadowmmu.analysis.report`` (tests/test_costs.py re-fits and compares).
CALIBRATION = {
    ('32', 'halves', 'warm'): {'p4-2006': 275.4510441799648, 'core2-2006': 228.4723882702196, 'modern': 66.53447814464265},
    ('32', 'halves', 'cold'): {'p4-2006': 291.06243637024414, 'core2-2006': 242.04871501014873, 'modern': 68.68977110429547},
    ('pae', 'halves', 'warm'): {'p4-2006': 369.23964978994456, 'core2-2006': 305.9558773414421, 'modern': 103.07245934006013},
    ('pae', 'halves', 'cold'): {'p4-2006': 385.27584418249313, 'core2-2006': 319.9016721777397, 'modern': 105.28615636277465},
    ('pae', 'whole', 'warm'): {'p4-2006': 288.58831990109996, 'core2-2006': 239.34711388341256, 'modern': 71.52894069979891},
    ('pae', 'whole', 'cold'): {'p4-2006': 304.62451429364853, 'core2-2006': 253.29290871971017, 'modern': 73.74263772251342},
    ('64', 'halves', 'warm'): {'p4-2006': 305.1023654665876, 'core2-2006': 253.1928258976858, 'modern': 76.79063096229727},
    ('64', 'halves', 'cold'): {'p4-2006': 321.5633620614054, 'core2-2006': 267.5080888303519, 'modern': 79.06273204807349},
}


@lru_cache(maxsize=None)
def fit_calibration(guest: str, preset_name: str, frames: str = "warm", pae_stores: str = "halves") -> float:
    """Fit the work per user access on the default kbuild under zap (see module doc)."""
    preset = get_preset(preset_name)
    r = simulate("kbuild", "zap", guest, frames=frames, pae_stores=pae_stores)
    ev = r["guest_events"]
    return fit_work_per_access(r["exits_during_workload"], ev["user_accesses"], _guest_faults(ev), preset)


def calibration(guest: str, preset_name: str, frames: str = "warm", pae_stores: str = "halves") -> dict:
    """The shipped fit for this guest format, frames and preset (fitted now if none is shipped)."""
    pae_stores = pae_stores if guest == "pae" else "halves"
    shipped = CALIBRATION.get((guest, pae_stores, frames), {}).get(preset_name)
    w = shipped if shipped is not None else fit_calibration(guest, preset_name, frames, pae_stores)
    return {"guest": guest, "pae_stores": pae_stores, "frames": frames, "preset": preset_name,
            "work_per_access": w, "shipped": shipped is not None,
            "fitted_to": f"kernel compile {KBUILD_SHADOW_S:.0f} s shadow / {KBUILD_NATIVE_S:.0f} s native "
                         f"(Adams & Agesen 2006) on the default kbuild, zap policy"}


def _guest_faults(ev: dict) -> int:
    return ev.get("demand_faults", 0) + ev.get("file_faults", 0) + ev.get("cow_faults", 0)


def priced_counts(r: dict, guest: str) -> dict:
    """What the cost model prices in a run beyond its exits: guest ptes re-read by unsync
    resyncs, and (tdp) the page-walk references beyond a native walk's n per TLB miss.
    The tdp MMU counts the references its 2-D walks read (``walk_refs``, plus the EPT
    walks that set a D bit, ``ept_d_assist_refs``); without those counters, each TLB miss
    (the vCPU TLB's) is taken as a full walk, n*m + n + m references."""
    stats = r.get("mmu_stats_during_workload") or {}
    tdp = is_tdp(r["policy"])
    if not tdp:
        return {"resynced_ptes": stats.get("resynced_ptes", 0), "tlb_misses": 0, "walk_refs": None,
                "extra_walk_refs": 0}
    misses = stats.get("tlb_misses", r.get("tlb_misses_during_workload", 0))
    refs = stats.get("walk_refs")
    if refs is None:
        extra = extra_walk_refs(guest, misses)
    else:
        refs += stats.get("ept_d_assist_refs", 0)
        extra = max(0, refs - GUEST_WALK_LEVELS[guest] * misses)
    return {"resynced_ptes": 0, "tlb_misses": misses, "walk_refs": refs, "extra_walk_refs": extra}


def run_report(workload: str, policy: str, guest: str, size=None, seed: int = 0, preset: str = "p4-2006",
               work_per_access: float | None = None, progress=None, *, frames: str = "warm",
               pae_stores: str = "halves", tlb_entries: int | None = None) -> dict:
    """What ``shadowmmu run`` prints or dumps as JSON (docs/json.md)."""
    p = get_preset(preset)
    policy = check_policy(policy)
    r = simulate(workload, policy, guest, size, seed, progress, frames=frames, pae_stores=pae_stores,
                 tlb_entries=tlb_entries)
    cal = None
    if work_per_access is None:
        cal = calibration(guest, preset, frames, pae_stores)
        work_per_access = cal["work_per_access"]
    ev = r["guest_events"]
    native = policy == "native"
    exits = {k: v for k, v in r["exits_during_workload"].items() if v} if not native else {}
    counts = priced_counts(r, guest)
    est = estimate(exits, ev["user_accesses"], _guest_faults(ev), p, work_per_access,
                   resynced_ptes=counts["resynced_ptes"], extra_walk_refs=counts["extra_walk_refs"])
    per_fault = {}
    for kind in ("demand", "cow"):
        c = fault_cases(r, kind)
        per_fault[kind] = {"mean": 0.0 if native else _per_fault(r, kind), **c}
    return {
        "schema": SCHEMA,
        "workload": workload, "policy": policy, "guest": guest,
        "pae_stores": pae_stores if guest == "pae" else None, "frames": frames,
        "size": r.get("size"), "seed": seed,
        "tlb_entries": r.get("tlb_entries"),
        "guest_events": ev,
        "exits": {"total": sum(exits.values()), "by_reason": exits or None,
                  "boot": {k: v for k, v in (r.get("boot_exits") or {}).items() if v} or None},
        "exits_per_fault": per_fault,
        "fault_exits": r.get("fault_exits"),
        "mmu_stats": r.get("mmu_stats_during_workload"),
        "priced_counts": counts,
        "estimate": {"preset": p.name, "work_per_access_cycles": work_per_access,
                     "calibration": cal,
                     "shadow": None if native else {"cycles": est["shadow_cycles"], "seconds": est["shadow_seconds"]},
                     "native": {"cycles": est["native_cycles"], "seconds": est["native_seconds"]},
                     "slowdown": None if native else est["slowdown"], "parts": est["parts"]},
        "memory_check": r.get("memory_check"),
        "tdp": r.get("tdp"),
    }


def prediction(guest: str, preset: str = "p4-2006", size=None, seed: int = 0, *, frames: str = "warm",
               pae_stores: str = "halves") -> dict:
    """The seed's claim as a prediction: kbuild (at this size and seed) under update vs
    zap, from the estimated times with the shipped fit.  On the default kbuild this is
    the identity (1 - X_update/X_zap)(1 - 1/s), s = 484/265, whatever the fitted value;
    its sensitivity is to the exit mix and its prices (each computed by the identity)."""
    p = get_preset(preset)

    def exits(pol, fr=frames):
        return simulate("kbuild", pol, guest, size, seed, frames=fr, pae_stores=pae_stores)["exits_during_workload"]

    def x_pair(pr=p, fr=frames):
        return exit_cycles(exits("zap", fr), pr), exit_cycles(exits("update", fr), pr)

    xz, xu = x_pair()
    identity = speedup_identity(xz, xu)
    # the prediction: estimated times with the work fitted on the default kbuild.  On the
    # default kbuild itself (the fitted run) it equals the identity exactly.
    w = calibration(guest, preset, frames, pae_stores)["work_per_access"]
    times = {}
    for pol in ("zap", "update"):
        ev = simulate("kbuild", pol, guest, size, seed, frames=frames, pae_stores=pae_stores)["guest_events"]
        times[pol] = estimate(exits(pol), ev["user_accesses"], _guest_faults(ev), p, w)["shadow_cycles"]
    predicted = 1 - times["update"] / times["zap"]
    sens = {}
    for share in KERNEL_SIDE_SHARES:
        k = share / (1 - share) * xz            # kernel-side exit cycles both policies pay
        sens[f"kernel_side_{round(share * 100)}pct"] = speedup_identity(xz + k, xu + k)
    other_frames = "cold" if frames == "warm" else "warm"
    sens[f"frames_{other_frames}"] = speedup_identity(*x_pair(fr=other_frames))
    for cw in CR_WORK_RANGE:
        if cw != CR_WORK:
            sens[f"cr_invlpg_work_{cw:.0f}"] = speedup_identity(*x_pair(with_cr_work(p, cw)))
    for other in ("p4-2006", "core2-2006", "modern"):
        if other != preset:
            sens[f"preset_{other}"] = speedup_identity(*x_pair(get_preset(other)))
    return {"guest": guest, "pae_stores": pae_stores if guest == "pae" else None, "frames": frames,
            "size": size, "seed": seed, "preset": preset,
            "predicted_update_speedup": predicted, "work_per_access": w,
            "identity": "(1 - X_update/X_zap) x (1 - 265/484), X the priced exit cycles: the fitted work per "
                        "access cancels out (exact on the run the work is fitted on, the default kbuild)",
            "identity_speedup": identity,
            "x_zap_cycles": xz, "x_update_cycles": xu, "x_ratio": xu / xz,
            "slowdown_fitted_to": KBUILD_SLOWDOWN,
            "sensitivity": sens,
            "exits": {pol: sum(exits(pol).values()) for pol in ("zap", "update")}}


def _regenerate_calibration() -> None:
    """Print CALIBRATION for every guest format, PAE store and frames (a few minutes)."""
    print("CALIBRATION = {")
    for guest in GUEST_FORMATS:
        for stores in (PAE_STORES if guest == "pae" else ("halves",)):
            for frames in FRAMES:
                fits = {pr: fit_calibration(guest, pr, frames, stores) for pr in ("p4-2006", "core2-2006", "modern")}
                print(f"    ({guest!r}, {stores!r}, {frames!r}): {fits!r},")
    print("}")


if __name__ == "__main__":
    _regenerate_calibration()
