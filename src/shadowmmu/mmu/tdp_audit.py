"""audit_tdp(): every invariant of the two-dimensional MMU, checked from scratch.

What the EPT must be: a tree of EPT pages from the pool, each reached once from
the root at its own level; every leaf maps a guest frame to exactly its memslot's
host frame with full rights; no entry for a frame with no memslot; nothing the
hypervisor never writes (large pages, reserved bits).  What the vCPUs' TLBs may
hold: only translations the EPT still backs, and a dirty entry only where the EPT
leaf is dirty (else a write skips the dirty log: a missed INVEPT).

The TLB is checked in the second dimension only: a combined entry may be stale
against the guest's own tables when the guest changed a pte without INVLPG, which
the SDM allows, so the guest dimension is the lockstep checker's business.
"""

from __future__ import annotations

from itertools import compress

from .audit import AuditError
from .tdp import _LEAF, _TABLE, EPT_A, EPT_ADDR, EPT_D, EPT_LEVELS, EPT_PS, EPT_RWX


def audit_tdp(mmu) -> None:
    gmem = mmu.gmem
    tables = mmu.tables
    if len(tables) > mmu.pool_size:
        raise AuditError(f"{len(tables)} EPT pages exceed the pool of {mmu.pool_size}")
    if len(tables) + len(mmu.free) != mmu.pool_size or set(tables) & set(mmu.free):
        raise AuditError(f"EPT pool accounting: {len(tables)} pages in use + {len(mmu.free)} free "
                         f"!= pool of {mmu.pool_size}")
    for hpfn in tables:
        if not mmu.pool_lo <= hpfn < mmu.pool_hi:
            raise AuditError(f"EPT page at host frame {hpfn:#x} lives outside the pool")
    leaves: dict[int, int] = {}
    seen: set[int] = set()
    stack = [(mmu.root_hpfn, EPT_LEVELS, 0)]
    while stack:
        hpfn, level, base = stack.pop()
        t = tables.get(hpfn)
        if t is None:
            raise AuditError(f"an EPT entry points at host frame {hpfn:#x}, which is no EPT page")
        if hpfn in seen:
            raise AuditError(f"EPT page {hpfn:#x} is reached twice")
        seen.add(hpfn)
        t_level, t_base, view = t
        if (t_level, t_base) != (level, base):
            raise AuditError(f"EPT page {hpfn:#x} is level {t_level} for gfn {t_base:#x} but sits at level "
                             f"{level} for gfn {base:#x}")
        span = 9 * (level - 1)
        for idx in compress(range(512), view.tolist()):
            e = view[idx]
            gfn = base + (idx << span)
            where = f"EPT level {level} entry [{idx}] = {e:#x} (gfn {gfn:#x})"
            if not e & EPT_RWX:
                raise AuditError(f"{where}: not present but not zero")
            if e & EPT_PS:
                raise AuditError(f"{where}: a large page (this MMU maps 4 KB only)")
            if level > 1:
                if e & ~(EPT_ADDR | _TABLE | EPT_A):
                    raise AuditError(f"{where}: bits the MMU never sets in a table entry")
                stack.append(((e & EPT_ADDR) >> 12, level - 1, gfn))
                continue
            if e & ~(EPT_ADDR | _LEAF | EPT_A | EPT_D) or e & _LEAF != _LEAF:
                raise AuditError(f"{where}: a leaf is RWX, write-back, A/D, nothing else")
            if e & EPT_D and not e & EPT_A:
                raise AuditError(f"{where}: dirty but not accessed")
            pfn = gmem.gfn_to_pfn(gfn)
            if pfn is None:
                raise AuditError(f"{where}: no memslot backs gfn {gfn:#x}")
            if (e & EPT_ADDR) >> 12 != pfn:
                raise AuditError(f"{where}: maps host frame {(e & EPT_ADDR) >> 12:#x}, the memslot says {pfn:#x}")
            leaves[gfn] = e
    if seen != set(tables):
        raise AuditError(f"EPT pages not reachable from the root: {sorted(map(hex, set(tables) - seen))}")
    for vcpu in mmu.vcpus:
        for vpn, e in vcpu.tlb.mmio.items():
            if gmem.gfn_to_pfn(e[0] >> 12) is not None:
                raise AuditError(f"TLB of vCPU {vcpu.index} keeps {vpn << 12:#x} -> gpa {e[0]:#x} as memory without "
                                 f"a memslot, but a memslot backs it")
        for vpn, e in vcpu.tlb.small.items():
            gfn = gmem.pfn_to_gfn(e[0] >> 12)
            if gfn is None:
                raise AuditError(f"TLB of vCPU {vcpu.index} maps {vpn << 12:#x} to host frame {e[0] >> 12:#x}, "
                                 f"outside guest RAM")
            if len(e) != 7 or e[6] != gfn or e[2] and not e[5]:
                raise AuditError(f"TLB entry of vCPU {vcpu.index} for {vpn << 12:#x} is not (hpa, rights, dirty, G, "
                                 f"pkey, guest dirty, gfn {gfn:#x}) with dirty only over guest dirty: {e}")
            leaf = leaves.get(gfn)
            if leaf is None:
                raise AuditError(f"TLB of vCPU {vcpu.index} maps {vpn << 12:#x} to gfn {gfn:#x}, which the EPT no "
                                 f"longer maps (missed flush)")
            if e[2] and not leaf & EPT_D:
                raise AuditError(f"TLB of vCPU {vcpu.index} has a dirty entry for {vpn << 12:#x} but the EPT leaf of "
                                 f"gfn {gfn:#x} is clean (a write would skip the dirty log: missed flush)")
