"""Training steps per second of each script next to the env-only ceiling, measured in the same run.

The scripts' update steps are timed round-robin, one iteration each per round (the median iteration counts), so
that drift on a shared machine hits them alike. The ceiling steps the same wrapped envs (same num_envs, same
pool auto-reset as training) with random legal actions and nothing else; training can only approach it. Both exclude compilation and run jitted, with one host
sync per iteration like the scripts' own loop. A run replaces its own rows of the CSV (env id, script, devices)
and keeps the others.

    python benchmarks/throughput.py                       # all scripts, the three tasks, 16 envs
    python benchmarks/throughput.py --scripts mappo --env-ids rware-tiny-4ag --iterations 20
    # the env-only ceiling alone (script "env only"), for envs too slow to train here: SMAX on a CPU
    python benchmarks/throughput.py --env-only --env-ids smax-2s3z rware-tiny-4ag --iterations 3
    # data parallelism: the same runs on 1 and on 2 devices (here 2 CPU devices forced onto the one CPU)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/throughput.py --num-devices 1 2 \
        --out benchmarks/results/devices_cpu.csv
"""

import argparse
import csv
import importlib
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env_only_sps(env, num_envs, num_steps, iterations):
    """Random legal actions through the script's own wrapper and pool auto-reset. -> steps/s, compile seconds."""

    def rollout(carry, key):
        def step(carry, key):
            state, mask, pool, resets, checksum = carry
            actions = jax.random.categorical(key, jnp.where(mask, 0.0, -1e9)).astype(jnp.int32)
            state, obs, mask, _, term, trunc, _ = jax.vmap(env.step)(state, actions)
            checksum = checksum + obs.sum()  # the observations are used: XLA may not skip computing them
            done = term | trunc
            pick = (jnp.arange(num_envs) + resets) % num_envs
            fresh = jax.tree.map(lambda x: x[pick], pool)
            state, mask = jax.tree.map(
                lambda new, old: jnp.where(done.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
                (fresh[0], fresh[2]),
                (state, mask),
            )
            return (state, mask, pool, resets + done, checksum), None

        state, mask = carry
        pool_key, key = jax.random.split(key)
        pool = jax.vmap(env.reset)(jax.random.split(pool_key, num_envs))
        zeros = jnp.zeros(num_envs, jnp.int32)
        init = (state, mask, pool, zeros, jnp.float32(0))
        (state, mask, _, _, checksum), _ = jax.lax.scan(step, init, jax.random.split(key, num_steps))
        return (state, mask), checksum

    state, _, mask = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), num_envs))
    t0 = time.perf_counter()
    run = jax.jit(rollout).lower((state, mask), jax.random.PRNGKey(1)).compile()
    compile_s = time.perf_counter() - t0
    carry, out = run((state, mask), jax.random.PRNGKey(1))
    jax.block_until_ready(out)
    start = time.perf_counter()
    for i in range(iterations):
        carry, out = run(carry, jax.random.PRNGKey(i + 2))
        out.item()  # one host sync per iteration, like the training loop
    return iterations * num_envs * num_steps / (time.perf_counter() - start), compile_s


def build_update(module, args):
    """The script's own jitted update step (rollout + GAE + PPO epochs) on its device mesh, as in main(), after
    one warm-up call. -> env, [compiled update step, runner state], compile seconds."""
    env = module.make_env(args.env_id, args.num_agents)
    network = module.build_network(args, env)
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.learning_rate, eps=1e-5))
    keys = jax.vmap(jax.random.PRNGKey)(args.seed + jnp.arange(1))
    mesh = module.make_mesh(args)
    shardings = module.runner_shardings(mesh)
    runners = jax.device_put(module.init_runners(args, env, network, tx, keys), shardings)
    update_step = module.over_seeds(module.make_update_step(args, env, network, module.split_over(mesh)))
    t0 = time.perf_counter()
    update = (
        jax.jit(update_step, out_shardings=(shardings, NamedSharding(mesh, P()))).lower(runners).compile()
    )
    compile_s = time.perf_counter() - t0
    runners, metrics = update(runners)  # warm-up
    jax.device_get(metrics)
    return env, [update, runners], compile_s


