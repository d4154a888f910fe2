"""The PPO step of each script on real rollouts: acting and training agree on every log-prob (the PPO ratio is
1 before the first update), and K vmapped seeds are K independent runs."""

import importlib
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

CASES = [
    ("mappo", {}),
    ("mat_ppo", {"decode": "cache"}),
    ("mat_ppo", {"decode": "recompute"}),
    ("mam_ppo", {}),
]


def one_update(module, tx, seeds, perturb=False, **overrides):
    args = replace(
        module.Args(), env_id="rware-tiny-2ag", num_envs=4, num_steps=16, update_epochs=2, **overrides
    )
    env = module.make_env(args.env_id)
    network = module.build_network(args, env)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    runners = module.init_runners(args, env, network, tx, keys)
    if perturb:  # O(1) weights: at init (gains 0.01) MAT's logits barely depend on the other agents' actions
        params = runners.train_state.params
        leaves, tree = jax.tree.flatten(params)
        noise = jax.random.split(jax.random.PRNGKey(42), len(leaves))
        leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)]
        runners = runners._replace(
            train_state=runners.train_state.replace(params=jax.tree.unflatten(tree, leaves))
        )
    return jax.jit(module.over_seeds(module.make_update_step(args, env, network, tx)))(runners)


@pytest.mark.parametrize(
    "script, overrides", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v.values())
)
def test_ratio_is_one_before_any_update(script, overrides):
    """With the parameters frozen (zero updates), every minibatch of every epoch sees the parameters that acted:
    the ratio must be exactly 1 on the whole rollout. An agent order in training that differs from acting (as in
    Mava's MAT), a wrong mask or a wrong action shift would show here."""
    module = importlib.import_module(script)
    _, metrics = one_update(module, optax.set_to_zero(), [0], perturb=True, **overrides)
    assert float(metrics["losses/approx_kl"][0]) < 1e-6
    assert float(metrics["losses/clipfrac"][0]) == 0.0


def test_vmapped_seeds_are_independent_runs():
    """Seed k of --num-seeds K trains like a run with seed + k alone (vmap changes nothing but the batch)."""
    module = importlib.import_module("mappo")
    tx = optax.adam(1e-3)
    _, together = one_update(module, tx, [5, 6])
    _, alone = one_update(module, tx, [6])
    for name in ("losses/value_loss", "losses/policy_loss", "losses/entropy"):
        np.testing.assert_allclose(together[name][1], alone[name][0], rtol=1e-4, atol=1e-6)
    assert not np.allclose(together["losses/value_loss"][0], together["losses/value_loss"][1])


@pytest.mark.parametrize("script", ["mappo", "mat_ppo", "mam_ppo"])
def test_eval_greedy_flag(script):
    """--no-eval-greedy samples: at init (near-uniform policy) RWARE's agents soon collide, which ends the
    episode, while argmax repeats one action per observation; and sampling uses the key, greedy does not."""
    module = importlib.import_module(script)
    args = replace(module.Args(), env_id="rware-tiny-2ag", eval_episodes=8)
    env = module.make_env(args.env_id)
    network = module.build_network(args, env)
    params = module.init_params(network, jax.random.PRNGKey(0), env)

    def lengths(eval_greedy, seeds):
        evaluate = jax.jit(module.make_evaluate(replace(args, eval_greedy=eval_greedy), env, network))
        return [float(evaluate(params, jax.random.PRNGKey(s))["eval/episodic_length"]) for s in seeds]

    (greedy,), (sampled, other_key) = lengths(True, [1]), lengths(False, [1, 2])
    assert sampled < greedy and sampled != other_key  # here: 500 (the time limit) vs about 300
