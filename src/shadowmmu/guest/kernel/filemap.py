"""Files and the page cache (filemap.c): find_get_page, reading a page from "disk", read() and write().

The cache maps (file, page index) to a frame that holds a reference for the
cache (``in_cache`` marks it, so copy on write never reuses it).  A page missing
from the cache is read by filling a new frame with the file's content, 512
stores through the direct map (``files.py`` says what the content is).
"""

from __future__ import annotations

from ..files import K_WORD, M64, File, file_key


class FileMap:
    def new_file(self, name: str, npages: int, key: int | None = None) -> File:
        f = File(name, npages, file_key(name, self.seed) if key is None else key, len(self.files) + 1)
        self.files[name] = f
        return f

    def _find_get_page(self, file: File, index: int) -> int:
        key = (file.ino, index)
        pa = self.page_cache.get(key)
        if pa is None:
            pa = self._alloc_page(zero=False)
            self._fill_page(pa, file, index)
            self.in_cache[pa >> 12] = 1
            self.page_cache[key] = pa               # the cache's reference
        else:
            self.events["page_cache_hits"] += 1
        return pa

    def _fill_page(self, pa: int, file: File, index: int) -> None:
        """Read page ``index`` of ``file`` from disk: 512 stores of its content."""
        st = self.vcpu.store
        va = self.po + pa
        base = (file.base() + (index << 9) * K_WORD) & M64
        for i in range(512):
            st(va + 8 * i, (base + i * K_WORD) & M64)
        ev = self.events
        ev["pages_read"] += 1
        ev["kernel_accesses"] += 512

    def _sys_read(self, p, file: File, buf: int, npages: int, pgoff: int) -> int:
        """read(): copy ``npages`` pages of ``file`` from ``pgoff`` through the page cache to ``buf``."""
        st = self.vcpu.store
        ld = self.vcpu.load
        po = self.po
        for i in range(npages):
            src = po + self._find_get_page(file, pgoff + i)
            dst = buf + (i << 12)
            for off in range(0, 4096, 8):               # copy_to_user (may fault: demand)
                st(dst + off, ld(src + off))
        self.events["kernel_accesses"] += 1024 * npages
        p.user.forget(buf, npages)
        return npages

    def _sys_write(self, file: File, buf: int, npages: int) -> int:
        """write() of a whole file: ``npages`` pages from ``buf`` into the page cache, the rest truncated."""
        ld, st = self.vcpu.load, self.vcpu.store
        po = self.po
        for i in range(npages):
            key = (file.ino, i)
            pa = self.page_cache.get(key)
            if pa is None:
                pa = self._alloc_page(zero=False)        # a whole page is written: no read
                self.in_cache[pa >> 12] = 1
                self.page_cache[key] = pa
            dst = po + pa
            src = buf + (i << 12)
            for off in range(0, 4096, 8):               # copy_from_user
                st(dst + off, ld(src + off))
        for i in range(npages, file.npages):             # truncate: drop the cache's pages
            pa = self.page_cache.pop((file.ino, i), None)
            if pa is not None:
                self.in_cache[pa >> 12] = 0
                self._put_page(pa)
        file.npages = npages
        self.events["kernel_accesses"] += 1024 * npages
        return npages
