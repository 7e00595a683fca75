"""Multiboot v1 loading of an ELF kernel, as QEMU's ``-kernel`` does it.

Follows the Multiboot Specification version 0.6.96 (GNU GRUB,
https://www.gnu.org/software/grub/manual/multiboot/multiboot.html):
section 3.1 (the OS image header: magic 0x1BADB002, flags, checksum, 4-byte
aligned in the first 8192 bytes), section 3.2 (machine state: EAX = 0x2BADB002,
EBX = the info block, 32-bit flat protected mode, paging off) and section 3.3
(the boot information format, whose field offsets are the ``MBI_*`` constants
below).  The header's a.out address fields (flag bit 16) and video mode (bit 2)
are not supported: the kernel is an ELF file and its PT_LOAD program headers
say what goes where (loaded at ``p_paddr``), as QEMU does for ELF kernels.

What the loader builds (``BootImage``), all in guest-physical addresses:

- ``segments``: one ``Segment(paddr, data, memsz)`` per PT_LOAD with a non-zero
  memsz.  ``data`` is the file part only; the bss ``[paddr + len(data), paddr +
  memsz)`` is NOT included: the caller zero-fills it (fresh guest RAM already
  reads as zero, but a caller that reuses memory must clear it).
- ``writes``: ``(paddr, bytes)`` for everything else the loader puts in RAM: the
  module (if any) and the boot-information page (info block, module list,
  memory map, strings).  They sit after the kernel, page aligned, as QEMU puts
  them after the kernel image:

      kernel_end = page_align(highest paddr + memsz of any segment)
      module     at kernel_end                (page aligned: header flag bit 0)
      info page  at page_align(module end)    (= kernel_end without a module)
          +0x000  info block (116 bytes: the 0.6.96 struct, framebuffer fields zero)
          +0x078  module list (16 bytes per module)
          +0x078 + 16*mods   memory map (4 entries of 24 bytes)
          then    command line, module string, boot loader name (NUL-terminated)

- ``entry`` (EIP), ``info_addr`` (EBX), ``end`` (first free byte after all of it)
  and ``code_ranges``: ``(vaddr, paddr, size)`` of every segment's file part
  (code and data alike: start-up code can live in a data section, and the runner
  scans them for sensitive instructions; the zero-filled bss holds no code).

The machine: ``ram_size`` bytes of RAM at physical 0, one region below 4 GiB.
The memory map tells the kernel [0, 0x9fc00) and [1 MiB, ram_size) are usable and
[0x9fc00, 0xa0000) (EBDA), [0xf0000, 0x100000) (BIOS) are reserved, as a PC
BIOS's E820 table does; mem_lower = 639 KiB agrees with it.  A PT_LOAD must lie
in [0x1000, ram_size) and outside [0x9fc00, 0x100000) (memory the map does not
give the kernel).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

HEADER_MAGIC = 0x1BADB002          # in the OS image (spec 3.1.1)
BOOTLOADER_MAGIC = 0x2BADB002      # in EAX at entry (spec 3.2)
HEADER_SEARCH = 8192               # the header lies in the first 8192 bytes, 4-byte aligned

# Header flags (spec 3.1.2).  Bits 0-15 are "required": a loader that does not
# understand one must refuse the image.  Bits 16-31 are optional.
HDR_PAGE_ALIGN = 1 << 0            # modules page aligned (we always do)
HDR_MEMORY_INFO = 1 << 1           # mem_* fields wanted (we always give them)
HDR_VIDEO_MODE = 1 << 2            # not supported
HDR_AOUT_KLUDGE = 1 << 16          # header address fields: not supported (ELF only)
_HDR_UNDERSTOOD = HDR_PAGE_ALIGN | HDR_MEMORY_INFO

# Info block flags (spec 3.3).
MBI_FLAG_MEM = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOT_LOADER_NAME = 1 << 9

# Info block field offsets (spec 3.3, "Boot information format").
MBI_FLAGS = 0
MBI_MEM_LOWER = 4
MBI_MEM_UPPER = 8
MBI_BOOT_DEVICE = 12
MBI_CMDLINE = 16
MBI_MODS_COUNT = 20
MBI_MODS_ADDR = 24
MBI_SYMS = 28                      # 4 words: a.out or ELF symbols (not given)
MBI_MMAP_LENGTH = 44
MBI_MMAP_ADDR = 48
MBI_DRIVES_LENGTH = 52
MBI_DRIVES_ADDR = 56
MBI_CONFIG_TABLE = 60
MBI_BOOT_LOADER_NAME = 64
MBI_APM_TABLE = 68
MBI_VBE_CONTROL_INFO = 72          # VBE fields 72-87, framebuffer fields 88-115: zero
MBI_SIZE = 116

MOD_ENTRY_SIZE = 16                # mod_start, mod_end, string, reserved
MMAP_ENTRY_SIZE = 24               # size (=20, counts the rest), base_addr u64, length u64, type
MMAP_AVAILABLE = 1
MMAP_RESERVED = 2

BOOT_LOADER_NAME = "shadowmmu"
MEM_LOWER_KIB = 639                # conventional memory below the EBDA at 0x9fc00
EBDA = 0x9FC00
BIOS_AREA = 0xF0000
ONE_MIB = 0x100000
MIN_RAM = 2 * ONE_MIB
MAX_RAM = 0xE0000000               # one RAM region below the 32-bit PCI/APIC hole (QEMU's pc splits there)
LOWEST_LOAD = 0x1000               # page 0 (real-mode IVT) is never loaded over

_INFO_MODS_OFFSET = 0x78           # first 8-byte boundary after the 116-byte block

EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
ET_EXEC = 2


class MultibootError(Exception):
    """The kernel image cannot be booted; the message is one line naming why."""


class Segment(NamedTuple):
    paddr: int
    data: bytes       # the file part; [paddr + len(data), paddr + memsz) is bss, zero-filled by the caller
    memsz: int


@dataclass(frozen=True)
class BootImage:
    segments: list[Segment]
    entry: int                              # EIP at entry (physical, < 4 GiB)
    info_addr: int                          # EBX at entry
    writes: list[tuple[int, bytes]]         # module and boot-information bytes to put in RAM
    code_ranges: list[tuple[int, int, int]]  # (vaddr, paddr, size) of each segment's file part
    cmdline: str
    elf_class: int                          # 32 or 64
    kernel_end: int                         # page-aligned end of the highest segment
    end: int                                # first byte after everything the loader placed
    eax: int = BOOTLOADER_MAGIC


def _page_align(x: int) -> int:
    return (x + 0xFFF) & ~0xFFF


def find_header(image: bytes) -> tuple[int, int]:
    """(offset, flags) of the multiboot header: the first 4-byte aligned magic in the
    first 8192 bytes whose magic + flags + checksum is 0 mod 2**32 (spec 3.1.1)."""
    bad = None
    limit = min(HEADER_SEARCH, len(image)) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
        if bad is None:
            bad = (off, checksum, (-(magic + flags)) & 0xFFFFFFFF)
    if bad is not None:
        off, got, want = bad
        raise MultibootError(f"bad multiboot header checksum at offset {off:#x}: {got:#010x}, expected {want:#010x}")
    raise MultibootError("not a multiboot image: no multiboot header (magic 0x1BADB002) in the first 8192 bytes")


def _check_header_flags(flags: int, off: int) -> None:
    if flags & HDR_AOUT_KLUDGE:
        raise MultibootError(f"multiboot header at {off:#x} sets flag bit 16 (a.out kludge, load addresses in the "
                             "header): not supported, the loader reads the ELF program headers")
    if flags & HDR_VIDEO_MODE:
        raise MultibootError(f"multiboot header at {off:#x} requests a video mode (flag bit 2): not supported")
    unknown = flags & 0xFFFF & ~_HDR_UNDERSTOOD
    if unknown:
        raise MultibootError(f"multiboot header at {off:#x} sets unsupported required flag bits {unknown:#06x}")


class _Phdr(NamedTuple):
    index: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


def _parse_elf(image: bytes) -> tuple[int, int, list[_Phdr]]:
    """(class 32/64, e_entry, PT_LOAD headers with memsz > 0) of an i386 or x86-64 ELF executable."""
    if len(image) < 16 or image[:4] != b"\x7fELF":
        raise MultibootError("not an ELF file (the loader boots ELF kernels only)")
    ei_class, ei_data = image[4], image[5]
    if ei_class not in (1, 2):
        raise MultibootError(f"ELF class {ei_class} is neither ELF32 nor ELF64")
    if ei_data != 1:
        raise MultibootError("ELF file is not little-endian: not an i386 or x86-64 kernel")
    is64 = ei_class == 2
    ehdr_fmt = "<16sHHIQQQIHHHHHH" if is64 else "<16sHHIIIIIHHHHHH"
    if len(image) < struct.calcsize(ehdr_fmt):
        raise MultibootError("truncated ELF: the ELF header goes beyond the end of the file")
    (_, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, _, _, _) = \
        struct.unpack_from(ehdr_fmt, image, 0)
    want = EM_X86_64 if is64 else EM_386
    if e_machine != want:
        raise MultibootError(f"ELF{64 if is64 else 32} machine {e_machine} is not "
                             f"{'x86-64 (62)' if is64 else 'i386 (3)'}")
    if e_type != ET_EXEC:
        raise MultibootError(f"ELF type {e_type} is not an executable (ET_EXEC)")
    phdr_fmt = "<IIQQQQQQ" if is64 else "<IIIIIIII"
    phsize = struct.calcsize(phdr_fmt)
    if e_phnum == 0:
        raise MultibootError("ELF file has no program headers")
    if e_phentsize < phsize:
        raise MultibootError(f"ELF program header size {e_phentsize} is smaller than {phsize}")
    if e_phoff + e_phnum * e_phentsize > len(image):
        raise MultibootError(f"truncated ELF: {e_phnum} program headers at offset {e_phoff:#x} go beyond "
                             f"the end of the file ({len(image)} bytes)")
    loads = []
    for i in range(e_phnum):
        fields = struct.unpack_from(phdr_fmt, image, e_phoff + i * e_phentsize)
        if is64:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = fields
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _, _ = fields
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise MultibootError(f"ELF segment {i} (PT_LOAD at paddr {p_paddr:#x}): file size {p_filesz:#x} "
                                 f"is larger than its memory size {p_memsz:#x}")
        if p_offset + p_filesz > len(image):
            raise MultibootError(f"truncated ELF: segment {i} (PT_LOAD at paddr {p_paddr:#x}) needs file bytes "
                                 f"[{p_offset:#x}, {p_offset + p_filesz:#x}), the file has {len(image):#x}")
        loads.append(_Phdr(i, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
    if not loads:
        raise MultibootError("ELF file has no PT_LOAD segment to load")
    return (64 if is64 else 32), e_entry, loads


def _check_placement(loads: list[_Phdr], ram_size: int) -> None:
    for p in loads:
        lo, hi = p.paddr, p.paddr + p.memsz
        what = f"segment {p.index} (PT_LOAD) at [{lo:#x}, {hi:#x})"
        if hi > ram_size:
            raise MultibootError(f"kernel too large for RAM: {what} ends beyond the {ram_size >> 20} MiB of RAM")
        if lo < LOWEST_LOAD:
            raise MultibootError(f"{what} starts below {LOWEST_LOAD:#x}")
        if lo < ONE_MIB and hi > EBDA:
            raise MultibootError(f"{what} overlaps [{EBDA:#x}, {ONE_MIB:#x}), which the memory map reports "
                                 "as reserved or absent (EBDA, VGA, BIOS)")
    ordered = sorted(loads, key=lambda p: p.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise MultibootError(f"segments {a.index} and {b.index} (PT_LOAD) overlap in physical memory "
                                 f"at {b.paddr:#x}")


def _entry_paddr(e_entry: int, loads: list[_Phdr]) -> int:
    """The physical entry point.  As GRUB does, an e_entry inside a segment's virtual
    range is translated to that segment's physical range; otherwise e_entry must
    itself lie in a segment's physical range (kernels linked higher-half that give
    a physical e_entry).  Either way it must be below 4 GiB: the CPU enters in
    32-bit protected mode."""
    for p in loads:
        if p.vaddr <= e_entry < p.vaddr + p.memsz:
            entry = e_entry - p.vaddr + p.paddr
            break
    else:
        for p in loads:
            if p.paddr <= e_entry < p.paddr + p.memsz:
                entry = e_entry
                break
        else:
            raise MultibootError(f"entry point {e_entry:#x} is not inside a loaded segment")
    if e_entry >= 1 << 32 or entry >= 1 << 32:
        raise MultibootError(f"entry point {e_entry:#x} is not below 4 GiB (multiboot enters 32-bit code)")
    return entry


def _cstring(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if b"\0" in data:
        raise MultibootError(f"{what} contains a NUL character")
    return data + b"\0"


def memory_map(ram_size: int) -> list[tuple[int, int, int]]:
    """(base, length, type) of the memory map given to the kernel (a PC BIOS's E820 shape)."""
    return [(0, EBDA, MMAP_AVAILABLE),
            (EBDA, 0xA0000 - EBDA, MMAP_RESERVED),
            (BIOS_AREA, ONE_MIB - BIOS_AREA, MMAP_RESERVED),
            (ONE_MIB, ram_size - ONE_MIB, MMAP_AVAILABLE)]


def load_multiboot(image: bytes, *, cmdline: str, ram_size: int, module: bytes | None = None,
                   module_cmdline: str = "") -> BootImage:
    """Check a multiboot ELF kernel and lay it out in ``ram_size`` bytes of RAM (see the
    module docstring).  Raises MultibootError with one line naming what is wrong."""
    if ram_size % 4096 or not MIN_RAM <= ram_size <= MAX_RAM:
        raise MultibootError(f"RAM size {ram_size:#x} is not supported: a multiple of 4 KiB from "
                             f"{MIN_RAM >> 20} MiB to {MAX_RAM >> 20} MiB")
    image = bytes(image)
    hdr_off, hdr_flags = find_header(image)
    _check_header_flags(hdr_flags, hdr_off)
    elf_class, e_entry, loads = _parse_elf(image)
    _check_placement(loads, ram_size)
    entry = _entry_paddr(e_entry, loads)

    segments = [Segment(p.paddr, image[p.offset:p.offset + p.filesz], p.memsz) for p in loads]
    code_ranges = [(p.vaddr, p.paddr, p.filesz) for p in loads if p.filesz]
    kernel_end = _page_align(max(p.paddr + p.memsz for p in loads))

    writes: list[tuple[int, bytes]] = []
    mods = []                                     # (mod_start, mod_end)
    cursor = kernel_end
    if module is not None:
        module = bytes(module)
        mods.append((cursor, cursor + len(module)))
        if module:
            writes.append((cursor, module))
        cursor = _page_align(cursor + len(module))

    info = cursor
    mods_addr = info + _INFO_MODS_OFFSET
    mmap_addr = mods_addr + MOD_ENTRY_SIZE * len(mods)
    mmap = memory_map(ram_size)
    cmdline_addr = mmap_addr + MMAP_ENTRY_SIZE * len(mmap)
    cmd = _cstring(cmdline, "command line")
    modstr_addr = cmdline_addr + len(cmd)
    modstr = _cstring(module_cmdline, "module command line") if mods else b""
    name_addr = modstr_addr + len(modstr)
    name = _cstring(BOOT_LOADER_NAME, "boot loader name")
    end = name_addr + len(name)
    if end > ram_size:
        raise MultibootError(f"kernel too large for RAM: kernel, module and boot information need RAM up to "
                             f"{end:#x}, the machine has {ram_size >> 20} MiB")

    block = bytearray(MBI_SIZE)
    flags = MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP | MBI_FLAG_BOOT_LOADER_NAME
    struct.pack_into("<I", block, MBI_FLAGS, flags)
    struct.pack_into("<II", block, MBI_MEM_LOWER, MEM_LOWER_KIB, (ram_size - ONE_MIB) // 1024)
    struct.pack_into("<I", block, MBI_CMDLINE, cmdline_addr)
    struct.pack_into("<II", block, MBI_MODS_COUNT, len(mods), mods_addr if mods else 0)
    struct.pack_into("<II", block, MBI_MMAP_LENGTH, MMAP_ENTRY_SIZE * len(mmap), mmap_addr)
    struct.pack_into("<I", block, MBI_BOOT_LOADER_NAME, name_addr)
    writes.append((info, bytes(block)))
    if mods:
        writes.append((mods_addr, b"".join(struct.pack("<IIII", s, e, modstr_addr, 0) for s, e in mods)))
    # mmap_addr points at an entry's size field; size (20) counts the bytes after it (spec 3.3).
    writes.append((mmap_addr, b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, base, length, kind)
                                       for base, length, kind in mmap)))
    writes.append((cmdline_addr, cmd))
    if modstr:
        writes.append((modstr_addr, modstr))
    writes.append((name_addr, name))
    return BootImage(segments=segments, entry=entry, info_addr=info, writes=writes, code_ranges=code_ranges,
                     cmdline=cmdline, elf_class=elf_class, kernel_end=kernel_end, end=end)
