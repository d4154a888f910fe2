"""The learning study: MAM vs MAT vs MAPPO at budgets where the tasks are learned, reported as the paper does.

Run mode (default) trains each algorithm (mam = mam_ppo.py, mat = mat_ppo.py, mappo = mappo.py, each with its
own defaults, sampled evaluation included) on each task of TASKS, one run after another, all seeds of a run in
one process (--num-seeds), exp name `learning_{algo}`; each run's output also goes to
{runs-dir}/learning_logs/. A task's budget is the same for the three algorithms, in env steps per seed or in
wall-clock seconds. A seconds budget becomes env steps per algorithm: a short calibration run (8 iterations,
no evaluation) measures the algorithm's steps per second and seed, and the run gets that times the seconds, so
that its learning rate anneals over its own budget (learning_calibration.csv keeps the numbers). By default
such runs evaluate only at the end.

Runs survive sessions: stop the study with Ctrl-C, or `kill -INT -- -PGID` on its process group; the running
script finishes its iteration, checkpoints and exits, and the next call with the same flags resumes it
(`--resume`). A complete run (summary.json) with the same env, budget, seed and number of seeds is skipped
unless --force, and so is one that --out-dir's CSVs report complete (a run finished on another machine).

Report mode (--report-only, and always after running) finds the runs of --env-ids x --algos in runs/ (the
newest complete one, else the newest one in progress, whose curve is drawn but which has no final score). A
(task, algo) with no folder in runs/ keeps its rows from the CSVs already in --out-dir, if they are of the same
budget and seeds: the committed results stand for runs made on another machine, so a study split across
machines reports all of them (the aggregate included). It writes to --out-dir:
  learning_runs.csv       which run folder is which (task, algo), its budget, steps done, seconds, status.
  learning_curves.csv     per (task, algo, global_step): the training return (sampled actions) of each
                          iteration, mean over seeds with a 95% bootstrap CI (seeds resampled,
                          --bootstrap-reps times, percentile interval), and the run's wall-clock seconds.
                          An iteration in which no episode ended carries forward the seed's last value;
                          --smooth K averages each seed's last K iterations.
  learning_final.csv      per (task, algo): the final evaluation (32 episodes per seed, sampled actions) as
                          the mean over seeds with a 95% bootstrap CI, and per seed.
  learning_aggregate.csv  over the tasks every algorithm completed: each seed's final return min-max
                          normalised per task (min and max over all algorithms' seeds on that task), then
                          the IQM and the mean with 95% stratified-bootstrap CIs, and the probability of
                          improvement of each pair, all from rliable (benchmarks/requirements.txt). Every
                          task brings as many seeds as the task with the fewest (its first ones): rliable's
                          score matrices are runs x tasks.
  learning.png            one panel per task against env steps, and one against seconds for a seconds budget.
  learning_aggregate.png  the aggregate with its CIs.

    python benchmarks/learning.py                                       # the study: 4 tasks x 3 algorithms
    python benchmarks/learning.py --env-ids rware-tiny-2ag --algos mappo mat
    python benchmarks/learning.py --env-ids lbf-8x8-2p-2f-coop --budget lbf-8x8-2p-2f-coop=200000
    python benchmarks/learning.py --report-only --smooth 5

The protocol study (--study protocol, results in benchmarks/results/protocol/, files protocol_*.csv): does MAM
trail MAT because of our training protocol? The paper's code appends one-hot agent ids to the observations and
permutes the agents of the training batch each epoch (mat_ppo.py / mam_ppo.py --agent-ids, --shuffle-agents).
Each task of PROTOCOL trains the variants listed there: a variant is ALGO_idsI_shuffleS, the script run with
--agent-ids I and --shuffle-agents S (0 off, 1 on), exp name protocol_{variant}; a suffix _lrX also sets
--learning-rate X (a lever tried on MAM). Rows carry the variant in
`algo` and the flags the run really had (its args.json) in `agent_ids` and `shuffle_agents`; every row of the
learning study carries them too (runs made before the flags existed had both off).

    python benchmarks/learning.py --study protocol --env-ids con-10x10x10a --algos mam
    python benchmarks/learning.py --study protocol --report-only
"""

