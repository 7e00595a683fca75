"""The ``shadowmmu`` command."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from .analysis.costs import PRESETS
from .guest.paging import GUEST_FORMATS
from .mmu.mmu import POLICIES
from .mmu.policy import POLICY_HELP, parse_policy, policy_arg
from .x86.formats import GUEST_MODES, PagingMode


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
    from .x86.builder import control_registers
    from .x86.narrate import narrate

    if not 32 <= args.maxphyaddr <= 52:
        raise UsageError(f"--maxphyaddr must be between 32 and 52, got {args.maxphyaddr}")
    try:
        with open(args.image, "rb") as f:
            image = f.read()
    except OSError as e:
        raise UsageError(f"cannot read memory image {args.image!r}: {e.strerror}") from None
    if not image:
        raise UsageError(f"memory image {args.image!r} is empty")
    size = max(4096, (len(image) + 4095) & ~4095)
    if len(image) % 4096:
        print(f"note: the image is {len(image):,} bytes, not a whole number of 4 KB frames; "
              f"its last frame is padded with zeros to {size:#x}")
    if args.memory_size:
        if args.memory_size < len(image):
            raise UsageError(f"--memory-size {args.memory_size:#x} is smaller than the image ({len(image):#x} bytes)")
        size = (args.memory_size + 4095) & ~4095
    mem = PhysicalMemory(size, maxphyaddr=args.maxphyaddr)
    mem.load_image(image)
    regs = {}
    if args.mode:
        try:
            regs = control_registers(PagingMode.parse(args.mode), args.cr3 or 0, nxe=not args.no_nxe)
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
    faulted = False
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
        faulted |= any(line.startswith(("#PF", "#GP")) for line in lines)
    return 1 if faulted else 0


# --- bench --------------------------------------------------------------------
def cmd_bench(args) -> int:
    console = _console()
    if args.pages <= 0:
        raise UsageError(f"--pages must be positive, got {args.pages}")
    if args.what == "walk":
        from .analysis.bench_walk import bench_walk
        with console.status(f"bench walk: {args.pages} pages per paging mode, then volatility3 ..."):
            rows = bench_walk(args.pages, memory=args.memory)
        t = Table(title=f"page walks per second ({args.pages} mapped 4K pages, random order, "
                        f"{args.memory} memory)")
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
        from .analysis.bench_mmu import HISTORY, POLICIES, bench_mmu
        from .analysis.report import check_policy
        try:
            policies = [check_policy(p) for p in args.policies] if args.policies else \
                list(HISTORY) if args.history else list(POLICIES)
        except ValueError as e:
            raise UsageError(f"--policies: {e}") from None
        for guest in args.guest:
            with console.status(f"bench mmu: {guest} guest, {args.pages} demand faults x 3 per policy ..."):
                rows = bench_mmu(guest, args.pages, policies=policies)
            t = Table(title=f"MMU, {guest} guest: {args.pages} demand faults (median of 3 runs), "
                            "then warm accesses (Python speed of the model, not of the policy on hardware)",
                      caption="exits/fault: every VM exit of the run (the guest's page-table set-up included) "
                              "over its demand faults; by reason: i injected #PF, w pte write, f hidden #PF, "
                              "l INVLPG, e EPT violation, o other")
            for col in ("policy", "demand faults/s", "exits/fault", "by reason", "warm TLB-hit accesses/s",
                        "warm TLB-miss accesses/s"):
                t.add_column(col, justify="right")
            for r in rows:
                by = r["exits_by_reason"] or {}
                order = [k for k, _ in REASON_CODES]
                cells = [f"{by[k]:,}{c}" for k, c in REASON_CODES if by.get(k)]
                other = sum(n for k, n in by.items() if k not in order)
                label = _policy_label(r)
                t.add_row(label, f"{r['demand_faults_per_s']:,.0f}", f"{r['exits_per_fault']:.2f}",
                          " ".join(cells + ([f"{other:,}o"] if other else [])) or "-",
                          f"{r['tlb_hit_per_s']:,.0f}", f"{r['tlb_miss_per_s']:,.0f}")
            console.print(t)
        return 0
    if args.what == "kbuild":
        from .analysis.report import make_vm
        from .analysis.run import run_workload
        t = Table(title="default kbuild: simulated guest accesses per second (boot excluded)",
                  caption="accesses: every guest load/store, counting each element of the kernel's REP STOS/MOVS "
                          "page clears and copies (done a page at a time after the first element); user "
                          "accesses are each simulated one by one")
        for col in ("guest", "policy", "accesses", "user accesses", "seconds", "accesses/s", "user accesses/s"):
            t.add_column(col, justify="right")
        for guest in args.guest:
            for policy in ("native", "zap", "update"):
                with console.status(f"bench kbuild: {guest} guest, {policy} ..."):
                    r = run_workload(make_vm(policy, "kbuild", guest=guest), "kbuild", guest=guest)
                ev = r["guest_events"]
                t.add_row(guest, policy, f"{r['accesses']:,}", f"{ev['user_accesses']:,}", f"{r['seconds']:.2f}",
                          f"{r['accesses'] / r['seconds']:,.0f}", f"{ev['user_accesses'] / r['seconds']:,.0f}")
        console.print(t)
        return 0
    if args.what == "ram":
        from .analysis.bench_ram import bench_ram
        if any(mb <= 0 or mb > 65536 for mb in args.sizes):
            raise UsageError("--sizes are guest RAM sizes in MB, from 1 to 65536 (64 GiB)")
        if args.touch <= 0:
            raise UsageError(f"--touch must be positive, got {args.touch}")
        t = Table(title=f"64-bit guest, update policy, {args.frames} frames: boot, then one process writes "
                        f"{args.touch:,} fresh pages (each guest in its own process)",
                  caption="peak RSS: the whole Python process (the interpreter and shadowmmu alone take about "
                          "20 MB); host frames: 4 KB frames of guest RAM and shadow pages actually allocated")
        for col in ("guest RAM", "boot", "host frames after boot", "peak RSS after boot", "run", "host frames",
                    "peak RSS"):
            t.add_column(col, justify="right")
        with console.status(f"bench ram: {len(args.sizes)} guest sizes, one process each ..."):
            results = list(bench_ram(args.sizes, args.frames, args.touch))
        for r in results:
            size = f"{r['ram_mb'] // 1024} GB" if r["ram_mb"] >= 1024 else f"{r['ram_mb']} MB"
            if "error" in r:
                t.add_row(size, r["error"], "", "", "", "", "")
                continue
            t.add_row(size, f"{r['boot_seconds']:.2f} s", f"{r['boot_host_frames']:,}",
                      f"{r['boot_peak_rss_mb']:.0f} MB", f"{r['run_seconds']:.2f} s", f"{r['host_frames']:,}",
                      f"{r['peak_rss_mb']:.0f} MB")
        console.print(t)
        return 0
    if args.what == "boot":
        return _bench_boot(args, console)
    raise UsageError(f"unknown benchmark {args.what!r}")


def _bench_boot(args, console) -> int:
    from pathlib import Path
    from .analysis.bench_boot import bench_boot
    kernels = Path(args.kernels)
    missing = [f"mm-{f}.elf" for f in args.guest if not (kernels / f"mm-{f}.elf").exists()]
    if missing:
        raise UsageError(f"{kernels}: no {', '.join(missing)}: build the kernels first (make kernels)")
    with console.status("bench boot ...") as status:
        rows = bench_boot(kernels, formats=args.guest, repeat=args.repeat,
                          progress=lambda text: status.update(f"bench boot: {text}"))
    t = Table(title="the mm kernel on the real vCPU (unicorn 2.1.4): best of "
                    f"{args.repeat} runs each, instructions counted once natively",
              caption="insns/s: guest instructions / wall time; between exits: with the Python time of the #PF "
                      "exits taken out; µs per exit: Python time from the exit to the resume (an emulated "
                      "store's includes its single step)")
    for col in ("program", "format", "mode", "seconds", "guest insns", "insns/s", "vs native", "between exits",
                "VM exits", "exits/s", "µs per exit by reason"):
        t.add_column(col, justify="right")
    native = {}
    for r in rows:
        key = (r["program"], r["format"])
        if r["mode"] == "native":
            native[key] = r["insns_per_s"]
        per = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["us_per_exit"].items()))
        t.add_row(r["program"], r["format"], r["mode"], f"{r['seconds']:.3f}", f"{r['instructions']:,}",
                  f"{r['insns_per_s'] / 1e6:.2f} M", f"{r['insns_per_s'] / native[key]:.0%}",
                  "" if r["mode"] == "native" else f"{r['insns_per_s_between_exits'] / 1e6:.2f} M",
                  f"{r['exits']:,}", "" if r["mode"] == "native" else f"{r['exits_per_s']:,.0f}", per)
    console.print(t)
    return 0


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
            from .verify.differential import selfcheck
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
    from .verify import campaigns
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
    from .verify import campaigns
    from .verify.lockstep import GUESTS

    class StepsPerSecond(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} steps/s" if task.speed else "- steps/s")

    chunk_steps = args.chunk_steps if args.chunk_steps is not None else campaigns.DEFAULT_CHUNK_STEPS
    if chunk_steps <= 0:
        raise UsageError(f"--chunk-steps must be positive, got {chunk_steps}")
    options = {"seed_bug": True} if args.seed_bug else {}
    params = campaigns.Params(tuple([args.guest] if args.guest else GUESTS),
                              tuple([args.policy] if args.policy else POLICIES),
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
    from .analysis.trace import trace_demand_fault
    policies = [args.policy] if args.policy else list(POLICIES)
    for policy in policies:
        lines, by_reason = trace_demand_fault(policy, args.guest)
        total = sum(by_reason.values())
        print(f"== one demand fault, {PagingMode.parse(args.guest).label} guest, pte_write={policy!r}: "
              f"{total} VM exit{'s' if total != 1 else ''} "
              f"({', '.join(f'{n} {r}' for r, n in by_reason.items()) or 'none'})")
        print("\n".join(lines))
        print()
    return 0


# --- run / compare ------------------------------------------------------------
def _progress_runner(console, label):
    """A progress bar for long runs: returns (context manager, callback(fraction[, phase]));
    a phase (e.g. the boot) is shown beside the label until the callback says None."""
    from rich.progress import Progress
    progress = Progress(console=console, transient=True)
    task = progress.add_task(label, total=1.0)
    phase_now = [None]

    def update(frac, *phase):
        if phase and phase[0] != phase_now[0]:
            phase_now[0] = phase[0]
            progress.update(task, description=label if phase[0] is None else f"{label}: {phase[0]}")
        progress.update(task, completed=frac)
    return progress, update


PLOT_FORMATS = (".png", ".pdf", ".svg")


def _check_plot_path(path) -> str | None:
    """Refuse a --plot path that cannot be written *before* the run (absolute path, or None)."""
    import os
    if not path:
        return None
    if os.path.isdir(path):
        raise UsageError(f"--plot {path!r} is a directory; give a file name ending in "
                         f"{' or '.join(PLOT_FORMATS)}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PLOT_FORMATS:
        raise UsageError(f"--plot {path!r}: the file name must end in {', '.join(PLOT_FORMATS)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write the plot to {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write the plot to {path!r}: permission denied")
    return os.path.abspath(path)


def _validate_run_args(args) -> None:
    """Everything a run needs, checked before anything boots."""
    from .analysis.report import check_args
    if getattr(args, "size", None) is not None and args.size <= 0:
        raise UsageError(f"--size must be a positive integer, got {args.size}")
    workloads = getattr(args, "workloads", None) or [getattr(args, "workload", None)]
    guests = getattr(args, "guest", None)
    guests = [guests] if isinstance(guests, str) else (guests or list(GUEST_FORMATS))
    for w in workloads:
        if w is None:
            continue
        for g in guests:
            for fr in _frames_of(args, w):
                try:
                    check_args(w, g, args.size, fr, args.pae_stores)
                except ValueError as e:
                    raise UsageError(str(e)) from None
    args.plot = _check_plot_path(getattr(args, "plot", None))


def _frames_of(args, workload: str) -> list[str]:
    """compare: demand both warm and cold unless --frames says which; others warm."""
    frames = getattr(args, "frames", None)
    if isinstance(frames, str):
        return [frames]
    if frames:
        return list(frames)
    return ["warm", "cold"] if workload == "demand" else ["warm"]


def _console(stderr: bool = False) -> Console:
    """Tables are wide: when the output is not a terminal, do not squeeze them into 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 140)


