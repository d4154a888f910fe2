"""Time the two modes of `selective_scan` (parallel associative scan vs sequential lax.scan).

A third column, "autodiff", is the sequential recurrence as a plain lax.scan that jax differentiates itself:
what the sequential mode was before it got its hand-written backward pass (selective_scan.py says why).
For each sequence length l, every mode and two passes: "fwd" (y only) and "fwd+bwd" (gradient of sum(y)
with respect to x, delta, A, B, C and D). Each function is jitted; compile time is measured separately, then
one warm-up call, then the median of --repeats timed calls (each waits with block_until_ready).
Sizes other than l are fixed at b=64, d=128, n=16. Prints a markdown table and writes a CSV.

    python benchmarks/scan.py                       # all lengths, CSV to benchmarks/results/scan_cpu.csv
    python benchmarks/scan.py --lengths 4 64 --repeats 3 --out /tmp/scan.csv

Timings on a shared machine drift; compare modes within one run rather than across runs.
"""

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the repo's module
from selective_scan import selective_scan

BATCH, D_INNER, D_STATE = 64, 128, 16
MODES = ("parallel", "sequential", "autodiff")
PASSES = ("fwd", "fwd+bwd")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[4, 16, 64, 256, 1024], help="sequence lengths l"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per case (the median is reported)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "scan_cpu.csv", help="CSV path"
    )
    args = parser.parse_args()
    if args.repeats < 1 or min(args.lengths) < 1:
        parser.error("--repeats and every --lengths value must be at least 1")
    return args


def make_inputs(key, length):
    """Float32 inputs as a Mamba layer would produce them: positive delta, negative A."""
    kx, kd, ka, kb, kc = jax.random.split(key, 5)
    x = jax.random.normal(kx, (BATCH, length, D_INNER))
    delta = jax.nn.softplus(jax.random.normal(kd, (BATCH, length, D_INNER)) - 2.0)
    A = -jnp.exp(jax.random.normal(ka, (D_INNER, D_STATE)))
    B = jax.random.normal(kb, (BATCH, length, D_STATE))
    C = jax.random.normal(kc, (BATCH, length, D_STATE))
    D = jnp.ones((D_INNER,))
    return x, delta, A, B, C, D


def autodiff_scan(x, delta, A, B, C, D):
    """The recurrence as a plain lax.scan over l in the kernel's (b, d, n) layout, left to jax's autodiff."""

    def step(h, token):
        x_t, delta_t, B_t, C_t = token  # (b, d), (b, d), (b, n), (b, n)
        h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * x_t)[..., None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t) + D * x_t

    h0 = jnp.zeros((x.shape[0], *A.shape))
    _, y = jax.lax.scan(step, h0, tuple(jnp.swapaxes(v, 0, 1) for v in (x, delta, B, C)))
    return jnp.swapaxes(y, 0, 1)  # (b, l, d)


def build(mode, which):
    """The function to time: y for "fwd", the gradients of sum(y) w.r.t. all six inputs for "fwd+bwd"."""

    def forward(*inputs):
        return autodiff_scan(*inputs) if mode == "autodiff" else selective_scan(*inputs, mode=mode)

    if which == "fwd":
        return forward
    return jax.grad(lambda *inputs: forward(*inputs).sum(), argnums=tuple(range(6)))


def time_case(fn, inputs, repeats):
    """Returns (median seconds per call, compile seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*inputs))  # warm-up: first-call allocations, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s


def main():
    args = parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores visible; "
        f"b={BATCH}, d={D_INNER}, n={D_STATE}, float32, median of {args.repeats}"
    )
    rows = []
    for length in args.lengths:
        inputs = make_inputs(jax.random.key(length), length)
        for which in PASSES:
            for mode in MODES:
                median_s, compile_s = time_case(build(mode, which), inputs, args.repeats)
                rows.append(
                    {
                        "l": length,
                        "mode": mode,
                        "pass": which,
                        "median_ms": round(median_s * 1e3, 3),
                        "compile_s": round(compile_s, 3),
                    }
                )
                print(
                    f"  l={length:5d} {which:8s} {mode:10s} {median_s * 1e3:10.2f} ms  compile {compile_s:.2f} s"
                )
                sys.stdout.flush()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["l", "mode", "pass", "median_ms", "compile_s"])
        writer.writeheader()
        writer.writerows(rows)

    # One line per (l, pass): the modes side by side, as multiples of the sequential mode's time.
    print("\n| l | pass | parallel ms | sequential ms | autodiff ms | parallel / seq | autodiff / seq |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        for which in PASSES:
            ms = {r["mode"]: r["median_ms"] for r in rows if (r["l"], r["pass"]) == (length, which)}
            print(
                f"| {length} | {which} | {ms['parallel']:.2f} | {ms['sequential']:.2f} | {ms['autodiff']:.2f} "
                f"| {ms['parallel'] / ms['sequential']:.2f} | {ms['autodiff'] / ms['sequential']:.2f} |"
            )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
