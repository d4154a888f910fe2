"""One prepared check of the fused selective scan (selective_scan.py, mode "pallas") on one GPU, planned to take at
most 5 minutes by its compile count (the estimate is printed first and kept in env.json).

On the GPU machine, from the repository root, with the CSVs and the log under $OUT:

    python -u benchmarks/gpu_check.py $OUT/gpu_check 2>&1 | tee $OUT/gpu_check.log

    python benchmarks/gpu_check.py /tmp/gpu_check --dry-run    # the same rows on the CPU, tiny, the kernel in
                                                               # Pallas' interpreter: checks the script and its plan

Rows run in this order, the most wanted first (a deadline or a crash loses the last ones). Each row prints its
name before it starts, runs in its own try/except, and is written to its table's CSV as soon as it ends:
  check.csv      the kernel (Triton) against the sequential mode (the reference is a row of its own), at
                 (M, L, d, n) = (8, 512, 128, 8) for each kernel setting and (3, 37, 70, 5) reversed, which pads
                 every axis, for the default setting: y and h_last of the forward-only kernel (no saved states:
                 what acting runs) and of the training kernels, and the gradients of x, delta, A, B, C, D, h0.
                 Each error is the largest absolute error relative to the largest reference value (%.3e).
  mam_check.csv  MAM's loss and parameter gradients with the kernel against the sequential mode (N = 128,
                 minibatch 32): the loss's relative error and the largest gradient error over the parameters.
  train.csv      MAM's training pass (benchmarks/scaling.py's train measure: jit(value_and_grad) through the
                 network, minibatch 256, RWARE's observation size) in each scan mode, and MAT with its KV cache,
                 at N = 512.
  act.csv        acting at N = 512 with 1024 envs: MAM in each scan mode (its encoder scans, forward only) and MAT.
  scan.csv       the scan alone, forward and forward + backward, sequential, parallel and pallas per kernel setting,
                 at M = 1024 sequences of L = 512 tokens, d = 128, n = 8 (MAM's scans: d_inner 2 * 64, d_state 8).
  train.csv      the training rows again at N = 128.
  env.json       jax, jaxlib and the CUDA plugin's versions, the device, driver and compute capability, the git
                 commit (or --commit where the copy has no .git) and the sha256 of the sources; written first.
The checks run float32 matmuls at full precision (not TF32), the timings at jax's default. Times are medians of
--repeats calls after one warm-up, within a 1.5 s budget per measure. MAM runs with selective_scan's default kernel
setting; networks come from the scripts with their default hyperparameters, their parameters initialised once
(jitted: eager initialisation compiles every op) and shared by the scan modes, which have none. Rows that would
start after --max-minutes are written as skipped.

Kernel settings (block_d, chunk, num_warps): the default first; all keep chunk 8 and two state values per thread
(n = 8 times block_d over 32 * num_warps threads), so every backward kernel should need about the default's
registers, and compile as fast.

The estimate counts jit compiles and Triton compiles (each pallas_call, forward or backward, counted once per jit
compile: an upper bound where XLA reuses a kernel) and timed measures, at the seconds per item in COSTS. --dry-run
counts the compiles it actually makes (the kernels in each function's jaxpr) and fails a row that departs from
the plan: the dry run has the same rows, so it checks the count the estimate rests on.

It runs from a copy of the repository where Python has jax (0.10 or 0.11), flax, optax and numpy but neither tyro
nor jaxmarl: the scripts import jaxmarl lazily, and tyro only in their main(), so a stub stands in for it.
"""

import argparse
import functools
import gc
import hashlib
import inspect
import json
import math
import platform
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

# mappo, mat_ppo and mam_ppo import tyro at the top but call it only in their main(), which never runs here
try:
    import tyro  # noqa: F401
except ImportError:
    sys.modules["tyro"] = types.ModuleType("tyro")

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import selective_scan  # noqa: E402

