"""What --capture-video costs: the recording evaluation against the plain one, and the host-side drawing.

Per env: one script's evaluation (args.eval_episodes envs, untrained params) is compiled with and without the
recording and timed alternately; then the recorded episode of env 0 is drawn into a GIF with the env's own
renderer (what evaluate_and_record does). Prints and saves a CSV.

    python benchmarks/video.py
    python benchmarks/video.py --script mam_ppo --env-ids rware-tiny-2ag --repeats 5
"""

import argparse
import csv
import importlib
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--script", default="mam_ppo")
    parser.add_argument(
        "--env-ids", nargs="+", default=["con-5x5x3a", "lbf-8x8-2p-2f-coop", "rware-tiny-2ag"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/video_cpu.csv")
    cli = parser.parse_args()
    module = importlib.import_module(cli.script)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}"
    )
    rows = []
    for env_id in cli.env_ids:
        env = module.make_env(env_id)
        args = replace(module.Args(), env_id=env_id)
        network = module.build_network(args, env)
        params = jax.tree.map(lambda x: x[None], module.init_params(network, jax.random.PRNGKey(0), env))
        keys = jax.random.split(jax.random.PRNGKey(1), 1)
        evals = {}
        for capture in (False, True):
            f = module.jit_evaluate(replace(args, capture_video=capture), env, network, args.eval_episodes)
            evals[capture] = f.lower(params, keys).compile()
        times = {False: [], True: []}
        for _ in range(cli.repeats):  # alternately: drift hits both alike
            for capture, f in evals.items():
                t0 = time.perf_counter()
                out = jax.device_get(f(params, keys))
                times[capture].append(time.perf_counter() - t0)
        _, (states, length) = out
        states = jax.tree.map(lambda x: np.asarray(x[0]), states)
        frames = [jax.tree.map(lambda x: x[t], states) for t in range(int(length[0][0]) + 1)]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "episode.gif")
            t0 = time.perf_counter()
            env.animate(frames, path)
            draw = time.perf_counter() - t0
            size = os.path.getsize(path)
        row = dict(
            env_id=env_id,
            script=cli.script,
            eval_episodes=args.eval_episodes,
            eval_s=statistics.median(times[False]),
            eval_recording_s=statistics.median(times[True]),
            frames=len(frames),
            draw_s=draw,
            draw_ms_per_frame=1000 * draw / len(frames),
            gif_kb=size / 1000,
            machine=machine,
        )
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(cli.out), exist_ok=True)
    with open(cli.out, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
