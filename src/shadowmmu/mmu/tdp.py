"""Two-dimensional paging (Intel EPT / AMD NPT): no guest table is shadowed.

The guest's CR3 is the hardware's CR3: the CPU walks the guest's own tables, and
every guest-physical address that walk produces -- each guest page-table frame it
reads and the final data address -- is translated again through a second table the
hypervisor owns, gpa -> hpa (the EPT, Intel SDM vol. 3C ch. 29).  The hypervisor
builds that table on demand: the first touch of a guest frame finds no EPT entry,
an *EPT violation* exits, the MMU maps that one frame (memslot gfn -> host pfn,
making the intermediate EPT tables) and the access restarts.  Guest page faults,
CR3 loads and INVLPG never exit.

    guest access --TLB hit (gva -> hpa)--> memory
        | miss: 2-D walk: for each guest level, EPT walk of the table's gfn (m refs)
        |       + the guest entry (1 ref); then EPT walk of the final gpa (m refs)
        |       guest #PF       -> the guest's handler, native error code, no exit
        |       EPT not present -> exit "ept_violation": map the gfn, restart
        |       gpa, no memslot -> exit "mmio": the access is emulated

A complete walk of an n-level guest on the m = 4 level EPT reads n*m + n + m
entries (24 for a 4-level guest, 29 for 5-level, 14 for 32-bit and for PAE, whose
PDPTEs are registers loaded at CR3 load).  There are no paging-structure caches
in this model, so every TLB miss pays the full count: the worst case.

EPT entries (SDM 29.3.2, A/D enabled): bits 0-2 R/W/X, 5:3 memory type on a leaf
(6: write-back), 7 page size (never set: this model maps 4 KB only), 8 accessed,
9 dirty (leaf), 51:12 the address.  With EPT A/D enabled the processor's accesses
to guest paging structures count as writes (SDM 29.3.5), so walking a guest table
sets D in its frame's EPT leaf: dirty logging reads those D bits (plus the frames
the MMU wrote on the guest's behalf) and so logs every guest table walked.

The EPT tables live in host frames from the VM's bounded pool; when the pool runs
out the whole EPT below its root is zapped (dirty bits folded into the log first)
and every vCPU's TLB is flushed.
"""

from __future__ import annotations

from itertools import compress

from ..x86.bits import ACC_USER, ACC_WRITE, R_U, mask
from ..x86.cpu import access_index
from ..x86.tlb import Tlb
from ..x86.walker import _pkey_denies, translate
from .audit import install_audit_points
from .dirty_log import DirtyLog
from .policy import MmuPolicy

EPT_R, EPT_W, EPT_X = 1, 2, 4
EPT_RWX = EPT_R | EPT_W | EPT_X
EPT_MT_WB = 6 << 3           # leaf memory type: write-back
EPT_PS = 1 << 7
EPT_A = 1 << 8
EPT_D = 1 << 9
EPT_ADDR = mask(12, 51)
EPT_LEVELS = 4               # m: entries per EPT walk
EPT_GFN_BITS = 9 * EPT_LEVELS   # a 4-level EPT maps 48-bit guest-physical addresses
MIN_POOL = 16                # root + every walk's frames after a full zap (see _map)
MAX_RETRIES = 32             # EPT violations one access may take before the model gives up

_ZERO_Q = memoryview(bytearray(4096)).cast("Q")
_TABLE = EPT_RWX             # what a non-leaf entry grants (A is set by walks)
_LEAF = EPT_RWX | EPT_MT_WB  # what a leaf grants


class EptViolation(Exception):
    """A guest-physical access found no EPT entry: VM exit (never seen by the guest)."""

    def __init__(self, gfn: int):
        super().__init__(f"EPT violation at gfn {gfn:#x}")
        self.gfn = gfn


class TdpError(RuntimeError):
    """An internal inconsistency of the two-dimensional MMU (never a guest's doing)."""


