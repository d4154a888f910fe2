"""The scripts from Python, as a notebook or a hyperparameter sweep uses them: train(Args) returns the run's
summary, twice in one process, and a run that cannot go on raises RunError, never SystemExit."""

import importlib
import json
import math
import signal

import pytest
from conftest import run_dirs

SCRIPTS = ["mappo", "mat_ppo", "mam_ppo"]
TINY = dict(env_id="lbf-2s-8x8-2p-2f-coop", num_envs=4, num_steps=16, total_timesteps=128, eval_episodes=2)


@pytest.fixture
def compile_cache_in_process(compile_cache):
    """The session's XLA compilation cache for runs in this process too."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", compile_cache)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_twice_in_one_process(script, monkeypatch, tmp_path, compile_cache_in_process):
    """Two runs of the same args in one process: each returns its summary (summary.json's contents), and the
    second computes what the first did (nothing of the first run is left over: signal handlers, files)."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        first = module.train(module.Args(**TINY))
        second = module.train(module.Args(**TINY))
    except SystemExit as e:
        pytest.fail(f"train raised SystemExit({e.code})")
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)] == handlers
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2
    for summary, run_dir in zip((first, second), dirs):
        assert summary == json.loads((run_dir / "summary.json").read_text())
        assert summary["global_step"] == 128 and len(summary["eval/episodic_return"]) == 1
        assert all(math.isfinite(v[0]) for k, v in summary.items() if k.startswith("eval/"))
    assert (dirs[0] / "metrics.csv").read_bytes() == (dirs[1] / "metrics.csv").read_bytes()
    numbers = lambda summary: {k: v for k, v in summary.items() if k not in ("seconds", "SPS")}
    assert numbers(first) == numbers(second)


BAD_INPUT = [
    (dict(env_id="rware-huge-99ag"), "unknown --env-id"),
    (dict(env_id="con-5x5x3a", num_agents=0), "--num-agents"),
    (dict(num_envs=3, num_steps=5, num_minibatches=2), "not divisible"),
    (dict(num_envs=4, num_steps=16, total_timesteps=10), "below one batch"),
    (dict(load_model="does/not/exist.msgpack"), "no such model file"),
    (dict(resume="nowhere"), "cannot read the run's flags"),
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_raises_run_error(script, monkeypatch, tmp_path):
    """What the command line reports as one line and exit code 2 is a RunError from Python; nothing written."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    cases = BAD_INPUT + ([(dict(scan_mode="pallas"), "needs a GPU")] if script == "mam_ppo" else [])
    for flags, message in cases:
        try:
            with pytest.raises(module.RunError, match=message) as error:
                module.train(module.Args(**flags))
        except SystemExit as e:
            pytest.fail(f"{flags}: SystemExit({e.code})")
        assert error.value.exit_code == 2 and error.value.line == f"error: {error.value}"
    assert run_dirs(tmp_path) == []
