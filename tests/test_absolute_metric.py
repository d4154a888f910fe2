"""marl-eval's absolute metric (--absolute-metric) and the final evaluation's own episode count
(--final-eval-episodes): each seed keeps the params of its best evaluation (the first on a tie), the choice
survives a stop and a resume, and the final evaluation changes nothing before it."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, read_metrics, read_summary, run_dirs

import mam_ppo
import mappo
import mat_ppo


@pytest.mark.parametrize("module", [mappo, mat_ppo, mam_ppo], ids=lambda m: m.__name__)
def test_keep_best_keeps_each_seeds_best_params(module):
    params = lambda v: {"w": jnp.full((3, 2, 2), v, jnp.float32), "b": jnp.full((3, 4), v, jnp.float32)}
    best = module.keep_best(None, params(1.0), np.array([0.5, 0.2, 0.9]), 10)
    # seed 0 improves, seed 1 ties (keeps its first), seed 2 worsens
    best = module.keep_best(best, params(2.0), np.array([0.6, 0.2, 0.1]), 20)
    assert best["returns"].tolist() == pytest.approx([0.6, 0.2, 0.9])
    assert best["iterations"].tolist() == [20, 10, 10]
    leaves = jax.tree.leaves(params(0.0))  # the order of the stored leaves is jax's
    for i, leaf in enumerate(leaves):
        kept = best["leaves"][str(i)]
        assert kept.shape == leaf.shape
        assert [float(kept[k].flat[0]) for k in range(3)] == [2.0, 1.0, 1.0]
        assert all(np.all(kept[k] == kept[k].flat[0]) for k in range(3))  # whole seed slices, not mixed


# full observability: a random policy already eats some food, so the evaluations differ from one another
FLAGS = ["--env-id", "lbf-10x10-3p-3f", "--num-envs", "4", "--num-steps", "8", "--update-epochs", "1",
         "--total-timesteps", 32 * 12, "--num-seeds", 2, "--eval-every", 1, "--eval-episodes", 2,
         "--checkpoint-every", 5]  # fmt: skip


def command(*flags):
    return [sys.executable, str(ROOT / "mappo.py"), *map(str, flags)]


def test_absolute_metric_picks_the_best_evaluation_and_survives_a_resume(tmp_path, compile_cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache)
    flags = [*FLAGS, "--final-eval-episodes", 3, "--absolute-metric"]
    for name in ("straight", "plain"):
        (tmp_path / name).mkdir()
    straight = subprocess.run(
        command(*flags), cwd=tmp_path / "straight", env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "straight")
    summary, rows = read_summary(run_dir), read_metrics(run_dir)
    assert "absolute metric: episodic_return=" in straight.stdout
    # the best of the periodic and the final evaluations, the first on a tie
    for k, seed in enumerate((1, 2)):
        evals = [(float(r["eval/episodic_return"]), int(r["iteration"])) for r in rows
                 if int(r["seed"]) == seed and r["eval/episodic_return"] != ""]  # fmt: skip
        assert len(evals) == 12  # 11 periodic, 1 final
        best = max(v for v, _ in evals)
        assert summary["absolute/iteration"][k] == next(i for v, i in evals if v == best)
        assert 0.0 <= summary["absolute/episodic_return"][k] <= 1.0
    assert summary["eval/episodic_return"] == [float(r["eval/episodic_return"]) for r in rows[-2:]]

    # the same run without the two flags: the same training and periodic evaluations; another final one
    plain = subprocess.run(command(*FLAGS), cwd=tmp_path / "plain", env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-3000:]
    (plain_dir,) = run_dirs(tmp_path / "plain")
    assert read_metrics(plain_dir)[:-2] == rows[:-2]
    plain_summary = read_summary(plain_dir)
    assert "absolute/episodic_return" not in plain_summary
    assert plain_summary["eval/episodic_return"] != summary["eval/episodic_return"]  # 2 episodes, not 3

    # stopped after its first checkpoint, then resumed: the same absolute metric as the straight run
    proc = subprocess.Popen(command(*flags), cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 4/"):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    assert proc.wait(timeout=900) == 128 + signal.SIGINT
    (stopped_dir,) = run_dirs(tmp_path)
    resume = ["--resume", os.path.relpath(stopped_dir, tmp_path)]
    resumed = subprocess.run(command(*resume), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = read_summary(stopped_dir)
    for key in ("eval/episodic_return", "absolute/episodic_return", "absolute/iteration", "absolute/success"):
        assert again[key] == summary[key], key
    assert json.loads((stopped_dir / "args.json").read_text())["absolute_metric"] is True