def _plot(plot_fn, data, path: str) -> None:
    try:
        plot_fn(data, path)
    except OSError as e:
        raise UsageError(f"cannot write the plot to {path!r}: {e.strerror}") from None
    except ValueError as e:            # e.g. an extension matplotlib does not know
        raise UsageError(f"cannot write the plot to {path!r}: {e}") from None
    print(f"figure written to {path}", file=sys.stderr)


def _fmt(x, digits=2):
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _other_text(pf: dict) -> str:
    return "-" if not pf["other_faults"] else f"{pf['other']:.2f} ×{pf['other_faults']}"


def _paging_text(policy: str) -> str:
    return "two-dimensional paging (tdp: EPT)" if policy == "tdp" else "shadow paging, policy " + policy


def cmd_run(args) -> int:
    import json
    from .analysis.report import guest_label, run_report, steady_text
    _validate_run_args(args)
    console = _console(args.json)
    policy = "native" if args.native else args.policy
    progress, cb = _progress_runner(console, f"{args.workload} ({args.guest}, {policy})")
    with progress:
        rep = run_report(args.workload, policy, args.guest, args.size, args.seed, args.costs, progress=cb,
                         frames=args.frames, pae_stores=args.pae_stores)
    if args.plot:
        from .analysis.plots import plot_reports
        _plot(plot_reports, [rep], args.plot)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    native = policy == "native"
    t = Table(title=f"{args.workload} (size {rep['size']}) on a {guest_label(args.guest, args.pae_stores)} guest, "
                    f"{'native paging' if native else _paging_text(policy)}, {args.frames} frames")
    t.add_column("guest event")
    t.add_column("count", justify="right")
    for k, v in rep["guest_events"].items():
        t.add_row(k, f"{v:,}")
    console.print(t)
    est = rep["estimate"]
    if native:
        console.print("no hypervisor: no VM exits")
        console.print(f"estimated time ({est['preset']}): native {est['native']['seconds'] * 1e3:.3f} ms "
                      f"(work per user access {est['work_per_access_cycles']:.0f} cycles, fitted to 484 s / 265 s)")
        return 0
    e = Table(title="VM exits during the workload (boot excluded)")
    e.add_column("reason")
    e.add_column("VM exits", justify="right")
    for k, v in (rep["exits"]["by_reason"] or {}).items():
        e.add_row(k, f"{v:,}")
    e.add_row("total", f"{rep['exits']['total']:,}")
    console.print(e)
    for kind in ("demand", "cow"):
        pf = rep["exits_per_fault"][kind]
        if pf["mean"] is None:
            console.print(f"no {kind} faults")
            continue
        console.print(f"VM exits per {kind} fault: {steady_text(pf)} over {pf['steady_faults']:,} steady faults "
                      f"(table existed{'' if policy == 'tdp' else ', stayed shadowed'}); {_other_text(pf)} other; "
                      f"mean {_fmt(pf['mean'])}")
    tdp = rep.get("tdp")
    if tdp:
        console.print(f"2-D walks (boot excluded): {tdp['tlb_misses']:,} TLB misses, {tdp['walk_refs']:,} guest + EPT "
                      f"entries read; {_fmt(tdp['refs_per_miss'])} per complete walk (n*m + n + m, n guest levels, "
                      f"m = 4 EPT levels, no paging-structure caches); {tdp['ept_violations']:,} EPT violations, "
                      f"{tdp['ept_zaps']:,} EPT zaps, {tdp['ept_pages']:,} EPT pages at the end")
    console.print(f"estimated time ({est['preset']}): shadow {est['shadow']['seconds'] * 1e3:.3f} ms, "
                  f"native {est['native']['seconds'] * 1e3:.3f} ms, slowdown {est['slowdown']:.2f}x "
                  f"(work per user access {est['work_per_access_cycles']:.0f} cycles, fitted to 484 s / 265 s)")
    return 0