KERNEL_FIELDS = ("block_d", "chunk", "num_warps")
DEFAULT_KERNEL = tuple(
    inspect.signature(selective_scan.selective_scan).parameters[k].default for k in KERNEL_FIELDS
)
FULL = dict(  # the GPU run
    check=[
        (8, 512, 128, 8, False),
        (3, 37, 70, 5, True),
    ],  # (M, L, d, n, reverse): every kernel on the first only
    kernels=[DEFAULT_KERNEL, (16, 8, 2), (64, 8, 8)],  # (block_d, chunk, num_warps)
    mam_check=(128, 32),  # (N, minibatch)
    train=(512, 128),  # N: the first before acting, the second after the scan sweep
    minibatch=256,
    act=(512, 1024),  # (N, envs)
    scan=(1024, 512, 128, 8),  # (M, L, d, n)
)
DRY = dict(  # --dry-run: the same rows, tiny
    check=[(2, 9, 6, 3, False), (3, 5, 7, 3, True)],
    kernels=[(4, 4, 1), (2, 4, 1), (8, 2, 1)],
    mam_check=(3, 2),
    train=(3, 2),
    minibatch=2,
    act=(3, 2),
    scan=(2, 8, 16, 4),
)
TIMED_BUDGET_S = 1.5  # per timed measure, after its warm-up (the GPU run; the dry run makes one call)
COSTS = {  # seconds per item on one H100, the estimate's assumptions: (seconds, where the number comes from)
    "start": (20.0, "python, jax and the GPU starting, env.json: assumed"),
    "row": (0.5, "per row: inputs, the checked call, clearing caches, the CSV: assumed"),
    "jit_scan": (2.0, "XLA compile of a scan-only function: assumed (smaller than MAM's act)"),
    "jit_init": (5.0, "XLA compile of a network's init: assumed (forward only, less than its training pass)"),
    "jit_train": (9.5, "XLA compile of MAM's or MAT's training pass: at most 9.31 s in scaling_gpu.csv"),
    "jit_act": (3.5, "XLA compile of MAM's or MAT's act: at most 3.46 s in scaling_gpu.csv"),
    "triton_fwd": (1.0, "a forward kernel: assumed (about half the backward's registers)"),
    "triton_bwd": (
        1.6,
        "a chunk-8 backward kernel, as compiled for sm_90a by Triton and ptxas without a GPU",
    ),
    "timed": (2.0, f"a timed measure: its warm-up call and at most {TIMED_BUDGET_S:g} s of timed calls"),
}
BUDGET_MIN = 5.0
TOL = 1e-4  # a check row is ok when every relative error is below
NAMES = ("y", "h_last", "dx", "ddelta", "dA", "dB", "dC", "dD", "dh0")  # a check's outputs and gradients
MAM_MODES = {"mam": "sequential", "mam-parallel": "parallel", "mam-pallas": "pallas"}  # scaling.py's methods
OBS_DIM, NUM_ACTIONS = 66, 5  # RWARE's, as scaling.py's defaults
SOURCES = (
    "selective_scan.py",
    "mam_ppo.py",
    "mat_ppo.py",
    "benchmarks/gpu_check.py",
    "benchmarks/scaling.py",
)


# ----------------------------------------------------------------------------------------------------------
# The plan: every row, its measure and the compiles it makes
# ----------------------------------------------------------------------------------------------------------
class Row(NamedTuple):
    table: str
    name: str  # printed before the row starts
    fields: dict  # the CSV's leading columns
    measure: Callable  # measure(run) -> more columns
    cost: Counter  # COSTS keys -> count: the compiles and timed measures it makes