class _EptFrames:
    """The walker's frame table under TDP: a guest table frame, reached through the
    EPT.  One ``get`` per guest entry the walker reads, so the 1 + m references of
    each guest level are counted here.  A gfn with no memslot gives None, which the
    walker reads as ``qwords``/``dwords`` say (all ones) -- as native paging does."""

    __slots__ = ("mmu", "host_frames")

    def __init__(self, mmu, host_frames):
        self.mmu = mmu
        self.host_frames = host_frames

    def get(self, gfn: int):
        mmu = self.mmu
        mmu.walk_refs += 1                       # the guest entry itself
        leaf = mmu.ept_walk(gfn, True)           # a paging-structure access is a write (EPT A/D)
        if leaf < 0:
            if mmu.gmem.gfn_to_pfn(gfn) is None:
                return None
            raise EptViolation(gfn)
        return self.host_frames.get((leaf & EPT_ADDR) >> 12)


class _EptMemory:
    """Guest-physical memory as the 2-D walk sees it (a FrameSource for ``translate``)."""

    __slots__ = ("frames", "maxphyaddr", "qwords", "dwords")

    def __init__(self, mmu):
        self.frames = _EptFrames(mmu, mmu.host.frames)
        self.maxphyaddr = mmu.gmem.maxphyaddr
        # only reached for frames ``frames.get`` gave as None: no memslot (all ones)
        # or RAM never written (zeros), exactly as guest-physical memory reads them
        self.qwords = mmu.gmem.qwords
        self.dwords = mmu.gmem.dwords


class TdpTlb(Tlb):
    """The combined TLB of a vCPU under TDP: ``small`` holds gva -> hpa entries
    (hpa, rights, dirty, G, pkey, guest dirty, gfn), which the vCPU's fast paths use.
    ``mmio`` holds the guest half of translations that end at a gpa with no memory
    behind it (gva page -> (gpa, rights, guest dirty, G, pkey)): the guest walk
    succeeded and only the second dimension exits, so the next access to the page
    exits again without walking -- the guest sees the translation a native TLB would
    keep (the SDM lets a TLB keep it or walk again; keeping it keeps tdp's TLB the
    native one's twin, which the lockstep checker relies on).  The vCPU's fast paths
    never look at ``mmio``; invalidations drop it like the rest."""

    def __init__(self, capacity: int = 1 << 16):
        super().__init__(capacity)
        self.mmio: dict[int, tuple] = {}
        self.mmio_large: dict[tuple[int, int], set[int]] = {}     # (shift, large page) -> vpns

    def fill_mmio(self, t) -> None:
        vpn = t.vaddr >> 12
        if len(self.mmio) >= self.capacity:
            self.flush()
        self.mmio[vpn] = (t.paddr & ~0xFFF, t.rights, t.dirty, t.global_page, t.pkey)
        if t.page_shift != 12:
            self.mmio_large.setdefault((t.page_shift, t.vaddr >> t.page_shift), set()).add(vpn)

    def invlpg(self, vaddr: int) -> None:
        super().invlpg(vaddr)
        mmio = self.mmio
        if mmio:
            mmio.pop(vaddr >> 12, None)
            for shift in (21, 22, 30):
                for vpn in self.mmio_large.pop((shift, vaddr >> shift), ()):
                    mmio.pop(vpn, None)

    def flush(self) -> None:
        super().flush()
        self.mmio.clear()
        self.mmio_large.clear()

    def flush_nonglobal(self) -> None:
        super().flush_nonglobal()
        self.mmio = {vpn: e for vpn, e in self.mmio.items() if e[3]}
        large = {k: {vpn for vpn in v if vpn in self.mmio} for k, v in self.mmio_large.items()}
        self.mmio_large = {k: v for k, v in large.items() if v}


