"""The cost model beyond the seed (issue 11): prices for every exit reason, predictions
computed by hand from known counts, and compare's --policies / --history rows."""

import argparse
import json
from pathlib import Path

import pytest

from shadowmmu.analysis.costs import (
    PRESETS, REAL_TLB_ENTRIES, MODEL_TLB_ENTRIES, estimate, extra_walk_refs, walk_refs_2d, with_prices,
)
from shadowmmu.analysis.history import fault_us, per_op_us, run_cycles, speedup, surviving_share
from shadowmmu.analysis.report import HISTORY, simulate
from shadowmmu.cli import compare_policies, main
from shadowmmu.vm.events import EXIT_REASONS

P4 = PRESETS["p4-2006"]
MODERN = PRESETS["modern"]
RT = 2409 + 1931                          # the P4 round trip [AA06]
SOURCES = (Path(__file__).resolve().parents[1] / "docs" / "sources.md").read_text()

# every reason the VM counts, and the ones the later policies add (INVLPG under unsync, EPT violations
# under tdp), whether or not this build's events module lists them yet
REASONS = sorted(set(EXIT_REASONS) | {"invlpg", "ept_violation"})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_exit_reason_has_a_price_and_a_basis(preset):
    p = PRESETS[preset]
    for reason in REASONS:
        assert p.exit_cost(reason) > 0, reason
        basis = p.basis[reason]
        assert basis.startswith("ASSUMPTION") or "[AA06]" in basis or "[PVM23]" in basis, (reason, basis)
    for price in ("guest_pf", "resync_pte", "walk_ref"):
        assert price in p.basis, price
    assert p.basis["resync_pte"].startswith("ASSUMPTION") and p.basis["walk_ref"].startswith("ASSUMPTION")


def test_an_unpriced_reason_is_an_error_not_another_price():
    with pytest.raises(ValueError, match="no price for VM exit reason 'vmcall'"):
        P4.exit_cost("vmcall")
    with pytest.raises(ValueError, match="no price"):
        estimate({"pf_fixed": 1, "vmcall": 1}, 10, 0, P4, 1.0)


def test_sources_md_lists_the_new_prices():
    for word in ("ept_violation", "invlpg", "resync_pte", "walk_ref", "1536", "[BSSM08]", "2-D walk"):
        assert word in SOURCES, word


def test_2d_walk_references():
    assert walk_refs_2d(4) == 24                      # [BSSM08]: 4-level guest on 4-level EPT
    assert walk_refs_2d(2) == 14
    assert extra_walk_refs("64", 10) == 10 * (24 - 4)
    assert extra_walk_refs("32", 3) == 3 * (14 - 2)
    assert extra_walk_refs("pae", 1) == 12            # PDPTEs are registers: n = 2


def _run(policy, exits, *, user=1000, faults=10, forks=5, stats=None, tlb_misses=0, steady=None):
    r = {"policy": policy, "guest_events": {"user_accesses": user, "demand_faults": faults, "cow_faults": 0,
                                            "file_faults": 0, "forks": forks},
         "exits_during_workload": exits, "mmu_stats_during_workload": stats,
         "tlb_misses_during_workload": tlb_misses}
    if steady is not None:
        n, by = steady
        r["fault_exits"] = {"demand": {"cases": {"steady": {"faults": n, "exits": sum(by.values()),
                                                            "histogram": {}, "by_reason": by}}}}
    return r


BASE = _run("update+bypass", {"pte_write": 10, "pf_fixed": 2, "cr_access": 5})
UNSYNC = _run("update+bypass+unsync", {"pf_fixed": 10, "invlpg": 3, "cr_access": 5}, stats={"resynced_ptes": 40})


