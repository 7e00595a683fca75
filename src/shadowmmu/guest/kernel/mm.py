"""Address-space descriptors: a VMA (one mapping) and an mm (a process's VMAs and root table).

Plain data, as Linux's vm_area_struct and mm_struct; the page tables they stand
for are built and torn down by ``pgtable.py``.
"""

from __future__ import annotations

STACK_LIMIT = 8 << 20            # RLIMIT_STACK


class Vma:
    __slots__ = ("start", "end", "prot", "file", "pgoff", "kind", "growsdown")

    def __init__(self, start, end, prot, file=None, pgoff=0, kind="anon", growsdown=False):
        self.start, self.end, self.prot, self.file, self.pgoff = start, end, prot, file, pgoff
        self.kind, self.growsdown = kind, growsdown

    def copy(self) -> "Vma":
        return Vma(self.start, self.end, self.prot, self.file, self.pgoff, self.kind, self.growsdown)

    def __repr__(self) -> str:
        p = "".join(c if self.prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
        return f"Vma({self.start:#x}-{self.end:#x} {p} {self.kind}{' ' + self.file.name if self.file else ''})"


class Mm:
    __slots__ = ("pgd", "vmas", "start_brk", "brk", "mmap_base", "tables")

    def __init__(self, pgd: int):
        self.pgd = pgd
        self.vmas: list[Vma] = []
        self.start_brk = self.brk = 0
        self.mmap_base = 0
        self.tables = 1

    def find_vma(self, addr: int):
        """The first VMA ending above addr (Linux's find_vma)."""
        for v in self.vmas:
            if v.end > addr:
                return v
        return None

    def insert(self, vma: Vma) -> None:
        self.vmas.append(vma)
        self.vmas.sort(key=lambda v: v.start)

