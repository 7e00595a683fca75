"""The frame-access protocol (x86.frames) and the mmap memory backend."""

import ctypes

import pytest

from shadowmmu.analysis.run import run_workload
from shadowmmu.vm import VM
from shadowmmu.x86 import (
    Access, FrameSource, FrameStore, MappedPhysicalMemory, PhysicalAddressError, PhysicalMemory, physical_memory,
    translate,
)
from shadowmmu.x86.builder import PageTableBuilder
from shadowmmu.x86.formats import PagingMode


def test_host_memory_is_a_frame_store_and_guest_memory_a_frame_source(memory_backend):
    vm = VM(1 << 20, native=True, memory=memory_backend)
    assert type(vm.host) is {"dict": PhysicalMemory, "mmap": MappedPhysicalMemory}[memory_backend]
    assert vm.host.backend == memory_backend
    assert isinstance(vm.host, FrameStore)
    assert isinstance(vm.gmem, FrameSource) and not isinstance(vm.gmem, FrameStore)


def test_frame_views_alias_one_frame_and_only_writes_allocate(memory_backend):
    mem = physical_memory(1 << 24, backend=memory_backend)
    assert mem.frames.get(7) is None                     # untouched: no storage
    assert mem.qwords(7)[511] == 0 and mem.dwords(7)[0] == 0
    assert list(mem.frames.items()) == []
    f = mem.frame_w(7)
    assert len(f[0]) == 4096 and not any(f[0])           # allocated zeroed
    assert mem.frames.get(7) is f and mem.frame_w(7) is f        # the same views every time
    f[1][2] = 0x1122334455667788                         # through the u64 view ...
    assert f[2][4] == 0x55667788 and f[2][5] == 0x11223344     # ... seen by the u32 view
    assert bytes(f[0][16:24]) == bytes.fromhex("8877665544332211")
    assert mem.read_u64(0x7010) == 0x1122334455667788
    mem.write_u32(0x3004, 5)
    assert list(mem.frames) == [7, 3]                    # allocation order
    assert mem.frames[3][2][1] == 5
    assert mem.allocated_frames() == [3, 7]
    with pytest.raises(PhysicalAddressError, match="frame 0x1000 is outside memory of size 0x1000000"):
        mem.frame_w(0x1000)
    assert mem.frames.get(0x1000) is None


def test_the_mmap_buffer_is_the_memory_zero_copy():
    mem = MappedPhysicalMemory(1 << 30)
    assert len(mem.buffer) == 1 << 30
    mem.write_u64(0x12345678, 0xDEADBEEF_CAFEF00D)            # the API writes the buffer ...
    assert mem.buffer[0x12345678:0x12345680] == (0xDEADBEEF_CAFEF00D).to_bytes(8, "little")
    mem.frame_w(0x100)                                        # ... and a foreign writer, having taken the frame,
    mem.buffer[0x100FF8:0x101000] = (0x0102030405060708).to_bytes(8, "little")   # writes the memory
    assert mem.read_u64(0x100FF8) == 0x0102030405060708
    assert mem.frames.get(0x100)[1][511] == 0x0102030405060708
    # host_address() is where the buffer is in this process: a raw pointer reads the same bytes
    ptr = mem.host_address()
    assert ctypes.c_uint64.from_address(ptr + 0x12345678).value == 0xDEADBEEF_CAFEF00D
    ctypes.c_uint32.from_address(ptr + 0x100000).value = 0xA5A5A5A5
    assert mem.read_u32(0x100000) == 0xA5A5A5A5
    with pytest.raises(BufferError):
        mem.buffer.close()                  # the mapping cannot go away under a pointer into it


def test_a_walk_in_mmap_memory_sets_a_and_d_in_the_buffer():
    mem = MappedPhysicalMemory(1 << 24, maxphyaddr=40)
    b = PageTableBuilder(mem, PagingMode.LEVEL4)
    b.map(0x7F00_0000_3000, 0x5000, 0x07)               # P|W|U, A and D clear
    t = translate(mem, b.cpu(), 0x7F00_0000_3123, Access.WRITE | Access.USER)
    assert t.paddr == 0x5123
    leaf_addr, leaf = t.entries[-1][1], t.entries[-1][2]
    assert leaf == 0x5000 | 0x67                        # A and D set ...
    assert int.from_bytes(mem.buffer[leaf_addr:leaf_addr + 8], "little") == leaf      # ... in the buffer


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_64_gib_mmap_memory_commits_only_the_pages_written():
    before = _resident_bytes()
    mem = MappedPhysicalMemory(64 << 30)
    for pfn in range(0, 1 << 24, 1 << 20):              # 16 frames spread over 64 GiB
        mem.write_u64(pfn << 12, pfn)
    assert mem.read_u64(0xF00000 << 12) == 0xF00000
    assert _resident_bytes() - before < 16 << 20        # 64 KiB of data, page tables, Python objects


def test_a_memory_the_mmap_backend_cannot_map_is_one_clear_error():
    said = r"the mmap memory backend cannot map 0x10000000000000 bytes \(4\.1943e\+06 GiB\): "
    with pytest.raises(MemoryError, match=said):
        MappedPhysicalMemory(1 << 52)           # 4 PiB: more than a process's address space


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown memory backend 'heap' \\(choose from dict, mmap\\)"):
        physical_memory(1 << 20, backend="heap")
    with pytest.raises(ValueError, match="unknown memory backend 'heap'"):
        VM(1 << 20, memory="heap")


def test_guest_memory_linear_range_is_the_first_memslot():
    vm = VM(1 << 20)
    s = vm.slots[0]
    assert vm.gmem.linear_range() == (0, 256, s.host_pfn)
    assert vm.gmem.frames.get(3) is None                # untouched guest RAM
    vm.gmem.write_u64(0x3008, 9)
    assert vm.gmem.frames.get(3) is vm.host.frames[s.host_pfn + 3]
    assert vm.gmem.frames.get(3)[1][1] == 9
    assert vm.gmem.frames.get(256) is None and vm.gmem.qwords(256)[0] == (1 << 64) - 1    # nothing behind it


def _untimed(r):
    """A workload report without its wall-clock figures."""
    if isinstance(r, dict):
        return {k: _untimed(v) for k, v in r.items() if "seconds" not in k and "per_s" not in k}
    return r


@pytest.mark.parametrize("policy", ("native", "update"))
def test_a_workload_runs_the_same_on_both_backends(policy):
    runs = {}
    for backend in ("dict", "mmap"):
        vm = VM(4 << 20, native=policy == "native", memory=backend)
        r = run_workload(vm, "fork", guest="64", size=3, seed=3)
        runs[backend] = (_untimed(r), vm.guest_memory(), vm.host.allocated_frames())
    assert runs["mmap"][0] == runs["dict"][0]
    assert runs["mmap"][1] == runs["dict"][1]
    assert runs["mmap"][2] == runs["dict"][2]
