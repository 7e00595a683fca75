"""A cost model: time = Σ count × cost, for shadow paging and for native paging.

Per-event costs come from published measurements (``docs/sources.md`` cites
each: Adams & Agesen, ASPLOS 2006; the PVM paper, SOSP 2023).  Exactly one
parameter is free: the cycles of ordinary guest work per simulated memory access
(``work_per_access``), which stands for everything the model does not simulate
instruction by instruction.  It may be *fitted* to one published figure -- by
default the kernel compile of Adams & Agesen (ASPLOS 2006, Pentium 4): 265 s
native, 484 s under VT-x shadow paging -- and then every other number, above all
the speed-up of the seed's ``update`` policy over ``zap``, is a *prediction*.
Nothing here is tuned to reproduce the seed's "about 10%".

Costs of an exit are the full round trip (exit + hypervisor work + entry).  An
injected #PF costs its exit on top of what the guest's own fault handling costs
natively (``guest_pf``), which both sides pay.

Not every price has a source.  The 2006 paper measures the round trip of a #PF
exit and the cost of trapped pte writes and faults, but not a CR3-write or INVLPG
exit: for those (``cr_access``, ``invlpg``) the 2006 presets charge the measured
round trip plus ``CR_WORK`` cycles of hypervisor work -- an *assumption*, labelled
as such in every preset, whose effect the prediction shows by re-pricing with 0
and with a pte write's emulation work (``CR_WORK_RANGE``).

With time = work + exits and the work fitted so that shadow/native equals the
published slowdown s, the predicted speed-up of one policy over another is an
identity: 1 - T_b/T_a = (1 - 1/s)(1 - X_b/X_a), X the priced exit cycles.  The
fitted work cancels out (``speedup_identity``); only the exit mix and its prices
carry information.

Beyond the seed (issue 11) the model prices three more things, each from the
run's own counters and never by another reason's price:

- exits the later policies add (``invlpg`` under out-of-sync shadows,
  ``ept_violation`` under two-dimensional paging); a reason with no price is an
  error (``exit_cost`` raises), never a silent fallback;
- ``resync_pte``: the hypervisor's work per guest pte re-read when an out-of-sync
  page is resynced (the MMU's ``resynced_ptes``), an ASSUMPTION;
- ``walk_ref``: one memory reference of a hardware page walk.  Native and shadow
  walks have the guest's depth n and are part of the fitted work; a 2-D walk
  (EPT/NPT, m = 4 levels) makes n*m + n + m references, so tdp pays
  ``(n*m + m) * walk_ref`` more per TLB miss (``extra_walk_refs``).  How many TLB
  misses there are depends on the TLB's reach, a modelling choice shown with both
  values (``TLB_REACH``).

A guest fault that bypasses the hypervisor (``+bypass``; every guest fault under
tdp) is no exit: it costs ``guest_pf``, like a native one, which both sides pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class CostPreset:
    name: str
    description: str
    hz: float                       # cycles per second, to turn cycles into seconds
    guest_pf: float                 # a guest page fault handled natively (delivery + handler)
    exit_costs: dict                # exit reason -> cycles of the round trip incl. hypervisor work
    sources: tuple = field(default=())
    resync_pte: float = 0.0         # hypervisor cycles per guest pte re-read by an unsync resync
    walk_ref: float = 0.0           # cycles per memory reference of a hardware page walk
    basis: dict = field(default_factory=dict)     # price name -> what it rests on (source or ASSUMPTION)

    def exit_cost(self, reason: str) -> float:
        try:
            return self.exit_costs[reason]
        except KeyError:
            raise ValueError(f"cost preset {self.name!r} has no price for VM exit reason {reason!r}: add one, "
                             "with its source, to analysis/costs.py and docs/sources.md") from None


# Adams & Agesen, "A Comparison of Software and Hardware Techniques for x86
# Virtualization", ASPLOS 2006 (Pentium 4 672, 3.8 GHz; Core 2 Duo 2.66 GHz):
#   VM entry / #PF VM exit: P4 2409 / 1931 cycles, Core 2 937 / 1186 cycles;
#   true guest #PF: native 1093, VT-x shadow 11242 cycles;
#   trapped pte write (VT-x) 12733 cycles, not-present -> present 17020 cycles.
_P4_ROUND_TRIP = 2409 + 1931
_C2_ROUND_TRIP = 937 + 1186
# Hypervisor software work per event, in P4 cycles, from the totals above:
_INJECT_WORK = 11242 - 1093 - _P4_ROUND_TRIP      # walk guest tables, queue the #PF (5809)
_PTE_WRITE_WORK = 12733 - _P4_ROUND_TRIP          # decode, emulate, update shadow (8393)
_FIX_WORK = 17020 - _P4_ROUND_TRIP                 # walk, build the shadow path, install (12680)


# ASSUMPTION (no published figure): the hypervisor work of a CR3-write or INVLPG exit.
CR_WORK = 500
CR_WORK_RANGE = (0, CR_WORK, _PTE_WRITE_WORK)      # shown as sensitivity: bare round trip .. emulation


# ASSUMPTION (no published figure): hypervisor cycles per guest pte an out-of-sync resync re-reads
# (KVM's sync_page reads the guest pte, checks it and rewrites the spte).  Shown as sensitivity.
RESYNC_PTE = 200
RESYNC_PTE_RANGE = (0, RESYNC_PTE, 1000)
# ASSUMPTION: cycles per memory reference of a hardware page walk (a cache hit; the model has no
# caches).  [BSSM08] measures a 2-D walk at 3.9-4.6x a native walk's latency, not the cycles of one.
WALK_REF = 20
WALK_REF_RANGE = (5, WALK_REF, 100)
EPT_LEVELS = 4                      # m: the second dimension's depth (4-level EPT/NPT)
# The guest walk's depth n per guest format: a 32-bit walk reads 2 levels; PAE's PDPTEs are loaded
# at CR3 load (SDM 4.4.1; with EPT too), so its walks read 2; 4-level paging reads 4.
GUEST_WALK_LEVELS = {"32": 2, "pae": 2, "64": 4}
# TLB reach: a modelling choice that changes the tdp figure, always shown with both values.
MODEL_TLB_ENTRIES = 1 << 16         # the model's TLB (x86/tlb.py): misses are rare in its runs
REAL_TLB_ENTRIES = 1536             # a Skylake-class second-level TLB (STLB), 4 KB entries
TLB_REACH = {"model": MODEL_TLB_ENTRIES, "stlb": REAL_TLB_ENTRIES}


def walk_refs_2d(n: int, m: int = EPT_LEVELS) -> int:
    """Memory references of a full 2-D walk [BSSM08]: each of the n guest entries and the final
    gpa takes an m-level walk of the second dimension, plus the n guest entries themselves."""
    return n * m + n + m


def extra_walk_refs(guest: str, tlb_misses: int) -> int:
    """References a tdp run makes beyond a native walk's n per TLB miss: (n*m + m) each."""
    n = GUEST_WALK_LEVELS[guest]
    return tlb_misses * (walk_refs_2d(n) - n)


