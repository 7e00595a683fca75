"""The page-table walker: one loop for every paging format (Intel SDM vol. 3A ch. 4).

``translate`` is the architectural walk with the full rules: present bits,
reserved bits (RSVD|P), U/S, R/W with CR0.WP, NX, SMEP, SMAP, protection keys,
error codes, and A/D updates.  Order of events, as QEMU's walker does it:

    for each level, top down:
        read entry; not present -> #PF(P=0)
        reserved bit set        -> #PF(RSVD|P)
        page mapping (leaf)     -> stop
        table pointer           -> set A in the entry now, go down
    check the effective rights (AND over levels) -> #PF(P [|PK])
    set A in the leaf, and D on a write

Setting A in the upper entries as the walk passes them, even when the walk then
faults lower down, is a choice the SDM leaves open; QEMU makes it and so do we.
The leaf is never changed by a walk that faults (SDM 4.8).
"""

from __future__ import annotations

from typing import NamedTuple

from .bits import (
    ACC_FETCH, ACC_IMPLICIT, ACC_USER, ACC_WRITE, PF_P, PF_PK, PF_RSVD, PTE_A, PTE_D,
    PTE_NX, PTE_P, PTE_PKEY_SHIFT, PTE_PS, PTE_U, PTE_W, R_ALL, R_U, R_W, R_X,
)
from .cpu import A_SMAP_OVERRIDE, CpuState
from .faults import NonCanonicalAddress, PageFault, WalkStep
from .formats import PagingMode

PAGE_SIZE_NAMES = {12: "4K", 21: "2M", 22: "4M", 30: "1G"}


class Translation(NamedTuple):
    """The result of a successful walk.

    ``entries`` is the walk record: one (level, entry address, value, rights)
    per level read, top to bottom, laid out as ``WalkStep`` (``steps`` names
    them; empty without paging, or when walked with ``record=False``).  In PAE
    mode the first is the PDPTE register, with the address it was loaded from."""
    vaddr: int
    paddr: int
    page_shift: int          # 12, 21, 22 or 30
    rights: int              # R_W|R_U|R_X of the whole walk
    pkey: int
    global_page: bool
    dirty: bool              # the leaf's D bit after the walk (True without paging: no D to set)
    entries: tuple

    @property
    def page_size(self) -> str:
        return PAGE_SIZE_NAMES[self.page_shift]

    @property
    def writable(self) -> bool:
        return bool(self.rights & R_W)

    @property
    def user(self) -> bool:
        return bool(self.rights & R_U)

    @property
    def executable(self) -> bool:
        return bool(self.rights & R_X)

    @property
    def steps(self) -> tuple[WalkStep, ...]:
        return tuple(map(_step, self.entries))

    def at_level(self, level: int) -> WalkStep | None:
        """The step of ``level``; None where the walk read no entry of that level
        (below the leaf, above a PAE PDPTE, without paging or with record=False)."""
        entries = self.entries
        if entries:
            i = entries[0][0] - level
            if 0 <= i < len(entries):
                return _step(entries[i])
        return None

    @property
    def leaf(self) -> int:
        """The guest's leaf entry after the walk; without paging, a dirty, accessed
        page (nothing to set, nothing to trap)."""
        return self.entries[-1][2] if self.entries else PTE_A | PTE_D


_VALID_ACCESS = ACC_WRITE | ACC_USER | ACC_FETCH | ACC_IMPLICIT
# every legal combination: no fetch that writes, no implicit access from user mode
_VALID_ACCESSES = frozenset(a for a in range(_VALID_ACCESS + 1) if not a & ~_VALID_ACCESS
                            and not (a & ACC_FETCH and a & ACC_WRITE) and not (a & ACC_IMPLICIT and a & ACC_USER))
_NONE, _PAE = PagingMode.NONE, PagingMode.PAE
# The walk builds its result with tuple.__new__ and the fields in declaration
# order, and its record as plain tuples: a NamedTuple's own constructor is a
# Python call, and per level it cost a cold 4-level walk a fifth of its speed
# (bench walk).  Everywhere else, build them by keyword.
_new = tuple.__new__
_step = WalkStep._make


def fault_error_code(cpu: CpuState, access: int, cause: int = 0) -> int:
    """The #PF error code of ``access`` (SDM 4.7): W and U from the access, I/D
    only when the CPU reports it (SMEP, or NX in a PAE-format walk), plus
    ``cause``: 0 for a not-present entry, PF_P for a protection fault, PF_P|PF_RSVD
    for a reserved bit, PF_P|PF_PK for a protection-key fault."""
    err = access & (ACC_WRITE | ACC_USER)
    if access & ACC_FETCH and cpu.report_id:
        err |= ACC_FETCH
    return err | cause


