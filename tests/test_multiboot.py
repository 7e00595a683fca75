"""The multiboot v1 loader: placement, the info block at the spec's offsets (Multiboot
0.6.96, section 3.3), the memory map, and one clear error for each bad image.

The ELF images are built by hand with ``struct`` (and once by the system's
assembler and linker), so the expectations come from the ELF and multiboot
formats, not from the loader."""

import shutil
import struct
import subprocess

import pytest

from shadowmmu.vm.multiboot import MultibootError, load_multiboot

MiB = 1 << 20
MAGIC = 0x1BADB002


def mb_header(flags=0x3, checksum=None):
    if checksum is None:
        checksum = (-(MAGIC + flags)) & 0xFFFFFFFF
    return struct.pack("<III", MAGIC, flags, checksum)


def make_elf(segments, entry, *, cls=32, machine=None, e_type=2, data_at=0x1000):
    """An ELF executable: segments are (vaddr, paddr, file bytes, memsz), stored one per
    page from file offset ``data_at``; program headers right after the ELF header."""
    is64 = cls == 64
    machine = machine if machine is not None else (62 if is64 else 3)
    ehsize, phsize = (64, 56) if is64 else (52, 32)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH" if is64 else "<16sHHIIIIIHHHHHH", ident, e_type, machine, 1, entry,
                       ehsize, 0, 0, ehsize, phsize, len(segments), 0, 0, 0)
    out = bytearray(ehdr)
    offsets = [data_at + 0x1000 * i for i in range(len(segments))]
    for (vaddr, paddr, data, memsz), off in zip(segments, offsets):
        if is64:
            out += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 0x1000)
        else:
            out += struct.pack("<IIIIIIII", 1, off, vaddr, paddr, len(data), memsz, 7, 0x1000)
    for (_, _, data, _), off in zip(segments, offsets):
        out += bytes(off - len(out))
        out += data
    return bytes(out)


def kernel(cls=32, flags=0x3, entry=0x10000C, text_memsz=None, bss=0x2000):
    """A typical small kernel: .text at 1 MiB starting with the multiboot header, then
    a .data+.bss segment at 0x102000."""
    text = mb_header(flags) + b"\xfa\xf4" + b"\x90" * 50           # cli; hlt; nops
    data = b"DATA" * 8
    return make_elf([(0x100000, 0x100000, text, text_memsz or len(text)),
                     (0x102000, 0x102000, data, len(data) + bss)], entry, cls=cls)


def ram_of(boot, ram_size):
    """Guest RAM as a caller builds it from a BootImage (bss zero-filled)."""
    ram = bytearray(ram_size)
    for paddr, data, memsz in boot.segments:
        ram[paddr:paddr + len(data)] = data
        ram[paddr + len(data):paddr + memsz] = bytes(memsz - len(data))
    for paddr, data in boot.writes:
        ram[paddr:paddr + len(data)] = data
    return ram


def u32(ram, addr):
    return struct.unpack_from("<I", ram, addr)[0]


def cstr(ram, addr):
    return bytes(ram[addr:ram.index(0, addr)]).decode()


@pytest.mark.parametrize("cls", [32, 64])
def test_segments_are_loaded_at_their_physical_addresses_with_bss(cls):
    img = kernel(cls)
    boot = load_multiboot(img, cmdline="k", ram_size=4 * MiB)
    assert boot.elf_class == cls
    assert [(s.paddr, s.memsz) for s in boot.segments] == [(0x100000, 64), (0x102000, 32 + 0x2000)]
    assert boot.segments[0].data == img[0x1000:0x1000 + 64]
    assert boot.segments[1].data == b"DATA" * 8
    assert boot.entry == 0x10000C and boot.eax == 0x2BADB002
    assert boot.code_ranges == [(0x100000, 0x100000, 64), (0x102000, 0x102000, 32)]
    # The kernel ends at 0x104020: the boot information starts on the next page.
    assert boot.kernel_end == 0x105000 and boot.info_addr == 0x105000


def test_info_block_fields_at_the_spec_offsets():
    ram_size = 64 * MiB
    boot = load_multiboot(kernel(), cmdline="build/mm-32.elf demand 200", ram_size=ram_size)
    ram = ram_of(boot, ram_size)
    mbi = boot.info_addr
    # flags: MEM (0) | CMDLINE (2) | MODS (3) | MMAP (6) | BOOT_LOADER_NAME (9)
    assert u32(ram, mbi + 0) == 0x24D
    assert u32(ram, mbi + 4) == 639                          # mem_lower, KiB
    assert u32(ram, mbi + 8) == (64 * 1024 - 1024)          # mem_upper, KiB above 1 MiB
    assert u32(ram, mbi + 12) == 0                          # boot_device: not given
    assert cstr(ram, u32(ram, mbi + 16)) == "build/mm-32.elf demand 200"
    assert u32(ram, mbi + 20) == 0 and u32(ram, mbi + 24) == 0   # mods_count, mods_addr
    assert cstr(ram, u32(ram, mbi + 64)) == "shadowmmu"
    assert bytes(ram[mbi + 28:mbi + 44]) == bytes(16)          # no symbols
    assert bytes(ram[mbi + 52:mbi + 64]) == bytes(12)          # no drives, no config table
    assert bytes(ram[mbi + 68:mbi + 116]) == bytes(48)         # no APM, VBE, framebuffer
    # Everything the loader wrote lies after the kernel, below boot.end, inside one page.
    for paddr, data in boot.writes:
        assert boot.kernel_end <= paddr and paddr + len(data) <= boot.end <= boot.info_addr + 4096


