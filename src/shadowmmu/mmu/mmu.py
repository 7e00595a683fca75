"""The shadow MMU: KVM's x86 shadow paging as of the seed commit, with its later fixes.

One implementation for every guest paging format (the seed's ``paging_tmpl.h``
compiled for 32- and 64-bit guest ptes becomes the format parameter of the x86
walker).  The main events and what the MMU does, in KVM's vocabulary:

    guest access, no valid spte          hardware #PF -> VM exit -> page_fault():
        walk_guest()   guest tables say fault -> inject #PF (exact error code)
        fetch()        build the shadow path, install the leaf spte
                       -> HANDLED (retry) | EMULATE (page-table write, MMIO)
    guest store to a shadowed table      the spte mapping it is read-only -> exit ->
                                         EMULATE -> pte_write() before the bytes land
    guest CR3 / paging-mode change       new_cr3() / reset_context(): switch roots,
                                         cached shadow pages are kept

The seed's change lives in ``pte_write``: policy "zap" clears the spte that
mirrored the old guest pte (3 exits per demand fault), "update" installs one from
the new value (2 exits)::

      guest                         host (zap)                    host (update)
      touch va ----#PF exit------>  gpte not present: inject #PF
      handler: *pte = new --exit->  emulate; clear spte           emulate; spte = f(new)
      iret, touch va --#PF exit-->  install spte                  (no exit)
"""

from __future__ import annotations

from collections import OrderedDict

from ..x86.bits import (
    ACC_USER, ACC_WRITE, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_PSE, CR4_SMAP,
    CR4_SMEP, EFER_LME, EFER_NXE, PTE_A, PTE_D, PTE_P, PTE_PKEY_MASK,
)
from ..x86.faults import PageFault
from ..x86.formats import PagingMode
from ..x86.walker import translate
from .shadow_page import ShadowPage
from .spte import (
    ACC_ALL, ACC_DIRTY, ACC_U, ACC_W, ACC_X, SPTE_A, SPTE_ADDR, SPTE_D, SPTE_GUEST_W, SPTE_MMIO,
    SPTE_NX, SPTE_P, SPTE_TABLE, SPTE_U, SPTE_W, Role, gpte_access,
)

# page_fault() results (KVM: 0 handled, 1 emulate, <0 error; an injected #PF is "handled")
HANDLED, EMULATE, INJECTED = 0, 1, 2

POLICIES = ("zap", "update")
GUEST_LEVELS = {PagingMode.NONE: 0, PagingMode.BITS32: 2, PagingMode.PAE: 3, PagingMode.LEVEL4: 4,
                PagingMode.LEVEL5: 5}
FLOOD_THRESHOLD = 3       # consecutive emulated writes to one gfn before it is unshadowed


class MMUError(RuntimeError):
    """An internal inconsistency or an impossible configuration (never a guest's doing)."""


class VcpuMmuState:
    """Per-vCPU MMU state: roots, the PAE root table, the flood detector."""

    __slots__ = ("roots", "pae_root_hpfn", "last_pt_write_gfn", "last_pt_write_count", "glevels", "base_role")

    def __init__(self, pae_root_hpfn: int):
        self.roots: list[ShadowPage | None] = []
        self.pae_root_hpfn = pae_root_hpfn
        self.last_pt_write_gfn = -1
        self.last_pt_write_count = 0
        self.glevels = -1
        self.base_role = None


