"""The x86 paging formats, described as data for one walk loop.

A format says how many levels there are, how wide an entry is, how many index
bits each level takes from the linear address and at which levels a present
entry with PS=1 maps a page instead of a table.  Everything that depends on the
CPU's state as well (reserved-bit masks need MAXPHYADDR and EFER.NXE, 1 GB pages
need CPU support, 4 MB pages need CR4.PSE) is computed by ``cpu.CpuState`` into
per-level rows when a control register changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class PagingMode(Enum):
    """A paging mode.  Its names: ``value`` (the SDM's), ``short`` (the command
    line's: 32, pae, 64, la57, none) and ``label`` (tables and plots); ``parse``
    takes any of them, and is the one place a mode name is read."""
    NONE = "none"          # CR0.PG=0: linear = physical
    BITS32 = "32-bit"      # 2 levels of 1024 4-byte entries
    PAE = "pae"            # 4 PDPTE registers, then 2 levels of 512 8-byte entries
    LEVEL4 = "4-level"     # IA-32e paging, 48-bit linear addresses
    LEVEL5 = "5-level"     # IA-32e with CR4.LA57, 57-bit linear addresses

    @property
    def short(self) -> str:
        return _SHORT[self]

    @property
    def label(self) -> str:
        return _LABEL[self]

    @classmethod
    def parse(cls, name: str) -> "PagingMode":
        """The mode a name means; ValueError naming the accepted names otherwise."""
        mode = _BY_NAME.get(name.lower()) if isinstance(name, str) else None
        if mode is None:
            raise ValueError(f"unknown paging mode {name!r}; choose one of {', '.join(_BY_NAME)}")
        return mode


_SHORT = {PagingMode.NONE: "none", PagingMode.BITS32: "32", PagingMode.PAE: "pae", PagingMode.LEVEL4: "64",
          PagingMode.LEVEL5: "la57"}
_LABEL = {PagingMode.NONE: "no paging", PagingMode.BITS32: "32-bit", PagingMode.PAE: "PAE",
          PagingMode.LEVEL4: "4-level", PagingMode.LEVEL5: "5-level"}
_BY_NAME = {**{m.short: m for m in PagingMode}, **{m.value: m for m in PagingMode}}
# the guest paging formats, by their command-line names (paging on)
GUEST_MODES = tuple(m.short for m in PagingMode if m is not PagingMode.NONE)


@dataclass(frozen=True)
class PagingFormat:
    mode: PagingMode
    entry_size: int           # bytes per entry: 4 or 8
    levels: int               # levels walked from memory (PAE: 2 after the PDPTE registers)
    index_bits: int           # per in-memory level: 10 (32-bit) or 9
    va_bits: int              # width of a linear address
    large_levels: frozenset   # levels where PS=1 can map a page (before CPU-specific filtering)
    nx: bool                  # has the XD bit (8-byte formats)
    pkeys: bool               # leaf bits 62:59 are a protection key (IA-32e only)


BITS32 = PagingFormat(PagingMode.BITS32, 4, 2, 10, 32, frozenset({2}), nx=False, pkeys=False)
PAE = PagingFormat(PagingMode.PAE, 8, 2, 9, 32, frozenset({2}), nx=True, pkeys=False)
LEVEL4 = PagingFormat(PagingMode.LEVEL4, 8, 4, 9, 48, frozenset({2, 3}), nx=True, pkeys=True)
LEVEL5 = PagingFormat(PagingMode.LEVEL5, 8, 5, 9, 57, frozenset({2, 3}), nx=True, pkeys=True)

FORMATS = {f.mode: f for f in (BITS32, PAE, LEVEL4, LEVEL5)}

LEVEL_NAMES = {
    PagingMode.BITS32: {2: "PDE", 1: "PTE"},
    PagingMode.PAE: {3: "PDPTE", 2: "PDE", 1: "PTE"},
    PagingMode.LEVEL4: {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"},
    PagingMode.LEVEL5: {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"},
}
