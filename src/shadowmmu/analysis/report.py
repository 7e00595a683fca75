"""Runs, comparisons and the calibrated prediction behind ``shadowmmu run`` and ``compare``.

The free parameter of the cost model (guest work per user access) is fitted,
per guest format and preset, on the default ``kbuild`` under the ``zap`` policy
-- KVM before the seed, trap-and-emulate shadow paging like the 2006 hardware
measurements -- to the published kernel-compile slowdown (484 s / 265 s).  The
``update`` policy's speed-up is then predicted, not fitted, and its sensitivity
to the fitted parameter is shown.
"""

from __future__ import annotations

from functools import lru_cache

from ..guest import GUEST_FORMATS, WORKLOADS, run_workload
from ..vm import VM
from .costs import KBUILD_NATIVE_S, KBUILD_SHADOW_S, estimate, fit_work_per_access, get_preset

POLICIES = ("native", "zap", "update")
DEFAULT_COMPARE = ("demand", "forkwait", "kbuild")


MAX_RAM_MB = {"32": 512, "pae": 512, "64": 8192}      # 32-bit guests: lowmem only


def make_vm(policy: str, workload: str, size=None, guest: str = "64", *, tracing: bool = False) -> VM:
    """A VM sized for the workload: the guest zeroes all its RAM at boot, so no more
    than the workload wants (scaled with its size; 32-bit and PAE guests at most
    512 MB of lowmem)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    spec = WORKLOADS[workload]
    scale = 1 if size is None else max(1, -(-size // spec.default_size))
    ram_mb = min(MAX_RAM_MB[guest], spec.ram_mb * scale)
    return VM(ram_mb << 20, native=policy == "native", pte_write="update" if policy == "native" else policy,
              pool_pages=4096, tracing=tracing)


def _check_args(workload: str, guest: str, size) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    if guest not in GUEST_FORMATS:
        raise ValueError(f"unknown guest format {guest!r}; choose one of {', '.join(GUEST_FORMATS)}")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ValueError(f"size must be a positive integer, got {size!r}")


def simulate(workload: str, policy: str, guest: str, size=None, seed: int = 0, progress=None) -> dict:
    """One run of the guest workload on a fresh VM: the guest's result plus exits.
    Runs are deterministic, so each is done once per process (treat the result as read-only)."""
    _check_args(workload, guest, size)
    key = (workload, policy, guest, size, seed)
    result = _RUNS.get(key)
    if result is None:
        vm = make_vm(policy, workload, size, guest)
        result = run_workload(vm, workload, guest=guest, size=size, seed=seed, progress=progress)
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


def _typical(result: dict, kind: str) -> int | None:
    """The most common number of exits per fault of this kind (the steady state)."""
    fe = result.get("fault_exits", {}).get(kind)
    if not fe or not fe.get("histogram"):
        return None
    hist = {int(k): v for k, v in fe["histogram"].items()}
    return max(hist, key=lambda k: (hist[k], -k))


@lru_cache(maxsize=None)
def calibration(guest: str, preset_name: str) -> dict:
    """Fit the work per user access on the default kbuild under zap (see module doc)."""
    preset = get_preset(preset_name)
    r = simulate("kbuild", "zap", guest)
    ev = r["guest_events"]
    faults = ev.get("demand_faults", 0) + ev.get("file_faults", 0) + ev.get("cow_faults", 0)
    w = fit_work_per_access(r["exits_during_workload"], ev["user_accesses"], faults, preset)
    return {"guest": guest, "preset": preset_name, "work_per_access": w,
            "fitted_to": f"kernel compile {KBUILD_SHADOW_S:.0f} s shadow / {KBUILD_NATIVE_S:.0f} s native "
                         f"(Adams & Agesen 2006) on kbuild, zap policy"}


def run_report(workload: str, policy: str, guest: str, size=None, seed: int = 0, preset: str = "p4-2006",
               work_per_access: float | None = None, progress=None) -> dict:
    """What ``shadowmmu run`` prints or dumps as JSON."""
    p = get_preset(preset)
    r = simulate(workload, policy, guest, size, seed, progress)
    cal = None
    if work_per_access is None:
        cal = calibration(guest, preset)
        work_per_access = cal["work_per_access"]
    ev = r["guest_events"]
    faults = ev.get("demand_faults", 0) + ev.get("file_faults", 0) + ev.get("cow_faults", 0)
    exits = r["exits_during_workload"] if policy != "native" else {}
    est = estimate(exits, ev["user_accesses"], faults, p, work_per_access)
    return {
        "workload": workload, "policy": policy, "guest": guest, "size": r.get("size"), "seed": seed,
        "guest_events": ev,
        "exits": {"total": sum(exits.values()), "by_reason": exits, "boot": r.get("boot_exits")},
        "exits_per_demand_fault": _per_fault(r, "demand") if policy != "native" else 0.0,
        "exits_per_cow_fault": _per_fault(r, "cow") if policy != "native" else 0.0,
        "typical_exits_per_demand_fault": _typical(r, "demand"),
        "typical_exits_per_cow_fault": _typical(r, "cow"),
        "fault_exits": r.get("fault_exits"),
        "estimate": {"preset": p.name, "work_per_access_cycles": work_per_access,
                     "calibration": cal,
                     "shadow": {"cycles": est["shadow_cycles"], "seconds": est["shadow_seconds"]},
                     "native": {"cycles": est["native_cycles"], "seconds": est["native_seconds"]},
                     "slowdown": est["slowdown"], "parts": est["parts"]},
        "memory_check": r.get("memory_check"),
    }


def prediction(guest: str, preset: str = "p4-2006") -> dict:
    """The seed's claim as a prediction: kbuild time under update vs zap, with the
    fitted parameter and its sensitivity (x0.5, x2, and fits to other presets)."""
    cal = calibration(guest, preset)
    p = get_preset(preset)
    runs = {pol: simulate("kbuild", pol, guest) for pol in ("zap", "update")}

    def times(w: float, pr=p):
        out = {}
        for pol, r in runs.items():
            ev = r["guest_events"]
            faults = ev.get("demand_faults", 0) + ev.get("file_faults", 0) + ev.get("cow_faults", 0)
            out[pol] = estimate(r["exits_during_workload"], ev["user_accesses"], faults, pr, w)["shadow_cycles"]
        return out

    def speedup(t):
        return 1 - t["update"] / t["zap"]

    w = cal["work_per_access"]
    sens = {f"work x{k}": speedup(times(w * k)) for k in (0.5, 1, 2)}
    for other in ("core2-2006", "modern"):
        wo = calibration(guest, other)["work_per_access"]
        sens[f"preset {other}"] = speedup(times(wo, get_preset(other)))
    return {"guest": guest, "preset": preset, "work_per_access": w, "predicted_update_speedup": sens["work x1"],
            "sensitivity": sens,
            "exits": {pol: sum(r["exits_during_workload"].values()) for pol, r in runs.items()}}
