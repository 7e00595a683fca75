"""`shadowmmu walk` names the rule behind a fault (which entry, which bit, which
CR4 feature), says when an error code cannot show a fetch, refuses an empty
image, states padding, and exits 0 (translated) / 1 (faulted) / 2 (bad input)."""

import pytest

from shadowmmu.cli import main
from shadowmmu.x86 import PhysicalMemory
from shadowmmu.x86.builder import PageTableBuilder
from shadowmmu.x86.formats import PagingMode

VA = 0x7FFF_0000_1000
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80


def image(tmp_path, flags, *, mode=PagingMode.LEVEL4, va=VA):
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem, mode)
    b.map(va, 0x9000, flags)
    path = tmp_path / "mem.raw"
    path.write_bytes(b"".join(mem.frame_bytes(p) for p in range(16)))
    return path, b.root


def walk(capsys, path, root, *args, va=VA, mode="64"):
    rc = main(["walk", str(path), hex(va), "--mode", mode, "--cr3", hex(root), *args])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("flags,args,rule", [
    (P | U, ["--cpl", "3", "--access", "write"], "R/W=0 in the PTE: a read-only page, and this is a user-mode write"),
    (P | W | U, [], None),
    (P | W, ["--cpl", "3"], "U/S=0 in the PTE: a supervisor-only page, and this is a user-mode access"),
    (P | W | U | (1 << 45), ["--maxphyaddr", "40"], "the PTE sets reserved bit(s) 45"),
    (P | W | U | (1 << 63), ["--access", "fetch"], "XD=1 in the PTE: the page is not executable"),
    (P | W | U, ["--access", "fetch", "--cr4", "0x100020"], "SMEP: a supervisor-mode fetch from a user page (U=1 at every level)"),
    (P | W | U, ["--cr4", "0x200020"], "SMAP: a supervisor-mode data access to a user page (EFLAGS.AC=0)"),
    (P | W | U, ["--cr4", "0x200020", "--implicit", "--ac"], "SMAP: a supervisor-mode data access to a user page "
                                                              "(an implicit supervisor access)"),
    (P | U, ["--access", "write"], "R/W=0 in the PTE: a read-only page, and this is a supervisor write with CR0.WP=1"),
    (P | W | U | (3 << 59), ["--cpl", "3", "--cr4", "0x400020", "--pkru", "0x40"],
     "protection key 3 of this user page: PKRU.AD3=1 denies data accesses"),
])
def test_walk_names_the_rule_that_faulted(tmp_path, capsys, flags, args, rule):
    path, root = image(tmp_path, flags)
    rc, out = walk(capsys, path, root, *args)
    if rule is None:
        assert rc == 0 and "=> physical 0x9000" in out and "#PF" not in out
    else:
        assert rc == 1
        assert out.splitlines()[-1] == f"   because {rule}"


def test_walk_names_the_upper_level_that_takes_the_right_away(tmp_path, capsys):
    path, root = image(tmp_path, P | W | U)
    # clear U in the PML4 entry: the leaf still allows user accesses, the top level does not
    data = bytearray(path.read_bytes())
    idx = (VA >> 39) & 511
    off = root + idx * 8
    entry = int.from_bytes(data[off:off + 8], "little") & ~U
    data[off:off + 8] = entry.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    rc, out = walk(capsys, path, root, "--cpl", "3")
    assert rc == 1 and out.splitlines()[-1] == \
        "   because U/S=0 in the PML4E: a supervisor-only page, and this is a user-mode access"


def test_walk_of_a_missing_entry_names_its_level(tmp_path, capsys):
    path, root = image(tmp_path, P | W | U)
    rc, out = walk(capsys, path, root, va=VA + (1 << 30))       # another PDPTE: not present
    assert rc == 1 and out.splitlines()[-1] == "   because the PDPTE is not present (P=0)"


def test_a_fetch_whose_error_code_cannot_say_fetch_is_explained(tmp_path, capsys):
    path, root = image(tmp_path, P | W | U)
    rc, out = walk(capsys, path, root, "--access", "fetch", "--cpl", "3", va=VA + 0x1000)
    assert rc == 1
    assert "error code 0x4 (U): not present, read, user mode (this was a fetch: I/D is reported only with " \
           "EFER.NXE=1 in a PAE-format walk or CR4.SMEP=1)" not in out            # NXE=1 here: I/D is reported
    rc, out = walk(capsys, path, root, "--access", "fetch", "--cpl", "3", "--no-nxe", va=VA + 0x1000)
    assert "not present, read, user mode (this was a fetch: I/D is reported only with EFER.NXE=1 in a " \
           "PAE-format walk or CR4.SMEP=1)" in out


def test_an_empty_image_is_refused_and_a_partial_frame_is_stated(tmp_path, capsys):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert main(["walk", str(empty), "0x0", "--mode", "64"]) == 2
    assert "is empty" in capsys.readouterr().err
    path, root = image(tmp_path, P | W | U)
    short = tmp_path / "short.raw"
    short.write_bytes(path.read_bytes()[:16 * 4096 - 100])
    rc, out = walk(capsys, short, root)
    assert rc == 0
    assert out.splitlines()[0] == ("note: the image is 65,436 bytes, not a whole number of 4 KB frames; "
                                   "its last frame is padded with zeros to 0x10000")


def test_the_library_names_match_the_command_line():
    """`import shadowmmu` gives the simple path; the VM's knob is `policy` like --policy,
    `pte_write` names the same knob, and `vm.exits` is a property like `vm.policy`."""
    import shadowmmu
    from shadowmmu.vm import VM as VmClass
    assert shadowmmu.VM is VmClass and shadowmmu.POLICIES == ("zap", "update")
    assert "demand" in shadowmmu.WORKLOADS and "pae" in shadowmmu.GUEST_FORMATS
    assert shadowmmu.VM(1 << 20, policy="zap").policy == "zap"
    assert shadowmmu.VM(1 << 20, pte_write="zap").policy == "zap"
    assert shadowmmu.VM(1 << 20).policy == "update"
    with pytest.raises(ValueError, match="name the same knob"):
        shadowmmu.VM(1 << 20, policy="zap", pte_write="update")
    vm = shadowmmu.VM(4 << 20, policy="zap")
    r = shadowmmu.run_workload(vm, "demand", guest="64", size=4)
    assert sum(vm.exits.values()) >= r["total_exits_during_workload"] > 0
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shadowmmu.nope
