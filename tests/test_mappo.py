"""mappo.py: GAE against a plain loop, the env wrapper (termination vs truncation, agent counts, Connector views)
and a learning test."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import mappo  # noqa: E402


def gae_loop(values, next_values, rewards, terminated, truncated, gamma, lam):
    """The textbook recursion, one step at a time in Python (float64)."""
    T = len(rewards)
    adv = np.zeros_like(values, dtype=np.float64)
    last = np.zeros_like(values[0], dtype=np.float64)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] * (1 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1 - max(terminated[t], truncated[t])) * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("per_agent", [False, True])
def test_gae_matches_python_loop(per_agent):
    rng = np.random.default_rng(0)
    T, N = 50, 3
    values = rng.normal(size=(T, N) if per_agent else (T,))
    next_values = rng.normal(size=values.shape)
    rewards = rng.normal(size=T)
    terminated, truncated = np.zeros(T), np.zeros(T)
    terminated[[5, 17, 30]] = 1
    truncated[[11, 31, 49]] = 1  # back to back with a termination at 30, and on the last step
    expected = np.stack([
        gae_loop(values[:, i] if per_agent else values, next_values[:, i] if per_agent else next_values,
                 rewards, terminated, truncated, 0.99, 0.95)
        for i in range(N if per_agent else 1)
    ], -1)  # fmt: skip
    expected = expected if per_agent else expected[:, 0]
    # the function works on (T, B, ...) batches: add a batch axis of 1
    adv, ret = mappo.compute_gae(
        *(
            jnp.asarray(x[:, None], jnp.float32)
            for x in (values, next_values, rewards, terminated, truncated)
        ),
        0.99,
        0.95,
    )
    np.testing.assert_allclose(np.asarray(adv)[:, 0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ret)[:, 0], expected + values, rtol=1e-4, atol=1e-4)


def test_truncation_bootstraps_and_termination_does_not():
    # one step, reward 1, next value 10: truncated -> 1 + 0.9 * 10 - 0 ; terminated -> 1 - 0
    one = jnp.ones((1, 1))
    zero = jnp.zeros((1, 1))
    adv_trunc, _ = mappo.compute_gae(zero, 10 * one, one, zero, one, 0.9, 0.95)
    adv_term, _ = mappo.compute_gae(zero, 10 * one, one, one, zero, 0.9, 0.95)
    assert float(adv_trunc[0, 0]) == pytest.approx(10.0) and float(adv_term[0, 0]) == pytest.approx(1.0)


def test_env_config_resizes_and_rejects():
    assert mappo.env_config("con-5x5x3a", 40)[1]["grid_size"] ** 2 >= 200
    family, kw, limit = mappo.env_config("con-5x5x3a", 40)
    assert limit == kw["grid_size"] ** 2  # the alias' time limit = G^2 follows the grid
    kw = mappo.env_config("rware-tiny-2ag", 64)[1]
    assert ((kw["column_height"] + 1) * kw["shelf_rows"] + 2) * (3 * kw["shelf_columns"] + 1) >= 3 * 64
    assert kw["shelf_columns"] % 2 == 1
    kw = mappo.env_config("lbf-8x8-2p-2f-coop", 20)[1]
    assert kw["fov"] == kw["grid_size"] >= 11  # full view stays full
    with pytest.raises(mappo.EnvError, match="unknown --env-id"):
        mappo.env_config("nope")
    with pytest.raises(mappo.EnvError, match="--num-agents"):
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
    reward, term, trunc, _, _ = random_rollout(env, env.time_limit)
    trunc, term = np.asarray(trunc), np.asarray(term)
    # whoever has not eaten everything by step 100 is truncated there, never terminated
    assert trunc[-1].sum() + term.sum() >= 8 and not trunc[:-1].any()


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
