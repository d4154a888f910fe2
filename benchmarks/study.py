"""Does MAM match MAT? The study: the paper's protocol at CPU-sized budgets, 5 seeds, honest statistics.

Protocol (the paper's code, on our CPU-sized networks and batch geometry, the same for MAM and MAT): agent ids
and the agent shuffle on (the scripts' defaults), learning rate 5e-4 constant (--no-anneal-lr), an evaluation
every 10% of the budget (128 sampled episodes per seed), a final evaluation of 512 episodes, and marl-eval's
absolute metric (each seed's best evaluated params, re-evaluated with 1280 episodes). MAPPO, with its own
defaults and the same evaluations, is the reference.

Run mode (default) trains each (task, algo) of --env-ids x --algos that lacks a complete run of the seed group
--seed .. --seed + --num-seeds - 1, one after another, each group in one process (the scripts' --num-seeds):
seed k of a group equals a run with seed + k, so a study can be split by seed across sessions and machines.
A run in progress (its checkpoint, every 10 iterations) is resumed; Ctrl-C (or `kill -INT -- -PGID`) stops the
running script after its iteration, with a checkpoint. Each run's output goes to runs/study_logs/.

Report mode (--report-only, and always after running) collects every seed of every task and algo: from the run
folders in runs/ (exp name study_{algo}) and, for seeds with no folder here, from the committed
study_evals.csv (runs made on another machine). It writes to benchmarks/results/study/:
  study_evals.csv      every evaluation of every seed: kind eval (periodic, 128 episodes), final (512) or
                       absolute (1280, the best params; `iteration` = the iteration they come from).
  study_runs.csv       one row per run folder: task, algo, seeds, steps done, hours, status, protocol flags.
  study_final.csv      per (task, algo, kind final/absolute): per-seed values, mean, t-based 95% CI over seeds.
  study_curves.csv     per (task, algo, env steps): mean and t-based 95% CI of the evaluations over seeds.
  study_gap.csv        per (task, env steps): MAM - MAT, ours (Welch t 95% CI) and the paper's at the nearest
                       evaluation of its data within 20% of those steps (paper_evaluations.csv, 10 seeds).
  study_aggregate.csv  over the tasks where MAM and MAT are complete: IQM and mean of min-max normalised returns
                       (per task, over every algo's seeds) and the probability of improvement, with 95%
                       stratified-bootstrap CIs, from rliable, which marl-eval wraps: `pip install
                       id-marl-eval` (0.0.4, its last release) fails beside this stack, as it pins pandas==1.4.4,
                       which has no wheel for Python 3.11 and whose source build fails (and predates numpy 2).
  study_marl_eval.json every run in marl-eval's raw-data format (env / task / algo / seed_k / step_i), metric
                       mean_episode_return as a one-element list: the mean over that evaluation's episodes, as
                       in the paper's own files.
  study.png, study_aggregate.png   the curves (ours solid, the paper's dashed) and the aggregate.

Calibrate mode (--calibrate) measures the cost of each (task, algo) of --env-ids x --algos: a run of 8
iterations with --num-seeds seeds and no evaluation, the median seconds per iteration after the first, and the
hours that makes for 5 seeds (study_cost.csv): the plan of a study split across sessions.

The learning-rate control (--learning-rate 1e-3) is the same protocol with that constant rate, on half the
task's budget: its runs have the exp name study_lr0.001_{algo} and its report (the same files) goes to
benchmarks/results/study_lr0.001/; compare it with the study's curves at the same env steps.

paper_evaluations.csv is an extract of the MAM paper's per-seed evaluations (the authors' marl-eval fork,
JemmaLDaniel/marl-eval: concatenated_json_files_lbf/metrics.json and concatenated_json_files_smax/metrics.json at
commit 52edea2, concatenated_json_files_rware/metrics_new.json at commit fcf270a): the three tasks of ours it
covers, evaluations up to 3.4M steps, the last one (20M) and the absolute metric.

    python benchmarks/study.py --env-ids lbf-2s-10x10-3p-3f --algos mat mam mappo    # train, then report
    python benchmarks/study.py --env-ids rware-tiny-4ag --algos mam --seed 3 --num-seeds 2   # one seed group
    python benchmarks/study.py --report-only                                          # tables and plots
    python benchmarks/study.py --env-ids rware-tiny-4ag --algos mam mat --learning-rate 1e-3  # the control
"""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "study")
SCRIPTS = {"mam": "mam_ppo.py", "mat": "mat_ppo.py", "mappo": "mappo.py"}
COLORS = {"mam": "tab:red", "mat": "tab:blue", "mappo": "tab:green"}
SEEDS = 5
# env_id: (env steps per seed, (family, task) in paper_evaluations.csv or None). The order is the study's.
TASKS = {
    "lbf-2s-10x10-3p-3f": (1_000_000, ("lbf", "2s-10x10-3p-3f")),
    "rware-tiny-4ag": (3_000_000, ("rware", "tiny-4ag")),
    "smax-smacv2_10_units": (1_000_000, ("smax", "smacv2_10_units")),
    "con-10x10x10a": (1_000_000, None),  # no Connector task in the paper
}
BATCH = 16 * 128  # num_envs x num_steps: the three scripts' default geometry
PROTOCOL = ["--no-anneal-lr", "--eval-episodes", "128", "--final-eval-episodes", "512", "--absolute-metric",
            "--checkpoint-every", "10"]  # fmt: skip
