"""Physical memory: lazily allocated, byte addressable, little endian.

A page is allocated the first time it is written; reading an untouched page
returns zeros without allocating, so a 64 GiB memory costs only the pages a
test uses.  Each allocated frame is one ``bytearray`` with two preallocated
views (``'Q'`` and ``'I'``) so the walker reads an aligned entry with one
index operation instead of slicing and converting bytes.
"""

from __future__ import annotations

from .bits import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

_ZERO_FRAME = bytearray(PAGE_SIZE)
_ZERO_Q = memoryview(_ZERO_FRAME).cast("Q")
_ZERO_I = memoryview(_ZERO_FRAME).cast("I")


class PhysicalAddressError(ValueError):
    """An access outside the physical memory's size."""


class PhysicalMemory:
    """Physical memory of ``size`` bytes.  ``maxphyaddr`` is the CPU's physical
    address width: paging-structure address bits at and above it are reserved."""

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
        # pfn -> (bytearray, 'Q' view, 'I' view)
        self._frames: dict[int, tuple[bytearray, memoryview, memoryview]] = {}

    # --- frames -------------------------------------------------------------
    def _check(self, paddr: int, n: int) -> None:
        if paddr < 0 or n < 0 or paddr + n > self.size:
            raise PhysicalAddressError(
                f"physical access [{paddr:#x}, {paddr + n:#x}) is outside memory of size {self.size:#x}")

    def _alloc(self, pfn: int) -> tuple[bytearray, memoryview, memoryview]:
        f = self._frames.get(pfn)
        if f is None:
            if not 0 <= pfn < self.nr_frames:
                raise PhysicalAddressError(f"frame {pfn:#x} is outside memory of size {self.size:#x}")
            buf = bytearray(PAGE_SIZE)
            mv = memoryview(buf)
            f = (buf, mv.cast("Q"), mv.cast("I"))
            self._frames[pfn] = f
        return f

    def qwords(self, pfn: int) -> memoryview:
        """The frame as 512 u64 (read only use; untouched frames read as a shared zero frame)."""
        f = self._frames.get(pfn)
        if f is not None:
            return f[1]
        if not 0 <= pfn < self.nr_frames:
            raise PhysicalAddressError(f"frame {pfn:#x} is outside memory of size {self.size:#x}")
        return _ZERO_Q

    def dwords(self, pfn: int) -> memoryview:
        """The frame as 1024 u32 (read only use)."""
        f = self._frames.get(pfn)
        if f is not None:
            return f[2]
        if not 0 <= pfn < self.nr_frames:
            raise PhysicalAddressError(f"frame {pfn:#x} is outside memory of size {self.size:#x}")
        return _ZERO_I

    def qwords_w(self, pfn: int) -> memoryview:
        """The frame as 512 u64, allocated for writing."""
        return self._alloc(pfn)[1]

    def dwords_w(self, pfn: int) -> memoryview:
        return self._alloc(pfn)[2]

    def frame_bytes(self, pfn: int) -> bytes:
        """A copy of one frame (zeros if untouched)."""
        f = self._frames.get(pfn)
        if f is None:
            self._check(pfn << PAGE_SHIFT, PAGE_SIZE)
            return bytes(PAGE_SIZE)
        return bytes(f[0])

    def allocated_frames(self) -> list[int]:
        return sorted(self._frames)

    # --- byte access --------------------------------------------------------
    def read(self, paddr: int, n: int) -> bytes:
        self._check(paddr, n)
        off = paddr & PAGE_MASK
        if off + n <= PAGE_SIZE:
            f = self._frames.get(paddr >> PAGE_SHIFT)
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
            self._alloc(paddr >> PAGE_SHIFT)[0][off:off + chunk] = data[pos:pos + chunk]
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
            self._alloc(paddr >> PAGE_SHIFT)[2][(paddr & PAGE_MASK) >> 2] = value
        else:
            self.write_uint(paddr, value, 4)

    def write_u64(self, paddr: int, value: int) -> None:
        if not paddr & 7 and 0 <= paddr < self.size and 0 <= value < 1 << 64:
            self._alloc(paddr >> PAGE_SHIFT)[1][(paddr & PAGE_MASK) >> 3] = value
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
