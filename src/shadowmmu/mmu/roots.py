"""Roots and the hardware state: what the CPU runs on while the guest runs.

The guest's CR3 and paging mode choose the root shadow pages (KVM's
``mmu_alloc_roots``); the hardware always runs 64-bit-format shadow tables with
paging on and CR0.WP=1, whatever the guest's mode (CR0.WP=0 is emulated).
"""

from __future__ import annotations

from ..x86.bits import (
    CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LME, EFER_NXE, PF_ID,
    PF_P, PTE_P,
)
from ..x86.formats import PagingMode
from .shadow_page import ShadowPage
from .spte import SPTE_ADDR, Role

# guest paging levels, as a role records them (0: paging off)
GUEST_LEVELS = {PagingMode.NONE: 0, PagingMode.BITS32: 2, PagingMode.PAE: 3, PagingMode.LEVEL4: 4,
                PagingMode.LEVEL5: 5}


def pf_exits(pfec_filter: tuple[int, int, bool], error_code: int) -> bool:
    """Whether a hardware #PF with ``error_code`` exits under the VMCS filter
    (``Roots.pfec_filter``): iff ((error code & PFEC_MASK) == PFEC_MATCH) equals bit 14
    of the exception bitmap (SDM 25.2)."""
    mask, match, bit14 = pfec_filter
    return ((error_code & mask) == match) == bit14


class VcpuMmuState:
    """Per-vCPU MMU state: roots, the PAE root table, the flood detector, and what
    the last ``page_fault`` left for the vCPU (the fault to inject, the gpa to emulate)."""

    __slots__ = ("roots", "pae_root_hpfn", "last_pt_write_gfn", "last_pt_write_count", "glevels", "base_role",
                 "fault", "gpa", "last_pte_updated")

    def __init__(self, pae_root_hpfn: int):
        self.roots: list[ShadowPage | None] = []
        self.pae_root_hpfn = pae_root_hpfn
        self.last_pt_write_gfn = -1
        self.last_pt_write_count = 0
        self.last_pte_updated = -1   # bypass: host address of the spte update_pte installed last
        self.glevels = -1
        self.base_role = None
        self.fault = None            # PfResult.INJECT: the guest's #PF
        self.gpa = -1                # PfResult.PTE_WRITE/MMIO/EMULATE: the access's gpa


