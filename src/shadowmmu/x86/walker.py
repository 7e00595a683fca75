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
    ACC_FETCH, ACC_IMPLICIT, ACC_USER, ACC_WRITE, PAGE_MASK, PF_P, PF_PK, PF_RSVD, PTE_A, PTE_D,
    PTE_NX, PTE_P, PTE_PKEY_SHIFT, PTE_PS, PTE_U, PTE_W,
)
from .cpu import A_SMAP_OVERRIDE, R_U, CpuState
from .faults import NonCanonicalAddress, PageFault
from .formats import PagingMode

PAGE_SIZE_NAMES = {12: "4K", 21: "2M", 22: "4M", 30: "1G"}


class Translation(NamedTuple):
    """The result of a successful walk.

    ``entries`` is ((level, physical address, value), ...) top to bottom; the value
    is what memory holds after the walk (A/D set).  In PAE mode the first entry is
    the PDPTE register, with the address it was loaded from."""
    vaddr: int
    paddr: int
    page_shift: int          # 12, 21, 22 or 30
    writable: bool
    user: bool
    executable: bool
    pkey: int
    global_page: bool
    dirty: bool              # the leaf's D bit after the walk
    entries: tuple

    @property
    def page_size(self) -> str:
        return PAGE_SIZE_NAMES[self.page_shift]


def check_canonical(cpu: CpuState, vaddr: int) -> int:
    """Return vaddr if it is a valid linear address in the current mode, else raise."""
    fmt = cpu.format
    if fmt is not None and fmt.va_bits > 32:
        bits = fmt.va_bits
        top = vaddr >> (bits - 1)
        if top != 0 and top != (1 << (65 - bits)) - 1:
            raise NonCanonicalAddress(vaddr, bits)
    elif not 0 <= vaddr < 1 << 32:
        raise ValueError(f"linear address {vaddr:#x} does not fit in 32 bits")
    return vaddr


def _check_access(access: int) -> None:
    if access & ~(ACC_WRITE | ACC_USER | ACC_FETCH | ACC_IMPLICIT) or (
            access & ACC_FETCH and access & ACC_WRITE) or (access & ACC_IMPLICIT and access & ACC_USER):
        raise ValueError(f"invalid access flags {access:#x}")


def translate(mem, cpu: CpuState, vaddr: int, access: int = 0, *, set_ad: bool = True) -> Translation:
    """Walk the paging structures for ``vaddr`` and return its Translation or raise
    ``PageFault``.  ``access`` is a combination of ACC_WRITE, ACC_USER, ACC_FETCH and
    ACC_IMPLICIT.  ``set_ad=False`` walks without writing A/D (a debugger's view)."""
    _check_access(access)
    mode = cpu.mode
    if mode is PagingMode.NONE:
        if not 0 <= vaddr < 1 << 32:
            raise ValueError(f"linear address {vaddr:#x} does not fit in 32 bits")
        return Translation(vaddr, vaddr, 12, True, True, True, 0, False, False, ())
    check_canonical(cpu, vaddr)

    fmt = cpu.format
    wide = fmt.entry_size == 8
    entries = []
    # Effective rights, accumulated by AND.  NX is inverted first so that it ANDs
    # like W and U: bit 63 of `rights` ends up set only if no level has NX.
    rights = PTE_W | PTE_U | PTE_NX
    err_base = access & (ACC_WRITE | ACC_USER)
    if access & ACC_FETCH and cpu.report_id:
        err_base |= ACC_FETCH

    if mode is PagingMode.PAE:
        i = (vaddr >> 30) & 3
        pdpte = cpu.pdptes[i]
        entries.append((3, cpu.pdpte_addrs[i], pdpte))
        if not pdpte & PTE_P:
            raise PageFault(vaddr, err_base)
        table = (pdpte & cpu.rows[0][5]) >> 12
    else:
        table = (cpu.cr3 & (cpu.rows[0][5] if wide else 0xFFFFF000)) >> 12

    leaf_shift = 12
    leaf_addr = leaf_value = 0
    for level, shift, idx_mask, rsvd_table, rsvd_page, addr_mask in cpu.rows:
        idx = (vaddr >> shift) & idx_mask
        words = mem.qwords(table) if wide else mem.dwords(table)
        e = words[idx]
        eaddr = (table << 12) | (idx << (3 if wide else 2))
        if not e & PTE_P:
            raise PageFault(vaddr, err_base)
        is_page = level == 1 or (e & PTE_PS and rsvd_page >= 0)
        if e & (rsvd_page if is_page and level > 1 else rsvd_table):
            raise PageFault(vaddr, err_base | PF_RSVD | PF_P)
        rights &= e ^ PTE_NX if wide else e | PTE_NX
        if is_page:
            leaf_shift, leaf_addr, leaf_value = shift, eaddr, e
            break
        if set_ad and not e & PTE_A:
            e |= PTE_A
            (mem.qwords_w(table) if wide else mem.dwords_w(table))[idx] = e
        entries.append((level, eaddr, e))
        table = (e & addr_mask) >> 12

    r = ((rights >> 1) & 3) | ((rights >> 61) & 4)       # R_W | R_U | R_X
    acc = ((access & 6) << 2) | ((access & 16) << 1)
    if cpu.ac and not access & (ACC_USER | ACC_IMPLICIT):
        acc |= A_SMAP_OVERRIDE
    write = access & ACC_WRITE
    if cpu.perm[r | acc]:
        err = err_base | PF_P
        if cpu.pk_active and r & R_U and not access & ACC_FETCH and _pkey_denies(cpu, leaf_value, write, access):
            err |= PF_PK
        raise PageFault(vaddr, err)
    if cpu.pk_active and r & R_U and not access & ACC_FETCH and _pkey_denies(cpu, leaf_value, write, access):
        raise PageFault(vaddr, err_base | PF_P | PF_PK)

    if set_ad:
        new = leaf_value | PTE_A | (PTE_D if write else 0)
        if new != leaf_value:
            pfn, off = leaf_addr >> 12, leaf_addr & PAGE_MASK
            if wide:
                mem.qwords_w(pfn)[off >> 3] = new
            else:
                mem.dwords_w(pfn)[off >> 2] = new
            leaf_value = new
    entries.append((level, leaf_addr, leaf_value))

    if not wide and leaf_shift == 22:
        # PSE-36: PDE bits 20:13 are physical address bits 39:32 (as many as MAXPHYADDR allows).
        base = (leaf_value & 0xFFC00000) | (((leaf_value >> 13) & 0xFF) << 32)
    else:
        base = leaf_value & addr_mask & ~((1 << leaf_shift) - 1)
    paddr = base | (vaddr & ((1 << leaf_shift) - 1))
    pkey = (leaf_value >> PTE_PKEY_SHIFT) & 0xF if fmt.pkeys else 0
    return Translation(vaddr, paddr, leaf_shift, bool(r & 1), bool(r & 2), bool(r & 4), pkey,
                       bool(leaf_value & 0x100), bool(leaf_value & PTE_D), tuple(entries))


def _pkey_denies(cpu: CpuState, leaf: int, write: int, access: int) -> bool:
    """SDM 4.6.2: data access to a user-mode address under CR4.PKE: PKRU.AD of the
    key denies every access, PKRU.WD denies writes (supervisor writes only with CR0.WP)."""
    key = (leaf >> PTE_PKEY_SHIFT) & 0xF
    bits = (cpu.pkru >> (2 * key)) & 3
    if bits & 1:
        return True
    if bits & 2 and write:
        return bool(access & ACC_USER or cpu.cr0 & 0x10000)
    return False