def prediction_lines(p: dict) -> list[str]:
    """The kbuild prediction as printed under the compare table."""
    from .analysis.costs import CR_WORK
    from .analysis.report import guest_label
    at = "" if p["size"] is None and p["seed"] == 0 else f" (size {p['size'] or 'default'}, seed {p['seed']})"
    s = p["sensitivity"]
    head = (f"kbuild{at}, {guest_label(p['guest'], p['pae_stores'] or 'halves')} guest, {p['frames']} frames: "
            f"update predicted {p['predicted_update_speedup'] * 100:.1f}% faster than zap (the seed reports about 10%).")
    if p["x_ratio"] == 1:
        return [head, "  update removes no exit here (X_update = X_zap): every pte store is two 4-byte halves and "
                      "update_pte acts on whole-pte writes only."]

    def pct(v):
        return f"{v * 100:+.1f}%"
    crs = [(k.rsplit("_", 1)[1], v) for k, v in s.items() if k.startswith("cr_invlpg")]
    frames = [(k.split("_", 1)[1], v) for k, v in s.items() if k.startswith("frames_")]
    presets = [(k[7:], v) for k, v in s.items() if k.startswith("preset_")]
    return [
        head,
        f"  = (1 - X_update/X_zap) x 219/484 = (1 - {p['x_ratio']:.3f}) x 0.452 (X: exit cycles, {p['preset']} "
        "prices): an identity,",
        f"    the fitted work per access ({p['work_per_access']:.0f} cycles) cancels out"
        + (" (exactly on the default kbuild, where it is fitted)." if at else "."),
        "  Sensitivity to the exit mix: kernel-side exits update does not remove, 25% / 50% of zap's exit cycles: "
        f"{pct(s['kernel_side_25pct'])} / {pct(s['kernel_side_50pct'])};",
        "    " + "; ".join(f"{f} frames: {pct(v)}" for f, v in frames)
        + f"; CR3/INVLPG exits at round trip {' / '.join('+' + c for c, _ in crs)} cycles (assumed +{CR_WORK}): "
        + " / ".join(pct(v) for _, v in crs) + ";",
        "    " + "; ".join(f"preset {n}: {pct(v)}" for n, v in presets),
    ]


