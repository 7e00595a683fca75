"""Workloads: deterministic guest programs, sized by ``size``, run on the guest kernel.

- ``demand``   one process writes ``size`` fresh anonymous pages (one demand fault each).
- ``fork``     lmbench lat_proc fork: fork, the child exits at once, the parent waits; ``size`` times.
- ``forkwait`` Adams & Agesen's fork/waitpid loop: the child touches a few pages (copy on
               write, demand zero) and exits; ``size`` times.
- ``kbuild``   make → sh → compiler for each of ``size`` source files, then a link.
- ``memtouch`` 4 processes, ``size`` cycles each of mmap / touch / read back / munmap, interleaved.

The kbuild proportions come from a real compiler run measured on this machine
(gcc 12.2.0, Debian 12, x86-64, Linux with fault-around).  The source is a
325-line, 7956-byte C file (structs, a linked list, 24 functions calling printf
and strlen) — ``unit.c``::

    /usr/bin/time -v gcc -O2 -c unit.c -o unit.o
        Maximum resident set size (kbytes): 34332
        Minor (reclaiming a frame) page faults: 3400   (driver ~60 + cc1 3010 + as 331)
    /usr/bin/time -f "%M %R" <cc1 alone, same flags>      34704 KB, 3010 minor faults
    /usr/bin/time -f "%M %R" as unit.s -o unit.o          4216 KB, 331 minor faults
    /usr/bin/time -f "%M %R" gcc unit.o -o unit           9352 KB, 1950 minor faults (link)
    /usr/bin/time -f "%M %R" sh -c true                   1632 KB, 86 (dash)
    /usr/bin/time -f "%M %R" make -n                      2308 KB, 162
    output: unit.s 15773 bytes, unit.o 8080 bytes

and cc1's resident set at exit (gdb ``catch syscall exit_group``, then its
/proc/PID/smaps summed by mapping): cc1 text 15828 KB + rodata 6004 KB (file
backed, shared), cc1 data 48 KB (28 KB of it copied on write), shared libraries
(libc, libm, gmp, mpfr, isl, zstd, ld.so) 2320 KB text + 1292 KB read-only +
108 KB data, anonymous heap and mmap arenas 8592 KB, stack 92 KB.

A 2.6 kernel has no fault-around, so every resident page was one fault: the model
uses *resident pages* (not today's minor-fault count, which fault-around divides
by up to 16) and scales them down by ``KBUILD_SCALE`` = 32 so a default build
simulates in a few seconds.  File sizes (source, object) are not scaled.  Per
compiler process that gives: 170 pages of compiler text/rodata touched out of a
254-page binary (33.3 MB text / 4096 / 32), 28 pages of shared-library text out of
32 (+1 data page), 67 heap pages (brk), the stack, one data page written (COW of
the private file mapping), a 2-page source read and a 2-page object written.
make: 18 resident pages (8 text, 4 libc, 5 heap, stack); sh: 13 (6 text, 4 libc,
2 heap, stack); link: 73 (40 text, 10 libc, 22 heap, stack), reading every object.
The compiler makes ``CC_PASSES`` passes over its text and heap (16 qwords per
text page — one fetch and 15 loads — and 64 stores + 64 loads per heap page each pass): the real
cc1 executes ~10^8 instructions per file, far more accesses per fault than any
simulation can afford, so only the page footprint is to scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernel import Image, Kernel
from .user import PROT_READ, PROT_WRITE, brk, exec_, exit_, fork, mmap, munmap, read, sched_yield, wait, write

KBUILD_SCALE = 32
MEASURED_GCC = {
    "command": "/usr/bin/time -v gcc -O2 -c unit.c -o unit.o",
    "compiler": "gcc (Debian 12.2.0-14+deb12u1) 12.2.0, x86-64",
    "source_lines": 325, "source_bytes": 7956, "asm_bytes": 15773, "object_bytes": 8080,
    "max_rss_kb": 34332, "minor_faults": 3400, "major_faults": 0, "processes": 3,
    "cc1_max_rss_kb": 34704, "cc1_minor_faults": 3010, "as_minor_faults": 331,
    "link_max_rss_kb": 9352, "link_minor_faults": 1950,
    "sh_max_rss_kb": 1632, "sh_minor_faults": 86, "make_max_rss_kb": 2308, "make_minor_faults": 162,
    "cc1_resident_kb": {"text": 15828, "rodata": 6004, "data": 48, "lib_text": 2320, "lib_ro": 1292,
                        "lib_data": 108, "anon": 8592, "stack": 92},
}
CC_TEXT_FILE = 254          # 33,274,211-byte cc1 text / 4096 / 32
CC_TEXT = 170               # (15828 + 6004) KB / 4 / 32
CC_LIBS = 28                # (2320 + 1292) KB / 4 / 32
CC_HEAP = 67                # 8592 KB / 4 / 32
CC_PASSES = 8
SRC_PAGES = 2               # 7956 bytes
OBJ_PAGES = 2               # 8080 bytes
LIBC_TEXT, LIBC_DATA = 32, 1


@dataclass(frozen=True)
class Workload:
    name: str
    setup: object            # setup(kernel, size, seed) -> expected number of process exits
    default_size: int
    description: str
    ram_mb: int              # guest RAM it is comfortable with at its default size
    unit: str                # what ``size`` counts
    pages: object            # pages(size) -> an upper bound of the frames it holds at once (measured + margin)


def _libc(k: Kernel):
    f = k.files.get("libc.so.6") or k.new_file("libc.so.6", LIBC_TEXT + LIBC_DATA)
    return (f, LIBC_TEXT, LIBC_DATA)


def _image(k: Kernel, name: str, text: int, data: int = 1, bss: int = 0, file_pages: int | None = None,
           libc: bool = True) -> Image:
    f = k.files.get(name) or k.new_file(name, (file_pages or text) + data)
    return Image(name, f, file_pages or text, data, bss, (_libc(k),) if libc else ())


def _startup(u, libc_pages: int):
    """What ld.so and crt0 do: run some libc, write libc's and our data (COW), a stack frame."""
    u.run(u.lib0, libc_pages, 8)
    u.write(u.lib0_data, u.lib0_data_pages, 4, tag=u.pid)
    if u.data_pages:
        u.write(u.data, 1, 4, tag=u.pid + 1)
    u.write(u.stack_top - 4096, 1, 8, tag=u.pid + 2)


