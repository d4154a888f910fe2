"""SMAX (JaxMARL's SMAC / SMACv2) through the scripts' wrapper: the env contract, a smoke run per script, bad
input. SMAX compiles slowly on a CPU (10-20 s per program): one compiled program per env serves every contract
test, and the smoke runs use the smallest budget that still runs two iterations."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import read_metrics, read_summary, run_dirs
from test_cli import assert_complete_run
from test_video import gif_frames

import mappo

SCRIPTS = ["mappo.py", "mat_ppo.py", "mam_ppo.py"]
B = 8  # envs played side by side
STOP = 4  # SMAX's "stop" action: always legal, the only one a dead ally has


def test_scenario_table_is_jaxmarls():
    """env_config's hard-coded table (it must not import jaxmarl) lists every scenario jaxmarl knows, correctly."""
    from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

    table = {name: (s.num_allies, s.num_enemies) for name, s in MAP_NAME_TO_SCENARIO.items()}
    assert mappo.SMAX_SCENARIOS == table
    assert all(f"smax-{name}" in mappo.ENVS for name in table)


def test_env_config_num_agents():
    family, kw, limit = mappo.env_config("smax-smacv2_5_units", 12)
    assert family == "smax" and limit == 100
    assert kw == dict(scenario="smacv2_5_units", num_agents=12, num_enemies=12)  # N vs N
    assert mappo.env_config("smax-2s3z", 5)[1]["num_agents"] == 5  # its own count is no change
    with pytest.raises(mappo.RunError, match="fixed SMAC map"):
        mappo.env_config("smax-2s3z", 6)
    with pytest.raises(mappo.RunError, match="--num-agents"):
        mappo.env_config("smax-smacv2_10_units", 0)
    with pytest.raises(mappo.RunError, match="unknown --env-id"):
        mappo.env_config("smax-4m")


@pytest.fixture(scope="module", params=["smax-2s3z", "smax-smacv2_5_units"])
def played(request):
    """One jitted program per env: B episodes of random legal play until each first ends (at most the time
    limit), JaxMARL's per-ally rewards of the same steps, and one step from each of four crafted states."""
    env = mappo.make_env(request.param)
    n = env.num_agents

    def play(key):
        reset_key, play_key = jax.random.split(key)
        state, obs, mask = jax.vmap(env.reset)(jax.random.split(reset_key, B))

        def step(carry, key):
            state, obs, mask, running = carry
            actions = jax.random.categorical(key, jnp.where(mask, 0.0, -1e9)).astype(jnp.int32)  # (B, N)
            # JaxMARL's own rewards for every ally, drawn with the key the wrapper uses
            step_keys = jax.vmap(lambda s: jax.random.split(s[0])[1])(state)
            raw = jax.vmap(lambda k, s, a: env.env.step_env(k, s[1], dict(zip(env.env.agents, a)))[2])(
                step_keys, state, actions
            )
            ally_rewards = jnp.stack([raw[agent] for agent in env.env.agents], -1)  # (B, N)
            state, next_obs, next_mask, reward, term, trunc, success = jax.vmap(env.step)(state, actions)
            out = dict(obs=obs, mask=mask, actions=actions, reward=reward, ally_rewards=ally_rewards,
                       term=term, trunc=trunc, success=success, running=running)  # fmt: skip
            return (state, next_obs, next_mask, running & ~(term | trunc)), out

        init = (state, obs, mask, jnp.ones(B, bool))
        _, traj = jax.lax.scan(step, init, jax.random.split(play_key, env.time_limit))  # (T, B, ...)

        # crafted: (a) the last step of the time limit, (b) every enemy at 0 health, (c) every ally at 0 health,
        # (d) both (a) and (b). Health 0 kills a unit within the step.
        key0, s0 = jax.tree.map(lambda x: x[0], state)
        sim = s0.state
        last_step = sim.replace(step=jnp.asarray(env.time_limit - 1))
        no_enemies = sim.replace(unit_health=sim.unit_health.at[n:].set(0.0))
        no_allies = sim.replace(unit_health=sim.unit_health.at[:n].set(0.0))
        both = no_enemies.replace(step=jnp.asarray(env.time_limit - 1))
        crafted = [(key0, s0.replace(state=s)) for s in (last_step, no_enemies, no_allies, both)]
        crafted = jax.tree.map(lambda *x: jnp.stack(x), *crafted)
        stop = jnp.full((4, n), STOP, jnp.int32)
        _, _, _, _, term, trunc, success = jax.vmap(env.step)(crafted, stop)
        return traj, dict(term=term, trunc=trunc, success=success)

    traj, crafted = jax.jit(play)(jax.random.PRNGKey(0))
    return env, jax.device_get(traj), jax.device_get(crafted)