def _adams_agesen(round_trip: float, cr_work: float = CR_WORK) -> dict:
    return {"pf_fixed": round_trip + _FIX_WORK, "pf_injected": round_trip + _INJECT_WORK,
            "pte_write": round_trip + _PTE_WRITE_WORK, "mmio": round_trip + _PTE_WRITE_WORK,
            "emulate": round_trip + _PTE_WRITE_WORK, "cr_access": round_trip + cr_work,
            "invlpg": round_trip + cr_work, "msr": round_trip + cr_work, "io": round_trip + _PTE_WRITE_WORK,
            "ept_violation": round_trip + _FIX_WORK}


def _basis_2006(machine: str, round_trip: int) -> dict:
    """What each price of a 2006 preset rests on ([AA06] = Adams & Agesen, ASPLOS 2006)."""
    rt = f"the {machine} round trip {round_trip} cycles [AA06]"
    return {
        "guest_pf": "[AA06] true guest #PF natively, 1093 cycles; also a bypassed guest fault (no exit) and "
                    "every guest fault under tdp",
        "pf_fixed": "ASSUMPTION: a hidden #PF costs [AA06]'s not-present->present pte update, 17020 P4 cycles: "
                    f"{rt} + 12680",
        "pf_injected": f"[AA06] VT-x true guest #PF 11242 - native 1093: {rt} + 5809",
        "pte_write": f"[AA06] trapped pte write 12733 P4 cycles: {rt} + 8393",
        "mmio": f"ASSUMPTION: an MMIO exit decodes and emulates like [AA06]'s pte write: {rt} + 8393",
        "emulate": f"ASSUMPTION: an emulated access costs [AA06]'s pte write: {rt} + 8393",
        "cr_access": f"ASSUMPTION: {rt} + {CR_WORK} (no published figure; re-priced +0 / +8393 as sensitivity)",
        "invlpg": f"ASSUMPTION: {rt} + {CR_WORK}, as a CR3 write (no published figure); an unsync resync's work "
                  "is priced apart (resync_pte)",
        "msr": f"ASSUMPTION: {rt} + {CR_WORK}, as a CR3 write (the real vCPU only)",
        "io": f"ASSUMPTION: {rt} + 8393, decoded like a pte write; a real port exit to a user-space device "
              "model costs more (the real vCPU only)",
        "ept_violation": f"ASSUMPTION: as a hidden shadow #PF, {rt} + 12680 (2006 CPUs had no EPT: what-if)",
        "resync_pte": f"ASSUMPTION: {RESYNC_PTE} cycles per guest pte re-read (no published figure; "
                      f"{RESYNC_PTE_RANGE[0]} / {RESYNC_PTE_RANGE[2]} as sensitivity)",
        "walk_ref": f"ASSUMPTION: {WALK_REF} cycles per page-walk memory reference (a cache hit); 2-D walk = "
                    "n*m+n+m references [BSSM08]",
    }


