"""Tests of the QEMU oracle itself (``shadowmmu.verify.qemu_oracle``).

Page tables are built by hand; expected outcomes come from the Intel SDM,
vol. 3A, chapter 4 (4.5-4.8: walks, 4.6: access rights, 4.7: the #PF error
code P=1 W=2 U=4 RSVD=8 I/D=0x10 PK=0x20, 4.8: accessed/dirty flags).  The
tests at the end marked "QEMU quirk" pin places where QEMU goes its own way,
so that a comparison against the oracle knows about them.
"""

from __future__ import annotations

import struct
import time

import pytest

from shadowmmu.verify.qemu_oracle import (
    ERROR_CODE_OFFSET,
    HARNESS_PHYS_BASE,
    RESERVED_VIRT,
    OracleOutcome,
    QemuMmu,
    derive_error_code_offset,
)

# entry bits
P, W, U, PWT, PCD, A, D, PS, G = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63

# control registers
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR0 = CR0_PG | CR0_WP | CR0_PE
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
EFER_LM = EFER_LME | EFER_LMA

# error code bits
EP, EW, EU, ERSVD, EID, EPK = 1, 2, 4, 8, 0x10, 0x20

PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(4096))
CODE_PAGE = b"\x90" * 4096  # nop everywhere: a fetch target that decodes


@pytest.fixture(scope="module")
def mmu64():
    return QemuMmu(long_mode=True)


@pytest.fixture(scope="module")
def mmu32():
    return QemuMmu(long_mode=False)


class Phys:
    """Physical memory of a test: pfn -> bytearray(4096)."""

    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def page(self, pfn: int) -> bytearray:
        return self.pages.setdefault(pfn, bytearray(4096))

    def put(self, pfn: int, index: int, value: int, width: int = 8) -> None:
        struct.pack_into("<Q" if width == 8 else "<I", self.page(pfn), index * width, value)

    def fill(self, pfn: int, content: bytes) -> None:
        self.page(pfn)[:] = content

    def frozen(self) -> dict[int, bytes]:
        return {pfn: bytes(b) for pfn, b in self.pages.items()}


def entry(memory: dict[int, bytes], pfn: int, index: int, width: int = 8) -> int:
    return struct.unpack_from("<Q" if width == 8 else "<I", memory[pfn], index * width)[0]


