"""The real vCPU: unicorn executes real x86 kernels, the shadow MMU handles the exits.

Kernels: tests/kernels/*.S (tiny ones, each for one path) and kernels/ (the mm
kernel, built with the system gcc by the project's Makefile).  Every shadow run
here audits the MMU at every exit (conftest: test_vcpu*)."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
from pathlib import Path

from collections import Counter

import pytest

from shadowmmu.analysis.real_fault_meter import RealFaultMeter
from shadowmmu.cli import main
from shadowmmu.vm.machine import Machine
from shadowmmu.vm.qemu_state import _probe_layout

ROOT = Path(__file__).resolve().parent.parent
MODES = ("native", "zap", "update")


def _shared_build_dir(tmp_path_factory, name: str, sources: Path) -> tuple[Path, object]:
    """A build folder shared by the xdist workers, named after the sources' contents (so no
    other checkout or older source can leave its objects there), and its lock."""
    digest = hashlib.sha1()
    for f in sorted(sources.rglob("*")):
        if f.is_file() and "build" not in f.relative_to(sources).parts:
            digest.update(str(f.relative_to(sources)).encode() + f.read_bytes())
    base = tmp_path_factory.getbasetemp().parent / f"{name}-{digest.hexdigest()[:16]}"
    base.mkdir(exist_ok=True)
    lock = open(base / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return base, lock


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> Path:
    """kernels/ built by its Makefile (every format, PAE also with 8-byte pte stores, and 5-level)."""
    out, lock = _shared_build_dir(tmp_path_factory, "kernels-build", ROOT / "kernels")
    try:
        subprocess.run(["make", "-s", "-C", str(ROOT / "kernels"), f"B={out}", "PTE64=1", "LA57=1", "-j2"], check=True,
                       capture_output=True)
    finally:
        lock.close()
    return out


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> dict:
    """tests/kernels/*.S assembled and linked at 1 MiB, one image per entry symbol."""
    out, lock = _shared_build_dir(tmp_path_factory, "small-kernels", ROOT / "tests" / "kernels")
    images = {}
    try:
        for src, entries in (("hello.S", {"_start": "_start"}), ("crcheck.S", {"crcheck": "_start"}),
                             ("bad.S", {e: e for e in ("triple", "hang", "halt", "unmapped")})):
            obj = out / (src + ".o")
            subprocess.run(["as", "--32", "-o", str(obj), str(ROOT / "tests" / "kernels" / src)], check=True)
            for name, entry in entries.items():
                elf = out / f"{name}.elf"
                subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext=0x100000", "-e", entry, "-o", str(elf),
                                str(obj)], check=True, capture_output=True)
                images[name] = elf.read_bytes()
    finally:
        lock.close()
    return images


def boot(image: bytes, mode: str, cmdline: str = "kernel", meter: bool = False, timeout: float = 120, **kw):
    m = Machine(image, cmdline, policy=mode, **kw)
    fm = RealFaultMeter(m.cpu) if meter else None
    r = m.run(timeout=timeout)
    if fm is not None:
        fm.finish()
        r.faults = fm.summary()
    return r


def test_the_context_offsets_hold_on_this_unicorn():
    _probe_layout()      # raises LayoutError naming the first field found elsewhere


@pytest.mark.parametrize("field,value,name", [("OFF_ERROR_CODE", 5380, "error_code"), ("OFF_PKRU", 5300, "PKRU"),
                                              ("OFF_HFLAGS", 180, "hflags"), ("OFF_CR", 432, "CR4")])
def test_a_wrong_context_offset_is_caught_at_start_up(monkeypatch, field, value, name):
    from shadowmmu.vm import qemu_state
    monkeypatch.setattr(qemu_state, field, value)
    with pytest.raises(qemu_state.LayoutError) as e:
        _probe_layout()
    assert name in str(e.value)


@pytest.mark.parametrize("mode", MODES)
def test_hello_prints_and_exits_with_exact_exits(small, mode):
    r = boot(small["_start"], mode)
    assert r.serial == b"hello from real x86\n"
    assert r.status == 1 and "isa-debug-exit" in r.stop_reason
    expected = {} if mode == "native" else {"pf_fixed": 1, "io": 41}     # 20 x (LSR read, THR write) + exit
    assert {k: v for k, v in r.exits.items() if v} == expected
    assert r.deliveries == {}


@pytest.mark.parametrize("mode", ["native", "update"])
def test_counted_instructions_are_the_programs(small, mode):
    m = Machine(small["_start"], policy=mode)
    m.cpu.count_instructions()
    # 3 (cmp, jne, mov) + 12 per character x 20 + 3 at the NUL + 2 (mov, out 0xf4), and the
    # mov after the exit's OUT: unicorn ends the translation block, not the instruction
    assert m.run(timeout=30).instructions == 3 + 12 * 20 + 3 + 2 + 1


def test_hello_leaves_the_same_memory_in_every_mode(small):
    assert len({boot(small["_start"], m).memory_sha256 for m in MODES}) == 1


@pytest.mark.parametrize("mode", MODES)
def test_control_register_writes_kvm_refuses_are_gp0(small, mode):
    """CR4.SMXE, CR0.NW without CD, a reserved EFER bit, CR0.PG without PE: four #GP(0),
    then an allowed CR4 write (tests/kernels/crcheck.S), natively as under the MMU."""
    r = boot(small["crcheck"], mode)
    assert r.status == (4 << 1) | 1, r.stop_reason       # four faults, every error code 0
    assert r.deliveries == {13: 4}


@pytest.mark.parametrize("mode", MODES)
def test_triple_fault_names_the_vector_and_rip(small, mode):
    r = boot(small["triple"], mode)
    assert r.status is None
    # ud2 is the second instruction (lidt is 7 bytes at 0x10000c).  #UD is benign: its
    # delivery's #GP is delivered; that #GP's own #GP is contributory twice: #DF; a
    # fault delivering #DF: shutdown (SDM table 6-5)
    assert r.stop_reason == ("triple fault: #UD at RIP 0x100013 could not be delivered "
                             "(#UD -> #GP -> #GP -> #DF -> #GP); "
                             "the CPU shuts down")


@pytest.mark.parametrize("mode", MODES)
def test_hang_stops_at_the_timeout(small, mode):
    m = Machine(small["hang"], policy=mode)
    r = m.run(timeout=0.5)
    assert r.status is None and r.stop_reason.startswith("timeout: the guest ran 0.5 s without exiting")


@pytest.mark.parametrize("mode", MODES)
def test_halt_with_nothing_to_wake_it(small, mode):
    r = boot(small["halt"], mode)
    assert r.status is None and "halted" in r.stop_reason and "interrupts off" in r.stop_reason


@pytest.mark.parametrize("mode", MODES)
def test_access_to_unmapped_physical_memory_stops_the_machine(small, mode):
    r = boot(small["unmapped"], mode)
    assert r.status is None
    assert "physical address 0xc0000000" in r.stop_reason and "neither RAM nor a device" in r.stop_reason


def test_boot_command_bad_inputs(small, tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x7fELF" + bytes(200))
    assert main(["boot", str(junk)]) == 2
    assert "not a multiboot image" in capsys.readouterr().err
    elf = small["_start"]
    cut = tmp_path / "cut.elf"
    cut.write_bytes(elf[:0x60])            # the multiboot header survives, the ELF does not
    assert main(["boot", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "cut.elf" in err and ("truncated" in err or "beyond the end" in err)
    assert main(["boot", str(tmp_path / "missing.elf")]) == 2
    assert "cannot read kernel" in capsys.readouterr().err
    hang = tmp_path / "hang.elf"
    hang.write_bytes(small["hang"])
    assert main(["boot", str(hang), "--timeout", "0.3", "--native"]) == 2
    assert "timeout" in capsys.readouterr().out


MM_PROGRAMS = {"demand": ("demand", "30"), "forkwait": ("forkwait", "6"), "kbuild": ("kbuild", "1"),
               "memtouch": ("memtouch", "2"), "faults": ("faults",)}
MM_CASES = [(p, f) for p in ("demand", "forkwait", "kbuild") for f in ("32", "pae", "pae-pte64", "64")] + [
    ("demand", "la57"), ("memtouch", "64"), ("memtouch", "pae"), ("faults", "64"), ("faults", "32")]


@pytest.mark.parametrize("program,fmt", MM_CASES)
def test_mm_kernel_is_the_same_guest_in_every_mode(kernels, fmt, program):
    image = (kernels / f"mm-{fmt}.elf").read_bytes()
    cmd = " ".join(["mm", *MM_PROGRAMS[program]])
    runs = {mode: boot(image, mode, cmd) for mode in MODES}
    native = runs["native"]
    assert native.status == 1, native.stop_reason
    text = native.serial.decode()
    if program == "faults":
        # six children, each killed by the kernel for one forbidden access: four #PF, two #GP
        assert "faults: cases=6" in text and "killed=6" in text and "lost=0" in text
        assert native.deliveries[13] == 2
    else:
        assert "killed=0" in text
        assert "bad=0" in text or program == "kbuild"
    for mode in ("zap", "update"):
        r = runs[mode]
        assert r.serial == native.serial, mode
        assert r.memory_sha256 == native.memory_sha256, mode
        assert r.status == 1
        assert r.exits["pf_injected"] == native.deliveries[14]       # every guest #PF is one injection


# Steady demand and COW faults (the table existed and stayed shadowed), as the Python model
# counts them (shadowmmu run demand --frames warm|cold).  Warm frames (the mm kernel's "warm"
# word: boot zeroes every frame): the seed's own figures, 3 exits with zap and 2 with update;
# PAE with 4-byte halves: both halves trap under either policy, 4 and 4; PAE with one 8-byte
# store: 3 and 2 again.  Cold frames: one more hidden #PF for the kernel's first touch of the
# fresh frame's direct-map piece.
SEED_FIGURES = {"32": (3, 2), "pae": (4, 4), "pae-pte64": (3, 2), "64": (3, 2)}


@pytest.mark.parametrize("frames", ["warm", "cold"])
@pytest.mark.parametrize("fmt", sorted(SEED_FIGURES))
@pytest.mark.parametrize("policy", ["zap", "update"])
def test_exits_per_demand_fault_on_real_code_are_the_seeds(kernels, fmt, policy, frames):
    image = (kernels / f"mm-{fmt}.elf").read_bytes()
    # 8 MiB of RAM.  "warm" zeroes every frame at boot: 2,000 hidden #PFs, each leaving one more spte
    # for the audit to check, so warm runs audit every 64th exit (cold runs: every exit)
    r = boot(image, policy, "mm demand 40" + (" warm" if frames == "warm" else ""), meter=True, ram_mib=8,
             audit=64 if frames == "warm" else True)
    steady = r.faults["demand"]["steady"]
    expected = SEED_FIGURES[fmt][policy == "update"] + (frames == "cold")
    assert steady["faults"] >= 35
    assert steady["histogram"] == {expected: steady["faults"]}
    # the rest (the first fault of each page table) are new_table faults, never cheaper
    assert r.faults["demand"]["cases"]["new_table"] >= 1


@pytest.mark.parametrize("fmt", ["pae", "64"])
def test_exits_per_cow_fault_on_real_code_are_the_seeds(kernels, fmt):
    image = (kernels / f"mm-{fmt}.elf").read_bytes()
    for policy in ("zap", "update"):
        r = boot(image, policy, "mm forkwait 4 warm", meter=True, ram_mib=8, audit=64)
        steady = r.faults["cow"]["steady"]
        assert steady["faults"] >= 10
        assert steady["histogram"] == {SEED_FIGURES[fmt][policy == "update"]: steady["faults"]}


def test_compare_real_puts_the_model_and_real_code_side_by_side(kernels, monkeypatch):
    from shadowmmu.analysis.real_compare import compare_real
    from shadowmmu.mmu.mmu import ShadowMMU
    # the model's warm boot zeroes all of RAM (thousands of exits): audit it as the other model
    # tests do (test_mmu_* audit it at every point); the real runs are audited elsewhere here
    monkeypatch.setattr(ShadowMMU, "audit_by_default", 4096)
    rows = compare_real(kernels, ["demand"], ["64"], frames=("cold",), model_size=16)
    assert [(r["policy"], r["demand"]["model"], r["demand"]["real"]) for r in rows] == [("zap", "4", "4"),
                                                                                         ("update", "3", "3")]


# --- stores to a shadowed page table: what the emulation hands pte_write ----------------------
# kernels/stores writes its user page table with one instruction of each kind (its README);
# the hypervisor must see each write with its exact offset and width (KVM's emulator passes
# emulator_write_phys the operand; a REP string instruction is one element per iteration, a
# page-crossing store only its part on the table's page).  A locked cmpxchg that fails still
# writes the old value back.  Fewer writes than stores are KVM's heuristics, not losses:
# - rep movsb: the first 1-byte write is misaligned for a pte, so pte_write zaps the table and
#   the other 15 bytes are plain stores;
# - the flood detector zaps a table written three times with no fault through it in between:
#   stores that keep A set take no fault under "update" (update_pte kept the spte), so lock-or,
#   lock-bts and the first rep-stos iteration flood it there (on PAE those 4-byte stores are
#   partial pte writes, which zap the spte rather than update it, so the next access faults).
def _stores(fmt: str, policy: str):
    eight = fmt == "64"
    w = 8 if eight else 4                          # the CPU's word: the RMW instructions' width
    e = 4 if fmt == "32" else 8                    # pte size
    mov = [(e, 8)] if eight else [(e, 4)] if fmt == "32" else [(8, 4), (12, 4)]
    stos = {"64": {"zap": [(64, 8), (72, 8)], "update": [(64, 8)]},
            "pae": {"zap": [(64, 4), (68, 4), (72, 4)], "update": [(64, 4), (68, 4), (72, 4)]},
            "32": {"zap": [(32, 4), (36, 4)], "update": [(32, 4)]}}[fmt][policy]
    return {"mov": mov, "xchg": [(2 * e, w)], "cmpxchg": [(3 * e, w)], "cmpxchg-fail": [(3 * e, w)],
            "cmpxchg8b": [(4 * e, 8)], "lock-or": [(6 * e, w)], "lock-bts": [(7 * e, w)], "rep-stos": stos,
            "rep-movs": [(10 * e, 1)], "high-half": [(12 * e + (4 if e == 8 else 0), 4)],
            "straddle-ptes": [(14 * e - 1, 2)], "straddle-frames": [(4092, 4)]}


@pytest.mark.parametrize("fmt", ["32", "pae", "64"])
@pytest.mark.parametrize("policy", ["zap", "update"])
def test_every_kind_of_store_reaches_pte_write_exactly(kernels, fmt, policy):
    image = (kernels / f"stores-{fmt}.elf").read_bytes()
    line, phase, log = bytearray(), ["boot"], {}

    def sink(b):
        if b == 10:
            phase[0] = line.decode()
            line.clear()
        else:
            line.append(b)
    m = Machine(image, "stores", policy=policy, serial_sink=sink)
    real_pte_write = m.vm.mmu.pte_write

    def pte_write(vcpu, gpa, data):
        log.setdefault(phase[0], []).append((gpa & 0xFFF, len(data), bytes(data)))
        return real_pte_write(vcpu, gpa, data)
    m.vm.mmu.pte_write = pte_write
    r = m.run(timeout=60)
    assert r.status == 1, r.stop_reason
    log.pop("boot", None)
    assert {k: [(off, n) for off, n, _ in v] for k, v in log.items()} == _stores(fmt, policy)
    # the failed cmpxchg wrote back exactly what the successful one had left
    printed = {ln.split(": ")[0]: ln.split(": ")[1].split() for ln in r.serial.decode().splitlines() if ": " in ln}
    ok = int(printed["cmpxchg"][0], 16)
    assert log["cmpxchg-fail"][0][2] == (ok & ((1 << (8 * log["cmpxchg-fail"][0][1])) - 1)).to_bytes(
        log["cmpxchg-fail"][0][1], "little")
    native = boot(image, "native", "stores")
    assert r.serial == native.serial and r.memory_sha256 == native.memory_sha256


# --- the self-test kernel: the paging rules checked by real code, exact error codes -------------
@pytest.mark.parametrize("fmt", ["32", "pae", "pae-pte64", "64", "la57"])
def test_selftest_kernel_passes_and_is_the_same_guest_in_every_mode(kernels, fmt):
    image = (kernels / f"selftest-{fmt}.elf").read_bytes()
    runs = {mode: boot(image, mode, "selftest") for mode in MODES}
    native = runs["native"]
    lines = native.serial.decode().splitlines()
    summary = [ln for ln in lines if ln.startswith("selftest:")]
    assert native.status == 1 and len(summary) == 1 and summary[0].endswith(" 0 failed"), summary
    assert not [ln for ln in lines if ln.startswith("FAIL")]
    assert int(summary[0].split()[1]) >= 55          # cases run, not skipped
    for mode in ("zap", "update"):
        assert runs[mode].serial == native.serial, mode
        assert runs[mode].memory_sha256 == native.memory_sha256, mode


SEED_CASES = ("seed_update_rights", "seed_update_rights_w", "shared_pt_update")


@pytest.mark.parametrize("fmt", ["32", "64"])
def test_the_seeds_update_pte_rights_bug_is_visible_to_a_real_guest(kernels, fmt):
    """A pte written (emulated, then update_pte) while its table is in use, then a ring-3
    access it forbids: with the seed's rights (the knob) the access goes through."""
    image = (kernels / f"selftest-{fmt}.elf").read_bytes()
    fixed = boot(image, "update", "selftest seed shared").serial.decode()
    # audit=False: the audit would stop the run at the first spte granting more than its gpte
    buggy = boot(image, "update", "selftest seed shared", seed_access_bug=True, audit=False).serial.decode()
    for case in SEED_CASES:
        assert f"PASS {case}" in fixed.splitlines()
        assert any(ln.startswith(f"FAIL {case}: expected #PF") and "got no fault" in ln
                   for ln in buggy.splitlines()), case
    # zap never installs a spte on a pte write: the knob changes nothing there
    zap = boot(image, "zap", "selftest seed shared", seed_access_bug=True).serial.decode()
    assert all(f"PASS {case}" in zap.splitlines() for case in SEED_CASES)


def test_the_audit_stops_a_real_guest_at_the_seeds_bad_spte(kernels):
    r = boot((kernels / "selftest-64.elf").read_bytes(), "update", "selftest seed_update_rights",
             seed_access_bug=True, audit=True)
    assert r.status is None and r.stop_reason.startswith("AuditError")


@pytest.mark.parametrize("fmt", ["pae", "64"])
def test_prefetch_on_real_code_changes_nothing_the_guest_can_see(kernels, fmt):
    """The self-test (with its prefetch bait: a present neighbour with a reserved bit) under
    KVM's pte prefetch: the same output and memory as natively."""
    image = (kernels / f"selftest-{fmt}.elf").read_bytes()
    native = boot(image, "native", "selftest")
    r = boot(image, "update+prefetch", "selftest")
    assert r.status == 1 and r.serial == native.serial and r.memory_sha256 == native.memory_sha256
    assert r.mmu_stats["prefetched"] > 0


@pytest.mark.parametrize("fmt,policy", [("32", "update+bypass"), ("64", "update+bypass"), ("pae", "modern"),
                                        ("64", "modern")])
def test_bypass_and_unsync_on_real_code_change_nothing_the_guest_can_see(kernels, fmt, policy):
    """The self-test and a fork/exit/wait program under bypass (the hardware's #PF filter
    hands not-present faults to the guest) and under modern KVM's zap+unsync+prefetch (the
    guest writes its leaf tables directly; INVLPG and CR3 loads resync them), audited:
    the same output and memory as natively, and the mechanism really ran."""
    ran = Counter()
    for image, cmdline in (((kernels / f"selftest-{fmt}.elf").read_bytes(), "selftest"),
                           ((kernels / f"mm-{fmt}.elf").read_bytes(), "forkwait 8")):
        native = boot(image, "native", cmdline)
        r = boot(image, policy, cmdline)
        assert r.status == native.status and r.serial == native.serial, cmdline
        assert r.memory_sha256 == native.memory_sha256, cmdline
        ran.update(unsync_pages=r.mmu_stats["unsync_pages"], invlpg=r.exits["invlpg"],
                   bypassed=r.vcpu_stats.get("bypassed_faults", 0))
    if policy == "modern":
        assert ran["unsync_pages"] > 0 and ran["invlpg"] > 0, ran
    else:
        assert ran["bypassed"] > 0, ran
