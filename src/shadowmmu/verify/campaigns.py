"""Distributing a lockstep campaign: chunks, engines, a resumable state file.

A campaign is S steps of ``lockstep.campaign`` for each (guest format, policy).
Each job is cut into chunks of ``chunk_steps`` steps; chunk k of a campaign with
base seed B runs ``campaign(steps=..., seed=B + k)``.  So a chunk is a value that
any process can run alone, and the chunk's seed given to ``selfcheck --lockstep
--seed`` with the chunk's steps reruns exactly its programs (chunk 0 of that run
is the chunk).  Seeds B + k do not share programs: ``campaign`` seeds program n
with ``seed * 1_000_003 + n`` and a chunk has far fewer than 10^6 programs.

Engines run chunks and hand results back as they finish:

- ``InlineEngine``: in this process, one after another (``--jobs 1``, tests).
- ``PoolEngine``: a local ``ProcessPoolExecutor`` (the default).  The workers
  share a step counter (a live progress bar) and a stop event, checked after
  every program, so a divergence elsewhere or Ctrl-C ends running chunks within
  one program instead of one chunk.
- ``DaskEngine``: dask ``distributed`` (an existing scheduler, or a
  ``LocalCluster``).  Results come back per chunk; at a stop the remaining tasks
  are cancelled (a task already running finishes its chunk on its worker, and
  its result is dropped).

The parent collects results, appends one JSON line per finished chunk to the
state file (so an interrupted campaign resumes where it stopped), stops every
engine at the first divergence, and shrinks it.

State file (JSON lines): a header ``{"record": "campaign", "params": {...}}``,
then one ``{"record": "chunk", ...}`` per finished chunk.  A chunk that passed is
never run again by a campaign with the same parameters; a chunk that diverged
is run again (it is the one to look at, and after a fix it passes).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from .lockstep import GUESTS, Divergence, campaign, shrink

DEFAULT_CHUNK_STEPS = 20_000
STATE_VERSION = 1


class CampaignError(Exception):
    """A campaign that cannot start as asked (bad parameters, a state file of another campaign)."""


# ------------------------------------------------------------------ chunks
@dataclass(frozen=True)
class Chunk:
    """One unit of work: ``campaign(GUESTS[guest], policy, steps=steps, seed=seed, **options)``."""
    guest: str
    policy: str
    index: int                      # k: the chunk's place in its (guest, policy) job
    seed: int                       # base seed + k
    steps: int
    options: tuple = ()             # extra campaign() keywords, as sorted (name, value) pairs: hashable

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.guest, self.policy, self.index)


def chunk_seed(base_seed: int, index: int) -> int:
    """Chunk k's seed.  Chunk 0's is the base seed, so ``--seed X --steps N`` (N at most
    one chunk) runs the chunk that had seed X."""
    return base_seed + index


def plan(guests, policies, *, steps: int, seed: int = 0, chunk_steps: int = DEFAULT_CHUNK_STEPS,
         options: dict | None = None) -> list[Chunk]:
    """Every chunk of the campaign, chunk 0 of every job first, then chunk 1 of every job, ...
    (so all jobs advance together and a divergence in any job shows up early)."""
    if steps <= 0 or chunk_steps <= 0:
        raise CampaignError("steps and chunk steps must be positive")
    opts = tuple(sorted((options or {}).items()))
    n = math.ceil(steps / chunk_steps)
    return [Chunk(g, p, k, chunk_seed(seed, k), min(chunk_steps, steps - k * chunk_steps), opts)
            for k in range(n) for g in guests for p in policies]


def reproduce_command(guest: str, policy: str, seed: int, steps: int, options=()) -> str:
    """The selfcheck command line that reruns ``steps`` steps from ``seed`` as one chunk."""
    opts = dict(options)
    cmd = f"shadowmmu selfcheck --lockstep --guest {guest} --policy {policy} --seed {seed} --steps {steps}"
    if steps > DEFAULT_CHUNK_STEPS:
        cmd += f" --chunk-steps {steps}"
    if opts.pop("seed_bug", False):
        cmd += " --update-pte-bug"
    if opts:      # campaign keywords the command line does not have
        cmd += "  (campaign options: " + ", ".join(f"{k}={v!r}" for k, v in sorted(opts.items())) + ")"
    return cmd


# ------------------------------------------------------------------ running one chunk
@dataclass
class ChunkResult:
    chunk: Chunk
    steps_run: int
    seconds: float                  # wall time of the chunk in its worker
    divergence: Divergence | None = None
    cpu_seconds: float = 0.0        # CPU time of the thread that ran the chunk (a dask worker may have
                                    # several): on a shared machine, steps per CPU second is the rate
                                    # that does not depend on the load
    stopped: bool = False           # ended early by a stop request: not a finished chunk
    worker: str = ""

    def record(self) -> dict:
        d = self.divergence
        c = self.chunk
        return {"record": "chunk", "guest": c.guest, "policy": c.policy, "chunk": c.index, "seed": c.seed,
                "steps": c.steps, "steps_run": self.steps_run, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "result": "pass" if d is None else "divergence",
                "divergence": None if d is None else {"step": d.step, "op": str(d.op), "what": d.what},
                "worker": self.worker}


class _Stopped(Exception):
    """Raised from the progress callback to end a chunk early."""


def run_chunk(chunk: Chunk, advance=None, should_stop=None) -> ChunkResult:
    """Run one chunk.  ``advance(k)`` is told after each program of k steps;
    ``should_stop()`` is asked then too, and a true answer ends the chunk early."""
    def progress(k):
        if advance is not None:
            advance(k)
        if should_stop is not None and should_stop():
            raise _Stopped

    worker = f"{socket.gethostname()}:{os.getpid()}"
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        d, n = campaign(GUESTS[chunk.guest], chunk.policy, steps=chunk.steps, seed=chunk.seed,
                        progress=progress, **dict(chunk.options))
    except _Stopped:
        return ChunkResult(chunk, 0, time.perf_counter() - t0, stopped=True, worker=worker)
    return ChunkResult(chunk, n, time.perf_counter() - t0, d, time.thread_time() - c0, worker=worker)


# ------------------------------------------------------------------ engines
class InlineEngine:
    """Chunks one after another in this process."""
    name = "inline"
    workers = 1

    def run(self, chunks, advance):
        self._stop = False
        for c in chunks:
            if self._stop:
                return
            r = run_chunk(c, advance, lambda: self._stop)
            if not r.stopped:
                yield r

    def stop(self):
        self._stop = True

    def close(self):
        pass

    def describe(self) -> str:
        return "1 process (inline)"


# pool workers: set by _pool_init in each worker process
_worker_stop = None
_worker_counter = None


def _pool_init(stop, counter):
    import signal
    global _worker_stop, _worker_counter
    # Ctrl-C reaches the whole process group: the parent alone decides, and tells
    # the workers through the stop event (a worker killed mid-task breaks the pool)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_stop, _worker_counter = stop, counter


def _pool_advance(k):
    with _worker_counter.get_lock():
        _worker_counter.value += k


def _pool_run_chunk(chunk: Chunk) -> ChunkResult:
    return run_chunk(chunk, _pool_advance, _worker_stop.is_set)


class PoolEngine:
    """A local process pool of ``jobs`` workers."""
    name = "local"

    def __init__(self, jobs: int):
        if jobs < 1:
            raise CampaignError(f"--jobs must be at least 1, got {jobs}")
        self.workers = jobs
        # forkserver, not fork: the parent has threads (rich's refresh thread), and
        # forking a threaded process can deadlock
        methods = multiprocessing.get_all_start_methods()
        self.ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self.stop_event = self.ctx.Event()
        self.counter = self.ctx.Value("q", 0)
        self.executor = ProcessPoolExecutor(jobs, mp_context=self.ctx, initializer=_pool_init,
                                            initargs=(self.stop_event, self.counter))

    def run(self, chunks, advance):
        futures = [self.executor.submit(_pool_run_chunk, c) for c in chunks]
        pending = set(futures)
        seen = 0
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                now = self.counter.value
                if now != seen:
                    advance(now - seen)
                    seen = now
                for f in done:
                    if f.cancelled():
                        continue
                    r = f.result()
                    if not r.stopped:
                        yield r
        finally:
            self.stop()

    def stop(self):
        self.stop_event.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def close(self):
        self.stop()

    def describe(self) -> str:
        return f"{self.workers} local process{'es' if self.workers != 1 else ''}"


class DaskEngine:
    """Chunks as tasks on a dask ``distributed`` cluster.  ``client`` is a
    ``distributed.Client``; the engine closes it (and ``cluster``, if given) at close()."""
    name = "dask"

    def __init__(self, client, cluster=None, own_client: bool = True):
        self.client = client
        self.cluster = cluster
        self.own_client = own_client
        self.futures = []
        try:
            self.workers = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        except Exception:       # noqa: BLE001 - only for the description
            self.workers = 0

    @classmethod
    def connect(cls, scheduler: str | None, jobs: int):
        """A client for ``scheduler`` (tcp://host:port), or a LocalCluster of ``jobs``
        single-threaded worker processes when no address is given."""
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise CampaignError("--engine dask needs the 'distributed' package: "
                                "pip install 'shadowmmu[cluster]'") from None
        if scheduler is None:
            import logging
            import signal
            # the worker processes inherit an ignored SIGINT (it survives exec): Ctrl-C is
            # the parent's to handle, which cancels the tasks and closes the cluster
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR)
            finally:
                signal.signal(signal.SIGINT, previous)
            return cls(Client(cluster), cluster)
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as e:
            raise CampaignError(f"cannot reach the dask scheduler at {scheduler}: {e}") from None
        return cls(client)

    def run(self, chunks, advance):
        from distributed import as_completed
        # pure=False: dask would otherwise name each task after its arguments and could
        # hand back a result it still holds from an earlier run of the same chunk
        self.futures = self.client.map(run_chunk, list(chunks), pure=False)
        try:
            for f in as_completed(self.futures):
                r = f.result()
                advance(r.steps_run)
                if not r.stopped:
                    yield r
        finally:
            self.stop()

    def stop(self):
        if self.futures:
            self.client.cancel(self.futures)
            self.futures = []

    def close(self):
        self.stop()
        if self.own_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def describe(self) -> str:
        where = "a local dask cluster" if self.cluster is not None else f"dask at {self.client.scheduler.address}"
        return f"{where} ({self.workers} worker thread{'s' if self.workers != 1 else ''})"


# ------------------------------------------------------------------ state file
@dataclass(frozen=True)
class Params:
    """What makes two runs the same campaign (so one resumes the other)."""
    guests: tuple
    policies: tuple
    steps: int
    seed: int
    chunk_steps: int = DEFAULT_CHUNK_STEPS
    options: tuple = ()

    def to_json(self) -> dict:
        return {"guests": list(self.guests), "policies": list(self.policies), "steps": self.steps,
                "seed": self.seed, "chunk_steps": self.chunk_steps, "options": dict(self.options)}

    def chunks(self) -> list[Chunk]:
        return plan(self.guests, self.policies, steps=self.steps, seed=self.seed,
                    chunk_steps=self.chunk_steps, options=dict(self.options))


# how a parameter is spelled on the command line, for the mismatch message
_FLAG = {"guests": "--guest", "policies": "--policy", "steps": "--steps", "seed": "--seed",
         "chunk_steps": "--chunk-steps", "options": "options (--update-pte-bug)"}


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in sorted(v.items())) or "none"
    return str(v)


class StateFile:
    """The JSON-lines record of a campaign's finished chunks."""

    def __init__(self, path: str, params: Params):
        self.path = path
        self.params = params
        self.done: dict[tuple, dict] = {}       # key -> record of a chunk that passed
        self._load()

    def _load(self):
        want = self.params.to_json()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        except OSError as e:
            raise CampaignError(f"cannot read --state {self.path}: {e.strerror}") from None
        if data and not data.endswith(b"\n"):
            # a record cut short (the process was killed while writing): drop it, so the
            # next record starts on a line of its own
            data = data[:data.rfind(b"\n") + 1]
            self._truncate(len(data))
        lines = data.decode("utf-8", "replace").splitlines()
        if not lines:
            self._write({"record": "campaign", "version": STATE_VERSION, "params": want,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, mode="w")
            return
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("record") != "campaign" or "params" not in head:
            raise CampaignError(f"--state {self.path} is not a lockstep campaign state file")
        have = head["params"]
        for k in want:
            if have.get(k) != want[k]:
                raise CampaignError(
                    f"--state {self.path} belongs to another campaign: {_FLAG[k]} {_show(have.get(k))} there, "
                    f"{_show(want[k])} here (resume with the same arguments, or use another state file)")
        planned = {c.key: c for c in self.params.chunks()}
        for n, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
                key = (rec["guest"], rec["policy"], rec["chunk"])
                ok = rec["record"] == "chunk" and key in planned and rec["seed"] == planned[key].seed
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise CampaignError(f"--state {self.path} line {n} is not a chunk of this campaign")
            if rec["result"] == "pass":
                self.done[key] = rec
            else:                                   # a divergence recorded: the chunk runs again
                self.done.pop(key, None)

    def _truncate(self, size: int):
        with open(self.path, "r+b") as f:
            f.truncate(size)

    def _write(self, rec: dict, mode: str = "a"):
        try:
            with open(self.path, mode) as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
        except OSError as e:
            raise CampaignError(f"cannot write --state {self.path}: {e.strerror}") from None

    def append(self, result: ChunkResult):
        self._write(result.record())
        if result.divergence is None:
            self.done[result.chunk.key] = result.record()


# ------------------------------------------------------------------ the campaign
@dataclass
class JobSummary:
    """One (guest, policy) job, over this run and the resumed chunks."""
    guest: str
    policy: str
    steps_planned: int
    chunks_planned: int
    steps: int = 0                  # steps of finished chunks (a divergent chunk: up to its divergence)
    chunks: int = 0                 # chunks finished (passed or diverged)
    resumed_chunks: int = 0         # of which taken from the state file
    divergences: int = 0
    seconds: float = 0.0            # sum of the chunks' wall times in their workers
    cpu_seconds: float = 0.0        # sum of the chunks' CPU times in their workers
    seeds: list = field(default_factory=list)

    @property
    def steps_per_s(self) -> float | None:
        return self.steps / self.seconds if self.seconds > 0 else None

    @property
    def seed_range(self) -> str:
        if not self.seeds:
            return "-"
        lo, hi = min(self.seeds), max(self.seeds)
        return str(lo) if lo == hi else f"{lo}..{hi}"

    def to_json(self) -> dict:
        return {"guest": self.guest, "policy": self.policy, "steps": self.steps,
                "steps_planned": self.steps_planned, "chunks": self.chunks, "chunks_planned": self.chunks_planned,
                "resumed_chunks": self.resumed_chunks, "divergences": self.divergences,
                "chunk_seconds": round(self.seconds, 3), "steps_per_s": self.steps_per_s,
                "chunk_cpu_seconds": round(self.cpu_seconds, 3),
                "steps_per_cpu_s": self.steps / self.cpu_seconds if self.cpu_seconds > 0 else None,
                "seed_range": self.seed_range}


@dataclass
class Report:
    params: Params
    engine: str
    jobs: list[JobSummary]
    results: list[ChunkResult]      # chunks finished in this run, in the order they finished
    elapsed: float                  # wall time of this run
    steps_this_run: int
    first: ChunkResult | None = None        # the first divergent chunk
    shrunk: Divergence | None = None
    shrink_seconds: float = 0.0
    interrupted: bool = False

    @property
    def failed(self) -> bool:
        return self.first is not None

    def reproduce(self) -> str | None:
        if self.first is None:
            return None
        c = self.first.chunk
        return reproduce_command(c.guest, c.policy, c.seed, self.first.steps_run, c.options)

    def to_json(self) -> dict:
        out = {"params": self.params.to_json(), "engine": self.engine,
               "jobs": [j.to_json() for j in self.jobs], "elapsed_s": round(self.elapsed, 3),
               "steps_this_run": self.steps_this_run,
               "steps_per_s_this_run": self.steps_this_run / self.elapsed if self.elapsed > 0 else None,
               "interrupted": self.interrupted, "divergence": None}
        if self.first is not None:
            c = self.first.chunk
            out["divergence"] = {"guest": c.guest, "policy": c.policy, "chunk": c.index, "seed": c.seed,
                                 "steps_run": self.first.steps_run, "reproduce": self.reproduce(),
                                 "shrunk_steps": self.shrunk.step + 1, "shrink_seconds": round(self.shrink_seconds, 3),
                                 "story": str(self.shrunk)}
        return out


def run(params: Params, engine, *, state: StateFile | None = None, advance=None, on_start=None) -> Report:
    """Run the campaign's chunks not finished yet on ``engine``; stop at the first
    divergence (and shrink it) or at Ctrl-C (the report says ``interrupted``).
    ``on_start(total_steps, steps_already_done)`` is called before the first chunk,
    ``advance(k)`` as steps get done."""
    chunks = params.chunks()
    done = state.done if state is not None else {}
    jobs = {}
    for c in chunks:
        j = jobs.setdefault((c.guest, c.policy), JobSummary(c.guest, c.policy, params.steps, 0))
        j.chunks_planned += 1
        rec = done.get(c.key)
        if rec is not None:
            j.steps += rec["steps_run"]
            j.chunks += 1
            j.resumed_chunks += 1
            j.seconds += rec["seconds"]
            j.cpu_seconds += rec.get("cpu_seconds", 0.0)
            j.seeds.append(c.seed)
    todo = [c for c in chunks if c.key not in done]
    if on_start is not None:
        on_start(len(params.guests) * len(params.policies) * params.steps, sum(j.steps for j in jobs.values()))
    report = Report(params, engine.describe(), list(jobs.values()), [], 0.0, 0)
    t0 = time.perf_counter()
    it = engine.run(todo, advance or (lambda k: None))
    try:
        for r in it:
            report.results.append(r)
            if state is not None:
                state.append(r)
            j = jobs[(r.chunk.guest, r.chunk.policy)]
            j.steps += r.steps_run
            j.chunks += 1
            j.seconds += r.seconds
            j.cpu_seconds += r.cpu_seconds
            j.seeds.append(r.chunk.seed)
            report.steps_this_run += r.steps_run
            if r.divergence is not None:
                j.divergences += 1
                if report.first is None:
                    report.first = r
                    break
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        it.close()              # the engine's stop: pending chunks cancelled, running ones told to end
    report.elapsed = time.perf_counter() - t0
    if report.first is not None:
        c = report.first.chunk
        t1 = time.perf_counter()
        report.shrunk = shrink(report.first.divergence, GUESTS[c.guest], c.policy,
                               seed_bug=dict(c.options).get("seed_bug", False))
        report.shrink_seconds = time.perf_counter() - t1
    return report