def alternate_sps(runs, steps_per_iteration, iterations):
    """Time the update steps round-robin, one iteration of each per round, so that the machine's drift (up to
    1.7x here) hits every script alike: their ratios are then comparable. -> name -> SPS of the median
    iteration (one host sync per iteration, like the training loop)."""
    seconds = {name: [] for name in runs}
    for _ in range(iterations):
        for name, run in runs.items():
            start = time.perf_counter()
            run[1], metrics = run[0](run[1])
            jax.device_get(metrics)
            seconds[name].append(time.perf_counter() - start)
    return {name: steps_per_iteration / statistics.median(s) for name, s in seconds.items()}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scripts", nargs="+", default=["mappo", "mat_ppo", "mam_ppo"])
    parser.add_argument(
        "--env-ids", nargs="+", default=["rware-tiny-4ag", "lbf-8x8-2p-2f-coop", "con-5x5x3a"]
    )
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--num-devices", type=int, nargs="+", default=[1], help="device counts to train on")
    parser.add_argument(
        "--iterations", type=int, default=10, help="timed iterations per script after one warm-up"
    )
    parser.add_argument(
        "--env-only",
        action="store_true",
        help="only the env-only ceiling (no training): rows of script 'env only'",
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "throughput_cpu.csv")
    )
    opts = parser.parse_args()

    # the allocator changes CPU timings: tcmalloc when preloaded (the README's opt-in), else glibc's
    malloc = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    )
    machine += f", {malloc}"
    print(f"machine: {machine}; jax {jax.__version__}; {opts.num_envs} envs; {opts.iterations} iterations")
    if max(opts.num_devices) > jax.local_device_count() or opts.num_envs % max(opts.num_devices):
        sys.exit(
            f"error: --num-devices {opts.num_devices}: {jax.local_device_count()} devices here, {opts.num_envs} envs"
        )
    rows = []
    for env_id in opts.env_ids:
        if opts.env_only:  # the wrapper is the same in every script: mappo's
            module = importlib.import_module("mappo")
            num_steps = module.Args().num_steps
            ceiling, env_compile_s = env_only_sps(
                module.make_env(env_id), opts.num_envs, num_steps, opts.iterations
            )
            row = dict(env_id=env_id, script="env only", num_devices=1, num_envs=opts.num_envs,
                       num_steps=num_steps, train_sps="", env_only_sps=round(ceiling), ratio="",
                       compile_s=round(env_compile_s, 1), machine=machine)  # fmt: skip
            print(row, flush=True)
            rows.append(row)
            continue
        runs, compile_s = {}, {}
        for name in opts.scripts:
            module = importlib.import_module(name)
            for num_devices in opts.num_devices:
                args = replace(module.Args(), env_id=env_id, num_envs=opts.num_envs, num_devices=num_devices)
                env, runs[name, num_devices], compile_s[name, num_devices] = build_update(module, args)
        # the same wrapper in every script: one env-only ceiling per env
        ceiling, _ = env_only_sps(env, opts.num_envs, args.num_steps, opts.iterations)
        for (name, num_devices), sps in alternate_sps(
            runs, opts.num_envs * args.num_steps, opts.iterations
        ).items():
            row = dict(env_id=env_id, script=name, num_devices=num_devices, num_envs=opts.num_envs,
                       num_steps=args.num_steps, train_sps=round(sps), env_only_sps=round(ceiling),
                       ratio=round(sps / ceiling, 3), compile_s=round(compile_s[name, num_devices], 1),
                       machine=machine)  # fmt: skip
            print(row, flush=True)
            rows.append(row)
        del runs

    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    ours = {(r["env_id"], r["script"], str(r["num_devices"])) for r in rows}
    kept = []
    if os.path.exists(opts.out):
        with open(opts.out, newline="") as f:
            kept = [r for r in csv.DictReader(f) if (r["env_id"], r["script"], r["num_devices"]) not in ours]
    with open(opts.out, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(kept + rows)
    print("\n| env | script | devices | train SPS | env-only SPS | ratio | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['env_id']} | {r['script']} | {r['num_devices']} | {r['train_sps']} | {r['env_only_sps']} "
            f"| {r['ratio'] and format(r['ratio'], '.3f')} | {r['compile_s']} |"
        )
    print(f"saved {opts.out}")


if __name__ == "__main__":
    main()
