"""Build paging structures directly in physical memory (tests, demos, benches).

This writes memory with no access checks: it is the test bench's hand, not a
guest's.  Guests build their own tables with guest stores (``shadowmmu.guest``).
"""

from __future__ import annotations

from .bits import (
    CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LME, EFER_NXE, PTE_A, PTE_P, PTE_PS,
    PTE_U, PTE_W,
)
from .cpu import CpuState
from .formats import FORMATS, PagingMode

def control_registers(mode: PagingMode, cr3: int, *, wp: bool = True, nxe: bool = True,
                      pse: bool = True, extra_cr4: int = 0) -> dict:
    """Typical CR0/CR4/EFER for a paging mode, as keyword arguments of CpuState.load."""
    cr0 = CR0_PE | (CR0_WP if wp else 0) | (CR0_PG if mode is not PagingMode.NONE else 0)
    cr4 = extra_cr4 | (CR4_PSE if pse else 0)
    efer = EFER_NXE if nxe and mode is not PagingMode.BITS32 else 0
    if mode in (PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5):
        cr4 |= CR4_PAE
    if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
        efer |= EFER_LME
    if mode is PagingMode.LEVEL5:
        cr4 |= CR4_LA57
    return {"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer}


class PageTableBuilder:
    """Allocates table frames from ``next_frame`` upwards and maps pages.

    ``root`` is the physical address for CR3 (PAE: a page whose first 32 bytes
    are the PDPT)."""

    def __init__(self, mem, mode: PagingMode, *, next_frame: int = 1,
                 table_flags: int = PTE_P | PTE_W | PTE_U | PTE_A):
        if mode is PagingMode.NONE:
            raise ValueError("no paging structures in non-paging mode")
        self.mem = mem
        self.mode = mode
        self.fmt = FORMATS[mode]
        self.next_frame = next_frame
        self.table_flags = table_flags
        self.root = self.alloc_frame() << 12

    def alloc_frame(self) -> int:
        pfn = self.next_frame
        self.next_frame += 1
        return pfn

    def _read(self, addr):
        return self.mem.read_u64(addr) if self.fmt.entry_size == 8 else self.mem.read_u32(addr)

    def _write(self, addr, value):
        if self.fmt.entry_size == 8:
            self.mem.write_u64(addr, value)
        else:
            self.mem.write_u32(addr, value)

    def entry_address(self, table: int, vaddr: int, level: int) -> int:
        """Physical address of the level-``level`` entry for vaddr in the table at ``table``."""
        fmt = self.fmt
        shift = 12 + fmt.index_bits * (level - 1)
        if self.mode is PagingMode.PAE and level == 3:
            return table + 8 * ((vaddr >> 30) & 3)
        idx = (vaddr >> shift) & ((1 << fmt.index_bits) - 1)
        return table + idx * fmt.entry_size

    def map(self, vaddr: int, paddr: int, flags: int = PTE_P | PTE_W | PTE_U, *, page_shift: int = 12,
            table_flags: int | None = None) -> int:
        """Map one page; returns the physical address of the leaf entry."""
        tflags = self.table_flags if table_flags is None else table_flags
        top = 3 if self.mode is PagingMode.PAE else self.fmt.levels
        leaf_level = {12: 1, 21: 2, 22: 2, 30: 3}[page_shift]
        table = self.root
        for level in range(top, leaf_level, -1):
            ea = self.entry_address(table, vaddr, level)
            e = self._read(ea)
            if not e & PTE_P:
                # a PAE PDPTE has no W/U/A bits: they are reserved there
                flags_here = PTE_P if (self.mode is PagingMode.PAE and level == 3) else tflags
                e = (self.alloc_frame() << 12) | flags_here
                self._write(ea, e)
            table = e & 0x000FFFFFFFFFF000 if self.fmt.entry_size == 8 else e & 0xFFFFF000
        ea = self.entry_address(table, vaddr, leaf_level)
        value = paddr | flags
        if leaf_level > 1:
            value |= PTE_PS
            if self.mode is PagingMode.BITS32:
                value = (paddr & 0xFFC00000) | (((paddr >> 32) & 0xFF) << 13) | flags | PTE_PS
        self._write(ea, value)
        return ea

    def cpu(self, **kwargs) -> CpuState:
        """A CpuState in this builder's mode with CR3 at the root (kwargs to control_registers)."""
        cpu = CpuState(maxphyaddr=self.mem.maxphyaddr)
        cpu.load(self.mem, **control_registers(self.mode, self.root, **kwargs))
        return cpu
