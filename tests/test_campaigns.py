"""Lockstep campaigns at scale: seeded chunks, engines, resumable state, the CLI.

The divergences come from the checker itself: with the seed's update_pte rights
(``seed_bug``) a 64-bit guest under policy update diverges within a few hundred
steps.  Which seed diverges where depends on the program generator, so the tests
look it up (``bug_seeds``) instead of hard-coding it."""

import functools
import json

import pytest

from shadowmmu.cli import main
from shadowmmu.verify import campaigns
from shadowmmu.verify.campaigns import (CampaignError, Chunk, InlineEngine, Params, PoolEngine, StateFile, plan,
                                    reproduce_command, run_chunk)
from shadowmmu.verify.lockstep import GUESTS, campaign

BUG = (("seed_bug", True),)
C = 50                      # chunk steps in the divergence tests: a few short chunks


@functools.cache
def bug_seeds():
    """(base, s, m): seed ``base`` runs C steps without a divergence and seed s = base + 1
    diverges at its step m - 1 (64-bit guest, update, seed_bug) - so chunk 1 of a campaign
    with base seed ``base`` and C-step chunks is the first to diverge."""
    passed = False
    for s in range(100):
        d, n = campaign(GUESTS["64"], "update", steps=C, seed=s, seed_bug=True)
        if d is not None and passed:
            return s - 1, s, n
        passed = d is None
    pytest.fail(f"seed_bug not caught in {C}-step runs of seeds 0..99: the fixture's premise no longer holds")


def outcome(r):
    """What a chunk found, independent of where and how fast it ran."""
    d = r.divergence
    return (r.chunk, r.steps_run, r.stopped, None if d is None else (d.step, str(d.op), d.what))


def run_all(engine, chunks):
    total = []
    try:
        results = list(engine.run(chunks, total.append))
    finally:
        engine.close()
    return sorted((outcome(r) for r in results), key=lambda o: o[0].key), sum(total)


# ------------------------------------------------------------------ chunks
def test_chunks_cover_exactly_the_steps_with_seeds_base_plus_k():
    chunks = plan(["64", "32"], ["zap", "update"], steps=50_001, seed=7, chunk_steps=20_000)
    assert plan(["64", "32"], ["zap", "update"], steps=50_001, seed=7, chunk_steps=20_000) == chunks
    for g in ("64", "32"):
        for p in ("zap", "update"):
            job = sorted((c for c in chunks if (c.guest, c.policy) == (g, p)), key=lambda c: c.index)
            assert [(c.index, c.seed, c.steps) for c in job] == [(0, 7, 20_000), (1, 8, 20_000), (2, 9, 10_001)]
    assert len({c.key for c in chunks}) == len(chunks) == 12
    # chunk 0 of every job before any chunk 1: every job advances from the start
    assert [c.index for c in chunks] == [0] * 4 + [1] * 4 + [2] * 4
    assert plan(["la57"], ["zap"], steps=5, chunk_steps=20_000) == [Chunk("la57", "zap", 0, 0, 5)]
    with pytest.raises(CampaignError):
        plan(["64"], ["zap"], steps=0)


def test_a_chunk_found_by_a_campaign_is_the_chunk_its_seed_reruns():
    """Chunk 1 of base seed B has seed B + 1; the printed command (that seed, its steps) finds the same divergence."""
    base, s, m = bug_seeds()
    report = campaigns.run(Params(("64",), ("update",), 4 * C, base, C, BUG), InlineEngine())
    first = report.first
    assert (first.chunk.index, first.chunk.seed, first.steps_run) == (1, s, m)
    assert [r.chunk.index for r in report.results] == [0, 1]          # chunks 2 and 3 never ran
    assert report.reproduce() == (f"shadowmmu selfcheck --lockstep --guest 64 --policy update --seed {s} "
                                  f"--steps {m} --update-pte-bug")
    alone = run_chunk(Chunk("64", "update", 0, s, m, BUG))
    assert outcome(alone)[1:] == outcome(first)[1:]
    assert alone.divergence.step == first.divergence.step
    assert first.divergence.step == (m - 1) % 200                      # the last step run, in its program
    assert report.shrunk.step <= first.divergence.step
    assert report.jobs[0].divergences == 1 and report.jobs[0].steps == C + m


