"""Guest writes to its own page tables: the seed's change lives here.

A store to a shadowed (write-protected) guest table exits and is emulated;
before the bytes land, ``pte_write`` (KVM's ``kvm_mmu_pte_write``) keeps the
shadow in sync, in KVM's steps:

    detect_write_flooding     many writes in a row: the table is being torn down
    detect_write_misaligned   a write that is not one whole guest pte
    get_written_sptes         which sptes of a shadow page the write covers
    then zap them, or, under "update", install the leaf from the new pte (update_pte)

Policy "zap" clears the spte that mirrored the old guest pte (3 exits per demand
fault), "update" installs one from the new value (2 exits)::

      guest                         host (zap)                    host (update)
      touch va ----#PF exit------>  gpte not present: inject #PF
      handler: *pte = new --exit->  emulate; clear spte           emulate; spte = f(new)
      iret, touch va --#PF exit-->  install spte                  (no exit)
"""

from __future__ import annotations

from ..x86.bits import PTE_A, PTE_D, PTE_P, R_ALL
from .shadow_page import ShadowPage
from .spte import SPTE_A, SPTE_ADDR, SPTE_P, SPTE_PRESENT_TEST, gpte_rights

FLOOD_THRESHOLD = 3       # consecutive emulated writes to one gfn before it is unshadowed


