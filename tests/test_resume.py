"""Long runs: a run stopped by a signal and resumed ends as the same run never stopped (metrics and the whole
state, bit for bit on CPU); the flags a resume refuses; divergence; a request that cannot fit in memory.
Subprocesses as a user runs them, tiny budgets (compile time dominates)."""

import json
import os
import signal
import subprocess
import sys

import flax.serialization
import numpy as np
import pytest
from conftest import ROOT, read_metrics, run_dirs

TINY = ["--env-id", "lbf-8x8-2p-2f-coop", "--num-envs", "4", "--num-steps", "8", "--update-epochs", "1"]
TINY += ["--eval-episodes", "2"]


def read_state(run_dir):
    with open(run_dir / "checkpoint.msgpack", "rb") as f:
        return flax.serialization.msgpack_restore(f.read())


def command(script, *flags):
    return [sys.executable, str(ROOT / script), *map(str, flags)]


def environment(compile_cache, devices=1):
    xla = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache, XLA_FLAGS=xla)


# mappo: SIGINT, 2 seeds on 2 forced CPU devices, then the resumed run killed hard (SIGKILL) between two
# periodic checkpoints and resumed again; MAM: SIGTERM, 1 seed (MAT runs the same lines outside its network:
# test_diff.py). Enough iterations that the signal, sent when the first iteration is printed, lands well before
# the end.
CASES = [
    ("mappo.py", signal.SIGINT, 2, 100, True),
    ("mam_ppo.py", signal.SIGTERM, 1, 20, False),
]


