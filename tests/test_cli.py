"""The shadowmmu command: outputs people and scripts rely on, and clear errors."""

import json
import subprocess
import sys

import pytest

from shadowmmu.cli import main


def shadowmmu(*args):
    return subprocess.run([sys.executable, "-m", "shadowmmu.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_run_json_has_the_documented_fields(capsys):
    assert main(["run", "demand", "--guest", "32", "--policy", "zap", "--size", "64", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("schema", "workload", "policy", "guest", "frames", "guest_events", "exits", "exits_per_fault",
                "estimate"):
        assert key in rep
    assert rep["workload"] == "demand" and rep["policy"] == "zap" and rep["guest"] == "32"
    assert rep["guest_events"]["demand_faults"] >= 64
    assert rep["exits"]["total"] == sum(rep["exits"]["by_reason"].values())
    demand = rep["exits_per_fault"]["demand"]
    assert demand["steady"] == 3 and demand["steady_histogram"] == {"3": 63}
    assert demand["other_faults"] == 1 and demand["other_by_case"]["new_table"]["faults"] == 1
    est = rep["estimate"]
    assert est["preset"] == "p4-2006"
    assert est["shadow"]["cycles"] > est["native"]["cycles"] > 0
    assert est["shadow"]["seconds"] == pytest.approx(est["shadow"]["cycles"] / 3.8e9)


def test_run_native_has_no_exits(capsys):
    assert main(["run", "demand", "--guest", "64", "--native", "--size", "32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["policy"] == "native" and rep["exits"]["total"] == 0 and rep["exits"]["by_reason"] is None
    assert rep["estimate"]["shadow"] is None
    assert rep["guest_events"]["demand_faults"] >= 32


@pytest.mark.parametrize("args,message", [
    (["run", "compile"], "unknown workload 'compile'"),
    (["run", "demand", "--costs", "p3"], "argument --costs: invalid choice: 'p3' (choose from 'p4-2006'"),
    (["run", "demand", "--size", "0"], "--size must be a positive integer"),
    (["compare", "demand", "nothing"], "unknown workload 'nothing'"),
    (["selfcheck"], "say what to check"),
    (["bench", "mmu", "--pages", "0"], "--pages must be positive"),
    (["run", "demand", "--size", "8", "--plot", "/nonexistent/dir/x.png"], "cannot write the plot"),
    (["run", "demand", "--guest", "32", "--size", "200000"],
     "--size 200000 does not fit: demand needs about 201,165 frames of guest RAM, and a 32 guest has at most "
     "512 MB (131,072 frames); the largest demand size that fits is 130,180 pages"),
    (["run", "kbuild", "--guest", "pae", "--size", "40000"], "the largest kbuild size that fits is 32,588 source files"),
    (["run", "demand", "--size", "8", "--plot", "/tmp"], "--plot '/tmp' is a directory"),
    (["run", "demand", "--size", "8", "--plot", "/tmp/figure"], "the file name must end in .png, .pdf, .svg"),
    (["compare", "demand", "--plot", "/nonexistent/x.png"], "directory '/nonexistent' does not exist"),
])
def test_bad_arguments_are_one_clear_line(args, message):
    r = shadowmmu(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_trace_tells_three_exits_for_zap_and_two_for_update():
    r = shadowmmu("trace", "demand", "--guest", "pae")
    assert r.returncode == 0
    zap, update = r.stdout.split("\n\n")[:2]
    assert "pte_write='zap': 3 VM exits" in zap and "clear the spte" in zap
    assert "pte_write='update': 2 VM exits" in update and "install the spte from it" in update
    assert "(pf_fixed)" in zap and "(pf_fixed)" not in update


def test_selfcheck_lockstep_exit_status_says_whether_a_divergence_was_found():
    ok = shadowmmu("selfcheck", "--lockstep", "--steps", "300", "--guest", "64")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no divergence" in ok.stdout
    bug = shadowmmu("selfcheck", "--lockstep", "--steps", "3000", "--guest", "64", "--policy", "update",
                    "--seed-bug")          # the older name still works
    assert bug.returncode == 1
    assert "the hardware allows" in bug.stdout or "value" in bug.stdout


def test_compare_plot_is_written(tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["compare", "demand", "--guest", "64", "--size", "32", "--plot", str(out)]) == 0
    assert out.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "demand" in text and "update" in text
    # a fixed size whatever the number of bars: 7.2 x 3 inches at 200 dpi (the PNG header's IHDR)
    header = out.read_bytes()[16:24]
    assert (int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")) == (1440, 600)


def test_plot_path_is_checked_before_the_run_and_reported(tmp_path, capsys):
    out = tmp_path / "run.svg"
    assert main(["run", "demand", "--size", "8", "--plot", str(out)]) == 0
    assert out.exists() and f"figure written to {out}" in capsys.readouterr().err


def test_bench_ram_memory_follows_touched_pages(capsys):
    """A 1 GB guest booted cold allocates a handful of host frames, not 262,144."""
    from shadowmmu.analysis.bench_ram import bench_ram
    (row,) = bench_ram((1024,), "cold", touch=16)
    assert row["boot_host_frames"] < 64
    # the 16 pages written, their page table, the process's tables and stack, shadow pages
    assert row["host_frames"] - row["boot_host_frames"] < 200


def test_version_and_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "shadowmmu", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("shadowmmu ")


def test_every_run_and_compare_option_has_help():
    from shadowmmu.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "run" in a.choices)
    for name in ("run", "compare", "demo", "walk", "bench", "trace"):
        for action in sub.choices[name]._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "kbuild: source files (default 8)" in sub.choices["run"].format_help().replace("\n", " ").replace("  ", " ")


def test_native_run_prints_no_shadow_numbers(capsys):
    assert main(["run", "demand", "--native", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "shadow" not in out and "no hypervisor" in out
    assert "process_exits" in out


def test_json_keys_have_no_spaces_or_colons_and_empty_is_null(capsys):
    assert main(["compare", "demand", "--guest", "64", "--size", "16", "--frames", "warm", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == 2 and data["predictions"] is None

    def walk(x):
        if isinstance(x, dict):
            assert x != {}, "an empty object should be null"
            for k, v in x.items():
                assert " " not in k and ":" not in k, k
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(data)
    native = data["reports"][0]
    assert native["policy"] == "native" and native["exits"]["by_reason"] is None
