"""Physical memory: lazily allocated, byte addressable, little endian.

A page is allocated the first time it is written; reading an untouched page
returns zeros without allocating, so a 64 GiB memory costs only the pages a
test uses.  Each allocated frame carries two preallocated views (``'Q'`` and
``'I'``) so the walker reads an aligned entry with one index operation instead
of slicing and converting bytes (the ``FrameStore`` protocol of ``.frames``).

Two backends, one behaviour:

* ``PhysicalMemory`` ("dict"): each allocated frame is its own ``bytearray``.
* ``MappedPhysicalMemory`` ("mmap"): all of memory is one anonymous private
  mapping the OS backs page by page on first touch (a QEMU RAMBlock), so other
  code can map it zero-copy (unicorn's ``mem_map_ptr`` takes ``host_address()``).
  Frame pfn is bytes [pfn * 4096, pfn * 4096 + 4096) of ``buffer``.
"""

from __future__ import annotations

import mmap

from .bits import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from .frames import Frame

_ZERO_FRAME = bytearray(PAGE_SIZE)
_ZERO_Q = memoryview(_ZERO_FRAME).cast("Q")
_ZERO_I = memoryview(_ZERO_FRAME).cast("I")


class PhysicalAddressError(ValueError):
    """An access outside the physical memory's size."""


class PhysicalMemory:
    """Physical memory of ``size`` bytes.  ``maxphyaddr`` is the CPU's physical
    address width: paging-structure address bits at and above it are reserved.
    A ``FrameStore`` (see ``.frames``)."""

    backend = "dict"

    def __init__(self, size: int = 1 << 32, maxphyaddr: int = 52):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memory size must be a positive multiple of 4096, got {size!r}")
        if not 32 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr must be between 32 and 52, got {maxphyaddr!r}")
        if size > 1 << maxphyaddr:
            raise ValueError(f"memory size {size:#x} exceeds the {maxphyaddr}-bit physical address space")
        self.size = size
        self.maxphyaddr = maxphyaddr
        self.nr_frames = size >> PAGE_SHIFT
        # FrameStore.frames: pfn -> (bytes, 'Q' view, 'I' view) of every allocated frame
        self.frames: dict[int, Frame] = {}

    # --- frames -------------------------------------------------------------
    def _check(self, paddr: int, n: int) -> None:
        if paddr < 0 or n < 0 or paddr + n > self.size:
            raise PhysicalAddressError(
                f"physical access [{paddr:#x}, {paddr + n:#x}) is outside memory of size {self.size:#x}")

    def frame_w(self, pfn: int) -> Frame:
        """The frame's views for writing, allocated (zeroed) on first use."""
        f = self.frames.get(pfn)
        if f is None:
            if not 0 <= pfn < self.nr_frames:
                raise PhysicalAddressError(f"frame {pfn:#x} is outside memory of size {self.size:#x}")
            f = self.frames[pfn] = self._new_frame(pfn)
        return f

    def _new_frame(self, pfn: int) -> Frame:
        """Storage for a frame written for the first time (the backend's one job)."""
        buf = bytearray(PAGE_SIZE)
        mv = memoryview(buf)
        return buf, mv.cast("Q"), mv.cast("I")

    def qwords(self, pfn: int) -> memoryview:
        """The frame as 512 u64 (read only use; untouched frames read as a shared zero frame)."""
        f = self.frames.get(pfn)
        if f is not None:
            return f[1]
        if not 0 <= pfn < self.nr_frames:
            raise PhysicalAddressError(f"frame {pfn:#x} is outside memory of size {self.size:#x}")
        return _ZERO_Q

    def dwords(self, pfn: int) -> memoryview:
        """The frame as 1024 u32 (read only use)."""
        f = self.frames.get(pfn)
        if f is not None:
            return f[2]
        if not 0 <= pfn < self.nr_frames:
            raise PhysicalAddressError(f"frame {pfn:#x} is outside memory of size {self.size:#x}")
        return _ZERO_I

    def qwords_w(self, pfn: int) -> memoryview:
        """The frame as 512 u64, allocated for writing."""
        return self.frame_w(pfn)[1]

    def dwords_w(self, pfn: int) -> memoryview:
        return self.frame_w(pfn)[2]

    def frame_bytes(self, pfn: int) -> bytes:
        """A copy of one frame (zeros if untouched)."""
        f = self.frames.get(pfn)
        if f is None:
            self._check(pfn << PAGE_SHIFT, PAGE_SIZE)
            return bytes(PAGE_SIZE)
        return bytes(f[0])

    def allocated_frames(self) -> list[int]:
        return sorted(self.frames)

    # --- byte access --------------------------------------------------------
    def read(self, paddr: int, n: int) -> bytes:
        self._check(paddr, n)
        off = paddr & PAGE_MASK
        if off + n <= PAGE_SIZE:
            f = self.frames.get(paddr >> PAGE_SHIFT)
            return bytes(n) if f is None else bytes(f[0][off:off + n])
        out = bytearray()
        while n:
            chunk = min(n, PAGE_SIZE - (paddr & PAGE_MASK))
            out += self.read(paddr, chunk)
            paddr += chunk
            n -= chunk
        return bytes(out)

    def write(self, paddr: int, data: bytes) -> None:
        n = len(data)
        self._check(paddr, n)
        pos = 0
        while pos < n:
            off = paddr & PAGE_MASK
            chunk = min(n - pos, PAGE_SIZE - off)
            self.frame_w(paddr >> PAGE_SHIFT)[0][off:off + chunk] = data[pos:pos + chunk]
            paddr += chunk
            pos += chunk

    def read_uint(self, paddr: int, size: int) -> int:
        return int.from_bytes(self.read(paddr, size), "little")

    def write_uint(self, paddr: int, value: int, size: int) -> None:
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self.write(paddr, value.to_bytes(size, "little"))

    def read_u32(self, paddr: int) -> int:
        if not paddr & 3 and 0 <= paddr < self.size:
            return self.dwords(paddr >> PAGE_SHIFT)[(paddr & PAGE_MASK) >> 2]
        return self.read_uint(paddr, 4)

    def read_u64(self, paddr: int) -> int:
        if not paddr & 7 and 0 <= paddr < self.size:
            return self.qwords(paddr >> PAGE_SHIFT)[(paddr & PAGE_MASK) >> 3]
        return self.read_uint(paddr, 8)

    def write_u32(self, paddr: int, value: int) -> None:
        if not paddr & 3 and 0 <= paddr < self.size and 0 <= value < 1 << 32:
            self.frame_w(paddr >> PAGE_SHIFT)[2][(paddr & PAGE_MASK) >> 2] = value
        else:
            self.write_uint(paddr, value, 4)

    def write_u64(self, paddr: int, value: int) -> None:
        if not paddr & 7 and 0 <= paddr < self.size and 0 <= value < 1 << 64:
            self.frame_w(paddr >> PAGE_SHIFT)[1][(paddr & PAGE_MASK) >> 3] = value
        else:
            self.write_uint(paddr, value, 8)

    def load_image(self, data: bytes, base: int = 0) -> None:
        """Copy a raw memory image in, skipping all-zero pages (they stay unallocated)."""
        self._check(base, len(data))
        zero = bytes(PAGE_SIZE)
        for off in range(0, len(data), PAGE_SIZE):
            chunk = data[off:off + PAGE_SIZE]
            if chunk != zero[:len(chunk)]:
                self.write(base + off, chunk)


