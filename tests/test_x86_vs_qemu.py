"""Our paging model against QEMU's MMU (``shadowmmu.verify.differential``).

Random cases (every paging mode, all three access kinds, both CPLs, CR0.WP,
EFER.NXE, CR4.PSE/SMEP/SMAP/PKE, RFLAGS.AC, PKRU, large pages, reserved bits,
self-maps, page-crossing accesses) are drawn by hypothesis and run on both
sides; any disagreement beyond QEMU's documented departures from the SDM fails
with a description of the case.  The named tests at the end pin each departure
and assert the SDM rule on our side.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowmmu.x86.bits import (
    CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE, PF_P, PF_RSVD, PF_U, PF_W,
)
from shadowmmu.verify.differential import (
    Case, Mismatch, Outcome, Verdict, case_for, cases, check_case, compare, describe_case, report,
    run_case, run_model, selfcheck,
)
from shadowmmu.x86.faults import GeneralProtection, PageFault

P, W, U, A, D, PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
NX = 1 << 63
PATTERN = bytes((i * 13 + 7) & 0xFF for i in range(4096))
PAGING_MODES = ("32-bit", "pae", "4-level", "5-level")


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------
# random cases (about 6000 in all)
# ----------------------------------------------------------------------------
@fuzz(100)
@given(cases(mode="none"))
def test_paging_off(case):
    check_case(case)


@pytest.mark.parametrize("mode", PAGING_MODES)
@fuzz(800)
@given(data=st.data())
def test_random_cases(mode, data):
    # everything drawn: kind, CPL, WP, NXE, PSE, SMEP, SMAP, PKE+PKRU, AC, the tree
    check_case(data.draw(cases(mode=mode)))


@pytest.mark.parametrize("mode", PAGING_MODES)
@fuzz(200)
@given(data=st.data())
def test_reserved_bits(mode, data):
    # one reserved bit in most walks (address bits >= 40, bit 63 without NXE,
    # PS in a PML4E/PML5E, 2M/1G/4M leaf bits, PAE bits 62:52, PAE PDPTEs)
    check_case(data.draw(cases(mode=mode, features={"lenient": True},
                               probabilities={"reserved": 0.3, "present": 0.98})))


@pytest.mark.parametrize("mode", PAGING_MODES)
@fuzz(150)
@given(data=st.data())
def test_large_pages(mode, data):
    check_case(data.draw(cases(mode=mode, features={"lenient": True, "pse": True},
                               probabilities={"large": 0.9, "present": 0.98})))


@pytest.mark.parametrize("mode", ("4-level", "5-level"))
@fuzz(250)
@given(data=st.data())
def test_protection_keys(mode, data):
    check_case(data.draw(cases(mode=mode, kind=None, features={"pke": True, "lenient": True},
                               probabilities={"present": 0.98, "reserved": 0.0})))


@pytest.mark.parametrize("mode", PAGING_MODES)
@fuzz(150)
@given(data=st.data())
def test_supervisor_rules(mode, data):
    # CPL0 with permissive upper levels: CR0.WP, SMEP, SMAP with RFLAGS.AC, NX decide
    check_case(data.draw(cases(mode=mode, cpl=0, features={"lenient": True},
                               probabilities={"present": 0.98, "reserved": 0.0})))


def test_seeded_campaign_reaches_every_rule():
    r = selfcheck(1500, seed=2024)
    assert r["mismatches"] == [], r["mismatches"][0]["report"]
    assert set(r["modes"]) == {"none", *PAGING_MODES}
    assert sum(m["cases"] for m in r["modes"].values()) == 1500
    for mode in PAGING_MODES:
        stats = r["modes"][mode]
        assert stats["ok"] > 50 and stats["page_faults"] > 50, (mode, stats)
    codes = {c for per_mode in r["error_codes"].values() for c in per_mode}
    for bit in (PF_P, PF_W, PF_U, PF_RSVD, 0x10, 0x20):
        assert any(c & bit for c in codes), f"no #PF with error-code bit {bit:#x}"
    assert any(r["error_codes"]["pae"].get(c) for c in (0x10, 0x11, 0x14, 0x15)), "no PAE I/D"
    assert not any(c & 0x20 for m in ("32-bit", "pae") for c in r["error_codes"][m])
    assert r["allowances"].keys() == {"1g-leaf-accessed", "pae-pdpte-reserved"}


def test_campaign_is_reproducible():
    a, b = case_for(5, 17), case_for(5, 17)
    assert describe_case(a) == describe_case(b) and a.pages == b.pages
    assert case_for(5, 18).pages != a.pages


def test_every_frame_a_walk_reaches_is_in_pages():
    # QEMU reads a frame missing from `pages` as zeros (and a missing data frame
    # is a unicorn error): the generator must put every reachable frame in.
    for i in range(600):
        case = case_for(31, i)
        ours = run_model(case)
        walks = ours.detail if isinstance(ours.detail, tuple) else (ours.detail,)
        for t in walks:
            if isinstance(t, PageFault) or hasattr(t, "paddr"):
                for level, addr, value, _ in t.entries:
                    assert addr >> 12 in case.pages, (i, describe_case(case))
            if hasattr(t, "paddr"):
                assert t.paddr >> 12 in case.pages, (i, describe_case(case))


# ----------------------------------------------------------------------------
# hand-built cases
# ----------------------------------------------------------------------------
TOP = 0x100            # 4-level: PML4 0x100, PDPT 0x101, PD 0x102, PT 0x103


def _put(pages, addr, value, width=8):
    page = pages.setdefault(addr >> 12, bytearray(4096))
    struct.pack_into("<Q" if width == 8 else "<I", page, addr & 0xFFF, value)


def _entry(memory, addr, width=8):
    return struct.unpack_from("<Q" if width == 8 else "<I", memory[addr >> 12], addr & 0xFFF)[0]


def long_case(va, leaf, *, leaf_level=1, data_pfn=0x200, upper=P | W | U, kind="read", size=1,
              cpl=0, value=None, extra=()):
    """A 4-level case mapping va through fresh tables; ``leaf`` holds the leaf's
    flags (PS for large pages) and gets data_pfn's address or'ed in; ``extra``
    is (address, value) entries written afterwards."""
    pages, path, pfn = {}, [], TOP
    for level in (4, 3, 2, 1):
        ea = (pfn << 12) + ((va >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        path.append((level, ea))
        if level == leaf_level:
            _put(pages, ea, (data_pfn << 12) | leaf)
            break
        _put(pages, ea, ((pfn + 1) << 12) | upper)
        pfn += 1
    frame = data_pfn + ((va & ((1 << (12 + 9 * (leaf_level - 1))) - 1)) >> 12)
    pages.setdefault(frame, bytearray(PATTERN))
    for addr, v in extra:
        _put(pages, addr, v)
    if kind == "write" and value is None:
        value = bytes(range(0xA0, 0xA0 + size))
    return Case(mode="4-level", cr0=CR0_PE | CR0_WP | CR0_PG, cr3=TOP << 12, cr4=CR4_PAE | CR4_PSE,
                efer=EFER_LME | EFER_LMA | EFER_NXE, cpl=cpl, ac=False, pkru=0, kind=kind, size=size,
                vaddr=va, value=value, pages={k: bytes(v) for k, v in pages.items()},
                walks=((va, tuple(path)),))


PDPT = 0x300020        # PAE: PDPT at 0x300020 (frame 0x300), PD 0x301, PT 0x302, data 0x303


def pae_case(pdpte_bits, *, va=0x4020_1234, other_pdpte=0, kind="read", cpl=0):
    pages = {}
    i = (va >> 30) & 3
    _put(pages, PDPT + 8 * i, 0x301000 | P | pdpte_bits)
    if other_pdpte:
        _put(pages, PDPT + 8 * ((i + 1) % 3), other_pdpte)
    _put(pages, 0x301000 + ((va >> 21) & 0x1FF) * 8, 0x302000 | P | W | U)
    _put(pages, 0x302000 + ((va >> 12) & 0x1FF) * 8, 0x303000 | P | W | U)
    pages[0x303] = bytearray(PATTERN)
    return Case(mode="pae", cr0=CR0_PE | CR0_WP | CR0_PG, cr3=PDPT, cr4=CR4_PAE, efer=EFER_NXE, cpl=cpl,
                ac=False, pkru=0, kind=kind, size=1, vaddr=va,
                value=b"\x5a" if kind == "write" else None,
                pages={k: bytes(v) for k, v in pages.items()})


VA = 0x0000_7F12_3456_7ABC
VA_1G = 0x0000_0040_0012_3456


# --- departure 1: A on upper levels of a walk that faults lower down ----------
def test_upper_levels_gain_accessed_on_a_faulting_walk():
    # The SDM leaves open whether entries passed before a fault gain A (4.8: A is
    # set when an entry is used for translation); QEMU sets it and so do we.
    case = long_case(VA, 0)                       # PTE not present
    ours, qemu = run_case(case)
    assert ours.fault == qemu.fault == (VA, 0)
    for level, addr in case.walks[0][1][:-1]:
        assert _entry(ours.memory, addr) == _entry(case.pages, addr) | A
    assert compare(case, ours, qemu) == Verdict([], [])


# --- departure 2: a faulting 1 GB leaf gains A in QEMU ---------------------------
@pytest.mark.parametrize("leaf, kind, cpl, code", [
    (P | W | PS, "read", 3, PF_P | PF_U),                     # supervisor page, user access
    (P | U | PS, "write", 0, PF_P | PF_W),                    # read-only page, CR0.WP=1
    (P | W | U | PS | (1 << 13), "read", 0, PF_P | PF_RSVD),  # reserved bit 13 (after QEMU sets A)
])
def test_1g_leaf_that_faults_is_unchanged_sdm_but_gains_accessed_in_qemu(leaf, kind, cpl, code):
    case = long_case(VA_1G, leaf, leaf_level=3, data_pfn=0x40000, kind=kind, cpl=cpl)
    leaf_addr = case.walks[0][1][-1][1]
    ours, qemu = run_case(case)
    assert ours.fault == qemu.fault == (VA_1G, code | (PF_U if cpl == 3 else 0))
    # SDM 4.8: an access that faults does not change the leaf
    assert _entry(ours.memory, leaf_addr) == _entry(case.pages, leaf_addr)
    # QEMU: A set in the PDPTE before it sees PS=1 (exactly that bit differs)
    assert _entry(qemu.memory, leaf_addr) == _entry(case.pages, leaf_addr) | A
    verdict = compare(case, ours, qemu)
    assert verdict.ok and verdict.allowances == ["1g-leaf-accessed"]


def test_1g_leaf_with_a_high_reserved_bit_stays_unchanged_in_qemu_too():
    # bits >= MAXPHYADDR are checked before QEMU sets A: no allowance needed
    case = long_case(VA_1G, P | W | U | PS | (1 << 45), leaf_level=3, data_pfn=0x40000)
    ours, qemu = run_case(case)
    assert ours.fault == qemu.fault == (VA_1G, PF_P | PF_RSVD)
    assert ours.memory == qemu.memory
    assert compare(case, ours, qemu).allowances == []


def test_the_1g_allowance_is_narrow():
    # a 2 MB leaf that faults stays unchanged in QEMU: A there would be a mismatch
    case = long_case(VA, P | U | PS, leaf_level=2, data_pfn=0x400, kind="write")
    ours, qemu = run_case(case)
    assert ours.fault == qemu.fault == (VA, PF_P | PF_W)
    assert compare(case, ours, qemu) == Verdict([], [])
    leaf_addr = case.walks[0][1][-1][1]
    problems = compare(case, ours, _with_bits(case, qemu, leaf_addr, A)).problems
    assert len(problems) == 1 and f"{leaf_addr:#x}" in problems[0] and "(bits differ: A)" in problems[0]
    # on a 1 GB leaf, A is allowed, A|D is not
    case = long_case(VA_1G, P | U | PS, leaf_level=3, data_pfn=0x40000, kind="write")
    ours, qemu = run_case(case)
    leaf_addr = case.walks[0][1][-1][1]
    assert compare(case, ours, qemu).ok
    bad = _with_bits(case, qemu, leaf_addr, D)
    problems = compare(case, ours, bad).problems
    assert len(problems) == 1 and f"{leaf_addr:#x}" in problems[0] and "(bits differ: A, D)" in problems[0]


def _with_bits(case, outcome, addr, bits):
    memory = dict(outcome.memory)
    page = bytearray(memory[addr >> 12])
    struct.pack_into("<Q", page, addr & 0xFFF, _entry(memory, addr) | bits)
    memory[addr >> 12] = bytes(page)
    return Outcome(fault=outcome.fault, data=outcome.data, memory=memory, other=outcome.other)


# --- departure 3: PAE PDPTE reserved bits --------------------------------------
@pytest.mark.parametrize("bit", [1, 2, 5, 6, 7, 8])
def test_pae_pdpte_low_reserved_bit_is_gp_at_cr3_load_ignored_by_qemu(bit):
    case = pae_case(1 << bit)
    ours, qemu = run_case(case)
    # SDM 4.4.1 / table 4-8: MOV CR3 #GPs on a present PDPTE with a reserved bit
    assert isinstance(ours.detail, GeneralProtection) and "PDPTE1" in str(ours.detail)
    assert ours.memory == case.pages
    # QEMU reads the PDPTE at the walk and ignores bits 2:1 and 8:5
    assert qemu.fault is None and qemu.other is None and qemu.data == PATTERN[0x234:0x235]
    verdict = compare(case, ours, qemu)
    assert verdict.ok and verdict.allowances == ["pae-pdpte-reserved"]


@pytest.mark.parametrize("bit", [40, 51, 52, 62, 63])
def test_pae_pdpte_high_reserved_bit_is_gp_at_cr3_load_rsvd_pf_in_qemu(bit):
    case = pae_case(1 << bit, kind="write", cpl=3)
    ours, qemu = run_case(case)
    assert isinstance(ours.detail, GeneralProtection)
    assert qemu.fault == (case.vaddr, PF_P | PF_RSVD | PF_W | PF_U)
    assert qemu.memory == case.pages
    verdict = compare(case, ours, qemu)
    assert verdict.ok and verdict.allowances == ["pae-pdpte-reserved"]


def test_pae_unused_pdpte_with_reserved_bit_is_still_gp():
    # the SDM loads all four PDPTEs; QEMU never looks at the unused one
    case = pae_case(0, other_pdpte=0x305000 | P | (1 << 5))
    ours, qemu = run_case(case)
    assert isinstance(ours.detail, GeneralProtection) and "PDPTE2" in str(ours.detail)
    assert qemu.fault is None and qemu.data == PATTERN[0x234:0x235]
    assert compare(case, ours, qemu).allowances == ["pae-pdpte-reserved"]


def test_pae_pdpte_without_reserved_bits_must_not_gp():
    ours, qemu = run_case(pae_case(0x18 | 0xE00))    # PWT, PCD, bits 11:9: all allowed
    assert ours.fault is None and ours.data == qemu.data == PATTERN[0x234:0x235]


# --- departure 4: page-crossing accesses ----------------------------------------
def test_page_crossing_write_marks_first_page_then_faults_on_second():
    va = (VA & ~0xFFF) | 0xFFC
    case = long_case(va, P | W | U, kind="write", size=8)
    first_leaf = case.walks[0][1][-1][1]
    ours, qemu = run_case(case)
    # CR2 is the first byte of the page that faulted; a faulting write writes nothing
    assert ours.fault == qemu.fault == ((va & ~0xFFF) + 0x1000, PF_W)
    assert ours.memory[0x200] == case.pages[0x200]
    # the model translates page by page, in address order, as QEMU does: the
    # first page's leaf gains A and D before the second page faults
    assert _entry(ours.memory, first_leaf) == _entry(case.pages, first_leaf) | A | D
    assert compare(case, ours, qemu) == Verdict([], [])


def test_page_crossing_read_joins_two_frames():
    va = (VA & ~0xFFF) | 0xFFE
    second_pte = TOP + 3 << 12 | (((va >> 12) + 1) & 0x1FF) * 8
    case = long_case(va, P | W | U, kind="read", size=4, extra=[(second_pte, 0x7000 | P | U)])
    case.pages[0x7] = bytes(reversed(PATTERN))
    ours, qemu = run_case(case)
    assert ours.data == qemu.data == PATTERN[0xFFE:] + bytes(reversed(PATTERN))[:2]
    assert compare(case, ours, qemu).ok


# --- departure 5: frames missing from `pages` read as zeros ---------------------
def test_missing_table_frame_reads_as_not_present_on_both_sides():
    # The PDE points to frame 0x999, which is in no page: QEMU reads zeros;
    # our memory reads an untouched frame as zeros too.  (A missing *data*
    # frame would be a unicorn error: the generator never leaves one out, see
    # test_every_frame_a_walk_reaches_is_in_pages.)
    case = long_case(VA, P | W | U)
    pde = case.walks[0][1][2][1]
    pages = dict(case.pages)
    page = bytearray(pages[pde >> 12])
    struct.pack_into("<Q", page, pde & 0xFFF, 0x999000 | P | W | U)
    pages[pde >> 12] = bytes(page)
    case.pages = pages
    ours, qemu = run_case(case)
    assert ours.fault == qemu.fault == (VA, 0)


# --- the comparator -----------------------------------------------------------------
def test_a_mismatch_is_described_readably():
    case = long_case(VA, P | W | U, kind="write", size=2, cpl=3)
    ours, qemu = run_case(case)
    leaf_addr = case.walks[0][1][-1][1]
    bad = _with_bits(case, qemu, leaf_addr, 1 << 9)
    verdict = compare(case, ours, bad)
    assert verdict.problems == [f"memory at {leaf_addr:#x}: was {_entry(case.pages, leaf_addr):#x}, "
                                f"ours {_entry(ours.memory, leaf_addr):#x}, QEMU "
                                f"{_entry(bad.memory, leaf_addr):#x} (bits differ: 9)"]
    text = report(case, ours, bad, verdict)
    for part in ("mode 4-level", "CR0=0x80010001 [PE|WP|PG]", "CPL=3", "access: write 2 bytes at",
                 "PML4E", "PDPTE", "PDE", "PTE", "ours: no fault", "QEMU: no fault"):
        assert part in text, (part, text)
    wrong_fault = Outcome(fault=(VA, 7), memory=qemu.memory)
    with pytest.raises(Mismatch):
        raise Mismatch(case, ours, wrong_fault, compare(case, ours, wrong_fault))
