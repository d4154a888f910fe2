"""Data parallelism over a 1-D device mesh, on 2 forced CPU devices (XLA_FLAGS must be set before jax is
imported, so each check runs in a subprocess): params identical on every device after training, the same
first-iteration losses on 1 and 2 devices, the CLI flag, and the divisibility error."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["mappo", "mat_ppo", "mam_ppo"]
TWO_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")

CHECK = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, {repo!r})
module = __import__({script!r})
assert jax.device_count() == 2


def train(num_devices, iterations=2):
    args = module.Args(env_id="lbf-8x8-2p-2f-coop", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2,
                       num_seeds=2, num_devices=num_devices)
    env = module.make_env(args.env_id)
    network = module.build_network(args, env)
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.learning_rate, eps=1e-5))
    keys = jax.vmap(jax.random.PRNGKey)(args.seed + jnp.arange(args.num_seeds))
    # the same lines as the script's main
    mesh = module.make_mesh(args)
    shardings = module.runner_shardings(mesh)
    runners = jax.device_put(module.init_runners(args, env, network, tx, keys), shardings)
    update_step = module.over_seeds(module.make_update_step(args, env, network, module.split_over(mesh)))
    update = jax.jit(update_step, out_shardings=(shardings, NamedSharding(mesh, P())))
    history = []
    for _ in range(iterations):
        runners, metrics = update(runners)
        history.append({{k: np.asarray(v).tolist() for k, v in metrics.items()}})
    return runners, history


runners, two = train(2)
assert runners.obs.addressable_shards[0].data.shape[1] == 2, "the envs are not split over the devices"
for leaf in jax.tree.leaves(runners.train_state):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 2 and all(np.array_equal(shards[0], s) for s in shards), "devices disagree"
_, one = train(1)
print(json.dumps(dict(one=one, two=two)))
"""


def run(args, env=TWO_DEVICES, cwd=REPO):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_devices_match_one(script):
    out = run([sys.executable, "-c", CHECK.format(repo=str(REPO), script=script)])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    first_one, first_two = result["one"][0], result["two"][0]
    for name in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl"):
        for a, b in zip(first_one[name], first_two[name]):  # per seed
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (name, first_one[name], first_two[name])
    # the rollout itself is the same sample of actions: same episodes, same returns
    assert first_one["charts/episodes"] == first_two["charts/episodes"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_num_devices(script, tmp_path):
    base = [sys.executable, str(REPO / f"{script}.py"), "--env-id", "lbf-8x8-2p-2f-coop", "--num-envs", "4"]
    base += ["--num-steps", "8", "--total-timesteps", "64", "--eval-episodes", "2"]
    out = run(base + ["--num-devices", "2", "--num-seeds", "2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 device(s)" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "summary.json").exists()

    bad = run(base[:4] + ["--num-envs", "3", "--num-devices", "2"], cwd=tmp_path)
    assert bad.returncode == 2 and "not divisible by the 2 devices" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run(base + ["--num-devices", "3"], cwd=tmp_path)
    assert bad.returncode == 2 and "--num-devices must be within [0, 2]" in bad.stderr


def test_two_processes(tmp_path):
    """Multi-host, played by two local processes of one CPU device each (JAX's coordinator + gloo): they train
    as one 2-device run, so each logs what a single process with 2 devices logs."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "mappo.py"), "--env-id", "lbf-8x8-2p-2f-coop", "--num-envs", "4"]
    cmd += ["--num-steps", "8", "--total-timesteps", "64", "--eval-episodes", "2"]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2"
    )
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("on 2 device(s)" in out for out in outs)
    (tmp_path / "single").mkdir()
    single = run(cmd, cwd=tmp_path / "single")  # one process, 2 forced devices
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(pattern, root=tmp_path):
        (path,) = root.glob(f"runs/{pattern}/metrics.csv")
        rows = list(csv.DictReader(open(path)))
        return [
            float(r[k])
            for r in rows
            if r["losses/value_loss"]
            for k in ("losses/value_loss", "losses/entropy")
        ]

    p0, p1 = losses("*__p0"), losses("*__p1")
    assert p0 == p1
    assert p0 == pytest.approx(losses("*", tmp_path / "single"), rel=1e-4, abs=1e-6)
