"""Learning curves of MAM vs MAT vs MAPPO: team return against env steps, mean and 95% CI over seeds.

Run mode (default) trains each algorithm (mam = mam_ppo.py, mat = mat_ppo.py, mappo = mappo.py, each with its
own defaults) on each task, one run after another, with --num-seeds seeds in one process and the exp name
`learning_{algo}`; each run's output is also written to {runs-dir}/learning_logs/. A (task, algo) that already
has a complete run (summary.json present, the same seed, env steps and number of seeds) is skipped unless
--force. learning_runs.csv in --out-dir records which run folder belongs to which (task, algo).

Report mode (--report-only, and always after running) reads every run recorded in learning_runs.csv
(without that file: the newest complete run of each --env-ids x --algos, found by folder name) and writes
to --out-dir:
  learning_curves.csv  per (env_id, algo, global_step): mean over seeds of charts/episodic_return (training,
                       sampled actions) with a 95% bootstrap CI (seeds resampled with replacement, 10000
                       resamples, percentile interval, fixed RNG seed). An iteration where no episode
                       ended (NaN) carries forward the seed's last finite value; --smooth K then averages
                       each seed's last K iterations (default 1: no smoothing).
  learning_final.csv   per (env_id, algo): the final greedy eval return (mean, 95% bootstrap CI, per seed),
                       the last iteration's training return (after carry-forward), env steps and seconds.
  learning.png         one panel per task: mean line and CI band per algo.
and prints a markdown table of the final greedy returns.

    python benchmarks/learning.py                                    # 3 tasks x 3 algos x 3 seeds
    python benchmarks/learning.py --algos mappo mat --env-ids lbf-8x8-2p-2f-coop --timesteps 200000
    python benchmarks/learning.py --report-only --smooth 5
"""

import argparse
import ast
import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"mam": "mam_ppo.py", "mat": "mat_ppo.py", "mappo": "mappo.py"}
COLORS = {"mam": "tab:red", "mat": "tab:blue", "mappo": "tab:green"}
r4 = lambda x: round(float(x), 4)
RUN_FIELDS = ["env_id", "algo", "run_dir", "total_timesteps", "num_seeds", "seconds"]


def rel(path):
    """Relative to the repository root when inside it."""
    return path if os.path.relpath(path, ROOT).startswith("..") else os.path.relpath(path, ROOT)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def script_defaults(script):
    """Args defaults and ENVS keys read from the script's source (no jax import)."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    defaults, envs = {}, []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.value, ast.Constant):
                    defaults[item.target.id] = item.value.value
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "ENVS":
            envs = [k.value for k in node.value.keys if k is not None]  # None: the **SMAX entries
    return defaults, envs


def read_run(run_dir):
    """summary.json and the training rows of metrics.csv as {seed: [(global_step, return), ...]}."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    seeds = {}
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row["charts/episodic_return"] != "":  # the final eval row has only eval/* filled
                seeds.setdefault(int(row["seed"]), []).append(
                    (int(row["global_step"]), float(row["charts/episodic_return"]))
                )
    return summary, seeds


def find_complete(runs_dir, env_id, algo, seed=None, global_step=None, num_seeds=None):
    """Newest complete run folder named {env_id}__learning_{algo}__{seed}__..., matching what is given."""
    prefix = f"{env_id}__learning_{algo}__" + (f"{seed}__" if seed is not None else "")
    found = []
    for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else []:
        done = os.path.join(runs_dir, name, "summary.json")
        if name.startswith(prefix) and os.path.exists(done):
            summary, seeds = read_run(os.path.dirname(done))
            if global_step in (None, summary.get("global_step")) and num_seeds in (None, len(seeds)):
                found.append((os.path.getmtime(done), os.path.dirname(done)))
    return max(found)[1] if found else None


def load_runs_csv(path):
    with open(path) if os.path.exists(path) else open(os.devnull) as f:
        return {(r["env_id"], r["algo"]): r for r in csv.DictReader(f)}


