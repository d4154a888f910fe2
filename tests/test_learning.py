"""benchmarks/learning.py's report on synthetic run folders: which run it picks, the per-task finals, the curves,
and (where rliable is installed: benchmarks/requirements.txt) the aggregate checked against a hand computation.
No training: the runs are written here in the scripts' format (args.json, metrics.csv, timing.csv, summary.json)."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

# (env_id, algo) -> final eval return per seed; None: a run still in progress (a checkpoint, no summary)
FINALS = {
    ("rware-tiny-2ag", "mam"): [4.0, 6.0, 8.0],
    ("rware-tiny-2ag", "mat"): [2.0, 4.0, 6.0],
    ("rware-tiny-2ag", "mappo"): [0.0, 2.0, 2.0],
    ("lbf-8x8-2p-2f-coop", "mam"): [0.5, 0.5, 1.0],
    ("lbf-8x8-2p-2f-coop", "mat"): [1.0, 1.0, 1.0],
    ("lbf-8x8-2p-2f-coop", "mappo"): [0.0, 0.5, 1.0],
    ("con-5x5x3a", "mam"): [0.9, 0.8, 0.7],
    ("con-5x5x3a", "mat"): [0.6, 0.6, 0.6],
    ("con-5x5x3a", "mappo"): None,  # so con-5x5x3a is left out of the aggregate
}
BATCH, ITERATIONS = 2048, 4  # the scripts' default batch (16 envs x 128 steps); a budget of 4 iterations
TRAIN = [[0.0, 1.0, 2.0, 3.0], [1.0, float("nan"), 3.0, 5.0], [2.0, 3.0, 4.0, 7.0]]  # per seed, per iteration


def write_run(runs, env_id, algo, stamp, finals, total_timesteps=BATCH * ITERATIONS):
    folder = runs / f"{env_id}__learning_{algo}__1__{stamp}"
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(dict(total_timesteps=total_timesteps, num_seeds=3)))
    done = ITERATIONS if finals is not None else 2
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "seed", "global_step", "charts/episodic_return", "eval/episodic_return"])
        for i in range(done):
            for s in range(3):
                w.writerow([i + 1, s + 1, (i + 1) * BATCH, TRAIN[s][i], ""])
        for s, value in enumerate(finals or []):  # the final evaluation row: only eval/* filled
            w.writerow([done, s + 1, done * BATCH, "", value])
    with open(folder / "timing.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "global_step", "SPS", "seconds"])
        w.writerows([i + 1, (i + 1) * BATCH, 1000.0, 2.0 * (i + 1)] for i in range(done))
    if finals is None:
        (folder / "checkpoint.msgpack").write_bytes(b"")
    else:
        summary = {"eval/episodic_return": finals, "global_step": done * BATCH, "seconds": 2.0 * done}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def report(tmp_path):
    runs = tmp_path / "runs"
    for (env_id, algo), finals in FINALS.items():
        write_run(runs, env_id, algo, 100, finals)
    # decoys: a newer run in progress next to a complete one, and a complete run with another budget
    write_run(runs, "rware-tiny-2ag", "mat", 200, None)
    write_run(runs, "rware-tiny-2ag", "mam", 300, [99.0, 99.0, 99.0], total_timesteps=BATCH * 8)
    return report_again(tmp_path)


def report_again(tmp_path, *flags):
    """learning.py --report-only on the runs in tmp_path/runs, into tmp_path/out. -> (stdout, CSV reader)."""
    runs = tmp_path / "runs"
    envs = list(dict.fromkeys(e for e, _ in FINALS))
    budgets = [f"{e}={BATCH * ITERATIONS}" for e in envs]
    # 500 resamples: the CIs are checked for bounds only, the point values exactly
    cmd = [sys.executable, str(ROOT / "benchmarks/learning.py"), "--report-only", "--bootstrap-reps", 500, "--env-ids", *envs,
           "--budget", *budgets, "--runs-dir", str(runs), "--out-dir", str(tmp_path / "out"), *flags]  # fmt: skip
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    read = lambda name: list(csv.DictReader(open(tmp_path / "out" / name)))
    return proc.stdout, read


def test_report_picks_runs_and_computes_finals_and_curves(tmp_path):
    out, read = report(tmp_path)
    status = {(r["env_id"], r["algo"]): (r["status"], r["run_dir"]) for r in read("learning_runs.csv")}
    assert len(status) == len(FINALS)
    assert status["rware-tiny-2ag", "mat"][0] == "complete"  # the newer run in progress does not replace it
    assert status["rware-tiny-2ag", "mat"][1].endswith("__100")
    assert status["rware-tiny-2ag", "mam"][1].endswith("__100")  # the other budget's run is not this task's
    assert status["con-5x5x3a", "mappo"][0] == "in progress"

    finals = {(r["env_id"], r["algo"]): r for r in read("learning_final.csv")}
    assert set(finals) == {k for k, v in FINALS.items() if v is not None}
    for key, row in finals.items():
        values = FINALS[key]
        assert float(row["eval_return"]) == pytest.approx(np.mean(values), abs=1e-4)
        assert (
            min(values) - 1e-4 <= float(row["ci_low"]) <= float(row["eval_return"]) <= float(row["ci_high"])
        )
        assert float(row["ci_high"]) <= max(values) + 1e-4
        assert [float(v) for v in row["eval_per_seed"].split(";")] == values
    assert finals["lbf-8x8-2p-2f-coop", "mat"]["ci_low"] == finals["lbf-8x8-2p-2f-coop", "mat"]["ci_high"]

    curve = [r for r in read("learning_curves.csv") if (r["env_id"], r["algo"]) == ("rware-tiny-2ag", "mam")]
    expected = np.array(TRAIN)
    expected[1, 1] = expected[1, 0]  # an iteration without an ended episode carries the seed's last value
    assert [int(r["global_step"]) for r in curve] == [BATCH * (i + 1) for i in range(ITERATIONS)]
    np.testing.assert_allclose([float(r["episodic_return"]) for r in curve], expected.mean(0), atol=1e-4)
    assert [float(r["seconds"]) for r in curve] == [2.0, 4.0, 6.0, 8.0]
    assert "| con-5x5x3a (0.008192M steps) | 0.80" in out  # the printed table: mam's cell, mappo has none
    assert (tmp_path / "out" / "learning.png").stat().st_size > 0


def test_report_keeps_the_rows_of_runs_made_elsewhere(tmp_path):
    """A study split across machines: without the run folders, a report of --out-dir's CSVs gives the same CSVs;
    a run finished here then replaces its own rows, and the rest stay."""
    report(tmp_path)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.glob("*.csv"))
    before = {n: (out / n).read_text() for n in names}
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    stdout, read = report_again(tmp_path)
    assert "kept from" in stdout
    assert {n: (out / n).read_text() for n in names} == before

    write_run(tmp_path / "runs", "con-5x5x3a", "mappo", 400, [0.0, 0.3, 0.6])  # the run in progress, finished
    _, read = report_again(tmp_path)
    status = {(r["env_id"], r["algo"]): (r["status"], r["run_dir"][-5:]) for r in read("learning_runs.csv")}
    assert status["con-5x5x3a", "mappo"] == ("complete", "__400")
    assert status["rware-tiny-2ag", "mat"] == ("complete", "__100")  # kept
    finals = {(r["env_id"], r["algo"]): [float(v) for v in r["eval_per_seed"].split(";")]
              for r in read("learning_final.csv")}  # fmt: skip
    assert finals == {**{k: v for k, v in FINALS.items() if v}, ("con-5x5x3a", "mappo"): [0.0, 0.3, 0.6]}
    curve = [r for r in read("learning_curves.csv") if (r["env_id"], r["algo"]) == ("rware-tiny-2ag", "mam")]
    assert [r["global_step"] for r in curve] == [str(BATCH * (i + 1)) for i in range(ITERATIONS)]
    if (out / "learning_aggregate.csv").exists():  # rliable installed: the new task joins the aggregate
        assert {r["tasks"] for r in read("learning_aggregate.csv")} == {"3"}


def test_a_report_of_some_algos_keeps_the_rows_of_the_others(tmp_path):
    """--algos mat reports MAT's runs and leaves every other algo's rows in the CSVs as they were: a report of
    one arm once wiped the committed rows of the others (and a rerun would have trained them again)."""
    report(tmp_path)
    out = tmp_path / "out"
    read_rows = lambda name: sorted(map(str, csv.DictReader(open(out / name))))
    before = {n: read_rows(n) for n in ("learning_runs.csv", "learning_curves.csv", "learning_final.csv")}
    shutil.rmtree(tmp_path / "runs")
    write_run(tmp_path / "runs", "con-5x5x3a", "mat", 400, [0.1, 0.2, 0.3])  # a new run of one algo
    _, read = report_again(tmp_path, "--algos", "mat")
    finals = {(r["env_id"], r["algo"]): r["eval_per_seed"] for r in read("learning_final.csv")}
    expected = {k: ";".join(f"{x:g}" for x in v) for k, v in FINALS.items() if v is not None}
    assert finals == {**expected, ("con-5x5x3a", "mat"): "0.1;0.2;0.3"}
    status = {(r["env_id"], r["algo"]): r["status"] for r in read("learning_runs.csv")}
    assert len(status) == len(FINALS) and status["con-5x5x3a", "mappo"] == "in progress"
    for name, rows in before.items():  # the rows of mam and mappo: unchanged
        assert [r for r in rows if "'mat'" not in r] == [r for r in read_rows(name) if "'mat'" not in r]


def test_report_aggregate_matches_a_hand_computation(tmp_path):
    pytest.importorskip("rliable", reason="the aggregate needs benchmarks/requirements.txt")
    _, read = report(tmp_path)
    tasks = ["rware-tiny-2ag", "lbf-8x8-2p-2f-coop"]  # con-5x5x3a: mappo's run is not complete
    norm = {}
    for t in tasks:
        low = min(min(FINALS[t, a]) for a in ("mam", "mat", "mappo"))
        high = max(max(FINALS[t, a]) for a in ("mam", "mat", "mappo"))
        for a in ("mam", "mat", "mappo"):
            norm[t, a] = [(v - low) / (high - low) for v in FINALS[t, a]]
    rows = read("learning_aggregate.csv")
    assert {r["tasks"] for r in rows} == {"2"} and {r["runs_per_task"] for r in rows} == {"3"}
    got = {(r["algo"], r["over"], r["metric"]): float(r["value"]) for r in rows}
    for a in ("mam", "mat", "mappo"):
        scores = sorted(v for t in tasks for v in norm[t, a])
        assert got[a, "", "mean"] == pytest.approx(np.mean(scores), abs=1e-4)
        assert got[a, "", "IQM"] == pytest.approx(
            np.mean(scores[1:-1]), abs=1e-4
        )  # 6 scores: drop 1 each end
    for x, y in [("mam", "mat"), ("mam", "mappo"), ("mat", "mappo")]:
        wins = [np.mean([(u > v) + 0.5 * (u == v) for u in norm[t, x] for v in norm[t, y]]) for t in tasks]
        assert got[x, y, "P(algo > over)"] == pytest.approx(np.mean(wins), abs=1e-4)
    assert (tmp_path / "out" / "learning_aggregate.png").stat().st_size > 0


def test_aggregate_cis_do_not_depend_on_the_global_rng(monkeypatch):
    """Two reports of the same runs give the same CIs whatever numpy's global RNG holds. rliable 1.2's
    StratifiedBootstrap (IQM, mean) draws from the global RNG even when given a random_state: this test failed
    until learning.py seeded it too."""
    pytest.importorskip("rliable", reason="the aggregate needs benchmarks/requirements.txt")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import learning

    finals = [dict(env_id=t, algo=a, per_seed=v) for (t, a), v in FINALS.items() if v is not None]
    reports, state = [], np.random.get_state()
    for global_seed in (1, 2):
        np.random.seed(global_seed)  # what an unseeded bootstrap would draw from
        reports.append(learning.aggregate(finals, ["mam", "mat", "mappo"], reps=200))
    np.random.set_state(state)  # leave the worker's global RNG as it was
    assert reports[0] == reports[1]
    rows, pairs, tasks = reports[0]
    assert len(rows) == 6 and len(pairs) == 3 and tasks == ["rware-tiny-2ag", "lbf-8x8-2p-2f-coop"]
    assert any(r["ci_low"] < r["value"] < r["ci_high"] for r in rows + pairs)  # the CIs are not degenerate


def test_protocol_variants_become_flags_the_scripts_have(monkeypatch):
    """Every variant of the protocol study runs its script with flags that exist there, each set as named:
    a misspelt flag would fail the run hours into a study, a dropped one would train the wrong variant."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import learning

    assert learning.variant_flags("mam_ids0_shuffle1_lr1e-3") == [
        "--no-agent-ids", "--shuffle-agents", "--learning-rate", "1e-3"
    ]  # fmt: skip
    assert learning.variant_flags("mat_ids1_shuffle0") == ["--agent-ids", "--no-shuffle-agents"]
    for _, _, _, variants in learning.PROTOCOL.values():
        for variant in variants:
            fields = learning.script_defaults(learning.SCRIPTS[learning.algo_of(variant)])[0]
            # ['--no-agent-ids', '--learning-rate', '1e-3'] -> agent_ids, learning_rate
            for flag in learning.variant_flags(variant):
                name = flag[2:].removeprefix("no-").replace("-", "_")
                assert not flag.startswith("--") or name in fields, f"{variant}: {flag}"
