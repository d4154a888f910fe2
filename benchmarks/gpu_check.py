"""One prepared check of the fused selective scan (selective_scan.py, mode "pallas") on one GPU: ~8 minutes.

    python benchmarks/gpu_check.py OUT_DIR              # on a machine with a GPU
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # the same end to end on the CPU: tiny sizes, the kernel
                                                        # in Pallas' interpreter (checks the script, times nothing)

Four sections, each written to a CSV in OUT_DIR as its rows come (an interrupted run keeps what it measured):
  check.csv  the kernel (Triton) against the sequential mode, per kernel setting: y, h_last and the gradients of
             x, delta, A, B, C, D, h0; the largest error relative to the largest reference value (float32 matmuls
             at full precision for the check; the kernel itself has no matmul).
  scan.csv   the scan alone, forward and forward + backward: sequential, parallel and pallas (a few settings of
             block_d, chunk, num_warps) at M = 256 and 1024 sequences of L = 512 tokens, d = 128, n = 8 (MAM's
             scans: d_inner = 2 * 64, d_state 8).
  train.csv  MAM's training pass (benchmarks/scaling.py's train measure: jit(value_and_grad) through the
             network, minibatch 256, RWARE's observation size) at N = 32, 128, 512 in each scan mode; MAT with
             its KV cache for reference; and MAM with the pallas setting that was fastest in scan.csv.
  act.csv    acting at N = 512 against the number of envs (16, 256, 1024): MAM in each scan mode (it reaches
             the encoder's scans) and MAT with its KV cache.
Times are medians of --repeats calls after one warm-up (scaling.py's helpers). Rows that would start after
--max-minutes are written as skipped. Networks come from the scripts with their default hyperparameters.

It runs from a copy of the repository where Python has jax (0.10 or 0.11), flax, optax and numpy but neither tyro
nor jaxmarl: the scripts import jaxmarl lazily, and tyro only in their main(), so a stub stands in for it.
"""

import argparse
import functools
import inspect
import math
import sys
import time
import types
from pathlib import Path

# mappo, mat_ppo and mam_ppo import tyro at the top but call it only in their main(), which never runs here
try:
    import tyro  # noqa: F401
except ImportError:
    sys.modules["tyro"] = types.ModuleType("tyro")

import jax
import jax.numpy as jnp
import numpy as np

FULL = dict(  # the GPU sizes (the issue's)
    check=[(8, 512, 128, 8, False), (3, 37, 70, 5, True)],  # (M, L, d, n, reverse); the second pads all axes
    kernels=[(32, 16, 4), (32, 8, 4), (32, 16, 1), (64, 16, 4), (128, 16, 8)],  # (block_d, chunk, num_warps)
    scan_m=(256, 1024),
    scan_l=512,
    scan_dn=(128, 8),
    train_agents=(32, 128, 512),
    minibatch=256,
    act_agents=512,
    envs=(16, 256, 1024),
)
DRY = dict(  # --dry-run: every section and code path, tiny
    check=[(2, 9, 6, 3, True)],
    kernels=[(4, 4, 1), (8, 2, 1)],
    scan_m=(2,),
    scan_l=8,
    scan_dn=(16, 4),
    train_agents=(3,),
    minibatch=2,
    act_agents=3,
    envs=(2,),
)
MAM_MODES = {"mam": "sequential", "mam-parallel": "parallel", "mam-pallas": "pallas"}  # scaling.py's methods
OBS_DIM, NUM_ACTIONS = 66, 5  # RWARE's, as scaling.py's defaults


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder for the CSVs (created)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, kernel interpreted")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls after one warm-up (the median)")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="start no row after this (9; no limit with --dry-run)"
    )
    opts = parser.parse_args()
    if opts.max_minutes is None:
        opts.max_minutes = math.inf if opts.dry_run else 9.0
    return opts


class Run:
    """Sizes, the deadline, the machine label and the CSV writers of one run."""

    def __init__(self, opts, scaling):
        self.opts, self.scaling = opts, scaling
        self.sizes = DRY if opts.dry_run else FULL
        self.deadline = time.perf_counter() + 60 * opts.max_minutes
        self.machine = scaling.machine_label()
        self.rows = {}

    def timed(self, fn, *args):
        """-> (median ms, compile s) of jit(fn)(*args)."""
        compiled, compile_s = self.scaling.compile_timed(fn, *args)
        median, _ = self.scaling.time_calls(compiled, args, self.opts.repeats, budget_s=60.0)
        return 1e3 * median, compile_s

    def row(self, table, row, measure):
        """Fill `row` with measure() (a dict), or with the error or the deadline, then write the table's CSV."""
        if time.perf_counter() > self.deadline:
            row["status"] = f"skipped (past --max-minutes {self.opts.max_minutes:g})"
        else:
            try:
                row.update(measure())
                row.setdefault("status", "ok")
            except Exception as error:  # e.g. out of memory, a Triton failure: record it and go on
                row["status"] = f"error: {self.scaling.one_line(error)}"
        row["machine"] = self.machine
        rows = self.rows.setdefault(table, [])
        rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.scaling.write_csv(self.opts.out_dir / f"{table}.csv", rows, columns)
        cells = [
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "machine"
        ]
        print(table, *cells, flush=True)
        jax.clear_caches()
        return row