def compare_policies(args) -> list[tuple[str, int | None]]:
    """(policy, TLB entries) of every run per workload and guest: the default three, or
    --policies, or --history; tdp runs twice, at the model's TLB reach and a real one
    (a modelling choice that changes its figure: both values are shown)."""
    from .analysis.costs import MODEL_TLB_ENTRIES, REAL_TLB_ENTRIES
    from .analysis.report import HISTORY, POLICIES, check_policy, is_tdp
    if getattr(args, "policies", None):
        try:
            names = [check_policy(p) for p in args.policies]
        except ValueError as e:
            raise UsageError(f"--policies: {e}") from None
    elif getattr(args, "history", False):
        names = [check_policy(p) for p in HISTORY]
    else:
        names = [*POLICIES, "update+prefetch"] if getattr(args, "prefetch", False) else list(POLICIES)
    if getattr(args, "policies", None) and getattr(args, "prefetch", False) and "update+prefetch" not in names:
        names.append("update+prefetch")
    out = []
    for p in dict.fromkeys(names):
        if is_tdp(p):
            out += [(p, MODEL_TLB_ENTRIES), (p, REAL_TLB_ENTRIES)]
        else:
            out.append((p, None))
    return out


def compare_data(args, progress_cb=None) -> dict:
    """The reports and predictions of ``compare`` (also what --json prints)."""
    from .analysis.report import SCHEMA, prediction, run_report
    from .guest.user import MemoryCheckError
    from .vm.vcpu import GuestCrash
    workloads = args.workloads
    guests = args.guest
    policies = compare_policies(args)
    history = getattr(args, "history", False)
    jobs = [(w, fr, g, p) for w in workloads for fr in _frames_of(args, w) for g in guests for p in policies]
    extra = (len(guests) if "kbuild" in workloads else 0) + (1 if history else 0)
    reports = []
    many = bool(getattr(args, "policies", None)) or history
    for i, (w, fr, g, (p, tlb)) in enumerate(jobs):
        try:
            reports.append(run_report(w, p, g, args.size, args.seed, args.costs, frames=fr,
                                      pae_stores=args.pae_stores, tlb_entries=tlb))
        except (MemoryCheckError, GuestCrash) as e:
            if not many:
                raise
            # a policy whose run fails (the guest read back the wrong data, or crashed) is a row
            # that says so: the other policies' rows still stand
            reports.append({"workload": w, "policy": p, "guest": g, "frames": fr, "tlb_entries": tlb,
                            "error": f"{type(e).__name__}: {e}"})
        if progress_cb:
            progress_cb((i + 1) / (len(jobs) + extra))
    preds = []
    if "kbuild" in workloads:
        for j, g in enumerate(guests):
            preds.append(prediction(g, args.costs, args.size, args.seed, frames=_frames_of(args, "kbuild")[0],
                                    pae_stores=args.pae_stores))
            if progress_cb:
                progress_cb((len(jobs) + j + 1) / (len(jobs) + extra))
    data = {"schema": SCHEMA, "preset": args.costs, "reports": reports, "predictions": preds or None}
    if history:
        from .analysis.history import history_predictions
        data["history"] = history_predictions(args.costs, args.size, args.seed)
        if progress_cb:
            progress_cb(1.0)
    return data


def cmd_boot(args) -> int:
    """Boot a multiboot kernel on the real vCPU (unicorn) over the shadow MMU or natively."""
    import json
    import sys
    from .vm.multiboot import MultibootError
    try:
        with open(args.kernel, "rb") as f:
            image = f.read()
    except OSError as e:
        print(f"shadowmmu boot: cannot read kernel {args.kernel!r}: {e.strerror}", file=sys.stderr)
        return 2
    if not 2 <= args.ram <= 3584:
        print(f"shadowmmu boot: --ram {args.ram} MiB: give 2 to 3584 MiB (RAM lies below the 3.5 GiB PCI hole)",
              file=sys.stderr)
        return 2
    from .vm.machine import TDP_UNSUPPORTED, Machine
    if not args.native and args.policy == "tdp":
        raise UsageError(TDP_UNSUPPORTED)
    cmdline = " ".join([args.kernel, *args.args])
    out = sys.stdout if not args.json else None
    sink = (lambda b: (out.write(chr(b)), out.flush())) if out is not None else None
    try:
        machine = Machine(image, cmdline, native=args.native, policy=args.policy, ram_mib=args.ram,
                          trace=args.trace, serial_sink=sink, seed_access_bug=args.update_pte_bug)
    except MultibootError as e:
        print(f"shadowmmu boot: {args.kernel}: {e}", file=sys.stderr)
        return 2
    if args.count_instructions:
        machine.cpu.count_instructions()
    result = machine.run(timeout=args.timeout)
    if args.log:
        with open(args.log, "wb") as f:
            f.write(result.serial)
    status = result.status if result.status is not None else 2
    if args.json:
        print(json.dumps(boot_report(result), indent=2))
        return status & 0xFF
    console = _console(False)
    if result.trace:
        console.print("\n".join(result.trace), markup=False, highlight=False)
    console.print(boot_table(result))
    line = f"stopped: {result.stop_reason}"
    if result.status is None:
        console.print(f"[red]{line}[/red] (no isa-debug-exit status: exit status 2)", highlight=False)
    else:
        console.print(f"{line}; exit status {result.status} (QEMU's (value << 1) | 1)", markup=False,
                      highlight=False)
    return status & 0xFF


