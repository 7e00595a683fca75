"""The ``shadowmmu`` command."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table


class UsageError(Exception):
    """Bad arguments or input: printed as one line, exit status 2."""


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r} (use decimal or 0x...)") from None


# --- walk ---------------------------------------------------------------------
def cmd_walk(args) -> int:
    from .x86 import Access, CpuState, GeneralProtection, PhysicalAddressError, PhysicalMemory
    from .x86.builder import control_registers, parse_mode
    from .x86.narrate import narrate

    if not 32 <= args.maxphyaddr <= 52:
        raise UsageError(f"--maxphyaddr must be between 32 and 52, got {args.maxphyaddr}")
    try:
        with open(args.image, "rb") as f:
            image = f.read()
    except OSError as e:
        raise UsageError(f"cannot read memory image {args.image!r}: {e.strerror}") from None
    size = max(4096, (len(image) + 4095) & ~4095)
    if args.memory_size:
        if args.memory_size < len(image):
            raise UsageError(f"--memory-size {args.memory_size:#x} is smaller than the image ({len(image):#x} bytes)")
        size = (args.memory_size + 4095) & ~4095
    mem = PhysicalMemory(size, maxphyaddr=args.maxphyaddr)
    mem.load_image(image)
    regs = {}
    if args.mode:
        try:
            regs = control_registers(parse_mode(args.mode), args.cr3 or 0, nxe=not args.no_nxe)
        except ValueError as e:
            raise UsageError(str(e)) from None
    for name in ("cr0", "cr3", "cr4", "efer"):
        if getattr(args, name) is not None:
            regs[name] = getattr(args, name)
    if "cr0" not in regs:
        raise UsageError("give --mode or --cr0/--cr3/--cr4/--efer")
    cpu = CpuState(maxphyaddr=args.maxphyaddr, cpl=args.cpl, ac=args.ac, pkru=args.pkru)
    try:
        cpu.load(mem, **regs)
    except GeneralProtection as e:
        raise UsageError(f"these control registers would #GP: {e}") from None
    access = {"read": 0, "write": Access.WRITE, "fetch": Access.FETCH}[args.access]
    if args.cpl == 3:
        access |= Access.USER
    elif args.implicit:
        access |= Access.IMPLICIT
    for vaddr in args.address:
        try:
            lines = narrate(mem, cpu, vaddr, access, set_ad=args.set_ad)
        except PhysicalAddressError as e:
            raise UsageError(f"the walk of {vaddr:#x} leaves the image: {e} (give --memory-size, or check CR3 "
                             "and the entries)") from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        for line in lines:
            print(line)
    return 0


# --- bench --------------------------------------------------------------------
def cmd_bench(args) -> int:
    console = _console()
    if args.pages <= 0:
        raise UsageError(f"--pages must be positive, got {args.pages}")
    if args.what == "walk":
        from .analysis.bench_walk import bench_walk
        rows = bench_walk(args.pages)
        t = Table(title=f"page walks per second ({args.pages} mapped 4K pages, random order)")
        for col in ("mode", "cold walks/s", "TLB hits/s", "volatility3 walks/s", "ours / volatility3"):
            t.add_column(col, justify="right")
        for r in rows:
            vol = r["volatility3_per_s"]
            t.add_row(r["mode"], f"{r['cold_walks_per_s']:,.0f}", f"{r['tlb_hits_per_s']:,.0f}",
                      "n/a" if vol is None else f"{vol:,.0f}",
                      "n/a" if vol is None else f"{r['ratio']:.2f}x")
        console.print(t)
        return 0
    if args.what == "mmu":
        from .analysis.bench_mmu import bench_mmu
        for guest in args.guest:
            rows = bench_mmu(guest, args.pages)
            t = Table(title=f"shadow MMU, {guest} guest: {args.pages} demand faults (median of 3 runs), "
                            "then warm accesses")
            for col in ("policy", "demand faults/s", "exits/fault", "warm TLB-hit accesses/s",
                        "warm TLB-miss accesses/s"):
                t.add_column(col, justify="right")
            for r in rows:
                t.add_row(r["policy"], f"{r['demand_faults_per_s']:,.0f}", f"{r['exits_per_fault']:.2f}",
                          f"{r['tlb_hit_per_s']:,.0f}", f"{r['tlb_miss_per_s']:,.0f}")
            console.print(t)
        return 0
    if args.what == "kbuild":
        from .analysis.report import make_vm
        from .guest import run_workload
        t = Table(title="default kbuild: simulated guest accesses per second (boot excluded)",
                  caption="accesses: every guest load/store, counting each element of the kernel's REP STOS/MOVS "
                          "page clears and copies (done a page at a time after the first element); user "
                          "accesses are each simulated one by one")
        for col in ("guest", "policy", "accesses", "user accesses", "seconds", "accesses/s", "user accesses/s"):
            t.add_column(col, justify="right")
        for guest in args.guest:
            for policy in ("native", "zap", "update"):
                r = run_workload(make_vm(policy, "kbuild", guest=guest), "kbuild", guest=guest)
                ev = r["guest_events"]
                t.add_row(guest, policy, f"{r['accesses']:,}", f"{ev['user_accesses']:,}", f"{r['seconds']:.2f}",
                          f"{r['accesses'] / r['seconds']:,.0f}", f"{ev['user_accesses'] / r['seconds']:,.0f}")
        console.print(t)
        return 0
    raise UsageError(f"unknown benchmark {args.what!r}")


# --- selfcheck ----------------------------------------------------------------
def cmd_selfcheck(args) -> int:
    """Long verification campaigns: the paging model against QEMU (--cases N), and
    the shadow MMU against native paging in lockstep (--lockstep)."""
    import json
    from rich.progress import Progress
    if not args.lockstep and args.cases is None:
        raise UsageError("say what to check: --lockstep and/or --cases N")
    if args.steps <= 0 or (args.cases is not None and args.cases <= 0):
        raise UsageError("--steps and --cases must be positive")
    if not args.lockstep:
        for flag, given in (("--jobs", args.jobs is not None), ("--state", args.state is not None),
                            ("--engine", args.engine != "local"), ("--scheduler", args.scheduler is not None),
                            ("--chunk-steps", args.chunk_steps is not None)):
            if given:
                raise UsageError(f"{flag} applies to --lockstep campaigns")
    console = _console(args.json)
    out = {}
    failed = False
    status = 0
    if args.lockstep:
        report = _lockstep_campaign(args, console)
        out["lockstep"] = report.to_json()
        failed |= report.failed
        if report.interrupted:
            status = 130
    if args.cases is not None:
        try:
            from .x86.differential import selfcheck
        except ImportError as e:
            raise UsageError(f"the QEMU differential check is unavailable: {e}") from None
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("paging model vs QEMU", total=args.cases)
            result = selfcheck(args.cases, args.seed,
                               progress=lambda done, total: progress.update(task, completed=done))
        out["qemu"] = result
        mismatches = result.get("mismatches", [])
        t = Table(title=f"paging model vs QEMU's MMU (unicorn): {args.cases:,} random cases, seed {args.seed}, "
                        f"{result.get('seconds', 0):.0f} s")
        for col in ("mode", "cases", "access succeeded", "#PF", "#GP", "mismatches"):
            t.add_column(col, justify="right")
        for mode, m in result.get("modes", {}).items():
            t.add_row(str(mode), f"{m['cases']:,}", f"{m['ok']:,}", f"{m['page_faults']:,}", f"{m['gp']:,}",
                      f"{m['mismatches']:,}")
        console.print(t)
        if result.get("allowances"):
            console.print("documented QEMU departures allowed (the SDM rule is asserted on our side): "
                          + ", ".join(f"{k} x{v:,}" for k, v in result["allowances"].items()))
        for m in mismatches[:3]:
            console.print(m["report"], markup=False, highlight=False)
        failed |= bool(mismatches)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    return status or (1 if failed else 0)


def _lockstep_jobs(args) -> int:
    import os
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if args.scheduler is not None and args.engine != "dask":
        raise UsageError("--scheduler needs --engine dask")
    return jobs


def _lockstep_engine(args, jobs: int, chunks: int):
    """The engine --jobs/--engine/--scheduler ask for, no bigger than the ``chunks`` to run
    (campaigns.CampaignError if it cannot start)."""
    from .vm import campaigns
    if args.engine == "dask":
        return campaigns.DaskEngine.connect(args.scheduler, max(1, min(jobs, chunks)))
    return campaigns.InlineEngine() if min(jobs, chunks) <= 1 else campaigns.PoolEngine(min(jobs, chunks))


def _steps_per_cpu_second(report) -> float | None:
    cpu = sum(j.cpu_seconds for j in report.jobs)
    return sum(j.steps for j in report.jobs) / cpu if cpu > 0 else None


def _lockstep_campaign(args, console):
    """--lockstep: the campaign cut into chunks on the chosen engine, a progress bar,
    the summary table and, at a divergence, its shrunk story and the command that
    reproduces it."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text
    from .vm import campaigns
    from .vm.lockstep import GUESTS

    class StepsPerSecond(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} steps/s" if task.speed else "- steps/s")

    chunk_steps = args.chunk_steps if args.chunk_steps is not None else campaigns.DEFAULT_CHUNK_STEPS
    if chunk_steps <= 0:
        raise UsageError(f"--chunk-steps must be positive, got {chunk_steps}")
    options = {"seed_bug": True} if args.seed_bug else {}
    params = campaigns.Params(tuple([args.guest] if args.guest else GUESTS),
                              tuple([args.policy] if args.policy else ("zap", "update")),
                              args.steps, args.seed, chunk_steps, tuple(sorted(options.items())))
    jobs = _lockstep_jobs(args)
    try:
        state = campaigns.StateFile(args.state, params) if args.state else None
        todo = sum(1 for c in params.chunks() if state is None or c.key not in state.done)
        engine = _lockstep_engine(args, jobs, todo)
    except campaigns.CampaignError as e:
        raise UsageError(str(e)) from None
    progress = Progress(TextColumn("lockstep"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} steps"),
                        StepsPerSecond(), TimeRemainingColumn(), console=console, transient=True)
    task = None

    def on_start(total, done):
        nonlocal task
        # rich's speed is measured over advances only: the resumed steps do not inflate it
        task = progress.add_task("lockstep", total=total, completed=done)

    try:
        with progress:
            report = campaigns.run(params, engine, state=state, on_start=on_start,
                                   advance=lambda k: progress.advance(task, k))
    except campaigns.CampaignError as e:         # e.g. the state file became unwritable
        raise UsageError(str(e)) from None
    finally:
        engine.close()

    t = Table(title=f"lockstep: native vs shadow, {args.steps:,} steps per guest and policy, base seed {args.seed}"
                    + (" (seed's update_pte rights)" if args.seed_bug else ""),
              caption=f"chunks of {chunk_steps:,} steps, chunk k seeded base seed + k; wall time: the sum of the "
                      "chunks' times in their workers (resumed chunks included); steps/s: steps / that time, the "
                      f"rate of one worker. This run: {report.steps_this_run:,} steps in {report.elapsed:.1f} s "
                      f"on {report.engine}"
                      + (f" = {report.steps_this_run / report.elapsed:,.0f} steps/s overall"
                         if report.elapsed > 0 and report.steps_this_run else "")
                      + (f"; {cpu_rate:,.0f} steps per worker CPU second (the rate without other load)"
                         if (cpu_rate := _steps_per_cpu_second(report)) else ""))
    for col in ("guest", "policy", "steps", "chunks", "divergences", "wall time", "steps/s", "seed range"):
        t.add_column(col, justify="left" if col in ("guest", "policy") else "right")
    for j in report.jobs:
        t.add_row(j.guest, j.policy, f"{j.steps:,} / {j.steps_planned:,}",
                  f"{j.chunks} / {j.chunks_planned}" + (f" ({j.resumed_chunks} resumed)" if j.resumed_chunks else ""),
                  f"[red]{j.divergences}[/]" if j.divergences else "0", f"{j.seconds:,.1f} s",
                  "-" if j.steps_per_s is None else f"{j.steps_per_s:,.0f}", j.seed_range)
    console.print(t)
    if report.first is not None:
        c = report.first.chunk
        d = report.shrunk
        console.print(f"{c.guest} {c.policy}: divergence in chunk {c.index} (seed {c.seed}) at its step "
                      f"{report.first.steps_run - 1:,}; remaining chunks cancelled. Shrunk to {d.step + 1} steps "
                      f"in {report.shrink_seconds:.1f} s:", markup=False, highlight=False)
        console.print(str(d), markup=False, highlight=False)
        console.print(f"reproduce: {report.reproduce()}", markup=False, highlight=False)
    elif report.interrupted:
        console.print("interrupted: " + (f"the finished chunks are in {args.state}; the same command resumes"
                                         if args.state else "give --state FILE to make a campaign resumable"))
    else:
        console.print(f"[green]no divergence[/] in {sum(j.steps for j in report.jobs):,} steps")
    return report