def plan(sizes):
    """Every row of a run, in order."""
    import mam_ppo

    scans = mam_ppo.Args().n_block * 2  # scans per encoder pass (both directions), and per decoder pass
    pallas = lambda fwd, bwd=0: Counter(triton_fwd=fwd, triton_bwd=bwd)
    rows, initialised = [], set()

    def network_cost(method, kind):  # the network's init where it comes first, its jit, its kernels
        family = "mam" if method.startswith("mam") else method
        cost = Counter({f"jit_{kind}": 1, "jit_init": int(family not in initialised)})
        initialised.add(family)
        if MAM_MODES.get(method) == "pallas":
            cost += pallas(scans, 0) if kind == "act" else pallas(2 * scans, 2 * scans)
        return cost

    for i, (m, l, d, n, reverse) in enumerate(sizes["check"]):
        case, fields = (m, l, d, n, reverse), dict(M=m, L=l, d=d, n=n, reverse=reverse)
        label = f"M={m} L={l} d={d} n={n}{' reverse' if reverse else ''}"
        measure = functools.partial(check_reference, case=case)
        rows.append(
            Row(
                "check",
                f"sequential {label}",
                dict(fields, kernel="sequential"),
                measure,
                Counter(jit_scan=1),
            )
        )
        for kernel in sizes["kernels"] if i == 0 else sizes["kernels"][:1]:
            cost = Counter(jit_scan=1) + pallas(
                2, 1
            )  # the forward-only kernel, the saving forward, the backward
            measure = functools.partial(check_kernel, case=case, kernel=kernel)
            fields_k = dict(fields, kernel=kernel_label(kernel))
            rows.append(Row("check", f"pallas {kernel_label(kernel)} {label}", fields_k, measure, cost))

    n_agents, batch = sizes["mam_check"]
    for method in ("mam", "mam-pallas"):
        fields = dict(method=method, n_agents=n_agents, minibatch=batch)
        measure = functools.partial(check_mam, method=method, n_agents=n_agents, batch=batch)
        rows.append(
            Row("mam_check", f"{method} N={n_agents}", fields, measure, network_cost(method, "train"))
        )

    def network_rows(table, n_agents, batch):
        act = table == "act"
        for method in [*MAM_MODES, "mat-cache"]:
            fields = dict(method=method, n_agents=n_agents, **{"envs" if act else "minibatch": batch})
            measure = functools.partial(time_network, method=method, n_agents=n_agents, batch=batch, act=act)
            cost = network_cost(method, table) + Counter(timed=1)
            rows.append(Row(table, f"{table} {method} N={n_agents}", fields, measure, cost))

    network_rows("train", sizes["train"][0], sizes["minibatch"])
    network_rows("act", *sizes["act"])
    m, l, d, n = sizes["scan"]
    for mode, kernel in [("sequential", None), ("parallel", None)] + [
        ("pallas", k) for k in sizes["kernels"]
    ]:
        label = kernel_label(kernel) if kernel else ""
        cost = Counter(jit_scan=2, timed=2) + (pallas(2, 1) if kernel else Counter())
        measure = functools.partial(time_scan, mode=mode, kernel=kernel, size=(m, l, d, n))
        fields = dict(mode=mode, kernel=label, M=m, L=l, d=d, n=n)
        rows.append(Row("scan", f"scan {mode} {label} M={m} L={l}", fields, measure, cost))
    network_rows("train", sizes["train"][1], sizes["minibatch"])
    return rows


def estimate(rows):
    """The run's seconds by compile count: {counts, seconds, total_s, total_min}."""
    counts = sum((row.cost for row in rows), Counter(start=1, row=len(rows)))
    seconds = {k: counts[k] * COSTS[k][0] for k in COSTS if counts[k]}
    total = sum(seconds.values())
    return dict(counts={k: counts[k] for k in seconds}, seconds=seconds, total_s=total, total_min=total / 60)


def print_estimate(est):
    print(f"estimate of the GPU run by compile count ({BUDGET_MIN:g}-minute budget):")
    for key, count in est["counts"].items():
        cost, source = COSTS[key]
        print(f"  {count:3d} x {cost:4.1f} s = {est['seconds'][key]:5.1f} s  {key:<10}  {source}")
    print(f"  total {est['total_s']:.0f} s = {est['total_min']:.2f} min", flush=True)