def boot_report(result) -> dict:
    from .vm.delivery import VECTOR_NAMES
    return {"mode": result.mode, "serial": result.serial.decode("latin-1"), "status": result.status,
            "stop_reason": result.stop_reason, "exits": result.exits, "total_exits": result.total_exits,
            "deliveries": {VECTOR_NAMES.get(v, f"int {v:#x}"): n for v, n in sorted(result.deliveries.items())},
            "memory_sha256": result.memory_sha256, "seconds": result.seconds, "mmu_stats": result.mmu_stats,
            "instructions": result.instructions}


def boot_table(result) -> Table:
    from .vm.delivery import VECTOR_NAMES
    native = result.mode == "native"
    t = Table(title=f"boot on the real vCPU ({'native paging: no hypervisor' if native else 'shadow paging, policy ' + result.mode}), "
                    f"{result.seconds:.2f} s")
    t.add_column("VM exits by reason" if not native else "event")
    t.add_column("count", justify="right")
    if not native:
        for k, v in result.exits.items():
            t.add_row(k, f"{v:,}")
        t.add_row("total VM exits", f"{result.total_exits:,}")
    for v, n in sorted(result.deliveries.items()):
        t.add_row(f"delivered in software: {VECTOR_NAMES.get(v, f'INT {v:#x}')}", f"{n:,}")
    t.add_row("guest instructions", "not counted (--count-instructions)" if result.instructions is None
              else f"{result.instructions:,}")
    t.add_row("guest RAM sha256", result.memory_sha256[:16])
    return t


def cmd_compare(args) -> int:
    import json
    from .analysis.report import DEFAULT_COMPARE, guest_label, steady_text
    args.workloads = args.workloads or list(DEFAULT_COMPARE)
    args.guest = args.guest or list(GUEST_FORMATS)
    _validate_run_args(args)
    console = _console(args.json)
    progress, cb = _progress_runner(console, "compare")
    with progress:
        data = compare_data(args, cb)
    if args.plot:
        from .analysis.plots import plot_compare
        _plot(plot_compare, {**data, "reports": [r for r in data["reports"] if "error" not in r]}, args.plot)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if getattr(args, "policies", None) or getattr(args, "history", False):
        _policies_table(data, args, console)
        if args.real:
            _compare_real(args, console)
        return 0
    t = Table(title=f"shadow paging policies side by side (time estimate: {args.costs})")
    for col in ("workload", "guest", "policy", "demand fault\nVM exits:\nsteady", "other\nfaults", "COW fault\n"
                "VM exits:\nsteady", "other\nfaults", "VM exits", "injected/pte write/\nfixed/other",
                "estimated\ntime", "vs zap"):
        t.add_column(col, justify="right")
    base = {}
    last = None
    for r in data["reports"]:
        by = r["exits"]["by_reason"] or {}
        native = r["policy"] == "native"
        secs = r["estimate"]["native" if native else "shadow"]["seconds"]
        wl = r["workload"] + (", cold" if r["frames"] == "cold" else "")
        key = (wl, r["guest"])
        if r["policy"] == "zap":
            base[key] = secs
        main3 = [by.get(k, 0) for k in ("pf_injected", "pte_write", "pf_fixed")]
        other = r["exits"]["total"] - sum(main3)
        vs = f"{(1 - secs / base[key]) * 100:+.1f}%" if key in base and r["policy"] not in ("zap", "native") else ""
        pf = r["exits_per_fault"]
        cells = []
        for kind in ("demand", "cow"):
            cells += ["0", ""] if native else [steady_text(pf[kind]), _other_text(pf[kind])]
        if last is not None and last != wl:
            t.add_section()
        last = wl
        t.add_row(wl, guest_label(r["guest"], args.pae_stores), r["policy"], *cells,
                  "" if native else f"{r['exits']['total']:,}",
                  "" if native else "/".join(f"{x:,}" for x in (*main3, other)), f"{secs * 1e3:.2f} ms", vs)
    console.print(t)
    for line in COMPARE_KEY:
        console.print(line, highlight=False)
    for p in data["predictions"] or []:
        for line in prediction_lines(p):
            console.print(line, highlight=False)
    if args.real:
        _compare_real(args, console)
    return 0


REASON_CODES = (("pf_injected", "i"), ("pte_write", "w"), ("pf_fixed", "f"), ("invlpg", "l"),
                ("ept_violation", "e"))


def _by_reason_text(pf: dict) -> str:
    """A steady fault's exits by reason: "3 = i+w+f"; means when they differ ("2.02 = i+w+1.02f")."""
    from .analysis.report import steady_text
    total = steady_text(pf)
    by = pf["steady_by_reason"]
    if pf["steady"] is None or not by:
        return total
    codes = dict(REASON_CODES)
    parts = []
    for r, n in sorted(by.items(), key=lambda kv: [c for c, _ in REASON_CODES].index(kv[0])
                       if kv[0] in codes else 99):
        code = codes.get(r, "o")
        k = round(n, 2)
        if k:                                   # a reason in fewer than 1 in 200 faults rounds away
            parts.append(code if k == 1 else f"{k:g}{code}")
    return f"{total} = " + "+".join(parts)


def _policy_label(r: dict) -> str:
    if r["policy"] == "native":
        return "native"
    spec = parse_policy(r["policy"])
    return f"tdp, TLB {r['tlb_entries']:,}" if spec.tdp and r.get("tlb_entries") else spec.label