def scan_inputs(key, m, l, d, n):
    """Random inputs as MAM makes them: delta in Mamba's init range, A = -(1..n) per channel, D = 1."""
    kx, kd, kb, kc, kh = jax.random.split(key, 5)
    x = jax.random.normal(kx, (m, l, d))
    delta = jnp.exp(jax.random.uniform(kd, (m, l, d), minval=np.log(1e-3), maxval=np.log(1e-1)))
    A = -jnp.broadcast_to(jnp.arange(1.0, n + 1), (d, n))
    B, C = jax.random.normal(kb, (m, l, n)), jax.random.normal(kc, (m, l, n))
    return [x, delta, A, B, C, jnp.ones(d), 0.1 * jax.random.normal(kh, (m, d, n))]


def scan_fn(mode, kernel, reverse=False):
    """selective_scan with h0 as a 7th argument, returning (y, h_last); kernel: (block_d, chunk, num_warps)."""
    from selective_scan import selective_scan

    settings = dict(zip(("block_d", "chunk", "num_warps"), kernel)) if mode == "pallas" else {}
    return lambda *a: selective_scan(
        *a[:6], h0=a[6], mode=mode, reverse=reverse, return_state=True, **settings
    )


def loss_and_grads(fn):
    """-> f(*inputs) = ((y, h_last), gradients of sum(y * cos(y)) + sum(h_last) w.r.t. all 7 inputs)."""

    def loss(*inputs):
        y, h = fn(*inputs)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h), (y, h)

    grad = jax.grad(loss, argnums=tuple(range(7)), has_aux=True)
    return lambda *inputs: grad(*inputs)[::-1]


def kernel_label(kernel):
    return "block_d={} chunk={} warps={}".format(*kernel)


def check_kernel(run):
    names = ("y", "h_last", "dx", "ddelta", "dA", "dB", "dC", "dD", "dh0")
    for m, l, d, n, reverse in run.sizes["check"]:
        inputs = scan_inputs(jax.random.PRNGKey(l), m, l, d, n)
        with jax.default_matmul_precision("float32"):  # the sequential mode's einsums, not TF32, on the GPU
            want = jax.jit(loss_and_grads(scan_fn("sequential", None, reverse)))(*inputs)
        want = jax.tree.leaves(want)
        for kernel in run.sizes["kernels"]:

            def measure(kernel=kernel):
                got = jax.tree.leaves(jax.jit(loss_and_grads(scan_fn("pallas", kernel, reverse)))(*inputs))
                errors = {
                    f"err_{name}": float(jnp.abs(g - w).max() / jnp.maximum(jnp.abs(w).max(), 1e-30))
                    for name, g, w in zip(names, got, want)
                }
                worst = max(errors.values())
                return dict(errors, worst=worst, status="ok" if worst < 1e-4 else "MISMATCH (worst >= 1e-4)")

            row = dict(M=m, L=l, d=d, n=n, reverse=reverse, kernel=kernel_label(kernel))
            run.row("check", row, measure)


def time_scans(run):
    d, n = run.sizes["scan_dn"]
    l = run.sizes["scan_l"]
    settings = [("sequential", None), ("parallel", None)] + [("pallas", k) for k in run.sizes["kernels"]]
    for m in run.sizes["scan_m"]:
        inputs = scan_inputs(jax.random.PRNGKey(0), m, l, d, n)
        for mode, kernel in settings:

            def measure(mode=mode, kernel=kernel):
                fwd_ms, fwd_compile = run.timed(scan_fn(mode, kernel), *inputs)
                both_ms, both_compile = run.timed(loss_and_grads(scan_fn(mode, kernel)), *inputs)
                return dict(fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, compile_s=fwd_compile + both_compile)

            row = dict(mode=mode, kernel=kernel_label(kernel) if kernel else "", M=m, L=l, d=d, n=n)
            run.row("scan", row, measure)


def fastest_kernel(run):
    """The pallas setting with the smallest forward + backward time at the largest M, or None."""
    rows = [r for r in run.rows.get("scan", []) if r["mode"] == "pallas" and r["status"] == "ok"]
    rows = [r for r in rows if r["M"] == max(run.sizes["scan_m"])]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["fwd_bwd_ms"])["kernel"]
    return next(k for k in run.sizes["kernels"] if kernel_label(k) == best)