# MAP_NORESERVE: reserve address space only, so 64 GiB maps under the kernel's default
# heuristic overcommit (without it a mapping larger than RAM + swap is refused).
# Python's mmap module names it only from 3.13; 0x4000 is its value on Linux.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class MappedPhysicalMemory(PhysicalMemory):
    """Physical memory as one anonymous private mapping of ``size`` bytes.

    The OS commits a page when it is first written, so a 64 GiB memory costs what
    is used.  "Allocated" keeps the dict backend's meaning: a frame is allocated
    once written through this object (``frame_w``, ``write``, ...), and only then
    is it in ``frames`` (views onto ``buffer``, made once).

    ``buffer`` (the mmap) and ``host_address()`` (its address in this process) let
    other code map the memory zero-copy.  Such a foreign writer must take the frame
    with ``frame_w`` before writing it, as KVM's users mark the pages they dirty:
    until then this object reads the frame as zeros, whatever the buffer holds.
    The mapping lives as long as this object and is never moved or closed."""

    backend = "mmap"

    def __init__(self, size: int = 1 << 32, maxphyaddr: int = 52):
        super().__init__(size, maxphyaddr)
        try:
            self.buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        except OSError as e:
            raise MemoryError(f"the mmap memory backend cannot map {size:#x} bytes "
                              f"({size / (1 << 30):g} GiB): {e.strerror or e}") from None
        # A standing export: the mmap refuses to close or resize while it exists, so
        # host_address() stays valid for as long as this object does.
        self._view = memoryview(self.buffer)

    def host_address(self) -> int:
        """The address of byte 0 of ``buffer`` in this process (for mem_map_ptr-style APIs)."""
        import ctypes           # here, not at import: its objects would slow every GC pass of a walk benchmark
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    def share(self) -> None:
        """Another writer maps ``buffer`` and may write any frame at any time (a CPU
        executing guest code): give every frame its views now, so that reads from
        Python see what that writer wrote.  Costs three views per frame."""
        frames, new = self.frames, self._new_frame
        for pfn in range(self.nr_frames):
            if pfn not in frames:
                frames[pfn] = new(pfn)

    def _new_frame(self, pfn: int) -> Frame:
        mv = self._view[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT]
        return mv, mv.cast("Q"), mv.cast("I")


BACKENDS = {"dict": PhysicalMemory, "mmap": MappedPhysicalMemory}


def physical_memory(size: int, maxphyaddr: int = 52, backend: str = "dict") -> PhysicalMemory:
    """Physical memory with the named backend ("dict" or "mmap"; see the module doc)."""
    cls = BACKENDS.get(backend)
    if cls is None:
        raise ValueError(f"unknown memory backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return cls(size, maxphyaddr)
