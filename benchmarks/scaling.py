"""How acting and training time grow with the number of agents N: MAM vs MAT (KV cache / recompute) vs MAPPO.

The paper's Figure 2 (Daniel et al. 2024, arXiv 2410.19382), extended to N = 2..512. Only N varies: the
observation size (--obs-dim, RWARE's 66 by default), the number of actions, the batch of envs for acting
(--batch) and the minibatch for training (--minibatch) are fixed, and every network is built with its script's
default hyperparameters (`module.build_network(module.Args(), ...)`; networks and `act` are imported from the
scripts, never re-implemented). Per (method, N):

  act    jit(module.act) on random obs (batch, N, obs_dim), all actions legal: auto-regressive decoding
         (MAM: recurrent state, O(1) per agent; MAT cache: KV cache, O(N) per agent; MAT recompute: the whole
         decoder per agent, the paper's MAT; MAPPO: one MLP pass, no decoding)
         (mam-parallel, only with --methods: MAM with --scan-mode parallel, the associative scan, for GPUs;
         mam-pallas, only with --methods and on a GPU: MAM with the fused Pallas kernel of selective_scan.py)
  train  jit(value_and_grad) of sum(log pi(taken actions)) + sum(values) over (minibatch, N, obs_dim), through
         `network.apply` (teacher forcing for MAT / MAM). mat-recompute trains with the very same computation
         as mat-cache (decode only changes `act`), so when both run its train columns are copied from mat-cache
         (status says so).
  peak   `compiled.memory_analysis()`: temp + argument + output bytes of each executable, NaN where the backend
         does not report it (an upper bound: buffers that alias are counted twice).

Compile time (`lower().compile()`) is reported apart; times are the median of --repeats calls after one warm-up,
each waiting with block_until_ready (fewer calls when they would take longer than --max-seconds). Once one
compile or call of a method takes longer than --max-seconds, or fails (e.g. out of memory), the larger N of that
method are skipped and recorded as such. A second table times one real env step (the scripts' wrapper, random
legal actions, --batch envs, vmapped and jitted) on RobotWarehouse and Connector grown to N agents and on SMAX's
smacv2 with N vs N units (the paper's own Figure 2 env), for N in --agents up to --env-agents, with the same
budget rule. --env-only times these env steps alone; a run replaces its own env ids' rows of env_step_<device>.csv
and keeps the others.

Writes to --out-dir (device = cpu or gpu): scaling_<device>.csv, env_step_<device>.csv, the log-log plot
scaling_<device>.png and scaling_<device>_slopes.csv (slope of log time vs log N over --slope-range). Prints the
slopes, the N from which MAM is faster than each MAT variant, and markdown tables. Rows are written as they
come, so an interrupted sweep keeps what it measured.

    python benchmarks/scaling.py                                  # the full sweep (long on a small CPU)
    python benchmarks/scaling.py --agents 2 4 8 --repeats 2 --env-agents 8 --out-dir /tmp/scaling_try
    python benchmarks/scaling.py --methods mam mat-cache --max-seconds 20 --env-agents 0   # no env timing
    python benchmarks/scaling.py --env-only --env-ids smax-smacv2_5_units --agents 5 10 20 40 80
    python benchmarks/scaling.py --from-csv benchmarks/results/scaling_gpu.csv            # re-plot / re-report

On a GPU (pip install "jax[cuda12]>=0.6,<0.11") it runs there; JAX_PLATFORMS=cpu forces the CPU. Timings on shared
machines drift: compare methods within one run.
"""

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the repo's modules
import mam_ppo  # noqa: E402
import mappo  # noqa: E402
import mat_ppo  # noqa: E402

