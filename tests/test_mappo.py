"""The env wrapper, on mappo.py's copy (the same in every script): termination vs truncation, agent counts,
Connector views."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import mappo  # noqa: E402


def test_env_config_resizes_and_rejects():
    assert mappo.env_config("con-5x5x3a", 40)[1]["grid_size"] ** 2 >= 200
    family, kw, limit = mappo.env_config("con-5x5x3a", 40)
    assert limit == kw["grid_size"] ** 2  # the alias' time limit = G^2 follows the grid
    kw = mappo.env_config("rware-tiny-2ag", 64)[1]
    assert ((kw["column_height"] + 1) * kw["shelf_rows"] + 2) * (3 * kw["shelf_columns"] + 1) >= 3 * 64
    assert kw["shelf_columns"] % 2 == 1
    kw = mappo.env_config("lbf-8x8-2p-2f-coop", 20)[1]
    assert kw["fov"] == kw["grid_size"] >= 11  # full view stays full
    with pytest.raises(mappo.RunError, match="unknown --env-id"):
        mappo.env_config("nope")
    with pytest.raises(mappo.RunError, match="--num-agents"):
        mappo.env_config("rware-tiny-2ag", -1)


def random_rollout(env, steps, seed=0, batch=8):
    """Random legal actions with no reset: returns per-step (reward, terminated, truncated, step_count)."""
    state, obs, mask = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(seed), batch))

    def step(carry, key):
        state, mask = carry
        actions = jax.random.categorical(key, jnp.where(mask, 0.0, -1e9)).astype(jnp.int32)
        state, obs, mask, reward, term, trunc, success = jax.vmap(env.step)(state, actions)
        return (state, mask), (reward, term, trunc, obs, success)

    _, out = jax.lax.scan(step, (state, mask), jax.random.split(jax.random.PRNGKey(seed + 1), steps))
    return out


def test_lbf_time_limit_is_truncation():
    env = mappo.make_env("lbf-2s-8x8-2p-2f-coop")
    reward, term, trunc, _, eaten = random_rollout(env, env.time_limit)
    trunc, term, eaten = np.asarray(trunc), np.asarray(term), np.asarray(eaten)
    before = np.cumsum(term, 0) - term == 0  # the episode had not terminated before this step
    # a termination is all food eaten (the env's percent_eaten), never the time limit
    assert (eaten[term] == 100).all() and (term[before] == (eaten[before] == 100)).all()
    # whoever has not eaten everything by step 100 is truncated there, and only there
    assert not trunc[:-1].any() and not term[-1][trunc[-1]].any()
    assert (trunc[-1] == ~term.any(0)).all() and trunc[-1].sum() >= 4


def test_rware_time_limit_is_truncation_and_collision_termination(monkeypatch):
    family, kw, _ = mappo.ENVS["rware-tiny-2ag"]
    monkeypatch.setitem(mappo.ENVS, "rware-tiny-2ag", (family, kw, 30))  # a 30-step time limit
    env = mappo.make_env("rware-tiny-2ag")
    _, term, trunc, _, _ = random_rollout(env, 30, batch=32)
    term, trunc = np.asarray(term), np.asarray(trunc)
    assert not (term & trunc).any() and not trunc[:-1].any()
    # some envs collided (termination); every env that did not was truncated at step 30, not terminated
    assert term.any() and (~term[:-1].any(0)).any()
    assert trunc[-1][~term[:-1].any(0)].all()


def test_connector_views():
    env = mappo.make_env("con-5x5x3a")
    _, obs, _ = env.reset(jax.random.PRNGKey(0))
    planes = np.asarray(obs).reshape(env.num_agents, 5, 5, 6)
    assert obs.shape == (3, env.obs_dim) == (3, 150)
    assert (planes[..., 1].sum((1, 2)) == 1).all()  # each agent sees exactly one own position
    assert (planes[..., 2].sum((1, 2)) == 1).all()  # and one own target
    assert (planes[..., 4].sum((1, 2)) == env.num_agents - 1).all()  # and the others' positions
