"""The paper's training protocol in mat_ppo.py and mam_ppo.py: --agent-ids appends a one-hot id to each agent's
observation (not on Connector), --shuffle-agents permutes the agents of the training batch once per epoch and
leaves acting alone. With both off, the update is the one the scripts made before the flags existed."""

import importlib
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

SCRIPTS = ["mat_ppo", "mam_ppo"]


@pytest.mark.parametrize(
    "env_id, num_agents",
    [("lbf-2s-8x8-2p-2f-coop", None), ("rware-tiny-2ag", None), ("rware-tiny-2ag", 5), ("con-5x5x3a", None)],
)
def test_agent_id_columns(env_id, num_agents):
    """The last N columns are eye(N) for the real agent count (--num-agents included), after reset and after a
    step, and the other columns are the env's own observation; Connector's observation names the agent already:
    no ids there."""
    module = importlib.import_module("mam_ppo")
    plain, ided = module.make_env(env_id, num_agents), module.make_env(env_id, num_agents, agent_ids=True)
    n = plain.num_agents
    assert n == (num_agents or n)
    key = jax.random.PRNGKey(0)
    (s0, o0, m0), (s1, o1, m1) = plain.reset(key), ided.reset(key)
    actions = jnp.zeros(n, jnp.int32)
    o0_next, o1_next = plain.step(s0, actions)[1], ided.step(s1, actions)[1]
    if env_id.startswith("con-"):
        assert ided.obs_dim == plain.obs_dim and not ided.agent_ids
        np.testing.assert_array_equal(o1, o0)
        np.testing.assert_array_equal(o1_next, o0_next)
        return
    assert ided.obs_dim == plain.obs_dim + n and o1.shape == (n, ided.obs_dim)
    for with_ids, without in [(o1, o0), (o1_next, o0_next)]:
        np.testing.assert_array_equal(with_ids[:, -n:], np.eye(n))
        np.testing.assert_array_equal(with_ids[:, :-n], without)
    np.testing.assert_array_equal(m1, m0)


def test_agent_ids_on_smacv2_n_vs_n():
    module = importlib.import_module("mat_ppo")
    env = module.make_env("smax-smacv2_5_units", 3, agent_ids=True)
    _, obs, _ = env.reset(jax.random.PRNGKey(0))
    assert env.num_agents == 3 and obs.shape == (3, env.obs_dim)
    np.testing.assert_array_equal(obs[:, -3:], np.eye(3))


def setup(script, **overrides):
    """A real rollout of 4 envs x 8 steps on rware-tiny-2ag, with MAT/MAM's params perturbed so that every agent's
    output depends on the others (at init the 0.01 gains hide it). -> args, network, runner, traj, advantages."""
    module = importlib.import_module(script)
    args = replace(module.Args(), env_id="rware-tiny-2ag", num_envs=4, num_steps=8, **overrides)
    env = module.make_env(args.env_id, None, args.agent_ids)
    network = module.build_network(args, env)
    tx = optax.adam(1e-3)
    runner = jax.tree.map(lambda x: x[0], module.init_runners(args, env, network, tx, module.seed_keys(args)))
    params = runner.train_state.params
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(jax.random.PRNGKey(42), len(leaves))
    leaves = [x + 0.15 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)]
    runner = runner._replace(train_state=runner.train_state.replace(params=jax.tree.unflatten(tree, leaves)))
    runner, traj, _ = jax.jit(lambda r, k: module.rollout(args, env, network, r, k))(
        runner, jax.random.PRNGKey(1)
    )
    last = module.get_value(network, runner.train_state.params, runner.obs, runner.action_mask)
    advantages, returns = module.compute_gae(traj, last, args.gamma, args.gae_lambda)
    return module, args, network, runner, (traj, advantages, returns)


def update(module, args, network, runner, data, key):
    step = jax.jit(lambda ts, d, k: module.ppo_update(args, network, ts, d, k))
    return step(runner.train_state, data, key)


def update_before_the_flags(module, args, network, train_state, data, key):
    """ppo_update as the scripts had it before --shuffle-agents (frozen here): shuffled minibatches, no agents."""
    batch_size = args.num_envs * args.num_steps
    M = batch_size // args.num_minibatches

    def update_minibatch(train_state, minibatch):
        grads, info = jax.grad(module.ppo_loss, has_aux=True)(train_state.params, network, args, *minibatch)
        return train_state.apply_gradients(grads=grads), info

    def update_epoch(carry, _):
        train_state, key = carry
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, batch_size)
        shuffle = lambda x: x.reshape((batch_size,) + x.shape[2:])[perm].reshape((-1, M) + x.shape[2:])
        train_state, info = jax.lax.scan(update_minibatch, train_state, jax.tree.map(shuffle, data))
        return (train_state, key), info

    (train_state, _), info = jax.lax.scan(update_epoch, (train_state, key), None, args.update_epochs)
    return train_state, info


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_off_is_the_update_of_before(script):
    module, args, network, runner, data = setup(script, agent_ids=False, shuffle_agents=False)
    key = jax.random.PRNGKey(3)
    new, info = update(module, args, network, runner, data, key)
    old_step = jax.jit(lambda ts, d, k: update_before_the_flags(module, args, network, ts, d, k))
    old, old_info = old_step(runner.train_state, data, key)
    for a, b in zip(jax.tree.leaves((new.params, info)), jax.tree.leaves((old.params, old_info))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shuffle_is_one_agent_order_per_epoch_applied_to_every_tensor(script):
    """One epoch with the shuffle equals one without it on the batch whose agent axis was permuted by hand with
    the same order (every per-agent tensor: obs, masks, actions, log-probs, values, advantages, returns)."""
    module, args, network, runner, data = setup(script, update_epochs=1, num_minibatches=2)
    key = jax.random.PRNGKey(3)
    shuffled, info = update(module, args, network, runner, data, key)
    n = data[0].obs.shape[2]
    order = jax.random.permutation(jax.random.fold_in(jax.random.split(key)[1], 1), n)
    assert not np.array_equal(order, np.arange(n)), "pick another key: this order is the identity"
    by_hand = jax.tree.map(lambda x: x[:, :, order] if x.ndim > 2 else x, data)  # (T, B, N, ...)
    plain, plain_info = update(module, replace(args, shuffle_agents=False), network, runner, by_hand, key)
    for a, b in zip(jax.tree.leaves((shuffled.params, info)), jax.tree.leaves((plain.params, plain_info))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # and the shuffle does something: without it, the unpermuted batch gives another update
    unshuffled, _ = update(module, replace(args, shuffle_agents=False), network, runner, data, key)
    differ = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(unshuffled.params), jax.tree.leaves(plain.params))
    ]
    assert any(differ)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shuffle_changes_training_not_acting(script):
    """Acting keeps the env's agent order: the rollouts with the shuffle on and off are the same; training does
    not (the decoder's conditionals are taken in another order, so the ratio is not 1 before any step)."""
    on = setup(script, shuffle_agents=True)
    off = setup(script, shuffle_agents=False)
    for a, b in zip(jax.tree.leaves(on[4]), jax.tree.leaves(off[4])):
        np.testing.assert_array_equal(a, b)
    module, args, network, runner, data = on
    frozen = runner.train_state.replace(
        tx=optax.set_to_zero(), opt_state=optax.set_to_zero().init(runner.train_state.params)
    )
    runner = runner._replace(train_state=frozen)
    kl = lambda a: float(
        update(module, a, network, runner, data, jax.random.PRNGKey(3))[1]["approx_kl"].max()
    )
    assert kl(replace(args, shuffle_agents=False)) < 1e-6 < kl(args)