# method -> (script module, Args overrides on top of the script's defaults)
METHODS = {
    "mam": (mam_ppo, {}),
    # the associative scan: slower on a CPU (the README's scan table), the natural choice on a GPU
    "mam-parallel": (mam_ppo, {"scan_mode": "parallel"}),
    # the fused Pallas kernel (selective_scan.py): GPUs only; on a CPU it would run in Pallas' interpreter
    "mam-pallas": (mam_ppo, {"scan_mode": "pallas"}),
    "mat-cache": (mat_ppo, {"decode": "cache"}),
    "mat-recompute": (mat_ppo, {"decode": "recompute"}),
    "mappo": (mappo, {}),
}
ASKED_ONLY = ("mam-parallel", "mam-pallas")  # not in the default --methods
ENV_IDS = ("rware-tiny-2ag", "con-10x10x10a", "smax-smacv2_5_units")
COLUMNS = ["method", "n_agents", "act_ms", "act_compile_s", "train_ms", "train_compile_s"]
COLUMNS += ["act_peak_mb", "train_peak_mb", "status", "machine"]
ENV_COLUMNS = ["env_id", "n_agents", "grid", "obs_dim", "batch", "step_ms", "compile_s", "env_steps_per_s"]
ENV_COLUMNS += ["status", "machine"]
NAN = float("nan")


class EnvSpec(NamedTuple):
    """All that build_network / init_params read from an env."""

    num_agents: int
    obs_dim: int
    action_dim: int


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument(  # only when asked: mam-parallel is the slower scan on a CPU (README), mam-pallas GPU-only
        "--methods", nargs="+", default=[m for m in METHODS if m not in ASKED_ONLY], choices=list(METHODS)
    )
    parser.add_argument("--obs-dim", type=int, default=66, help="observation size per agent (fixed over N)")
    parser.add_argument("--num-actions", type=int, default=5, help="actions per agent (RWARE's 5)")
    parser.add_argument("--batch", type=int, default=16, help="envs per acting call (and per env step)")
    parser.add_argument("--minibatch", type=int, default=256, help="samples per training call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls after one warm-up (the median)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="skip the larger N of a method once a call takes longer",
    )
    parser.add_argument(
        "--env-agents", type=int, default=512, help="time env steps for the --agents up to this (0: none)"
    )
    parser.add_argument("--env-ids", nargs="+", default=list(ENV_IDS), help="env aliases of the scripts")
    parser.add_argument("--env-only", action="store_true", help="time the env steps only, no networks")
    parser.add_argument(
        "--slope-range",
        type=int,
        nargs=2,
        default=[32, 512],
        metavar=("LO", "HI"),
        help="N range of the fits",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--from-csv", type=Path, default=None, help="measure nothing: report and plot a scaling CSV again"
    )
    args = parser.parse_args()
    sizes = (args.obs_dim, args.num_actions, args.batch, args.minibatch, args.repeats, *args.agents)
    if min(sizes) < 1:
        parser.error("--agents, --obs-dim, --num-actions, --batch, --minibatch, --repeats must be positive")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    for env_id in args.env_ids:
        if env_id not in mappo.ENVS:
            parser.error(f"unknown env id {env_id!r}; choose from {', '.join(mappo.ENVS)}")
    if args.from_csv is not None and not args.from_csv.is_file():
        parser.error(f"--from-csv: no such file {args.from_csv}")
    args.agents = sorted(set(args.agents))
    return args


def machine_label():
    """e.g. 'gpu (NVIDIA H100 80GB HBM3), 16 CPUs x86_64, jax 0.10.2, glibc malloc': in every CSV row and the plot.
    The allocator is part of the machine: preloading tcmalloc changes CPU timings (README, Throughput)."""
    device = jax.devices()[0]
    cpus = f"{os.cpu_count()} CPUs {platform.machine()}"
    return f"{device.platform} ({device.device_kind}), {cpus}, jax {jax.__version__}, {allocator()}"


def allocator():
    """'tcmalloc' when preloaded (LD_PRELOAD, the README's opt-in), else the system's 'glibc malloc'."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"


# ----------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------
def compile_timed(fn, *args):
    """-> the compiled executable, compile seconds (tracing + lowering + XLA compilation)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def peak_mb(compiled):
    """temp + argument + output bytes that XLA reports for the executable, in MB; NaN where not reported."""
    try:
        stats = compiled.memory_analysis()
        total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
        return total / 2**20
    except Exception:  # backends without memory analysis return None or raise
        return NAN


def time_calls(compiled, args, repeats, budget_s):
    """One warm-up call, then up to `repeats` timed calls, fewer when they would take longer than budget_s.
    -> (median seconds, slowest call in seconds)."""
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    warm_up = time.perf_counter() - start
    if warm_up > budget_s:  # already over budget: this call is the measurement
        return warm_up, warm_up
    times = []
    for _ in range(max(1, min(repeats, int(budget_s / max(warm_up, 1e-9))))):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
