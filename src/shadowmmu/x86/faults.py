"""Exceptions the paging hardware raises: #PF and #GP."""

from __future__ import annotations

from .bits import describe_error_code


class PageFault(Exception):
    """#PF: ``address`` goes to CR2, ``error_code`` is pushed on the stack."""

    def __init__(self, address: int, error_code: int, entries: tuple = ()):
        super().__init__(address, error_code)
        self.address = address
        self.error_code = error_code
        # ((level, entry address, value), ...) read by the walk up to the one that
        # faulted (for a protection fault: all of them).  For narration only.
        self.entries = entries

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