def test_reproduce_command_says_chunk_steps_when_steps_exceed_one_default_chunk():
    assert reproduce_command("32", "zap", 5, 20_000) == \
        "shadowmmu selfcheck --lockstep --guest 32 --policy zap --seed 5 --steps 20000"
    assert reproduce_command("32", "zap", 5, 30_000).endswith("--steps 30000 --chunk-steps 30000")


# ------------------------------------------------------------------ engines
def mixed():
    """Chunks of two jobs: two that pass (32-bit, zap), one that passes and one that diverges (seed_bug)."""
    base, _, _ = bug_seeds()
    return (plan(["64"], ["update"], steps=2 * C, seed=base, chunk_steps=C, options=dict(BUG))
            + plan(["32"], ["zap"], steps=60, seed=0, chunk_steps=30))


def test_process_pool_gives_the_per_chunk_results_of_running_inline():
    base, s, m = bug_seeds()
    inline, inline_steps = run_all(InlineEngine(), mixed())
    assert [(o[0].seed, o[1], o[3] is not None) for o in inline] == [(0, 30, False), (1, 30, False),
                                                                      (base, C, False), (s, m, True)]
    pooled, pooled_steps = run_all(PoolEngine(2), mixed())
    assert pooled == inline
    # the workers' shared counter saw every step the inline callbacks saw
    assert pooled_steps == inline_steps
    assert inline_steps >= 30 + 30 + C


def test_dask_local_cluster_gives_the_per_chunk_results_of_running_inline():
    distributed = pytest.importorskip("distributed")
    inline, _ = run_all(InlineEngine(), mixed())
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dask, _ = run_all(campaigns.DaskEngine(client, own_client=False), mixed())
    assert dask == inline


def test_a_divergence_stops_the_pool_campaign_early():
    base, s, _ = bug_seeds()
    params = Params(("64",), ("update",), 40 * C, base, C, BUG)        # 40 chunks; chunk 1 diverges
    report = campaigns.run(params, PoolEngine(2))
    assert report.first is not None and report.first.divergence is not None
    assert len(report.results) < 40
    assert report.shrunk.step <= report.first.divergence.step


# ------------------------------------------------------------------ state file
P150 = Params(("32",), ("zap",), 150, 0, 50)          # three chunks of 50 steps


def test_a_resumed_campaign_skips_finished_chunks_and_totals_all_of_them(tmp_path):
    path = str(tmp_path / "state.jsonl")
    calls = []

    def interrupt_in_second_chunk(k):
        calls.append(k)
        if len(calls) == 2:
            raise KeyboardInterrupt

    first = campaigns.run(P150, InlineEngine(), state=StateFile(path, P150), advance=interrupt_in_second_chunk)
    assert first.interrupted and not first.failed
    assert [r.chunk.index for r in first.results] == [0]
    lines = [json.loads(x) for x in open(path)]
    assert [x["record"] for x in lines] == ["campaign", "chunk"]
    assert lines[1]["chunk"] == 0 and lines[1]["steps_run"] == 50 and lines[1]["result"] == "pass"

    second = campaigns.run(P150, InlineEngine(), state=StateFile(path, P150))
    assert [r.chunk.index for r in second.results] == [1, 2]            # chunk 0 was not run again
    job = second.jobs[0]
    assert (job.steps, job.chunks, job.resumed_chunks, job.divergences) == (150, 3, 1, 0)
    assert second.steps_this_run == 100
    assert job.seed_range == "0..2"
    # chunk times are recorded to the millisecond
    assert job.seconds == pytest.approx(sum(x["seconds"] for x in map(json.loads, open(path)) if "chunk" in x),
                                        abs=0.002)

    third = campaigns.run(P150, InlineEngine(), state=StateFile(path, P150))
    assert third.results == [] and third.jobs[0].steps == 150 and third.jobs[0].resumed_chunks == 3


def test_a_diverged_chunk_in_the_state_file_runs_again(tmp_path):
    base, _, m = bug_seeds()
    path = str(tmp_path / "state.jsonl")
    params = Params(("64",), ("update",), 2 * C, base, C, BUG)
    assert campaigns.run(params, InlineEngine(), state=StateFile(path, params)).first.chunk.index == 1
    state = StateFile(path, params)
    assert set(state.done) == {("64", "update", 0)}
    again = campaigns.run(params, InlineEngine(), state=state)
    assert [r.chunk.index for r in again.results] == [1] and again.first.steps_run == m