def _policies_table(data: dict, args, console) -> None:
    """compare --policies / --history: every policy's exits per fault by reason, its exits by
    reason, what else the cost model prices (resync work, 2-D walks) and the estimated time."""
    from .analysis.report import guest_label
    if not sys.stdout.isatty():
        console = Console(width=200)           # a wide table: do not squeeze it when piped
    t = Table(title=f"MMU policies side by side: the seed and what KVM did after it (time estimate: {args.costs})")
    for col in ("workload", "guest", "policy", "demand fault\nVM exits:\nsteady", "other\nfaults",
                "COW fault\nVM exits:\nsteady", "VM exits", "by reason:\ni/w/f/l/e/o",
                "resynced\nptes", "2-D walk\nrefs", "estimated\ntime", "vs zap", "vs update"):
        t.add_column(col, justify="right")
    base: dict = {}
    for r in data["reports"]:
        if r["policy"] in ("zap", "update") and "error" not in r:
            wl = r["workload"] + (", cold" if r["frames"] == "cold" else "")
            base[(wl, r["guest"], r["policy"])] = r["estimate"]["shadow"]["seconds"]
    last = None
    for r in data["reports"]:
        wl = r["workload"] + (", cold" if r["frames"] == "cold" else "")
        if last is not None and last != wl:
            t.add_section()
        last = wl
        if "error" in r:
            t.add_row(wl, guest_label(r["guest"], args.pae_stores), _policy_label(r),
                      "[red]run failed[/red]", "", "", "", r["error"][:60], "", "", "", "", "")
            continue
        by = r["exits"]["by_reason"] or {}
        native = r["policy"] == "native"
        secs = r["estimate"]["native" if native else "shadow"]["seconds"]
        main = [by.get(k, 0) for k, _ in REASON_CODES]
        other = r["exits"]["total"] - sum(main)
        pc = r["priced_counts"]
        pf = r["exits_per_fault"]

        def vs(pol):
            b = base.get((wl, r["guest"], pol))
            return "" if b is None or native or r["policy"] == pol else f"{(1 - secs / b) * 100:+.1f}%"
        walks = pc["tlb_misses"] and f"{pc['extra_walk_refs']:,} ({pc['tlb_misses']:,} misses)"
        t.add_row(wl, guest_label(r["guest"], args.pae_stores), _policy_label(r),
                  "0" if native else _by_reason_text(pf["demand"]), "" if native else _other_text(pf["demand"]),
                  "0" if native else _by_reason_text(pf["cow"]),
                  "" if native else f"{r['exits']['total']:,}",
                  "" if native else "/".join(f"{x:,}" for x in (*main, other)),
                  f"{pc['resynced_ptes']:,}" if pc["resynced_ptes"] else "",
                  walks or "", f"{secs * 1e3:.2f} ms", vs("zap"), vs("update"))
    console.print(t)
    for line in POLICIES_KEY:
        console.print(line, highlight=False)
    if data.get("history"):
        h = Table(title="predicted by the model vs published (no refit: the work per access is fitted once, "
                        "on kbuild under zap, to 484 s / 265 s)")
        for col in ("", "figure", "model", "published", "source"):
            h.add_column(col)
        for i, row in enumerate(data["history"], 1):
            h.add_row(str(i), row["quantity"], row["model_text"], row["published"], row["source"])
        console.print(h)
        for i, row in enumerate(data["history"], 1):
            line = f"[{i}] rests on: {row['rests_on']}"
            if row["why"]:
                line += f"; why it may differ: {row['why']}"
            if row["sensitivity_text"]:
                line += f"; sensitivity: {row['sensitivity_text']}"
            console.print(line, highlight=False, markup=False)


POLICIES_KEY = (
    "Steady faults' VM exits by reason: i injected #PF, w emulated pte write, f hidden #PF (shadow fixed), "
    "l INVLPG, e EPT violation, o other;",
    "  a bypassed guest fault (+bypass; every guest fault under tdp) is no exit: it costs a native guest #PF.",
    "resynced ptes: guest ptes re-read by out-of-sync resyncs (priced per pte, an ASSUMPTION, docs/sources.md);",
    "2-D walk refs: references the tdp MMU's walks read beyond a native walk's n per TLB miss (a full 2-D walk: n*m+m "
    "more, m=4),",
    "  priced per reference (an ASSUMPTION); tdp runs at the model's TLB reach and at a real STLB's (both shown).",
)


def _compare_real(args, console) -> None:
    """The model's steady exits per fault next to the mm kernel's on the real vCPU."""
    from pathlib import Path
    from .analysis.real_compare import compare_real
    from .analysis.report import guest_label
    kernels = Path(args.kernels)
    if not (kernels / "mm-64.elf").exists():
        raise UsageError(f"{kernels}: no built mm kernel: build the kernels first (make kernels)")
    with console.status("compare --real ...") as status:
        frames = args.frames or ["warm", "cold"]
        rows = compare_real(kernels, args.workloads, args.guest, args.pae_stores, frames,
                            progress=lambda text: status.update(f"compare --real: {text}"))
    t = Table(title="VM exits per steady fault: the Python model and real x86 code (the mm kernel on unicorn), "
                    "same MMU",
              caption="steady: the fault's page table existed and stayed shadowed, no shadow page made or zapped "
                      "meanwhile; (n): how many such faults. Warm: boot zeroed every frame; cold: the kernel's "
                      "first touch of a fresh frame takes one hidden #PF. The mm kernel never recycles a frame in "
                      "these runs, the model's allocator does: cold means can differ, warm ones must not.")
    for col in ("workload", "frames", "guest", "policy", "demand: model", "demand: real", "COW: model",
                "COW: real", "real kernel"):
        t.add_column(col, justify="right")
    for r in rows:
        cells = []
        for kind in ("demand", "cow"):
            k = r[kind]
            cells += [f"{k['model']} ({k['model_faults']})", f"{k['real']} ({k['real_faults']})"]
        t.add_row(r["workload"], r["frames"], guest_label(r["guest"], args.pae_stores), r["policy"], *cells,
                  r["kernel"])
    console.print(t)


COMPARE_KEY = (
    "Steady: VM exits per fault whose page table existed and stayed shadowed, no shadow page made or zapped meanwhile",
    "  (an integer when all cost the same, else their mean). Other faults: mean VM exits x number of all the others",
    "  (a new page table, a table not shadowed -- a child's after fork, or flooded --, a new shadow page).",
    "Frames warm: boot zeroed all RAM, so the direct map is already shadowed; cold: each frame first touched when "
    "allocated.",
    "pae: i386 Linux's set_pte, two 4-byte stores per pte; pae8 (--pae-stores whole): one 8-byte store.",
)