def build(method, n_agents, obs_dim, num_actions, key):
    """The script's network with its default hyperparameters, and params for N agents."""
    module, overrides = METHODS[method]
    spec = EnvSpec(n_agents, obs_dim, num_actions)
    args = replace(module.Args(), **overrides)
    if overrides.get("scan_mode") == "pallas" and jax.default_backend() == "cpu":
        # build_network refuses the interpreted kernel (a training run); gpu_check.py --dry-run wants it here
        network = module.MultiAgentMamba(
            num_actions, module.MambaConfig(*(getattr(args, f) for f in module.MambaConfig._fields))
        )
    else:
        network = module.build_network(args, spec)
    return module, network, module.init_params(network, key, spec)


def train_loss_fn(module, network):
    """Scalar loss through the training forward pass: sum of log pi(taken action) + sum of values."""

    def loss(params, obs, mask, actions):  # obs (M, N, O), mask (M, N, A), actions (M, N)
        if module is mappo:
            logits, values = network.apply(params, obs, mask)  # (M, N, A), (M,) one team value
        else:
            logits, values = network.apply(params, obs, mask, actions)  # (M, N, A), (M, N) teacher forcing
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], axis=-1)  # (M, N, 1)
        return jnp.sum(log_probs) + jnp.sum(values)

    return loss


def measure(method, n_agents, opts, key, train_from=None):
    """Acting and training time, compile time and peak memory of one method at N agents.
    train_from: a row whose train columns to copy instead of measuring (mat-recompute trains as mat-cache).
    -> (row of COLUMNS without machine, slowest compile or call in seconds)."""
    k_params, k_obs, k_act, k_train, k_actions = jax.random.split(key, 5)
    module, network, params = build(method, n_agents, opts.obs_dim, opts.num_actions, k_params)
    row = dict(method=method, n_agents=n_agents, status="ok")

    obs = jax.random.normal(k_obs, (opts.batch, n_agents, opts.obs_dim))  # (B, N, O)
    mask = jnp.ones((opts.batch, n_agents, opts.num_actions), bool)  # (B, N, A): every action legal
    act = lambda p, obs, mask, key: module.act(network, p, obs, mask, key)  # -> actions, log-probs, values
    compiled, row["act_compile_s"] = compile_timed(act, params, obs, mask, k_act)
    row["act_peak_mb"] = peak_mb(compiled)
    median, slowest = time_calls(compiled, (params, obs, mask, k_act), opts.repeats, opts.max_seconds)
    row["act_ms"] = 1e3 * median
    slowest = max(slowest, row["act_compile_s"])
    del compiled

    if train_from is not None:
        row.update({k: train_from[k] for k in ("train_ms", "train_compile_s", "train_peak_mb")})
        row["status"] = f"ok (train from {train_from['method']})"
        return row, slowest
    obs = jax.random.normal(k_train, (opts.minibatch, n_agents, opts.obs_dim))  # (M, N, O)
    mask = jnp.ones((opts.minibatch, n_agents, opts.num_actions), bool)  # (M, N, A)
    actions = jax.random.randint(k_actions, (opts.minibatch, n_agents), 0, opts.num_actions)  # (M, N)
    grad_fn = jax.value_and_grad(train_loss_fn(module, network))  # -> loss, grads (a params tree)
    compiled, row["train_compile_s"] = compile_timed(grad_fn, params, obs, mask, actions)
    row["train_peak_mb"] = peak_mb(compiled)
    median, train_slowest = time_calls(compiled, (params, obs, mask, actions), opts.repeats, opts.max_seconds)
    row["train_ms"] = 1e3 * median
    return row, max(slowest, train_slowest, row["train_compile_s"])


