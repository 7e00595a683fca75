"""Out-of-sync shadow pages (``+unsync``; KVM 2008, Marcelo Tosatti's "oos" series).

Write protection keeps every spte equal to its guest pte, at the price of an exit
for every guest store to a page table.  The architecture asks less: after a guest
changes a present pte, the CPU may go on using the old translation until the guest
invalidates it (INVLPG, a CR3 load, a TLB flush).  So a *leaf* page table may go
out of sync:

    guest write to a shadowed leaf table   one fault: the page is marked unsync and the
                                           table mapped writable; later writes are plain
                                           stores (no exit), its sptes may go stale
    guest INVLPG va                        an exit again: resync the one spte of va
    guest CR3 load, TLB flush              resync every unsync page reachable from the
                                           roots, found through ``unsync_children``

A cached page linked into a new path is resynced first (no TLB holds anything
through that path).  A not-present spte of an unsync page is always the trap value (with ``+bypass``
too): the guest may make a pte present without invalidating anything (no TLB caches
a not-present entry, SDM 4.10.4.3), so that access must reach the MMU.  Only a gfn
shadowed by a single level-1 page may go out of sync (KVM's kvm_unsync_page refuses
a gfn with several roles); a second page for the gfn zaps the unsync one first.
"""

from __future__ import annotations

from array import array

from .shadow_page import ShadowPage
from .spte import SPTE_ADDR, SPTE_P, SPTE_TRAP


class OutOfSync:
    """The out-of-sync share of ShadowMMU (``unsync_enabled``, ``unsync_pages``)."""

    # ------------------------------------------------ unsync_children, up the tree
    def unsync_child_added(self, sp: ShadowPage) -> None:
        """An entry of ``sp`` now leads to a page that needs a resync."""
        sp.unsync_children += 1
        if sp.unsync_children == 1:                 # sp itself now needs a visit: tell its parents
            for addr in sp.parents:
                self.unsync_child_added(self.by_hpfn[addr >> 12])

    def unsync_child_gone(self, sp: ShadowPage) -> None:
        sp.unsync_children -= 1
        if sp.unsync_children == 0:
            for addr in sp.parents:
                self.unsync_child_gone(self.by_hpfn[addr >> 12])

    # ---------------------------------------------------------- going out of sync
    def try_unsync(self, gfn: int) -> bool:
        """A guest write to shadowed table ``gfn``: let it go out of sync if it is
        shadowed by one leaf page only (KVM's mmu_need_write_protect)."""
        pages = self.shadowed[gfn]
        if len(pages) != 1 or pages[0].role.level != 1:
            return False
        sp = pages[0]
        if not sp.unsync:
            sp.unsync = True
            self.unsync_pages.add(sp)
            self.stats["unsync_pages"] += 1
            if self.trap_spte:
                spt = sp.spt
                trap = self.trap_spte
                spt[:] = array("Q", [trap if not v else v for v in spt.tolist()])
            for addr in sp.parents:
                self.unsync_child_added(self.by_hpfn[addr >> 12])
            if self.events is not None:
                self.events.note("page out of sync", f"gfn {gfn:#x}: the guest writes its leaf table directly")
        return True

    def _mark_sync(self, sp: ShadowPage) -> None:
        sp.unsync = False
        self.unsync_pages.discard(sp)
        for addr in sp.parents:
            self.unsync_child_gone(self.by_hpfn[addr >> 12])

    # ------------------------------------------------------------------ resync
    def sync_page(self, vcpu, sp: ShadowPage) -> None:
        """Bring an unsync page back in sync (KVM's kvm_sync_page): write-protect its
        gfn again, then re-derive every present spte from its guest pte as it is now.
        The page is always of the vCPU's current mode (KVM zaps one that is not): it
        is reached from the vCPU's roots or linked by its fault path, and a second
        role for its gfn zaps it (get_page)."""
        self._mark_sync(sp)
        self.stats["synced_pages"] += 1
        self.rmap_write_protect(sp.gfn)
        spt = sp.spt
        gptes = self.guest_ptes(sp)
        access = sp.role.access
        for idx, spte in enumerate(spt.tolist()):
            gpte = gptes[idx]
            if spte & SPTE_P and spte != SPTE_TRAP:
                self.stats["resynced_ptes"] += 1
                self.set_spte(sp, idx, self.spte_from_gpte(vcpu, sp, gpte, access) or self.nonpresent_spte(gpte))
            elif spte != self.nonpresent_spte(gpte):
                spt[idx] = self.nonpresent_spte(gpte)    # back in sync: not-present faults may bypass again
        if self.events is not None:
            self.events.note("page resynced", f"gfn {sp.gfn:#x}: {sp.nr_present} sptes re-derived")

    def sync_roots(self, vcpu) -> None:
        """Resync every unsync page reachable from the vCPU's roots (KVM's
        mmu_sync_roots): what a CR3 load or a full TLB flush owes the guest."""
        if self.unsync_pages:
            self.sync_tree(vcpu, vcpu.mmu_state.roots)

    def sync_tree(self, vcpu, tops) -> None:
        """Resync every unsync page below ``tops``, following unsync_children.  Also
        what a cached page needs when the fault path links it into a new path: no
        TLB ever held a translation through that path, so it must show the guest's
        tables as they are (KVM's kvm_mmu_get_page syncs an unsync page it returns)."""
        stack = [sp for sp in tops if sp is not None and sp.needs_sync]
        while stack:
            sp = stack.pop()
            if sp.unsync:
                self.sync_page(vcpu, sp)
                continue
            if sp.role.level == 1:
                continue                        # synced already through another path
            spt = sp.spt
            for spte in spt.tolist():
                if spte & SPTE_P and spte != SPTE_TRAP:
                    child = self.by_hpfn[(spte & SPTE_ADDR) >> 12]
                    if child.needs_sync:
                        stack.append(child)
        self.flush_tlbs()

    def resync_gva(self, vcpu, vaddr: int) -> None:
        """Guest INVLPG of ``vaddr`` (an exit under +unsync, KVM's FNAME(invlpg)): if
        its leaf spte lives in an unsync page, re-derive it from the guest pte."""
        if vcpu.mmu_roots_invalid:
            return                              # the reload resyncs everything reachable
        sp, level = self.root_for(vcpu.mmu_state, vaddr)
        while sp is not None and level > 1:
            spte = sp.spt[(vaddr >> (12 + 9 * (level - 1))) & 511]
            if not spte & SPTE_P or spte == SPTE_TRAP:
                return
            sp = self.by_hpfn[(spte & SPTE_ADDR) >> 12]
            if sp.role.direct:
                return                          # a guest large page: its table is never unsync
            level -= 1
        if sp is None or not sp.unsync:
            return
        idx = (vaddr >> 12) & 511
        self.stats["resynced_ptes"] += 1
        self.set_spte(sp, idx, self.spte_from_gpte(vcpu, sp, self.guest_pte(sp, idx), sp.role.access)
                      or self.trap_spte)
        self.flush_tlbs()
