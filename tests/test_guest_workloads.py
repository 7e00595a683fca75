"""Every workload on native and both shadow policies, for all three guest formats:
the memory check passes, the guest cannot tell (identical guest events), no frame
leaks, and (lockstep) guest memory ends identical on native and shadow."""

import json

import pytest

from shadowmmu.guest import GUEST_FORMATS, WORKLOADS, run_workload
from shadowmmu.vm import VM

RAM = 4 << 20
SMALL = {"demand": 24, "fork": 4, "forkwait": 4, "kbuild": 2, "memtouch": 3}


def run(workload, guest, policy, size):
    vm = VM(RAM, native=policy == "native", pte_write="update" if policy == "native" else policy)
    return vm, run_workload(vm, workload, guest=guest, size=size, seed=3)


@pytest.mark.parametrize("guest", GUEST_FORMATS)
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_workload_is_invisible_to_the_guest(workload, guest):
    results, memories = {}, {}
    for policy in ("native", "zap", "update"):
        vm, r = run(workload, guest, policy, SMALL[workload])
        json.dumps(r)
        assert r["memory_check"] == "ok"
        assert r["workload"] == workload and r["guest"] == guest and r["size"] == SMALL[workload]
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
    assert a["guest_events"]["forks"] == 3
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
    code = ("import hashlib, json; from shadowmmu.guest import run_workload; from shadowmmu.vm import VM\n"
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