@functools.cache
def mam_scan_with(kernel):
    """selective_scan with the given pallas settings as its defaults, to stand in for mam_ppo's."""
    import selective_scan

    return functools.partial(
        selective_scan.selective_scan, **dict(zip(("block_d", "chunk", "num_warps"), kernel))
    )


def network_time(run, method, n_agents, batch, key, measure_act, kernel=None):
    """-> measure(): act or train time of scaling.py's method at N agents, `batch` envs or samples. kernel: the
    pallas settings MAM's mixers use (by swapping mam_ppo.selective_scan while it is built and traced)."""
    scaling = run.scaling

    def measure():
        import mam_ppo
        import selective_scan

        original = mam_ppo.selective_scan
        if kernel is not None and original is not selective_scan.selective_scan:
            raise RuntimeError(
                "mam_ppo.selective_scan is not selective_scan.selective_scan: cannot set the kernel"
            )
        try:
            if kernel is not None:
                mam_ppo.selective_scan = mam_scan_with(kernel)
            k_params, k_obs, k_act = jax.random.split(key, 3)
            module, network, params = scaling.build(method, n_agents, OBS_DIM, NUM_ACTIONS, k_params)
            obs = jax.random.normal(k_obs, (batch, n_agents, OBS_DIM))
            mask = jnp.ones((batch, n_agents, NUM_ACTIONS), bool)
            if measure_act:
                act = lambda p, obs, mask, key: module.act(network, p, obs, mask, key)
                ms, compile_s = run.timed(act, params, obs, mask, k_act)
                return dict(act_ms=ms, compile_s=compile_s)
            actions = jax.random.randint(k_act, (batch, n_agents), 0, NUM_ACTIONS)
            grad_fn = jax.value_and_grad(scaling.train_loss_fn(module, network))
            ms, compile_s = run.timed(grad_fn, params, obs, mask, actions)
            return dict(train_ms=ms, compile_s=compile_s)
        finally:
            mam_ppo.selective_scan = original

    return measure


def time_networks(run):
    key = jax.random.PRNGKey(0)
    best = fastest_kernel(run)
    from selective_scan import selective_scan

    defaults = inspect.signature(selective_scan).parameters
    default = tuple(defaults[k].default for k in ("block_d", "chunk", "num_warps"))
    for n_agents in run.sizes["train_agents"]:
        for method in [*MAM_MODES, "mat-cache"]:
            row = dict(method=method, kernel="", n_agents=n_agents, minibatch=run.sizes["minibatch"])
            run.row("train", row, network_time(run, method, n_agents, run.sizes["minibatch"], key, False))
        if best is not None and best != default:
            row = dict(method="mam-pallas", kernel=kernel_label(best), n_agents=n_agents)
            row["minibatch"] = run.sizes["minibatch"]
            run.row(
                "train", row, network_time(run, "mam-pallas", n_agents, row["minibatch"], key, False, best)
            )
    n_agents = run.sizes["act_agents"]
    for batch in run.sizes["envs"]:
        for method in [*MAM_MODES, "mat-cache"]:
            row = dict(method=method, n_agents=n_agents, envs=batch)
            run.row("act", row, network_time(run, method, n_agents, batch, key, True))


def report(run):
    """Markdown tables of the CSVs, for the log."""
    for table, rows in run.rows.items():
        columns = [c for c in rows[0] if c not in ("machine",) and not c.startswith("err_")]
        columns += [
            c for r in rows for c in r if c not in columns and c != "machine" and not c.startswith("err_")
        ]
        columns = list(dict.fromkeys(columns))
        print(f"\n{table}.csv ({run.machine}):\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for r in rows:
            cells = [r.get(c, "") for c in columns]
            print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")


def main():
    opts = parse_args()
    if opts.dry_run:  # before anything touches a device
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() == "cpu":
        sys.exit(
            "gpu_check.py: no GPU here (the kernel would run interpreted); use --dry-run to try the script"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scaling  # also puts the repository on sys.path

    opts.out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(opts, scaling)
    start = time.perf_counter()
    print(
        f"machine: {run.machine}; {'dry run (CPU, interpreted)' if opts.dry_run else 'GPU'}; out {opts.out_dir}"
    )
    for section in (check_kernel, time_scans, time_networks):
        section(run)
        print(f"-- {section.__name__} done at {time.perf_counter() - start:.0f} s", flush=True)
    report(run)
    print(
        f"\nsaved {', '.join(str(opts.out_dir / f'{t}.csv') for t in run.rows)} in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
