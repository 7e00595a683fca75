"""audit(): every invariant of the shadow MMU, checked from scratch.

KVM's old auditor rotted because nothing ran it; this one runs after every
step of the lockstep checker and in the test fixtures.  It raises AuditError
naming the first broken invariant.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import compress

from ..x86.bits import CR0_WP, CR4_PKE, CR4_SMAP, CR4_SMEP, PTE_A, PTE_D, R_ALL, R_U, R_X
from ..x86.cpu import A_F, A_SMAP_OVERRIDE, A_U, A_W, permission_faults
from ..x86.faults import PageFault
from ..x86.walker import translate
from .spte import SPTE_ADDR, SPTE_MMIO, SPTE_NX, SPTE_P, SPTE_TRAP, SPTE_W


class AuditError(AssertionError):
    """A shadow MMU invariant does not hold."""


_probes: dict[tuple, object] = {}


def probe_cpu(guest):
    """The guest's CPU state without SMEP/SMAP/PKU: a supervisor read then succeeds
    exactly when the guest's tables map the address, and reports its rights.
    Cached by register values (the audit runs after every lockstep step)."""
    key = (guest.cr0, guest.cr3, guest.cr4, guest.efer, guest.pdptes, guest.pdpte_addrs, guest.maxphyaddr,
           guest.gbpages)
    c = _probes.get(key)
    if c is None:
        if len(_probes) > 256:
            _probes.clear()
        c = guest.without_cr4(CR4_SMEP | CR4_SMAP | CR4_PKE)
        _probes[key] = c
    return c


@lru_cache(maxsize=None)
def _perm_table(wp: bool, smep: bool, smap: bool) -> bytes:
    """permission_faults() for every (rights | access column), as CpuState.perm."""
    return bytes(permission_faults(i & 7, i & ~7, wp=wp, smep=smep, smap=smap) for i in range(128))


def _present(spt):
    """Indices of the non-zero entries of a shadow table (C speed: most are zero)."""
    return compress(range(512), spt.tolist())


def audit(mmu, *, guest_walks: bool = True) -> None:
    if getattr(mmu, "tdp", False):          # two-dimensional paging: its own invariants
        from .tdp_audit import audit_tdp
        audit_tdp(mmu)
        return
    gmem = mmu.gmem
    pages = list(mmu.pages.values())
    if len(pages) > mmu.pool_size:
        raise AuditError(f"{len(pages)} shadow pages exceed the pool of {mmu.pool_size}")
    # --- structure: rmap exact, parent links exact, frames where they belong ----
    rmap_seen: dict[int, set[int]] = {}
    parents_seen: dict[int, set[int]] = {}
    lo, hi, delta = gmem.linear_range()
    shadowed = mmu.shadowed
    trap = mmu.trap_spte
    unsync_links: dict[int, int] = {}     # page hpfn -> its entries leading to a page that needs a resync
    for sp in pages:
        if sp.zapped:
            raise AuditError(f"{sp!r} is zapped but still cached")
        if not mmu.pool_lo <= sp.hpfn < mmu.pool_hi:
            raise AuditError(f"{sp!r} lives outside the shadow pool")
        present = 0
        spt = sp.spt
        _audit_nonpresent(mmu, sp, trap)
        for idx in _present(spt):
            spte = spt[idx]
            if not spte & SPTE_P or spte == SPTE_TRAP:
                continue
            present += 1
            addr = (sp.hpfn << 12) | (idx << 3)
            pfn = (spte & SPTE_ADDR) >> 12
            if sp.role.level > 1:
                child = mmu.by_hpfn.get(pfn)
                if child is None or child.zapped:
                    raise AuditError(f"{sp!r}[{idx}] = {spte:#x} points at no live shadow page")
                parents_seen.setdefault(pfn, set()).add(addr)
                if child.needs_sync:
                    unsync_links[sp.hpfn] = unsync_links.get(sp.hpfn, 0) + 1
                continue
            gfn = pfn - delta if lo <= pfn - delta < hi else gmem.pfn_to_gfn(pfn)
            if gfn is None:
                raise AuditError(f"{sp!r}[{idx}] = {spte:#x} maps host frame {pfn:#x} outside guest RAM")
            if spte & SPTE_W:
                rmap_seen.setdefault(gfn, set()).add(addr)
                if gfn in shadowed and not shadowed[gfn][0].unsync:
                    raise AuditError(f"{sp!r}[{idx}] maps shadowed page table gfn {gfn:#x} writable")
        if present != sp.nr_present:
            raise AuditError(f"{sp!r} counts {sp.nr_present} present sptes, has {present}")
    rmap_have = {g: set(s) for g, s in mmu.rmap.items() if s}
    if rmap_seen != rmap_have:
        missing = {g: s - rmap_have.get(g, set()) for g, s in rmap_seen.items() if s - rmap_have.get(g, set())}
        extra = {g: s - rmap_seen.get(g, set()) for g, s in rmap_have.items() if s - rmap_seen.get(g, set())}
        raise AuditError(f"rmap is not exact: missing {missing}, stale {extra}")
    _audit_unsync(mmu, pages, unsync_links)
    for sp in pages:
        if sp.parents != parents_seen.get(sp.hpfn, set()):
            raise AuditError(f"{sp!r} parent links {sorted(map(hex, sp.parents))} != "
                             f"sptes pointing at it {sorted(map(hex, parents_seen.get(sp.hpfn, set())))}")
    # --- semantics: each leaf reachable from a vCPU's roots agrees with the guest ---
    if guest_walks:
        for vcpu in mmu.vcpus:
            if not vcpu.mmu_roots_invalid:
                _audit_roots(mmu, vcpu)
            _audit_tlb(mmu, vcpu)


def _audit_nonpresent(mmu, sp, trap: int) -> None:
    """What stands where nothing is mapped.  Without bypass: 0 or an MMIO mark.  Under
    bypass: the trap value, or 0 ("notrap", the guest's fault skips the hypervisor)
    only where the guest's own entry is not present, in a page that is in sync (a
    0 anywhere else hands the guest a fault its tables do not have)."""
    spt = sp.spt
    if not trap:
        for idx in _present(spt):
            v = spt[idx]
            if v == SPTE_TRAP:
                raise AuditError(f"{sp!r}[{idx}] holds the bypass trap value, but bypass is off")
            if not v & SPTE_P and v & ~(SPTE_MMIO | SPTE_ADDR):
                raise AuditError(f"{sp!r}[{idx}] = {v:#x}: neither a mapping, 0, nor an MMIO mark")
        return
    values = spt.tolist()
    if 0 in values:
        if sp.role.direct or sp.unsync:
            idx = values.index(0)
            raise AuditError(f"{sp!r}[{idx}] = 0 in a {'direct' if sp.role.direct else 'unsync'} page: the "
                             f"guest's access there would fault without an exit")
        gptes = mmu.guest_ptes(sp)
        for idx, v in enumerate(values):
            if v == 0 and gptes[idx] & SPTE_P:
                raise AuditError(f"{sp!r}[{idx}] = 0 (bypass: not-present faults go to the guest), but the "
                                 f"guest entry {gptes[idx]:#x} is present")
    for idx, v in enumerate(values):
        if v and not v & SPTE_P:
            raise AuditError(f"{sp!r}[{idx}] = {v:#x}: under bypass a non-mapping must be 0 or the trap value")


def _audit_unsync(mmu, pages, unsync_links: dict[int, int]) -> None:
    """Out-of-sync pages are level-1 guest tables shadowed by no other page, the MMU's
    set of them is exact, and every page's unsync_children counts its entries that
    lead to a page needing a resync (so a resync from the roots finds every one)."""
    seen = set()
    for sp in pages:
        if sp.unsync:
            seen.add(sp)
            if not mmu.unsync_enabled:
                raise AuditError(f"{sp!r} is out of sync, but the policy has no +unsync")
            if sp.role.level != 1 or sp.role.direct:
                raise AuditError(f"{sp!r} is out of sync, but only guest leaf tables may be")
            if mmu.shadowed.get(sp.gfn) != [sp]:
                raise AuditError(f"{sp!r} is out of sync while gfn {sp.gfn:#x} has other shadow pages (roles)")
        if sp.unsync_children != unsync_links.get(sp.hpfn, 0):
            raise AuditError(f"{sp!r} counts {sp.unsync_children} unsync children, has "
                             f"{unsync_links.get(sp.hpfn, 0)}")
    if seen != mmu.unsync_pages:
        raise AuditError(f"the MMU's set of unsync pages {mmu.unsync_pages} is not the unsync pages {seen}")


# Every access a CPU can make, as permission-table columns: CPL 0/3 x read/write/
# fetch, and RFLAGS.AC for supervisor data accesses (the SMAP override).
_ACCESS_COLUMNS = tuple(
    (name, idx) for name, idx in (
        ("supervisor read", 0), ("supervisor write", A_W), ("supervisor fetch", A_F),
        ("supervisor read with AC=1", A_SMAP_OVERRIDE), ("supervisor write with AC=1", A_W | A_SMAP_OVERRIDE),
        ("user read", A_U), ("user write", A_U | A_W), ("user fetch", A_U | A_F)))


class _Where:
    """The leaf a message is about, formatted lazily (the audit runs after every step)."""
    __slots__ = ("spte", "va", "sp")

    def __init__(self, spte, va, sp):
        self.spte, self.va, self.sp = spte, va, sp

    def __str__(self) -> str:
        return f"spte {self.spte:#x} for gva {self.va:#x} in {self.sp!r}"


def _audit_roots(mmu, vcpu) -> None:
    st = vcpu.mmu_state
    guest = vcpu.guest
    probe = probe_cpu(guest)
    # SMEP and SMAP are paging features: without guest paging they do not apply
    g_wp = bool(guest.cr0 & CR0_WP)
    g_smep, g_smap = (bool(guest.cr4 & CR4_SMEP), bool(guest.cr4 & CR4_SMAP)) if guest.paging else (False, False)
    hw = vcpu.hw
    h_wp, h_smep, h_smap = bool(hw.cr0 & CR0_WP), bool(hw.cr4 & CR4_SMEP), bool(hw.cr4 & CR4_SMAP)
    g_perm, h_perm = _perm_table(g_wp, g_smep, g_smap), _perm_table(h_wp, h_smep, h_smap)
    if st.glevels >= 4:
        tops = [(st.roots[0], st.glevels, 0)]
    else:
        tops = [(sp, 2, i << 30) for i, sp in enumerate(st.roots) if sp is not None]
    va_bits = 9 * st.glevels + 12 if st.glevels >= 4 else 32
    hw_keys = hw.pk_active and hw.format is not None and hw.format.levels >= 4
    lo, hi, delta = mmu.gmem.linear_range()
    rights_ok: set[int] = set()          # (guest rights, hardware rights) pairs already checked
    # (page, level, va base, rights the shadow entries above grant): the hardware's rights for a
    # leaf are its own AND the path's, as the hardware walk computes them
    stack = [(sp, level, base, R_ALL) for sp, level, base in tops]
    while stack:
        sp, level, base, above = stack.pop()
        shift = 12 + 9 * (level - 1)
        spt = sp.spt
        # a direct page splits one guest large page: one guest walk answers for all its entries
        # (checked: the walk must end in a large page covering them)
        large = None
        if sp.unsync:
            continue            # its leaves may be stale until the guest invalidates: the architecture's latitude
        for idx in _present(spt):
            spte = spt[idx]
            if not spte & SPTE_P or spte == SPTE_TRAP:
                continue
            va = base | (idx << shift)
            rights = above & (((spte >> 1) & 1) | ((spte >> 1) & 2) | (0 if spte & SPTE_NX else R_X))
            if level > 1:
                stack.append((mmu.by_hpfn[(spte & SPTE_ADDR) >> 12], level - 1, va, rights))
                continue
            if va >> (va_bits - 1) & 1 and va_bits > 32:
                va |= ~((1 << va_bits) - 1) & ((1 << 64) - 1)
            where = _Where(spte, va, sp) if large is None else None    # formatted only if an invariant breaks
            if large is not None:
                t = large
                paddr = (large.paddr & ~((1 << large.page_shift) - 1)) | (va & ((1 << large.page_shift) - 1))
            else:
                try:
                    t = translate(mmu.gmem, probe, va, 0, set_ad=False)
                except PageFault as pf:
                    raise AuditError(f"{where}: present, but the guest walk faults ({pf})") from None
                paddr = t.paddr
                if sp.role.direct and t.page_shift > 12:
                    large = t
            gleaf = t.leaf
            gfn = paddr >> 12
            if (gfn + delta if lo <= gfn < hi else mmu.gmem.gfn_to_pfn(gfn)) != (spte & SPTE_ADDR) >> 12:
                raise AuditError(f"{where or _Where(spte, va, sp)}: guest maps gpa {paddr:#x}, spte maps another "
                                 f"frame")
            if not gleaf & PTE_A:
                raise AuditError(f"{where or _Where(spte, va, sp)}: guest pte has A=0, an access would not set it")
            if spte & SPTE_W and not gleaf & PTE_D:
                raise AuditError(f"{where or _Where(spte, va, sp)}: writable while the guest pte is clean")
            # what the hardware grants through the shadow path must be a subset of what
            # the guest's own translation grants, for every access, under each side's
            # CR0.WP/SMEP/SMAP (this is where the CR0.WP=0 trick must stay honest)
            g_rights, h_rights = t.rights, rights
            if (g_rights << 4 | h_rights) not in rights_ok:
                for name, col in _ACCESS_COLUMNS:
                    if not h_perm[h_rights | col] and g_perm[g_rights | col]:
                        raise AuditError(f"{where or _Where(spte, va, sp)}: the hardware allows a {name} that the "
                                         f"guest's tables forbid")
                rights_ok.add(g_rights << 4 | h_rights)
            h_user = bool(h_rights & R_U)
            if guest.pk_active and t.user and not h_user:
                raise AuditError(f"{where or _Where(spte, va, sp)}: a user page of the guest is supervisor-only in hardware, "
                                 f"which hides it from the guest's protection keys")
            if guest.pk_active and h_user and hw_keys and (spte >> 59) & 15 != t.pkey:
                raise AuditError(f"{where or _Where(spte, va, sp)}: protection key {(spte >> 59) & 15}, the guest's "
                                 f"pte has key {t.pkey}")


def _audit_tlb(mmu, vcpu) -> None:
    """No hardware TLB entry grants more than the shadow tables do now (a missed flush)."""
    hw = probe_cpu(vcpu.hw)
    for vpn, e in vcpu.tlb.small.items():
        va = vpn << 12
        try:
            t = translate(mmu.host, hw, va, 0, set_ad=False)
        except PageFault:
            raise AuditError(f"TLB maps {va:#x} but the shadow tables do not (missed flush)") from None
        rights = t.rights
        if t.paddr & ~0xFFF != e[0] or e[1] & ~rights or (e[2] and not t.dirty):
            raise AuditError(f"TLB entry for {va:#x} disagrees with the shadow tables (missed flush)")


def install_audit_points(mmu, audit_arg, entry_points: tuple[str, ...]) -> None:
    """KVM's mmu_audit.c points: ``audit(mmu)`` after each call of the named methods of
    this instance -- every call (True), every Nth (an int N > 1), none (False); None takes
    the class's ``audit_by_default`` (the test suite turns it on).  Only this instance is
    wrapped, so an unaudited MMU pays nothing; ``mmu.audit_points`` counts the calls."""
    every = type(mmu).audit_by_default if audit_arg is None else audit_arg
    if isinstance(every, bool):
        every = int(every)
    elif not isinstance(every, int) or every < 2:
        raise ValueError(f"audit must be True, False or an interval of at least 2, got {every!r}")
    mmu.audit_points = 0
    if not every:
        return

    def audited(method):
        def run(*args):
            result = method(*args)
            mmu.audit_points += 1
            if mmu.audit_points % every == 0:
                audit(mmu)
            return result
        run.__doc__ = method.__doc__
        return run

    for name in entry_points:
        setattr(mmu, name, audited(getattr(mmu, name)))