class TdpMMU:
    """The EPT of one VM and the 2-D walk of its vCPUs.

    ``host``: host physical memory; ``gmem``: guest-physical memory (memslots);
    ``pool_frames``: the host frames EPT tables may use (at least MIN_POOL);
    ``events``: the VM's EventLog (exits are counted there).  ``audit`` as for
    ShadowMMU: True audits after every EPT violation, emulated write and dirty-log
    read; N > 1 every Nth; None takes ``audit_by_default``."""

    audit_by_default: bool | int = False
    tdp = True

    def __init__(self, host, gmem, pool_frames: list[int], *, events=None, audit: bool | int | None = None):
        if len(pool_frames) < MIN_POOL:
            raise ValueError(f"the EPT page pool needs at least {MIN_POOL} frames, got {len(pool_frames)}")
        self.spec = MmuPolicy("", tdp=True)
        self.policy = self.spec.name
        self.host = host
        self.gmem = gmem
        self.events = events
        self.pool_size = len(pool_frames)
        self.pool_lo, self.pool_hi = min(pool_frames), max(pool_frames) + 1
        self.free = list(reversed(pool_frames))
        self.vcpus = []
        self.mem = _EptMemory(self)
        self.dirty_logging = False
        # hot counters are attributes (one add each); ``stats`` reads them as a dict
        self.tlb_misses = 0          # 2-D walks started (a walk an EPT violation cut short counts too)
        self.walk_refs = 0           # guest entries + EPT entries those walks read
        self.complete_walks = 0      # walks that ended in a translation (TLB fill or MMIO)
        self.complete_refs = 0       # ... and the entries they read: n*m + n + m each
        self.pdpte_refs = 0          # EPT entries read to load PAE PDPTEs (CR3 load, mode change)
        self.d_assists = 0           # writes through a TLB entry whose EPT leaf was clean: EPT walk sets D
        self.d_assist_refs = 0       # ... and the EPT entries those walks read
        self.counts = {"ept_violations": 0, "mmio_exits": 0, "ept_pages_created": 0, "ept_zaps": 0,
                       "ept_pages_zapped": 0, "tlb_flushes": 0, "frames_mapped": 0}
        # hpfn -> (level, first gfn the table maps, its u64 view): every EPT table, root included
        self.tables: dict[int, tuple[int, int, memoryview]] = {}
        self.root_hpfn = self._new_table(EPT_LEVELS, 0)
        self.root = self.tables[self.root_hpfn][2]
        install_audit_points(self, audit, ("ept_violation", "emulated_write", "get_dirty_log"))

    # ------------------------------------------------------------------ stats
    @property
    def stats(self) -> dict:
        """Counters, each named for what it counts (see __init__)."""
        s = dict(self.counts)
        s.update(tlb_misses=self.tlb_misses, walk_refs=self.walk_refs, complete_walks=self.complete_walks,
                 complete_walk_refs=self.complete_refs, pdpte_refs=self.pdpte_refs,
                 ept_d_assists=self.d_assists, ept_d_assist_refs=self.d_assist_refs,
                 ept_pages=len(self.tables), pages_created=self.counts["ept_pages_created"],
                 pages_zapped=self.counts["ept_pages_zapped"])
        return s

    def refs_per_miss(self) -> float | None:
        """Memory references per complete 2-D walk (None before the first)."""
        return self.complete_refs / self.complete_walks if self.complete_walks else None

    # ---------------------------------------------------------------- vCPUs
    def attach(self, vcpu) -> None:
        """A vCPU joins: it gets the combined TLB."""
        vcpu.tlb = TdpTlb(vcpu.tlb.capacity)
        self.vcpus.append(vcpu)

    def is_shadowed(self, gfn: int) -> bool:
        """Nothing is shadowed under TDP (the question the fault meters ask)."""
        return False

    def flush_tlbs(self) -> None:
        """INVEPT (all contexts): every vCPU drops its combined gva -> hpa entries."""
        for v in self.vcpus:
            v.tlb.flush()
        self.counts["tlb_flushes"] += 1

    # ------------------------------------------------------------ the EPT walk
    def ept_walk(self, gfn: int, write) -> int:
        """The hardware's EPT walk for ``gfn``: the leaf entry (A set, D too when
        ``write``), or -1 when an entry on the way is not present.  Counts every
        entry read in ``walk_refs``."""
        if gfn >> EPT_GFN_BITS:
            return -1
        tables = self.tables
        view = self.root
        refs = 1
        idx = gfn >> 27
        e = view[idx]
        while True:
            if not e & EPT_RWX:
                self.walk_refs += refs
                return -1
            if refs == EPT_LEVELS:
                new = e | (EPT_A | EPT_D if write else EPT_A)
                if new != e:
                    view[idx] = new
                self.walk_refs += refs
                return new
            if not e & EPT_A:
                view[idx] = e | EPT_A
            view = tables[(e & EPT_ADDR) >> 12][2]
            idx = (gfn >> (9 * (EPT_LEVELS - 1 - refs))) & 511
            refs += 1
            e = view[idx]

    def leaf(self, gfn: int) -> int:
        """The EPT leaf of gfn without touching A/D or counting (0: none)."""
        if gfn >> EPT_GFN_BITS:
            return 0
        view = self.root
        for level in range(EPT_LEVELS, 0, -1):
            e = view[(gfn >> (9 * (level - 1))) & 511]
            if not e & EPT_RWX:
                return 0
            if level == 1:
                return e
            view = self.tables[(e & EPT_ADDR) >> 12][2]
        return 0

    # -------------------------------------------------------------- accesses
    def resolve(self, vcpu, vaddr: int, access: int) -> tuple[int, int]:
        """Where a guest access lands (the VCpu's ``_resolve`` under TDP): (0, hpa) for
        RAM, (1, gpa) for an access to emulate (no memslot: MMIO or nothing).  A guest
        #PF propagates as PageFault (delivered to the guest, no exit); EPT violations
        are exits handled here, each followed by a restart of the whole walk."""
        tlb = vcpu.tlb
        guest = vcpu.guest
        write = access & ACC_WRITE
        vpn = vaddr >> 12
        e = tlb.small.get(vpn)
        if e is not None:
            r = e[1]
            if not guest.perm[r | access_index(access, guest.ac)] and not (
                    guest.pk_active and r & R_U and not access & 16 and _pkey_denies(guest, e[4], write, access)):
                if e[2] or not write:
                    tlb.hits += 1
                    return 0, e[0] | (vaddr & 0xFFF)
                if e[5]:
                    # guest D is set, only the EPT leaf is clean: the processor sets EPT D
                    # with an EPT walk of the cached gpa; the guest's translation stays cached
                    # (re-walking the guest here would let TDP see a guest pte change the
                    # guest never invalidated where native still uses the cached one)
                    before = self.walk_refs
                    leaf = self.ept_walk(e[6], True)
                    self.d_assist_refs += self.walk_refs - before
                    self.walk_refs = before
                    if leaf >= 0:
                        self.d_assists += 1
                        tlb.small[vpn] = (e[0], r, True, *e[3:])
                        tlb.hits += 1
                        return 0, e[0] | (vaddr & 0xFFF)
            tlb.invlpg(vaddr)
        elif tlb.mmio:
            e = tlb.mmio.get(vpn)
            if e is not None:
                r = e[1]
                if not guest.perm[r | access_index(access, guest.ac)] and (e[2] or not write) and not (
                        guest.pk_active and r & R_U and not access & 16
                        and _pkey_denies(guest, e[4], write, access)):
                    tlb.hits += 1
                    gpa = e[0] | (vaddr & 0xFFF)
                    self._mmio_exit(vaddr, access, gpa)
                    return 1, gpa
                tlb.invlpg(vaddr)
        tlb.misses += 1
        for _ in range(MAX_RETRIES):
            self.tlb_misses += 1
            refs0 = self.walk_refs
            try:
                t = translate(self.mem, guest, vaddr, access, record=False)
            except EptViolation as ev:
                self.ept_violation(vcpu, ev.gfn, vaddr, access)
                continue
            gpa = t.paddr
            leaf = self.ept_walk(gpa >> 12, write)
            if leaf < 0:
                if self.gmem.gfn_to_pfn(gpa >> 12) is not None:
                    self.ept_violation(vcpu, gpa >> 12, vaddr, access)
                    continue
                self.complete_walks += 1
                self.complete_refs += self.walk_refs - refs0
                tlb.fill_mmio(t)
                self._mmio_exit(vaddr, access, gpa)
                return 1, gpa
            self.complete_walks += 1
            self.complete_refs += self.walk_refs - refs0
            hpa = (leaf & EPT_ADDR) | (gpa & 0xFFF)
            # a write through an entry whose EPT leaf is clean must not go unseen (EPT D,
            # the dirty log): the entry is dirty only if both dimensions are; it keeps
            # the guest's D and the gfn for the EPT D update (see the hit path above)
            tlb.fill(t._replace(paddr=hpa, dirty=t.dirty and bool(leaf & EPT_D)))
            tlb.small[vpn] += (t.dirty, gpa >> 12)
            return 0, hpa
        raise TdpError(f"{MAX_RETRIES} EPT violations for one access to {vaddr:#x}: the EPT never maps it")

    def _mmio_exit(self, vaddr: int, access: int, gpa: int) -> None:
        events = self.events
        self.counts["mmio_exits"] += 1
        events.exits["mmio"] += 1
        if events.tracing:
            events.exit_line("mmio", f"{_acc_name(access)} of {vaddr:#x} (gpa {gpa:#x}): no memslot, emulated")

    def ept_violation(self, vcpu, gfn: int, vaddr: int = -1, access: int = 0) -> None:
        """VM exit "ept_violation": map the guest frame (KVM's tdp_page_fault)."""
        events = self.events
        at = events.mark() if events.tracing else 0
        events.exits["ept_violation"] += 1
        self.counts["ept_violations"] += 1
        self._map(gfn)
        if events.tracing:
            what = f" during {_acc_name(access)} of {vaddr:#x}" if vaddr >= 0 else ""
            events.exit_line("ept_violation", f"gpa {gfn << 12:#x}{what}: EPT entry made", at)

    def load_pdptes(self, vcpu) -> None:
        """A PAE PDPTE load (CR3 load, or a mode change that reloads them) reads the
        32-byte table through the EPT; an unmapped frame is an EPT violation.  (The
        PDPTE values themselves the guest's CpuState loaded: the EPT maps exactly the
        memslots, so they are the same bytes.)"""
        gfn = (vcpu.guest.cr3 & 0xFFFFFFE0) >> 12
        for _ in range(2):
            before = self.walk_refs
            leaf = self.ept_walk(gfn, False)
            self.pdpte_refs += self.walk_refs - before
            self.walk_refs = before              # not a TLB miss's reference
            if leaf >= 0 or self.gmem.gfn_to_pfn(gfn) is None:
                return
            self.ept_violation(vcpu, gfn)

    # ------------------------------------------------------------ the EPT
    def _new_table(self, level: int, base_gfn: int) -> int:
        hpfn = self.free.pop()
        view = self.host.qwords_w(hpfn)          # zeroed: fresh, or cleared when it was freed
        self.tables[hpfn] = (level, base_gfn, view)
        self.counts["ept_pages_created"] += 1
        return hpfn

    def _map(self, gfn: int) -> None:
        """EPT entry gfn -> its memslot's host frame, making the tables on the way."""
        pfn = self.gmem.gfn_to_pfn(gfn)
        if pfn is None:
            raise TdpError(f"EPT violation at gfn {gfn:#x}, which no memslot backs")
        if gfn >> EPT_GFN_BITS:
            raise TdpError(f"gfn {gfn:#x} is beyond the 4-level EPT's 48-bit guest-physical space")
        if len(self.free) < EPT_LEVELS - 1 and self._missing_tables(gfn) > len(self.free):
            self.zap_all()
        view = self.root
        for level in range(EPT_LEVELS, 1, -1):
            idx = (gfn >> (9 * (level - 1))) & 511
            e = view[idx]
            if not e & EPT_RWX:
                child = self._new_table(level - 1, gfn & ~((1 << (9 * (level - 1))) - 1))
                e = view[idx] = (child << 12) | _TABLE
            view = self.tables[(e & EPT_ADDR) >> 12][2]
        idx = gfn & 511
        if view[idx] & EPT_RWX:
            raise TdpError(f"EPT violation at gfn {gfn:#x}, which the EPT already maps")
        view[idx] = (pfn << 12) | _LEAF
        self.counts["frames_mapped"] += 1

    def _missing_tables(self, gfn: int) -> int:
        view = self.root
        for level in range(EPT_LEVELS, 1, -1):
            e = view[(gfn >> (9 * (level - 1))) & 511]
            if not e & EPT_RWX:
                return level - 1
            view = self.tables[(e & EPT_ADDR) >> 12][2]
        return 0

    def zap_all(self) -> None:
        """The pool is full: drop every EPT table below the root (their leaves' D bits
        go to the dirty log first), then INVEPT.  Every guest frame exits once more."""
        if self.dirty_logging:
            for gfn in self._dirty_leaves(None, clear=False):
                self.mark_dirty(gfn)
        for hpfn in [h for h in self.tables if h != self.root_hpfn]:
            self.tables.pop(hpfn)[2][:] = _ZERO_Q
            self.free.append(hpfn)
            self.counts["ept_pages_zapped"] += 1
        self.root[:] = _ZERO_Q
        self.counts["ept_zaps"] += 1
        if self.events is not None:
            self.events.note("EPT zapped", f"pool of {self.pool_size} frames full")
        self.flush_tlbs()

    # ------------------------------------------------------------ dirty log
    def _dirty_leaves(self, slot, clear: bool) -> list[int]:
        """gfns whose EPT leaf has D set (in ``slot``, or anywhere with None); with
        ``clear`` their D bits are cleared."""
        out = []
        for level, base, view in self.tables.values():
            if level != 1 or slot is not None and not (slot.base_gfn < base + 512
                                                       and base < slot.base_gfn + slot.npages):
                continue
            for idx in compress(range(512), [e & EPT_D for e in view.tolist()]):
                gfn = base + idx
                if slot is None or slot.contains(gfn):
                    out.append(gfn)
                    if clear:
                        view[idx] &= ~EPT_D
        return out

    mark_dirty = DirtyLog.mark_dirty          # the same bitmap as the shadow MMU's

    def enable_dirty_log(self, slot) -> None:
        """Start logging: clear D in the slot's EPT leaves, flush every TLB (a cached
        entry may have D set: its writes would go unlogged)."""
        slot.dirty_bitmap = bytearray(slot.npages)
        self.dirty_logging = True
        self._dirty_leaves(slot, clear=True)
        self.flush_tlbs()

    def disable_dirty_log(self, slot) -> None:
        slot.dirty_bitmap = None
        self.dirty_logging = any(s.dirty_bitmap is not None for s in self.gmem.slots)

    def get_dirty_log(self, slot) -> list[int]:
        """gfns written since logging began or the last call: EPT leaves with D set
        (every write through the EPT, and every guest table walked) plus frames the
        MMU wrote for the guest.  Clears the D bits and the log, then INVEPT."""
        if slot.dirty_bitmap is None:
            raise ValueError(f"dirty logging is not enabled on memslot {slot.id}")
        dirty = set(self._dirty_leaves(slot, clear=True))
        dirty.update(slot.base_gfn + i for i in compress(range(slot.npages), slot.dirty_bitmap))
        slot.dirty_bitmap = bytearray(slot.npages)
        self.flush_tlbs()
        return sorted(dirty)

    def emulated_write(self, vcpu, gpa: int, value: int, size: int) -> None:
        """A store the hypervisor carries out for the guest (MMIO, or nothing behind
        the address): logged, then done."""
        self.mark_dirty(gpa >> 12)
        self.gmem.write_uint(gpa, value, size)

    @property
    def nr_pages(self) -> int:
        return len(self.tables)


def _acc_name(access: int) -> str:
    kind = "fetch" if access & 16 else "write" if access & ACC_WRITE else "read"
    return ("user " if access & ACC_USER else "") + kind


__all__ = ["TdpMMU", "EptViolation", "TdpError", "EPT_A", "EPT_D", "EPT_ADDR", "EPT_RWX", "EPT_LEVELS"]