def test_unsync_prediction_by_hand():
    w = 100.0
    native = 1000 * w + 10 * 1093
    t_base = native + 10 * 12733 + 2 * 17020 + 5 * (RT + 500)
    t_new = native + 10 * 17020 + 3 * (RT + 500) + 5 * (RT + 500) + 40 * 200
    assert run_cycles(BASE, "64", P4, w) == pytest.approx(t_base)
    assert run_cycles(UNSYNC, "64", P4, w) == pytest.approx(t_new)
    assert speedup(BASE, UNSYNC, "64", P4, w) == pytest.approx(1 - t_new / t_base)
    # resync work is a visible price: at 0 cycles per pte the 40 resynced ptes cost nothing
    assert run_cycles(UNSYNC, "64", with_prices(P4, resync_pte=0), w) == pytest.approx(t_new - 40 * 200)
    # per fork: 5 forks
    assert per_op_us(UNSYNC, "64", P4, w) == pytest.approx(t_new / 3.8e9 * 1e6 / 5)


def test_tdp_prices_ept_violations_and_extra_walk_references():
    w = 50.0
    native = 1000 * w + 10 * 1093
    tdp = _run("tdp", {"ept_violation": 2}, tlb_misses=50)
    assert run_cycles(tdp, "64", P4, w) == pytest.approx(native + 2 * (RT + 12680) + 50 * 20 * 20)
    assert run_cycles(tdp, "pae", P4, w) == pytest.approx(native + 2 * (RT + 12680) + 50 * 12 * 20)
    # the MMU's own count of 2-D walks and of the references they read wins over the vCPU TLB's:
    # 30 full walks read 30 x 24 references, 4 of each a native walk reads too
    tdp2 = _run("tdp", {}, tlb_misses=50, stats={"tlb_misses": 30, "walk_refs": 720})
    assert run_cycles(tdp2, "64", P4, w) == pytest.approx(native + 30 * 20 * 20)
    # walks an EPT violation cut short read fewer; EPT walks that set D read more
    tdp3 = _run("tdp", {}, stats={"tlb_misses": 30, "walk_refs": 600, "ept_d_assist_refs": 8})
    assert run_cycles(tdp3, "64", P4, w) == pytest.approx(native + (600 + 8 - 4 * 30) * 20)
    # a shadow run's TLB misses are in the fitted work (its walks are native-length)
    shadow = _run("update", {}, tlb_misses=50)
    assert run_cycles(shadow, "64", P4, w) == pytest.approx(native)


def test_fault_cost_by_hand():
    # modern prices: guest #PF 0.15 µs, a fault exit 0.78 µs
    zap = _run("zap", {}, steady=(10, {"pf_injected": 10, "pte_write": 10, "pf_fixed": 10}))
    bypass = _run("update+bypass", {}, steady=(10, {"pte_write": 10}))
    tdp = _run("tdp", {}, steady=(10, {}))
    assert fault_us(zap, MODERN) == pytest.approx(0.15 + 0.78 + 1.66 + 0.78)
    assert fault_us(bypass, MODERN) == pytest.approx(0.15 + 1.66)
    assert fault_us(tdp, MODERN) == pytest.approx(0.15)


def test_surviving_share_by_hand():
    w = 10.0
    z = _run("zap", {"pf_fixed": 100})
    u = _run("update", {"pf_fixed": 0})
    zx = _run("zap+unsync", {"pf_fixed": 30})
    ux = _run("update+unsync", {"pf_fixed": 20})
    assert surviving_share(z, u, zx, ux, "64", P4, w) == pytest.approx(10 / 100)


def test_tlb_reach_is_a_knob_that_changes_the_misses():
    small = simulate("demand", "native", "64", 16, tlb_entries=64)
    big = simulate("demand", "native", "64", 16)
    assert big["tlb_entries"] == MODEL_TLB_ENTRIES and small["tlb_entries"] == 64
    assert small["tlb_misses_during_workload"] > big["tlb_misses_during_workload"]
    assert small["exits_during_workload"] == big["exits_during_workload"]


def test_compare_policies_expand_tdp_at_two_tlb_reaches():
    ns = argparse.Namespace(policies=["zap", "update+bypass", "tdp", "modern"], history=False, prefetch=False)
    assert compare_policies(ns) == [("zap", None), ("update+bypass", None), ("tdp", MODEL_TLB_ENTRIES),
                                    ("tdp", REAL_TLB_ENTRIES), ("zap+unsync+prefetch", None)]
    hist = [p for p, _ in compare_policies(argparse.Namespace(policies=None, history=True, prefetch=False))]
    assert list(dict.fromkeys(hist)) == [p if p != "modern" else "zap+unsync+prefetch" for p in HISTORY
                                         if p != "tdp" or "tdp" in hist]
    assert {"zap", "update", "update+bypass", "zap+unsync", "update+unsync", "zap+unsync+prefetch"} <= set(hist)