STOP = []  # the exit code the study stops with, once signalled


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_csv(path, rows, fields=None):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def r4(x):
    return "" if x is None or not np.isfinite(x) else round(float(x), 4)


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------
def t_interval(values):
    """Mean and t-based 95% CI over seeds: mean -+ t(0.975, n-1) * sd / sqrt(n). -> (mean, low, high, n)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    if n == 1:
        return x[0], np.nan, np.nan, 1
    half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / np.sqrt(n)
    return x.mean(), x.mean() - half, x.mean() + half, n


def welch_interval(a, b):
    """mean(a) - mean(b) with Welch's t-based 95% CI (unequal variances). -> (diff, low, high)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return a.mean() - b.mean() if len(a) and len(b) else np.nan, np.nan, np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), np.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    return diff, diff - half, diff + half


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def budget(opts, env_id):
    """Env steps per seed: the task's, or half of them in the learning-rate control."""
    return TASKS[env_id][0] // (2 if opts.learning_rate else 1)


def exp_name(opts, algo):
    return f"study_lr{opts.learning_rate:g}_{algo}" if opts.learning_rate else f"study_{algo}"


def out_dir(opts):
    """Where the report goes: the study's folder, or the learning-rate control's beside it."""
    return f"{OUT}_lr{opts.learning_rate:g}" if opts.learning_rate else OUT


def run_folders(opts, env_id, algo):
    """The study's run folders of (task, algo) in opts.runs_dir: [(folder, args, complete)], newest first."""
    found = []
    for name in os.listdir(opts.runs_dir) if os.path.isdir(opts.runs_dir) else []:
        folder = os.path.join(opts.runs_dir, name)
        if not name.startswith(f"{env_id}__{exp_name(opts, algo)}__"):
            continue
        try:
            with open(os.path.join(folder, "args.json")) as f:
                args = json.load(f)
        except (OSError, ValueError):
            continue
        if args["total_timesteps"] != budget(opts, env_id):
            continue
        complete = os.path.exists(os.path.join(folder, "summary.json"))
        found.append((os.path.getmtime(os.path.join(folder, "args.json")), folder, args, complete))
    return [(folder, args, complete) for _, folder, args, complete in sorted(found, reverse=True)]