# --- demo ---------------------------------------------------------------------
def cmd_demo(args) -> int:
    """The main job: one demand fault told under each policy, then the comparison
    that reproduces the seed's table and its kbuild prediction."""
    plot = _check_plot_path(args.plot)             # before the trace, so a bad path costs nothing
    cmd_trace(argparse.Namespace(policy=None, guest="64"))
    return cmd_compare(argparse.Namespace(workloads=[], guest=None, size=None, seed=0, costs="p4-2006",
                                          json=False, plot=plot, frames=None, pae_stores="halves", real=False,
                                          prefetch=False, policies=None, history=False))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="shadowmmu", description="x86 MMU virtualization model: KVM's 2007 shadow "
                                "MMU, the paging hardware it virtualizes, guests and cost models")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("walk", help="narrate a page walk in a raw physical memory image",
                       description="Narrate the walk of each address: every entry read, then the physical "
                       "address and rights, or the #PF with its error code and the rule that faulted. Exit "
                       "status: 0 when every address translated, 1 when one faulted (#PF or #GP), 2 for bad "
                       "arguments or an unreadable image.")
    w.add_argument("image", help="raw file of physical memory, starting at physical address 0")
    w.add_argument("address", type=_int, nargs="+", help="linear address(es) to translate")
    w.add_argument("--mode", help="32 | pae | 64 | 5-level: typical CR0/CR4/EFER for that mode")
    w.add_argument("--cr0", type=_int, help="CR0 value (overrides --mode's)")
    w.add_argument("--cr3", type=_int, help="CR3: physical address of the root table (with --mode or alone)")
    w.add_argument("--cr4", type=_int, help="CR4 value (overrides --mode's)")
    w.add_argument("--efer", type=_int, help="IA32_EFER value (overrides --mode's)")
    w.add_argument("--no-nxe", action="store_true", help="with --mode: EFER.NXE=0")
    w.add_argument("--cpl", type=int, choices=(0, 3), default=0, help="privilege level of the access (default: 0)")
    w.add_argument("--access", choices=("read", "write", "fetch"), default="read",
                   help="kind of access (default: read)")
    w.add_argument("--implicit", action="store_true", help="a supervisor implicit access (SMAP ignores AC)")
    w.add_argument("--ac", action="store_true", help="RFLAGS.AC=1")
    w.add_argument("--pkru", type=_int, default=0, help="PKRU register, for protection keys (default: 0)")
    w.add_argument("--maxphyaddr", type=int, default=52,
                   help="physical address width: higher entry address bits are reserved (default: 52)")
    w.add_argument("--memory-size", type=_int, help="physical memory size (default: the image's size)")
    w.add_argument("--set-ad", action="store_true", help="let the walk set A/D bits (default: inspect only)")
    w.set_defaults(func=cmd_walk)

    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("what", choices=("walk", "mmu", "kbuild", "ram", "boot"),
                   help="walk: page walks/s; mmu: demand faults/s per policy; kbuild: simulated accesses/s; ram: "
                        "boot time and peak RSS against guest RAM size; boot: the real vCPU on the mm kernel")
    b.add_argument("--pages", type=int, default=4000, help="mapped pages (walk) / demand faults (mmu)")
    b.add_argument("--guest", nargs="+", choices=GUEST_FORMATS, default=["64"], help="mmu/kbuild: guest formats")
    b.add_argument("--sizes", type=int, nargs="+", default=[64, 1024, 8192, 65536],
                   help="ram: guest RAM sizes in MB (default: 64 1024 8192 65536)")
    b.add_argument("--frames", choices=("warm", "cold"), default="cold",
                   help="ram: cold (frames cleared when allocated, the default) or warm (boot zeroes all RAM)")
    b.add_argument("--touch", type=int, default=4096, help="ram: pages the workload writes after boot")
    b.add_argument("--memory", choices=("dict", "mmap"), default="dict",
                   help="walk: physical memory backend, a bytearray per frame (dict, the default) or one "
                        "anonymous mapping (mmap)")
    b.add_argument("--kernels", default="kernels/build", help="boot: the folder of the built mm-FMT.elf kernels")
    b.add_argument("--repeat", type=int, default=3, help="boot: timed runs per mode (the best is reported)")
    b.add_argument("--policies", nargs="+", metavar="POLICY",
                   help="mmu: the policies to bench (default: native zap update): zap|update[+bypass][+unsync]"
                        "[+prefetch[N]], modern, tdp, native")
    b.add_argument("--history", action="store_true",
                   help="mmu: bench the historical sequence (native, zap, update, +bypass, +unsync, modern, tdp) "
                        "as far as this build runs it")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("selfcheck", help="verification campaigns (QEMU differential, lockstep)")
    c.add_argument("--cases", type=int, help="random paging cases checked against QEMU's MMU")
    c.add_argument("--lockstep", action="store_true", help="native vs shadow lockstep campaign")
    c.add_argument("--steps", type=int, default=10_000, help="lockstep steps per guest format and policy")
    c.add_argument("--seed", type=int, default=0, help="random seed of the programs or cases (default: 0); "
                   "not to be confused with 'the seed', the 2007 KVM commit this project models")
    c.add_argument("--guest", choices=GUEST_MODES, help="guest paging format (default: all four)")
    c.add_argument("--policy", type=policy_arg, metavar="POLICY",
                   help=f"MMU policy (default: zap and update): {POLICY_HELP}")
    c.add_argument("--update-pte-bug", "--seed-bug", dest="seed_bug", action="store_true",
                   help="restore the seed commit's update_pte rights bug (U|W whatever the upper levels allow); "
                        "--seed-bug is the older name")
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
    tr.add_argument("what", choices=("demand",), help="the event to trace: demand (one demand fault)")
    tr.add_argument("--policy", type=lambda name: name if name == "native" else policy_arg(name), metavar="POLICY",
                    help=f"default: zap, then update; native, or {POLICY_HELP}")
    tr.add_argument("--guest", choices=GUEST_FORMATS, default="64",
                    help="guest paging format (default: 64); the traced guest writes whole ptes")
    tr.set_defaults(func=cmd_trace)

    from .guest import WORKLOADS
    units = "; ".join(f"{n}: {w.unit} (default {w.default_size})" for n, w in WORKLOADS.items())
    workload_help = "; ".join(f"{n}: {w.description}" for n, w in WORKLOADS.items())

    def run_options(q, many: bool) -> None:
        if many:
            q.add_argument("--guest", nargs="+", choices=GUEST_FORMATS,
                           help="guest paging formats (default: 32 pae 64)")
        else:
            q.add_argument("--guest", choices=GUEST_FORMATS, default="64",
                           help="guest paging format: 32-bit, PAE or 4-level (default: 64)")
        q.add_argument("--size", type=int, help=f"workload size, in the workload's unit: {units}. Sizes that "
                       "cannot fit the guest's RAM are refused before booting")
        q.add_argument("--seed", type=int, default=0, help="seed of the workload's data (default: 0)")
        q.add_argument("--costs", default="p4-2006", choices=PRESETS,
                       help="cost preset for the time estimate (default: p4-2006; sources in docs/sources.md)")
        q.add_argument("--frames", choices=("warm", "cold"), **({"nargs": "+"} if many else {"default": "warm"}),
                       help="warm: boot zeroes all RAM (the direct map is shadowed before the workload); cold: "
                            "each frame is first touched when allocated"
                       + (" (default: demand both ways, the others warm)" if many else " (default: warm)"))
        q.add_argument("--pae-stores", choices=("halves", "whole"), default="halves",
                       help="how a PAE guest stores a pte: halves (i386 Linux set_pte: two 4-byte stores, the "
                            "default) or whole (one 8-byte store)")
        q.add_argument("--json", action="store_true", help="print JSON (docs/json.md) instead of tables")
        q.add_argument("--plot", metavar="FILE.png", help="also write a figure (.png, .pdf or .svg); the path is "
                       "checked before the run")

    r = sub.add_parser("run", help="run one workload on one MMU configuration",
                       description=f"Run one workload. Workloads: {workload_help}.")
    r.add_argument("workload", help=f"one of {', '.join(WORKLOADS)}")
    r.add_argument("--policy", type=policy_arg, metavar="POLICY", default="update",
                   help="MMU policy (default: update).  The pte-write policy: zap (clear the shadow pte, KVM "
                        f"before the seed) or update (install it from the value written, the seed); {POLICY_HELP}")
    r.add_argument("--native", action="store_true", help="no hypervisor: the hardware walks the guest's tables")
    run_options(r, many=False)
    r.set_defaults(func=cmd_run)

    cp = sub.add_parser("compare", help="native, zap and update side by side (no workloads: the main job)",
                        description=f"Run workloads natively and under both policies. Workloads: {workload_help}.")
    cp.add_argument("workloads", nargs="*", help="workloads to compare (default: demand forkwait kbuild)")
    run_options(cp, many=True)
    cp.add_argument("--prefetch", action="store_true",
                    help="also run update+prefetch (KVM's 2010 pte prefetch of the 8 neighbouring ptes)")
    cp.add_argument("--policies", nargs="+", metavar="POLICY",
                    help="the policies to run instead of native, zap and update: zap|update[+bypass][+unsync]"
                         "[+prefetch[N]], modern, tdp or native; prints every policy's VM exits per fault by "
                         "reason (tdp runs at two TLB reaches)")
    cp.add_argument("--history", action="store_true",
                    help="the historical sequence (zap, update, +bypass, +unsync, modern, tdp) and the model's "
                         "predictions of the published figures for out-of-sync shadows and EPT")
    cp.add_argument("--real", action="store_true",
                    help="also run the same workloads as real x86 code (the mm kernel on the real vCPU) and show "
                         "their exits per fault next to the model's")
    cp.add_argument("--kernels", default="kernels/build", help="--real: the folder of the built kernels")
    cp.set_defaults(func=cmd_compare)

    bt = sub.add_parser("boot", help="boot a multiboot kernel (real x86 code on unicorn) on the shadow MMU",
                        description="Run a multiboot v1 kernel (ELF32/ELF64) on the real vCPU: unicorn executes "
                                    "the guest's code, the shadow MMU handles its exits. One vCPU, no timers.")
    bt.add_argument("kernel")
    bt.add_argument("args", nargs="*", help="appended to the multiboot command line (as QEMU's -append)")
    mode = bt.add_mutually_exclusive_group()
    mode.add_argument("--policy", type=policy_arg, metavar="POLICY", default="update",
                      help=f"MMU policy (default: update): {POLICY_HELP}")
    mode.add_argument("--native", action="store_true", help="no hypervisor: the hardware walks the guest's tables")
    bt.add_argument("--ram", type=int, default=64, help="guest RAM in MiB (default 64)")
    bt.add_argument("--timeout", type=float, default=60.0, help="stop a guest that runs longer (seconds, default 60)")
    bt.add_argument("--json", action="store_true")
    bt.add_argument("--trace", type=int, default=0, metavar="N", help="print the first N exits and deliveries")
    bt.add_argument("--log", metavar="FILE", help="also write the serial output to FILE")
    bt.add_argument("--update-pte-bug", action="store_true",
                    help="the seed's update_pte rights (U|W regardless of the upper levels), as selfcheck's")
    bt.add_argument("--count-instructions", action="store_true",
                    help="count guest instructions (a hook on every instruction: an order of magnitude slower)")
    bt.set_defaults(func=cmd_boot)
    d = sub.add_parser("demo", help="the main job: a demand fault traced, then compare on the default set")
    d.add_argument("--plot", metavar="FILE.png", help="also write the figure (.png, .pdf or .svg)")
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
