"""The frame-access protocol: how page-table walkers and vCPUs reach memory.

Memory is reached a whole 4 KiB frame at a time, by frame number, as three
views of the same bytes: ``(bytes, u64 view, u32 view)`` (a ``Frame``).  The
walker reads an aligned entry with one index operation (``f[1][idx]`` for a
64-bit entry, ``f[2][idx]`` for a 32-bit one) and sets A/D bits by assigning
through the same view, so no access slices or converts bytes.

Two roles, as in KVM (host pages behind memslots) or volatility3 (a layer over
a layer):

* ``FrameSource``: what a walk needs.  ``x86.PhysicalMemory`` (host physical
  memory) and ``vm.memslots.GuestPhysical`` (guest physical memory through
  memslots) are both FrameSources, so one walker walks shadow and guest tables.
* ``FrameStore``: a FrameSource that owns its frames and allocates them
  (``PhysicalMemory`` and its backends).

The frames are a table, not a method: hot paths bind ``frames = mem.frames``
once and call ``frames.get(pfn)`` per access.  For host memory the table is the
memory's own dict, so a lookup is one C call; measured against a bound method
(``frame = mem.frame; frame(pfn)``) on the walker, ``frames.get`` is ~130 fewer
instructions per 4-level walk (cachegrind), and a Python method twice the cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

# (the frame's 4096 bytes as a writable buffer, the same bytes as 512 u64, as 1024 u32)
Frame = tuple[bytearray | memoryview, memoryview, memoryview]


class FrameTable(Protocol):
    """Frame number -> Frame, for the frames that have storage."""

    def get(self, pfn: int, /) -> Frame | None:
        """The frame's views, to read and to write in place; None when it has no
        storage (untouched, outside memory, or no RAM behind it)."""


@runtime_checkable
class FrameSource(Protocol):
    """Frames by number, for reading and for updating in place.  A frame that
    ``frames.get`` gives as None reads as ``qwords``/``dwords`` say and drops
    in-place writes (an A/D update of an entry nothing stores)."""

    maxphyaddr: int            # physical address width: paging-structure address bits above it are reserved
    frames: FrameTable         # read only: the table belongs to the memory

    def qwords(self, pfn: int) -> memoryview:
        """The frame as 512 u64 for reading, also when it has no storage (untouched
        memory reads as zeros, a frame with nothing behind it as ones); raises
        PhysicalAddressError outside memory."""

    def dwords(self, pfn: int) -> memoryview:
        """The frame as 1024 u32 for reading (as ``qwords``)."""


@runtime_checkable
class FrameStore(FrameSource, Protocol):
    """A FrameSource that owns its frames: host physical memory.  ``frames`` is a
    mapping of every allocated frame, in allocation order (read only: allocate
    with ``frame_w``)."""

    frames: Mapping[int, Frame]

    def frame_w(self, pfn: int) -> Frame:
        """The frame's views for writing, allocating (zeroed) it on first use;
        raises PhysicalAddressError outside memory."""