def train(opts, env_id, algo):
    """Train (or resume) the seed group of (task, algo) unless a complete run of it exists. -> exit code."""
    steps = budget(opts, env_id)
    group = (opts.seed, opts.num_seeds)
    runs = [(f, c) for f, a, c in run_folders(opts, env_id, algo) if (a["seed"], a["num_seeds"]) == group]
    if any(complete for _, complete in runs):
        print(f"skip {env_id} / {algo} / seeds {opts.seed}..{opts.seed + opts.num_seeds - 1}: complete")
        return 0
    committed = {(int(r["seed"])) for r in read_csv(os.path.join(out_dir(opts), "study_evals.csv"))
                 if (r["env_id"], r["algo"], r["kind"]) == (env_id, algo, "absolute")}  # fmt: skip
    if set(range(opts.seed, opts.seed + opts.num_seeds)) <= committed and not runs:
        print(
            f"skip {env_id} / {algo} / seeds {opts.seed}..: complete in {os.path.relpath(out_dir(opts), ROOT)}"
        )
        return 0
    script = os.path.join(ROOT, SCRIPTS[algo])
    resumable = [f for f, _ in runs if os.path.exists(os.path.join(f, "checkpoint.msgpack"))]
    if resumable:
        cmd = [
            sys.executable,
            script,
            "--resume",
            os.path.relpath(resumable[0], os.path.dirname(opts.runs_dir)),
        ]
    else:
        every = steps // BATCH // 10  # 10 evaluations, the last at 100% being the final one
        cmd = [sys.executable, script, "--env-id", env_id, "--total-timesteps", str(steps), "--seed",
               str(opts.seed), "--num-seeds", str(opts.num_seeds), "--exp-name", exp_name(opts, algo),
               "--eval-every", str(every), *PROTOCOL]  # fmt: skip
        if opts.learning_rate:
            cmd += ["--learning-rate", str(opts.learning_rate)]
    os.makedirs(os.path.join(opts.runs_dir, "study_logs"), exist_ok=True)
    log_path = os.path.join(
        opts.runs_dir, "study_logs", f"{env_id}__{algo}__{opts.seed}_{opts.num_seeds}.log"
    )
    print(f"\n=== {' '.join(cmd[1:])}  (log: {os.path.relpath(log_path, ROOT)})", flush=True)
    with open(log_path, "a") as log:  # the scripts write ./runs: run them from the parent of runs_dir
        proc = subprocess.Popen(cmd, cwd=os.path.dirname(opts.runs_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        for line in proc.stdout:  # a signal to the process group reaches the script too: keep reading
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def calibrate(opts, env_id, algo, iterations=8):
    """The cost of (task, algo) with --num-seeds seeds in one process: a short run without evaluations; the median
    of its iterations after the first (which pays the compile). -> a row of study_cost.csv, or None."""
    steps = TASKS[env_id][0]
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[algo]), "--env-id", env_id, "--total-timesteps",
           str(iterations * BATCH), "--num-seeds", str(opts.num_seeds), "--exp-name", f"calibrate_{algo}",
           "--eval-every", "0", "--eval-episodes", "1", "--checkpoint-every", "0", *PROTOCOL[:1]]  # fmt: skip
    print(f"\n=== calibrate: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=os.path.dirname(opts.runs_dir), capture_output=True, text=True)
    run = [line[5:].split("  ")[0] for line in proc.stdout.splitlines() if line.startswith("run: ")]
    if proc.returncode != 0 or not run:
        print(f"FAILED: calibrate {env_id} / {algo}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    seconds = [
        float(r["seconds"])
        for r in read_csv(os.path.join(os.path.dirname(opts.runs_dir), run[0], "timing.csv"))
    ]
    per_iteration = float(np.median(np.diff(seconds)))
    hours = per_iteration * (steps // BATCH) / 3600 * SEEDS / opts.num_seeds
    print(f"{env_id} / {algo}: {per_iteration:.2f} s per iteration of {opts.num_seeds} seeds", flush=True)
    return dict(env_id=env_id, algo=algo, num_seeds=opts.num_seeds, seconds_per_iteration=round(per_iteration, 2),
                iterations=steps // BATCH, hours_for_5_seeds=round(hours, 2), machine=machine())  # fmt: skip


def machine():
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, cpu"


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def read_run(env_id, algo, folder, args, complete):
    """-> (evaluation rows of every seed, the run's row for study_runs.csv)."""
    iterations = args["total_timesteps"] // (args["num_envs"] * args["num_steps"])
    episodes = {"eval": args["eval_episodes"], "final": args["final_eval_episodes"] or args["eval_episodes"],
                "absolute": 10 * args["eval_episodes"]}  # fmt: skip
    rows = []
    for r in read_csv(os.path.join(folder, "metrics.csv")):
        if r["eval/episodic_return"] == "":
            continue
        kind = "final" if r["charts/episodic_return"] == "" and int(r["iteration"]) == iterations else "eval"
        rows.append(dict(env_id=env_id, algo=algo, seed=int(r["seed"]), kind=kind, iteration=int(r["iteration"]),
                         global_step=int(r["global_step"]), episodes=episodes[kind],
                         episodic_return=r4(float(r["eval/episodic_return"])),
                         success=r4(float(r["eval/success"]))))  # fmt: skip
    timing = read_csv(os.path.join(folder, "timing.csv"))
    seconds = float(timing[-1]["seconds"]) if timing else 0.0
    if complete:
        summary = json.load(open(os.path.join(folder, "summary.json")))
        seconds = summary["seconds"]
        for k in range(args["num_seeds"]):
            rows.append(dict(env_id=env_id, algo=algo, seed=args["seed"] + k, kind="absolute",
                             iteration=int(summary["absolute/iteration"][k]),
                             global_step=int(summary["absolute/iteration"][k]) * BATCH, episodes=episodes["absolute"],
                             episodic_return=r4(summary["absolute/episodic_return"][k]),
                             success=r4(summary["absolute/success"][k])))  # fmt: skip
    done = int(timing[-1]["global_step"]) if timing else 0
    record = dict(env_id=env_id, algo=algo, seeds=f"{args['seed']}-{args['seed'] + args['num_seeds'] - 1}",
                  run_dir=os.path.join("runs", os.path.basename(folder)), total_timesteps=args["total_timesteps"], steps_done=done,
                  hours=round(seconds / 3600, 2), status="complete" if complete else "in progress",
                  agent_ids=args.get("agent_ids", ""), shuffle_agents=args.get("shuffle_agents", ""),
                  anneal_lr=args["anneal_lr"], learning_rate=args["learning_rate"])  # fmt: skip
    return rows, record


def collect(opts):
    """Every seed's evaluations and every run's record: run folders here, then the committed rows of seeds that
    have no folder here."""
    evals, records, here = [], [], set()
    for env_id in TASKS:
        for algo in SCRIPTS:
            taken = set()  # seeds read from a newer folder
            for folder, args, complete in run_folders(opts, env_id, algo):
                seeds = set(range(args["seed"], args["seed"] + args["num_seeds"]))
                if seeds & taken:
                    continue
                rows, record = read_run(env_id, algo, folder, args, complete)
                evals += rows
                records.append(record)
                taken |= seeds
            here |= {(env_id, algo, s) for s in taken}
    evals += [
        r
        for r in read_csv(os.path.join(out_dir(opts), "study_evals.csv"))
        if (r["env_id"], r["algo"], int(r["seed"])) not in here
    ]
    records += [r for r in read_csv(os.path.join(out_dir(opts), "study_runs.csv")) if r["run_dir"] not in {x["run_dir"] for x in records}
                and not any((r["env_id"], r["algo"], s) in here for s in seeds_of(r))]  # fmt: skip
    for r in evals:  # committed rows are strings
        for k in ("seed", "iteration", "global_step", "episodes"):
            r[k] = int(r[k])
        r["episodic_return"] = float(r["episodic_return"])
    order = lambda r: (
        list(TASKS).index(r["env_id"]),
        list(SCRIPTS).index(r["algo"]),
        r["seed"],
        r["kind"] == "absolute",
        r["global_step"],
    )
    by_run = lambda r: (list(TASKS).index(r["env_id"]), list(SCRIPTS).index(r["algo"]), seeds_of(r)[0])
    return sorted(evals, key=order), sorted(records, key=by_run)


def seeds_of(record):
    first, last = (int(x) for x in record["seeds"].split("-"))
    return range(first, last + 1)


def complete_seeds(evals, env_id, algo):
    """The seeds of (task, algo) with a final evaluation -> {seed: {kind: value}}."""
    out = {}
    for r in evals:
        if (r["env_id"], r["algo"]) == (env_id, algo) and r["kind"] in ("final", "absolute"):
            out.setdefault(r["seed"], {})[r["kind"]] = r["episodic_return"]
    return {s: v for s, v in out.items() if len(v) == 2}


def curve(evals, env_id, algo):
    """{global_step: [values of the seeds]} of the periodic and final evaluations."""
    points = {}
    for r in evals:
        if (r["env_id"], r["algo"]) == (env_id, algo) and r["kind"] in ("eval", "final"):
            points.setdefault(r["global_step"], []).append(r["episodic_return"])
    return dict(sorted(points.items()))


def read_paper():
    """{(family, task): {algo: {step: [values over seeds]}}}, step 'absolute' for the absolute metric."""
    paper = {}
    for r in read_csv(os.path.join(OUT, "paper_evaluations.csv")):
        step = r["step_count"] if r["step_count"] == "absolute" else int(r["step_count"])
        task = paper.setdefault((r["family"], r["task"]), {}).setdefault(r["algo"], {})
        task.setdefault(step, []).append(float(r["mean_episode_return"]))
    return paper


def paper_at(paper_task, algo, step):
    """The paper's evaluation nearest to `step` (its evaluation steps differ from ours), if within 20% of it:
    -> (its step, values), or (None, [])."""
    points = {s: v for s, v in paper_task.get(algo, {}).items() if s != "absolute"}
    nearest = min(points, key=lambda s: abs(s - step), default=None)
    if nearest is None or abs(nearest - step) > 0.2 * step:
        return None, []
    return nearest, points[nearest]


def aggregate(evals, kind, reps):
    """rliable over the tasks where MAM and MAT are complete (MAPPO joins where it is complete on all of them)."""
    tasks = [t for t in TASKS if all(len(complete_seeds(evals, t, a)) == SEEDS for a in ("mam", "mat"))]
    if not tasks:
        return [], []
    algos = [a for a in SCRIPTS if all(len(complete_seeds(evals, t, a)) == SEEDS for t in tasks)]
    from rliable import library as rly
    from rliable import metrics

    scores = {(t, a): np.array([v[kind] for _, v in sorted(complete_seeds(evals, t, a).items())])
              for t in tasks for a in algos}  # fmt: skip
    matrices = {a: np.zeros((SEEDS, len(tasks))) for a in algos}
    for j, t in enumerate(tasks):  # min-max over every algo's seeds on the task
        low, high = min(scores[t, a].min() for a in algos), max(scores[t, a].max() for a in algos)
        for a in algos:
            matrices[a][:, j] = (scores[t, a] - low) / (high - low) if high > low else 0.0

    def seeded():  # rliable 1.2's StratifiedBootstrap draws from numpy's global RNG for IQM and mean
        np.random.seed(0)
        return np.random.RandomState(0)

    iqm_mean = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])
    point, ci = rly.get_interval_estimates(matrices, iqm_mean, reps=reps, random_state=seeded())
    rows = [dict(kind=kind, metric=m, algo=a, over="", value=r4(point[a][i]), ci_low=r4(ci[a][0][i]),
                 ci_high=r4(ci[a][1][i]), tasks=";".join(tasks), runs_per_task=SEEDS)
            for a in algos for i, m in enumerate(["IQM", "mean"])]  # fmt: skip
    pairs = {f"{x},{y}": (matrices[x], matrices[y]) for i, x in enumerate(algos) for y in algos[i + 1 :]}
    point, ci = rly.get_interval_estimates(
        pairs, metrics.probability_of_improvement, reps=reps, random_state=seeded()
    )
    rows += [dict(kind=kind, metric="P(algo > over)", algo=k.split(",")[0], over=k.split(",")[1], value=r4(point[k]),
                  ci_low=r4(ci[k][0][0]), ci_high=r4(ci[k][1][0]), tasks=";".join(tasks), runs_per_task=SEEDS)
             for k in pairs]  # fmt: skip
    return rows, tasks


def marl_eval_json(evals):
    """marl-eval's raw-data layout: {env: {task: {algo: {seed_k: {step_i: {...}, absolute_metrics: {...}}}}}}."""
    data = {}
    for r in evals:
        family, _, task = r["env_id"].partition("-")
        seed = (
            data.setdefault(family, {})
            .setdefault(task, {})
            .setdefault(r["algo"], {})
            .setdefault(f"seed_{r['seed']}", {})
        )
        if r["kind"] == "absolute":
            seed["absolute_metrics"] = {"mean_episode_return": [r["episodic_return"]]}
        else:
            step = {"step_count": r["global_step"], "mean_episode_return": [r["episodic_return"]]}
            seed[f"step_{len([k for k in seed if k.startswith('step_')])}"] = step
    return data


def report(opts):
    evals, records = collect(opts)
    out = out_dir(opts)
    if not evals:
        print(f"no study runs in {opts.runs_dir} or {out}")
        return
    os.makedirs(out, exist_ok=True)
    fields = [
        "env_id",
        "algo",
        "seed",
        "kind",
        "iteration",
        "global_step",
        "episodes",
        "episodic_return",
        "success",
    ]
    write_csv(os.path.join(out, "study_evals.csv"), evals, fields)
    write_csv(os.path.join(out, "study_runs.csv"), records)
    finals, curves, gaps, paper = [], [], [], read_paper()
    for env_id, (_, paper_key) in TASKS.items():
        for algo in SCRIPTS:
            seeds = complete_seeds(evals, env_id, algo)
            for kind in ("final", "absolute"):
                if seeds:
                    values = [v[kind] for _, v in sorted(seeds.items())]
                    mean, low, high, n = t_interval(values)
                    finals.append(dict(env_id=env_id, algo=algo, kind=kind, n_seeds=n, mean=r4(mean), ci_low=r4(low),
                                       ci_high=r4(high), per_seed=";".join(f"{v:.4f}" for v in values),
                                       seeds=";".join(map(str, sorted(seeds)))))  # fmt: skip
            for step, values in curve(evals, env_id, algo).items():
                mean, low, high, n = t_interval(values)
                curves.append(dict(env_id=env_id, algo=algo, global_step=step, n_seeds=n, mean=r4(mean),
                                   ci_low=r4(low), ci_high=r4(high)))  # fmt: skip
        mam, mat = curve(evals, env_id, "mam"), curve(evals, env_id, "mat")
        for step in sorted(set(mam) & set(mat)):
            diff, low, high = welch_interval(mam[step], mat[step])
            row = dict(env_id=env_id, global_step=step, n_mam=len(mam[step]), n_mat=len(mat[step]), gap=r4(diff),
                       ci_low=r4(low), ci_high=r4(high), paper_step="", paper_gap="", paper_ci_low="", paper_ci_high="")  # fmt: skip
            at, a = paper_at(paper.get(paper_key, {}), "mam", step)
            if at is not None:
                _, b = paper_at(paper[paper_key], "mat", at)
                diff, low, high = welch_interval(a, b)
                row.update(paper_step=at, paper_gap=r4(diff), paper_ci_low=r4(low), paper_ci_high=r4(high))
            gaps.append(row)
    for name, rows in [("final", finals), ("curves", curves), ("gap", gaps)]:
        if rows:
            write_csv(os.path.join(out, f"study_{name}.csv"), rows)
    aggregates = []
    try:
        for kind in ("final", "absolute"):
            rows, tasks = aggregate(evals, kind, opts.bootstrap_reps)
            aggregates += rows
    except ImportError as e:
        print(f"no aggregate: rliable does not import ({e}); pip install -r benchmarks/requirements.txt")
    if aggregates:
        write_csv(os.path.join(out, "study_aggregate.csv"), aggregates)
    with open(os.path.join(out, "study_marl_eval.json"), "w") as f:
        json.dump(marl_eval_json(evals), f, indent=1)
    print_tables(finals, gaps, aggregates, records)
    draw(opts, evals, paper, aggregates)
    print(f"\nsaved the CSVs, JSON and PNGs in {os.path.relpath(out, ROOT)}")


def fmt(mean, low, high):
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]" if low != "" else f"{mean:.2f}"