def _grow_heap(u, pages: int, tag: int):
    """brk() the heap up by ``pages`` and write them (8 qwords a page); returns the old top."""
    top = yield brk(0)
    yield brk(top + (pages << 12))
    u.write(top, pages, 8, tag=tag)
    return top


# ------------------------------------------------------------------ demand
def _demand(k: Kernel, size: int, seed: int) -> int:
    def prog(u, n):
        addr = yield mmap(n, PROT_READ | PROT_WRITE)
        u.write(addr, n, 8, tag=seed + 1)
        u.verify()
        yield exit_(0)
    k.spawn(_image(k, "demand", 2, libc=False), prog, size)
    return 1


# -------------------------------------------------------------------- fork
def _fork_and_wait_loop(k: Kernel, size: int, seed: int, name: str, child) -> int:
    """A parent with a 16-page heap that forks ``child(u, i)`` and waits for it, N times
    (the shape of lmbench's lat_proc fork and of Adams & Agesen's forkwait)."""
    def parent(u, n):
        _startup(u, 8)
        yield from _grow_heap(u, 16, seed + 7)
        for i in range(n):
            yield fork(child, i)
            yield wait()
        u.verify()
        yield exit_(0)
    k.spawn(_image(k, name, 6), parent, size)
    return size + 1


def _fork(k: Kernel, size: int, seed: int) -> int:
    def child(u, i):
        yield exit_(0)
    return _fork_and_wait_loop(k, size, seed, "lat_proc", child)


# ---------------------------------------------------------------- forkwait
def _forkwait(k: Kernel, size: int, seed: int) -> int:
    def child(u, i):
        u.write(u.heap + ((i % 4) << 12), 4, 8, tag=seed + 100 + i)     # copy on write
        u.write(u.stack_top - 4096, 1, 8, tag=seed + 200 + i)           # COW of the stack
        u.read(u.heap, 16, 2)
        extra = yield mmap(2)
        u.write(extra, 2, 8, tag=i)                                      # demand zero
        u.verify()
        yield exit_(0)
    return _fork_and_wait_loop(k, size, seed, "forkwait", child)


# ---------------------------------------------------------------- memtouch
def _memtouch(k: Kernel, size: int, seed: int) -> int:
    nproc = 4

    def worker(u, w, cycles):
        for c in range(cycles):
            npages = 8 + (seed + w * 7 + c * 5) % 24
            addr = yield mmap(npages)
            u.write(addr, npages, 16, tag=(w << 16) | c)
            u.read(addr, npages, 16)
            u.verify()
            yield munmap(addr, npages)
            yield sched_yield()
        yield exit_(0)

    def parent(u, cycles):
        _startup(u, 4)
        for w in range(nproc):
            yield fork(worker, w, cycles)
        for _ in range(nproc):
            yield wait()
        yield exit_(0)
    k.spawn(_image(k, "memtouch", 4), parent, size)
    return nproc + 1