def write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def launch(opts, env_id, algo, steps, log_path):
    """Run one script to completion, teeing its output; returns its run folder (from its `run: ...` line)."""
    batch = opts.batch[algo]
    every = opts.eval_every if opts.eval_every is not None else max(1, steps // batch // 10)
    flags = {"--env-id": env_id, "--total-timesteps": steps, "--num-seeds": opts.num_seeds,
             "--seed": opts.seed, "--exp-name": f"learning_{algo}", "--eval-every": every,
             "--eval-episodes": opts.eval_episodes}  # fmt: skip
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[algo]), *(str(x) for kv in flags.items() for x in kv)]
    print(f"\n=== {env_id} / {algo}: {' '.join(cmd[1:])}  (log: {log_path})", flush=True)
    run_dir = None
    with open(log_path, "w") as log:  # cwd = the parent of runs-dir: the scripts write to ./runs/
        proc = subprocess.Popen(cmd, cwd=os.path.dirname(opts.runs_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.startswith("run: "):
                run_dir = os.path.join(os.path.dirname(opts.runs_dir), line[5:].split("  ")[0].strip())
        proc.wait()
    if proc.returncode != 0 or run_dir is None or not os.path.exists(os.path.join(run_dir, "summary.json")):
        print(f"FAILED: {env_id} / {algo} (exit code {proc.returncode}; see {log_path})", flush=True)
        return None
    return run_dir


def run_all(opts, runs_csv):
    """Train every (task, algo) lacking a complete run; record each run folder as soon as it is known."""
    records, failed = load_runs_csv(runs_csv), []
    os.makedirs(os.path.join(opts.runs_dir, "learning_logs"), exist_ok=True)
    for env_id in opts.env_ids:
        for algo in opts.algos:
            steps = opts.steps[env_id]
            expected = steps // opts.batch[algo] * opts.batch[algo]  # the scripts run whole iterations
            found = find_complete(opts.runs_dir, env_id, algo, opts.seed, expected, opts.num_seeds)
            if found and not opts.force:
                print(f"skip {env_id} / {algo}: complete run {found}")
                run_dir = found
            else:
                log = os.path.join(opts.runs_dir, "learning_logs", f"{env_id}__learning_{algo}.log")
                run_dir = launch(opts, env_id, algo, steps, log)
                if run_dir is None:
                    failed.append(f"{env_id}/{algo}")
                    continue
            summary, seeds = read_run(run_dir)
            records[(env_id, algo)] = dict(env_id=env_id, algo=algo, run_dir=rel(run_dir),
                                           total_timesteps=summary["global_step"], num_seeds=len(seeds),
                                           seconds=round(summary["seconds"], 1))  # fmt: skip
            write_csv(runs_csv, list(records.values()), RUN_FIELDS)
    return failed


def seed_matrix(seeds, smooth):
    """(n_seeds, n_iterations) training returns: NaN carried forward per seed, then a trailing K-mean."""
    steps = np.array([s for s, _ in next(iter(seeds.values()))])
    values = np.array([[r for _, r in rows] for rows in seeds.values()])
    for k in range(1, values.shape[1]):  # carry forward the last finite value (leading NaNs stay)
        values[:, k] = np.where(np.isnan(values[:, k]), values[:, k - 1], values[:, k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows before the first episode ended
        windows = [np.nanmean(values[:, max(0, k - smooth + 1) : k + 1], axis=1) for k in range(len(steps))]
    return steps, values, np.stack(windows, axis=1)


def bootstrap(values, seed=0, n_boot=10000):
    """values (n_seeds, T), NaN = missing: mean over seeds, 95% percentile CI (resampled seeds), count."""
    n = values.shape[0]
    counts, picks = np.zeros((n_boot, n)), np.random.default_rng(seed).integers(0, n, (n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1)  # how often each seed is drawn
    finite = np.isfinite(values)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        means = (counts @ np.where(finite, values, 0.0)) / (counts @ finite)  # nanmean of each resample
        low, high = np.nanpercentile(means, [2.5, 97.5], axis=0)
        return np.nanmean(values, axis=0), low, high, finite.sum(0)


def report(opts, runs_csv):
    records = load_runs_csv(runs_csv)
    if not records:  # no record: the newest complete run of each (task, algo) by its folder name
        for env_id in opts.env_ids:
            for algo in opts.algos:
                if run_dir := find_complete(opts.runs_dir, env_id, algo):
                    records[(env_id, algo)] = dict(env_id=env_id, algo=algo, run_dir=rel(run_dir))
    curves, finals, plot = [], [], {}
    for (env_id, algo), rec in records.items():
        run_dir = os.path.join(ROOT, rec["run_dir"])
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            print(f"skip {env_id} / {algo}: {run_dir} is missing or incomplete")
            continue
        summary, seeds = read_run(run_dir)
        steps, raw, smoothed = seed_matrix(seeds, opts.smooth)
        mean, low, high, n = bootstrap(smoothed)
        curves += [dict(env_id=env_id, algo=algo, global_step=int(s), episodic_return=r4(m), ci_low=r4(lo),
                        ci_high=r4(hi), n_seeds=int(k))
                   for s, m, lo, hi, k in zip(steps, mean, low, high, n)]  # fmt: skip
        plot.setdefault(env_id, {})[algo] = (steps, mean, low, high, len(seeds))
        final = np.array(summary["eval/episodic_return"], dtype=float)
        fm, flo, fhi, _ = bootstrap(final[:, None])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no episode ended at all: NaN
            last = np.nanmean(raw[:, -1])
        finals.append(dict(env_id=env_id, algo=algo, eval_return=r4(fm[0]), ci_low=r4(flo[0]),
                           ci_high=r4(fhi[0]), eval_per_seed=";".join(f"{v:g}" for v in final),
                           n_seeds=len(final), train_return_last=r4(last),
                           total_timesteps=summary["global_step"],
                           seconds=round(summary["seconds"], 1), run_dir=rec["run_dir"]))  # fmt: skip
    if not finals:
        fail(f"no complete learning runs found ({runs_csv} or {opts.runs_dir})")
    os.makedirs(opts.out_dir, exist_ok=True)
    write_csv(os.path.join(opts.out_dir, "learning_curves.csv"), curves, list(curves[0]))
    write_csv(os.path.join(opts.out_dir, "learning_final.csv"), finals, list(finals[0]))

    tasks = list(plot)
    algos = [a for a in SCRIPTS if any(a in plot[t] for t in tasks)]
    print(f"\nFinal greedy eval return, mean [95% bootstrap CI] over seeds\n\n| task | {' | '.join(algos)} |")
    print("|---" * (len(algos) + 1) + "|")
    cell = {(r["env_id"], r["algo"]): f"{r['eval_return']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            for r in finals}  # fmt: skip
    for t in tasks:
        print(f"| {t} | " + " | ".join(cell.get((t, a), "-") for a in algos) + " |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for a in algos:
            if a in plot[t]:
                steps, mean, low, high, _ = plot[t][a]
                ax.plot(steps, mean, color=COLORS[a], label=a, lw=1.5)
                ax.fill_between(steps, low, high, color=COLORS[a], alpha=0.2, lw=0)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("env steps (per seed)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("episodic return (sampled)")
    axes[0][0].legend(fontsize=8)
    n_seeds = sorted({v[4] for p in plot.values() for v in p.values()})
    note = f"mean and 95% bootstrap CI over {'/'.join(map(str, n_seeds))} seeds"
    fig.text(0.99, 0.01, note + (f", moving average of {opts.smooth} iterations" if opts.smooth > 1 else ""),
             ha="right", va="bottom", fontsize=7, color="gray")  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    png = os.path.join(opts.out_dir, "learning.png")
    fig.savefig(png, dpi=100)
    print(f"\nsaved {png} and the CSVs in {opts.out_dir}")


def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--env-ids", nargs="+", default=["rware-tiny-2ag", "lbf-2s-8x8-2p-2f-coop", "con-5x5x3a"])
    add("--algos", nargs="+", default=list(SCRIPTS), help="any of mam, mat, mappo")
    add("--timesteps", type=int, default=500_000, help="env steps per seed, every task")
    add("--timesteps-per-task", nargs="+", default=[], metavar="ENV=STEPS", help="overrides --timesteps")
    add("--num-seeds", type=int, default=3)
    add("--seed", type=int, default=1)
    add("--eval-every", type=int, default=None, help="in iterations (0: only at the end; default: ~10 evals)")
    add("--eval-episodes", type=int, default=32)
    add("--smooth", type=int, default=1, help="moving average over K iterations per seed (1: none)")
    add("--force", action="store_true", help="train again even when a complete run exists")
    add("--report-only", action="store_true", help="no training: report the recorded runs")
    add("--out-dir", default="benchmarks/results", help="relative to the repository root")
    add("--runs-dir", default="runs", help="where the scripts write (a folder named runs)")
    opts = parser.parse_args(argv)

    opts.out_dir = os.path.normpath(os.path.join(ROOT, opts.out_dir))  # relative: to the repository root
    opts.runs_dir = os.path.normpath(os.path.join(ROOT, opts.runs_dir))
    if bad := [a for a in opts.algos if a not in SCRIPTS]:
        fail(f"unknown algo {' '.join(bad)} (choose from {', '.join(SCRIPTS)})")
    if bad := [e for e in opts.env_ids if e not in script_defaults("mappo.py")[1]]:
        fail(f"unknown env id {' '.join(bad)} (see the table in README.md)")
    if bad := [n for n in ("num_seeds", "eval_episodes", "smooth", "timesteps") if getattr(opts, n) < 1]:
        fail(f"--{bad[0].replace('_', '-')} must be positive (got {getattr(opts, bad[0])})")
    if (opts.eval_every or 0) < 0:
        fail(f"--eval-every must be 0 (only at the end) or more (got {opts.eval_every})")
    if os.path.basename(opts.runs_dir) != "runs":
        fail(f"--runs-dir must be a folder named runs, as the scripts write to ./runs (got {opts.runs_dir})")
    opts.steps = dict.fromkeys(opts.env_ids, opts.timesteps)
    for item in opts.timesteps_per_task:
        env_id, _, steps = item.partition("=")
        if env_id not in opts.env_ids or not steps.isdigit():
            fail(f"--timesteps-per-task {item}: expected ENV=STEPS with ENV one of --env-ids")
        opts.steps[env_id] = int(steps)
    defaults = {a: script_defaults(SCRIPTS[a])[0] for a in opts.algos}  # the scripts' own batch sizes
    opts.batch = {a: d["num_envs"] * d["num_steps"] for a, d in defaults.items()}
    if bad := [a for a in opts.algos if min(opts.steps.values()) < opts.batch[a]]:
        fail(f"timesteps below one batch of {SCRIPTS[bad[0]]} ({opts.batch[bad[0]]} steps)")
    return opts


def main():
    opts = parse()
    runs_csv = os.path.join(opts.out_dir, "learning_runs.csv")
    failed = []
    if not opts.report_only:
        os.makedirs(opts.out_dir, exist_ok=True)
        failed = run_all(opts, runs_csv)
    report(opts, runs_csv)
    if failed:
        fail(f"runs failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
