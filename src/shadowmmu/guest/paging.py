"""The guest kernel's view of its paging format: the constants Linux 2.6 compiles in.

One ``GuestPaging`` per supported guest format ("32", "pae", "64").  The kernel
code is written once against these numbers, the way Linux's pgtable-2level.h /
pgtable-3level.h / pgtable_64.h headers give one mm/ code three shapes:

- ``levels``: the in-memory table levels from the root down, as (shift, entries).
  PAE's root is the 4-entry PDPT (CR3 points at it; its entries take only P).
- ``pte_size``: 4 (32-bit) or 8 bytes; the kernel reads and writes entries with
  loads and stores of exactly that size.
- ``page_offset``: where the direct map of all RAM starts (lowmem only for the
  32-bit formats), mapped with large pages of ``large_shift``.
- ``user_top``: TASK_SIZE.  The user layout (text, mmap base, stack top) follows
  the 2.6 defaults: legacy bottom-up mmap from TASK_SIZE/3 on i386, 64-bit
  programs at 0x400000 with shared libraries at 0x2aaaaaaab000.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..x86.bits import PTE_A, PTE_D, PTE_G, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W
from ..x86.formats import PagingMode

GUEST_FORMATS = ("32", "pae", "64")


@dataclass(frozen=True)
class GuestPaging:
    name: str
    mode: PagingMode
    pte_size: int
    levels: tuple            # ((shift, nr_entries), ...) root first
    page_offset: int
    large_shift: int
    user_top: int
    text_base: int
    mmap_base: int
    nx: int                  # the XD bit for data ptes (0 on the 32-bit format)
    max_lowmem: int          # most RAM the direct map covers

    @property
    def pte_mask(self) -> int:
        """Frame-address bits of an entry."""
        return 0xFFFFF000 if self.pte_size == 4 else 0x000FFFFFFFFFF000

    # --- entry values (what Linux's _PAGE_* protections produce) -------------
    @property
    def kernel_large(self) -> int:
        """__PAGE_KERNEL_LARGE: present, writable, supervisor, A, D, large, global, NX."""
        return PTE_P | PTE_W | PTE_A | PTE_D | PTE_PS | PTE_G | self.nx

    @property
    def kernel_table(self) -> int:
        """_KERNPG_TABLE: a kernel page-table link."""
        return PTE_P | PTE_W | PTE_A | PTE_D

    @property
    def user_table(self) -> int:
        """_PAGE_TABLE: a page-table link that allows user pages below it."""
        return PTE_P | PTE_W | PTE_U | PTE_A | PTE_D


GUEST_PAGING = {
    "32": GuestPaging("32", PagingMode.BITS32, 4, ((22, 1024), (12, 1024)), 0xC0000000, 22,
                      0xC0000000, 0x08048000, 0x40000000, 0, 512 << 20),
    "pae": GuestPaging("pae", PagingMode.PAE, 8, ((30, 4), (21, 512), (12, 512)), 0xC0000000, 21,
                       0xC0000000, 0x08048000, 0x40000000, PTE_NX, 512 << 20),
    "64": GuestPaging("64", PagingMode.LEVEL4, 8, ((39, 512), (30, 512), (21, 512), (12, 512)),
                      0xFFFF888000000000, 21, 0x00007FFFFFFFF000, 0x400000, 0x2AAAAAAAB000, PTE_NX,
                      64 << 30),
}


def guest_paging(name: str) -> GuestPaging:
    try:
        return GUEST_PAGING[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown guest format {name!r}; choose one of {', '.join(GUEST_FORMATS)}") from None