def translate(mem, cpu: CpuState, vaddr: int, access: int = 0, *, set_ad: bool = True,
              record: bool = True, probe: bool = False) -> Translation | None:
    """Walk the paging structures for ``vaddr`` and return its Translation or raise
    ``PageFault``.  ``access`` is a combination of ACC_WRITE, ACC_USER, ACC_FETCH and
    ACC_IMPLICIT.  ``set_ad=False`` walks without writing A/D (a debugger's view).
    ``record=False`` leaves ``entries`` empty (in the result and in a PageFault):
    what a TLB fill needs, without the bookkeeping a narration or the MMU needs.
    ``probe=True`` returns None instead of raising PageFault (a hardware walk whose
    fault only means "VM exit", where building an exception is wasted work)."""
    if access not in _VALID_ACCESSES:
        raise ValueError(f"invalid access flags {access:#x}")
    mode = cpu.mode
    if mode is _NONE:
        if not 0 <= vaddr < 1 << 32:
            raise ValueError(f"linear address {vaddr:#x} does not fit in 32 bits")
        return Translation(vaddr=vaddr, paddr=vaddr, page_shift=12, rights=R_ALL, pkey=0,
                           global_page=False, dirty=True, entries=())
    fmt = cpu.format
    va_bits = fmt.va_bits
    if va_bits > 32:
        top = vaddr >> (va_bits - 1)
        if top and top != (1 << (65 - va_bits)) - 1:
            raise NonCanonicalAddress(vaddr, va_bits)
    elif not 0 <= vaddr < 1 << 32:
        raise ValueError(f"linear address {vaddr:#x} does not fit in 32 bits")

    wide = fmt.entry_size == 8
    frames = mem.frames             # pfn -> (bytes, u64 view, u32 view); see x86.frames
    view = 1 if wide else 2
    entry_shift = 3 if wide else 2
    entries = []
    # Effective rights, accumulated by AND.  NX is inverted first so that it ANDs
    # like W and U: bit 63 of `rights` ends up set only if no level has NX.
    rights = PTE_W | PTE_U | PTE_NX
    rows = cpu.walk_rows
    # The walk's one fault exit: a check that fails sets `cause` (the error code's
    # P/RSVD/PK bits) and leaves the loop with `level`, `e` and its address set.
    cause = -1

    if mode is _PAE:
        i = (vaddr >> 30) & 3
        e = cpu.pdptes[i]
        level, e_addr = 3, cpu.pdpte_addrs[i]
        if not e & PTE_P:
            cause = 0
        else:
            if record:
                entries.append((3, e_addr, e, R_ALL))
            table = (e & cpu.rows[0].addr_mask) >> 12
    else:
        table = (cpu.cr3 & cpu.rows[0].addr_mask) >> 12

    if cause < 0:
        for level, shift, idx_mask, rsvd_table, rsvd_page, addr_mask in rows:
            idx = (vaddr >> shift) & idx_mask
            f = frames.get(table)
            e = f[view][idx] if f is not None else (mem.qwords(table) if wide else mem.dwords(table))[idx]
            if not e & PTE_P:
                cause = 0
                break
            if level == 1 or (e & PTE_PS and rsvd_page >= 0):
                if e & (rsvd_page if level > 1 else rsvd_table):
                    cause = PF_RSVD | PF_P
                    break
                leaf_shift, leaf_idx, leaf_frame = shift, idx, f
                break
            if e & rsvd_table:
                cause = PF_RSVD | PF_P
                break
            rights &= e ^ PTE_NX if wide else e | PTE_NX
            if not e & PTE_A and set_ad:
                e |= PTE_A
                if f is not None:       # None: memory that drops writes (nothing behind the address)
                    f[view][idx] = e
            if record:
                entries.append((level, (table << 12) | (idx << entry_shift), e,
                                ((rights >> 1) & 3) | ((rights >> 61) & 4)))
            table = (e & addr_mask) >> 12
        e_addr = (table << 12) | (idx << entry_shift)

    if cause < 0:
        rights &= e ^ PTE_NX if wide else e | PTE_NX
        r = ((rights >> 1) & 3) | ((rights >> 61) & 4)       # R_W | R_U | R_X
        acc = ((access & 6) << 2) | ((access & 16) << 1)      # cpu.access_index(), inlined (hot path)
        if cpu.ac and not access & (ACC_USER | ACC_IMPLICIT):
            acc |= A_SMAP_OVERRIDE
        write = access & ACC_WRITE
        pk_denied = cpu.pk_active and r & R_U and not access & ACC_FETCH and _pkey_denies(
            cpu, (e >> PTE_PKEY_SHIFT) & 0xF, write, access)
        if cpu.perm[r | acc] or pk_denied:
            cause = PF_P | (PF_PK if pk_denied else 0)

    if cause >= 0:
        if probe:
            return None
        raise PageFault(vaddr, fault_error_code(cpu, access, cause),
                        (*entries, (level, e_addr, e, 0)) if record else ())

    if set_ad:
        new = e | (PTE_A | PTE_D if write else PTE_A)
        if new != e:
            if leaf_frame is not None:
                leaf_frame[view][leaf_idx] = new
            e = new
    if record:
        entries.append((level, e_addr, e, r))

    if leaf_shift == 22:
        # PSE-36: PDE bits 20:13 are physical address bits 39:32 (as many as MAXPHYADDR allows).
        base = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32)
    else:
        base = e & addr_mask & ~((1 << leaf_shift) - 1)
    # (vaddr, paddr, page_shift, rights, pkey, global_page, dirty, entries)
    return _new(Translation, (vaddr, base | (vaddr & ((1 << leaf_shift) - 1)), leaf_shift, r,
                              (e >> PTE_PKEY_SHIFT) & 0xF if fmt.pkeys else 0, e & 0x100 != 0, e & PTE_D != 0,
                              tuple(entries)))


def _pkey_denies(cpu: CpuState, key: int, write: int, access: int) -> bool:
    """SDM 4.6.2: data access to a user-mode address under CR4.PKE: PKRU.AD of the
    key denies every access, PKRU.WD denies writes (supervisor writes only with CR0.WP)."""
    bits = (cpu.pkru >> (2 * key)) & 3
    if bits & 1:
        return True
    if bits & 2 and write:
        return bool(access & ACC_USER or cpu.cr0 & 0x10000)
    return False
