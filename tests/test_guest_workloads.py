"""Every workload on native and both shadow policies, for all three guest formats:
it does all the work its programs describe (faults, processes, accesses and
qwords verified, derived by hand from guest/workloads.py), the guest cannot tell
(identical guest events), no frame leaks, and (lockstep) guest memory ends
identical on native and shadow."""

import json

import pytest

from shadowmmu.analysis.run import run_workload
from shadowmmu.guest import GUEST_FORMATS, WORKLOADS
from shadowmmu.guest.workloads import CC_HEAP, CC_LIBS, CC_PASSES, CC_TEXT, OBJ_PAGES, SRC_PAGES
from shadowmmu.vm import VM
from shadowmmu.x86.formats import PagingMode

RAM = 4 << 20
SEED = 3
SMALL = {"demand": 24, "fork": 4, "forkwait": 4, "kbuild": 2, "memtouch": 3}
MODES = {"32": PagingMode.BITS32, "pae": PagingMode.PAE, "64": PagingMode.LEVEL4}


def startup(lib_pages):
    """workloads._startup: run lib_pages libc text pages (8 qwords each: a file fault
    each), write libc's data page and the image's data page (4 qwords each: private
    file pages, a file fault each) and one stack page (8 qwords: a demand fault).
    Returns (demand, file, user accesses, qwords verify() reads back afterwards)."""
    return 1, lib_pages + 2, 8 * lib_pages + 4 + 4 + 8, 4 + 4 + 8


