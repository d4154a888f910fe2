"""benchmarks/study.py's statistics and bookkeeping: t-based intervals, Welch's interval of a gap, the run folders
it reads (periodic, final and absolute evaluations of every seed), committed rows kept for seeds with no folder
here, and marl-eval's JSON layout. No training: run folders written by hand."""

import csv
import json
import sys

import numpy as np
import pytest
from conftest import ROOT
from scipy import stats

sys.path.insert(0, str(ROOT / "benchmarks"))
import study  # noqa: E402


def test_t_interval_is_the_t_based_95_percent_ci():
    x = [0.80, 0.86, 0.82, 0.79, 0.90]
    mean, low, high, n = study.t_interval(x)
    half = 2.7764451 * np.std(x, ddof=1) / np.sqrt(5)  # t(0.975, 4)
    assert n == 5 and mean == pytest.approx(np.mean(x))
    assert (low, high) == pytest.approx((np.mean(x) - half, np.mean(x) + half))
    assert study.t_interval([np.nan, 1.0])[:2] == (
        1.0,
        study.t_interval([1.0])[1],
    )  # NaN dropped; n = 1: no CI
    assert np.isnan(study.t_interval([1.0])[1])


def test_welch_interval_matches_scipy():
    a, b = [0.5, 0.7, 0.6, 0.9, 0.4], [0.2, 0.25, 0.3, 0.2, 0.35, 0.3]
    diff, low, high = study.welch_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    assert (low, high) == pytest.approx((ci.low, ci.high))


def write_run(runs, env_id, algo, seed, num_seeds, complete, returns, lr=None):
    """A run folder as the scripts write it: a periodic evaluation at iteration 1, the final one at the end. With
    lr: a run of the learning-rate control (its exp name, half the budget)."""
    opts = Opts(runs, lr)
    folder = runs / f"{env_id}__{study.exp_name(opts, algo)}__{seed}__1"
    folder.mkdir(parents=True)
    args = dict(seed=seed, num_seeds=num_seeds, total_timesteps=study.budget(opts, env_id), num_envs=16, num_steps=128,
                eval_episodes=128, final_eval_episodes=512, agent_ids=True, shuffle_agents=True, anneal_lr=False,
                learning_rate=lr or 5e-4)  # fmt: skip
    (folder / "args.json").write_text(json.dumps(args))
    iterations = args["total_timesteps"] // 2048
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["iteration", "seed", "global_step", "charts/episodic_return", "eval/episodic_return",
                               "eval/success"])  # fmt: skip
        w.writeheader()
        for k in range(num_seeds):
            w.writerow({"iteration": 1, "seed": seed + k, "global_step": 2048, "charts/episodic_return": 0.1,
                        "eval/episodic_return": returns[k] / 2, "eval/success": 1.0})  # fmt: skip
        for k in range(num_seeds * complete):  # the final evaluation's rows: eval/* only
            w.writerow({"iteration": iterations, "seed": seed + k, "global_step": iterations * 2048,
                        "charts/episodic_return": "", "eval/episodic_return": returns[k], "eval/success": 2.0})  # fmt: skip
    (folder / "timing.csv").write_text("iteration,global_step,SPS,seconds\n1,2048,1.0,3600.0\n")
    if complete:
        summary = {"seconds": 7200.0, "absolute/iteration": [iterations] * num_seeds,
                   "absolute/episodic_return": [r + 0.01 for r in returns], "absolute/success": [3.0] * num_seeds}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def Opts(runs, learning_rate=None):
    return type("Opts", (), dict(runs_dir=str(runs), learning_rate=learning_rate, bootstrap_reps=100))


