"""Long runs: a run stopped by a signal and resumed ends as the same run never stopped (metrics and the whole
state, bit for bit on CPU); the flags a resume refuses; divergence; a request that cannot fit in memory.
Subprocesses as a user runs them, tiny budgets (compile time dominates)."""

import errno
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

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
    out = run_script("mappo.py", *TINY, "--total-timesteps", 64, "--anneal-lr")
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


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(monkeypatch, tmp_path):
    """An injected NaN in the params by the third iteration's update, in-process: the run stops at the third."""
    import jax
    import jax.numpy as jnp

    import mappo

    ppo_update = mappo.ppo_update

    def poisoned(args, network, train_state, data, key, split=mappo.no_split):
        train_state, info = ppo_update(args, network, train_state, data, key, split)
        third = train_state.step > 2 * args.update_epochs * args.num_minibatches
        params = jax.tree.map(lambda p: jnp.where(third, jnp.nan, p), train_state.params)
        return train_state.replace(params=params), info

    monkeypatch.setattr(mappo, "ppo_update", poisoned)
    monkeypatch.chdir(tmp_path)
    args = mappo.Args(env_id="lbf-8x8-2p-2f-coop", num_envs=4, num_steps=8, update_epochs=1, eval_episodes=2,
                      total_timesteps=32 * 5, checkpoint_every=1)  # fmt: skip
    with pytest.raises(mappo.RunError) as stop:  # the command line prints its line, exits with its code
        mappo.train(args)
    assert stop.value.exit_code == 1
    message = (
        "error: diverged at iteration 3: params of seed 1 is not finite; kept the checkpoint of iteration 2"
    )
    assert stop.value.line == message
    (run_dir,) = run_dirs(tmp_path)
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped == dict(message=message, checkpoint_iteration=2, reason="diverged")
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


def test_runtime_out_of_memory_marks_the_run(monkeypatch, tmp_path):
    """The fallback when XLA runs out of memory anyway: one line, and the run folder says so."""
    import jax

    import mappo

    monkeypatch.chdir(tmp_path)
    args = mappo.Args(env_id="lbf-8x8-2p-2f-coop")
    env = mappo.make_env(args.env_id)
    with pytest.raises(ValueError), mappo.Run(args, env) as run:  # other errors go through
        raise ValueError("something else")
    assert run.metrics.closed and not (tmp_path / run.dir / "stopped.json").exists()
    with pytest.raises(mappo.RunError) as stop, mappo.Run(args, env) as run:
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 94 GB")
    assert stop.value.exit_code == 1
    line = stop.value.line
    assert line.startswith("error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 94 GB); lower")
    assert json.loads((tmp_path / run.dir / "stopped.json").read_text())["reason"] == "out of memory"


class SmallDisk:
    """The disk the files a script opens for writing land on (patched in as the module's `open`): no limit until
    the `full_at`-th checkpoint is written, then only `left` bytes. A write that does not fit raises ENOSPC, as a
    full filesystem does, and writes nothing."""

    def __init__(self, full_at, left):
        self.full_at, self.left, self.free, self.checkpoints = full_at, left, float("inf"), 0

    def open(self, path, mode="r", **kwargs):
        if str(path).endswith("checkpoint.msgpack.tmp"):
            self.checkpoints += 1
            if self.checkpoints == self.full_at:
                self.free = self.left
        f = open(path, mode, **kwargs)
        return f if set(mode) <= set("rbt") else OnSmallDisk(f, self)


class OnSmallDisk:
    def __init__(self, f, disk):
        self.f, self.disk = f, disk

    def write(self, data):
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self.disk.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.f.close()


@pytest.fixture
def compile_cache_in_process(compile_cache):
    """The session's XLA compilation cache for runs in this process too: a run's programs compile once."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", compile_cache)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


# room left once the second checkpoint is due: enough for stopped.json (the temporary file's removal freed it), or
# nothing at all
@pytest.mark.parametrize("left", [2000, 0], ids=["room-for-stopped.json", "nothing-fits"])
def test_full_disk_stops_the_run_and_resume_goes_on(left, monkeypatch, tmp_path, compile_cache_in_process):
    """The disk fills up while the second checkpoint is written: one line that names the disk and the run folder,
    no temporary file, the first checkpoint kept, the run marked as stopped if the disk takes stopped.json; once
    there is room, --resume ends it as the run never stopped (metrics.csv byte for byte)."""
    import mappo

    args = mappo.Args(env_id="lbf-8x8-2p-2f-coop", num_envs=4, num_steps=8, update_epochs=1, eval_episodes=2,
                      total_timesteps=32 * 3, checkpoint_every=1)  # fmt: skip
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    straight = mappo.train(args)
    monkeypatch.chdir(tmp_path)
    disk = SmallDisk(full_at=2, left=left)
    monkeypatch.setattr(mappo, "open", disk.open, raising=False)
    with pytest.raises(mappo.RunError) as stop:
        mappo.train(args)
    (run_dir,) = run_dirs(tmp_path)
    folder = os.path.relpath(run_dir, tmp_path)
    assert stop.value.exit_code == 1 and disk.checkpoints == 2
    line = stop.value.line
    assert line.startswith(f"error: the disk of {folder} is full (/") and " MB free); " in line, line
    resume = f"; kept the checkpoint of iteration 1; free some space, then resume with: python {sys.argv[0]} "
    resume += f"--resume {folder}"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["args.json", "metrics.csv", "timing.csv", "checkpoint.msgpack"] + ["stopped.json"] * (left > 0)
    )  # no checkpoint.msgpack.tmp
    assert int(read_state(run_dir)["iteration"]) == 1
    if left:
        assert line.endswith(resume)
        stopped = json.loads((run_dir / "stopped.json").read_text())
        assert stopped == dict(message=line, checkpoint_iteration=1, reason="disk full")
    else:
        assert line.endswith(f"{resume}; the disk could not take stopped.json either")

    monkeypatch.delattr(mappo, "open")  # space freed
    resumed = mappo.train(replace(args, resume=folder))
    assert not (run_dir / "stopped.json").exists()
    assert (run_dir / "metrics.csv").read_text() == (
        run_dirs(tmp_path / "straight")[0] / "metrics.csv"
    ).read_text()
    assert resumed["eval/episodic_return"] == straight["eval/episodic_return"]
    assert json.loads((run_dir / "summary.json").read_text()) == resumed
