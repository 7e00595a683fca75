"""The fault path: a hardware #PF on the shadow tables, as the seed's
``paging_tmpl.h`` handles it.

    page_fault()          walk the guest's tables (the x86 walker on guest memory)
      guest says fault -> INJECT
      else build_shadow_path()   find or create the shadow page of each level
           install_leaf()        the leaf spte -> FIXED, or emulate the access

The result is a reason (KVM's ``RET_PF_*``), which the vCPU dispatches on once
and counts as its exit reason.
"""

from __future__ import annotations

from enum import IntEnum

from ..x86.bits import ACC_USER, ACC_WRITE, CR0_WP, CR4_SMAP, R_U, R_W, R_X
from ..x86.faults import PageFault
from ..x86.walker import translate
from .page_cache import MMUError
from .shadow_page import ShadowPage
from .spte import R_DIRTY, SPTE_ADDR, SPTE_P, SPTE_TABLE, SPTE_TRAP, make_spte

# the guest page-mapping level of a translation, by page size
_GUEST_PAGE_LEVEL = {12: 1, 21: 2, 22: 2, 30: 3}


class PfResult(IntEnum):
    """What ``page_fault`` did, and so what the vCPU must do (KVM's RET_PF_*).
    The name in ``exit_reason`` is how the exit is counted."""
    FIXED = 0        # the shadow now maps the access: retry it
    INJECT = 1       # the guest's tables fault: deliver vcpu.mmu_state.fault to the guest
    PTE_WRITE = 2    # a store to a write-protected guest page table: emulate it (pte_write first)
    MMIO = 3         # no memslot behind the gpa: emulate the access on the device
    EMULATE = 4      # the hardware cannot do what the guest allows (CR0.WP=0 with SMAP/PKRU): emulate it

    @property
    def exit_reason(self) -> str:
        return _EXIT_REASONS[self]


_EXIT_REASONS = {PfResult.FIXED: "pf_fixed", PfResult.INJECT: "pf_injected", PfResult.PTE_WRITE: "pte_write",
                 PfResult.MMIO: "mmio", PfResult.EMULATE: "emulate"}
_FIXED = PfResult.FIXED


