"""Files and their contents: what the guest's "disk" holds.

A file is a name, a length in pages and a key.  The content of an unwritten file
is a deterministic function of (key, qword index) — so "reading a page from
disk" is the kernel filling a page-cache frame with 512 guest stores of these
values, and anybody can check what they read.  A program that writes a file
(a compiler writing its object) writes exactly the words ``word(file, i)`` of
that file, so readers check written files the same way.

The page cache itself (which frame holds page i of a file) lives in the kernel
(``Kernel.page_cache``); this module has no guest state.
"""

from __future__ import annotations

import zlib

M64 = (1 << 64) - 1
K_FILE = 0x9E3779B97F4A7C15
K_WORD = 0xD1B54A32D192ED03


def file_key(name: str, seed: int) -> int:
    """The key of a file named ``name`` in a guest booted with ``seed``: a stable
    hash (CRC-32), not Python's ``hash()``, which changes with PYTHONHASHSEED."""
    return zlib.crc32(f"{name}\0{seed}".encode())


class File:
    """A file on the guest's disk.  ``ino`` is unique per kernel."""

    __slots__ = ("name", "npages", "key", "ino")

    def __init__(self, name: str, npages: int, key: int, ino: int):
        if npages < 0:
            raise ValueError(f"file {name!r}: negative size")
        self.name, self.npages, self.key, self.ino = name, npages, key, ino

    def base(self) -> int:
        """The per-file constant of word(): value of qword i is (base + i*K_WORD) mod 2^64."""
        return (self.key * K_FILE) & M64

    def word(self, qword_index: int) -> int:
        return (self.base() + qword_index * K_WORD) & M64

    def __repr__(self) -> str:
        return f"File({self.name!r}, {self.npages} pages)"