# ----------------------------------------------------------------------------------------------------------
# The rows' measures
# ----------------------------------------------------------------------------------------------------------
def scan_fn(mode, kernel, reverse=False):
    """selective_scan with h0 as a 7th argument, returning (y, h_last); kernel: (block_d, chunk, num_warps)."""
    settings = dict(zip(KERNEL_FIELDS, kernel)) if mode == "pallas" else {}
    return lambda *a: selective_scan.selective_scan(
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
    return "block_d={} chunk={} warps={}".format(*kernel) if kernel else ""


def relative_error(got, want):
    return float(jnp.abs(got - want).max() / jnp.maximum(jnp.abs(want).max(), 1e-30))


def check_status(errors):
    """Errors as %.3e strings, the worst, and ok or MISMATCH."""
    worst = max(errors.values())
    status = "ok" if worst < TOL else f"MISMATCH (worst >= {TOL:g})"
    return dict({k: f"{v:.3e}" for k, v in errors.items()}, worst=f"{worst:.3e}", status=status)


def check_reference(run, case):
    inputs = run.scan_inputs(*case[:4])
    with jax.default_matmul_precision("float32"):  # the sequential mode's einsums, not TF32
        compiled, compile_s = run.compile(
            loss_and_grads(scan_fn("sequential", None, case[4])), *inputs, kind="scan"
        )
    run.store[("check", case)] = jax.tree.leaves(compiled(*inputs))  # y, h_last, then the 7 gradients
    return dict(compile_s=compile_s)


def check_kernel(run, case, kernel):
    want = run.store.get(("check", case))
    if want is None:
        raise RuntimeError("no reference: the sequential row failed or was skipped")
    inputs, forward = run.scan_inputs(*case[:4]), scan_fn("pallas", kernel, case[4])
    train = loss_and_grads(forward)
    with jax.default_matmul_precision("float32"):
        compiled, compile_s = run.compile(lambda *a: (forward(*a), train(*a)), *inputs, kind="scan")
    (y, h), got = compiled(*inputs)
    errors = {"err_y_fwd_only": relative_error(y, want[0]), "err_h_last_fwd_only": relative_error(h, want[1])}
    errors |= {f"err_{name}": relative_error(g, w) for name, g, w in zip(NAMES, jax.tree.leaves(got), want)}
    return dict(check_status(errors), compile_s=compile_s)


def check_mam(run, method, n_agents, batch):
    module, network, params = run.network(method)
    obs, mask, actions, _ = run.batch(n_agents, batch)
    loss_fn = jax.value_and_grad(run.scaling.train_loss_fn(module, network))
    with jax.default_matmul_precision("float32"):
        compiled, compile_s = run.compile(loss_fn, params, obs, mask, actions, kind="train")
    loss, grads = compiled(params, obs, mask, actions)
    if MAM_MODES[method] == "sequential":
        run.store["mam_check"] = (loss, grads)
        return dict(loss=float(loss), compile_s=compile_s)
    if "mam_check" not in run.store:
        raise RuntimeError("no reference: the sequential row failed or was skipped")
    loss_want, grads_want = run.store["mam_check"]
    by_param = {
        jax.tree_util.keystr(path): relative_error(g, w)
        for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(grads_want)[0], jax.tree.leaves(grads))
    }
    worst_param = max(by_param, key=by_param.get)
    errors = dict(err_loss=relative_error(loss, loss_want), err_grad_max=by_param[worst_param])
    return dict(check_status(errors), loss=float(loss), worst_param=worst_param, compile_s=compile_s)


def time_network(run, method, n_agents, batch, act):
    module, network, params = run.network(method)
    obs, mask, actions, key = run.batch(n_agents, batch)
    if act:
        act_fn = lambda p, obs, mask, key: module.act(network, p, obs, mask, key)
        ms, compile_s = run.timed(act_fn, params, obs, mask, key, kind="act")
        return dict(act_ms=ms, compile_s=compile_s)
    grad_fn = jax.value_and_grad(run.scaling.train_loss_fn(module, network))
    ms, compile_s = run.timed(grad_fn, params, obs, mask, actions, kind="train")
    return dict(train_ms=ms, compile_s=compile_s)


def time_scan(run, mode, kernel, size):
    inputs = run.scan_inputs(*size)
    fwd_ms, fwd_compile = run.timed(scan_fn(mode, kernel), *inputs, kind="scan")
    both_ms, both_compile = run.timed(loss_and_grads(scan_fn(mode, kernel)), *inputs, kind="scan")
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, compile_s=fwd_compile + both_compile)