import argparse
import ast
import csv
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"mam": "mam_ppo.py", "mat": "mat_ppo.py", "mappo": "mappo.py"}
COLORS = {"mam": "tab:red", "mat": "tab:blue", "mappo": "tab:green"}
# env_id: (budget per seed, "steps" or "seconds", seeds). RWARE learns between 0.8M and 1.5M steps (MAPPO);
# con-15x15x23a, 23 agents, is where MAM's linear cost should show: the same wall-clock for every algorithm.
TASKS = {
    "rware-tiny-2ag": (3_000_000, "steps", 3),
    "lbf-2s-10x10-3p-3f": (1_000_000, "steps", 3),
    "con-10x10x10a": (1_000_000, "steps", 3),
    "con-15x15x23a": (1200, "seconds", 2),
}
# env_id: (budget per seed, unit, seeds, variants). con-10x10x10a is where MAM trails MAT most (the study): the
# shuffle screened at 500k steps (Connector's observation names the agent, so no ids there, as in the paper's
# code), then one lever on MAM, which still trailed: a 2x learning rate (README, "Training protocol");
# lbf-2s-10x10-3p-3f: the new defaults (ids and shuffle on) at the study's budget, against its rows.
PROTOCOL = {
    "con-10x10x10a": (500_000, "steps", 3, ["mam_ids0_shuffle1", "mam_ids0_shuffle0", "mat_ids0_shuffle1",
                                            "mam_ids0_shuffle1_lr1e-3", "mat_ids0_shuffle0"]),
    "lbf-2s-10x10-3p-3f": (1_000_000, "steps", 3, ["mam_ids1_shuffle1", "mat_ids1_shuffle1"]),
}  # fmt: skip
PROTOCOL_FLAGS = ("agent_ids", "shuffle_agents")  # Args fields of mat_ppo.py and mam_ppo.py
CALIBRATION_ITERATIONS = 8
STOP = []  # the signal that asked the study to stop, if any
r4 = lambda x: round(float(x), 4)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def algo_of(variant):
    """'mam_ids0_shuffle1' -> 'mam'; a plain algo is its own variant."""
    return variant.split("_")[0]


def variant_flags(variant):
    """'mam_ids0_shuffle1' -> ['--no-agent-ids', '--shuffle-agents']; a plain algo runs with its defaults.
    A last part lrX changes the learning rate: 'mam_ids0_shuffle1_lr1e-3' adds ['--learning-rate', '1e-3']."""
    flags = []
    for part in variant.split("_")[1:]:
        if part.startswith("lr"):
            flags += ["--learning-rate", part[2:]]
            continue
        name, value = part.rstrip("01"), part[-1]
        flag = {"ids": "agent-ids", "shuffle": "shuffle-agents"}[name]
        flags.append(f"--{flag}" if value == "1" else f"--no-{flag}")
    return flags


def protocol_of(args, algo):
    """The protocol flags a run had, from its args.json (missing in runs made before they existed: off). MAPPO
    has none (its actor always sees the agent id): ''."""
    if algo == "mappo":
        return {f: "" for f in PROTOCOL_FLAGS}
    return {f: bool(args.get(f, False)) for f in PROTOCOL_FLAGS}


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


def read_csv(path):
    with open(path) if os.path.exists(path) else open(os.devnull) as f:
        return list(csv.DictReader(f))


def write_csv(path, rows, fields=None):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def find_run(runs_dir, exp_name, env_id, seed, steps, num_seeds):
    """-> (run folder, complete): the newest complete run with these flags, else the newest resumable one."""
    found = []
    for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else []:
        folder = os.path.join(runs_dir, name)
        if not name.startswith(f"{env_id}__{exp_name}__{seed}__"):
            continue
        try:
            with open(os.path.join(folder, "args.json")) as f:
                args = json.load(f)
        except (OSError, ValueError):
            continue
        if (args["total_timesteps"], args["num_seeds"]) != (steps, num_seeds):
            continue
        complete = os.path.exists(os.path.join(folder, "summary.json"))
        if complete or os.path.exists(os.path.join(folder, "checkpoint.msgpack")):
            found.append((complete, os.path.getmtime(os.path.join(folder, "args.json")), folder))
    return (max(found)[2], max(found)[0]) if found else (None, False)


