"""PhysicalMemory behaviour (both backends) and the `shadowmmu walk` command."""

import subprocess
import sys

import pytest

from shadowmmu.cli import main
from shadowmmu.x86 import PhysicalAddressError, PhysicalMemory, physical_memory
from shadowmmu.x86.builder import PageTableBuilder
from shadowmmu.x86.formats import PagingMode


def test_a_64_gib_memory_allocates_only_touched_pages(memory_backend):
    mem = physical_memory(64 << 30, backend=memory_backend)
    mem.write_u64(0xF_FFFF_F000, 0x1122334455667788)
    mem.write(0x1FFE, b"\xaa\xbb\xcc\xdd")             # straddles two frames
    assert mem.allocated_frames() == [1, 2, 0xFFFFFF]
    assert mem.read_u64(0xF_FFFF_F000) == 0x1122334455667788
    assert mem.read(0x1FFE, 4) == b"\xaa\xbb\xcc\xdd"
    assert mem.read_u32(0x1FFC) == 0xBBAA0000
    assert mem.read(0x5000_0000, 8) == bytes(8)        # untouched reads as zero, allocates nothing
    assert len(mem.allocated_frames()) == 3


def test_unaligned_and_straddling_integer_access_is_little_endian(memory_backend):
    mem = physical_memory(1 << 20, backend=memory_backend)
    mem.write_u64(0xFFD, 0x0807060504030201)
    assert mem.read(0xFFD, 8) == bytes(range(1, 9))
    assert mem.read_u32(0xFFF) == 0x06050403


@pytest.mark.parametrize("paddr,n", [(1 << 20, 1), ((1 << 20) - 4, 8), (-1, 1)])
def test_out_of_range_access_names_the_address(paddr, n, memory_backend):
    mem = physical_memory(1 << 20, backend=memory_backend)
    with pytest.raises(PhysicalAddressError, match="outside memory"):
        mem.read(paddr, n)


def test_bad_sizes_are_rejected_clearly(memory_backend):
    with pytest.raises(ValueError, match="multiple of 4096"):
        physical_memory(1000, backend=memory_backend)
    with pytest.raises(ValueError, match="maxphyaddr"):
        physical_memory(1 << 20, maxphyaddr=60, backend=memory_backend)


@pytest.fixture
def image_4level(tmp_path):
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem, PagingMode.LEVEL4)
    b.map(0x7FFF_0000_1000, 0x9000, 0x05)        # user read-only
    path = tmp_path / "mem.raw"
    path.write_bytes(b"".join(mem.frame_bytes(p) for p in range(16)))
    return path, b.root


def test_walk_command_narrates_each_level_and_the_fault(image_4level, capsys):
    path, root = image_4level
    rc = main(["walk", str(path), "0x7fff00001234", "--mode", "64", "--cr3", hex(root),
               "--cpl", "3", "--access", "write"])
    out = capsys.readouterr().out
    assert rc == 1                                   # the documented status of a walk that faults
    for name in ("PML4E", "PDPTE", "PDE", "PTE"):
        assert name in out
    assert "#PF at 0x7fff00001234: error code 0x7 (P|W|U): protection violation, write, user mode" in out


def test_walk_command_reports_the_physical_address(image_4level, capsys):
    path, root = image_4level
    main(["walk", str(path), "0x7fff00001234", "--mode", "64", "--cr3", hex(root), "--cpl", "3"])
    assert "=> physical 0x9234 (4K page, rights -UX)" in capsys.readouterr().out


def test_walk_command_does_not_change_the_image_view_by_default(image_4level, capsys):
    path, root = image_4level
    main(["walk", str(path), "0x7fff00001234", "0x7fff00001234", "--mode", "64", "--cr3", hex(root)])
    out = capsys.readouterr().out
    assert "|A" not in out.split("PTE ")[-1]      # no A bit appeared on the leaf


def test_walk_command_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shadowmmu.cli", "walk", str(tmp_path / "missing"), "0x0",
                        "--mode", "64"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("shadowmmu: error: cannot read memory image")
    assert "Traceback" not in r.stderr


def test_walk_command_rejects_a_bad_mode(image_4level):
    path, _ = image_4level
    r = subprocess.run([sys.executable, "-m", "shadowmmu.cli", "walk", str(path), "0x0", "--mode", "16"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown paging mode '16'" in r.stderr


@pytest.mark.parametrize("extra,message", [
    (["0x123456789", "--mode", "32"], "does not fit in 32 bits"),
    (["0x1000", "--mode", "64", "--maxphyaddr", "60"], "--maxphyaddr must be between 32 and 52"),
    (["0x1000", "--mode", "64", "--cr3", "0x100000"], "leaves the image"),
])
def test_walk_command_bad_input_is_one_clear_line(image_4level, extra, message):
    path, _ = image_4level
    r = subprocess.run([sys.executable, "-m", "shadowmmu.cli", "walk", str(path), *extra],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