class ShadowMMU:
    """Shadow page tables for the guests of one VM.

    ``gmem`` is guest-physical memory (memslots), ``host`` the host physical
    memory, ``pool`` the host frames shadow pages may use (a bounded pool, KVM's
    n_free_mmu_pages), ``events`` an EventLog or None."""

    def __init__(self, host, gmem, pool_frames: list[int], *, pte_write: str = "update",
                 seed_access_bug: bool = False, events=None):
        if pte_write not in POLICIES:
            raise ValueError(f"pte_write policy must be one of {POLICIES}, got {pte_write!r}")
        if len(pool_frames) < 16:
            raise ValueError(f"the shadow page pool needs at least 16 frames, got {len(pool_frames)}")
        self.host = host
        self.gmem = gmem
        self.policy = pte_write
        self.seed_access_bug = seed_access_bug
        self.events = events
        self.pool_size = len(pool_frames)
        self.free = list(reversed(pool_frames))
        self.pool_lo, self.pool_hi = min(pool_frames), max(pool_frames) + 1
        self.pages: dict[tuple[int, Role], ShadowPage] = {}
        self.shadowed: dict[int, list[ShadowPage]] = {}    # gfn -> non-direct pages shadowing it
        self.by_hpfn: dict[int, ShadowPage] = {}
        self.lru: OrderedDict[ShadowPage, None] = OrderedDict()
        self.rmap: dict[int, set[int]] = {}                # gfn -> host addresses of writable leaf sptes
        self.vcpus = []
        self.tlb_flush_needed = False
        self.dirty_logging = False          # any memslot logging: mark_dirty has work to do
        self.stats = {"pages_created": 0, "pages_zapped": 0, "reclaimed": 0, "flooded": 0,
                      "unshadowed_user_write": 0, "tlb_flushes": 0, "pte_updates": 0, "pte_zaps": 0,
                      "misaligned_zaps": 0}

    # ------------------------------------------------------------------ vcpus
    def attach(self, vcpu) -> None:
        """Give a vCPU its MMU state (a PAE root table taken from the pool)."""
        vcpu.mmu_state = VcpuMmuState(self._alloc_frame())
        self.pool_size -= 1          # the PAE root table is not a shadow page
        self.vcpus.append(vcpu)
        self.reset_context(vcpu)

    # ------------------------------------------------------------ the one writer
    def set_spte(self, sp: ShadowPage, idx: int, new: int) -> None:
        """Every spte write goes through here: rmap, parent links and the TLB-flush
        flag stay exact (KVM: "all modifications must go through...")."""
        spt = sp.spt
        old = spt[idx]
        if old == new:
            return
        addr = (sp.hpfn << 12) | (idx << 3)
        level = sp.role.level
        if old & SPTE_P:
            if level > 1:
                self.by_hpfn[(old & SPTE_ADDR) >> 12].parents.discard(addr)
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
        if new & SPTE_P:
            if level > 1:
                self.by_hpfn[(new & SPTE_ADDR) >> 12].parents.add(addr)
            elif new & SPTE_W:
                gfn = self.gmem.pfn_to_gfn((new & SPTE_ADDR) >> 12)
                self.rmap.setdefault(gfn, set()).add(addr)
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

    # --------------------------------------------------------------- page cache
    def _alloc_frame(self) -> int:
        if not self.free:
            raise MMUError("shadow page pool exhausted (make_room() was not called first)")
        return self.free.pop()

    def get_page(self, gfn: int, role: Role) -> ShadowPage:
        """Find the shadow page (gfn, role) or create it; creating a non-direct page
        write-protects its gfn (every writable spte mapping it becomes read-only)."""
        key = (gfn, role)
        sp = self.pages.get(key)
        if sp is not None:
            self.lru.move_to_end(sp)
            return sp
        hpfn = self._alloc_frame()
        sp = ShadowPage(gfn, role, hpfn, self.host.qwords_w(hpfn))
        self.pages[key] = sp
        self.by_hpfn[hpfn] = sp
        self.lru[sp] = None
        self.stats["pages_created"] += 1
        if not role.direct:
            self.shadowed.setdefault(gfn, []).append(sp)
            self.rmap_write_protect(gfn)
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
                self.set_spte(sp, idx, 0)    # MMIO marks too: not present, not zero
        for addr in list(sp.parents):
            parent = self.by_hpfn[addr >> 12]
            self.set_spte(parent, (addr & 0xFFF) >> 3, 0)
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
            for v in self.vcpus:
                if sp in v.mmu_state.roots:
                    v.mmu_roots_invalid = True
        else:
            self._free_page(sp)

    def _free_page(self, sp: ShadowPage) -> None:
        del self.by_hpfn[sp.hpfn]
        self.free.append(sp.hpfn)

    def unshadow(self, gfn: int) -> None:
        """Zap every shadow page of gfn: the guest page stops being write-protected."""
        for sp in list(self.shadowed.get(gfn, ())):
            self.zap_page(sp)

    def make_room(self, needed: int) -> None:
        """Reclaim least-recently-used pages until ``needed`` frames are free (KVM's
        free_some_pages, called before a fault so fetch() never has to)."""
        while len(self.free) < needed:
            victim = next((sp for sp in self.lru if not sp.root_count), None)
            if victim is None:
                raise MMUError(f"shadow page pool of {self.pool_size} pages is too small: every page is a root")
            self.stats["reclaimed"] += 1
            self.zap_page(victim)
        self.flush_tlbs()

    def is_shadowed(self, gfn: int) -> bool:
        return gfn in self.shadowed

    # ------------------------------------------------------------------- roots
    def _base_role(self, vcpu) -> Role:
        g = vcpu.guest
        wp = bool(g.cr0 & CR0_WP)
        glevels = GUEST_LEVELS[g.mode]
        return Role(level=0, glevels=glevels, nxe=bool(g.efer & EFER_NXE), cr0_wp=wp,
                    smep_andnot_wp=bool(g.cr4 & CR4_SMEP) and not wp,
                    smap_andnot_wp=bool(g.cr4 & CR4_SMAP) and not wp,
                    pke_andnot_wp=g.pk_active and not wp,
                    pse=glevels == 2 and bool(g.cr4 & CR4_PSE))

    def reset_context(self, vcpu) -> None:
        """Paging mode, CR0.WP, EFER.NXE or CR4 bits changed: new roots of the new role."""
        self._release_roots(vcpu)
        self._load_roots(vcpu)

    def new_cr3(self, vcpu) -> None:
        """Guest CR3 load: switch roots (cached shadow pages stay) and flush."""
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
        base = self._base_role(vcpu)
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
        # leave paging off first so the mode switch is a fresh load
        hw.load(self.host, cr0=CR0_PE, cr4=0, efer=0, cr3=0)
        hw.load(self.host, cr4=cr4, efer=efer, cr3=cr3, cr0=CR0_PE | CR0_PG | CR0_WP)
        hw.cpl, hw.ac, hw.pkru = g.cpl, g.ac, g.pkru
        vcpu.tlb.flush()

    # -------------------------------------------------------------- fault path
    def page_fault(self, vcpu, vaddr: int, access: int):
        """A hardware #PF on the shadow tables exited to the MMU (KVM's page_fault).
        Returns (HANDLED, None) | (EMULATE, gpa) | (INJECTED, PageFault)."""
        if vcpu.mmu_roots_invalid:
            self._release_roots(vcpu)
            self._load_roots(vcpu)
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
            if self.tlb_flush_needed:
                self.flush_tlbs()
            return INJECTED, pf
        if before:
            self._log_changed_tables(before, walk.entries)
        result = self.fetch(vcpu, vaddr, access, walk)
        if result[0] != EMULATE or result[1] >> 12 not in self.shadowed:
            st.last_pt_write_count = 0     # only consecutive page-table writes count
        if self.tlb_flush_needed:
            self.flush_tlbs()
        return result

    def _walked_entries(self, vcpu, vaddr: int, access: int) -> dict[int, int]:
        """Entry address -> value along the guest walk, read without side effects."""
        try:
            entries = translate(self.gmem, vcpu.guest, vaddr, access, set_ad=False).entries
        except PageFault as pf:
            entries = pf.entries
        return {addr: value for _, addr, value in entries}

    def _log_changed_tables(self, before: dict[int, int], entries) -> None:
        """The guest walk sets A/D bits in the tables it passes: writes to guest
        memory on the guest's behalf, which the dirty log must show (the seed's
        walker calls mark_page_dirty when it sets A).  Only the tables whose entry
        changed are logged, as KVM does."""
        for _, addr, value in entries:
            if before.get(addr, value) != value:
                self.mark_dirty(addr >> 12)

    def fetch(self, vcpu, vaddr: int, access: int, walk):
        """Build the shadow path for a successful guest walk and install the leaf."""
        st = vcpu.mmu_state
        base = st.base_role
        glevels = base.glevels
        wide = glevels >= 3
        nxe = base.nxe
        # guest entries, top first: the one of level L is entries[top - L]
        entries = walk.entries
        top = entries[0][0] if entries else 0
        nentries = len(entries)
        if glevels >= 4:
            sp, level = st.roots[0], glevels
        else:
            sp, level = st.roots[(vaddr >> 30) & 3], 2
            if sp is None:
                raise MMUError("guest walk succeeded through a PDPTE that has no shadow root")
        start_level = level             # (a PAE PDPTE, above it, grants every right)
        gpage_level = {12: 1, 21: 2, 22: 2, 30: 3}[walk.page_shift]
        while level > 1:
            idx = (vaddr >> (12 + 9 * (level - 1))) & 511
            ge = entries[top - level][2] if 0 <= top - level < nentries else None
            child_level = level - 1
            large = glevels == 0 or gpage_level >= level
            spte = sp.spt[idx]
            if spte & SPTE_P and not large:
                child = self.by_hpfn[(spte & SPTE_ADDR) >> 12]
                if not child.role.direct:
                    # write protection keeps a guest-table path in sync: any guest edit
                    # of the entries above would have cleared this spte
                    self.lru.move_to_end(child)
                    sp, level = child, child_level
                    continue
            # the rights inherited from the guest entries down to this level (the role's access)
            access_above = ACC_ALL
            for lvl in range(start_level, level - 1, -1):
                if 0 <= top - lvl < nentries:
                    access_above &= gpte_access(entries[top - lvl][2], wide, nxe)
            if large:
                # guest large page (or no paging): a direct page of 4K sptes, keyed by
                # the first frame it maps and the large page's rights -- without W
                # while the guest entry is clean, so the first write refaults, sets D
                # and moves to the writable twin (KVM's direct_access)
                span = 9 * child_level
                gfn = ((walk.paddr >> 12) >> span) << span
                if walk.dirty or not walk.entries:
                    direct_access = access_above | ACC_DIRTY
                else:
                    direct_access = access_above & ~ACC_W
                # the large page's protection key too: two large pages of one frame
                # with different keys must not share sptes (each spte carries a key)
                role = base._replace(level=child_level, direct=True, access=direct_access,
                                     pkey=walk.pkey if glevels >= 4 else 0)
            else:
                gfn = (ge & (SPTE_ADDR if wide else 0xFFFFF000)) >> 12
                quadrant = (vaddr >> 21) & 1 if glevels == 2 else 0
                role = base._replace(level=child_level, quadrant=quadrant, access=access_above)
            spte = sp.spt[idx]
            if spte & SPTE_P:
                child = self.by_hpfn[(spte & SPTE_ADDR) >> 12]
                if child.gfn == gfn and child.role == role:
                    self.lru.move_to_end(child)
                    sp, level = child, child_level
                    continue
                self.set_spte(sp, idx, 0)       # the guest entry now calls for another page
            child = self.get_page(gfn, role)
            self.set_spte(sp, idx, (child.hpfn << 12) | SPTE_TABLE)
            sp, level = child, child_level
        self.lru.move_to_end(sp)
        return self.install_leaf(vcpu, sp, (vaddr >> 12) & 511, walk, access)

    def install_leaf(self, vcpu, sp: ShadowPage, idx: int, walk, access: int):
        """The leaf spte of the fault path (the seed's set_pte + fix_write_pf):
        writable only if the guest pte is dirty; read-only if the frame is a shadowed
        page table; an MMIO spte if no memslot; the CR0.WP=0 trick."""
        g = vcpu.guest
        gfn = walk.paddr >> 12
        leaf = walk.entries[-1][2] if walk.entries else PTE_A | PTE_D
        rights = (ACC_W if walk.writable else 0) | (ACC_U if walk.user else 0) | (ACC_X if walk.executable else 0)
        dirty = bool(leaf & PTE_D) or not walk.entries
        write = access & ACC_WRITE
        user = access & ACC_USER
        if write and not user and not rights & ACC_W:
            # reached only with CR0.WP=0: the guest allows a supervisor write to a
            # read-only page.  Map it writable but not user (a later user read refaults
            # and flips it back).  Under SMAP, or with protection keys, that would hide
            # the page's U bit from the SMAP or PKRU check, so emulate the write instead.
            if (g.cr4 & CR4_SMAP or g.pk_active) and rights & ACC_U:
                spte = self._leaf_value(vcpu, sp, gfn, rights, dirty, leaf)
                self.set_spte(sp, idx, spte & ~SPTE_W)
                return EMULATE, walk.paddr
            rights = (rights | ACC_W) & ~ACC_U
            if sp.role.smep_andnot_wp:
                rights &= ~ACC_X     # a supervisor fetch from a user page must still fault under SMEP
        elif (write and not user and g.pk_active and rights & ACC_U and not g.cr0 & CR0_WP
              and g.pkru >> (2 * walk.pkey + 1) & 1):
            # PKRU.WD binds a supervisor write only with CR0.WP=1, and the hardware runs
            # with WP=1: it would refuse this write the guest allows, so emulate it
            self.set_spte(sp, idx, self._leaf_value(vcpu, sp, gfn, rights, dirty, leaf))
            return EMULATE, walk.paddr
        spte = self._leaf_value(vcpu, sp, gfn, rights, dirty, leaf)
        if not spte & SPTE_P:
            self.set_spte(sp, idx, spte)
            return EMULATE, walk.paddr          # MMIO (or nothing) behind the gpa
        if write and self.is_shadowed(gfn):
            if user and not self._table_in_use(gfn, walk):
                # user code does not write its own page tables: stop shadowing them
                self.stats["unshadowed_user_write"] += 1
                self.unshadow(gfn)
                if sp.zapped:
                    return HANDLED, None
                spte = self._leaf_value(vcpu, sp, gfn, rights, dirty, leaf)
            else:
                self.set_spte(sp, idx, spte)     # read-only: _leaf_value saw the shadowing
                return EMULATE, walk.paddr
        self.set_spte(sp, idx, spte)
        return HANDLED, None

    def _table_in_use(self, gfn: int, walk) -> bool:
        """A table this very walk went through, or a vCPU's root: unshadowing it would
        only shadow it again on the next fault (a livelock), so emulate instead."""
        if any(addr >> 12 == gfn for _, addr, _ in walk.entries):
            return True
        return any(sp.root_count for sp in self.shadowed.get(gfn, ()))

    def _leaf_value(self, vcpu, sp: ShadowPage, gfn: int, rights: int, dirty: bool, gleaf: int) -> int:
        """A leaf spte for gfn with the given rights (KVM's set_pte body)."""
        pfn = self.gmem.gfn_to_pfn(gfn)
        if pfn is None:
            return SPTE_MMIO | (gfn << 12)
        spte = (pfn << 12) | SPTE_P | SPTE_A
        if rights & ACC_U:
            spte |= SPTE_U
        if not rights & ACC_X:
            spte |= SPTE_NX
        if sp.role.glevels >= 4:
            spte |= gleaf & PTE_PKEY_MASK
        if rights & ACC_W:
            spte |= SPTE_GUEST_W
            if not dirty:
                pass                                  # first write traps and sets the guest's D
            elif self.is_shadowed(gfn):
                pass                                  # a guest page table: writes must trap
            else:
                spte |= SPTE_W | SPTE_D
                self.mark_dirty(gfn)
        return spte

    # ------------------------------------------------------------ pte writes
    def pte_write(self, vcpu, gpa: int, data: bytes) -> None:
        """An emulated guest write to a shadowed page, before the bytes land
        (KVM's kvm_mmu_pte_write).  Flood detection, misaligned writes, then per
        shadow page of the gfn: clear the sptes the write covers, and under the
        "update" policy install a leaf spte from the new guest pte."""
        gfn = gpa >> 12
        pages = self.shadowed.get(gfn)
        if not pages:
            return
        st = vcpu.mmu_state
        if gfn == st.last_pt_write_gfn:
            st.last_pt_write_count += 1
        else:
            st.last_pt_write_gfn, st.last_pt_write_count = gfn, 1
        flooded = st.last_pt_write_count >= FLOOD_THRESHOLD
        offset = gpa & 0xFFF
        nbytes = len(data)
        for sp in list(pages):
            if sp.zapped:
                continue
            role = sp.role
            pte_size = 4 if role.glevels == 2 else 8
            misaligned = ((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4
            if misaligned or flooded:
                self.stats["flooded" if flooded else "misaligned_zaps"] += 1
                if self.events is not None:
                    self.events.note("zap on pte write", f"gfn {gfn:#x}: {'flood' if flooded else 'misaligned'}")
                self.zap_page(sp)
                continue
            page_offset = offset
            npte = 1
            if role.glevels == 2:
                page_offset <<= 1                 # 4-byte guest ptes, 8-byte sptes
                if role.level == 2:
                    page_offset &= ~7             # one 4 MB guest PDE = two 2 MB shadow PDEs
                    page_offset <<= 1
                    npte = 2
                if page_offset >> 12 != role.quadrant:
                    continue
                page_offset &= 0xFFF
            idx = page_offset >> 3
            new = int.from_bytes(data[:pte_size], "little") if nbytes >= pte_size else None
            if self.events is not None:
                act = ("install the spte from it" if self.policy == "update" and role.level == 1
                       and new is not None else "clear the spte")
                self.events.note("pte write", f"guest writes {int.from_bytes(data, 'little'):#x} to its "
                                 f"level-{role.level} table gfn {gfn:#x} +{offset:#x}; policy "
                                 f"{self.policy!r}: {act}")
            for i in range(idx, idx + npte):
                self.set_spte(sp, i, 0)
                self.stats["pte_zaps"] += 1
                if role.level == 1 and self.policy == "update" and new is not None:
                    self.update_pte(vcpu, sp, i, new)
        self.flush_tlbs()

    def update_pte(self, vcpu, sp: ShadowPage, idx: int, gpte: int) -> None:
        """The seed: install the spte from the guest pte just written, if it is
        present and accessed (A=0 must trap so the A bit gets set; D=0 maps it
        read-only so the first write sets D) and has no reserved bit.  Rights: the
        page's inherited access AND the pte's, or, with ``seed_access_bug``, the
        seed's constant U|W that ignores the upper levels."""
        if ~gpte & (PTE_P | PTE_A):
            return
        g = vcpu.guest
        cur = vcpu.mmu_state.base_role
        if (sp.role.glevels, sp.role.nxe, sp.role.cr0_wp) != (cur.glevels, cur.nxe, cur.cr0_wp):
            return      # a page cached for another guest mode: the reserved-bit rules differ
        wide = sp.role.glevels >= 3
        if wide:
            rsvd = g.rows[-1][3]                 # the level-1 reserved mask for this CPU state
            if gpte & rsvd:
                return
        rights = gpte_access(gpte, wide, sp.role.nxe)
        rights &= (ACC_ALL if self.seed_access_bug else sp.role.access)
        gfn = (gpte & (SPTE_ADDR if wide else 0xFFFFF000)) >> 12
        if not wide:
            gfn &= 0xFFFFF
        spte = self._leaf_value(vcpu, sp, gfn, rights, bool(gpte & PTE_D), gpte)
        if not spte & SPTE_P:
            return
        self.stats["pte_updates"] += 1
        self.set_spte(sp, idx, spte)

    # -------------------------------------------------------------- dirty log
    def mark_dirty(self, gfn: int) -> None:
        if not self.dirty_logging:
            return
        s = self.gmem.slot_of(gfn)
        if s is not None and s.dirty_bitmap is not None:
            s.dirty_bitmap[gfn - s.base_gfn] = 1

    def enable_dirty_log(self, slot) -> None:
        """Start logging: every writable spte into the slot loses W, so each first
        write after this faults and is logged."""
        slot.dirty_bitmap = bytearray(slot.npages)
        self.dirty_logging = True
        for gfn in [g for g in self.rmap if slot.contains(g)]:
            self.rmap_write_protect(gfn)
        self.flush_tlbs()

    def disable_dirty_log(self, slot) -> None:
        """Stop logging the slot.  Sptes write-protected for logging stay so until
        the guest's next write to them faults (a harmless extra exit)."""
        slot.dirty_bitmap = None
        self.dirty_logging = any(s.dirty_bitmap is not None for s in self.gmem.slots)

    def get_dirty_log(self, slot) -> list[int]:
        """Dirty gfns since the last call; clears the log and write-protects them again."""
        if slot.dirty_bitmap is None:
            raise ValueError(f"dirty logging is not enabled on memslot {slot.id}")
        bm = slot.dirty_bitmap
        dirty = [slot.base_gfn + i for i, b in enumerate(bm) if b]
        slot.dirty_bitmap = bytearray(slot.npages)
        for gfn in dirty:
            self.rmap_write_protect(gfn)
        self.flush_tlbs()
        return dirty

    # ------------------------------------------------------------------ misc
    def gva_to_gpa(self, vcpu, vaddr: int, access: int = 0) -> int:
        """Translate through the guest's tables without side effects (raises PageFault)."""
        return translate(self.gmem, vcpu.guest, vaddr, access, set_ad=False).paddr

    def invlpg(self, vcpu, vaddr: int) -> None:
        """2007: nothing to do.  Write protection keeps every spte in sync with its
        guest pte, so a guest INVLPG only has to reach the hardware TLB."""
        vcpu.tlb.invlpg(vaddr)

    @property
    def nr_pages(self) -> int:
        return len(self.pages)
