"""The shadow page cache: pages by (gfn, role), the rmap, and the one spte writer.

KVM's mmu.c keeps the same three things together: the hash of shadow pages
(``kvm_mmu_get_page``), the reverse map from a guest frame to the writable sptes
that map it (``rmap_add``/``rmap_write_protect``), and ``set_spte``, through
which every spte change goes so that the rmap, the parent links, the
TLB-flush flag and the dirty log stay exact.
"""

from __future__ import annotations

from array import array

from ..x86.bits import PTE_P
from .shadow_page import ShadowPage
from .spte import SPTE_ADDR, SPTE_P, SPTE_PRESENT_TEST, SPTE_W, Role


class MMUError(RuntimeError):
    """An internal inconsistency or an impossible configuration (never a guest's doing)."""


class PageCache:
    """The page-cache share of ShadowMMU (state set up in ``ShadowMMU.__init__``):
    ``pages`` (gfn, role) -> page, ``shadowed`` gfn -> its non-direct pages,
    ``by_hpfn``, ``lru``, ``rmap`` gfn -> host addresses of writable leaf sptes,
    ``free`` frames of the pool."""

    # ------------------------------------------------------------ the one writer
    def set_spte(self, sp: ShadowPage, idx: int, new: int) -> None:
        """Every spte write goes through here (KVM: "all modifications must go
        through..."): parent links, rmap, the TLB-flush flag and the dirty log."""
        spt = sp.spt
        old = spt[idx]
        if old == new:
            return
        addr = (sp.hpfn << 12) | (idx << 3)
        level = sp.role.level
        if old & SPTE_PRESENT_TEST == SPTE_P:
            if level > 1:
                child = self.by_hpfn[(old & SPTE_ADDR) >> 12]
                child.parents.discard(addr)
                if child.needs_sync:
                    self.unsync_child_gone(sp)
            elif old & SPTE_W:
                gfn = self.gmem.pfn_to_gfn((old & SPTE_ADDR) >> 12)
                s = self.rmap.get(gfn)
                if s is not None:
                    s.discard(addr)
                    if not s:
                        del self.rmap[gfn]
            sp.nr_present -= 1
            # a cached translation may rest on the old value
            self.tlb_flush_needed = True
        if new & SPTE_PRESENT_TEST == SPTE_P:
            if level > 1:
                child = self.by_hpfn[(new & SPTE_ADDR) >> 12]
                child.parents.add(addr)
                if child.needs_sync:
                    self.unsync_child_added(sp)
            elif new & SPTE_W:
                gfn = self.gmem.pfn_to_gfn((new & SPTE_ADDR) >> 12)
                self.rmap.setdefault(gfn, set()).add(addr)
                # writes through this spte bypass the MMU from now on: log the page
                # now (KVM's handle_changed_spte_dlog)
                if self.dirty_logging:
                    self.mark_dirty(gfn)
            sp.nr_present += 1
        spt[idx] = new
        if self.events is not None:
            self.events.spte(sp, idx, old, new)

    def flush_tlbs(self) -> None:
        """KVM's kvm_flush_remote_tlbs: after sptes lost rights or went away."""
        if self.tlb_flush_needed:
            for v in self.vcpus:
                v.tlb.flush()
            self.tlb_flush_needed = False
            self.stats["tlb_flushes"] += 1

    # --------------------------------------------------------------- the pages
    def _alloc_frame(self) -> int:
        if not self.free:
            raise MMUError("shadow page pool exhausted (make_room() was not called first)")
        return self.free.pop()

    def get_page(self, gfn: int, role: Role) -> ShadowPage:
        """Find the shadow page (gfn, role) or create it; creating a non-direct page
        write-protects its gfn (every writable spte mapping it becomes read-only).
        An out-of-sync page of the gfn is zapped first: a second page means a second
        role, and a gfn shadowed with several roles is never out of sync."""
        key = (gfn, role)
        sp = self.pages.get(key)
        if sp is not None:
            self.lru.move_to_end(sp)
            return sp
        if not role.direct:
            others = self.shadowed.get(gfn)
            if others and others[0].unsync:
                self.stats["unsync_zapped"] += 1
                self.zap_page(others[0])
        hpfn = self._alloc_frame()
        sp = ShadowPage(gfn, role, hpfn, self.host.qwords_w(hpfn))
        self.pages[key] = sp
        self.by_hpfn[hpfn] = sp
        self.lru[sp] = None
        self.stats["pages_created"] += 1
        if not role.direct:
            self.shadowed.setdefault(gfn, []).append(sp)
            self.rmap_write_protect(gfn)
        if self.trap_spte:
            self.init_nonpresent(sp)
        if self.events is not None:
            self.events.note("shadow page created", f"gfn {gfn:#x} {role.describe()}")
        return sp

    def rmap_write_protect(self, gfn: int) -> None:
        for addr in list(self.rmap.get(gfn, ())):
            sp = self.by_hpfn[addr >> 12]
            idx = (addr & 0xFFF) >> 3
            self.set_spte(sp, idx, sp.spt[idx] & ~SPTE_W)

    def zap_page(self, sp: ShadowPage) -> None:
        """Remove a shadow page: clear its sptes (children and rmap unlinked), clear
        every spte pointing at it, forget it.  A root in use keeps its frame until
        released; its vCPUs reload their roots."""
        if sp.zapped:
            return
        spt = sp.spt
        for idx, v in enumerate(spt):
            if v:
                self.set_spte(sp, idx, 0)    # MMIO marks and trap values too: the pool keeps zeroed frames
        for addr in list(sp.parents):
            parent = self.by_hpfn[addr >> 12]
            self.set_spte(parent, (addr & 0xFFF) >> 3, self.trap_spte)
        if sp.unsync:
            sp.unsync = False
            self.unsync_pages.discard(sp)
        del self.pages[(sp.gfn, sp.role)]
        self.lru.pop(sp, None)
        if not sp.role.direct:
            lst = self.shadowed[sp.gfn]
            lst.remove(sp)
            if not lst:
                del self.shadowed[sp.gfn]
        sp.zapped = True
        self.stats["pages_zapped"] += 1
        if self.events is not None:
            self.events.note("shadow page zapped", f"gfn {sp.gfn:#x} {sp.role.describe()}")
        if sp.root_count:
            if self.trap_spte:
                # the hardware runs on this root until its vCPU reloads: every access
                # must exit (a 0 would hand the guest a not-present fault of its own)
                sp.spt[:] = array("Q", (self.trap_spte,)) * 512
            for v in self.vcpus:
                if sp in v.mmu_state.roots:
                    v.mmu_roots_invalid = True
        else:
            self._free_page(sp)

    def _free_page(self, sp: ShadowPage) -> None:
        if self.trap_spte:
            sp.spt[:] = array("Q", (0,)) * 512      # a zapped root held trap values
        del self.by_hpfn[sp.hpfn]
        self.free.append(sp.hpfn)

    def unshadow(self, gfn: int) -> None:
        """Zap every shadow page of gfn: the guest page stops being write-protected."""
        for sp in list(self.shadowed.get(gfn, ())):
            self.zap_page(sp)

    def make_room(self, needed: int) -> None:
        """Reclaim least-recently-used pages until ``needed`` frames are free (KVM's
        free_some_pages, called before a fault so the fault path never has to)."""
        while len(self.free) < needed:
            victim = next((sp for sp in self.lru if not sp.root_count), None)
            if victim is None:
                raise MMUError(f"shadow page pool of {self.pool_size} pages is too small: every page is a root")
            self.stats["reclaimed"] += 1
            self.zap_page(victim)
        self.flush_tlbs()

    def is_shadowed(self, gfn: int) -> bool:
        return gfn in self.shadowed

    @property
    def nr_pages(self) -> int:
        return len(self.pages)

    # ------------------------------------------------------ the guest's side of a page
    def guest_ptes(self, sp: ShadowPage) -> list[int]:
        """The guest entries behind a non-direct page's 512 sptes, index by index: a
        32-bit guest's 1024-entry table is shadowed in halves (level 1) or quarters
        whose 4 MB entries each take two sptes (level 2)."""
        role = sp.role
        if role.glevels != 2:
            return self.gmem.qwords(sp.gfn).tolist()
        words = self.gmem.dwords(sp.gfn)
        if role.level == 1:
            return words[role.quadrant * 512:(role.quadrant + 1) * 512].tolist()
        quarter = words[role.quadrant * 256:(role.quadrant + 1) * 256].tolist()
        return [quarter[i >> 1] for i in range(512)]

    def guest_pte(self, sp: ShadowPage, idx: int) -> int:
        """The guest pte behind sptes[idx] of a guest leaf table's page (level 1)."""
        if sp.role.glevels != 2:
            return self.gmem.qwords(sp.gfn)[idx]
        return self.gmem.dwords(sp.gfn)[sp.role.quadrant * 512 + idx]

    def nonpresent_spte(self, gpte: int) -> int:
        """What stands in for a mapping of a guest entry: 0 (bypass: "notrap") when the
        guest entry is not present, else the trap value (0 without bypass)."""
        return self.trap_spte if gpte & PTE_P else 0

    def init_nonpresent(self, sp: ShadowPage) -> None:
        """Bypass: a new page's sptes start as the trap value, except that the entries
        whose guest entry is not present get 0 (KVM's FNAME(prefetch_page)): the
        guest's fault there needs no hypervisor.  Neither value is a mapping, so they
        are written directly (nothing to link, count or flush)."""
        spt = sp.spt
        trap = self.trap_spte
        if sp.role.direct:
            spt[:] = array("Q", (trap,)) * 512
            return
        spt[:] = array("Q", [trap if gpte & PTE_P else 0 for gpte in self.guest_ptes(sp)])