def changed_entries(before: dict[int, bytes], after: dict[int, bytes], width: int = 8):
    """{(pfn, index): (old, new)} for every entry that differs."""
    out = {}
    for pfn, old in before.items():
        new = after[pfn]
        for i in range(4096 // width):
            a = old[i * width:(i + 1) * width]
            b = new[i * width:(i + 1) * width]
            if a != b:
                out[(pfn, i)] = (int.from_bytes(a, "little"), int.from_bytes(b, "little"))
    return out


# ----------------------------------------------------------------------------
# long mode (4-level / 5-level)
# ----------------------------------------------------------------------------
VA4 = 0x0000_7F12_3456_7ABC
VA5 = 0x00F2_3456_789A_BCDE  # PML5 index 0xf2: only reachable with LA57
TOP = 0x100  # top-level table pfn; tables follow at 0x101..
DATA = 0x200


def long_tables(va: int, leaf: int, *, levels: int = 4, upper: int = P | W | U,
                data_pfn: int = DATA, leaf_level: int = 1, content: bytes = PATTERN):
    """Map va through `levels` levels.  leaf_level 1 = 4K PTE, 2 = 2M PDE,
    3 = 1G PDPTE; `leaf` holds the flags (and for large pages the PS bit and
    any extra bits) and gets the frame address of `data_pfn` or'ed in."""
    phys = Phys()
    shifts = [48, 39, 30, 21, 12][5 - levels:]
    path = []
    pfn = TOP
    for depth, shift in enumerate(shifts):
        level = levels - depth
        idx = (va >> shift) & 0x1FF
        path.append((pfn, idx))
        if level == leaf_level:
            phys.put(pfn, idx, (data_pfn << 12) | leaf)
            break
        phys.put(pfn, idx, ((pfn + 1) << 12) | upper)
        pfn += 1
    offset = va & ((1 << (12 + 9 * (leaf_level - 1))) - 1)
    data_page = data_pfn + (offset >> 12)
    phys.fill(data_page, content)
    return phys, path, data_page, offset & 0xFFF


def run64(mmu, phys, *, va=VA4, kind="read", size=1, value=None, cpl=0, ac=False,
          pkru=0, cr0=CR0, cr4=CR4_PAE, efer=EFER_LM | EFER_NXE, cr3=TOP << 12):
    if kind == "write" and value is None:
        value = bytes(range(0xA0, 0xA0 + size))
    return mmu.access(phys.frozen(), cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, cpl=cpl,
                      ac=ac, pkru=pkru, vaddr=va, kind=kind, size=size, value=value)


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_4level_read_returns_bytes_and_sets_accessed_on_every_level(mmu64, cpl, size):
    phys, path, data_page, off = long_tables(VA4, P | W | U)
    before = phys.frozen()
    out = run64(mmu64, phys, size=size, cpl=cpl)
    assert isinstance(out, OracleOutcome)
    assert out.fault is None and out.other is None
    assert out.data == PATTERN[off:off + size]
    # SDM 4.8: every entry used gains A; a read sets no D; nothing else moves
    assert changed_entries(before, out.memory) == {
        (pfn, idx): (entry(before, pfn, idx), entry(before, pfn, idx) | A) for pfn, idx in path
    }
    assert set(out.memory) == set(before)


@pytest.mark.parametrize("cpl", [0, 3])
def test_4level_write_sets_dirty_on_leaf_only(mmu64, cpl):
    phys, path, data_page, off = long_tables(VA4, P | W | U)
    before = phys.frozen()
    out = run64(mmu64, phys, kind="write", size=8, value=b"ABCDEFGH", cpl=cpl)
    assert out.fault is None and out.other is None and out.data is None
    assert out.memory[data_page][off:off + 8] == b"ABCDEFGH"
    changes = changed_entries({k: v for k, v in before.items() if k != data_page},
                              {k: v for k, v in out.memory.items() if k != data_page})
    leaf = path[-1]
    for pfn, idx in path:
        old = entry(before, pfn, idx)
        assert changes[(pfn, idx)] == (old, old | A | (D if (pfn, idx) == leaf else 0))
    assert len(changes) == len(path)


@pytest.mark.parametrize("kind,cpl,code", [
    ("read", 0, 0), ("write", 0, EW), ("read", 3, EU), ("write", 3, EW | EU),
    ("fetch", 0, EID), ("fetch", 3, EID | EU),
])
def test_not_present_pte(mmu64, kind, cpl, code):
    phys, path, data_page, off = long_tables(VA4, 0)  # PTE P=0
    before = phys.frozen()
    out = run64(mmu64, phys, kind=kind, cpl=cpl)
    assert out.fault == (VA4, code) and out.other is None and out.data is None
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(before, pfn, idx)  # leaf untouched
    assert out.memory[data_page] == before[data_page]


@pytest.mark.parametrize("level", [4, 3, 2])
def test_not_present_upper_level(mmu64, level):
    phys, path, _, _ = long_tables(VA4, P | W | U)
    pfn, idx = path[4 - level]
    phys.put(pfn, idx, 0)
    out = run64(mmu64, phys, cpl=3, kind="write")
    assert out.fault == (VA4, EW | EU)


@pytest.mark.parametrize("where", ["leaf", "upper"])
def test_user_access_to_supervisor_page(mmu64, where):
    if where == "leaf":
        phys, *_ = long_tables(VA4, P | W)
    else:  # U clear in the PDPTE only: rights are the AND over levels
        phys, path, *_ = long_tables(VA4, P | W | U)
        pfn, idx = path[1]
        phys.put(pfn, idx, ((pfn + 1) << 12) | P | W)
    assert run64(mmu64, phys, cpl=3).fault == (VA4, EP | EU)
    assert run64(mmu64, phys, cpl=3, kind="write").fault == (VA4, EP | EW | EU)
    assert run64(mmu64, phys, cpl=0).fault is None  # supervisor may read it


def test_write_protect(mmu64):
    phys, path, data_page, off = long_tables(VA4, P | U)  # read-only
    assert run64(mmu64, phys, kind="write", cpl=0).fault == (VA4, EP | EW)
    assert run64(mmu64, phys, kind="write", cpl=3).fault == (VA4, EP | EW | EU)
    # CR0.WP=0: supervisor writes ignore R/W, user writes still fault
    out = run64(mmu64, phys, kind="write", cpl=0, cr0=CR0 & ~CR0_WP, value=b"Z")
    assert out.fault is None and out.memory[data_page][off] == ord("Z")
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(phys.frozen(), pfn, idx) | A | D
    out = run64(mmu64, phys, kind="write", cpl=3, cr0=CR0 & ~CR0_WP)
    assert out.fault == (VA4, EP | EW | EU)


def test_read_only_upper_level_blocks_write(mmu64):
    phys, path, *_ = long_tables(VA4, P | W | U)
    pfn, idx = path[2]  # PDE read-only
    phys.put(pfn, idx, ((pfn + 1) << 12) | P | U)
    assert run64(mmu64, phys, kind="write", cpl=3).fault == (VA4, EP | EW | EU)
    assert run64(mmu64, phys, kind="read", cpl=3).fault is None


def test_fetch_success_sets_accessed_not_dirty(mmu64):
    phys, path, data_page, off = long_tables(VA4, P | W | U, content=CODE_PAGE)
    before = phys.frozen()
    for cpl in (0, 3):
        out = run64(mmu64, phys, kind="fetch", cpl=cpl)
        assert out.fault is None and out.other is None and out.data is None
        pfn, idx = path[-1]
        assert entry(out.memory, pfn, idx) == entry(before, pfn, idx) | A
        assert out.memory[data_page] == before[data_page]


def test_fetch_does_not_execute_the_target(mmu64):
    # mov [abs 0x7f1234567000], al would change the data page if it ran
    code = bytearray(CODE_PAGE)
    code[0xABC:0xABC + 10] = b"\xa2" + struct.pack("<Q", 0x7F12_3456_7000) + b"\x90"
    phys, path, data_page, off = long_tables(VA4, P | W | U, content=bytes(code))
    out = run64(mmu64, phys, kind="fetch", cpl=0)
    assert out.fault is None and out.other is None
    assert out.memory[data_page] == bytes(code)


@pytest.mark.parametrize("cpl", [0, 3])
def test_nx_fetch(mmu64, cpl):
    phys, *_ = long_tables(VA4, P | W | U | NX)
    u = EU if cpl == 3 else 0
    assert run64(mmu64, phys, kind="fetch", cpl=cpl).fault == (VA4, EP | EID | u)
    assert run64(mmu64, phys, kind="read", cpl=cpl).fault is None  # NX is fetch-only


def test_nx_in_upper_level_is_inherited(mmu64):
    phys, path, *_ = long_tables(VA4, P | W | U)
    pfn, idx = path[0]
    phys.put(pfn, idx, ((pfn + 1) << 12) | P | W | U | NX)
    assert run64(mmu64, phys, kind="fetch").fault == (VA4, EP | EID)


def test_nx_bit_is_reserved_without_efer_nxe(mmu64):
    phys, path, *_ = long_tables(VA4, P | W | U | NX)
    # no NXE and no SMEP: I/D is not reported (SDM 4.7)
    out = run64(mmu64, phys, kind="fetch", efer=EFER_LM)
    assert out.fault == (VA4, EP | ERSVD)
    assert run64(mmu64, phys, kind="read", efer=EFER_LM).fault == (VA4, EP | ERSVD)


@pytest.mark.parametrize("bit", [40, 45, 51])
def test_reserved_address_bit_in_pte(mmu64, bit):
    # bits MAXPHYADDR..51 are reserved; QEMU's MAXPHYADDR is 40
    phys, path, *_ = long_tables(VA4, P | W | U | (1 << bit))
    before = phys.frozen()
    out = run64(mmu64, phys, kind="read")
    assert out.fault == (VA4, EP | ERSVD)
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(before, pfn, idx)
    assert run64(mmu64, phys, kind="write", cpl=3).fault == (VA4, EP | ERSVD | EW | EU)


def test_ps_in_pml4e_is_reserved(mmu64):
    phys, path, *_ = long_tables(VA4, P | W | U)
    pfn, idx = path[0]
    phys.put(pfn, idx, ((pfn + 1) << 12) | P | W | U | PS)
    assert run64(mmu64, phys).fault == (VA4, EP | ERSVD)


def test_ignored_bits_are_ignored(mmu64):
    # bits 52-58 of every level and the protection-key bits with CR4.PKE=0
    phys, path, *_ = long_tables(VA4, P | W | U | (0x7F << 52) | (0xF << 59),
                                 upper=P | W | U | (0x7F << 52) | (0xF << 59))
    out = run64(mmu64, phys, size=4)
    assert out.fault is None and out.other is None


def test_smap(mmu64):
    phys, *_ = long_tables(VA4, P | W | U)
    cr4 = CR4_PAE | CR4_SMAP
    assert run64(mmu64, phys, cr4=cr4, cpl=0, ac=False).fault == (VA4, EP)
    assert run64(mmu64, phys, cr4=cr4, cpl=0, ac=False, kind="write").fault == (VA4, EP | EW)
    out = run64(mmu64, phys, cr4=cr4, cpl=0, ac=True)
    assert out.fault is None and out.data == PATTERN[0xABC:0xABD]
    assert run64(mmu64, phys, cr4=cr4, cpl=0, ac=True, kind="write").fault is None
    # user-mode accesses and supervisor pages are not affected
    assert run64(mmu64, phys, cr4=cr4, cpl=3, ac=False).fault is None
    phys_s, *_ = long_tables(VA4, P | W)
    assert run64(mmu64, phys_s, cr4=cr4, cpl=0, ac=False).fault is None
    # SMAP does not restrict fetches
    phys_c, *_ = long_tables(VA4, P | W | U, content=CODE_PAGE)
    assert run64(mmu64, phys_c, cr4=cr4, cpl=0, kind="fetch").fault is None


def test_smep(mmu64):
    phys, *_ = long_tables(VA4, P | W | U, content=CODE_PAGE)
    cr4 = CR4_PAE | CR4_SMEP
    assert run64(mmu64, phys, cr4=cr4, kind="fetch", cpl=0).fault == (VA4, EP | EID)
    # I/D is reported because of SMEP even without EFER.NXE
    assert run64(mmu64, phys, cr4=cr4, kind="fetch", cpl=0,
                 efer=EFER_LM).fault == (VA4, EP | EID)
    assert run64(mmu64, phys, cr4=cr4, kind="fetch", cpl=3).fault is None
    assert run64(mmu64, phys, cr4=cr4, kind="read", cpl=0).fault is None
    # SMEP with SMAP on, at both CPLs (the harness must survive both)
    both = cr4 | CR4_SMAP
    assert run64(mmu64, phys, cr4=both, kind="fetch", cpl=3).fault is None
    assert run64(mmu64, phys, cr4=both, kind="read", cpl=3).fault is None


def test_pku(mmu64):
    key1 = 1 << 59
    phys, *_ = long_tables(VA4, P | W | U | key1, content=CODE_PAGE)
    cr4 = CR4_PAE | CR4_PKE
    ad1, wd1 = 1 << 2, 1 << 3
    assert run64(mmu64, phys, cr4=cr4, pkru=ad1, cpl=3).fault == (VA4, EPK | EU | EP)
    assert run64(mmu64, phys, cr4=cr4, pkru=ad1, cpl=3, kind="write").fault == \
        (VA4, EPK | EW | EU | EP)
    # WD: reads allowed, writes fault
    assert run64(mmu64, phys, cr4=cr4, pkru=wd1, cpl=3).fault is None
    assert run64(mmu64, phys, cr4=cr4, pkru=wd1, cpl=3, kind="write").fault == \
        (VA4, EPK | EW | EU | EP)
    # protection keys never restrict instruction fetches
    assert run64(mmu64, phys, cr4=cr4, pkru=ad1 | wd1, cpl=3, kind="fetch").fault is None
    # supervisor data accesses to user pages are subject to PKRU too
    assert run64(mmu64, phys, cr4=cr4, pkru=ad1, cpl=0).fault == (VA4, EPK | EP)
    # ... and WD binds a supervisor write only when CR0.WP=1
    assert run64(mmu64, phys, cr4=cr4, pkru=wd1, cpl=0, kind="write").fault == \
        (VA4, EPK | EW | EP)
    assert run64(mmu64, phys, cr4=cr4, pkru=wd1, cpl=0, kind="write",
                 cr0=CR0 & ~CR0_WP).fault is None
    # other keys, CR4.PKE=0, and supervisor pages are unaffected
    assert run64(mmu64, phys, cr4=cr4, pkru=0b11 << 4, cpl=3, kind="write").fault is None
    assert run64(mmu64, phys, cr4=CR4_PAE, pkru=ad1, cpl=3).fault is None
    phys_s, *_ = long_tables(VA4, P | W | key1)
    assert run64(mmu64, phys_s, cr4=cr4, pkru=ad1, cpl=0).fault is None


def test_pku_key0_denied_does_not_break_the_harness(mmu64):
    # the harness's own user code page carries key 0
    phys, *_ = long_tables(VA4, P | W | U | (2 << 59))
    out = run64(mmu64, phys, cr4=CR4_PAE | CR4_PKE, pkru=0b11, cpl=3, size=2)
    assert out.fault is None and out.other is None and out.data == PATTERN[0xABC:0xABE]


def test_2m_page(mmu64):
    va = 0x0000_0012_3456_789A
    phys, path, data_page, off = long_tables(va, P | W | U | PS, leaf_level=2, data_pfn=0x400)
    before = phys.frozen()
    out = run64(mmu64, phys, va=va, size=4, cpl=3)
    assert out.fault is None and out.data == PATTERN[off:off + 4]
    assert data_page == 0x400 + ((va >> 12) & 0x1FF)
    out = run64(mmu64, phys, va=va, kind="write", size=2, value=b"xy")
    assert out.fault is None and out.memory[data_page][off:off + 2] == b"xy"
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(before, pfn, idx) | A | D


@pytest.mark.parametrize("bit", [13, 16, 20])
def test_2m_page_reserved_low_address_bits(mmu64, bit):
    phys, *_ = long_tables(VA4, P | W | U | PS | (1 << bit), leaf_level=2, data_pfn=0x400)
    assert run64(mmu64, phys).fault == (VA4, EP | ERSVD)


def test_2m_page_pat_bit_is_not_reserved(mmu64):
    phys, *_ = long_tables(VA4, P | W | U | PS | (1 << 12), leaf_level=2, data_pfn=0x400)
    assert run64(mmu64, phys).fault is None


def test_1g_page(mmu64):
    va = 0x0000_0040_0012_3456
    phys, path, data_page, off = long_tables(va, P | W | U | PS, leaf_level=3,
                                             data_pfn=0x40000)  # 1 GiB frame
    assert data_page == 0x40000 + 0x123
    out = run64(mmu64, phys, va=va, size=8, cpl=3)
    assert out.fault is None and out.data == PATTERN[off:off + 8]
    phys2, *_ = long_tables(va, P | W | U | PS | (1 << 29), leaf_level=3, data_pfn=0x40000)
    assert run64(mmu64, phys2, va=va).fault == (va, EP | ERSVD)


def test_5level(mmu64):
    phys, path, data_page, off = long_tables(VA5, P | W | U, levels=5)
    before = phys.frozen()
    out = run64(mmu64, phys, va=VA5, cr4=CR4_PAE | CR4_LA57, size=8, cpl=3)
    assert out.fault is None and out.data == PATTERN[off:off + 8]
    assert len(path) == 5
    for pfn, idx in path:
        assert entry(out.memory, pfn, idx) == entry(before, pfn, idx) | A
    # the 4-level reading of the same tables: the PML5 is taken for the PML4
    # and VA5 is not canonical with 48 bits
    assert run64(mmu64, phys, va=VA5).other == "#GP(0x0)"
    # not present at the PML5 level
    other = VA5 ^ (1 << 48)
    assert run64(mmu64, phys, va=other, cr4=CR4_PAE | CR4_LA57, cpl=3).fault == (other, EU)


def test_non_canonical_address_is_gp(mmu64):
    phys, *_ = long_tables(VA4, P | W | U)
    out = run64(mmu64, phys, va=0x0000_8000_0000_0000)
    assert out.fault is None and out.other == "#GP(0x0)"


def test_repeated_faults_do_not_turn_into_double_faults(mmu64):
    phys_np, *_ = long_tables(VA4, 0)
    phys_ok, *_ = long_tables(VA4, P | W | U)
    for i in range(20):
        assert run64(mmu64, phys_np, cpl=3).fault == (VA4, EU)
        assert run64(mmu64, phys_np, kind="write").fault == (VA4, EW)
        if i % 5 == 0:
            assert run64(mmu64, phys_ok, size=2).data == PATTERN[0xABC:0xABE]


def test_no_stale_translation_between_calls(mmu64):
    # same VA, different frame in the next call: the TLB must not remember
    phys1, *_ = long_tables(VA4, P | W | U, data_pfn=0x200, content=b"\x11" * 4096)
    phys2, *_ = long_tables(VA4, P | W | U, data_pfn=0x300, content=b"\x22" * 4096)
    assert run64(mmu64, phys1).data == b"\x11"
    assert run64(mmu64, phys2).data == b"\x22"
    phys3, *_ = long_tables(VA4, 0)
    assert run64(mmu64, phys3).fault == (VA4, 0)


def test_fetch_sees_this_calls_bytes(mmu64):
    # translated code must not outlive a call: a one-byte nop at the page end
    # fetches fine, then a REX prefix there needs the (absent) next page
    va = (VA4 & ~0xFFF) | 0xFFF
    phys, *_ = long_tables(va, P | W | U, content=CODE_PAGE)
    assert run64(mmu64, phys, va=va, kind="fetch").fault is None
    phys, *_ = long_tables(va, P | W | U, content=CODE_PAGE[:-1] + b"\x48")
    assert run64(mmu64, phys, va=va, kind="fetch").fault == ((va & ~0xFFF) + 0x1000, EID)


def test_global_entries_do_not_survive_calls(mmu64):
    phys1, *_ = long_tables(VA4, P | W | U | G, content=b"\x11" * 4096)
    phys2, *_ = long_tables(VA4, P | W | U | G, data_pfn=0x300, content=b"\x33" * 4096)
    assert run64(mmu64, phys1).data == b"\x11"
    assert run64(mmu64, phys2).data == b"\x33"


# ----------------------------------------------------------------------------
# harness contract
# ----------------------------------------------------------------------------
def test_reserved_slot_must_be_free(mmu64):
    phys, *_ = long_tables(VA4, P | W | U)
    phys.put(TOP, 511, (0x150 << 12) | P)
    with pytest.raises(ValueError):
        run64(mmu64, phys)


def test_reserved_slot_non_present_content_is_restored(mmu64):
    phys, *_ = long_tables(VA4, P | W | U)
    phys.put(TOP, 511, 0xDEAD_BEEF_0000_0000)  # not present, arbitrary bits
    before = phys.frozen()
    out = run64(mmu64, phys, kind="write", cpl=3)
    assert out.fault is None
    assert entry(out.memory, TOP, 511) == 0xDEAD_BEEF_0000_0000
    assert entry(before, TOP, 511) == entry(out.memory, TOP, 511)


def test_vaddr_in_reserved_range_is_refused(mmu64, mmu32):
    phys, *_ = long_tables(VA4, P | W | U)
    with pytest.raises(ValueError):
        run64(mmu64, phys, va=RESERVED_VIRT["4level"][0] + 0x1000)
    with pytest.raises(ValueError):
        mmu32.access({0x10: bytes(4096)}, cr0=CR0_PE, cr3=0, cr4=0, efer=0, cpl=0,
                     ac=False, pkru=0, vaddr=HARNESS_PHYS_BASE + 8, kind="read")


def test_harness_frames_are_refused(mmu64):
    phys, *_ = long_tables(VA4, P | W | U)
    pages = phys.frozen()
    pages[HARNESS_PHYS_BASE >> 12] = bytes(4096)
    with pytest.raises(ValueError):
        mmu64.access(pages, cr0=CR0, cr3=TOP << 12, cr4=CR4_PAE, efer=EFER_LM, cpl=0,
                     ac=False, pkru=0, vaddr=VA4, kind="read")


def test_wrong_engine_is_refused(mmu32):
    phys, *_ = long_tables(VA4, P | W | U)
    with pytest.raises(ValueError):
        run64(mmu32, phys, va=0x1000)


def test_pages_absent_from_a_call_are_gone(mmu64):
    # a frame mapped in one call is not silently present in the next
    phys, path, data_page, off = long_tables(VA4, P | W | U)
    assert run64(mmu64, phys).data is not None
    pages = phys.frozen()
    del pages[data_page]
    out = mmu64.access(pages, cr0=CR0, cr3=TOP << 12, cr4=CR4_PAE, efer=EFER_LM, cpl=0,
                       ac=False, pkru=0, vaddr=VA4, kind="read")
    assert out.data is None and out.other is not None and "UNMAPPED" in out.other
    assert set(out.memory) == set(pages)


# ----------------------------------------------------------------------------
# 32-bit engine: paging off, 32-bit paging, PAE
# ----------------------------------------------------------------------------
VA32 = 0x0080_5ABC  # PDE 2, PTE 5, offset 0xabc


def run32(mmu, pages, *, va=VA32, kind="read", size=1, value=None, cpl=0, ac=False,
          cr0=CR0, cr3=0x10 << 12, cr4=0, efer=0):
    if kind == "write" and value is None:
        value = bytes(range(0xA0, 0xA0 + size))
    if isinstance(pages, Phys):
        pages = pages.frozen()
    return mmu.access(pages, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, cpl=cpl, ac=ac,
                      pkru=0, vaddr=va, kind=kind, size=size, value=value)


def tables32(leaf: int, *, pde: int = P | W | U, content: bytes = PATTERN) -> Phys:
    phys = Phys()
    phys.put(0x10, 2, (0x11 << 12) | pde, 4)
    phys.put(0x11, 5, (0x20 << 12) | leaf, 4)
    phys.fill(0x20, content)
    return phys


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_paging_off(mmu32, cpl, size):
    pages = {0x123: PATTERN}
    out = run32(mmu32, pages, va=0x123FF0, size=size, cpl=cpl, cr0=CR0_PE, cr3=0)
    assert out.fault is None and out.other is None and out.data == PATTERN[0xFF0:0xFF0 + size]
    out = run32(mmu32, pages, va=0x123FF0, size=size, cpl=cpl, cr0=CR0_PE, cr3=0,
                kind="write", value=b"Q" * size)
    assert out.fault is None and out.memory[0x123][0xFF0:0xFF0 + size] == b"Q" * size
    out = run32(mmu32, {0x123: CODE_PAGE}, va=0x123FF0, cpl=cpl, cr0=CR0_PE, cr3=0,
                kind="fetch")
    assert out.fault is None and out.other is None


def test_paging_off_after_paging_on_uses_no_stale_translation(mmu32):
    # VA32 maps to frame 0x20 with paging on; with paging off it is physical
    phys = tables32(P | W | U, content=b"\x20" * 4096)
    phys.fill(VA32 >> 12, b"\x80" * 4096)
    for kind in ("read", "write", "read"):
        assert run32(mmu32, phys, cpl=3).data == b"\x20"
        out = run32(mmu32, phys, cpl=3, cr0=CR0_PE, kind=kind, value=b"\x81")
        assert out.fault is None and out.other is None
        if kind == "read":
            assert out.data == b"\x80"
        else:
            assert out.memory[VA32 >> 12][0xABC] == 0x81 and out.memory[0x20] == b"\x20" * 4096


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("size", [1, 4, 8])
def test_32bit_read_write(mmu32, cpl, size):
    phys = tables32(P | W | U)
    before = phys.frozen()
    out = run32(mmu32, phys, size=size, cpl=cpl)
    assert out.fault is None and out.data == PATTERN[0xABC:0xABC + size]
    assert entry(out.memory, 0x10, 2, 4) == entry(before, 0x10, 2, 4) | A
    assert entry(out.memory, 0x11, 5, 4) == entry(before, 0x11, 5, 4) | A
    out = run32(mmu32, phys, size=size, cpl=cpl, kind="write", value=b"w" * size)
    assert out.memory[0x20][0xABC:0xABC + size] == b"w" * size
    assert entry(out.memory, 0x11, 5, 4) == entry(before, 0x11, 5, 4) | A | D
    assert entry(out.memory, 0x10, 2, 4) == entry(before, 0x10, 2, 4) | A
    # the reserved PDE 1023 went back to its original (zero) value
    assert entry(out.memory, 0x10, 1023, 4) == 0


def test_32bit_faults(mmu32):
    assert run32(mmu32, tables32(0)).fault == (VA32, 0)
    assert run32(mmu32, tables32(P | W | U, pde=0), kind="write", cpl=3).fault == \
        (VA32, EW | EU)
    assert run32(mmu32, tables32(P | W), cpl=3).fault == (VA32, EP | EU)
    assert run32(mmu32, tables32(P | W | U, pde=P | W), cpl=3).fault == (VA32, EP | EU)
    assert run32(mmu32, tables32(P | U), kind="write").fault == (VA32, EP | EW)
    assert run32(mmu32, tables32(P | U), kind="write", cr0=CR0 & ~CR0_WP).fault is None
    # no NX in 32-bit paging, so a fetch fault has no I/D without SMEP
    assert run32(mmu32, tables32(0), kind="fetch", cpl=3).fault == (VA32, EU)
    code = tables32(P | W | U, content=CODE_PAGE)
    assert run32(mmu32, code, kind="fetch", cpl=0, cr4=CR4_SMEP).fault == (VA32, EP | EID)
    # SMAP in 32-bit paging, and a CPL3 run with SMAP/SMEP on
    assert run32(mmu32, code, cpl=0, cr4=CR4_SMAP).fault == (VA32, EP)
    assert run32(mmu32, code, cpl=0, cr4=CR4_SMAP, ac=True).fault is None
    assert run32(mmu32, code, cpl=3, cr4=CR4_SMAP | CR4_SMEP, kind="fetch").fault is None


def test_32bit_4m_page_with_pse(mmu32):
    phys = Phys()
    phys.put(0x10, 2, 0x0080_0000 | P | W | U | PS, 4)  # 4 MiB frame at 8 MiB
    phys.fill(0x805, PATTERN)
    before = phys.frozen()
    out = run32(mmu32, phys, cr4=CR4_PSE, size=4, cpl=3)
    assert out.fault is None and out.data == PATTERN[0xABC:0xAC0]
    out = run32(mmu32, phys, cr4=CR4_PSE, kind="write", size=2, value=b"4M")
    assert out.memory[0x805][0xABC:0xABE] == b"4M"
    assert entry(out.memory, 0x10, 2, 4) == entry(before, 0x10, 2, 4) | A | D
    # without CR4.PSE the PS bit is ignored: the PDE points to a page table
    # at 0x800000, which is (here) an all-zero page -> PTE not present
    phys.fill(0x800, bytes(4096))
    out = run32(mmu32, phys, cr4=0, cpl=3)
    assert out.fault == (VA32, EU)


def test_32bit_pse36_frame_above_4g(mmu32):
    # PDE bits 20:13 hold physical address bits 39:32
    phys = Phys()
    phys.put(0x10, 2, 0x0080_0000 | (0x3 << 13) | P | W | U | PS, 4)
    phys.fill(0x3_0080_5000 >> 12, PATTERN)
    out = run32(mmu32, phys, cr4=CR4_PSE, size=2)
    assert out.fault is None and out.data == PATTERN[0xABC:0xABE]
    # bit 21 is reserved (MAXPHYADDR 40 uses bits 20:13)
    phys.put(0x10, 2, 0x0080_0000 | (1 << 21) | P | W | U | PS, 4)
    assert run32(mmu32, phys, cr4=CR4_PSE).fault == (VA32, EP | ERSVD)


def pae_tables(leaf: int, *, pdpte: int = P, cr3: int = 0x10020,
               content: bytes = PATTERN, data=0x5_0000_0000) -> Phys:
    """PDPT at a 32-byte-aligned, not page-aligned CR3; frame above 4 GiB."""
    phys = Phys()
    base = cr3 & 0xFFF
    page = phys.page(cr3 >> 12)
    struct.pack_into("<Q", page, base, (0x12 << 12) | pdpte)  # PDPTE 0
    phys.put(0x12, 4, (0x13 << 12) | P | W | U)  # PDE 4
    phys.put(0x13, 5, data | leaf)  # PTE 5
    phys.fill(data >> 12, content)
    return phys


VA_PAE = 0x0080_5ABC  # PDPTE 0, PDE 4, PTE 5


@pytest.mark.parametrize("cpl", [0, 3])
def test_pae(mmu32, cpl):
    phys = pae_tables(P | W | U)
    before = phys.frozen()
    pae = dict(cr3=0x10020, cr4=CR4_PAE, efer=EFER_NXE, va=VA_PAE)
    out = run32(mmu32, phys, size=8, cpl=cpl, **pae)
    assert out.fault is None and out.data == PATTERN[0xABC:0xAC4]
    assert entry(out.memory, 0x12, 4) == entry(before, 0x12, 4) | A
    assert entry(out.memory, 0x13, 5) == entry(before, 0x13, 5) | A
    # PDPTEs have no A bit; the reserved PDPTE 3 is restored
    assert out.memory[0x10] == before[0x10]
    out = run32(mmu32, phys, size=8, cpl=cpl, kind="write", value=b"PAE-PAE!", **pae)
    assert out.memory[0x50_0000][0xABC:0xAC4] == b"PAE-PAE!"
    assert entry(out.memory, 0x13, 5) == entry(before, 0x13, 5) | A | D


def test_pae_faults(mmu32):
    pae = dict(cr3=0x10020, cr4=CR4_PAE, efer=EFER_NXE, va=VA_PAE)
    assert run32(mmu32, pae_tables(P | W | U, pdpte=0), cpl=3, **pae).fault == (VA_PAE, EU)
    assert run32(mmu32, pae_tables(P | W | U | NX, content=CODE_PAGE), kind="fetch",
                 **pae).fault == (VA_PAE, EP | EID)
    assert run32(mmu32, pae_tables(P | W | U, content=CODE_PAGE), kind="fetch",
                 **pae).fault is None
    # bit 63 is reserved without EFER.NXE; bits 62:52 are reserved in PAE PTEs
    no_nxe = dict(pae, efer=0)
    assert run32(mmu32, pae_tables(P | W | U | NX), **no_nxe).fault == (VA_PAE, EP | ERSVD)
    assert run32(mmu32, pae_tables(P | W | U | (1 << 52)), **pae).fault == (VA_PAE, EP | ERSVD)
    # PKU does not exist outside IA-32e paging
    assert run32(mmu32, pae_tables(P | W | U | (1 << 59)), **pae).fault == (VA_PAE, EP | ERSVD)


def test_pae_reserved_pdpte_must_be_free(mmu32):
    phys = pae_tables(P | W | U)
    struct.pack_into("<Q", phys.page(0x10), 0x20 + 3 * 8, (0x30 << 12) | P)
    with pytest.raises(ValueError):
        run32(mmu32, phys, cr3=0x10020, cr4=CR4_PAE, va=VA_PAE)


def test_engines_are_independent_and_reusable(mmu32, mmu64):
    for _ in range(5):
        assert run32(mmu32, tables32(P | W | U), size=2).data == PATTERN[0xABC:0xABE]
        assert run64(mmu64, long_tables(VA4, P | W | U)[0], size=2).data == \
            PATTERN[0xABC:0xABE]
        assert run32(mmu32, tables32(0), cpl=3).fault == (VA32, EU)


def test_error_code_offset_is_the_only_match():
    assert derive_error_code_offset() == [ERROR_CODE_OFFSET]


def test_throughput(mmu64):
    phys, *_ = long_tables(VA4, P | W | U)
    pages = phys.frozen()
    n = 200
    t = time.perf_counter()
    for i in range(n):
        mmu64.access(pages, cr0=CR0, cr3=TOP << 12, cr4=CR4_PAE, efer=EFER_LM, cpl=3,
                     ac=False, pkru=0, vaddr=VA4, kind="write" if i & 1 else "read",
                     size=1, value=b"x" if i & 1 else None)
    rate = n / (time.perf_counter() - t)
    assert rate > 200, f"{rate:.0f} accesses/s"


# ----------------------------------------------------------------------------
# QEMU quirks: behaviour observed in QEMU 5.0 (unicorn 2.1.4) that the SDM
# does not prescribe or that departs from it.  Pinned so that a model compared
# against the oracle knows where QEMU is not the reference.
# ----------------------------------------------------------------------------
def test_quirk_upper_levels_gain_accessed_on_a_faulting_walk(mmu64):
    phys, path, *_ = long_tables(VA4, 0)
    before = phys.frozen()
    out = run64(mmu64, phys)
    assert out.fault == (VA4, 0)
    for pfn, idx in path[:-1]:
        assert entry(out.memory, pfn, idx) == entry(before, pfn, idx) | A


def test_quirk_1g_leaf_gains_accessed_when_the_access_faults(mmu64):
    # SDM: a faulting access leaves the leaf unchanged.  QEMU sets A on a
    # PDPTE before it knows that the PDPTE is a (faulting) 1 GiB leaf.
    va = 0x0000_0040_0012_3456
    phys, path, *_ = long_tables(va, P | U | PS, leaf_level=3, data_pfn=0x40000)
    before = phys.frozen()
    out = run64(mmu64, phys, va=va, kind="write")
    assert out.fault == (va, EP | EW)
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(before, pfn, idx) | A


def test_quirk_2m_leaf_does_not(mmu64):
    phys, path, *_ = long_tables(VA4, P | U | PS, leaf_level=2, data_pfn=0x400)
    before = phys.frozen()
    out = run64(mmu64, phys, kind="write")
    assert out.fault == (VA4, EP | EW)
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(before, pfn, idx)
    assert out.memory[TOP] != before[TOP]  # (upper levels do gain A)


def test_quirk_pae_pdpte_reserved_bits(mmu32):
    # SDM: PDPTE bits 2:1 and 8:5 are reserved and a set one makes MOV CR3
    # raise #GP.  QEMU loads PDPTEs on every walk, ignores those bits, and
    # reports bits >= MAXPHYADDR (and bit 63) as a #PF with RSVD instead.
    pae = dict(cr3=0x10020, cr4=CR4_PAE, efer=EFER_NXE, va=VA_PAE)
    for bit in (1, 2, 5, 6, 7, 8):
        out = run32(mmu32, pae_tables(P | W | U, pdpte=P | (1 << bit)), **pae)
        assert out.fault is None and out.other is None
    for bit in (40, 63):
        out = run32(mmu32, pae_tables(P | W | U, pdpte=P | (1 << bit)), **pae)
        assert out.fault == (VA_PAE, EP | ERSVD)


def test_quirk_page_crossing_access_marks_first_page_before_second_faults(mmu64):
    # 8-byte write at the end of a present page, next page not present:
    # QEMU sets A and D on the first PTE, writes nothing, and faults on the
    # second page (cr2 = start of that page).
    va = (VA4 & ~0xFFF) | 0xFFC
    phys, path, data_page, _ = long_tables(va, P | W | U)
    before = phys.frozen()
    out = run64(mmu64, phys, va=va, kind="write", size=8, value=b"12345678")
    assert out.fault == ((va & ~0xFFF) + 0x1000, EW)
    pfn, idx = path[-1]
    assert entry(out.memory, pfn, idx) == entry(before, pfn, idx) | A | D
    assert out.memory[data_page] == before[data_page]


def test_quirk_fetch_decodes_across_the_page_end(mmu64):
    # the instruction at the last byte of a page (REX prefix 0x48) continues
    # on the next, not-present page: the fetch faults there with I/D.
    va = (VA4 & ~0xFFF) | 0xFFF
    content = CODE_PAGE[:-1] + b"\x48"
    phys, *_ = long_tables(va, P | W | U, content=content)
    assert run64(mmu64, phys, va=va, kind="fetch").fault == ((va & ~0xFFF) + 0x1000, EID)
    phys, *_ = long_tables(va, P | W | U, content=CODE_PAGE)  # one-byte nop: fine
    assert run64(mmu64, phys, va=va, kind="fetch").fault is None
