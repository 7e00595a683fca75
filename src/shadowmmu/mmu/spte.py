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

from ..x86.bits import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PKEY_MASK, PTE_U, PTE_W, R_ALL, R_U, R_W, R_X

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
# Bypass of guest not-present faults (+bypass, KVM c7addb902054, 2007).  VT-x can let
# a #PF go straight to the guest by its error code (PFEC mask/match): KVM lets the
# not-present ones (P=0) through.  So an spte that must exit although nothing is
# mapped -- not shadowed yet, zapped, MMIO -- is the *trap* value: P=1 and every
# reserved bit, a RSVD fault (P=1 in the error code), always an exit.  Without
# bypass the trap value is 0.  An spte of 0 under bypass ("notrap") is kept only
# where the guest's own entry is not present, so the guest's fault is its own.
# Bit 52 is never set in an spte the MMU makes: ``spte & SPTE_PRESENT_TEST ==
# SPTE_P`` tells a mapping from the trap value in one test.
SPTE_TRAP = (1 << 64) - 1
SPTE_PRESENT_TEST = SPTE_P | (1 << 52)
# A non-leaf spte grants everything; rights are enforced at the leaf, which
# carries the AND of every level's rights (the role's inherited access).
SPTE_TABLE = SPTE_P | SPTE_W | SPTE_U | SPTE_A

# A direct page's role.access carries R_W|R_U|R_X and, beside them, whether the
# guest large page it splits is dirty (its sptes may then be writable).
R_DIRTY = 8


class Role(NamedTuple):
    """What a shadow page shadows, besides the gfn.  Two pages with the same gfn
    and different roles are different pages (KVM's ``kvm_mmu_page_role``).

    - ``level``: shadow level of this page (1 = page table).
    - ``glevels``: guest paging levels (0 non-paging, 2 32-bit, 3 PAE, 4, 5).
    - ``quadrant``: which part of a 1024-entry 32-bit guest table this 512-entry
      page shadows (level 1: bit 21 of the address; level 2: bits 31:30).
    - ``direct``: no guest table behind it (a guest large page, or no paging);
      the gfn is then the first frame mapped.  "Is this gfn shadowed" ignores these.
    - ``access``: rights inherited from the upper levels (R_W|R_U|R_X); the leaf
      gets access & gpte (KVM's 2007 fix for the seed's update_pte bug).
      A direct page also records whether the guest's large page is dirty
      (``R_DIRTY``): its sptes are writable only then.
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
    access: int = R_ALL
    nxe: bool = False
    cr0_wp: bool = True
    smep_andnot_wp: bool = False
    smap_andnot_wp: bool = False
    pse: bool = False
    pke_andnot_wp: bool = False
    pkey: int = 0

    def describe(self) -> str:
        kind = "direct" if self.direct else f"g{self.glevels}"
        acc = "".join(c if self.access & b else "-" for c, b in (("W", R_W), ("U", R_U), ("X", R_X)))
        if self.direct and self.access & R_DIRTY:
            acc += "D"
        return f"L{self.level} {kind} q{self.quadrant} {acc}{'' if self.cr0_wp else ' wp0'}{' pse' if self.pse else ''}"


def gpte_rights(gpte: int, wide: bool, nxe: bool) -> int:
    """Rights a guest entry grants, as R_* bits (bit 63 is NX only with EFER.NXE)."""
    rights = ((gpte >> 1) & 1) | ((gpte >> 1) & 2)
    if not (wide and nxe and gpte & PTE_NX):
        rights |= R_X
    return rights


def make_spte(pfn: int | None, gfn: int, rights: int, *, dirty: bool, write_protect: bool, pkey_bits: int) -> int:
    """A leaf spte (KVM's make_spte; the seed's set_pte body), from facts only.

    ``pfn`` None: no memslot behind ``gfn``, an MMIO mark.  W only if the guest
    allows it, its pte is dirty (a clean one must trap so the guest's D gets set)
    and the frame is not write-protected (a shadowed guest page table);
    SPTE_GUEST_W records that the guest allows it either way.  ``pkey_bits`` are
    the guest leaf's protection-key bits (4/5-level guests) or 0."""
    if pfn is None:
        return SPTE_MMIO | (gfn << 12)
    spte = (pfn << 12) | SPTE_P | SPTE_A | (pkey_bits & PTE_PKEY_MASK)
    if rights & R_U:
        spte |= SPTE_U
    if not rights & R_X:
        spte |= SPTE_NX
    if rights & R_W:
        spte |= SPTE_GUEST_W
        if dirty and not write_protect:
            spte |= SPTE_W | SPTE_D
    return spte