class FaultPath:
    """The fault-path share of ShadowMMU."""

    def page_fault(self, vcpu, vaddr: int, access: int) -> PfResult:
        """A hardware #PF on the shadow tables exited to the MMU.  For INJECT the
        guest's fault is in ``vcpu.mmu_state.fault``; for the emulation reasons the
        access's gpa is in ``vcpu.mmu_state.gpa``."""
        if vcpu.mmu_roots_invalid:
            self.reload_roots(vcpu)
        st = vcpu.mmu_state
        if len(self.free) < 6:
            self.make_room(6)              # KVM: mmu_topup_memory_caches + free_some_pages
        before = self._walked_entries(vcpu, vaddr, access) if self.dirty_logging else None
        try:
            # walk_guest: the x86 walker on guest-physical memory, setting guest A/D as hardware would
            walk = translate(self.gmem, vcpu.guest, vaddr, access)
        except PageFault as pf:
            if before:
                self._log_changed_tables(before, pf.entries)
            st.last_pt_write_count = 0     # a real guest fault is not a fork storm
            if self.unsync_enabled:
                # a #PF invalidates the TLB entries of its page (SDM 4.10.4.1): a stale spte
                # of an unsync page must not outlive it (KVM: kvm_inject_emulated_page_fault)
                self.resync_gva(vcpu, vaddr)
            if self.tlb_flush_needed:
                self.flush_tlbs()
            st.fault = pf
            return PfResult.INJECT
        if before:
            self._log_changed_tables(before, walk.entries)
        result = self.build_shadow_path(vcpu, vaddr, access, walk)
        if result is not _FIXED:
            st.gpa = walk.paddr
            result = self._emulation_reason(walk.paddr >> 12, access)
        if result is not PfResult.PTE_WRITE:
            st.last_pt_write_count = 0     # only consecutive page-table writes count
        if self.tlb_flush_needed:
            self.flush_tlbs()
        return result

    def _emulation_reason(self, gfn: int, access: int) -> PfResult:
        if self.gmem.gfn_to_pfn(gfn) is None:
            return PfResult.MMIO
        if access & ACC_WRITE and gfn in self.shadowed:
            return PfResult.PTE_WRITE
        return PfResult.EMULATE

    def _walked_entries(self, vcpu, vaddr: int, access: int) -> dict[int, int]:
        """Entry address -> value along the guest walk, read without side effects."""
        try:
            entries = translate(self.gmem, vcpu.guest, vaddr, access, set_ad=False).entries
        except PageFault as pf:
            entries = pf.entries
        return {addr: value for _, addr, value, _ in entries}

    def _log_changed_tables(self, before: dict[int, int], entries) -> None:
        """The guest walk sets A/D bits in the tables it passes: writes to guest
        memory on the guest's behalf, which the dirty log must show (the seed's
        walker calls mark_page_dirty when it sets A).  Only the tables whose entry
        changed are logged, as KVM does."""
        for _, addr, value, _ in entries:
            if before.get(addr, value) != value:
                self.mark_dirty(addr >> 12)

    def build_shadow_path(self, vcpu, vaddr: int, access: int, walk) -> PfResult:
        """Find or create the shadow page of each level for a successful guest walk,
        then install the leaf (the seed's FNAME(fetch))."""
        st = vcpu.mmu_state
        base = st.base_role
        glevels = base.glevels
        sp, level = self.root_for(st, vaddr)
        if sp is None:
            raise MMUError("guest walk succeeded through a PDPTE that has no shadow root")
        gpage_level = _GUEST_PAGE_LEVEL[walk.page_shift]
        while level > 1:
            idx = (vaddr >> (12 + 9 * (level - 1))) & 511
            child_level = level - 1
            large = glevels == 0 or gpage_level >= level
            spte = sp.spt[idx]
            present = spte & SPTE_P and spte != SPTE_TRAP
            if present and not large:
                child = self.by_hpfn[(spte & SPTE_ADDR) >> 12]
                if not child.role.direct:
                    # write protection keeps a guest-table path in sync: any guest edit
                    # of the entries above would have cleared this spte
                    self.lru.move_to_end(child)
                    sp, level = child, child_level
                    continue
            # the guest entry of this level (none below a guest large page, or without
            # paging), and what it and the entries above grant: the child's inherited rights
            step = walk.at_level(level)
            rights_above = step.rights if step is not None else walk.rights
            if large:
                # guest large page (or no paging): a direct page of 4K sptes, keyed by
                # the first frame it maps and the large page's rights -- without W
                # while the guest entry is clean, so the first write refaults, sets D
                # and moves to the writable twin (KVM's direct_access)
                span = 9 * child_level
                gfn = ((walk.paddr >> 12) >> span) << span
                direct_rights = rights_above | R_DIRTY if walk.dirty else rights_above & ~R_W
                # the large page's protection key too: two large pages of one frame
                # with different keys must not share sptes (each spte carries a key)
                role = base._replace(level=child_level, direct=True, access=direct_rights,
                                     pkey=walk.pkey if glevels >= 4 else 0)
            else:
                gfn = (step.value & (SPTE_ADDR if glevels >= 3 else 0xFFFFF000)) >> 12
                quadrant = (vaddr >> 21) & 1 if glevels == 2 else 0
                role = base._replace(level=child_level, quadrant=quadrant, access=rights_above)
            if present:
                child = self.by_hpfn[(spte & SPTE_ADDR) >> 12]
                if child.gfn == gfn and child.role == role:
                    self.lru.move_to_end(child)
                    sp, level = child, child_level
                    continue
                self.set_spte(sp, idx, self.trap_spte)     # the guest entry now calls for another page
            child = self.get_page(gfn, role)
            if child.needs_sync:
                self.sync_tree(vcpu, (child,))       # see OutOfSync.sync_tree
            self.set_spte(sp, idx, (child.hpfn << 12) | SPTE_TABLE)
            sp, level = child, child_level
        self.lru.move_to_end(sp)
        idx = (vaddr >> 12) & 511
        result = self.install_leaf(vcpu, sp, idx, walk, access)
        if self.prefetch_ptes and result is _FIXED and not sp.role.direct and not sp.zapped:
            self.prefetch(vcpu, sp, idx)
        return result

    def prefetch(self, vcpu, sp: ShadowPage, idx: int) -> None:
        """KVM's pte prefetch (2010, ``FNAME(pte_prefetch)``): after a fault installs a
        leaf, map the other ptes of its aligned group of ``prefetch_ptes`` that the
        guest has present, accessed and free of reserved bits, with the page's
        inherited access; a clean one read-only.  A pte the guest never accessed is
        left to fault (its A bit must be set by an access), and so is one with a
        reserved bit (KVM once prefetched those: the access must fault with RSVD).
        Only guest page tables are prefetched here, not the direct pages of large pages."""
        n = self.prefetch_ptes
        spt = sp.spt
        access = sp.role.access
        for i in range(idx & ~(n - 1), (idx & ~(n - 1)) + n):
            if i == idx or spt[i] & SPTE_P and spt[i] != SPTE_TRAP:
                continue
            spte = self.spte_from_gpte(vcpu, sp, self.guest_pte(sp, i), access)
            if spte:
                self.stats["prefetched"] += 1
                self.set_spte(sp, i, spte)

    def install_leaf(self, vcpu, sp: ShadowPage, idx: int, walk, access: int) -> PfResult:
        """The leaf spte of the fault path (the seed's set_pte + fix_write_pf):
        writable only if the guest pte is dirty; read-only if the frame is a shadowed
        page table; an MMIO spte if no memslot; the CR0.WP=0 trick.  Returns FIXED,
        or EMULATE for an access the MMU must carry out (page_fault names why)."""
        g = vcpu.guest
        gfn = walk.paddr >> 12
        leaf = walk.leaf
        rights = walk.rights
        write = access & ACC_WRITE
        user = access & ACC_USER
        if write and not user and not rights & R_W:
            # reached only with CR0.WP=0: the guest allows a supervisor write to a
            # read-only page.  Map it writable but not user (a later user read refaults
            # and flips it back).  Under SMAP, or with protection keys, that would hide
            # the page's U bit from the SMAP or PKRU check, so emulate the write instead.
            if (g.cr4 & CR4_SMAP or g.pk_active) and rights & R_U:
                self.set_spte(sp, idx, self.leaf_spte(sp, gfn, rights, walk.dirty, leaf))    # rights lack W
                return PfResult.EMULATE
            rights = (rights | R_W) & ~R_U
            if sp.role.smep_andnot_wp:
                rights &= ~R_X     # a supervisor fetch from a user page must still fault under SMEP
        elif (write and not user and g.pk_active and rights & R_U and not g.cr0 & CR0_WP
              and g.pkru >> (2 * walk.pkey + 1) & 1):
            # PKRU.WD binds a supervisor write only with CR0.WP=1, and the hardware runs
            # with WP=1: it would refuse this write the guest allows, so emulate it
            self.set_spte(sp, idx, self.leaf_spte(sp, gfn, rights, walk.dirty, leaf))
            return PfResult.EMULATE
        spte = self.leaf_spte(sp, gfn, rights, walk.dirty, leaf)
        if not spte & SPTE_P or spte == SPTE_TRAP:
            self.set_spte(sp, idx, spte)
            return PfResult.EMULATE            # MMIO (or nothing) behind the gpa
        if write and gfn in self.shadowed:
            if self.unsync_enabled and self.try_unsync(gfn):
                # a leaf table the guest may now write directly (its shadow goes out of sync)
                spte = self.leaf_spte(sp, gfn, rights, walk.dirty, leaf)
            elif user and not self._table_in_use(gfn, walk):
                # user code does not write its own page tables: stop shadowing them
                self.stats["unshadowed_user_write"] += 1
                self.unshadow(gfn)
                if sp.zapped:
                    return _FIXED
                spte = self.leaf_spte(sp, gfn, rights, walk.dirty, leaf)
            else:
                self.set_spte(sp, idx, spte)     # read-only: leaf_spte saw the shadowing
                return PfResult.EMULATE
        self.set_spte(sp, idx, spte)
        return _FIXED

    def leaf_spte(self, sp: ShadowPage, gfn: int, rights: int, dirty: bool, gleaf: int) -> int:
        """The leaf spte for gfn in ``sp``: make_spte with what the MMU knows of the
        frame (its host frame, whether it is a write-protected page table).  Under
        bypass an MMIO gpa gets the trap value: the access must exit."""
        pfn = self.gmem.gfn_to_pfn(gfn)
        if pfn is None and self.trap_spte:
            return self.trap_spte
        pages = self.shadowed.get(gfn)
        return make_spte(pfn, gfn, rights, dirty=dirty, write_protect=pages is not None and not pages[0].unsync,
                         pkey_bits=gleaf if sp.role.glevels >= 4 else 0)

    def _table_in_use(self, gfn: int, walk) -> bool:
        """A table this very walk went through, or a vCPU's root: unshadowing it would
        only shadow it again on the next fault (a livelock), so emulate instead."""
        if any(addr >> 12 == gfn for _, addr, _, _ in walk.entries):
            return True
        return any(sp.root_count for sp in self.shadowed.get(gfn, ()))

    def gva_to_gpa(self, vcpu, vaddr: int, access: int = 0) -> int:
        """Translate through the guest's tables without side effects (raises PageFault)."""
        return translate(self.gmem, vcpu.guest, vaddr, access, set_ad=False).paddr