def launch(opts, cmd, log_path, append=False):
    """Run one script to its end, teeing its output into log_path; -> (exit code, run folder or None)."""
    print(f"\n=== {' '.join(cmd[1:])}  (log: {os.path.relpath(log_path, ROOT)})", flush=True)
    run_dir = None
    # cwd = the parent of runs-dir: the scripts write to ./runs/
    with open(log_path, "a" if append else "w") as log:
        proc = subprocess.Popen(cmd, cwd=os.path.dirname(opts.runs_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        for line in proc.stdout:  # a signal to the process group reaches the script too: keep reading
            sys.stdout.write(line)
            log.write(line)
            if line.startswith("run: "):
                run_dir = os.path.join(os.path.dirname(opts.runs_dir), line[5:].split("  ")[0].strip())
        proc.wait()
    return proc.returncode, run_dir


def command(opts, variant, flags):
    flags = {
        "--seed": opts.seed,
        "--exp-name": f"{opts.study}_{variant}",
        "--eval-episodes": opts.eval_episodes,
        **flags,
    }
    script = os.path.join(ROOT, SCRIPTS[algo_of(variant)])
    # --anneal-lr: these studies annealed (the scripts' default then), so a rerun reproduces them
    return [
        sys.executable,
        script,
        *(str(x) for kv in flags.items() for x in kv),
        "--anneal-lr",
        *variant_flags(variant),
    ]


def steps_per_second(opts, env_id, algo, num_seeds, measure=False):
    """Env steps per second and seed of (task, algo) after compiling, from learning_calibration.csv; missing
    with measure=True: measured now by a calibration run of CALIBRATION_ITERATIONS iterations. -> float or None."""
    path = os.path.join(opts.out_dir, f"{opts.study}_calibration.csv")
    rows = read_csv(path)
    key = dict(env_id=env_id, algo=algo, num_seeds=str(num_seeds))
    for row in rows:
        if all(row[k] == v for k, v in key.items()):
            return float(row["steps_per_second_per_seed"])
    if not measure:
        return None
    flags = {"--env-id": env_id, "--total-timesteps": CALIBRATION_ITERATIONS * opts.batch[algo],
             "--num-seeds": num_seeds, "--exp-name": f"calibrate_{algo}", "--eval-every": 0,
             "--eval-episodes": 1, "--checkpoint-every": 0}  # fmt: skip
    log = os.path.join(opts.runs_dir, "learning_logs", f"{env_id}__calibrate_{algo}.log")
    code, run_dir = launch(opts, command(opts, algo, flags), log)
    if code != 0 or run_dir is None:
        return None
    timing = read_csv(os.path.join(run_dir, "timing.csv"))
    first, last = timing[0], timing[-1]  # the first iteration pays the compile: measure from its end
    steps = int(last["global_step"]) - int(first["global_step"])  # per seed
    rate = steps / (float(last["seconds"]) - float(first["seconds"]))
    rows.append(dict(key, steps_per_second_per_seed=round(rate, 1), iterations=len(timing),
                     run_dir=os.path.relpath(run_dir, ROOT)))  # fmt: skip
    write_csv(path, rows)
    return rate


def budget_steps(opts, env_id, algo, measure=False):
    """Env steps per seed of (task, algo): the step budget, or the steps that fill a seconds budget (None when
    that algorithm's speed is not known)."""
    budget, unit, seeds, _ = opts.tasks[env_id]
    if unit == "steps":
        return budget
    rate = steps_per_second(opts, env_id, algo, seeds, measure)
    return None if rate is None else int(rate * budget) // opts.batch[algo] * opts.batch[algo]


def run_all(opts):
    """Train, or resume, every (task, algo) that lacks a complete run; stop early on a signal."""
    failed = []
    os.makedirs(os.path.join(opts.runs_dir, "learning_logs"), exist_ok=True)
    for env_id in opts.env_ids:
        budget, unit, seeds, algos = opts.tasks[env_id]
        for algo in algos:  # a variant: algo, or algo_idsI_shuffleS (--study protocol)
            if STOP:
                return failed
            steps = budget_steps(opts, env_id, algo, measure=True)
            if steps is None:
                failed.append(f"{env_id}/{algo} (calibration)")
                continue
            exp_name = f"{opts.study}_{algo}"
            run_dir, complete = find_run(opts.runs_dir, exp_name, env_id, opts.seed, steps, seeds)
            log = os.path.join(opts.runs_dir, "learning_logs", f"{env_id}__{exp_name}.log")
            if complete and not opts.force:
                print(f"skip {env_id} / {algo}: complete run {os.path.relpath(run_dir, ROOT)}")
                continue
            kept = None if run_dir or opts.force else kept_rows(opts, env_id, algo, steps, seeds)
            if kept and kept[0]["status"] == "complete":  # finished on another machine: its rows are here
                print(f"skip {env_id} / {algo}: complete in {os.path.relpath(opts.out_dir, ROOT)}")
                continue
            if run_dir and not opts.force:
                cmd = [
                    *command(opts, algo, {})[:2],
                    "--resume",
                    os.path.relpath(run_dir, os.path.dirname(opts.runs_dir)),
                ]
                code, _ = launch(opts, cmd, log, append=True)
            else:
                every = opts.eval_every  # default: ~10 evaluations, none during a wall-clock budget
                if every is None:
                    every = 0 if unit == "seconds" else max(1, steps // opts.batch[algo] // 10)
                flags = {
                    "--env-id": env_id,
                    "--total-timesteps": steps,
                    "--num-seeds": seeds,
                    "--eval-every": every,
                }
                code, _ = launch(opts, command(opts, algo, flags), log)
            if STOP or code in (130, 143):
                print(f"stopped during {env_id} / {algo}; run the same command again to resume", flush=True)
                STOP.append(code)
                return failed
            if code != 0:
                print(f"FAILED: {env_id} / {algo} (exit code {code}; see {log})", flush=True)
                failed.append(f"{env_id}/{algo}")
    return failed


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def read_run(run_dir):
    """-> (summary or None, {seed: [(global_step, return)]}, {global_step: seconds}, args)."""
    args = json.load(open(os.path.join(run_dir, "args.json")))
    summary_path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    seeds = {}
    for row in read_csv(os.path.join(run_dir, "metrics.csv")):
        if row["charts/episodic_return"] != "":  # the final eval row has only eval/* filled
            seeds.setdefault(int(row["seed"]), []).append(
                (int(row["global_step"]), float(row["charts/episodic_return"]))
            )
    seconds = {
        int(r["global_step"]): float(r["seconds"]) for r in read_csv(os.path.join(run_dir, "timing.csv"))
    }
    return summary, seeds, seconds, args


def seed_matrix(seeds, smooth):
    """(n_seeds, n_iterations) training returns: NaN carried forward per seed, then a trailing K-mean."""
    n = min(len(rows) for rows in seeds.values())  # a run in progress may have logged one seed more
    steps = np.array([s for s, _ in next(iter(seeds.values()))][:n])
    values = np.array([[r for _, r in rows[:n]] for rows in seeds.values()])
    for k in range(1, values.shape[1]):  # carry forward the last finite value (leading NaNs stay)
        values[:, k] = np.where(np.isnan(values[:, k]), values[:, k - 1], values[:, k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows before the first episode ended
        windows = [np.nanmean(values[:, max(0, k - smooth + 1) : k + 1], axis=1) for k in range(len(steps))]
    return steps, values, np.stack(windows, axis=1)


def bootstrap(values, n_boot, seed=0):
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


def aggregate(finals, algos, reps):
    """rliable's aggregate of the min-max normalised final returns of the tasks every algorithm completed."""
    done = finals_by(finals)
    tasks = [t for t in dict.fromkeys(f["env_id"] for f in finals) if all((t, a) in done for a in algos)]
    if len(algos) < 2 or not tasks:
        return [], [], tasks
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError as e:
        print(f"no aggregate: rliable does not import ({e}); pip install -r benchmarks/requirements.txt")
        return [], [], tasks
    scores = {(t, a): np.array(done[t, a]["per_seed"]) for t in tasks for a in algos}
    runs = min(len(s) for s in scores.values())
    matrices = {a: np.zeros((runs, len(tasks))) for a in algos}
    for j, t in enumerate(tasks):
        low = min(scores[t, a].min() for a in algos)
        high = max(scores[t, a].max() for a in algos)
        for a in algos:  # a task where every run scored the same normalises to 0
            matrices[a][:, j] = (scores[t, a][:runs] - low) / (high - low) if high > low else 0.0
    iqm_mean = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])

    # Reproducible CIs. rliable 1.2's StratifiedBootstrap (IQM, mean) ignores its random_state and draws from
    # numpy's global RNG; its probability_of_improvement honours random_state. So seed both.
    def seeded():
        np.random.seed(0)
        return np.random.RandomState(0)

    point, ci = rly.get_interval_estimates(matrices, iqm_mean, reps=reps, random_state=seeded())
    rows = [dict(algo=a, metric=m, value=r4(point[a][i]), ci_low=r4(ci[a][0][i]), ci_high=r4(ci[a][1][i]),
                 tasks=len(tasks), runs_per_task=runs)
            for a in algos for i, m in enumerate(["IQM", "mean"])]  # fmt: skip
    pairs = {f"{x},{y}": (matrices[x], matrices[y]) for i, x in enumerate(algos) for y in algos[i + 1 :]}
    point, ci = rly.get_interval_estimates(
        pairs, metrics.probability_of_improvement, reps=reps, random_state=seeded()
    )
    pair_rows = [dict(algo=k.split(",")[0], over=k.split(",")[1], metric="P(algo > over)", value=r4(point[k]),
                      ci_low=r4(ci[k][0][0]), ci_high=r4(ci[k][1][0]), tasks=len(tasks), runs_per_task=runs)
                 for k in pairs]  # fmt: skip
    return rows, pair_rows, tasks


def finals_by(finals):
    return {(f["env_id"], f["algo"]): f for f in finals}


def kept_rows(opts, env_id, algo, steps, seeds):
    """The rows of (task, algo) in the CSVs already in --out-dir, when they report a run with these flags:
    -> (runs row, curve rows, final row or None), or None. A study split across machines keeps its finished
    runs there (the committed results), not their folders in runs/."""
    protocol = {k: str(v) for k, v in protocol_of({}, algo_of(algo)).items()}  # rows made before the flags
    path = lambda name: os.path.join(opts.out_dir, f"{opts.study}_{name}")
    read = lambda name: [{"env_id": env_id, "algo": algo, **protocol, **r} for r in read_csv(path(name))
                         if (r["env_id"], r["algo"]) == (env_id, algo)]  # fmt: skip
    record = next(iter(read("runs.csv")), None)
    if record is None or (record["total_timesteps"], record["num_seeds"]) != (str(steps), str(seeds)):
        return None
    final = next(iter(read("final.csv")), None) if record["status"] == "complete" else None
    return record, read("curves.csv"), final


def report(opts):
    records, curves, finals, plot = [], [], [], {}
    for env_id in opts.env_ids:
        budget, unit, seeds, algos = opts.tasks[env_id]
        for algo in algos:
            steps = budget_steps(opts, env_id, algo)
            run_dir, complete = (None, False) if steps is None else find_run(
                opts.runs_dir, f"{opts.study}_{algo}", env_id, opts.seed, steps, seeds)  # fmt: skip
            kept = None if run_dir or steps is None else kept_rows(opts, env_id, algo, steps, seeds)
            if kept:  # no run folder here: keep what --out-dir reports of it, as it is
                record, rows, final = kept
                print(
                    f"kept from {os.path.relpath(opts.out_dir, ROOT)}: {env_id} / {algo}, {record['status']}"
                )
                records.append(record)
                curves += rows
                columns = ("global_step", "seconds", "episodic_return", "ci_low", "ci_high")
                x, secs, mean, low, high = (np.array([float(r[k]) for r in rows]) for k in columns)
                plot.setdefault(env_id, {})[algo] = (x, secs, mean, low, high, int(record["num_seeds"]))
                if final:
                    per_seed = np.array([float(v) for v in final["eval_per_seed"].split(";")])
                    numbers = {k: float(final[k]) for k in ("eval_return", "ci_low", "ci_high")}
                    finals.append({**final, **numbers, "per_seed": per_seed})
                continue
            if run_dir is None:
                print(f"no run yet: {env_id} / {algo}")
                continue
            summary, per_seed, seconds, args = read_run(run_dir)
            if not per_seed:
                continue
            protocol = protocol_of(args, algo_of(algo))
            x, raw, smoothed = seed_matrix(per_seed, opts.smooth)
            mean, low, high, n = bootstrap(smoothed, opts.bootstrap_reps)
            secs = np.array([seconds.get(int(s), np.nan) for s in x])
            curves += [dict(env_id=env_id, algo=algo, **protocol, global_step=int(s), seconds=round(float(t), 1),
                            episodic_return=r4(m), ci_low=r4(lo), ci_high=r4(hi), n_seeds=int(k))
                       for s, t, m, lo, hi, k in zip(x, secs, mean, low, high, n)]  # fmt: skip
            plot.setdefault(env_id, {})[algo] = (x, secs, mean, low, high, len(per_seed))
            records.append(dict(env_id=env_id, algo=algo, **protocol, run_dir=os.path.relpath(run_dir, ROOT),
                                budget=f"{budget} {unit}", total_timesteps=steps, steps_done=int(x[-1]),
                                num_seeds=len(per_seed), seconds=round(float(np.nanmax(secs)), 1),
                                status="complete" if complete else "in progress"))  # fmt: skip
            if not complete:
                continue
            final = np.array(summary["eval/episodic_return"], dtype=float)
            fm, flo, fhi, _ = bootstrap(final[:, None], opts.bootstrap_reps)
            finals.append(dict(env_id=env_id, algo=algo, **protocol, eval_return=r4(fm[0]), ci_low=r4(flo[0]),
                               ci_high=r4(fhi[0]), eval_per_seed=";".join(f"{v:g}" for v in final),
                               n_seeds=len(final), train_return_last=r4(np.nanmean(raw[:, -1])),
                               total_timesteps=summary["global_step"], seconds=round(summary["seconds"], 1),
                               per_seed=final))  # fmt: skip
    if not records:
        print(f"no learning runs found in {opts.runs_dir}")
        return
    os.makedirs(opts.out_dir, exist_ok=True)
    out = lambda name: os.path.join(opts.out_dir, f"{opts.study}_{name}")
    scope = {(t, a) for t in opts.env_ids for a in opts.tasks[t][3]}

    def save(name, rows):  # the rows of tasks and algos outside this report (--env-ids, --algos) stay
        others = [r for r in read_csv(out(name)) if (r["env_id"], r["algo"]) not in scope]
        if rows or others:
            write_csv(out(name), rows + others, list((rows or others)[0]))

    save("runs.csv", records)
    save("curves.csv", curves)
    save("final.csv", [{k: v for k, v in f.items() if k != "per_seed"} for f in finals])
    algos = list(dict.fromkeys(a for t in opts.env_ids for a in opts.tasks[t][3]))  # variants, in order
    rows, pairs, tasks = (
        aggregate(finals, algos, opts.bootstrap_reps) if opts.study == "learning" else ([], [], [])
    )
    if rows:
        fields = ["algo", "over", "metric", "value", "ci_low", "ci_high", "tasks", "runs_per_task"]
        write_csv(out("aggregate.csv"), rows + pairs, fields)  # "over": only the pairs have it
    print_tables(opts, finals, rows, pairs, tasks, algos)
    draw(opts, plot, rows, algos)


def print_tables(opts, finals, rows, pairs, tasks, algos):
    print("\nFinal evaluation return (sampled), mean [95% bootstrap CI] over seeds\n")
    print(f"| task (budget per seed) | {' | '.join(algos)} |\n" + "| --- " * (len(algos) + 1) + "|")
    cells = {
        k: f"{f['eval_return']:.2f} [{f['ci_low']:.2f}, {f['ci_high']:.2f}]"
        for k, f in finals_by(finals).items()
    }
    for t in opts.env_ids:
        budget, unit, _, _ = opts.tasks[t]
        label = f"{budget / 60:g} min" if unit == "seconds" else f"{budget / 1e6:g}M steps"
        print(f"| {t} ({label}) | " + " | ".join(cells.get((t, a), "-") for a in algos) + " |")
    if rows:
        print(f"\nAggregate over {len(tasks)} tasks ({', '.join(tasks)}), min-max normalised final returns,")
        print("95% stratified-bootstrap CIs\n")
        for r in rows + pairs:
            who = f"P({r['algo']} > {r['over']})" if "over" in r else f"{r['metric']} {r['algo']}"
            print(f"- {who}: {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")


def draw(opts, plot, rows, algos):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    panels = [(t, "steps") for t in plot] + [(t, "seconds") for t in plot if opts.tasks[t][1] == "seconds"]
    # at least 5 inches wide, so that the footnote fits under a single panel
    fig, axes = plt.subplots(1, len(panels), figsize=(max(3.8 * len(panels), 5), 3.2), squeeze=False)
    for ax, (t, axis) in zip(axes[0], panels):
        for a in algos:
            if a in plot[t]:
                steps, secs, mean, low, high, _ = plot[t][a]
                x = steps if axis == "steps" else secs / 60
                color = COLORS[algo_of(a)]
                # protocol: the shuffle off dashed, a lever dotted
                style = ":" if "_lr" in a else "--" if "shuffle0" in a else "-"
                ax.plot(x, mean, color=color, ls=style, label=a, lw=1.5)
                ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("env steps (per seed)" if axis == "steps" else "wall-clock minutes (2-core CPU)")
        if axis == "steps":  # 500k, 1M: tick labels that do not run together
            ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training return (sampled)")
    for ax in axes[0]:  # a legend on the first panel, and on any other whose lines differ (protocol tasks)
        if ax is axes[0][0] or ax.get_legend_handles_labels()[1] != axes[0][0].get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    n_seeds = sorted({v[5] for p in plot.values() for v in p.values()})
    note = f"mean and 95% bootstrap CI over {'/'.join(map(str, n_seeds))} seeds"
    fig.text(0.99, 0.01, note + (f", moving average of {opts.smooth} iterations" if opts.smooth > 1 else ""),
             ha="right", va="bottom", fontsize=7, color="gray")  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(os.path.join(opts.out_dir, f"{opts.study}.png"), dpi=90)
    plt.close(fig)
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(7, 0.5 + 0.45 * len(algos)), sharey=True)
        for ax, metric in zip(axes, ["IQM", "mean"]):
            for i, a in enumerate(algos):
                r = next(r for r in rows if r["algo"] == a and r["metric"] == metric)
                ax.plot([r["ci_low"], r["ci_high"]], [i, i], color=COLORS[a], lw=6, alpha=0.5)
                ax.plot([r["value"]], [i], "|", color="k", ms=12)
            ax.set_title(f"{metric} (min-max normalised)", fontsize=9)
            ax.set_yticks(range(len(algos)), algos)
            ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(os.path.join(opts.out_dir, f"{opts.study}_aggregate.png"), dpi=90)
        plt.close(fig)
    print(f"\nsaved the CSVs and PNGs in {os.path.relpath(opts.out_dir, ROOT)}")


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--study", choices=["learning", "protocol"], default="learning",
        help="the task set: the learning study (TASKS) or the protocol comparison (PROTOCOL)")  # fmt: skip
    add("--env-ids", nargs="+", default=None, help="default: every task of the study")
    add("--algos", nargs="+", default=list(SCRIPTS), help="any of mam, mat, mappo")
    add("--budget", nargs="+", default=[], metavar="ENV=N[s]",
        help="budget per seed: N env steps or Ns wall-clock seconds (needed outside TASKS)")  # fmt: skip
    add("--num-seeds", type=int, default=None, help="seeds per run (default: the task's, 3 or 2)")
    add("--seed", type=int, default=1)
    add(
        "--eval-every",
        type=int,
        default=None,
        help="in iterations (0: only at the end; default: ~10 evals, 0 for Ns)",
    )
    add("--eval-episodes", type=int, default=32)
    add("--bootstrap-reps", type=int, default=10000, help="resamples of every bootstrap CI")
    add("--smooth", type=int, default=1, help="moving average over K iterations per seed (1: none)")
    add("--force", action="store_true", help="train again even when a complete run exists")
    add("--report-only", action="store_true", help="no training: report the runs found")
    add("--out-dir", default=None, help="relative to the repository root (default: benchmarks/results/STUDY)")
    add("--runs-dir", default="runs", help="where the scripts write (a folder named runs)")
    opts = parser.parse_args(argv)
    study = (
        {e: (b, u, k, list(SCRIPTS)) for e, (b, u, k) in TASKS.items()}
        if opts.study == "learning"
        else PROTOCOL
    )
    opts.env_ids = opts.env_ids or list(study)
    opts.out_dir = opts.out_dir or f"benchmarks/results/{opts.study}"
    opts.out_dir = os.path.normpath(os.path.join(ROOT, opts.out_dir))  # relative: to the repository root
    opts.runs_dir = os.path.normpath(os.path.join(ROOT, opts.runs_dir))
    if bad := [a for a in opts.algos if a not in SCRIPTS]:
        fail(f"unknown algo {' '.join(bad)} (choose from {', '.join(SCRIPTS)})")
    if bad := [e for e in opts.env_ids if e not in script_defaults("mappo.py")[1]]:
        fail(f"unknown env id {' '.join(bad)} (see the table in README.md)")
    positive = ("num_seeds", "eval_episodes", "smooth", "bootstrap_reps")  # num_seeds None: the task's
    if bad := [n for n in positive if getattr(opts, n) is not None and getattr(opts, n) < 1]:
        fail(f"--{bad[0].replace('_', '-')} must be positive (got {getattr(opts, bad[0])})")
    if (opts.eval_every or 0) < 0:
        fail(f"--eval-every must be 0 (only at the end) or more (got {opts.eval_every})")
    if os.path.basename(opts.runs_dir) != "runs":
        fail(f"--runs-dir must be a folder named runs, as the scripts write to ./runs (got {opts.runs_dir})")
    opts.tasks = dict(study)  # env_id: (budget, unit, seeds, variants of --algos)
    for item in opts.budget:
        env_id, _, value = item.partition("=")
        unit = "seconds" if value.endswith("s") else "steps"
        if env_id not in opts.env_ids or not value.rstrip("s").isdigit() or int(value.rstrip("s")) < 1:
            fail(f"--budget {item}: expected ENV=STEPS or ENV=SECONDSs with ENV one of --env-ids")
        _, _, seeds, variants = study.get(env_id, (0, "", 3, list(SCRIPTS)))
        opts.tasks[env_id] = (int(value.rstrip("s")), unit, seeds, variants)
    if bad := [e for e in opts.env_ids if e not in opts.tasks]:
        fail(f"no budget for {bad[0]}: add --budget {bad[0]}=STEPS")
    opts.tasks = {e: (b, u, opts.num_seeds or k, [v for v in vs if algo_of(v) in opts.algos])
                  for e, (b, u, k, vs) in opts.tasks.items()}  # fmt: skip
    defaults = {a: script_defaults(SCRIPTS[a])[0] for a in opts.algos}  # the scripts' own batch sizes
    variants = {v for e in opts.env_ids for v in opts.tasks[e][3]}
    opts.batch = {v: defaults[algo_of(v)]["num_envs"] * defaults[algo_of(v)]["num_steps"] for v in variants}
    for env_id in opts.env_ids:
        budget, unit, _, variants = opts.tasks[env_id]
        for v in variants:
            if unit == "steps" and budget < opts.batch[v]:
                fail(
                    f"the budget of {env_id} is below one batch of {SCRIPTS[algo_of(v)]} ({opts.batch[v]} steps)"
                )
    return opts


def main():
    opts = parse()
    failed = []
    if not opts.report_only:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the script in progress gets it too, and checkpoints
            signal.signal(sig, lambda signum, frame: STOP.append(128 + signum))
        os.makedirs(opts.out_dir, exist_ok=True)
        failed = run_all(opts)
    report(opts)
    if failed:
        fail(f"runs failed: {' '.join(failed)}")
    if STOP:
        sys.exit(STOP[0])


if __name__ == "__main__":
    main()
