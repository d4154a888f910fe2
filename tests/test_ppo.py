"""The PPO pieces of each script: compute_gae against a plain loop (truncation bootstraps, termination does not),
ppo_loss against hand-computed and numpy values, and the whole step on real rollouts: acting and training agree
on every log-prob (the PPO ratio is 1 before the first update), and K vmapped seeds are K independent runs."""

import importlib
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

SCRIPTS = ["mappo", "mat_ppo", "mam_ppo"]  # each has its own copy of the PPO code


def transition(module, **fields):
    """A Transition with the given fields, None elsewhere."""
    return module.Transition(**{name: fields.get(name) for name in module.Transition._fields})


def gae_loop(values, final_values, last_value, rewards, terminated, truncated, gamma, lam):
    """The textbook recursion, one step at a time in Python (float64), with the bootstrap value chosen here:
    the true final observation's value after a truncation, else the next step's value (last_value at the end)."""
    T = len(rewards)
    adv, last = np.zeros(T), 0.0
    for t in reversed(range(T)):
        next_value = final_values[t] if truncated[t] else (values[t + 1] if t + 1 < T else last_value)
        delta = rewards[t] + gamma * next_value * (1 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1 - (terminated[t] or truncated[t])) * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("per_agent", [False, True])
def test_gae_matches_python_loop(script, per_agent):
    module = importlib.import_module(script)
    rng = np.random.default_rng(0)
    T, N = 50, 3
    shape = (T, N) if per_agent else (T,)
    values, final_values = rng.normal(size=shape), rng.normal(size=shape)
    last_values = rng.normal(size=shape[1:])
    rewards = rng.normal(size=T)
    terminated, truncated = np.zeros(T, bool), np.zeros(T, bool)
    terminated[[5, 17, 30]] = True
    truncated[[11, 31, 49]] = True  # back to back with a termination at 30, and on the last step
    columns = range(N) if per_agent else [None]
    col = lambda x, i: x if i is None else x[..., i]  # noqa: E731
    expected = np.stack(
        [gae_loop(col(values, i), col(final_values, i), col(last_values, i), rewards, terminated, truncated,
                  0.99, 0.95) for i in columns], -1
    )  # fmt: skip
    expected = expected if per_agent else expected[:, 0]
    # the function works on (T, B, ...) batches: add a batch axis of 1
    batch = lambda x: jnp.asarray(x[:, None])  # noqa: E731
    traj = transition(module, values=batch(values).astype(jnp.float32), rewards=batch(rewards).astype(jnp.float32),
                      terminated=batch(terminated), truncated=batch(truncated),
                      final_values=batch(final_values).astype(jnp.float32))  # fmt: skip
    adv, ret = module.compute_gae(traj, jnp.asarray(last_values[None], jnp.float32), 0.99, 0.95)
    np.testing.assert_allclose(np.asarray(adv)[:, 0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ret)[:, 0], expected + values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("script", SCRIPTS)
def test_truncation_bootstraps_and_termination_does_not(script):
    """One step, reward 1, value 0, gamma 0.9: the true final observation is worth 10, the next (reset) one 5."""
    module = importlib.import_module(script)
    one, zero = jnp.ones((1, 1)), jnp.zeros((1, 1))

    def advantage(terminated, truncated):
        traj = transition(module, values=zero, rewards=one, final_values=10 * one,
                          terminated=jnp.full((1, 1), terminated), truncated=jnp.full((1, 1), truncated))  # fmt: skip
        return float(module.compute_gae(traj, 5 * one[0], 0.9, 0.95)[0][0, 0])

    assert advantage(False, True) == pytest.approx(1 + 0.9 * 10)  # truncated: the final observation's value
    assert advantage(True, False) == pytest.approx(1.0)  # terminated: nothing after it
    assert advantage(False, False) == pytest.approx(1 + 0.9 * 5)  # going on: the next observation's value


class FixedOutputs:
    """A stand-in network whose parameters are the logits and values it returns, whatever the inputs."""

    def apply(self, params, *inputs):
        return params["logits"], params["values"]


def loss_args(module, **overrides):
    base = dict(norm_adv=False, clip_coef=0.2, clip_vloss=True, ent_coef=0.0, vf_coef=0.5)
    return replace(module.Args(), **{**base, **overrides})


def ppo_loss(module, args, logits, values, actions, old_log_probs, old_values, advantages, returns):
    batch = transition(module, actions=jnp.asarray(actions), log_probs=jnp.asarray(old_log_probs, jnp.float32),
                       values=jnp.asarray(old_values, jnp.float32))  # fmt: skip
    params = {"logits": jnp.asarray(logits, jnp.float32), "values": jnp.asarray(values, jnp.float32)}
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, info = module.ppo_loss(params, FixedOutputs(), args, batch, f32(advantages), f32(returns))
    return float(loss), {k: float(v) for k, v in info.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_ppo_loss_clips_by_hand(script):
    """One sample, one agent, two actions. The taken action's probability rose from 0.3 to 0.6 (ratio 2, clip
    0.2): a positive advantage gains only up to the clip, a negative one pays the full ratio."""
    module = importlib.import_module(script)
    logits = np.log([[[0.6, 0.4]]])  # (M=1, N=1, A=2)
    common = dict(
        logits=logits, actions=[[0]], old_log_probs=[[np.log(0.3)]], old_values=[0.0], returns=[0.0]
    )
    _, info = ppo_loss(module, loss_args(module), values=[0.0], advantages=[1.0], **common)
    assert info["policy_loss"] == pytest.approx(-1.2) and info["clipfrac"] == 1.0
    assert info["approx_kl"] == pytest.approx(1 - np.log(2), rel=1e-5)  # (r - 1) - log r
    _, info = ppo_loss(module, loss_args(module), values=[0.0], advantages=[-1.0], **common)
    assert info["policy_loss"] == pytest.approx(2.0)
    # value 1 for a return of 1, from an old value of 0: the clipped value 0.2 is the pessimistic one
    common.update(returns=[1.0], advantages=[0.0])
    _, info = ppo_loss(module, loss_args(module), values=[1.0], **common)
    assert info["value_loss"] == pytest.approx(0.5 * 0.8**2)
    _, info = ppo_loss(module, loss_args(module, clip_vloss=False), values=[1.0], **common)
    assert info["value_loss"] == pytest.approx(0.0)
    # the total: policy - ent_coef * entropy + vf_coef * value
    loss, info = ppo_loss(module, loss_args(module, ent_coef=0.1, vf_coef=2.0), values=[1.0], **common)
    entropy = -(0.6 * np.log(0.6) + 0.4 * np.log(0.4))
    assert info["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert loss == pytest.approx(info["policy_loss"] - 0.1 * entropy + 2.0 * info["value_loss"], rel=1e-5)


def ppo_loss_numpy(args, logits, values, actions, old_log_probs, old_values, advantages, returns):
    """CleanRL's PPO loss in float64 numpy."""
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
    ratio = np.exp(np.take_along_axis(log_probs, actions[..., None], -1)[..., 0] - old_log_probs)
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    if advantages.ndim < ratio.ndim:  # one team advantage for every agent
        advantages = advantages[:, None]
    clipped = np.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    policy_loss = np.maximum(-advantages * ratio, -advantages * clipped).mean()
    v_clipped = old_values + np.clip(values - old_values, -args.clip_coef, args.clip_coef)
    value_loss = 0.5 * np.maximum((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    entropy = -(np.exp(log_probs) * log_probs).sum(-1).mean()
    return policy_loss - args.ent_coef * entropy + args.vf_coef * value_loss, policy_loss, value_loss


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("team_value", [False, True])
def test_ppo_loss_matches_numpy(script, team_value):
    """Random minibatch, advantages normalised, entropy bonus on; one value per agent (MAT, MAM) or per team
    (MAPPO), whose advantage then applies to every agent."""
    module = importlib.import_module(script)
    rng = np.random.default_rng(1)
    M, N, A = 16, 3, 4
    value_shape = (M,) if team_value else (M, N)
    inputs = dict(
        logits=rng.normal(size=(M, N, A)),
        values=rng.normal(size=value_shape),
        actions=rng.integers(0, A, (M, N)),
        old_log_probs=np.log(rng.uniform(0.1, 0.5, (M, N))),
        old_values=rng.normal(size=value_shape),
        advantages=rng.normal(size=value_shape),
        returns=rng.normal(size=value_shape),
    )
    args = loss_args(module, norm_adv=True, ent_coef=0.01)
    loss, info = ppo_loss(module, args, **inputs)
    want_loss, want_policy, want_value = ppo_loss_numpy(args, **inputs)
    assert 0 < info["clipfrac"] < 1  # some ratios are clipped, some not
    np.testing.assert_allclose([loss, info["policy_loss"], info["value_loss"]],
                               [want_loss, want_policy, want_value], rtol=1e-4, atol=1e-5)  # fmt: skip


CASES = [
    ("mappo", {}),
    ("mat_ppo", {"decode": "cache"}),
    ("mat_ppo", {"decode": "recompute"}),
    ("mam_ppo", {}),
]


def one_update(module, tx, seeds, perturb=0.0, **overrides):
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
        leaves = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)]
        runners = runners._replace(
            train_state=runners.train_state.replace(params=jax.tree.unflatten(tree, leaves))
        )
    return jax.jit(module.over_seeds(module.make_update_step(args, env, network)))(runners)


@pytest.mark.parametrize(
    "script, overrides", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v.values())
)
def test_ratio_is_one_before_any_update(script, overrides):
    """With the parameters frozen (zero updates), every minibatch of every epoch sees the parameters that acted:
    the ratio must be exactly 1 on the whole rollout. An agent order in training that differs from acting (as in
    Mava's MAT), a wrong mask or a wrong action shift would show here."""
    module = importlib.import_module(script)
    # MAM: noise 0.15, as in test_mam.py; with expand 2, 0.3 drives BiMamba's un-normalised second pass to NaN
    scale = 0.15 if script == "mam_ppo" else 0.3
    # the paper's agent shuffle (--shuffle-agents, on by default) is such an order: test_protocol.py checks it
    no_shuffle = {} if script == "mappo" else {"shuffle_agents": False}
    _, metrics = one_update(module, optax.set_to_zero(), [0], perturb=scale, **overrides, **no_shuffle)
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
        return [float(evaluate(params, jax.random.PRNGKey(s))[0]["eval/episodic_length"]) for s in seeds]

    (greedy,), (sampled, other_key) = lengths(True, [1]), lengths(False, [1, 2])
    assert sampled < greedy and sampled != other_key  # here: 500 (the time limit) vs about 300