# --- trace --------------------------------------------------------------------
def cmd_trace(args) -> int:
    from .analysis.trace import GUEST_NAMES, trace_demand_fault
    policies = [args.policy] if args.policy else ["zap", "update"]
    for policy in policies:
        lines, by_reason = trace_demand_fault(policy, args.guest)
        total = sum(by_reason.values())
        print(f"== one demand fault, {GUEST_NAMES[args.guest]} guest, pte_write={policy!r}: "
              f"{total} VM exit{'s' if total != 1 else ''} "
              f"({', '.join(f'{n} {r}' for r, n in by_reason.items()) or 'none'})")
        print("\n".join(lines))
        print()
    return 0


# --- run / compare ------------------------------------------------------------
def _progress_runner(console, label):
    """A progress bar for long runs: returns (context manager, callback(fraction))."""
    from rich.progress import Progress
    progress = Progress(console=console, transient=True)
    task = progress.add_task(label, total=1.0)
    return progress, lambda frac: progress.update(task, completed=frac)


def _validate_run_args(args) -> None:
    from .analysis.costs import PRESETS
    from .guest import WORKLOADS
    for w in getattr(args, "workloads", None) or [getattr(args, "workload", None)]:
        if w is not None and w not in WORKLOADS:
            raise UsageError(f"unknown workload {w!r}; choose one of {', '.join(WORKLOADS)}")
    if args.costs not in PRESETS:
        raise UsageError(f"unknown cost preset {args.costs!r}; choose one of {', '.join(PRESETS)}")
    if getattr(args, "size", None) is not None and args.size <= 0:
        raise UsageError(f"--size must be a positive integer, got {args.size}")