def expected_events(workload: str, n: int, seed: int) -> dict:
    """The guest events a workload of size n must produce, derived by hand from the
    programs in guest/workloads.py (not from a run): faults per page first touched,
    processes, and every user access the programs make.  A workload that silently
    does less (fewer pages, forks, passes or checks) does not match."""
    if workload == "demand":
        # mmap(n), write n pages x 8 qwords (a demand fault each), verify them, exit
        return dict(demand_faults=n, file_faults=0, cow_faults=0, forks=0, execs=0, process_exits=1,
                    user_accesses=16 * n, verified_qwords=8 * n)
    if workload in ("fork", "forkwait"):
        # parent: startup(8), a 16-page heap (8 qwords a page: 16 demand faults), n x (fork, wait), verify
        d, f, acc, ver = startup(8)
        d, acc, ver = d + 16, acc + 16 * 8, ver + 16 * 8
        acc += ver                                     # the parent's verify
        if workload == "fork":                         # the child exits at once
            return dict(demand_faults=d, file_faults=f, cow_faults=0, forks=n, execs=0, process_exits=n + 1,
                        user_accesses=acc, verified_qwords=ver)
        # child: 4 heap pages (COW) and the stack page (COW) rewritten with 8 qwords, 16 heap
        # pages read (2 qwords), a 2-page mmap written (2 demand faults), verify: what the
        # parent wrote plus its 2 new pages
        child_ver = ver + 2 * 8
        child_acc = 4 * 8 + 8 + 16 * 2 + 2 * 8 + child_ver
        return dict(demand_faults=d + 2 * n, file_faults=f, cow_faults=5 * n, forks=n, execs=0,
                    process_exits=n + 1, user_accesses=acc + n * child_acc, verified_qwords=ver + n * child_ver)
    if workload == "memtouch":
        # parent: startup(4), forks 4 workers; worker w, cycle c: mmap np pages, write and read
        # 16 qwords a page (np demand faults), verify (inherited 16 qwords + the mapping), munmap
        d, f, acc, ver = startup(4)
        sizes = [8 + (seed + w * 7 + c * 5) % 24 for w in range(4) for c in range(n)]
        cycle_ver = sum(ver + 16 * np for np in sizes)
        return dict(demand_faults=d + sum(sizes), file_faults=f, cow_faults=0, forks=4, execs=0, process_exits=5,
                    user_accesses=acc + sum(2 * 16 * np for np in sizes) + cycle_ver, verified_qwords=cycle_ver)
    if workload == "kbuild":
        # make: startup(4), a 5-page heap; per job: read the heap (5 x 4 qwords), fork, write
        # 2 qwords on its stack (COW), wait; then fork the linker; verify
        md, mf, macc, _ = startup(4)
        make_ver = 4 + 4 + 2 + 5 * 8                   # the stack page's last write was 2 qwords
        make = (md + 5, mf, macc + 5 * 8 + n * (5 * 4 + 2) + make_ver, make_ver)
        # each of the 2n + 1 exec'd children first writes 2 qwords on its stack (COW), then execs
        # sh: startup(4), a 2-page heap, fork the compiler, 2 qwords on its stack (COW), wait, verify
        sd, sf, sacc, _ = startup(4)
        sh_ver = 4 + 4 + 2 + 2 * 8
        sh = (sd + 2, sf, sacc + 2 * 8 + 2 + sh_ver, sh_ver)
        # compiler: startup(CC_LIBS), read the source into the heap (kernel stores: demand
        # faults), check 4 qwords a page; CC_PASSES passes over a growing part of the text (16
        # qwords a page, a file fault per new page), of the work area (64 stores + 64 loads a
        # page, a demand fault per new page) and 2 stack pages (16 qwords; the lower one new);
        # run libc again, write the object image (2 whole pages: demand faults), verify
        cd, cf, cacc, _ = startup(CC_LIBS)
        nwork = CC_HEAP - SRC_PAGES - OBJ_PAGES
        text = sum(CC_TEXT * (p + 1) // CC_PASSES for p in range(CC_PASSES))
        work = sum(nwork * (p + 1) // CC_PASSES for p in range(CC_PASSES))
        cc_ver = 4 + 4 + 2 * 16 + nwork * 64           # the object image is checked through the file
        cc = (cd + SRC_PAGES + nwork + 1 + OBJ_PAGES, cf + CC_TEXT,
              cacc + SRC_PAGES * 4 + 16 * text + 2 * 64 * work + CC_PASSES * 2 * 16 + CC_LIBS * 16
              + OBJ_PAGES * 512 + cc_ver, cc_ver)
        # linker: startup(10), a 22-page heap, read each object (2 pages, the first time demand
        # faults) and check 16 qwords a page, run 40 text pages, write 18 work pages (16 qwords)
        # and the 2-page output image, verify
        ld_d, ld_f, ld_acc, _ = startup(10)
        ld_ver = 4 + 4 + 8 + 18 * 16
        ld = (ld_d + OBJ_PAGES + 18 + 2, ld_f + 40, ld_acc + n * OBJ_PAGES * 16 + 40 * 16 + 18 * 16 + 2 * 512
              + ld_ver, ld_ver)
        per_job = [a + b for a, b in zip(sh, cc)]
        total = [m + n * j + x for m, j, x in zip(make, per_job, ld)]
        return dict(demand_faults=total[0], file_faults=total[1],
                    cow_faults=n * 4 + 1,   # per job: make's and sh's stacks after fork, both exec'd children's
                    forks=2 * n + 1, execs=2 * n + 1, process_exits=2 * n + 2,
                    user_accesses=total[2] + (2 * n + 1) * 2, verified_qwords=total[3])
    raise AssertionError(f"no expectation for workload {workload!r}")


def run(workload, guest, policy, size):
    vm = VM(RAM, native=policy == "native", pte_write="update" if policy == "native" else policy)
    return vm, run_workload(vm, workload, guest=guest, size=size, seed=SEED)


@pytest.mark.parametrize("guest", GUEST_FORMATS)
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_workload_is_invisible_to_the_guest(workload, guest):
    results, memories = {}, {}
    for policy in ("native", "zap", "update"):
        vm, r = run(workload, guest, policy, SMALL[workload])
        json.dumps(r)
        ev = r["guest_events"]
        want = expected_events(workload, SMALL[workload], SEED)
        # it did all the work its programs describe: {event: (got, expected)} of any that differ
        assert {k: (ev[k], n) for k, n in want.items() if ev[k] != n} == {}
        assert ev["segv"] == ev["spurious_faults"] == 0
        assert vm.vcpu.guest.mode is MODES[guest]        # and in the paging format asked for
        assert r["frames"]["free_at_end"] == r["frames"]["free_after_boot"] - r["frames"]["page_cache"]
        assert r["segfaults"] == []
        results[policy] = r
        memories[policy] = vm.guest_memory()
    assert results["native"]["guest_events"] == results["zap"]["guest_events"] == results["update"]["guest_events"]
    assert results["native"]["total_exits_during_workload"] == 0
    for policy in ("zap", "update"):
        fe = results[policy]["fault_exits"]
        assert sum(v["faults"] for v in fe.values()) == sum(
            results[policy]["guest_events"][k] for k in ("demand_faults", "cow_faults", "file_faults"))
        # lockstep: the guest's memory, A/D bits included, is what native paging left
        assert memories[policy] == memories["native"], f"{policy}: guest memory differs from native"


@pytest.mark.parametrize("guest,saved", [("64", 1), ("pae", 0)])
def test_steady_faults_on_kbuild_are_defined_by_what_happened(guest, saved):
    """Every steady fault (table existed and stayed shadowed, no shadow page made or
    zapped) costs exactly 3 exits under zap; update saves one -- except on PAE, whose
    pte halves it cannot use.  Faults that met a table the flood detector unshadowed
    are counted apart (here: COW faults after fork), whatever their count."""
    _, z = run("kbuild", guest, "zap", 2)
    _, u = run("kbuild", guest, "update", 2)
    steady_zap = 3 + (guest == "pae")
    for kind in ("demand", "file", "cow"):
        zc, uc = z["fault_exits"][kind]["cases"], u["fault_exits"][kind]["cases"]
        assert zc["steady"]["faults"] == uc["steady"]["faults"] > 0
        assert zc["steady"]["histogram"] == {str(steady_zap): zc["steady"]["faults"]}
        assert uc["steady"]["histogram"] == {str(steady_zap - saved): uc["steady"]["faults"]}
    # the flooded parent tables: the COW pte write does not exit, neither policy can save anything
    for r in (z, u):
        unshadowed = r["fault_exits"]["cow"]["cases"]["unshadowed"]
        assert unshadowed["faults"] > 0
        assert "pte_write" not in unshadowed["by_reason"]


def test_workloads_are_deterministic_and_sized():
    _, a = run("forkwait", "pae", "update", 3)
    _, b = run("forkwait", "pae", "update", 3)
    assert a["guest_events"] == b["guest_events"]
    want = expected_events("forkwait", 3, SEED)
    assert {k: a["guest_events"][k] for k in want} == want
    with pytest.raises(ValueError):
        run_workload(VM(RAM), "nope")
    assert run_workload(VM(RAM), "demand", guest=64, size=2)["guest"] == "64"      # an int names the format too
    with pytest.raises(ValueError, match="unknown guest format 48; choose one of 32, pae, 64"):
        run_workload(VM(RAM), "demand", guest=48, size=2)


def test_results_do_not_depend_on_pythonhashseed():
    """File contents are keyed by a stable hash: a run under two PYTHONHASHSEEDs
    reads and writes the same guest memory, bit for bit."""
    import hashlib
    import os
    import subprocess
    import sys
    code = ("import hashlib, json; from shadowmmu.analysis.run import run_workload; from shadowmmu.vm import VM\n"
            "vm = VM(4 << 20, pte_write='update')\n"
            "r = run_workload(vm, 'kbuild', guest='64', size=1, seed=5)\n"
            "h = hashlib.sha256()\n"
            "for gfn, page in sorted(vm.guest_memory().items()): h.update(gfn.to_bytes(8, 'little') + page)\n"
            "print(h.hexdigest(), json.dumps(r['guest_events'], sort_keys=True))\n")
    outs = set()
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout)
    assert len(outs) == 1
    assert hashlib.sha256(b"").hexdigest() not in outs.pop()


def test_the_notebook_example_in_docs_api_runs():
    """docs/api.md's example is executed as written (so the documentation stays true)."""
    import pathlib
    text = (pathlib.Path(__file__).parent.parent / "docs" / "api.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 15 <= len(code.splitlines()) <= 25
    exec(compile(code, "docs/api.md", "exec"), {})


def test_progress_covers_the_boot_then_the_workload():
    calls = []
    run_workload(VM(RAM), "fork", guest="64", size=3, progress=lambda *a: calls.append(a))
    boot = [c for c in calls if len(c) == 2 and c[1] == "boot: zeroing RAM"]
    assert boot and boot[0][0] == 0.0 and all(0 <= c[0] < 1 for c in boot)
    start = calls.index((0.0, None))
    assert calls.index(boot[-1]) < start
    assert [c for c in calls[start + 1:]][-1] == (1.0,)
    calls.clear()
    run_workload(VM(RAM), "fork", guest="64", size=3, progress=lambda *a: calls.append(a), frames="cold")
    assert not [c for c in calls if len(c) == 2 and c[1]]                          # cold: no boot phase


@pytest.mark.parametrize("guest", ["32", "pae", "64"])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_post_seed_policies_are_invisible_to_the_guest(workload, guest):
    """Bypass, out-of-sync shadows and modern KVM's preset, audited: the same guest events
    and memory (A/D bits included) as native paging.  The guest kernel verifies every
    qword its programs wrote, so a stale spte that outlives an invalidation fails it
    (as a recycled page-table frame whose old shadow was out of sync once did)."""
    _, native = run(workload, guest, "native", SMALL[workload])
    native_mem = _.guest_memory()
    for policy in ("update+bypass", "zap+unsync", "modern", "update+bypass+unsync"):
        vm, r = run(workload, guest, policy, SMALL[workload])
        assert r["guest_events"] == native["guest_events"], policy
        assert vm.guest_memory() == native_mem, f"{policy}: guest memory differs from native"
        vm.audit()