def print_tables(finals, gaps, aggregates, records):
    """The README's tables, in Markdown."""
    print(
        "\n| task | algo | final evaluation (512 episodes): mean [95% t CI] | per seed | absolute metric | hours |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for f in [f for f in finals if f["kind"] == "final"]:
        a = next(
            x for x in finals if (x["env_id"], x["algo"], x["kind"]) == (f["env_id"], f["algo"], "absolute")
        )
        hours = sum(
            float(r["hours"]) for r in records if (r["env_id"], r["algo"]) == (f["env_id"], f["algo"])
        )
        print(f"| {f['env_id']} | {f['algo']} | {fmt(f['mean'], f['ci_low'], f['ci_high'])} | "
              f"{f['per_seed'].replace(';', ', ')} | {fmt(a['mean'], a['ci_low'], a['ci_high'])} | {hours:.2f} |")  # fmt: skip
    print("\n| task | env steps | MAM - MAT, ours [95% Welch CI] | the paper's at | MAM - MAT, the paper's |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for g in gaps:
        paper = fmt(g["paper_gap"], g["paper_ci_low"], g["paper_ci_high"]) if g["paper_gap"] != "" else "-"
        print(f"| {g['env_id']} | {g['global_step']} | {fmt(g['gap'], g['ci_low'], g['ci_high'])} | "
              f"{g['paper_step'] or '-'} | {paper} |")  # fmt: skip
    for r in aggregates:
        who = f"P({r['algo']} > {r['over']})" if r["over"] else f"{r['metric']} {r['algo']}"
        print(f"- {r['kind']}: {who} = {fmt(r['value'], r['ci_low'], r['ci_high'])} (tasks: {r['tasks']})")


def draw(opts, evals, paper, aggregates):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["env_id"] == t for r in evals)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.2 * len(tasks), 5.5), 3.4), squeeze=False)
    for ax, env_id in zip(axes[0], tasks):
        steps, paper_key = budget(opts, env_id), TASKS[env_id][1]
        for algo in SCRIPTS:
            points = curve(evals, env_id, algo)
            if points:
                x = np.array(list(points))
                mean, low, high, n = zip(*(t_interval(v) for v in points.values()))
                ax.plot(
                    x,
                    mean,
                    color=COLORS[algo],
                    lw=1.6,
                    marker=".",
                    label=f"{algo} (ours, {max(n)} seed{'s' * (max(n) > 1)})",
                )
                ax.fill_between(x, low, high, color=COLORS[algo], alpha=0.2, lw=0)
            theirs = {
                s: v
                for s, v in paper.get(paper_key, {}).get(algo, {}).items()
                if s != "absolute" and s <= steps * 1.05
            }
            if theirs:
                x = np.array(sorted(theirs))
                mean, low, high, n = zip(*(t_interval(theirs[s]) for s in x))
                ax.plot(x, mean, color=COLORS[algo], lw=1.2, ls="--", label=f"{algo} (paper, {max(n)} seeds)")
                ax.fill_between(x, low, high, color=COLORS[algo], alpha=0.08, lw=0)
        lr = f", lr {opts.learning_rate:g} (the paper's: 5e-4)" if opts.learning_rate else ""
        ax.set_title(f"{env_id}{lr}", fontsize=10)
        ax.set_xlabel("env steps (per seed)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("evaluation return (sampled)")
    fig.text(0.99, 0.01, "mean and t-based 95% CI over seeds; ours: 128 episodes per point, 512 at the end",
             ha="right", va="bottom", fontsize=7, color="gray")  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(os.path.join(out_dir(opts), "study.png"), dpi=90)
    plt.close(fig)
    rows = [r for r in aggregates if r["metric"] in ("IQM", "mean")]
    if not rows:
        return
    kinds, metrics_ = ["final", "absolute"], ["IQM", "mean"]
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(7, 1.2 + 0.9 * len(algos)), sharey=True, sharex=True)
    for (i, kind), (j, metric) in [(k, m) for k in enumerate(kinds) for m in enumerate(metrics_)]:
        ax = axes[i][j]
        for y, a in enumerate(algos):
            r = next((r for r in rows if (r["kind"], r["metric"], r["algo"]) == (kind, metric, a)), None)
            if r:
                ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=COLORS[a], lw=6, alpha=0.5)
                ax.plot([r["value"]], [y], "|", color="k", ms=12)
        ax.set_title(f"{metric}, {kind} (min-max normalised)", fontsize=9)
        ax.set_yticks(range(len(algos)), algos)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir(opts), "study_aggregate.png"), dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-ids", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--algos", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--seed", type=int, default=1, help="the first seed of the group to train")
    parser.add_argument("--num-seeds", type=int, default=SEEDS, help="seeds of the group (one process)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="the learning-rate control: this constant rate, half the budget, its own runs "
                             "(exp name study_lr{rate}_{algo}) and report (benchmarks/results/study_lr{rate}/)")  # fmt: skip
    parser.add_argument("--bootstrap-reps", type=int, default=10000, help="resamples of the aggregate's CIs")
    parser.add_argument("--report-only", action="store_true", help="no training: report what is there")
    parser.add_argument("--calibrate", action="store_true",
                        help="no training: measure each (task, algo)'s seconds per iteration (study_cost.csv)")  # fmt: skip
    parser.add_argument(
        "--runs-dir", default=os.path.join(ROOT, "runs"), help="where the scripts write (./runs)"
    )
    opts = parser.parse_args(argv)
    if opts.seed < 1 or opts.num_seeds < 1 or opts.seed + opts.num_seeds - 1 > SEEDS:
        fail(f"--seed {opts.seed} --num-seeds {opts.num_seeds}: the study's seeds are 1..{SEEDS}")
    if os.path.basename(os.path.normpath(opts.runs_dir)) != "runs":
        fail(f"--runs-dir must be a folder named runs, as the scripts write to ./runs (got {opts.runs_dir})")
    opts.runs_dir = os.path.abspath(opts.runs_dir)
    if opts.learning_rate is not None and not (0 < opts.learning_rate < 1):
        fail(f"--learning-rate {opts.learning_rate}: expected a rate in (0, 1)")
    if opts.learning_rate and opts.calibrate:
        fail("--calibrate measures the cost per iteration, which --learning-rate does not change: drop one")
    if opts.calibrate:
        rows = [r for r in read_csv(os.path.join(OUT, "study_cost.csv"))
                if (r["env_id"], r["algo"]) not in {(e, a) for e in opts.env_ids for a in opts.algos}]  # fmt: skip
        rows += [r for e in opts.env_ids for a in opts.algos if (r := calibrate(opts, e, a))]
        if rows:
            os.makedirs(OUT, exist_ok=True)
            write_csv(os.path.join(OUT, "study_cost.csv"), rows)
        return
    if not opts.report_only:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the script in progress gets it too and checkpoints
            signal.signal(sig, lambda signum, frame: STOP.append(128 + signum))
        for env_id in opts.env_ids:
            for algo in opts.algos:
                code = 0 if STOP else train(opts, env_id, algo)
                if STOP or code in (130, 143):
                    print("stopped; run the same command again to resume", flush=True)
                    STOP.append(code)
                    break
                if code != 0:
                    print(f"FAILED: {env_id} / {algo} (exit code {code})", flush=True)
            if STOP:
                break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report(opts)
    if STOP:
        sys.exit(STOP[0])


if __name__ == "__main__":
    main()