def with_cr_work(preset: CostPreset, cr_work: float) -> CostPreset:
    """The preset with CR-access and INVLPG exits re-priced at round trip + ``cr_work``
    (2006 presets only: the modern preset prices them from PVM's measured round trip)."""
    if preset.name not in ("p4-2006", "core2-2006"):
        return preset
    rt = _P4_ROUND_TRIP if preset.name == "p4-2006" else _C2_ROUND_TRIP
    costs = dict(preset.exit_costs, cr_access=rt + cr_work, invlpg=rt + cr_work)
    return replace(preset, name=f"{preset.name}, CR/INVLPG +{cr_work:.0f}", exit_costs=costs)


def with_prices(preset: CostPreset, **prices) -> CostPreset:
    """The preset with ``resync_pte`` and/or ``walk_ref`` re-priced (sensitivity)."""
    label = ", ".join(f"{k} {v:g}" for k, v in prices.items())
    return replace(preset, name=f"{preset.name}, {label}", **prices)


_MODERN_HZ = 3.0e9        # PVM's figures are in µs; cycles at an assumed 3 GHz
_us = _MODERN_HZ / 1e6

_MODERN_BASIS = {
    "guest_pf": "[PVM23] page fault under EPT 0.15 µs (a fault that never exits); also a bypassed guest fault",
    "pf_fixed": "[PVM23] page fault 0.93 µs shadow - 0.15 µs EPT: one exit's part 0.78 µs (ASSUMPTION: one "
                "exit per fault in PVM's figure)",
    "pf_injected": "[PVM23] as pf_fixed, 0.78 µs",
    "pte_write": "ASSUMPTION: the #UD round trip 1.66 µs [PVM23] (it decodes and emulates)",
    "mmio": "ASSUMPTION: the #UD round trip 1.66 µs [PVM23]",
    "emulate": "ASSUMPTION: the #UD round trip 1.66 µs [PVM23]",
    "cr_access": "ASSUMPTION: the CPUID round trip 0.54 µs [PVM23]",
    "invlpg": "ASSUMPTION: the CPUID round trip 0.54 µs [PVM23]; resync work priced apart (resync_pte)",
    "msr": "ASSUMPTION: the CPUID round trip 0.54 µs [PVM23] (the real vCPU only)",
    "io": "ASSUMPTION: the #UD round trip 1.66 µs [PVM23] (the real vCPU only)",
    "ept_violation": "ASSUMPTION: as a shadow fault's exit, 0.78 µs [PVM23]",
    "resync_pte": f"ASSUMPTION: {RESYNC_PTE} cycles per guest pte re-read",
    "walk_ref": f"ASSUMPTION: {WALK_REF} cycles per page-walk memory reference; 2-D walk = n*m+n+m [BSSM08]",
}

PRESETS = {
    "p4-2006": CostPreset(
        "p4-2006", "Pentium 4, VT-x shadow paging (Adams & Agesen 2006)", 3.8e9, 1093,
        _adams_agesen(_P4_ROUND_TRIP),
        ("Adams & Agesen, ASPLOS 2006: entry 2409 / #PF exit 1931 cycles; true #PF 1093 native, "
         "11242 VT-x; pte write 12733; not-present->present 17020",
         "assumption: a hidden #PF (pf_fixed) costs what a not-present->present update costs",
         f"assumption: a CR3-write or INVLPG exit costs the round trip + {CR_WORK} cycles (no published figure)",
         f"assumption: resync {RESYNC_PTE} cycles per guest pte; page-walk reference {WALK_REF} cycles; "
         "an EPT violation as a hidden #PF (no published figure)"),
        RESYNC_PTE, WALK_REF, _basis_2006("P4", _P4_ROUND_TRIP)),
    "core2-2006": CostPreset(
        "core2-2006", "Core 2, VT-x shadow paging (Adams & Agesen 2006)", 2.66e9, 1093,
        _adams_agesen(_C2_ROUND_TRIP),
        ("Adams & Agesen, ASPLOS 2006: entry 937 / #PF exit 1186 cycles on Core 2",
         "assumption: hypervisor software work per event takes the cycles measured on the P4",
         f"assumption: a CR3-write or INVLPG exit costs the round trip + {CR_WORK} cycles (no published figure)",
         f"assumption: resync {RESYNC_PTE} cycles per guest pte; page-walk reference {WALK_REF} cycles; "
         "an EPT violation as a hidden #PF (no published figure)"),
        RESYNC_PTE, WALK_REF, _basis_2006("Core 2", _C2_ROUND_TRIP)),
    "modern": CostPreset(
        "modern", "a current server, shadow paging (PVM, SOSP 2023)", _MODERN_HZ, 0.15 * _us,
        {"pf_fixed": (0.93 - 0.15) * _us, "pf_injected": (0.93 - 0.15) * _us, "pte_write": 1.66 * _us,
         "mmio": 1.66 * _us, "emulate": 1.66 * _us, "cr_access": 0.54 * _us, "invlpg": 0.54 * _us,
         "msr": 0.54 * _us, "io": 1.66 * _us, "ept_violation": (0.93 - 0.15) * _us},
        ("PVM, SOSP 2023: page fault 0.93 µs shadow vs 0.15 µs EPT; exit round trip 0.54 µs (CPUID), "
         "1.66 µs (#UD, i.e. with instruction emulation)",
         "assumptions: 3 GHz; a pte-write exit costs the #UD round trip (it decodes and emulates); "
         "a CR3-write or INVLPG exit costs the bare CPUID round trip",
         f"assumption: resync {RESYNC_PTE} cycles per guest pte; page-walk reference {WALK_REF} cycles; "
         "an EPT violation costs a shadow fault's exit (0.78 µs)"),
        RESYNC_PTE, WALK_REF, _MODERN_BASIS),
}