# ----------------------------------------------------------------------------------------------------------
# Running the rows
# ----------------------------------------------------------------------------------------------------------
class Run:
    """The options, the deadline, the compile counter, the CSV writers and what rows share."""

    def __init__(self, opts, scaling, start):
        self.opts, self.scaling, self.start = opts, scaling, start
        self.deadline = start + 60 * opts.max_minutes
        self.machine = scaling.machine_label()
        self.tables = {}  # table -> its rows so far
        self.store = {}  # the references, inputs, networks and params that rows share
        self.counted = Counter()  # the current row's compiles and timed measures

    def compile(self, fn, *args, kind):
        """-> jit(fn) compiled for args, compile seconds. Counted; the dry run also counts its kernels."""
        if self.opts.dry_run:
            for name in pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr):
                self.counted["triton_bwd" if "bwd" in name else "triton_fwd"] += 1
        self.counted[f"jit_{kind}"] += 1
        return self.scaling.compile_timed(fn, *args)

    def timed(self, fn, *args, kind):
        """-> (median ms, compile s) of jit(fn)(*args)."""
        compiled, compile_s = self.compile(fn, *args, kind=kind)
        budget = 0.0 if self.opts.dry_run else TIMED_BUDGET_S
        median, _ = self.scaling.time_calls(compiled, args, self.opts.repeats, budget_s=budget)
        self.counted["timed"] += 1
        return 1e3 * median, compile_s

    def scan_inputs(self, m, l, d, n):
        """Random inputs as MAM makes them: delta in Mamba's init range, A = -(1..n) per channel, D = 1."""
        if ("inputs", m, l, d, n) not in self.store:
            kx, kd, kb, kc, kh = jax.random.split(jax.random.PRNGKey(l), 5)
            x = jax.random.normal(kx, (m, l, d))
            delta = jnp.exp(jax.random.uniform(kd, (m, l, d), minval=np.log(1e-3), maxval=np.log(1e-1)))
            A = -jnp.broadcast_to(jnp.arange(1.0, n + 1), (d, n))
            B, C = jax.random.normal(kb, (m, l, n)), jax.random.normal(kc, (m, l, n))
            h0 = 0.1 * jax.random.normal(kh, (m, d, n))
            self.store["inputs", m, l, d, n] = [x, delta, A, B, C, jnp.ones(d), h0]
        return self.store["inputs", m, l, d, n]

    def batch(self, n_agents, batch):
        """-> random obs (batch, N, OBS_DIM), all actions legal, random actions, a key."""
        k_obs, k_act, key = jax.random.split(jax.random.PRNGKey(n_agents), 3)
        obs = jax.random.normal(k_obs, (batch, n_agents, OBS_DIM))
        mask = jnp.ones((batch, n_agents, NUM_ACTIONS), bool)
        return obs, mask, jax.random.randint(k_act, (batch, n_agents), 0, NUM_ACTIONS), key

    def network(self, method):
        """-> (module, network, params) of scaling.py's method. The params are initialised once per script, with
        MAM's sequential mode (the scan modes have no parameters) and jitted; they do not depend on N."""
        module, overrides = self.scaling.METHODS[method]
        args = replace(module.Args(), **overrides)
        spec = self.scaling.EnvSpec(2, OBS_DIM, NUM_ACTIONS)
        if (
            overrides.get("scan_mode") == "pallas" and jax.default_backend() == "cpu"
        ):  # build_network refuses it
            config = module.MambaConfig(**{f: getattr(args, f) for f in module.MambaConfig._fields})
            network = module.MultiAgentMamba(NUM_ACTIONS, config)
        else:
            network = module.build_network(args, spec)
        family = "mam" if method.startswith("mam") else method
        if ("params", family) not in self.store and family != method:
            self.network(family)  # initialises the family's params
        elif ("params", family) not in self.store:
            init = lambda key: module.init_params(network, key, spec)
            compiled, _ = self.compile(init, jax.random.PRNGKey(0), kind="init")
            self.store["params", family] = compiled(jax.random.PRNGKey(0))
        return module, network, self.store["params", family]

    def row(self, index, total, row):
        """Run one row (or skip it past the deadline), write its table's CSV, print the result."""
        print(f"[{index}/{total}] {row.table}: {row.name} ...", flush=True)
        fields = dict(row.fields, jit_compiles=sum(v for k, v in row.cost.items() if k.startswith("jit")))
        fields |= dict(triton_fwd=row.cost["triton_fwd"], triton_bwd=row.cost["triton_bwd"])
        start = time.perf_counter()
        if start > self.deadline:
            fields["status"] = f"skipped (past --max-minutes {self.opts.max_minutes:g})"
        else:
            self.counted = Counter()
            try:
                fields |= row.measure(self)
                fields.setdefault("status", "ok")
                planned = {k: v for k, v in row.cost.items() if v}
                counted = {k: v for k, v in self.counted.items() if v}
                if self.opts.dry_run and counted != planned:
                    fields["status"] = f"error: planned {planned} but made {counted}"
            except Exception as error:  # e.g. out of memory, a Triton failure: record it and go on
                fields["status"] = f"error: {self.scaling.one_line(error)}"
            fields["row_s"] = time.perf_counter() - start
        fields["machine"] = self.machine
        rows = self.tables.setdefault(row.table, [])
        rows.append(fields)
        columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "machine"] + ["machine"]
        self.scaling.write_csv(self.opts.out_dir / f"{row.table}.csv", rows, columns)
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print("   ", *(cell for cell in shown if not cell.startswith(("machine=", "err_"))), flush=True)
        jax.clear_caches()
        gc.collect()


