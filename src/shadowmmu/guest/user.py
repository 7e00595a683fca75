"""User programs: what runs at CPL3, and how it asks the kernel for things.

A program is a generator function ``prog(u, *args)``.  It touches memory with
``u.ld(va, size)`` / ``u.st(va, value, size)`` / ``u.fe(va)`` — the vCPU's own
load/store/fetch, bound once, so a user access costs exactly what the vCPU
costs — and makes system calls by yielding a request built by the functions
below; the value of the ``yield`` is the system call's return value::

    def child(u):
        u.write(u.heap, 4, 8, tag=1)          # 4 pages, 8 qwords each
        yield exit_(0)

    def parent(u):
        pid = yield fork(child)
        pid, status = yield wait()

``fork(fn, *args)``: the child runs ``fn`` in a copy of the address space (a
Python generator cannot be duplicated, so the child's continuation is named
explicitly; everything else is fork's).  A bad access kills the process with
SIGSEGV: the exception leaves the generator and the kernel reaps it.

The bulk helpers (``write``/``read``/``run``/``verify``) are the hot loops:
plain ints, one vCPU call per access, accesses counted in bulk.  Every value a
program writes is ``tagk ^ va`` (``tagk`` from the tag), and the program keeps,
per page, the tag and extent of its latest write, so ``verify()`` can read back
everything it last wrote: the memory check of every workload.
"""

from __future__ import annotations

from .files import K_FILE, K_WORD, M64

# system call numbers (the request is a tuple: (nr, args...))
SYS_EXIT, SYS_FORK, SYS_EXEC, SYS_WAIT, SYS_BRK, SYS_MMAP, SYS_MUNMAP, SYS_MPROTECT, SYS_YIELD, \
    SYS_READ, SYS_WRITE, SYS_GETPID = range(12)

PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4

TAG_K = 0x2545F4914F6CDD1D


def exit_(code: int = 0):
    return (SYS_EXIT, code)


def fork(fn, *args):
    return (SYS_FORK, fn, args)


def exec_(image, fn, *args):
    return (SYS_EXEC, image, fn, args)


def wait():
    """waitpid(-1): (pid, status) of a child that exited, or (-1, None) with no children."""
    return (SYS_WAIT,)


def brk(addr: int):
    """Set the program break; returns the new break (unchanged on failure). brk(0) asks."""
    return (SYS_BRK, addr)


def mmap(npages: int, prot: int = PROT_READ | PROT_WRITE, file=None, pgoff: int = 0):
    """A private mapping (anonymous, or of ``file`` from page ``pgoff``); returns its address."""
    return (SYS_MMAP, npages, prot, file, pgoff)


def munmap(addr: int, npages: int):
    return (SYS_MUNMAP, addr, npages)


def mprotect(addr: int, npages: int, prot: int):
    return (SYS_MPROTECT, addr, npages, prot)


def sched_yield():
    return (SYS_YIELD,)


def read(file, buf: int, npages: int, pgoff: int = 0):
    """Copy ``npages`` pages of ``file`` into the user buffer (copy_to_user)."""
    return (SYS_READ, file, buf, npages, pgoff)


def write(file, buf: int, npages: int):
    """Replace the file's content with ``npages`` pages from the user buffer (copy_from_user)."""
    return (SYS_WRITE, file, buf, npages)


def getpid():
    return (SYS_GETPID,)


class MemoryCheckError(AssertionError):
    """A program read back something other than what it (or the file) holds."""


