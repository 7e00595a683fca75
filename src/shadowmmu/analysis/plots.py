"""Plots for run/compare: exits by reason per policy, and the time estimate with its parts."""

from __future__ import annotations


def plot_reports(reports: list[dict], path: str) -> None:
    """``reports``: outputs of report.run_report (one per policy/workload/guest)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['guest']} {r['policy']}" for r in reports]
    reasons = sorted({k for r in reports for k, v in r["exits"]["by_reason"].items() if v})
    parts = sorted({k for r in reports for k in r["estimate"]["parts"]},
                   key=lambda k: (k.startswith("exits"), k))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(reports) * 2), 5))
    x = range(len(reports))
    bottom = [0.0] * len(reports)
    for reason in reasons:
        vals = [r["exits"]["by_reason"].get(reason, 0) for r in reports]
        ax1.bar(x, vals, bottom=bottom, label=reason)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_xticks(list(x), labels, fontsize=8)
    ax1.set_ylabel("VM exits")
    ax1.set_title("exits by reason")
    ax1.legend(fontsize=8)
    bottom = [0.0] * len(reports)
    for part in parts:
        vals = [r["estimate"]["parts"].get(part, 0.0) / r_hz(r) for r in reports]
        ax2.bar(x, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel(f"estimated seconds ({reports[0]['estimate']['preset']})")
    ax2.set_title("time estimate and its parts")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def r_hz(report: dict) -> float:
    from .costs import get_preset
    return get_preset(report["estimate"]["preset"]).hz
