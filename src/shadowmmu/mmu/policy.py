"""MMU policies by name: what the command line's ``--policy`` takes.

A shadow-paging policy is a pte-write policy and the later KVM features on top
of it, each a ``+`` suffix in any order::

    zap | update                     the pte-write policy (before the seed / the seed, 2007)
      +bypass                        guest not-present faults skip the hypervisor (VT-x PFEC mask/match, Sep 2007)
      +unsync                        out-of-sync leaf page tables, resynced at INVLPG and TLB flushes (2008)
      +prefetch[N]                   map the neighbouring ptes of a fault, an aligned group of N (8: KVM, 2010)

    modern                           zap+unsync+prefetch: the pte-write path as KVM has it now (only zaps)
    tdp                              two-dimensional paging (EPT/NPT): no shadow tables at all
    native                           no hypervisor (a VM option, not an MMU policy)

``parse_policy`` turns a name into an ``MmuPolicy``; ``MmuPolicy.name`` is the
canonical spelling every report prints (features in the order above).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

PTE_WRITE_POLICIES = ("zap", "update")
# pte prefetch group sizes: 0 is off (2007); KVM's PTE_PREFETCH_NUM is 8 (2010); powers of two
# so that the group is an aligned block of the table
PREFETCH_SIZES = (0, 2, 4, 8, 16, 32, 64)
PRESETS = {"modern": "zap+unsync+prefetch"}
TDP = "tdp"


class MmuPolicy(NamedTuple):
    pte_write: str = "update"     # "zap" | "update" ("" under tdp: no guest table is shadowed)
    prefetch: int = 0             # pte prefetch group, 0: off
    bypass: bool = False
    unsync: bool = False
    tdp: bool = False

    @property
    def name(self) -> str:
        if self.tdp:
            return TDP
        name = self.pte_write + "+bypass" * self.bypass + "+unsync" * self.unsync
        if self.prefetch:
            name += "+prefetch" + ("" if self.prefetch == 8 else str(self.prefetch))
        return name

    @property
    def label(self) -> str:
        """The name, with a preset's own name in front: "modern (zap+unsync+prefetch)"."""
        preset = next((p for p, spelled in PRESETS.items() if spelled == self.name), None)
        return f"{preset} ({self.name})" if preset else self.name


def parse_policy(name: str) -> MmuPolicy:
    """"update+bypass" -> MmuPolicy("update", bypass=True); "modern" -> zap+unsync+prefetch;
    "tdp" -> MmuPolicy(tdp=True).  Raises ValueError naming what is wrong."""
    if not isinstance(name, str):
        raise ValueError(f"a policy is a name such as 'update+bypass', got {name!r}")
    name = PRESETS.get(name, name)
    if name == TDP:
        return MmuPolicy("", tdp=True)
    base, *features = name.split("+")
    if base not in PTE_WRITE_POLICIES:
        raise ValueError(f"unknown policy {name!r}: {usage()}")
    prefetch, bypass, unsync = 0, False, False
    seen = set()
    for f in features:
        kind = "prefetch" if f.startswith("prefetch") else f
        if kind in seen:
            raise ValueError(f"policy {name!r} names {kind} twice")
        seen.add(kind)
        if kind == "bypass":
            bypass = True
        elif kind == "unsync":
            unsync = True
        elif kind == "prefetch" and (f[8:] == "" or f[8:].isdigit()):
            prefetch = int(f[8:] or 8)
            if prefetch not in PREFETCH_SIZES[1:]:
                raise ValueError(f"prefetch group must be one of {PREFETCH_SIZES[1:]} ptes "
                                 f"(KVM uses 8), got {prefetch}")
        else:
            raise ValueError(f"unknown policy feature {f!r} in {name!r}: {usage()}")
    return MmuPolicy(base, prefetch, bypass, unsync)


def usage() -> str:
    return ("POLICY[+bypass][+unsync][+prefetch[N]] with POLICY zap or update, or one of "
            f"{', '.join((*PRESETS, TDP))}")


def policy_names() -> tuple[str, ...]:
    """Every policy a report may run, canonical names (the command line takes any spelling)."""
    names = []
    for base in PTE_WRITE_POLICIES:
        for bypass in (False, True):
            for unsync in (False, True):
                for prefetch in (0, 8):
                    names.append(MmuPolicy(base, prefetch, bypass, unsync).name)
    return (*names, *PRESETS, TDP)


POLICY_HELP = ("zap|update, each with +bypass (guest not-present faults skip the hypervisor, 2007), +unsync "
               "(out-of-sync leaf tables, 2008), +prefetch[N] (map N neighbouring ptes on a fault, 2010); "
               "modern (zap+unsync+prefetch); tdp (two-dimensional paging, EPT)")


def policy_arg(name: str) -> str:
    """The argparse type of ``--policy``: any spelling parse_policy takes, as its canonical
    name (a preset keeps its own)."""
    try:
        spec = parse_policy(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name if name in PRESETS else spec.name