def test_memory_map_entries():
    ram_size = 32 * MiB
    boot = load_multiboot(kernel(), cmdline="k", ram_size=ram_size)
    ram = ram_of(boot, ram_size)
    length, addr = u32(ram, boot.info_addr + 44), u32(ram, boot.info_addr + 48)
    assert length == 4 * 24
    entries, at = [], addr
    while at < addr + length:
        size, base, ln, kind = struct.unpack_from("<IQQI", ram, at)
        entries.append((size, base, ln, kind))
        at += size + 4                # as the spec walks it: size does not count itself
    assert entries == [(20, 0, 0x9FC00, 1), (20, 0x9FC00, 0x400, 2), (20, 0xF0000, 0x10000, 2),
                       (20, 0x100000, ram_size - MiB, 1)]


def test_module_is_page_aligned_after_the_kernel_and_listed():
    ram_size = 16 * MiB
    mod = bytes(range(256)) * 20                               # 5120 bytes
    boot = load_multiboot(kernel(), cmdline="k a", ram_size=ram_size, module=mod, module_cmdline="initrd x")
    ram = ram_of(boot, ram_size)
    mbi = boot.info_addr
    assert u32(ram, mbi + 0) & 0x8
    assert u32(ram, mbi + 20) == 1
    mod_start, mod_end, string, reserved = struct.unpack_from("<IIII", ram, u32(ram, mbi + 24))
    assert (mod_start, mod_end) == (0x105000, 0x105000 + 5120) and reserved == 0
    assert bytes(ram[mod_start:mod_end]) == mod
    assert cstr(ram, string) == "initrd x"
    assert mbi == 0x107000                                     # the page after the module
    assert cstr(ram, u32(ram, mbi + 16)) == "k a"


def test_virtual_entry_is_translated_to_the_segment_physical_address():
    text = mb_header() + b"\xf4" * 20
    img = make_elf([(0xC0100000, 0x100000, text, len(text))], 0xC0100010)
    assert load_multiboot(img, cmdline="k", ram_size=4 * MiB).entry == 0x100010


def test_higher_half_elf64_with_physical_entry():
    text = mb_header() + b"\xf4" * 20
    img = make_elf([(0xFFFFFFFF80100000, 0x100000, text, len(text))], 0x10000C, cls=64)
    boot = load_multiboot(img, cmdline="k", ram_size=4 * MiB)
    assert boot.entry == 0x10000C
    assert boot.code_ranges == [(0xFFFFFFFF80100000, 0x100000, len(text))]


def test_header_found_at_a_later_aligned_offset_and_bad_checksum_skipped():
    text = mb_header(checksum=0) + bytes(4) + mb_header() + b"\xf4" * 8
    img = make_elf([(0x100000, 0x100000, text, len(text))], 0x100000)
    assert load_multiboot(img, cmdline="k", ram_size=4 * MiB).entry == 0x100000


def test_a_real_linker_output_loads(tmp_path):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("no binutils")
    (tmp_path / "k.s").write_text("""
        .section .multiboot, "a"
        .align 4
        .long 0x1BADB002, 3, -(0x1BADB002 + 3)
        .text
        .globl _start
    _start: cli
        hlt
        .bss
        .space 8192
    """)
    (tmp_path / "k.ld").write_text("ENTRY(_start) SECTIONS { . = 0x100000; .multiboot : { *(.multiboot) } "
                                   ".text : { *(.text) } .bss : { *(.bss) } }")
    subprocess.run(["as", "--32", "-o", tmp_path / "k.o", tmp_path / "k.s"], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", tmp_path / "k.ld", "-o", tmp_path / "k.elf", tmp_path / "k.o"],
                   check=True)
    img = (tmp_path / "k.elf").read_bytes()
    boot = load_multiboot(img, cmdline="k.elf", ram_size=8 * MiB)
    assert boot.entry == 0x10000C
    ram = ram_of(boot, 8 * MiB)
    assert bytes(ram[0x100000:0x10000E]) == mb_header() + b"\xfa\xf4"
    assert boot.kernel_end == 0x103000 and max(s.paddr + s.memsz for s in boot.segments) > 0x102000