# ------------------------------------------------------------------ kbuild
def _kbuild(k: Kernel, size: int, seed: int) -> int:
    cc = _image(k, "cc1", CC_TEXT, 1, 0, file_pages=CC_TEXT_FILE)
    sh = _image(k, "sh", 6, 1)
    ld = _image(k, "ld", 40, 1)
    make = _image(k, "make", 8, 1)
    srcs = [k.new_file(f"src{i}.c", SRC_PAGES, key=seed * 1000 + i) for i in range(size)]
    objs = [k.new_file(f"src{i}.o", 0, key=seed * 1000 + 500 + i) for i in range(size)]
    out = k.new_file("vmlinux", 0, key=seed * 1000 + 999)

    def compiler(u, i):
        _startup(u, CC_LIBS)
        heap = yield brk(0)
        yield brk(heap + (CC_HEAP << 12))
        yield read(srcs[i], heap, SRC_PAGES)                 # the source, into the heap
        u.check_file(heap, srcs[i], SRC_PAGES)
        work = heap + (SRC_PAGES << 12)
        nwork = CC_HEAP - SRC_PAGES - OBJ_PAGES
        # parse, optimise, emit: passes over a growing part of the text and of the heap
        for p in range(CC_PASSES):
            ntext = CC_TEXT * (p + 1) // CC_PASSES
            u.run(u.text, ntext, 16)
            u.write(work, nwork * (p + 1) // CC_PASSES, 64, tag=(i << 8) | p)
            u.read(work, nwork * (p + 1) // CC_PASSES, 64)
            u.write(u.stack_top - 8192, 2, 16, tag=p)
        u.run(u.lib0, CC_LIBS, 16)
        objbuf = work + (nwork << 12)
        u.write_file_image(objbuf, objs[i], OBJ_PAGES)
        yield write(objs[i], objbuf, OBJ_PAGES)
        u.verify()
        yield exit_(0)

    def shell(u, i):
        _startup(u, 4)
        yield from _grow_heap(u, 2, i)
        yield fork(exec_child, cc, compiler, i)
        u.write(u.stack_top - 4096, 1, 2, tag=i)           # back in the parent: its stack (COW or reuse)
        _, status = yield wait()
        if status != 0:
            raise RuntimeError(f"compiler {i} failed with status {status}")
        u.verify()
        yield exit_(0)

    def exec_child(u, image, fn, *args):
        u.write(u.stack_top - 4096, 1, 2, tag=u.pid)      # the child's stack frame: copy on write
        yield exec_(image, fn, *args)

    def linker(u):
        _startup(u, 10)
        heap = yield brk(0)
        yield brk(heap + (22 << 12))
        buf = heap
        for i in range(size):
            yield read(objs[i], buf, OBJ_PAGES)
            u.check_file(buf, objs[i], OBJ_PAGES, nqwords=16)
        u.run(u.text, 40, 16)
        work = heap + (OBJ_PAGES << 12)
        u.write(work, 22 - OBJ_PAGES - 2, 16, tag=99)
        outbuf = heap + (20 << 12)
        u.write_file_image(outbuf, out, 2)
        yield write(out, outbuf, 2)
        u.verify()
        yield exit_(0)

    def make_prog(u, n):
        _startup(u, 4)
        top = yield from _grow_heap(u, 5, seed)
        for i in range(n):
            u.read(top, 5, 4)                                # the dependency graph
            yield fork(exec_child, sh, shell, i)
            u.write(u.stack_top - 4096, 1, 2, tag=i)
            _, status = yield wait()
            if status != 0:
                raise RuntimeError(f"make: job {i} failed with status {status}")
        yield fork(exec_child, ld, linker)
        _, status = yield wait()
        if status != 0:
            raise RuntimeError(f"make: link failed with status {status}")
        u.verify()
        yield exit_(0)

    k.spawn(make, make_prog, size)
    return 2 * size + 2


# pages(size): peak frames in use measured on 32-bit and 64-bit guests (demand: size + 10,
# kbuild: 4 x size + 320, the others 94 whatever their size), with a margin.
WORKLOADS = {
    "demand": Workload("demand", _demand, 256, "one process writes N fresh anonymous pages", 16, "pages",
                       lambda n: n + n // 256 + 64),
    "fork": Workload("fork", _fork, 50, "lmbench lat_proc fork: fork + immediate exit + wait, N times", 16,
                     "forks", lambda n: 160),
    "forkwait": Workload("forkwait", _forkwait, 40,
                         "Adams & Agesen fork/waitpid: the child touches a few pages and exits, N times", 16,
                         "forks", lambda n: 160),
    "kbuild": Workload("kbuild", _kbuild, 8, "make -> sh -> compiler for N source files, then a link", 24,
                       "source files", lambda n: 4 * n + 400),
    "memtouch": Workload("memtouch", _memtouch, 20, "4 processes x N cycles of mmap/touch/munmap", 16,
                         "cycles per process", lambda n: 160),
}


def boot(vm, guest: str = "64", seed: int = 0, **kwargs) -> Kernel:
    """Boot the guest kernel on ``vm``'s vCPU and return it (no processes yet)."""
    return Kernel(vm, guest, seed, **kwargs)
