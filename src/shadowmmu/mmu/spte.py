"""Shadow pte layout and the shadow page's identity (role).

Shadow tables are always the 64-bit format, 512 entries (KVM mmu.c, 2007; see docs/sources.md), in host
physical memory, so the x86 walker walks them as hardware would.  Invariants
kept by ``ShadowMMU.set_spte`` (the one place that writes an spte):

- a present spte at level > 1 points at a shadow page, and that page's
  ``parents`` holds the spte's address;
- a present, writable spte at level 1 is in ``rmap[gfn]`` of the guest frame
  it maps, and only those are (rmap = writable leaf sptes, as in 2007);
- no spte maps a guest frame that is shadowed as a page table writable;
- a leaf spte never grants more than the guest's translation does (the
  CR0.WP=0 trick grants supervisor-write, which the guest allows then).
"""

from __future__ import annotations

from typing import NamedTuple

from ..x86.bits import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_U, PTE_W

SPTE_P = PTE_P
SPTE_W = PTE_W
SPTE_U = PTE_U
SPTE_A = PTE_A
SPTE_D = PTE_D
SPTE_NX = PTE_NX
# Software bits 9-11 (ignored by the hardware walk).  Bit 9 on a non-present
# spte marks MMIO: the rest of the spte holds the gpa, so the fault path knows
# at once that the access must be emulated (2007's PT_SHADOW_IO_MARK).
SPTE_MMIO = 1 << 9
# Bit 10: the guest allows writes (2007's PT_SHADOW_WRITABLE_MASK), set on leaf
# sptes whose W the MMU may have withheld (clean pte, shadowed table): it shows in
# the trace why a read-only spte is read-only.
SPTE_GUEST_W = 1 << 10
SPTE_ADDR = 0x000FFFFFFFFFF000
# A non-leaf spte grants everything; rights are enforced at the leaf, which
# carries the AND of every level's rights (the role's inherited access).
SPTE_TABLE = SPTE_P | SPTE_W | SPTE_U | SPTE_A

# access rights, as in the x86 permission table index
ACC_W, ACC_U, ACC_X = 1, 2, 4
ACC_ALL = ACC_W | ACC_U | ACC_X
ACC_DIRTY = 8            # direct pages only: the guest large page is dirty


class Role(NamedTuple):
    """What a shadow page shadows, besides the gfn.  Two pages with the same gfn
    and different roles are different pages (KVM's ``kvm_mmu_page_role``).

    - ``level``: shadow level of this page (1 = page table).
    - ``glevels``: guest paging levels (0 non-paging, 2 32-bit, 3 PAE, 4, 5).
    - ``quadrant``: which part of a 1024-entry 32-bit guest table this 512-entry
      page shadows (level 1: bit 21 of the address; level 2: bits 31:30).
    - ``direct``: no guest table behind it (a guest large page, or no paging);
      the gfn is then the first frame mapped.  "Is this gfn shadowed" ignores these.
    - ``access``: rights inherited from the upper levels (ACC_W|U|X); the leaf
      gets access & gpte (KVM's 2007 fix for the seed's update_pte bug).
      A direct page also records whether the guest's large page is dirty
      (``ACC_DIRTY``): its sptes are writable only then.
    - ``pkey``: a direct page's protection key (4/5-level guests): the key of the
      guest large page it splits, which every one of its sptes carries.
    - ``nxe``, ``cr0_wp``, ``smep_andnot_wp``, ``smap_andnot_wp``: guest state the
      sptes depend on (the last two matter only for CR0.WP=0 supervisor-write sptes).
    - ``pke_andnot_wp``: protection keys active with CR0.WP=0 (like SMAP, keys bind
      only user pages, so the CR0.WP=0 trick must not turn a user page supervisor-only).
    - ``pse``: CR4.PSE of a 32-bit guest (a PDE with PS is a 4 MB page or a table
      pointer depending on it; two vCPUs may differ).  False for other formats.
    """
    level: int
    glevels: int
    quadrant: int = 0
    direct: bool = False
    access: int = ACC_ALL
    nxe: bool = False
    cr0_wp: bool = True
    smep_andnot_wp: bool = False
    smap_andnot_wp: bool = False
    pse: bool = False
    pke_andnot_wp: bool = False
    pkey: int = 0

    def describe(self) -> str:
        kind = "direct" if self.direct else f"g{self.glevels}"
        acc = "".join(c if self.access & b else "-" for c, b in (("W", ACC_W), ("U", ACC_U), ("X", ACC_X)))
        if self.direct and self.access & ACC_DIRTY:
            acc += "D"
        return f"L{self.level} {kind} q{self.quadrant} {acc}{'' if self.cr0_wp else ' wp0'}{' pse' if self.pse else ''}"


def gpte_access(gpte: int, wide: bool, nxe: bool) -> int:
    """Rights a guest entry grants, as ACC_* bits (bit 63 is NX only with EFER.NXE)."""
    acc = ((gpte >> 1) & 1) | ((gpte >> 1) & 2)
    if not (wide and nxe and gpte & PTE_NX):
        acc |= ACC_X
    return acc