def seg_kernel(paddr, memsz=None, entry=None, data=None):
    data = data if data is not None else mb_header() + b"\xf4" * 4
    return make_elf([(paddr, paddr, data, memsz or len(data))], entry if entry is not None else paddr)


BAD = {
    "no header": (make_elf([(0x100000, 0x100000, b"\xf4" * 64, 64)], 0x100000), "not a multiboot image"),
    "header beyond 8 KiB": (make_elf([(0x100000, 0x100000, mb_header(), 12)], 0x100000, data_at=0x2000),
                            "not a multiboot image"),
    "bad checksum": (make_elf([(0x100000, 0x100000, mb_header(checksum=1), 12)], 0x100000),
                     "bad multiboot header checksum at offset 0x1000"),
    "video mode": (make_elf([(0x100000, 0x100000, mb_header(0x7), 12)], 0x100000), "video mode (flag bit 2)"),
    "a.out kludge": (make_elf([(0x100000, 0x100000, mb_header(0x10003), 12)], 0x100000),
                     "a.out kludge"),
    "unknown required flag": (make_elf([(0x100000, 0x100000, mb_header(0x103), 12)], 0x100000),
                              "unsupported required flag bits 0x0100"),
    "not ELF": (bytes(0x1000) + mb_header() + bytes(64), "not an ELF file"),
    "wrong machine 32": (make_elf([(0x100000, 0x100000, mb_header(), 12)], 0x100000, machine=40),
                         "machine 40 is not i386"),
    "wrong machine 64": (make_elf([(0x100000, 0x100000, mb_header(), 12)], 0x100000, cls=64, machine=3),
                         "machine 3 is not x86-64"),
    "not executable": (make_elf([(0x100000, 0x100000, mb_header(), 12)], 0x100000, e_type=3),
                       "not an executable"),
    "below 0x1000": (seg_kernel(0x800), "starts below 0x1000"),
    "legacy hole": (seg_kernel(0xA0000), "overlaps [0x9fc00, 0x100000)"),
    "beyond RAM": (seg_kernel(0x100000, memsz=4 * MiB), "kernel too large for RAM: segment 0"),
    "entry outside": (seg_kernel(0x100000, entry=0x200000), "entry point 0x200000 is not inside a loaded segment"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_image_gives_one_clear_error(name):
    img, words = BAD[name]
    with pytest.raises(MultibootError) as e:
        load_multiboot(img, cmdline="k", ram_size=4 * MiB)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_class_other_than_32_or_64_is_refused():
    img = bytearray(make_elf([(0x100000, 0x100000, mb_header(), 12)], 0x100000))
    img[4] = 3
    with pytest.raises(MultibootError, match="ELF class 3"):
        load_multiboot(bytes(img), cmdline="k", ram_size=4 * MiB)


def test_truncated_segment_names_the_segment():
    img = make_elf([(0x100000, 0x100000, mb_header() + b"\xf4" * 100, 112),
                    (0x200000, 0x200000, b"x" * 200, 200)], 0x100000)
    with pytest.raises(MultibootError, match=r"truncated ELF: segment 1 \(PT_LOAD at paddr 0x200000\)"):
        load_multiboot(img[:-50], cmdline="k", ram_size=4 * MiB)


def test_truncated_program_headers():
    img = make_elf([(0x100000, 0x100000, mb_header(), 12)], 0x100000)
    # Claim 200 program headers: they run past the end of the file.
    img = img[:44] + struct.pack("<H", 200) + img[46:]
    with pytest.raises(MultibootError, match="truncated ELF: 200 program headers"):
        load_multiboot(img, cmdline="k", ram_size=4 * MiB)


def test_entry_above_4gib_is_refused():
    text = mb_header() + b"\xf4" * 20
    img = make_elf([(0xFFFFFFFF80100000, 0x100000, text, len(text))], 0xFFFFFFFF80100010, cls=64)
    with pytest.raises(MultibootError, match="not below 4 GiB"):
        load_multiboot(img, cmdline="k", ram_size=4 * MiB)


def test_overlapping_segments_are_refused():
    img = make_elf([(0x100000, 0x100000, mb_header(), 0x2000), (0x101000, 0x101000, b"x", 1)], 0x100000)
    with pytest.raises(MultibootError, match="segments 0 and 1 .* overlap"):
        load_multiboot(img, cmdline="k", ram_size=4 * MiB)


def test_module_that_does_not_fit_in_ram():
    with pytest.raises(MultibootError, match="kernel too large for RAM: kernel, module and boot information"):
        load_multiboot(kernel(), cmdline="k", ram_size=2 * MiB, module=bytes(MiB))


def test_ram_size_must_be_supported():
    with pytest.raises(MultibootError, match="RAM size"):
        load_multiboot(kernel(), cmdline="k", ram_size=MiB)
