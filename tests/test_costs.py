"""The cost model: estimate, the fit, the kbuild prediction and the identity behind it."""

import pytest

from shadowmmu.analysis.costs import (
    CR_WORK, KBUILD_SLOWDOWN, PRESETS, estimate, exit_cycles, fit_work_per_access, get_preset,
    speedup_identity, with_cr_work,
)
from shadowmmu.analysis.report import CALIBRATION, fit_calibration, prediction, simulate

P4 = PRESETS["p4-2006"]


def test_estimate_prices_every_exit_by_reason():
    # P4: round trip 2409 + 1931 = 4340; fix work 17020 - 4340; pte write 12733 - 4340
    assert P4.exit_cost("pf_fixed") == 17020
    assert P4.exit_cost("pte_write") == 12733
    assert P4.exit_cost("pf_injected") == 11242 - 1093
    assert P4.exit_cost("cr_access") == 4340 + CR_WORK
    est = estimate({"pf_fixed": 2, "pte_write": 3, "cr_access": 0}, accesses=1000, guest_faults=5, preset=P4,
                   work_per_access=10.0)
    native = 1000 * 10.0 + 5 * 1093
    assert est["native_cycles"] == native
    assert est["shadow_cycles"] == native + 2 * 17020 + 3 * 12733
    assert est["parts"] == {"guest_work": 10000.0, "guest_faults": 5 * 1093,
                            "exits": {"pf_fixed": 2 * 17020, "pte_write": 3 * 12733},
                            "resync": None, "walks_2d": None}
    assert estimate({}, 10, 0, P4, 1.0)["parts"]["exits"] is None
    assert est["shadow_seconds"] == pytest.approx(est["shadow_cycles"] / 3.8e9)


def test_fit_reproduces_the_published_slowdown():
    exits = {"pf_fixed": 100, "pte_write": 300, "pf_injected": 250, "cr_access": 40}
    w = fit_work_per_access(exits, accesses=200_000, guest_faults=250, preset=P4)
    x = exit_cycles(exits, P4)
    assert w == pytest.approx((x / (484 / 265 - 1) - 250 * 1093) / 200_000)
    est = estimate(exits, 200_000, 250, P4, w)
    assert est["slowdown"] == pytest.approx(484 / 265)
    with pytest.raises(ValueError, match="slowdown is only"):
        fit_work_per_access({"pf_fixed": 1}, accesses=10, guest_faults=1000, preset=P4)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("zap,update", [
    ({"pf_injected": 2344, "pte_write": 2669, "pf_fixed": 2541, "cr_access": 87},
     {"pf_injected": 2344, "pte_write": 2658, "pf_fixed": 238, "cr_access": 87}),
    ({"pf_injected": 10, "pte_write": 20, "pf_fixed": 10}, {"pf_injected": 10, "pte_write": 20, "pf_fixed": 10}),
    ({"pf_injected": 5, "pte_write": 5, "pf_fixed": 500}, {"pf_injected": 5, "pte_write": 5}),
])
def test_the_predicted_speedup_is_an_identity(preset, zap, update):
    """Fit the work on the zap run, estimate both runs: the speed-up is
    (1 - X_update/X_zap) x 219/484, whatever the accesses and faults of the run."""
    p = get_preset(preset)
    xz, xu = exit_cycles(zap, p), exit_cycles(update, p)
    for accesses, faults in ((10_000, 0), (1_000_000, 3), (50_000_000, 7)):
        w = fit_work_per_access(zap, accesses, faults, p)
        tz = estimate(zap, accesses, faults, p, w)["shadow_cycles"]
        tu = estimate(update, accesses, faults, p, w)["shadow_cycles"]
        assert 1 - tu / tz == pytest.approx((1 - xu / xz) * 219 / 484, rel=1e-12, abs=1e-12)
        assert 1 - tu / tz == pytest.approx(speedup_identity(xz, xu), rel=1e-12, abs=1e-12)
    assert KBUILD_SLOWDOWN == 484 / 265


def test_cr_work_is_an_explicit_assumption():
    assert any("no published figure" in s for s in P4.sources)
    bare = with_cr_work(P4, 0)
    assert bare.exit_cost("cr_access") == bare.exit_cost("invlpg") == 2409 + 1931
    assert bare.exit_cost("pte_write") == P4.exit_cost("pte_write")
    assert with_cr_work(PRESETS["modern"], 0) is PRESETS["modern"]


def test_shipped_calibration_matches_a_refit():
    """The work per access shipped with the presets is what fitting kbuild gives today."""
    for preset in PRESETS:
        assert fit_calibration("64", preset) == pytest.approx(CALIBRATION[("64", "halves", "warm")][preset],
                                                              rel=1e-9)


def test_prediction_honours_size_and_seed_and_states_the_identity():
    p = prediction("64", "p4-2006", size=1, seed=4)
    z = simulate("kbuild", "zap", "64", 1, 4)["exits_during_workload"]
    u = simulate("kbuild", "update", "64", 1, 4)["exits_during_workload"]
    assert p["size"] == 1 and p["seed"] == 4
    assert p["exits"] == {"zap": sum(z.values()), "update": sum(u.values())}
    assert p["identity_speedup"] == pytest.approx(speedup_identity(exit_cycles(z, P4), exit_cycles(u, P4)))
    assert 0 < p["predicted_update_speedup"] < 219 / 484
    assert set(p["sensitivity"]) == {"kernel_side_25pct", "kernel_side_50pct", "frames_cold", "cr_invlpg_work_0",
                                     "cr_invlpg_work_8393", "preset_core2-2006", "preset_modern"}
    # a kernel-side share k of zap's exit cycles that both pay shrinks the saving by (1 - k)
    assert p["sensitivity"]["kernel_side_50pct"] == pytest.approx(p["identity_speedup"] / 2)
    # (PAE with pte halves saves nothing: test_guest_workloads asserts its steady faults cost 4 under both)