@pytest.mark.parametrize("script, sig, n, iterations, hard_kill", CASES)
def test_interrupted_and_resumed_is_the_uninterrupted_run(
    script, sig, n, iterations, hard_kill, tmp_path, compile_cache
):
    env = environment(compile_cache, devices=n)
    flags = [*TINY, "--total-timesteps", 32 * iterations, "--num-seeds", n, "--num-devices", n]
    flags += ["--checkpoint-every", 7]
    (tmp_path / "straight").mkdir()
    straight = subprocess.run(
        command(script, *flags), cwd=tmp_path / "straight", env=env, capture_output=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = subprocess.Popen(command(script, *flags), cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 1/"):
            proc.send_signal(sig)
            break
    out = proc.stdout.read()
    proc.wait(timeout=900)
    (run_dir,) = run_dirs(tmp_path)
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert proc.returncode == 128 + sig, stopped
    assert "iter 1/" in line and f"iter {iterations}/" not in out  # stopped early
    assert not (run_dir / "summary.json").exists()  # not complete
    # the checkpoint holds the last logged iteration; the message says how to go on
    last = max(int(row["iteration"]) for row in read_metrics(run_dir))
    assert int(read_state(run_dir)["iteration"]) == last == stopped["checkpoint_iteration"] < iterations
    assert stopped["reason"] == "interrupted"
    resume = f"--resume {os.path.relpath(run_dir, tmp_path)}"
    assert (
        stopped["message"]
        == f"interrupted after iteration {last}; resume with: python {ROOT / script} {resume}"
    )

    # SIGKILL: no handler, no last checkpoint; the rows of iterations 8 and 9 outlive checkpoint 7
    if hard_kill:
        proc = subprocess.Popen(command(script, *resume.split()), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        for line in proc.stdout:
            if line.startswith("iter 9/"):
                proc.kill()
                break
        proc.wait(timeout=900)
        assert proc.returncode == -signal.SIGKILL and "iter 9/" in line
        last = int(read_state(run_dir)["iteration"])
        logged = {line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()}
        assert last == 7 and "8" in logged, (last, logged)  # killed between two checkpoints
    resumed = subprocess.run(
        command(script, *resume.split()), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after iteration {last}" in resumed.stdout
    assert not (run_dir / "stopped.json").exists()
    (straight_dir,) = run_dirs(tmp_path / "straight")
    # the same rows, byte for byte, the same final state bit for bit, the same final evaluation
    assert (run_dir / "metrics.csv").read_text() == (straight_dir / "metrics.csv").read_text()
    timing = (run_dir / "timing.csv").read_text().splitlines()  # SPS and seconds differ: each iteration once
    assert [int(line.split(",")[0]) for line in timing[1:]] == list(range(1, iterations + 1))
    a, b = read_state(run_dir), read_state(straight_dir)
    assert a["iteration"] == b["iteration"] == iterations and a["leaves"].keys() == b["leaves"].keys()
    for k in a["leaves"]:
        assert np.array_equal(a["leaves"][k], b["leaves"][k]), k
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["eval/episodic_return"]
        == json.loads((straight_dir / "summary.json").read_text())["eval/episodic_return"]
    )


def one_error_line(out):
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    return line


def test_resume_refuses_other_flags_and_extends(run_script, tmp_path):
    out = run_script("mappo.py", *TINY, "--total-timesteps", 64)
    assert out.returncode == 0, out.stderr
    (run_dir,) = run_dirs(tmp_path)
    run_dir = os.path.relpath(run_dir, tmp_path)
    line = one_error_line(run_script("mappo.py", "--resume", run_dir, "--seed", 2, "--num-steps", 16))
    assert "would change what the run computes: --seed 2 (run: 1), --num-steps 16 (run: 8)" in line
    assert "has done its 2 iterations" in one_error_line(run_script("mappo.py", "--resume", run_dir))
    assert "cannot read the run's flags" in one_error_line(run_script("mappo.py", "--resume", "nowhere"))

    out = run_script("mappo.py", "--resume", run_dir, "--total-timesteps", 128)  # twice as long
    assert out.returncode == 0, out.stderr
    rows = read_metrics(tmp_path / run_dir)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 2, 3, 4, 4]  # 2 and 4: final evaluations
    # the schedule spans the new total: after 3 of 4 iterations, a quarter of the learning rate is left
    assert float(rows[3]["charts/learning_rate"]) == pytest.approx(5e-4 / 4)
    assert json.loads((tmp_path / run_dir / "args.json").read_text())["total_timesteps"] == 128


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(monkeypatch, tmp_path, capsys):
    """An injected NaN in the params by the third iteration's update, in-process: the run stops at the third."""
    import jax
    import jax.numpy as jnp

    import mappo

    ppo_update = mappo.ppo_update

    def poisoned(args, network, train_state, data, key, mesh=None):
        train_state, info = ppo_update(args, network, train_state, data, key, mesh)
        third = train_state.step > 2 * args.update_epochs * args.num_minibatches
        params = jax.tree.map(lambda p: jnp.where(third, jnp.nan, p), train_state.params)
        return train_state.replace(params=params), info

    monkeypatch.setattr(mappo, "ppo_update", poisoned)
    monkeypatch.chdir(tmp_path)
    args = mappo.Args(env_id="lbf-8x8-2p-2f-coop", num_envs=4, num_steps=8, update_epochs=1, eval_episodes=2,
                      total_timesteps=32 * 5, checkpoint_every=1)  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        mappo.main(args)
    assert stop.value.code == 1
    message = (
        "error: diverged at iteration 3: params of seed 1 is not finite; kept the checkpoint of iteration 2"
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "stopped.json").read_text())["reason"] == "diverged"
    assert not (run_dir / "summary.json").exists()
    assert {r["iteration"] for r in read_metrics(run_dir)} == {"1", "2"}  # nothing logged from NaN params
    state = read_state(run_dir)
    assert int(state["iteration"]) == 2
    assert all(np.isfinite(x).all() for x in state["leaves"].values() if x.dtype.kind == "f")


def test_out_of_memory_is_one_line(run_script, tmp_path):
    """A request far beyond any machine's memory fails after the compile, before any state exists."""
    out = run_script("mappo.py", "--env-id", "lbf-8x8-2p-2f-coop", "--num-agents", 1000, "--num-envs", 256)
    line = one_error_line(out)
    assert (
        line.startswith("error: out of memory: the update step needs ")
        and " GB, host RAM available: " in line
    )
    assert (
        "lower --num-envs (256), --num-steps (128) or --num-agents (1000), or raise --num-minibatches" in line
    )
    assert run_dirs(tmp_path) == []  # nothing written


def test_runtime_out_of_memory_marks_the_run(monkeypatch, tmp_path, capsys):
    """The fallback when XLA runs out of memory anyway: one line, and the run folder says so."""
    import jax

    import mappo

    monkeypatch.chdir(tmp_path)
    args = mappo.Args(env_id="lbf-8x8-2p-2f-coop")
    run = mappo.Run(args, mappo.make_env(args.env_id))
    with pytest.raises(ValueError):  # other errors go through
        run.stop_if_out_of_memory(ValueError("something else"))
    with pytest.raises(SystemExit) as stop:
        run.stop_if_out_of_memory(
            jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 94 GB")
        )
    assert stop.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 94 GB); lower")
    assert json.loads((tmp_path / run.dir / "stopped.json").read_text())["reason"] == "out of memory"