def test_a_state_file_of_other_arguments_is_refused(tmp_path):
    path = str(tmp_path / "state.jsonl")
    StateFile(path, P150)
    with pytest.raises(CampaignError, match=r"--steps 150 there, 300 here"):
        StateFile(path, Params(("32",), ("zap",), 300, 0, 50))
    with pytest.raises(CampaignError, match=r"--guest 32 there, 64 here"):
        StateFile(path, Params(("64",), ("zap",), 150, 0, 50))
    with pytest.raises(CampaignError, match=r"options \(--update-pte-bug\) none there, seed_bug=True here"):
        StateFile(path, Params(("32",), ("zap",), 150, 0, 50, BUG))
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(CampaignError, match="not a lockstep campaign state file"):
        StateFile(str(other), P150)


def test_a_record_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "state.jsonl"
    campaigns.run(P150, InlineEngine(), state=StateFile(str(path), P150))
    text = path.read_text()
    path.write_text(text + '{"record": "chunk", "gue')
    state = StateFile(str(path), P150)
    assert len(state.done) == 3
    assert path.read_text() == text


# ------------------------------------------------------------------ the command
def test_cli_campaign_resumes_from_its_state_file(tmp_path, capsys):
    state = str(tmp_path / "s.jsonl")
    argv = ["selfcheck", "--lockstep", "--steps", "60", "--chunk-steps", "30", "--guest", "pae", "--policy",
            "update", "--jobs", "1", "--state", state, "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)["lockstep"]
    assert out["divergence"] is None and out["steps_this_run"] == 60
    assert [(j["guest"], j["policy"], j["steps"], j["chunks"], j["seed_range"]) for j in out["jobs"]] == \
        [("pae", "update", 60, 2, "0..1")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)["lockstep"]
    assert out["steps_this_run"] == 0 and out["jobs"][0]["resumed_chunks"] == 2 and out["jobs"][0]["steps"] == 60


def test_cli_divergence_prints_the_story_and_the_reproducing_command(capsys):
    base, s, m = bug_seeds()
    assert main(["selfcheck", "--lockstep", "--steps", str(4 * C), "--chunk-steps", str(C), "--seed", str(base),
                 "--guest", "64", "--policy", "update", "--update-pte-bug", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert f"divergence in chunk 1 (seed {s})" in out
    assert f"reproduce: shadowmmu selfcheck --lockstep --guest 64 --policy update --seed {s} --steps {m} --update-pte-bug" \
        in out
    assert "program:" in out                    # the shrunk story


@pytest.mark.parametrize("extra,message", [
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--chunk-steps", "0"], "--chunk-steps must be positive"),
    (["--scheduler", "tcp://127.0.0.1:8786"], "--scheduler needs --engine dask"),
    (["--state", "{other}"], "belongs to another campaign: --steps 5 there, 10 here"),
    (["--state", "{dir}"], "cannot read --state"),
])
def test_cli_bad_campaign_arguments_are_one_clear_line(tmp_path, capsys, extra, message):
    other = str(tmp_path / "other.jsonl")
    StateFile(other, Params(("32",), ("zap",), 5, 0, 20_000))
    extra = [x.format(other=other, dir=str(tmp_path)) for x in extra]
    assert main(["selfcheck", "--lockstep", "--steps", "10", "--guest", "32", "--policy", "zap", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_campaign_flags_without_lockstep_are_refused(capsys):
    assert main(["selfcheck", "--cases", "5", "--jobs", "2"]) == 2
    assert "--jobs applies to --lockstep campaigns" in capsys.readouterr().err


def test_cli_runs_on_a_dask_scheduler_given_by_address(capsys):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert main(["selfcheck", "--lockstep", "--steps", "60", "--chunk-steps", "30", "--guest", "32",
                     "--policy", "zap", "--engine", "dask", "--scheduler", cluster.scheduler_address,
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["lockstep"]
    assert out["engine"].startswith(f"dask at {cluster.scheduler_address}")
    assert out["steps_this_run"] == 60 and out["jobs"][0]["chunks"] == 2 and out["divergence"] is None