# the published figure the free parameter is fitted to
KBUILD_NATIVE_S, KBUILD_SHADOW_S = 265.0, 484.0
KBUILD_SLOWDOWN = KBUILD_SHADOW_S / KBUILD_NATIVE_S


def exit_cycles(exits: dict, preset: CostPreset) -> float:
    """X: the priced cycles of a run's exits."""
    return sum(n * preset.exit_cost(r) for r, n in exits.items() if n)


def speedup_identity(x_base: float, x_new: float, slowdown: float = KBUILD_SLOWDOWN) -> float:
    """1 - T_new/T_base when the work W (+ guest faults F) is fitted on the base run so
    that (W + F + X_base)/(W + F) = slowdown, and both runs do the same work:
    (1 - 1/slowdown) * (1 - X_new/X_base).  For the kernel compile, 219/484 of the
    share of exit cycles the new policy removes."""
    return (1 - 1 / slowdown) * (1 - x_new / x_base)


def get_preset(name: str) -> CostPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown cost preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def estimate(exits: dict, accesses: int, guest_faults: int, preset: CostPreset,
             work_per_access: float, *, resynced_ptes: int = 0, extra_walk_refs: int = 0) -> dict:
    """Cycles and seconds for the shadow (or tdp) run and for the same work natively, with parts.
    ``resynced_ptes``: guest ptes re-read by unsync resyncs; ``extra_walk_refs``: page-walk
    references beyond the native walks (2-D walks, see ``extra_walk_refs()``)."""
    work = accesses * work_per_access
    faults = guest_faults * preset.guest_pf
    exit_parts = {r: n * preset.exit_cost(r) for r, n in exits.items() if n}
    resync = resynced_ptes * preset.resync_pte
    walks = extra_walk_refs * preset.walk_ref
    native = work + faults
    shadow = native + sum(exit_parts.values()) + resync + walks
    return {"preset": preset.name, "work_per_access": work_per_access,
            "native_cycles": native, "shadow_cycles": shadow,
            "native_seconds": native / preset.hz, "shadow_seconds": shadow / preset.hz,
            "slowdown": shadow / native if native else float("inf"),
            "parts": {"guest_work": work, "guest_faults": faults, "exits": exit_parts or None,
                      "resync": resync or None, "walks_2d": walks or None}}


def fit_work_per_access(exits: dict, accesses: int, guest_faults: int, preset: CostPreset,
                        slowdown: float = KBUILD_SHADOW_S / KBUILD_NATIVE_S) -> float:
    """The work per access that makes shadow/native equal ``slowdown`` on this run.

    shadow / native = (W + F + X) / (W + F)  =>  W = X / (slowdown - 1) - F."""
    x = exit_cycles(exits, preset)
    if slowdown <= 1:
        raise ValueError("the slowdown to fit must be above 1")
    if accesses <= 0:
        raise ValueError("cannot fit the work per access of a run with no accesses")
    w = x / (slowdown - 1) - guest_faults * preset.guest_pf
    if w <= 0:
        best = (x + guest_faults * preset.guest_pf) / (guest_faults * preset.guest_pf)
        raise ValueError(f"even with no guest work this run's slowdown is only {best:.2f}x, below the "
                         f"{slowdown:.2f}x to fit: the run is not comparable to the figure")
    return w / accesses
