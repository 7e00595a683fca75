"""Figures for ``run --plot`` and ``compare --plot``: fixed size, one colour per exit reason.

``plot_compare`` is the figure a paper would use: (a) VM exits per steady-state
demand fault, by guest format and policy, stacked by exit reason (warm and cold
frames side by side); (b) the predicted kbuild speed-up of ``update`` over
``zap`` per guest format, with error bars spanning its sensitivity to the exit
mix (see ``report.prediction``), against the seed's "about 10%".
"""

from __future__ import annotations

FIGSIZE = (7.2, 3.0)           # inches: a two-column paper's full width
DPI = 200
REASONS = ("pf_injected", "pte_write", "pf_fixed", "other")
# Paul Tol's colour-blind-safe "bright" palette: one colour per exit reason, in every panel
REASON_COLORS = {"pf_injected": "#4477AA", "pte_write": "#EE6677", "pf_fixed": "#228833", "other": "#BBBBBB"}
REASON_LABELS = {"pf_injected": "#PF injected", "pte_write": "pte write emulated", "pf_fixed": "hidden #PF fixed",
                 "other": "other"}
REASON_TICKS = {"pf_injected": "#PF\ninjected", "pte_write": "pte write\nemulated", "pf_fixed": "hidden\n#PF fixed",
                "other": "other"}
POLICY_HATCH = {"zap": "", "update": "//"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "hatch.linewidth": 0.6})
    return plt


def _reasons(by_reason: dict | None) -> dict:
    out = dict.fromkeys(REASONS, 0.0)
    for r, n in (by_reason or {}).items():
        out[r if r in out else "other"] += n
    return out


def _guest_name(r: dict) -> str:
    return "PAE (8-byte)" if r.get("pae_stores") == "whole" else {"32": "32-bit", "pae": "PAE", "64": "64-bit"}[r["guest"]]


def _stacked(ax, x: float, parts: dict, width: float, hatch: str) -> None:
    bottom = 0.0
    for reason in REASONS:
        v = parts[reason]
        if v:
            ax.bar(x, v, width, bottom=bottom, color=REASON_COLORS[reason], hatch=hatch, edgecolor="black",
                   linewidth=0.4)
            bottom += v


def _reason_legend(ax, policies=("zap", "update")) -> None:
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=REASON_COLORS[r], edgecolor="black", linewidth=0.4, label=REASON_LABELS[r])
               for r in REASONS]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=POLICY_HATCH[p], linewidth=0.4, label=p)
                for p in policies]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def plot_compare(data: dict, path: str) -> None:
    """``data``: what ``shadowmmu compare --json`` prints."""
    plt = _pyplot()
    reports = [r for r in data["reports"] if r["policy"] != "native"]
    demand = [r for r in reports if r["workload"] == "demand"] or reports
    preds = data.get("predictions") or []
    fig, axes = plt.subplots(1, 2 if preds else 1, figsize=FIGSIZE, squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]} if preds else None)
    ax = axes[0][0]
    groups = []
    for r in demand:
        g = (_guest_name(r), r["frames"], r["workload"])
        if g not in groups:
            groups.append(g)
    width = 0.38
    for i, g in enumerate(groups):
        for j, pol in enumerate(("zap", "update")):
            r = next((r for r in demand if (_guest_name(r), r["frames"], r["workload"]) == g
                      and r["policy"] == pol), None)
            pf = r and r["exits_per_fault"]["demand"]
            if pf and pf["steady_by_reason"]:
                _stacked(ax, i + (j - 0.5) * width, _reasons(pf["steady_by_reason"]), width, POLICY_HATCH[pol])
    one_workload = len({g[2] for g in groups}) == 1
    ax.set_xticks(range(len(groups)), [f"{g[0]}\n{g[1]}" + ("" if one_workload else f"\n{g[2]}") for g in groups])
    ax.set_ylabel("VM exits per steady demand fault")
    ax.set_ylim(0, 6)
    ax.set_title("(a) exits per demand fault (table already shadowed)")
    ax.grid(axis="y", linewidth=0.3)
    ax.set_axisbelow(True)
    _reason_legend(ax)
    if preds:
        ax2 = axes[0][1]
        names = [_guest_name(p) for p in preds]
        vals = [p["predicted_update_speedup"] * 100 for p in preds]
        lo = [v - min([v] + [s * 100 for s in p["sensitivity"].values()]) for v, p in zip(vals, preds)]
        hi = [max([v] + [s * 100 for s in p["sensitivity"].values()]) - v for v, p in zip(vals, preds)]
        ax2.bar(range(len(preds)), vals, 0.6, color="#66CCEE", edgecolor="black", linewidth=0.4,
                yerr=[lo, hi], capsize=3, error_kw={"linewidth": 0.8})
        ax2.axhline(10, color="black", linestyle="--", linewidth=0.8, label='the seed: "about 10%"')
        for i, (v, h) in enumerate(zip(vals, hi)):
            ax2.text(i, v + h + 0.4, f"{v:.1f}%", ha="center", va="bottom", fontsize=7)
        ax2.legend(loc="upper right", frameon=False)
        ax2.set_xticks(range(len(preds)), names)
        ax2.set_ylabel("predicted kbuild speed-up of update (%)")
        ax2.set_ylim(0, max(25, max(v + h for v, h in zip(vals, hi)) + 6))
        ax2.set_title("(b) kbuild, update vs zap")
        ax2.grid(axis="y", linewidth=0.3)
        ax2.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_reports(reports: list[dict], path: str) -> None:
    """``run --plot``: the run's VM exits by reason and its steady exits per fault."""
    plt = _pyplot()
    r = reports[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE)
    parts = _reasons(r["exits"]["by_reason"])
    ax1.bar(range(len(REASONS)), [parts[k] for k in REASONS], color=[REASON_COLORS[k] for k in REASONS],
            edgecolor="black", linewidth=0.4)
    ax1.set_xticks(range(len(REASONS)), [REASON_TICKS[k] for k in REASONS], fontsize=7)
    ax1.set_ylabel("VM exits during the workload")
    ax1.set_title(f"(a) {r['workload']}, {_guest_name(r)} guest, {r['policy']}, {r['frames']} frames")
    kinds = [k for k in ("demand", "cow") if r["exits_per_fault"][k]["steady_by_reason"]]
    for i, kind in enumerate(kinds):
        _stacked(ax2, i, _reasons(r["exits_per_fault"][kind]["steady_by_reason"]), 0.5, "")
    ax2.set_xticks(range(len(kinds)), [f"{k} fault" for k in kinds])
    ax2.set_xlim(-0.7, max(1, len(kinds)) - 0.3)
    ax2.set_ylim(0, 6)
    ax2.set_ylabel("VM exits per steady fault")
    ax2.set_title("(b) exits per fault, table already shadowed")
    for ax in (ax1, ax2):
        ax.grid(axis="y", linewidth=0.3)
        ax.set_axisbelow(True)
    _reason_legend(ax2, policies=())
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
