"""A shadow page: one 512-entry table in host memory plus the metadata beside it."""

from __future__ import annotations

from .spte import Role


class ShadowPage:
    """(gfn, role) is the page's identity; ``spt`` is the host frame as 512 u64.

    ``parents`` holds the host addresses of the sptes that point at this page
    (KVM's parent_pte / parent chain); ``root_count`` how many vCPU roots use it;
    a page is never reclaimed while it is a root."""

    __slots__ = ("gfn", "role", "hpfn", "spt", "parents", "root_count", "zapped", "nr_present")

    def __init__(self, gfn: int, role: Role, hpfn: int, spt):
        self.gfn = gfn
        self.role = role
        self.hpfn = hpfn
        self.spt = spt
        self.parents: set[int] = set()
        self.root_count = 0
        self.zapped = False
        self.nr_present = 0

    def spte_addr(self, idx: int) -> int:
        return (self.hpfn << 12) | (idx << 3)

    def __repr__(self) -> str:
        return f"<sp gfn={self.gfn:#x} {self.role.describe()} @hpfn {self.hpfn:#x}>"