def _console(stderr: bool = False) -> Console:
    """Tables are wide: when the output is not a terminal, do not squeeze them into 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 132)


def _plot(plot_reports, reports, path: str) -> None:
    try:
        plot_reports(reports, path)
    except OSError as e:
        raise UsageError(f"cannot write the plot to {path!r}: {e.strerror}") from None
    except ValueError as e:            # e.g. an extension matplotlib does not know
        raise UsageError(f"cannot write the plot to {path!r}: {e}") from None


def _fmt(x, digits=2):
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def cmd_run(args) -> int:
    import json
    from .analysis.report import run_report
    _validate_run_args(args)
    console = _console(args.json)
    policy = "native" if args.native else args.policy
    progress, cb = _progress_runner(console, f"{args.workload} ({args.guest}, {policy})")
    with progress:
        rep = run_report(args.workload, policy, args.guest, args.size, args.seed, args.costs, progress=cb)
    if args.plot:
        from .analysis.plots import plot_reports
        _plot(plot_reports, [rep], args.plot)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    t = Table(title=f"{args.workload} on a {args.guest} guest, policy {policy}")
    t.add_column("guest event")
    t.add_column("count", justify="right")
    for k, v in rep["guest_events"].items():
        t.add_row(k, f"{v:,}")
    console.print(t)
    e = Table(title="VM exits during the workload")
    e.add_column("reason")
    e.add_column("exits", justify="right")
    for k, v in rep["exits"]["by_reason"].items():
        if v:
            e.add_row(k, f"{v:,}")
    e.add_row("total", f"{rep['exits']['total']:,}")
    console.print(e)
    console.print(f"exits per demand fault: {_fmt(rep['exits_per_demand_fault'])} "
                  f"(typical {_fmt(rep['typical_exits_per_demand_fault'])}); per COW fault: "
                  f"{_fmt(rep['exits_per_cow_fault'])} (typical {_fmt(rep['typical_exits_per_cow_fault'])})")
    est = rep["estimate"]
    console.print(f"estimated time ({est['preset']}): shadow {est['shadow']['seconds'] * 1e3:.3f} ms, "
                  f"native {est['native']['seconds'] * 1e3:.3f} ms, slowdown {est['slowdown']:.2f}x "
                  f"(work per user access {est['work_per_access_cycles']:.0f} cycles, fitted)")
    return 0


def cmd_compare(args) -> int:
    import json
    from .analysis.report import DEFAULT_COMPARE, POLICIES, prediction, run_report
    _validate_run_args(args)
    console = _console(args.json)
    workloads = args.workloads or list(DEFAULT_COMPARE)
    guests = args.guest or ["32", "pae", "64"]
    reports = []
    progress, cb = _progress_runner(console, "compare")
    jobs = [(w, g, p) for w in workloads for g in guests for p in POLICIES]
    with progress:
        for i, (w, g, p) in enumerate(jobs):
            reports.append(run_report(w, p, g, args.size, args.seed, args.costs))
            cb((i + 1) / len(jobs))
        preds = {g: prediction(g, args.costs) for g in guests} if "kbuild" in workloads else {}
    if args.plot:
        from .analysis.plots import plot_reports
        _plot(plot_reports, reports, args.plot)
    if args.json:
        print(json.dumps({"reports": reports, "predictions": preds}, indent=2, default=str))
        return 0
    t = Table(title=f"shadow paging policies side by side (time estimate: {args.costs})")
    for col in ("workload", "guest", "policy", "exits per\ndemand fault", "exits per\nCOW fault", "exits",
                "injected/pte write/\nfixed/other", "estimated\ntime", "vs zap"):
        t.add_column(col, justify="right")
    base = {}
    last = None
    for r in reports:
        by = r["exits"]["by_reason"]
        secs = r["estimate"]["shadow"]["seconds"] if r["policy"] != "native" else r["estimate"]["native"]["seconds"]
        key = (r["workload"], r["guest"])
        if r["policy"] == "zap":
            base[key] = secs
        main3 = [by.get(k, 0) for k in ("pf_injected", "pte_write", "pf_fixed")]
        other = r["exits"]["total"] - sum(main3)
        vs = f"{(1 - secs / base[key]) * 100:+.1f}%" if key in base and r["policy"] != "zap" else ""
        native = r["policy"] == "native"

        def per(kind):
            typ, mean = r[f"typical_exits_per_{kind}_fault"], r[f"exits_per_{kind}_fault"]
            return "0" if native else ("-" if typ is None else f"{typ} ({mean:.2f})")
        if last is not None and last != key[0]:
            t.add_section()
        last = key[0]
        t.add_row(r["workload"], r["guest"], r["policy"], per("demand"), per("cow"), f"{r['exits']['total']:,}",
                  "" if native else "/".join(f"{x:,}" for x in (*main3, other)), f"{secs * 1e3:.2f} ms", vs)
    console.print(t)
    console.print("Exits per fault: the typical count (the steady state), then the mean over every fault.")
    for g, p in preds.items():
        sens = ", ".join(f"{k}: {v * 100:+.1f}%" for k, v in p["sensitivity"].items())
        console.print(f"kbuild, {g} guest: update predicted {p['predicted_update_speedup'] * 100:.1f}% faster than "
                      f"zap (the seed reports about 10%); work per user access fitted to "
                      f"{p['work_per_access']:.0f} cycles; sensitivity: {sens}")
    return 0


# --- demo ---------------------------------------------------------------------
def cmd_demo(args) -> int:
    """The main job: one demand fault told under each policy, then the comparison
    that reproduces the seed's table and its kbuild prediction."""
    cmd_trace(argparse.Namespace(policy=None, guest="64"))
    return cmd_compare(argparse.Namespace(workloads=[], guest=None, size=None, seed=0, costs="p4-2006",
                                          json=False, plot=args.plot))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadowmmu", description="x86 MMU virtualization model")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("walk", help="narrate a page walk in a raw physical memory image")
    w.add_argument("image", help="raw file of physical memory, starting at physical address 0")
    w.add_argument("address", type=_int, nargs="+", help="linear address(es) to translate")
    w.add_argument("--mode", help="32 | pae | 64 | 5-level: typical CR0/CR4/EFER for that mode")
    w.add_argument("--cr0", type=_int)
    w.add_argument("--cr3", type=_int)
    w.add_argument("--cr4", type=_int)
    w.add_argument("--efer", type=_int)
    w.add_argument("--no-nxe", action="store_true", help="with --mode: EFER.NXE=0")
    w.add_argument("--cpl", type=int, choices=(0, 3), default=0)
    w.add_argument("--access", choices=("read", "write", "fetch"), default="read")
    w.add_argument("--implicit", action="store_true", help="a supervisor implicit access (SMAP ignores AC)")
    w.add_argument("--ac", action="store_true", help="RFLAGS.AC=1")
    w.add_argument("--pkru", type=_int, default=0)
    w.add_argument("--maxphyaddr", type=int, default=52)
    w.add_argument("--memory-size", type=_int, help="physical memory size (default: the image's size)")
    w.add_argument("--set-ad", action="store_true", help="let the walk set A/D bits (default: inspect only)")
    w.set_defaults(func=cmd_walk)

    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("what", choices=("walk", "mmu", "kbuild"))
    b.add_argument("--pages", type=int, default=4000, help="mapped pages (walk) / demand faults (mmu)")
    b.add_argument("--guest", nargs="+", choices=("32", "pae", "64"), default=["64"], help="mmu/kbuild: guest formats")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("selfcheck", help="verification campaigns (QEMU differential, lockstep)")
    c.add_argument("--cases", type=int, help="random paging cases checked against QEMU's MMU")
    c.add_argument("--lockstep", action="store_true", help="native vs shadow lockstep campaign")
    c.add_argument("--steps", type=int, default=10_000, help="lockstep steps per guest format and policy")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--guest", choices=("32", "pae", "64", "la57"), help="default: all four")
    c.add_argument("--policy", choices=("zap", "update"))
    c.add_argument("--seed-bug", action="store_true", help="use the seed's update_pte access bits (U|W)")
    c.add_argument("--jobs", type=int, help="lockstep: local worker processes (default: the CPU count; 1: "
                   "in this process), or the size of the LocalCluster --engine dask starts")
    c.add_argument("--engine", choices=("local", "dask"), default="local",
                   help="lockstep: run the chunks on a local process pool (default) or on dask distributed")
    c.add_argument("--scheduler", metavar="ADDRESS", help="with --engine dask: the scheduler (tcp://host:port); "
                   "without it a LocalCluster is started")
    c.add_argument("--state", metavar="FILE", help="lockstep: record finished chunks in FILE (JSON lines); "
                   "the same command resumes from it")
    c.add_argument("--chunk-steps", type=int, help="lockstep: steps per chunk (default 20,000); chunk k uses "
                   "seed --seed + k")
    c.add_argument("--json", action="store_true", help="results as JSON on stdout (tables go to stderr)")
    c.set_defaults(func=cmd_selfcheck)

    tr = sub.add_parser("trace", help="narrate one guest event from the VM's event trace")
    tr.add_argument("what", choices=("demand",))
    tr.add_argument("--policy", choices=("zap", "update", "native"))
    tr.add_argument("--guest", choices=("32", "pae", "64"), default="64")
    tr.set_defaults(func=cmd_trace)

    r = sub.add_parser("run", help="run one workload on one MMU configuration")
    r.add_argument("workload")
    r.add_argument("--policy", choices=("zap", "update"), default="update")
    r.add_argument("--guest", choices=("32", "pae", "64"), default="64")
    r.add_argument("--native", action="store_true", help="no hypervisor: the hardware walks the guest's tables")
    r.add_argument("--size", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--costs", default="p4-2006", help="cost preset: p4-2006 | core2-2006 | modern")
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", metavar="FILE.png")
    r.set_defaults(func=cmd_run)

    cp = sub.add_parser("compare", help="native, zap and update side by side (no workloads: the main job)")
    cp.add_argument("workloads", nargs="*")
    cp.add_argument("--guest", nargs="+", choices=("32", "pae", "64"))
    cp.add_argument("--size", type=int)
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--costs", default="p4-2006")
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--plot", metavar="FILE.png")
    cp.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="the main job: a demand fault traced, then compare on the default set")
    d.add_argument("--plot", metavar="FILE.png")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .guest import GuestKernelError
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"shadowmmu: error: {e}", file=sys.stderr)
        return 2
    except GuestKernelError as e:
        print(f"shadowmmu: error: the guest kernel gave up: {e} (try a smaller --size)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `shadowmmu ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