def test_report_reads_the_runs_and_keeps_committed_seeds(tmp_path, monkeypatch):
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    monkeypatch.setattr(study, "OUT", str(out))
    env_id = "lbf-2s-10x10-3p-3f"
    steps = study.TASKS[env_id][0] // 2048 * 2048
    write_run(runs, env_id, "mam", 1, 3, True, [0.8, 0.7, 0.9])
    write_run(runs, env_id, "mat", 1, 5, False, [0.8] * 5)  # in progress: a curve, no final
    opts = Opts(runs)
    evals, records = study.collect(opts)
    mam = [r for r in evals if r["algo"] == "mam"]
    assert [(r["seed"], r["kind"]) for r in mam] == [
        (s, k) for s in (1, 2, 3) for k in ("eval", "final", "absolute")
    ]
    assert [r["episodic_return"] for r in mam if r["kind"] == "final"] == [0.8, 0.7, 0.9]
    assert [r["episodes"] for r in mam[:3]] == [128, 512, 1280]
    assert mam[1]["global_step"] == steps
    assert {r["status"] for r in records} == {"complete", "in progress"}
    assert study.complete_seeds(evals, env_id, "mat") == {}
    # committed rows of seeds 4-5 (another machine) join seeds 1-3 found here; seeds 1-3's committed rows do not
    committed = [dict(r, seed=s) for s in (1, 4, 5) for r in mam if r["seed"] == 1]
    study.write_csv(out / "study_evals.csv", committed)
    study.write_csv(out / "study_runs.csv", [dict(records[0], seeds="4-5", run_dir="runs/elsewhere")])
    evals, records = study.collect(opts)
    assert sorted(study.complete_seeds(evals, env_id, "mam")) == [1, 2, 3, 4, 5]
    assert len([r for r in evals if r["algo"] == "mam" and r["seed"] == 1]) == 3
    assert "runs/elsewhere" in {r["run_dir"] for r in records}


def test_the_learning_rate_control_has_its_own_runs_and_report(tmp_path, monkeypatch):
    out, runs = tmp_path / "study", tmp_path / "runs"
    out.mkdir()
    monkeypatch.setattr(study, "OUT", str(out))
    env_id = "rware-tiny-4ag"
    write_run(runs, env_id, "mam", 1, 5, True, [10.0] * 5)
    write_run(runs, env_id, "mam", 1, 5, True, [20.0] * 5, lr=1e-3)
    control = Opts(runs, 1e-3)
    assert study.out_dir(control) == str(tmp_path / "study_lr0.001")
    assert study.budget(control, env_id) == study.TASKS[env_id][0] // 2
    for opts, value in [(Opts(runs), 10.0), (control, 20.0)]:
        evals, records = study.collect(opts)
        assert [r["episodic_return"] for r in evals if r["kind"] == "final"] == [value] * 5
        assert [r["learning_rate"] for r in records] == [opts.learning_rate or 5e-4]
        final = max(r["global_step"] for r in evals)
        assert final == study.budget(opts, env_id) // 2048 * 2048
    study.report(control)  # the control's files go to its own folder; the study's stay untouched
    assert (tmp_path / "study_lr0.001" / "study_final.csv").exists() and not (
        out / "study_final.csv"
    ).exists()


def test_marl_eval_json_layout():
    rows = [dict(env_id="lbf-2s-10x10-3p-3f", algo="mam", seed=1, kind=k, global_step=s, episodic_return=v)
            for k, s, v in [("eval", 98304, 0.3), ("final", 999424, 0.8), ("absolute", 999424, 0.82)]]  # fmt: skip
    data = study.marl_eval_json(rows)
    run = data["lbf"]["2s-10x10-3p-3f"]["mam"]["seed_1"]
    assert run["step_0"] == {"step_count": 98304, "mean_episode_return": [0.3]}
    assert run["step_1"] == {"step_count": 999424, "mean_episode_return": [0.8]}
    assert run["absolute_metrics"] == {"mean_episode_return": [0.82]}


def test_the_control_trains_with_its_rate_and_half_the_budget(tmp_path, monkeypatch):
    commands = []

    class Popen:  # records the script's command line instead of training
        def __init__(self, cmd, **kwargs):
            commands.append(cmd)
            self.stdout = []

        def wait(self):
            return 0

    monkeypatch.setattr(study, "OUT", str(tmp_path / "study"))
    monkeypatch.setattr(study.subprocess, "Popen", Popen)
    for lr in (None, 1e-3):
        opts = Opts(tmp_path / "runs", lr)
        opts.seed, opts.num_seeds = 2, 1
        assert study.train(opts, "rware-tiny-4ag", "mat") == 0
    study_cmd, control_cmd = commands
    flag = lambda cmd, name: cmd[cmd.index(name) + 1] if name in cmd else None
    assert flag(study_cmd, "--learning-rate") is None and flag(control_cmd, "--learning-rate") == "0.001"
    assert (
        flag(study_cmd, "--total-timesteps") == "3000000"
        and flag(control_cmd, "--total-timesteps") == "1500000"
    )
    assert (
        flag(study_cmd, "--exp-name") == "study_mat"
        and flag(control_cmd, "--exp-name") == "study_lr0.001_mat"
    )
    assert flag(control_cmd, "--eval-every") == str(1_500_000 // 2048 // 10)