class Roots:
    """The roots share of ShadowMMU."""

    def attach(self, vcpu) -> None:
        """Give a vCPU its MMU state (a PAE root table taken from the pool)."""
        vcpu.mmu_state = VcpuMmuState(self._alloc_frame())
        self.pool_size -= 1          # the PAE root table is not a shadow page
        self.vcpus.append(vcpu)
        self.reload_roots(vcpu)

    def base_role(self, vcpu) -> Role:
        """The role every shadow page of the vCPU's current guest mode shares."""
        g = vcpu.guest
        wp = bool(g.cr0 & CR0_WP)
        glevels = GUEST_LEVELS[g.mode]
        return Role(level=0, glevels=glevels, nxe=bool(g.efer & EFER_NXE), cr0_wp=wp,
                    smep_andnot_wp=bool(g.cr4 & CR4_SMEP) and not wp,
                    smap_andnot_wp=bool(g.cr4 & CR4_SMAP) and not wp,
                    pke_andnot_wp=g.pk_active and not wp,
                    pse=glevels == 2 and bool(g.cr4 & CR4_PSE))

    def reload_roots(self, vcpu) -> None:
        """A guest CR3 load, a paging-mode change (CR0.PG/WP, CR4, EFER) or zapped
        roots: release the roots and load the ones the guest state calls for.
        In 2007 KVM had two entry points, ``new_cr3`` (swap roots) and a context
        reset (choose the 32/64-bit callbacks, then swap roots); here the role is
        computed from the guest state at every load, so one function is both.
        Cached shadow pages of other CR3s and modes stay."""
        self._release_roots(vcpu)
        self._load_roots(vcpu)

    def _release_roots(self, vcpu) -> None:
        st = vcpu.mmu_state
        for sp in st.roots:
            if sp is not None:
                sp.root_count -= 1
                if sp.zapped and not sp.root_count:
                    self._free_page(sp)
        st.roots = []

    def _load_roots(self, vcpu) -> None:
        """Long mode: one root for the guest CR3.  PAE guest: four roots, one per
        present guest PDPTE.  32-bit guest: the four quadrants of the guest page
        directory.  No paging: four direct pages identity-mapping 4 GB."""
        self.make_room(8)
        g, st = vcpu.guest, vcpu.mmu_state
        base = self.base_role(vcpu)
        glevels = base.glevels
        st.glevels = glevels
        st.base_role = base
        roots: list[ShadowPage | None] = []
        if glevels >= 4:
            sp = self.get_page((g.cr3 & SPTE_ADDR) >> 12, base._replace(level=glevels))
            roots.append(sp)
        else:
            for i in range(4):
                if glevels == 3:
                    pdpte = g.pdptes[i]
                    sp = (self.get_page((pdpte & SPTE_ADDR) >> 12, base._replace(level=2))
                          if pdpte & PTE_P else None)
                elif glevels == 2:
                    sp = self.get_page((g.cr3 & 0xFFFFF000) >> 12, base._replace(level=2, quadrant=i))
                else:
                    sp = self.get_page(i << 18, base._replace(level=2, direct=True))
                roots.append(sp)
        for sp in roots:
            if sp is not None:
                sp.root_count += 1
        st.roots = roots
        vcpu.mmu_roots_invalid = False
        if self.unsync_enabled:
            self.sync_roots(vcpu)       # a CR3 load invalidates every non-global translation
        # a new root write-protects its guest table: another vCPU's TLB may still
        # hold a writable translation of it (its stores would skip pte_write)
        self.flush_tlbs()
        self._load_hw(vcpu)

    def _load_hw(self, vcpu) -> None:
        """Program the hardware: always paging, CR0.WP=1 (WP=0 is emulated), 64-bit
        ptes; the guest's SMEP/SMAP/PKE pass through, with the guest's CPL, AC, PKRU."""
        g, st, hw = vcpu.guest, vcpu.mmu_state, vcpu.hw
        # SMEP/SMAP/PKE apply only with guest paging; without it the identity map's
        # sptes are user pages, which the hardware must not hold against the guest
        # (KVM's vmx_set_cr4 clears them while the guest's CR0.PG is 0)
        cr4 = CR4_PAE | (g.cr4 & (CR4_SMEP | CR4_SMAP | CR4_PKE) if st.glevels else 0)
        if st.glevels >= 4:
            if st.glevels == 5:
                cr4 |= CR4_LA57
            cr3, efer = st.roots[0].hpfn << 12, EFER_LME | EFER_NXE
        else:
            pdpt = self.host.qwords_w(st.pae_root_hpfn)
            for i, sp in enumerate(st.roots):
                pdpt[i] = (sp.hpfn << 12) | PTE_P if sp is not None else 0
            cr3, efer = st.pae_root_hpfn << 12, EFER_NXE
            cr4 &= ~CR4_PKE
        # load() validates only the final combination, so any mode can follow any other
        hw.load(self.host, cr4=cr4, efer=efer, cr3=cr3, cr0=CR0_PE | CR0_PG | CR0_WP)
        hw.cpl, hw.ac, hw.pkru = g.cpl, g.ac, g.pkru
        vcpu.pfec_filter = self.pfec_filter(vcpu) if self.trap_spte else None
        vcpu.tlb.flush()

    def pfec_filter(self, vcpu) -> tuple[int, int, bool]:
        """Bypass: the VMCS's #PF exit filter, (PFEC_MASK, PFEC_MATCH, exception bitmap
        bit 14).  A #PF exits iff ((error code & mask) == match) == bit 14 (SDM 25.2).
        KVM set mask = match = P with bit 14 set: only P=1 faults exit.  The hardware
        here runs with EFER.NXE=1, so it reports I/D on a fetch fault; a guest without
        NXE or SMEP would not (SDM 4.7): for it, fetch faults must exit too, so the
        MMU injects the guest's own error code: mask = P|I/D, match = 0, bit 14 clear
        (exit unless both are 0).  AMD's NPT-less SVM had no such filter (KVM's commit
        says so): bypass is a VT-x feature."""
        if vcpu.guest.report_id:
            return PF_P, PF_P, True
        return PF_P | PF_ID, 0, False

    @staticmethod
    def root_for(st: VcpuMmuState, vaddr: int) -> tuple[ShadowPage | None, int]:
        """The root page a vCPU's walk of vaddr starts at, and its level: the one root
        of a 4/5-level guest, else the PAE-format root of vaddr's 1 GB quarter."""
        if st.glevels >= 4:
            return st.roots[0], st.glevels
        return st.roots[(vaddr >> 30) & 3], 2

    def invlpg(self, vcpu, vaddr: int) -> None:
        """2007: nothing to do.  Write protection keeps every spte in sync with its
        guest pte, so a guest INVLPG only has to reach the hardware TLB.  Under
        +unsync it is an exit: the spte of vaddr may be out of sync."""
        if self.unsync_enabled:
            self.resync_gva(vcpu, vaddr)
        vcpu.tlb.invlpg(vaddr)

    def flush_guest_tlb(self, vcpu) -> None:
        """The guest flushed its whole TLB without a CR3 load (a CR4.PGE toggle,
        INVPCID): under +unsync every reachable page is resynced, as at a CR3 load."""
        if self.unsync_enabled:
            self.sync_roots(vcpu)
        vcpu.tlb.flush()
