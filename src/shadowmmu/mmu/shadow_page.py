"""A shadow page: one 512-entry table in host memory plus the metadata beside it."""

from __future__ import annotations

from .spte import Role


class ShadowPage:
    """(gfn, role) is the page's identity; ``spt`` is the host frame as 512 u64.

    ``parents`` holds the host addresses of the sptes that point at this page
    (KVM's parent_pte / parent chain); ``root_count`` how many vCPU roots use it;
    a page is never reclaimed while it is a root.

    Out-of-sync shadows (``+unsync``): ``unsync`` marks a leaf table the guest may
    write directly, so its sptes may be stale until the next resync;
    ``unsync_children`` counts the entries of this page that lead to a page
    needing a resync (unsync itself, or with unsync_children of its own), so a
    resync from a root visits only those paths (KVM's unsync_child_bitmap)."""

    __slots__ = ("gfn", "role", "hpfn", "spt", "parents", "root_count", "zapped", "nr_present", "unsync",
                 "unsync_children")

    def __init__(self, gfn: int, role: Role, hpfn: int, spt):
        self.gfn = gfn
        self.role = role
        self.hpfn = hpfn
        self.spt = spt
        self.parents: set[int] = set()
        self.root_count = 0
        self.zapped = False
        self.nr_present = 0
        self.unsync = False
        self.unsync_children = 0

    @property
    def needs_sync(self) -> bool:
        return self.unsync or self.unsync_children > 0

    def spte_addr(self, idx: int) -> int:
        return (self.hpfn << 12) | (idx << 3)

    def __repr__(self) -> str:
        return f"<sp gfn={self.gfn:#x} {self.role.describe()} @hpfn {self.hpfn:#x}>"