def pallas_calls(jaxpr):
    """The names of the pallas_calls in a jaxpr, its sub-jaxprs included."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(str(eqn.params.get("name_and_src_info", eqn.params.get("name"))))
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    names += pallas_calls(sub)
    return names


# ----------------------------------------------------------------------------------------------------------
# The environment, the command line, the report
# ----------------------------------------------------------------------------------------------------------
def environment(opts, machine, est):
    """What env.json records: versions, device, driver, compute capability, commit, sources, the estimate."""
    versions = {"python": platform.python_version()}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ("jax", "jaxlib", "flax", "optax", "numpy") or name.startswith(("jax-cuda", "jax-rocm")):
            versions[name] = dist.version  # the CUDA plugin: jax-cuda12-plugin, jax-cuda13-pjrt, ...
    device = jax.devices()[0]

    def shell(*command):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
            return result.stdout.strip() if result.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = opts.commit or shell("git", "rev-parse", "HEAD")
    changed = shell("git", "status", "--porcelain", "--", *SOURCES) if commit and not opts.commit else None
    return dict(
        versions=versions,
        device=dict(
            platform=device.platform,
            kind=device.device_kind,
            count=jax.device_count(),
            compute_capability=getattr(device, "compute_capability", None),
            driver=shell("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        ),
        machine=machine,
        git=dict(commit=commit, sources_changed=None if changed is None else changed.splitlines()),
        sources_sha256={p: hashlib.sha256((REPO / p).read_bytes()).hexdigest()[:16] for p in SOURCES},
        options=dict(vars(opts), out_dir=str(opts.out_dir)),
        sizes=DRY if opts.dry_run else FULL,
        estimate_of_the_gpu_run=est,
        estimate_costs={k: dict(seconds=v[0], source=v[1]) for k, v in COSTS.items()},
    )


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder for the CSVs and env.json (created)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, kernel interpreted")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls after one warm-up (the median)")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help=f"start no row after this ({BUDGET_MIN:g}; none dry)"
    )
    parser.add_argument("--commit", default=None, help="the git commit for env.json (default: git rev-parse)")
    opts = parser.parse_args()
    if opts.max_minutes is None:
        opts.max_minutes = math.inf if opts.dry_run else BUDGET_MIN
    return opts


def report(run):
    """Markdown tables of the CSVs, for the log (errors: the worst only)."""
    for table, rows in run.tables.items():
        columns = [
            c
            for c in dict.fromkeys(k for r in rows for k in r)
            if c != "machine" and not c.startswith("err_")
        ]
        print(f"\n{table}.csv ({run.machine}):\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for r in rows:
            cells = [r.get(c, "") for c in columns]
            print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")


def main():
    start = time.perf_counter()
    opts = parse_args()
    if opts.dry_run:  # before anything touches a device
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() == "cpu":
        sys.exit(
            "gpu_check.py: no GPU here (the kernel would run interpreted); use --dry-run to try the script"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scaling

    opts.out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(opts, scaling, start)
    est = estimate(plan(FULL))
    print(
        f"machine: {run.machine}; {'dry run (CPU, interpreted)' if opts.dry_run else 'GPU'}; out {opts.out_dir}"
    )
    print_estimate(est)
    (opts.out_dir / "env.json").write_text(
        json.dumps(environment(opts, run.machine, est), indent=2, default=str)
    )
    rows = plan(DRY if opts.dry_run else FULL)
    for index, row in enumerate(rows, 1):
        run.row(index, len(rows), row)
    report(run)
    done = [r for table in run.tables.values() for r in table]
    statuses = Counter(r["status"].split(" ")[0].rstrip(":") for r in done)
    compile_s = sum(r.get("compile_s", 0.0) for r in done)
    elapsed = time.perf_counter() - start
    print(f"\nrows: {dict(statuses)}; compiles took {compile_s:.0f} s; the whole run {elapsed:.0f} s", end="")
    print(f" (estimate for the GPU run: {est['total_s']:.0f} s); CSVs and env.json in {opts.out_dir}")
    return 0 if set(statuses) <= {"ok", "skipped"} else 1


if __name__ == "__main__":
    sys.exit(main())