def test_shapes_and_legal_actions(played):
    env, traj, _ = played
    n, o, a = env.num_agents, env.obs_dim, env.action_dim
    assert (n, o, a) == (5, 127, 10)  # 5 allies vs 5 enemies: 5 moves (4 directions, stop) + 5 targets
    assert traj["obs"].shape == (env.time_limit, B, n, o) and traj["obs"].dtype == jnp.float32
    assert traj["mask"].shape == (env.time_limit, B, n, a) and traj["mask"].dtype == bool
    assert traj["mask"][..., STOP].all()  # stopping is always legal: no ally is ever without an action
    running = traj["running"]
    taken = jnp.take_along_axis(traj["mask"], traj["actions"][..., None], -1)[..., 0]
    assert taken[running].all()
    assert jnp.isfinite(traj["obs"][running]).all()


def test_team_reward_counted_once(played):
    """JaxMARL gives every ally the same (team) reward: the wrapper counts it once, not N times."""
    _, traj, _ = played
    ally = traj["ally_rewards"][traj["running"]]  # (steps, N)
    assert (ally == ally[:, :1]).all()
    assert jnp.allclose(traj["reward"][traj["running"]], ally[:, 0])
    assert ally.max() > 0  # random play does some damage


def test_random_play_ends_in_terminations(played):
    """Random allies lose: every episode ends with one side wiped out (a termination, no win) before the
    time limit."""
    env, traj, _ = played
    ended = traj["running"] & (traj["term"] | traj["trunc"])
    assert ended.sum(0).tolist() == [1] * B  # every episode ended once within the time limit
    assert not (traj["term"] & traj["trunc"]).any()
    assert traj["term"][ended].all() and (traj["success"][ended] == 0).all()
    assert (traj["success"][traj["running"] & ~ended] == 0).all()  # no win flag mid-episode


def test_truncation_termination_and_win_told_apart(played):
    _, _, crafted = played
    # time limit / enemies dead / allies dead / enemies dead at the time limit
    assert crafted["trunc"].tolist() == [True, False, False, False]
    assert crafted["term"].tolist() == [False, True, True, True]
    assert crafted["success"].tolist() == [0.0, 1.0, 0.0, 1.0]  # the win flag only on wins


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_smacv2_3_vs_3(script, run_script, tmp_path):
    flags = ["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--num-minibatches", "1"]
    flags += ["--update-epochs", "1", "--eval-episodes", "2"]
    video = ["--capture-video"] if script == "mappo.py" else []  # JaxMARL's drawing, once
    out = run_script(script, "--env-id", "smax-smacv2_5_units", "--num-agents", "3", *flags, *video)
    assert out.returncode == 0, out.stderr
    obs = 75 if script == "mappo.py" else 78  # MAT / MAM append the 3 agent ids (--agent-ids, on by default)
    assert f"3 agents, obs {obs}, actions 8" in out.stdout  # 3 vs 3: 5 moves + 3 targets
    (run_dir,) = run_dirs(tmp_path)
    assert_complete_run(run_dir, iterations=2, seeds=1)
    assert "charts/success" in read_metrics(run_dir)[0]
    assert 0 <= read_summary(run_dir)["eval/success"][0] <= 1  # the win rate
    if video:  # the first of the 2 eval episodes: at least its start and one step
        assert gif_frames(run_dir / "videos" / "iter_2.gif") >= 2
    assert math.isfinite(read_summary(run_dir)["eval/episodic_return"][0])


BAD_INPUT = [
    (["--env-id", "smax-4m"], "unknown --env-id"),
    (["--env-id", "smax-3s5z", "--num-agents", "10"], "fixed SMAC map"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, message", BAD_INPUT)
def test_bad_smax_input_is_one_clear_line(script, flags, message, run_script, tmp_path):
    out = run_script(script, *flags)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert run_dirs(tmp_path) == []