class User:
    """What a program sees: its vCPU accessors, its layout, the bulk access helpers."""

    def __init__(self, kernel, proc):
        v = kernel.vcpu
        self.ld = v.load
        self.st = v.store
        self.fe = v.fetch
        self.kernel = kernel
        self.proc = proc
        self.pid = proc.pid
        self.written: dict[int, tuple[int, int]] = {}   # page va -> (tagk, nqwords) of the latest write
        self.layout: dict[str, int] = {}
        self.naccesses = 0

    def child_copy(self, proc) -> "User":
        """The child's view after fork: same layout, same memory contents."""
        u = User(self.kernel, proc)
        u.written = dict(self.written)
        u.layout = dict(self.layout)
        return u

    def __getattr__(self, name):
        # layout entries read as attributes: u.heap, u.stack_top, u.text, ...
        try:
            return self.__dict__["layout"][name]
        except KeyError:
            raise AttributeError(name) from None

    # ------------------------------------------------------------ bulk loops
    def write(self, start: int, npages: int, nqwords: int, tag: int) -> None:
        """Store ``nqwords`` qwords at the start of each of ``npages`` pages."""
        st = self.st
        tagk = (tag * TAG_K) & M64
        rec = self.written
        span = 8 * nqwords
        for pva in range(start, start + (npages << 12), 4096):
            for va in range(pva, pva + span, 8):
                st(va, tagk ^ va)
            rec[pva] = (tagk, nqwords)
        self.naccesses += npages * nqwords

    def read(self, start: int, npages: int, nqwords: int) -> int:
        """Load ``nqwords`` qwords from each page; returns their xor (a checksum)."""
        ld = self.ld
        x = 0
        span = 8 * nqwords
        for pva in range(start, start + (npages << 12), 4096):
            for va in range(pva, pva + span, 8):
                x ^= ld(va)
        self.naccesses += npages * nqwords
        return x

    def run(self, start: int, npages: int, nqwords: int) -> None:
        """Execute code: one instruction fetch per page, then ``nqwords - 1`` loads
        from it (the rest of the instruction stream and its constants)."""
        ld, fe = self.ld, self.fe
        span = 8 * nqwords
        for pva in range(start, start + (npages << 12), 4096):
            fe(pva)
            for va in range(pva + 8, pva + span, 8):
                ld(va)
        self.naccesses += npages * nqwords

    def write_file_image(self, start: int, file, npages: int, nqwords: int = 512) -> None:
        """Fill a buffer with the content ``file`` is to have (before write())."""
        st = self.st
        base = file.base()
        for p in range(npages):
            pva = start + (p << 12)
            q0 = p << 9
            for i in range(nqwords):
                st(pva + 8 * i, (base + (q0 + i) * K_WORD) & M64)
            self.written[pva] = (None, nqwords)      # not a tag pattern: verified through the file
        self.naccesses += npages * nqwords

    def check_file(self, start: int, file, npages: int, pgoff: int = 0, nqwords: int = 4) -> None:
        """Load the first qwords of each page at ``start`` and compare with the file's content."""
        ld = self.ld
        base = file.base()
        for p in range(npages):
            pva = start + (p << 12)
            q0 = (pgoff + p) << 9
            for i in range(nqwords):
                got = ld(pva + 8 * i)
                want = (base + (q0 + i) * K_WORD) & M64
                if got != want:
                    raise MemoryCheckError(
                        f"pid {self.pid}: {file.name} page {pgoff + p} qword {i} at {pva + 8 * i:#x} "
                        f"reads {got:#x}, the file holds {want:#x}")
        self.naccesses += npages * nqwords

    def forget(self, start: int, npages: int) -> None:
        """The range was unmapped: stop expecting what was written there."""
        rec = self.written
        for pva in range(start, start + (npages << 12), 4096):
            rec.pop(pva, None)

    def verify(self) -> int:
        """Read back the latest write to every page; raise MemoryCheckError on a mismatch."""
        ld = self.ld
        n = 0
        for pva, (tagk, nq) in self.written.items():
            if tagk is None:
                continue
            for va in range(pva, pva + 8 * nq, 8):
                got = ld(va)
                if got != tagk ^ va:
                    raise MemoryCheckError(
                        f"pid {self.pid} ({self.proc.name}): {va:#x} reads {got:#x}, "
                        f"the process wrote {tagk ^ va:#x}")
            n += nq
        self.naccesses += n
        self.kernel.events["verified_qwords"] += n
        return n


__all__ = [
    "SYS_EXIT", "SYS_FORK", "SYS_EXEC", "SYS_WAIT", "SYS_BRK", "SYS_MMAP", "SYS_MUNMAP", "SYS_MPROTECT",
    "SYS_YIELD", "SYS_READ", "SYS_WRITE", "SYS_GETPID", "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC",
    "exit_", "fork", "exec_", "wait", "brk", "mmap", "munmap", "mprotect", "sched_yield", "read", "write",
    "getpid", "User", "MemoryCheckError", "K_FILE",
]
