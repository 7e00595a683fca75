"""Exceptions the paging hardware raises: #PF and #GP."""

from __future__ import annotations

from typing import NamedTuple

from .bits import describe_error_code


class WalkStep(NamedTuple):
    """One level of a walk record (KVM's guest_walker keeps the same facts in
    parallel arrays: ``table_gfn[]``, ``pte_gpa[]``, ``ptes[]``, ``pt_access[]``).
    A walk stores each as a plain tuple in this layout; ``steps`` names them.

    ``rights`` is what this entry and every entry above it grant together
    (R_W|R_U|R_X, before CR0.WP/SMEP/SMAP/PKRU apply); a PAE PDPTE grants all.
    For an entry the walk faulted on (not present, reserved bit) it is 0."""
    level: int
    addr: int                # physical address of the entry
    value: int               # the entry as memory holds it after the walk (A/D set)
    rights: int

    @property
    def table_gfn(self) -> int:
        """The frame of the table that holds the entry."""
        return self.addr >> 12


class PageFault(Exception):
    """#PF: ``address`` goes to CR2, ``error_code`` is pushed on the stack."""

    def __init__(self, address: int, error_code: int, entries: tuple = ()):
        super().__init__(address, error_code)
        self.address = address
        self.error_code = error_code
        # the walk record up to the entry that faulted (for a protection fault: all
        # of them), laid out as WalkStep; what the MMU logs and a narration shows
        self.entries = entries

    @property
    def steps(self) -> tuple[WalkStep, ...]:
        return tuple(map(WalkStep._make, self.entries))

    def __str__(self) -> str:
        return f"#PF at {self.address:#x}, error code {describe_error_code(self.error_code)}"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PageFault) and self.address == other.address
                and self.error_code == other.error_code)

    def __hash__(self) -> int:
        return hash((self.address, self.error_code))


class GeneralProtection(Exception):
    """#GP(0): an invalid control-register write, a bad PAE PDPTE at CR3 load, ..."""


class NonCanonicalAddress(GeneralProtection):
    """A 4/5-level linear address whose upper bits are not a sign extension:
    #GP (or #SS for stack accesses), never #PF."""

    def __init__(self, address: int, bits: int):
        super().__init__(f"address {address:#x} is not canonical for {bits}-bit linear addresses")
        self.address = address
        self.bits = bits
