"""The shadow MMU: KVM's x86 shadow paging as of the seed commit, with its later fixes.

One implementation for every guest paging format (the seed's ``paging_tmpl.h``
compiled for 32- and 64-bit guest ptes becomes the format parameter of the x86
walker).  ``ShadowMMU`` is assembled from one class per share of the work, each
in its own module, along the lines of KVM's files:

    page_cache.py   shadow pages by (gfn, role), rmap, set_spte    (mmu.c)
    roots.py        roots and the hardware's state                 (mmu.c: mmu_alloc_roots, vmx.c)
    fault.py        the fault path: page_fault -> PfResult          (paging_tmpl.h)
    pte_write.py    guest writes to its page tables                 (mmu.c: kvm_mmu_pte_write)
    dirty_log.py    which frames the guest wrote                    (mmu.c: rmap_write_protect)
    unsync.py       out-of-sync leaf tables and their resync        (mmu.c, 2008)
    audit.py        every invariant, checked from scratch           (mmu_audit.c)

The main events and what the MMU does:

    guest access, no valid spte          hardware #PF -> VM exit -> page_fault()
    guest store to a shadowed table      the spte mapping it is read-only -> exit ->
                                         PTE_WRITE -> pte_write() before the bytes land
    guest CR3 / paging-mode change       reload_roots(): cached shadow pages are kept
"""

from __future__ import annotations

from collections import OrderedDict

from .audit import install_audit_points
from .dirty_log import DirtyLog
from .fault import FaultPath, PfResult
from .page_cache import MMUError, PageCache
from .policy import PREFETCH_SIZES, PTE_WRITE_POLICIES, MmuPolicy, policy_names
from .pte_write import FLOOD_THRESHOLD, PteWrites
from .roots import Roots, VcpuMmuState
from .shadow_page import ShadowPage
from .spte import SPTE_TRAP, Role
from .unsync import OutOfSync

POLICIES = PTE_WRITE_POLICIES
POLICY_NAMES = policy_names()


class ShadowMMU(PageCache, DirtyLog, Roots, FaultPath, PteWrites, OutOfSync):
    """Shadow page tables for the guests of one VM.

    ``gmem`` is guest-physical memory (memslots), ``host`` the host physical
    memory, ``pool`` the host frames shadow pages may use (a bounded pool, KVM's
    n_free_mmu_pages), ``events`` an EventLog or None.

    ``audit``: the audit points (KVM's mmu_audit.c).  True: every ``page_fault``,
    emulated write (and so every pte write) and root load ends with ``audit()``,
    which raises AuditError on a broken invariant; an int N > 1: every Nth of
    them (long workloads); False: none.  None takes ``audit_by_default`` (the
    test suite turns it on for every MMU it builds)."""

    audit_by_default: bool | int = False

    def __init__(self, host, gmem, pool_frames: list[int], *, pte_write: str = "update",
                 seed_access_bug: bool = False, events=None, audit: bool | int | None = None, prefetch: int = 0,
                 bypass: bool = False, unsync: bool = False):
        if pte_write not in POLICIES:
            raise ValueError(f"pte_write policy must be one of {POLICIES}, got {pte_write!r}")
        if prefetch not in PREFETCH_SIZES:
            raise ValueError(f"prefetch must be one of {PREFETCH_SIZES} ptes (0: off; KVM uses 8), got {prefetch!r}")
        self.prefetch_ptes = prefetch
        self.spec = MmuPolicy(pte_write, prefetch, bypass, unsync)
        self.trap_spte = SPTE_TRAP if bypass else 0     # see spte.SPTE_TRAP
        self.unsync_enabled = unsync
        self.unsync_pages: set[ShadowPage] = set()
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
                      "misaligned_zaps": 0, "prefetched": 0, "unsync_pages": 0, "synced_pages": 0,
                      "resynced_ptes": 0, "unsync_zapped": 0}
        install_audit_points(self, audit, ("page_fault", "emulated_write", "reload_roots"))


__all__ = ["ShadowMMU", "PfResult", "MMUError", "POLICIES", "FLOOD_THRESHOLD", "VcpuMmuState"]
