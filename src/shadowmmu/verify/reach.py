"""How much of the MMU a lockstep campaign reaches, measured with coverage.py.

A random-program checker is only as good as the paths its programs reach.  This
runs a fixed campaign per guest format and policy under branch coverage and
reports, per campaign and combined, the branch coverage of the shadow MMU
(``mmu/``) and of the x86 pieces the checker drives (walker, TLB, CPU state),
with the lines and branches no campaign reached::

    python -m shadowmmu.verify.reach --steps 2000 --seed 7      (or: make reach)

The unreached list is the to-do list of the generator; docs/verification.md
says why each remaining entry cannot or need not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ..mmu.mmu import POLICIES
from ..mmu.policy import policy_arg
from ..x86.formats import GUEST_MODES

MEASURED = ("*/shadowmmu/mmu/*.py", "*/shadowmmu/x86/walker.py", "*/shadowmmu/x86/tlb.py",
            "*/shadowmmu/x86/cpu.py")


def _summary(cov, include) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cov.json_report(outfile=f.name, include=include)
        data = json.load(open(f.name))
    out = {}
    for path, fdata in data["files"].items():
        s = fdata["summary"]
        out[path] = {"branches": s["num_branches"], "covered_branches": s["covered_branches"],
                     "statements": s["num_statements"], "missing_lines": fdata["missing_lines"],
                     "missing_branches": fdata.get("missing_branches", [])}
    return out


def _group(summary: dict) -> dict:
    """Branches per group: mmu/ and the x86 files."""
    groups: dict[str, list[int]] = {"mmu/": [0, 0], "x86/": [0, 0]}
    for path, s in summary.items():
        g = "mmu/" if "/mmu/" in path else "x86/"
        groups[g][0] += s["covered_branches"]
        groups[g][1] += s["branches"]
    return {g: (c, n) for g, (c, n) in groups.items()}


def _one(guest: str, policy: str, steps: int, seed: int) -> dict:
    """One campaign, in this process (run under ``coverage run`` by measure())."""
    from .lockstep import GUESTS, campaign
    d, n = campaign(GUESTS[guest], policy, steps=steps, seed=seed)
    return {"steps": n, "divergence": None if d is None else str(d)}


def measure(steps: int, seed: int, guests=GUEST_MODES, policies=POLICIES, workdir: str | None = None,
            jobs: int = 2):
    """Run each campaign in a fresh process under ``coverage run --branch`` (so the
    modules' import-time lines count as what they are: run), then combine.
    Returns (per-campaign rows, combined summary)."""
    import coverage
    workdir = workdir or tempfile.mkdtemp(prefix="reach-")
    configs = [(g, p) for g in guests for p in policies]

    def run(config):
        g, p = config
        data_file = os.path.join(workdir, f"cov-{g}-{p}")
        r = subprocess.run([sys.executable, "-m", "coverage", "run", "--branch", f"--data-file={data_file}",
                            f"--include={','.join(MEASURED)}", "-m", "shadowmmu.verify.reach", "--one", g, p,
                            "--steps", str(steps), "--seed", str(seed)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"campaign {g} {p} under coverage failed: {r.stderr.strip()[-500:]}")
        cov = coverage.Coverage(data_file=data_file, branch=True, include=list(MEASURED))
        cov.load()
        return dict(guest=g, policy=p, **json.loads(r.stdout), groups=_group(_summary(cov, list(MEASURED)))), \
            data_file

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(run, configs))
    combined = coverage.Coverage(data_file=os.path.join(workdir, "cov-all"), branch=True, include=list(MEASURED))
    combined.combine([f for _, f in results], keep=True)
    combined.save()
    return [row for row, _ in results], _summary(combined, list(MEASURED))


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table
    ap = argparse.ArgumentParser(prog="python -m shadowmmu.verify.reach", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="lockstep steps per guest format and policy")
    ap.add_argument("--seed", type=int, default=7, help="campaign seed (the same seed gives the same programs)")
    ap.add_argument("--jobs", type=int, default=2, help="campaigns measured at once (one process each)")
    ap.add_argument("--json", action="store_true", help="print the measurement as JSON")
    ap.add_argument("--policies", nargs="+", type=policy_arg, metavar="POLICY", default=list(POLICIES),
                    help="MMU policies to run (default: zap update); any name --policy takes")
    ap.add_argument("--one", nargs=2, metavar=("GUEST", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.jobs <= 0:
        ap.error("--steps and --jobs must be positive")
    if args.one:
        print(json.dumps(_one(*args.one, args.steps, args.seed)))
        return 0
    rows, combined = measure(args.steps, args.seed, policies=args.policies, jobs=args.jobs)
    if args.json:
        print(json.dumps({"steps": args.steps, "seed": args.seed, "campaigns": rows, "combined": combined}))
        return 0
    con = Console()
    t = Table(title=f"branch coverage reached by lockstep campaigns ({args.steps:,} steps each, seed {args.seed})")
    for col in ("guest", "policy", "steps", "mmu/ branches", "x86/ branches", "result"):
        t.add_column(col, justify="right")
    for r in rows:
        cells = [f"{c}/{n} ({100 * c / n:.1f}%)" for c, n in (r["groups"]["mmu/"], r["groups"]["x86/"])]
        t.add_row(r["guest"], r["policy"], f"{r['steps']:,}", *cells,
                  "ok" if r["divergence"] is None else "[red]divergence[/]")
    tot = _group(combined)
    t.add_row("all", "", "", *[f"{c}/{n} ({100 * c / n:.1f}%)" for c, n in (tot["mmu/"], tot["x86/"])], "")
    con.print(t)
    for path, s in sorted(combined.items()):
        short = path.split("shadowmmu/")[-1]
        if s["missing_lines"] or s["missing_branches"]:
            br = ", ".join(f"{a}->{b}" for a, b in s["missing_branches"])
            con.print(f"{short}: lines not reached {s['missing_lines']}; branches not taken {br}",
                      markup=False, highlight=False)
    return 1 if any(r["divergence"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