class PteWrites:
    """The pte-write share of ShadowMMU."""

    def emulated_write(self, vcpu, gpa: int, value: int, size: int) -> None:
        """A store the MMU carries out for the guest (after a PTE_WRITE, MMIO or
        EMULATE exit; KVM's emulator_write_phys): keep the shadow in sync, log the
        page, then let the bytes land (on RAM, or on the device behind the gpa)."""
        gfn = gpa >> 12
        if gfn in self.shadowed:
            self.pte_write(vcpu, gpa, value.to_bytes(size, "little"))
        self.mark_dirty(gfn)
        self.gmem.write_uint(gpa, value, size)

    def pte_write(self, vcpu, gpa: int, data: bytes) -> None:
        """An emulated guest write of ``data`` at ``gpa``, before the bytes land."""
        gfn = gpa >> 12
        pages = self.shadowed.get(gfn)
        if not pages:
            return
        flooded = self.detect_write_flooding(vcpu, gfn)
        offset = gpa & 0xFFF
        nbytes = len(data)
        for sp in list(pages):
            if flooded or self.detect_write_misaligned(sp, offset, nbytes):
                self.stats["flooded" if flooded else "misaligned_zaps"] += 1
                if self.events is not None:
                    self.events.note("zap on pte write", f"gfn {gfn:#x}: {'flood' if flooded else 'misaligned'}")
                self.zap_page(sp)
                continue
            written = self.get_written_sptes(sp, offset)
            if not written:
                continue
            pte_size = 4 if sp.role.glevels == 2 else 8
            new = int.from_bytes(data[:pte_size], "little") if nbytes >= pte_size else None
            update = sp.role.level == 1 and self.policy == "update" and new is not None
            if self.events is not None:
                self.events.note("pte write", f"guest writes {int.from_bytes(data, 'little'):#x} to its "
                                 f"level-{sp.role.level} table gfn {gfn:#x} +{offset:#x}; policy "
                                 f"{self.policy!r}: {'install the spte from it' if update else 'clear the spte'}")
            for idx in written:
                self.set_spte(sp, idx, self.trap_spte)
                self.stats["pte_zaps"] += 1
                if update:
                    self.update_pte(vcpu, sp, idx, new)
        self.flush_tlbs()

    def detect_write_flooding(self, vcpu, gfn: int) -> bool:
        """Writes to one table in a row, with no fault elsewhere between them, mean the
        guest is filling or tearing it down (fork, exit): stop shadowing it rather
        than emulate every store.  The count is per vCPU; page_fault resets it."""
        st = vcpu.mmu_state
        if gfn == st.last_pt_write_gfn and not self._last_update_used(st):
            st.last_pt_write_count += 1
        else:
            st.last_pt_write_gfn, st.last_pt_write_count = gfn, 1
        return st.last_pt_write_count >= FLOOD_THRESHOLD

    def _last_update_used(self, st) -> bool:
        """Bypass: a guest's demand faults no longer pass through page_fault, so its pte
        writes come in a row as in a fork.  KVM's flood detector then also asks whether
        the guest used the spte it installed last (last_updated_pte_accessed, 2.6.25):
        update_pte installs it with A clear and the hardware walk sets A."""
        addr = st.last_pte_updated
        if addr < 0 or not self.trap_spte:
            return False
        return bool(self.host.qwords(addr >> 12)[(addr & 0xFFF) >> 3] & SPTE_A)

    @staticmethod
    def detect_write_misaligned(sp: ShadowPage, offset: int, nbytes: int) -> bool:
        """A write that straddles two guest ptes or covers less than 4 bytes: no whole
        new pte to read, so the page is zapped (a guest does this rarely)."""
        pte_size = 4 if sp.role.glevels == 2 else 8
        return bool((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4

    @staticmethod
    def get_written_sptes(sp: ShadowPage, offset: int) -> range:
        """The sptes of ``sp`` that shadow the guest pte at byte ``offset`` of its table:
        one, or two for a 32-bit PDE (a 4 MB guest entry is two 2 MB shadow entries),
        none if a 32-bit guest's write falls in a quadrant this page does not shadow."""
        role = sp.role
        if role.glevels != 2:
            return range(offset >> 3, (offset >> 3) + 1)
        page_offset = offset << 1                 # 4-byte guest ptes, 8-byte sptes
        npte = 1
        if role.level == 2:
            page_offset = (page_offset & ~7) << 1
            npte = 2
        if page_offset >> 12 != role.quadrant:
            return range(0)
        idx = (page_offset & 0xFFF) >> 3
        return range(idx, idx + npte)

    def update_pte(self, vcpu, sp: ShadowPage, idx: int, gpte: int) -> None:
        """The seed: install the spte from the guest pte just written, if it is
        present and accessed (A=0 must trap so the A bit gets set; D=0 maps it
        read-only so the first write sets D) and has no reserved bit.  Rights: the
        page's inherited access AND the pte's, or, with ``seed_access_bug``, the
        seed's constant U|W that ignores the upper levels."""
        cur = vcpu.mmu_state.base_role
        if (sp.role.glevels, sp.role.nxe, sp.role.cr0_wp) != (cur.glevels, cur.nxe, cur.cr0_wp):
            return      # a page cached for another guest mode: the reserved-bit rules differ
        spte = self.spte_from_gpte(vcpu, sp, gpte, R_ALL if self.seed_access_bug else sp.role.access)
        if spte:
            self.stats["pte_updates"] += 1
            if self.trap_spte:
                spte &= ~SPTE_A              # see _last_update_used
                vcpu.mmu_state.last_pte_updated = sp.spte_addr(idx)
            self.set_spte(sp, idx, spte)
        elif not sp.unsync:
            # bypass: a pte written not present lets the guest's next fault there skip the
            # hypervisor (FNAME(update_pte)'s shadow_notrap_nonpresent_pte)
            self.set_spte(sp, idx, self.nonpresent_spte(gpte))

    def spte_from_gpte(self, vcpu, sp: ShadowPage, gpte: int, access: int) -> int:
        """The leaf spte a guest pte of ``sp``'s table calls for, with rights
        ``access`` & the pte's, or 0 when it must trap instead: not present, A=0 (the
        access must set it), a reserved bit (the access must fault), or no RAM behind
        it.  A clean pte maps read-only (the first write sets D).  Used where KVM
        installs an spte without a fault: update_pte (the seed) and pte prefetch."""
        if ~gpte & (PTE_P | PTE_A):
            return 0
        wide = sp.role.glevels >= 3
        if wide and gpte & vcpu.guest.rows[-1].rsvd_table:    # the level-1 reserved bits for this CPU state
            return 0
        rights = gpte_rights(gpte, wide, sp.role.nxe) & access
        gfn = (gpte & (SPTE_ADDR if wide else 0xFFFFF000)) >> 12
        spte = self.leaf_spte(sp, gfn, rights, bool(gpte & PTE_D), gpte)
        return spte if spte & SPTE_PRESENT_TEST == SPTE_P else 0
