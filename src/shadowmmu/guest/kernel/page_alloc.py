"""The page allocator: frames, their reference counts, and clearing and copying them.

Frames.  A LIFO free list (the last frame freed is the next allocated, like the
per-CPU hot list) in front of the never-used frames, handed out in ascending
order; a reference count per frame (4 bytes each, like a slim struct page).  A page-cache frame holds a
reference for the cache; the zero page is pinned and never counted.
"""

from __future__ import annotations

from .errors import GuestKernelError


class PageAlloc:
    def nr_free(self) -> int:
        return len(self.free) + self.nframes - self.fresh

    def _alloc_page(self, zero: bool = True) -> int:
        if self.free:
            pfn = self.free.pop()
        elif self.fresh < self.nframes:
            pfn = self.fresh
            self.fresh = pfn + 1
        else:
            raise GuestKernelError(f"out of memory: all {self.nframes} frames in use")
        self.ref[pfn] = 1
        pa = pfn << 12
        if zero:
            self._clear_page(pa)
        return pa

    def _put_page(self, pa: int) -> None:
        pfn = pa >> 12
        if pa == self.zero_page:
            return
        r = self.ref[pfn] - 1
        if r < 0:
            raise GuestKernelError(f"frame {pfn:#x} freed twice")
        self.ref[pfn] = r
        if r == 0:
            self.free.append(pfn)

    def _clear_page(self, pa: int) -> None:
        self.vcpu.rep_stos(self.po + pa, 0, 512)            # clear_page: rep stosq
        ev = self.events
        ev["pages_zeroed"] += 1
        ev["kernel_accesses"] += 512

    def _copy_page(self, dst: int, src: int) -> None:
        self.vcpu.rep_movs(self.po + dst, self.po + src, 512)    # copy_page: rep movsq
        ev = self.events
        ev["pages_copied"] += 1
        ev["kernel_accesses"] += 1024