def run_networks(opts, machine, path):
    rows, why_skip = [], {}  # method -> why its larger N are skipped
    key = jax.random.PRNGKey(opts.seed)
    for method in opts.methods:
        for n_agents in opts.agents:
            empty = dict.fromkeys(COLUMNS[2:-2], NAN)
            if method in why_skip:
                row = dict(empty, method=method, n_agents=n_agents, status=f"skipped ({why_skip[method]})")
            else:
                # decode only changes `act`: mat-recompute's training pass is mat-cache's, measured once
                same = [r for r in rows if r["method"] == "mat-cache" and r["n_agents"] == n_agents]
                train_from = (
                    same[0]
                    if method == "mat-recompute" and same and same[0]["status"].startswith("ok")
                    else None
                )
                try:
                    row, slowest = measure(method, n_agents, opts, key, train_from)
                    if slowest > opts.max_seconds:
                        why_skip[method] = f"a call took {slowest:.0f} s at N={n_agents}"
                        row["status"] += f"; over budget ({slowest:.0f} s)"
                except Exception as error:  # e.g. out of memory: record it and skip the larger N
                    row = dict(empty, method=method, n_agents=n_agents, status=f"error: {one_line(error)}")
                    why_skip[method] = f"error at N={n_agents}"
            row["machine"] = machine
            rows.append(row)
            print(format_row(row), flush=True)
            write_csv(path, rows, COLUMNS)
            jax.clear_caches()
    return rows


def one_line(error):
    """An exception as one short CSV-safe line."""
    return " ".join(f"{type(error).__name__}: {error}".replace(",", ";").split())[:160]


# ----------------------------------------------------------------------------------------------------------
# Env steps
# ----------------------------------------------------------------------------------------------------------
def grid_label(env_id, n_agents):
    family, kw, _ = mappo.env_config(env_id, n_agents)
    if family == "rware":
        return f"{kw['shelf_rows']}x{kw['shelf_columns']} shelves"
    if family == "smax":
        return f"{kw['num_agents']} vs {kw['num_enemies']} units"
    return f"{kw['grid_size']}x{kw['grid_size']}"


def time_env_step(env_id, n_agents, opts, key):
    """One vmapped env step (the scripts' wrapper: observe included) with random legal actions."""
    env = mappo.make_env(env_id, n_agents)
    k_reset, k_step = jax.random.split(key)
    state, _, mask = jax.jit(jax.vmap(env.reset))(jax.random.split(k_reset, opts.batch))  # mask (B, N, A)

    def step(state, mask, key):
        actions = jax.random.categorical(key, jnp.where(mask, 0.0, -1e9)).astype(jnp.int32)  # (B, N) legal
        state, obs, mask, reward, terminated, truncated, _ = jax.vmap(env.step)(state, actions)
        return state, obs, mask, reward, terminated, truncated  # obs (B, N, O): keep the observation work

    compiled, compile_s = compile_timed(step, state, mask, k_step)
    median, slowest = time_calls(compiled, (state, mask, k_step), opts.repeats, opts.max_seconds)
    row = dict(env_id=env_id, n_agents=env.num_agents, grid=grid_label(env_id, n_agents), obs_dim=env.obs_dim)
    row.update(
        batch=opts.batch, step_ms=1e3 * median, compile_s=compile_s, env_steps_per_s=opts.batch / median
    )
    return row, max(slowest, compile_s)