def test_compare_policies_rows_and_json(capsys):
    assert main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "warm",
                 "--policies", "native", "zap", "update", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in data["reports"]] == ["native", "zap", "update"]
    for r in data["reports"]:
        assert set(r["priced_counts"]) == {"resynced_ptes", "tlb_misses", "walk_refs", "extra_walk_refs"}
        assert r["tlb_entries"] == MODEL_TLB_ENTRIES
        assert set(r["estimate"]["parts"]) == {"guest_work", "guest_faults", "exits", "resync", "walks_2d"}
    assert "history" not in data
    assert main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "warm",
                 "--policies", "zap", "update"]) == 0
    out = capsys.readouterr().out
    assert "3 = i+w+f" in out and "2 = i+w" in out        # the seed's 3 -> 2, by reason


def test_compare_refuses_an_unknown_policy(capsys):
    assert main(["compare", "demand", "--policies", "zap+turbo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--policies" in err and "turbo" in err


def test_bench_mmu_rows_per_policy():
    from shadowmmu.analysis.bench_mmu import bench_mmu
    rows = bench_mmu("64", pages=40, warm_rounds=1, repeat=1, policies=("native", "zap", "update"))
    assert [r["policy"] for r in rows] == ["native", "zap", "update"]
    assert rows[0]["exits_by_reason"] is None and rows[0]["exits_per_fault"] == 0.0
    # 40 demand faults of the minimal guest: each injects, each pte write exits; zap re-faults after
    # each, except the first, whose page table is new (the hidden #PF builds its shadow under both)
    zap, upd = rows[1]["exits_by_reason"], rows[2]["exits_by_reason"]
    assert zap["pf_injected"] == upd["pf_injected"] == 40
    assert zap["pte_write"] == upd["pte_write"] == 40
    assert zap["pf_fixed"] - upd["pf_fixed"] == 40 - 1


# exit counts per policy for a fake kbuild/fork/demand run: the history table must price exactly these
FAKE_EXITS = {
    "zap": {"pf_injected": 10, "pte_write": 10, "pf_fixed": 10},
    "update": {"pf_injected": 10, "pte_write": 10},
    "update+bypass": {"pte_write": 10},
    "update+bypass+unsync": {"pf_fixed": 4, "invlpg": 2},
    "update+unsync": {"pf_injected": 10, "pf_fixed": 4, "invlpg": 2},
    "zap+unsync": {"pf_injected": 10, "pf_fixed": 5, "invlpg": 2},
    "zap+unsync+prefetch": {"pf_injected": 10, "pf_fixed": 3, "invlpg": 2},
    "update+unsync+prefetch": {"pf_injected": 10, "pf_fixed": 2, "invlpg": 2},
    "tdp": {},
}


def _fake_simulate(workload, policy, guest, size=None, seed=0, progress=None, *, tlb_entries=None, **kw):
    from shadowmmu.analysis.report import check_policy
    policy = check_policy(policy)
    exits = FAKE_EXITS[policy]
    stats = {"resynced_ptes": 8} if "unsync" in policy else None
    if policy == "tdp":
        n = 100 if tlb_entries == REAL_TLB_ENTRIES else 10
        stats = {"tlb_misses": n, "walk_refs": 24 * n, "complete_walks": n - 1, "complete_walk_refs": 24 * (n - 1)}
    return _run(policy, exits, stats=stats, steady=(10, exits))


def test_history_rows_price_the_runs_exit_counts(monkeypatch):
    import shadowmmu.analysis.history as h
    monkeypatch.setattr(h, "simulate", _fake_simulate)
    monkeypatch.setattr(h, "calibration", lambda g, p, *a: {"work_per_access": 100.0})
    rows = {r["quantity"].split(",")[0] + str(i): r for i, r in enumerate(h.history_predictions("p4-2006"))}
    rows = list(rows.values())
    assert rows[0]["model_text"] == "3 -> 2 -> 1 -> 0.60 -> 1.50 -> 0"
    w, native = 100.0, 1000 * 100.0 + 10 * 1093
    inv = RT + 500
    t_base = native + 10 * 12733
    t_new = native + 4 * 17020 + 2 * inv + 8 * 200
    assert rows[2]["model"] == pytest.approx(1 - t_new / t_base)              # unsync kbuild
    assert rows[3]["model"] == pytest.approx(1 - t_new / t_base)              # the same counts for fork
    # page fault, modern prices: modern (zap+unsync+prefetch) steady 1.3 fault exits + 0.2 INVLPG per fault
    f_sm = 0.15 + 1.3 * 0.78 + 0.2 * 0.54
    assert rows[5]["values"]["shadow_us"] == pytest.approx(f_sm)
    assert rows[5]["values"]["tdp_us"] == pytest.approx(0.15)
    # kernel build shadow/tdp at the real TLB: 100 misses x 20 extra refs x 20 cycles
    m = PRESETS["modern"]
    t_sm = native - 10 * 1093 + 10 * m.guest_pf + 13 * m.exit_cost("pf_fixed") + 2 * m.exit_cost("invlpg") + 8 * 200
    t_td = native - 10 * 1093 + 10 * m.guest_pf + 100 * 20 * 20
    assert rows[7]["model"] == pytest.approx(t_sm / t_td)
    assert rows[8]["model"] == pytest.approx(24.0)
    # the seed's saving left: (zap+unsync+prefetch - update+unsync+prefetch) / (zap - update)
    assert rows[9]["model"] == pytest.approx((1 * 17020) / (10 * 17020))


def test_a_failed_run_is_a_row_that_says_so(monkeypatch, capsys):
    import shadowmmu.analysis.report as report
    from shadowmmu.guest.user import MemoryCheckError
    real = report.run_report

    def failing(workload, policy, *a, **kw):
        if policy == "update":
            raise MemoryCheckError("pid 3 (demand): 0x1000 reads 0x1, the process wrote 0x2")
        return real(workload, policy, *a, **kw)
    monkeypatch.setattr(report, "run_report", failing)
    assert main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "warm",
                 "--policies", "zap", "update", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    assert "error" not in reports[0] and reports[1]["error"].startswith("MemoryCheckError: pid 3")
    assert main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "warm",
                 "--policies", "zap", "update"]) == 0
    out = capsys.readouterr().out
    assert "run failed" in out and "3 = i+w+f" in out
    # the default table has no such rows: a failure there is an error
    with pytest.raises(MemoryCheckError):
        main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "warm"])


def _reasons_counted_in_the_source() -> set:
    """Every exit reason the VM code can count: PfResult's, and every literal reason passed to
    ``events.exit(...)`` / ``exit_line(...)`` or used as ``exits["..."]`` in src/ (a reason added
    anywhere without a price must fail here, not be priced as another)."""
    import re
    from shadowmmu.mmu.fault import PfResult
    root = Path(__file__).resolve().parents[1] / "src" / "shadowmmu"
    found = {r.exit_reason for r in PfResult}
    pat = re.compile(r'(?:exits\[|\.exit\(|exit_line\()\s*"([a-z_]+)"')
    for path in root.rglob("*.py"):
        if "analysis" in path.parts:
            continue
        found |= set(pat.findall(path.read_text()))
    return found


def test_every_reason_the_code_counts_is_in_the_price_lists():
    counted = _reasons_counted_in_the_source()
    assert {"pf_fixed", "pf_injected", "pte_write", "cr_access", "invlpg"} <= counted   # the scan works
    assert counted <= set(EXIT_REASONS) | {"ept_violation"}, counted - set(EXIT_REASONS)
    for preset in PRESETS.values():
        for reason in counted:
            assert preset.exit_cost(reason) > 0 and reason in preset.basis, (preset.name, reason)
