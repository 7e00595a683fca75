"""Memslots: guest physical frames -> host physical frames, and MMIO regions.

``GuestPhysical`` is guest-physical memory as the guest's own page-table walk
sees it: a ``FrameSource`` (``x86.frames``: ``frames``, ``qwords``/``dwords``)
whose frames are the host's, translated through the memslots, so the one x86 walker
walks guest tables (native mode, and the shadow MMU's guest walk) and shadow
tables (host memory) alike.  A guest-physical address with no memslot behind it
reads as all ones and drops writes, as unbacked physical addresses do on a PC.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..x86.frames import Frame, FrameStore

_ONES = bytearray(b"\xff" * 4096)
_ONES_Q = memoryview(_ONES).cast("Q")
_ONES_I = memoryview(_ONES).cast("I")


@dataclass
class Memslot:
    base_gfn: int
    npages: int
    host_pfn: int
    dirty_bitmap: bytearray | None = None      # one byte per page while dirty logging is on
    id: int = 0

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


@dataclass
class MmioRegion:
    gpa: int
    size: int
    handler: object          # .read(gpa, size) -> int, .write(gpa, size, value)
    name: str = "mmio"


class GuestFrames:
    """``GuestPhysical.frames``: guest frame number -> the views of the host frame
    behind it, or None (untouched, MMIO or nothing): a ``FrameTable``.  The first
    memslot is inlined as a range check and an add (the walker's hot path)."""

    __slots__ = ("_lo", "_hi", "_delta", "_host", "_gfn_to_pfn")

    def __init__(self, linear: tuple[int, int, int], host_frames, gfn_to_pfn):
        self._lo, self._hi, self._delta = linear
        self._host = host_frames
        self._gfn_to_pfn = gfn_to_pfn

    def get(self, gfn: int) -> Frame | None:
        if self._lo <= gfn < self._hi:
            return self._host.get(gfn + self._delta)
        pfn = self._gfn_to_pfn(gfn)
        return None if pfn is None else self._host.get(pfn)


class GuestPhysical:
    """Guest-physical memory through memslots: a FrameSource over a host FrameStore."""

    def __init__(self, host: FrameStore, slots: list[Memslot], mmio: list[MmioRegion] | None = None):
        self.host = host
        self.slots = slots
        self.mmio = mmio if mmio is not None else []
        self.maxphyaddr = host.maxphyaddr
        self._reindex()

    def _reindex(self) -> None:
        # Fast path: the common single-slot layout becomes one range check and an add.
        s0 = self.slots[0] if self.slots else None
        self._lo = s0.base_gfn if s0 else 0
        self._hi = s0.base_gfn + s0.npages if s0 else 0
        self._delta = (s0.host_pfn - s0.base_gfn) if s0 else 0
        self.frames = GuestFrames(self.linear_range(), self.host.frames, self.gfn_to_pfn)

    def linear_range(self) -> tuple[int, int, int]:
        """The first memslot as (lo_gfn, hi_gfn, delta): gfn in [lo, hi) is host frame
        gfn + delta (the common single-slot layout; an empty range when there are no
        slots).  Hot paths check it inline before falling back to ``gfn_to_pfn``."""
        return self._lo, self._hi, self._delta

    def slot_of(self, gfn: int) -> Memslot | None:
        for s in self.slots:
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        return None

    def gfn_to_pfn(self, gfn: int) -> int | None:
        """Host frame behind a guest frame, or None (MMIO or nothing)."""
        if self._lo <= gfn < self._hi:
            return gfn + self._delta
        s = self.slot_of(gfn)
        return None if s is None else gfn - s.base_gfn + s.host_pfn

    def pfn_to_gfn(self, pfn: int) -> int | None:
        for s in self.slots:
            if s.host_pfn <= pfn < s.host_pfn + s.npages:
                return pfn - s.host_pfn + s.base_gfn
        return None

    def mmio_region(self, gpa: int) -> MmioRegion | None:
        for r in self.mmio:
            if r.gpa <= gpa < r.gpa + r.size:
                return r
        return None

    # --- FrameSource (and .frames) --------------------------------------------------
    def qwords(self, gfn: int):
        pfn = self.gfn_to_pfn(gfn)
        return _ONES_Q if pfn is None else self.host.qwords(pfn)

    def dwords(self, gfn: int):
        pfn = self.gfn_to_pfn(gfn)
        return _ONES_I if pfn is None else self.host.dwords(pfn)

    # --- byte access (within one page; callers split page-crossing accesses) ------
    def read_uint(self, gpa: int, size: int) -> int:
        pfn = self.gfn_to_pfn(gpa >> 12)
        if pfn is None:
            r = self.mmio_region(gpa)
            return r.handler.read(gpa, size) if r else (1 << (8 * size)) - 1
        return self.host.read_uint((pfn << 12) | (gpa & 0xFFF), size)

    def write_uint(self, gpa: int, value: int, size: int) -> None:
        pfn = self.gfn_to_pfn(gpa >> 12)
        if pfn is None:
            r = self.mmio_region(gpa)
            if r:
                r.handler.write(gpa, size, value)
            return
        self.host.write_uint((pfn << 12) | (gpa & 0xFFF), value, size)

    def read(self, gpa: int, n: int) -> bytes:
        """Guest RAM bytes (unbacked addresses read as 0xff; MMIO is not read)."""
        out = bytearray()
        while n:
            chunk = min(n, 4096 - (gpa & 0xFFF))
            pfn = self.gfn_to_pfn(gpa >> 12)
            out += b"\xff" * chunk if pfn is None else self.host.read((pfn << 12) | (gpa & 0xFFF), chunk)
            gpa += chunk
            n -= chunk
        return bytes(out)

    def read_u32(self, gpa: int) -> int:
        return self.read_uint(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_uint(gpa, 8)

    def write_u32(self, gpa: int, v: int) -> None:
        self.write_uint(gpa, v, 4)

    def write_u64(self, gpa: int, v: int) -> None:
        self.write_uint(gpa, v, 8)

    def snapshot(self) -> dict[int, bytes]:
        """gfn -> page bytes of every allocated guest RAM page (for comparing guest memory)."""
        out = {}
        for s in self.slots:
            for pfn in self.host.allocated_frames():
                if s.host_pfn <= pfn < s.host_pfn + s.npages:
                    data = self.host.frame_bytes(pfn)
                    if any(data):
                        out[pfn - s.host_pfn + s.base_gfn] = data
        return out