def run_envs(opts, machine, path):
    kept, rows = [], []  # kept: the CSV's rows of the env ids not measured now
    if path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["env_id"] not in opts.env_ids]
    for env_id in opts.env_ids:
        why_skip = None
        for n_agents in [n for n in opts.agents if n <= opts.env_agents]:
            empty = dict(env_id=env_id, n_agents=n_agents, grid="", obs_dim=NAN, batch=opts.batch)
            empty.update(step_ms=NAN, compile_s=NAN, env_steps_per_s=NAN)
            if why_skip:
                row = dict(empty, status=f"skipped ({why_skip})")
            else:
                try:
                    row, slowest = time_env_step(env_id, n_agents, opts, jax.random.PRNGKey(opts.seed))
                    row["status"] = "ok"
                    if slowest > opts.max_seconds:
                        why_skip = f"a call took {slowest:.0f} s at N={n_agents}"
                        row["status"] += f"; over budget ({slowest:.0f} s)"
                except Exception as error:
                    row, why_skip = dict(empty, status=f"error: {one_line(error)}"), f"error at N={n_agents}"
            row["machine"] = machine
            rows.append(row)
            print(
                f"{row['env_id']:>16} N={row['n_agents']:<4} grid {row['grid']:>16}  obs {row['obs_dim']:>6}  "
                f"step {row['step_ms']:9.2f} ms  compile {row['compile_s']:6.1f} s  {row['status']}",
                flush=True,
            )
            write_csv(path, kept + rows, ENV_COLUMNS)
            jax.clear_caches()
    return rows


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------
def write_csv(path, rows, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def read_csv(path):
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in COLUMNS[2:-2]:
                row[k] = float(row[k]) if row[k] not in ("", None) else NAN
            row["n_agents"] = int(row["n_agents"])
            rows.append(row)
    return rows


def measured(rows, method, column):
    """-> {N: time} of the rows of `method` with a measured (finite) `column`."""
    return {
        r["n_agents"]: r[column]
        for r in rows
        if r["method"] == method and r["status"].startswith("ok") and math.isfinite(r[column])
    }


def fit_slopes(rows, lo, hi):
    """Slope of log(time) vs log(N) over lo <= N <= hi, per method and pass (NaN with fewer than 2 points)."""
    fits = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for name, column in (("act", "act_ms"), ("train", "train_ms")):
            points = {n: t for n, t in measured(rows, method, column).items() if lo <= n <= hi}
            slope = NAN
            if len(points) >= 2:
                slope = float(np.polyfit(np.log(list(points)), np.log(list(points.values())), 1)[0])
            ns = sorted(points)
            fits.append({"method": method, "pass": name, "slope": slope, "n_points": len(ns)})
            fits[-1].update(n_min=ns[0] if ns else "", n_max=ns[-1] if ns else "")
    return fits


def crossover(rows, column, fast, slow):
    """The smallest N from which `fast` beats `slow` at every larger N (skipped or failed rows count as
    infinitely slow) -> a sentence."""
    mine, theirs = measured(rows, fast, column), measured(rows, slow, column)
    tried = {r["n_agents"] for r in rows if r["method"] in (fast, slow)}
    both = sorted(n for n in tried if n in mine or n in theirs)  # N where at least one of the two finished
    if not mine or not theirs or not both:
        return "not enough measurements"
    wins = [mine.get(n, math.inf) < theirs.get(n, math.inf) for n in both]
    if all(wins):
        return f"{fast} is faster at every measured N ({both[0]}..{both[-1]})"
    if not wins[-1]:
        return f"{fast} is not faster at the largest measured N ({both[-1]}): no crossover up to there"
    first = both[max(i for i, w in enumerate(wins) if not w) + 1]
    note = "" if first in theirs else f" ({slow} over budget or failed there)"
    return f"{fast} is faster from N={first} on{note}"


def fmt(value, digits=2):
    return "-" if not isinstance(value, float) or not math.isfinite(value) else f"{value:.{digits}f}"


def format_row(row):
    return (
        f"{row['method']:>14} N={row['n_agents']:<4} act {fmt(row['act_ms']):>10} ms "
        f"(compile {fmt(row['act_compile_s'], 1)} s)  train {fmt(row['train_ms']):>10} ms "
        f"(compile {fmt(row['train_compile_s'], 1)} s)  peak {fmt(row['act_peak_mb'], 1)} / "
        f"{fmt(row['train_peak_mb'], 1)} MB  {row['status']}"
    )


def plot(rows, path, machine):
    """Log-log, one panel per pass, one line per method. Copied train columns (mat-recompute) are not drawn
    twice: mat-cache's training line stands for both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, column, title in zip(axes, ("act_ms", "train_ms"), ("acting (one env step)", "training pass")):
        for method in methods:
            own = [r for r in rows if "train from" not in r["status"]] if column == "train_ms" else rows
            points = sorted(measured(own, method, column).items())
            label = method
            if column == "train_ms" and method == "mat-cache" and "mat-recompute" in methods:
                label = "mat-cache (= mat-recompute)"
            if points:
                ax.plot(*zip(*points), marker="o", label=label, color=f"C{list(METHODS).index(method)}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="number of agents N", ylabel="median time (ms)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Time vs number of agents (log-log): {machine}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_envs(env_rows, opts):
    if not env_rows:
        return
    print(f"\nenv step ({opts.batch} envs, random legal actions, the scripts' wrapper):\n")
    print("| env | N | grid | obs dim | step ms | compile s | env steps/s | status |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in env_rows:
        print(
            f"| {r['env_id']} | {r['n_agents']} | {r['grid']} | {r['obs_dim']} | {fmt(r['step_ms'])} | "
            f"{fmt(r['compile_s'], 1)} | {fmt(r['env_steps_per_s'], 0)} | {r['status']} |"
        )


def report(rows, env_rows, opts, machine, device):
    lo, hi = opts.slope_range
    fits = fit_slopes(rows, lo, hi)
    slopes_path = opts.out_dir / f"scaling_{device}_slopes.csv"
    write_csv(slopes_path, [dict(f, machine=machine) for f in fits], list(fits[0]) + ["machine"])
    print(f"\nslope of log(time) vs log(N) over N in {lo}..{hi} (1 = linear, 2 = quadratic):")
    for f in fits:
        where = f"N={f['n_min']}..{f['n_max']}, {f['n_points']} points" if f["n_points"] else "no points"
        print(f"  {f['method']:>14} {f['pass']:<5} {fmt(f['slope'])}  ({where})")

    methods = {r["method"] for r in rows}
    for mam in [m for m in ("mam", "mam-parallel", "mam-pallas") if m in methods]:
        print(f"\nwhere {mam} becomes faster:")
        for other in ("mat-cache", "mat-recompute"):
            if other in methods:
                for name, column in (("act", "act_ms"), ("train", "train_ms")):
                    print(f"  vs {other:<13} {name:<5}: {crossover(rows, column, mam, other)}")

    sizes = (
        f"obs_dim {opts.obs_dim}, {opts.num_actions} actions, batch {opts.batch}, minibatch {opts.minibatch}"
    )
    print(
        f"\n{machine}" + ("" if opts.from_csv else f"; {sizes}") + "\n"
    )  # a re-report knows only the machine
    print(
        "| method | N | act ms | act compile s | train ms | train compile s | act peak MB | train peak MB | status |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['n_agents']} | {fmt(r['act_ms'])} | {fmt(r['act_compile_s'], 1)} | "
            f"{fmt(r['train_ms'])} | {fmt(r['train_compile_s'], 1)} | {fmt(r['act_peak_mb'], 1)} | "
            f"{fmt(r['train_peak_mb'], 1)} | {r['status']} |"
        )
    report_envs(env_rows, opts)

    png = opts.out_dir / f"scaling_{device}.png"
    plot(rows, png, machine)
    print(f"\nsaved {png} and {slopes_path}")


def main():
    opts = parse_args()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    if opts.from_csv is not None:
        rows = read_csv(opts.from_csv)
        device = opts.from_csv.stem.removeprefix("scaling_")
        report(rows, [], opts, rows[0]["machine"] if rows else "", device)
        return
    device = jax.devices()[0].platform  # "cpu" or "gpu"
    if "mam-pallas" in opts.methods and device == "cpu":
        sys.exit("scaling.py: mam-pallas needs a GPU (on a CPU its kernel runs interpreted, for tests only)")
    machine = machine_label()
    print(f"machine: {machine}")
    print(
        f"methods {' '.join(opts.methods)}; N {opts.agents}; repeats {opts.repeats}; budget {opts.max_seconds} s"
    )
    rows = [] if opts.env_only else run_networks(opts, machine, opts.out_dir / f"scaling_{device}.csv")
    env_rows = []
    if opts.env_agents > 0 and any(n <= opts.env_agents for n in opts.agents):
        print(f"\nenv step, {opts.batch} envs:")
        env_rows = run_envs(opts, machine, opts.out_dir / f"env_step_{device}.csv")
    if opts.env_only:
        report_envs(env_rows, opts)
    else:
        report(rows, env_rows, opts, machine, device)
    saved = ([] if opts.env_only else [f"scaling_{device}.csv"]) + (
        [f"env_step_{device}.csv"] if env_rows else []
    )
    print(f"saved {', '.join(str(opts.out_dir / name) for name in saved)}")


if __name__ == "__main__":
    main()
