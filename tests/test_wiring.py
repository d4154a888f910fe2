"""The plumbing of a PPO iteration, in each script, on the stable names: seeds (seed_keys -> init_runners ->
update step), the rollout against a step-by-step replay on a scripted env whose every number is known
(observations, masks, rewards, termination vs truncation, the value of the true final observation, the pool of
start states, the episode counters and the logged means), the update step's advantages, the evaluation, the env
wrappers against the envs' own numbers, and the action masks and MAPPO's network."""

import functools
import importlib
from dataclasses import replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

SCRIPTS = ["mappo", "mat_ppo", "mam_ppo"]
T, B = 10, 8  # rollout steps, envs: every env ends at least two episodes per rollout, at most five (< B)


class ScriptedEnv(NamedTuple):
    """A tiny env with the scripts' Env interface whose every number is known. Each agent observes
    (start, t, end, agent index): start is drawn by reset (it tells start states apart), t is the step count,
    end the episode's natural end, drawn in [2, 2 * time_limit) unless fixed: an episode terminates at end if
    end < time_limit, else it is truncated at the time limit. Action t % A is illegal at step t. The reward of
    the step to t is reward_of_start * start + t + reward_of_actions * sum(actions), also after the episode's
    end (the env goes on counting); the success figure is t."""

    num_agents: int = 2
    obs_dim: int = 4
    action_dim: int = 3
    time_limit: int = 4
    end: int = 0  # 0: drawn per episode
    reward_of_start: float = 1.0
    reward_of_actions: float = 0.1

    def observe(self, s):
        row = jnp.stack([s["start"], s["t"].astype(jnp.float32), s["end"].astype(jnp.float32)])
        agent = jnp.arange(self.num_agents, dtype=jnp.float32)[:, None]
        return jnp.concatenate([jnp.broadcast_to(row, (self.num_agents, 3)), agent], -1)

    def mask(self, s):
        legal = jnp.arange(self.action_dim) != s["t"] % self.action_dim
        return jnp.broadcast_to(legal, (self.num_agents, self.action_dim))

    def reset(self, key):
        start_key, end_key = jax.random.split(key)
        end = jax.random.randint(end_key, (), 2, 2 * self.time_limit) if not self.end else self.end
        s = dict(start=jax.random.uniform(start_key), t=jnp.int32(0), end=jnp.asarray(end, jnp.int32))
        return s, self.observe(s), self.mask(s)

    def step(self, s, actions):
        s = dict(s, t=s["t"] + 1)
        t = s["t"].astype(jnp.float32)
        reward = self.reward_of_start * s["start"] + t + self.reward_of_actions * actions.sum()
        natural = s["end"] < self.time_limit
        terminated = natural & (s["t"] == s["end"])
        truncated = ~natural & (s["t"] == self.time_limit)
        return s, self.observe(s), self.mask(s), reward.astype(jnp.float32), terminated, truncated, t


def observe_np(env, start, t, end):
    """What ScriptedEnv shows in state (start, t, end), and its action mask, in numpy."""
    obs = np.stack([np.array([start, t, end, i], np.float32) for i in range(env.num_agents)])
    mask = np.broadcast_to(np.arange(env.action_dim) != t % env.action_dim, (env.num_agents, env.action_dim))
    return obs, mask


def perturb(module, params, seed=42):
    """O(1) weights: at init (gains 0.01) MAT's and MAM's values barely depend on the observation."""
    scale = 0.15 if module.__name__ == "mam_ppo" else 0.3  # as test_ppo.py: more drives MAM's BiMamba to NaN
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)]
    )


@functools.cache
def setup(script, num_seeds=1, seed=3, optimizer="zero"):
    """-> module, args, env, network, runners (one per seed, from seed_keys, params perturbed)."""
    module = importlib.import_module(script)
    env = ScriptedEnv()
    args = replace(module.Args(), num_envs=B, num_steps=T, num_minibatches=2, update_epochs=2, seed=seed,
                   num_seeds=num_seeds, gamma=0.9, gae_lambda=0.5)  # fmt: skip
    network = module.build_network(args, env)
    tx = optax.set_to_zero() if optimizer == "zero" else optax.sgd(1e-5)  # small steps: adam amplifies ulps
    runners = module.init_runners(args, env, network, tx, module.seed_keys(args))
    params = jax.vmap(lambda p, k: perturb(module, p, k))(runners.train_state.params, jnp.arange(num_seeds))
    runners = runners._replace(train_state=runners.train_state.replace(params=params))
    return module, args, env, network, runners


def first_seed(tree):
    return jax.tree.map(lambda x: x[0], tree)


@functools.cache
def jitted_rollout(script):
    module, args, env, network, _ = setup(script)
    return jax.jit(lambda runner, key: module.rollout(args, env, network, runner, key))


@functools.cache
def jitted_value(script):
    module, _, _, network, runners = setup(script)
    params = first_seed(runners.train_state.params)
    return jax.jit(lambda obs, mask: module.get_value(network, params, obs, mask))


def replay(script, runner, pool_key):
    """Runs the script's rollout, then replays it step by step from the runner's env states and the actions
    it took, checking every field. -> the start ids the finished envs took (per env), the runner after."""
    module, args, env, network, _ = setup(script)
    out, traj, metrics = jax.device_get(jitted_rollout(script)(runner, pool_key))
    state = jax.device_get(runner.env_state)
    cur = [(state["start"][b], int(state["t"][b]), int(state["end"][b])) for b in range(B)]
    initial_starts = {c[0] for c in cur}
    ep_return, ep_length = np.array(runner.ep_return, np.float64), np.array(runner.ep_length)
    finished, taken = [], [[] for _ in range(B)]
    final_obs, final_mask = np.zeros(traj.obs.shape, np.float32), np.zeros(traj.action_mask.shape, bool)
    kinds = set()
    for t in range(T):
        for b in range(B):
            start, step, end = cur[b]
            obs, mask = observe_np(env, start, step, end)
            np.testing.assert_array_equal(traj.obs[t, b], obs, err_msg=f"obs at step {t}, env {b}")
            np.testing.assert_array_equal(traj.action_mask[t, b], mask, err_msg=f"mask at step {t}, env {b}")
            actions = traj.actions[t, b]
            assert mask[np.arange(env.num_agents), actions].all(), f"an illegal action at step {t}, env {b}"
            step += 1
            reward = start + step + 0.1 * actions.sum()
            np.testing.assert_allclose(traj.rewards[t, b], reward, rtol=1e-6, err_msg=f"reward {t}, {b}")
            terminated = end < env.time_limit and step == end
            truncated = end >= env.time_limit and step == env.time_limit
            assert (traj.terminated[t, b], traj.truncated[t, b]) == (terminated, truncated), (t, b)
            final_obs[t, b], final_mask[t, b] = observe_np(env, start, step, end)  # before any reset
            ep_return[b] += reward
            ep_length[b] += 1
            cur[b] = (start, step, end)
            if terminated or truncated:
                kinds.add("terminated" if terminated else "truncated")
                finished.append((ep_return[b], ep_length[b], step))
                ep_return[b], ep_length[b] = 0.0, 0
                # the start state it took, read from what the env shows next: a start (t = 0), never one used
                # before by this env (the next one of the pool), never one of the rollout's initial states
                nxt = traj.obs[t + 1, b, 0] if t + 1 < T else out.obs[b, 0]
                assert nxt[1] == 0, f"env {b} did not restart after step {t}"
                assert nxt[0] not in initial_starts and nxt[0] not in taken[b], (
                    f"env {b} reused a start state"
                )
                taken[b].append(nxt[0])
                cur[b] = (nxt[0], 0, int(nxt[2]))
    assert kinds == {"terminated", "truncated"} and max(map(len, taken)) >= 2  # the test can fail
    for b in range(B):  # the runner after the rollout
        np.testing.assert_array_equal(out.obs[b], observe_np(env, *cur[b])[0])
    np.testing.assert_allclose(out.ep_return, ep_return, rtol=1e-5)
    np.testing.assert_array_equal(out.ep_length, ep_length)
    # values of the observations acted on; final_values: of the true final observation, not the reset one
    value = jitted_value(script)
    flat = lambda x: x.reshape((T * B,) + x.shape[2:])  # noqa: E731
    values = np.asarray(value(flat(traj.obs), flat(traj.action_mask))).reshape(traj.values.shape)
    np.testing.assert_allclose(traj.values, values, rtol=1e-5, atol=1e-6)
    final_values = np.asarray(value(flat(final_obs), flat(final_mask))).reshape(traj.values.shape)
    np.testing.assert_allclose(traj.final_values, final_values, rtol=1e-5, atol=1e-6)
    ended = traj.terminated | traj.truncated
    assert np.abs(traj.final_values[:-1][ended[:-1]] - traj.values[1:][ended[:-1]]).min() > 1e-4
    # the logged means: over the episodes that ended in the rollout, by hand
    returns, lengths, success = np.array(finished).T
    assert metrics["charts/episodes"] == len(finished)
    np.testing.assert_allclose(metrics["charts/episodic_return"], returns.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["charts/episodic_length"], lengths.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["charts/success"], success.mean(), rtol=1e-6)
    return taken, out


@pytest.mark.parametrize("script", SCRIPTS)
def test_rollout_replayed_step_by_step(script):
    """Two rollouts in a row: everything the first records is what a replay of its actions gives; episode
    counters run across rollouts; the second rollout's pool holds other start states than the first's."""
    *_, runners = setup(script)
    runner = first_seed(runners)
    taken1, runner = replay(script, runner, jax.random.PRNGKey(11))
    taken2, _ = replay(script, runner, jax.random.PRNGKey(12))
    assert not set(sum(taken1, [])) & set(sum(taken2, [])), "the pool of start states is not fresh"


def starts(runners):  # (K, B) start ids of the episodes the envs are in
    return np.asarray(runners.env_state["start"])


# make_update_step, seed_keys, init_runners and over_seeds read the same in the three scripts (test_diff.py,
# test_diff_mappo.py): one script's compile is enough
@pytest.mark.parametrize("script", ["mappo"])
def test_update_step_seeds_and_pools(script):
    """Through seed_keys and init_runners, as main does: seed k of --num-seeds 2 is the run of --seed 3 + k
    alone (the same env states, the same losses); the seeds differ; each iteration's start states are fresh."""
    module, args, env, network, together = setup(script, num_seeds=2, optimizer="sgd")
    *_, alone = setup(script, num_seeds=1, seed=4, optimizer="sgd")
    # the perturbation is per seed index: give the lone seed 4 the params of seed index 1
    params = jax.tree.map(lambda x: x[1:], together.train_state.params)
    alone = alone._replace(train_state=alone.train_state.replace(params=params))
    step = jax.jit(module.over_seeds(module.make_update_step(args, env, network)))
    step_alone = jax.jit(
        module.over_seeds(module.make_update_step(replace(args, num_seeds=1, seed=4), env, network))
    )
    history = [starts(together)]
    for _ in range(2):
        together, metrics = step(together)
        alone, metrics_alone = step_alone(alone)
        np.testing.assert_array_equal(starts(together)[1], starts(alone)[0])
        for name in ("charts/episodic_return", "losses/value_loss", "losses/entropy"):
            np.testing.assert_allclose(metrics[name][1], metrics_alone[name][0], rtol=2e-4, atol=1e-6)
        assert metrics["losses/value_loss"][0] != metrics["losses/value_loss"][1]
        history.append(starts(together))
    s = np.stack(history)  # (iterations + 1, K, B): every env restarted in every rollout (T > time limit)
    assert not set(s[:, 0].ravel()) & set(s[:, 1].ravel()), "two seeds share start states"
    for i in range(2):
        assert not set(s[i].ravel()) & set(s[i + 1].ravel()), "a rollout reused the last one's start states"


@pytest.mark.parametrize("script", ["mappo"])
def test_update_step_advantages(script, monkeypatch):
    """With the parameters frozen, every minibatch's value loss is half the mean squared advantage: the update
    step must bootstrap GAE from the value of the observation after the rollout, with --gamma and --gae-lambda
    in their places, and train on those advantages and returns (logged: the rollout's own metrics)."""
    module, args, env, network, runners = setup(script)
    seen, rollout = {}, module.rollout

    def spy(*a, **kw):
        seen["rollout"] = rollout(*a, **kw)
        return seen["rollout"]

    monkeypatch.setattr(module, "rollout", spy)
    runner = first_seed(runners)
    _, metrics = module.make_update_step(args, env, network)(runner)  # not jitted: the spy sees numbers
    after, traj, rollout_metrics = seen["rollout"]
    params = runner.train_state.params
    last_values = module.get_value(network, params, after.obs, after.action_mask)
    advantages, _ = module.compute_gae(traj, last_values, 0.9, 0.5)
    np.testing.assert_allclose(metrics["losses/value_loss"], 0.5 * np.mean(np.square(advantages)), rtol=1e-4)
    assert float(metrics["losses/approx_kl"]) < 1e-6
    for name, value in rollout_metrics.items():
        np.testing.assert_array_equal(metrics[name], value)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("end, length", [(3, 3), (99, 6)], ids=["terminated", "truncated"])
def test_evaluation_counts_nothing_after_the_end(script, end, length):
    """Episodes that end at step 3 (terminated) or at the time limit 6 (truncated), reward t at step t, also after
    the end: the evaluation counts 1 + ... + length; with --capture-video (the record of record_video) it keeps
    env 0's states from the start through the end, and every episode's length."""
    module = importlib.import_module(script)
    env = ScriptedEnv(time_limit=6, end=end, reward_of_start=0.0, reward_of_actions=0.0)
    args = replace(module.Args(), eval_episodes=3, capture_video=True)
    network = module.build_network(args, env)
    params = module.init_params(network, jax.random.PRNGKey(0), env)
    record = module.record_video(args)
    metrics, (frames, lengths) = jax.jit(module.make_evaluate(args, env, network, record))(
        params, jax.random.PRNGKey(1)
    )
    assert float(metrics["eval/episodic_return"]) == length * (length + 1) / 2
    assert float(metrics["eval/episodic_length"]) == length
    assert np.asarray(lengths).tolist() == [length] * args.eval_episodes
    assert float(metrics["eval/success"]) == length  # the success figure at the end, not after
    assert np.asarray(frames["t"]).tolist() == list(range(env.time_limit + 1))  # the start, then every step


# ----------------------------------------------------------------------------------------------------------
# The env wrappers against the envs' own numbers
# ----------------------------------------------------------------------------------------------------------
def lockstep(module, env_id, steps, batch, seed=0):
    """Random legal play, no reset, the wrapper and the raw Jumanji env stepped from the same states with the
    same actions. -> per step (T, B, ...): the wrapper's reward, terminated, truncated; the raw env's rewards, its
    step count, and the hand flag of a natural end (all food eaten, every agent connected or blocked, a collision);
    and whether the episode was still running before the step."""
    from jumanji.environments.routing.robot_warehouse.utils import is_collision

    env = module.make_env(env_id)

    def natural_end(state, ts):
        if env.family == "lbf":
            return state.food_items.eaten.all()
        if (
            env.family == "connector"
        ):  # the env's per-agent discount is 0 once an agent is connected or blocked
            return (ts.discount == 0).all()
        return jax.vmap(functools.partial(is_collision, state.grid))(
            state.agents, jnp.arange(env.num_agents)
        ).any()

    def play(key):
        state, _, mask = jax.vmap(env.reset)(jax.random.split(key, batch))

        def step(carry, key):
            state, mask, running = carry
            actions = jax.random.categorical(key, jnp.where(mask, 0.0, -1e9)).astype(jnp.int32)
            raw_state, ts = jax.vmap(env.env.step)(state, actions)
            state, _, mask, reward, term, trunc, _ = jax.vmap(env.step)(state, actions)
            out = dict(reward=reward, term=term, trunc=trunc, raw_reward=ts.reward, running=running,
                       step_count=ts.observation.step_count, natural=jax.vmap(natural_end)(raw_state, ts))  # fmt: skip
            return (state, mask, running & ~(term | trunc)), out

        _, out = jax.lax.scan(step, (state, mask, jnp.ones(batch, bool)), jax.random.split(key, steps))
        return out

    return env, jax.device_get(jax.jit(play)(jax.random.PRNGKey(seed)))


# the Env wrapper and make_env read the same in the three scripts (test_diff.py, test_diff_mappo.py); compiling
# two envs' steps takes long: mappo's copy only
@pytest.mark.parametrize("script", ["mappo"])
@pytest.mark.parametrize("env_id", ["rware-tiny-2ag", "lbf-2s-8x8-2p-2f-coop", "con-5x5x3a"])
def test_wrapper_ends_and_rewards_by_hand(script, env_id, monkeypatch):
    """Until each episode's first end: the team reward is the env's per-agent rewards summed (LBF, Connector)
    or its scalar taken as is (RWARE); an episode that ends naturally (collision, all food eaten, every agent
    done) terminates; one that reaches the time limit otherwise is truncated, never terminated."""
    module = importlib.import_module(script)
    if env_id.startswith("rware"):  # a 30-step time limit: random agents collide within ~48 steps
        family, kw, _ = module.ENVS[env_id]
        monkeypatch.setitem(module.ENVS, env_id, (family, kw, 30))
    env, out = lockstep(module, env_id, steps=module.env_config(env_id)[2], batch=32)
    run = out["running"]
    raw = out["raw_reward"] if out["raw_reward"].ndim == 2 else out["raw_reward"].sum(-1)
    np.testing.assert_allclose(out["reward"][run], raw[run], rtol=1e-6, atol=1e-7)
    at_limit = out["step_count"] >= env.time_limit
    want_term, want_trunc = out["natural"] & ~at_limit, at_limit & ~out["natural"]
    # left out: a natural end on the time limit's step itself, which the wrapper calls a truncation (the env: a
    # termination); not decided here
    run = run & ~(out["natural"] & at_limit)
    np.testing.assert_array_equal(out["term"][run], want_term[run])
    np.testing.assert_array_equal(out["trunc"][run], want_trunc[run])
    ended = out["running"] & (out["term"] | out["trunc"])
    assert ended.sum(0).tolist() == [1] * 32  # every episode ended once, by the time limit at the latest
    if env_id.startswith("con"):
        assert out["term"][run].any() and (raw[run] != 0).all()  # agents blocked or connected; -0.03 a step


@pytest.mark.parametrize("script", ["mappo"])
def test_lbf_eating_the_last_food_terminates(script):
    """A crafted LBF state: both agents beside the last uneaten food, which both load: the episode terminates
    (all food eaten) with the agents' rewards summed; the same food left alone at the time limit: truncated."""
    module = importlib.import_module(script)
    env = module.make_env("lbf-8x8-2p-2f-coop")
    state, _, _ = env.reset(jax.random.PRNGKey(0))
    food = state.food_items
    food = food.replace(position=food.position.at[0].set(jnp.array([3, 3])), level=food.level.at[0].set(1),
                        eaten=food.eaten.at[1:].set(True))  # fmt: skip
    food = food.replace(position=food.position.at[1:].set(jnp.array([7, 7])))
    agents = state.agents.replace(position=jnp.array([[3, 2], [3, 4]]), level=jnp.array([1, 1]))
    state = state.replace(food_items=food, agents=agents, step_count=jnp.int32(5))
    load = jnp.full(env.num_agents, 5, jnp.int32)  # LBF's action 5: load
    raw_state, ts = env.env.step(state, load)
    assert raw_state.food_items.eaten.all() and ts.reward.sum() > 0
    _, _, _, reward, term, trunc, success = jax.jit(env.step)(state, load)
    assert (bool(term), bool(trunc), float(success)) == (True, False, 100.0)
    assert float(reward) == pytest.approx(float(ts.reward.sum()))
    late = state.replace(step_count=jnp.int32(env.time_limit - 1))
    _, _, _, reward, term, trunc, _ = jax.jit(env.step)(late, jnp.zeros(env.num_agents, jnp.int32))
    assert (bool(term), bool(trunc), float(reward)) == (False, True, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Action masks in acting and in the loss; MAPPO's network
# ----------------------------------------------------------------------------------------------------------
def network_inputs(module, batch=64, seed=0):
    rng = np.random.default_rng(seed)
    env = ScriptedEnv(num_agents=3, obs_dim=5, action_dim=4)
    args = module.Args()
    network = module.build_network(args, env)
    params = perturb(module, module.init_params(network, jax.random.PRNGKey(seed), env))
    obs = jnp.asarray(rng.normal(size=(batch, env.num_agents, env.obs_dim)), jnp.float32)
    mask = rng.random((batch, env.num_agents, env.action_dim)) < 0.5
    mask[
        np.arange(batch)[:, None], np.arange(env.num_agents), rng.integers(0, env.action_dim, mask.shape[:2])
    ] = True
    return args, env, network, params, obs, jnp.asarray(mask)


@pytest.mark.parametrize("script", SCRIPTS)
def test_illegal_actions_have_zero_probability_in_acting_and_in_the_loss(script):
    module = importlib.import_module(script)
    args, env, network, params, obs, mask = network_inputs(module)
    act = jax.jit(functools.partial(module.act, network))
    for seed in range(4):
        actions, _, _ = act(params, obs, mask, jax.random.PRNGKey(seed))
        assert jnp.take_along_axis(mask, actions[..., None], -1).all(), "acted an illegal action"
    # one legal action per agent: acting takes it with log-prob 0; the loss sees one choice (entropy 0, ratio 1)
    only = jax.random.randint(jax.random.PRNGKey(9), mask.shape[:2], 0, env.action_dim)
    one = jax.nn.one_hot(only, env.action_dim, dtype=bool)
    actions, log_probs, values = act(params, obs, one, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(actions, only)
    np.testing.assert_allclose(log_probs, 0.0, atol=1e-6)
    batch = module.Transition(**{f: None for f in module.Transition._fields})
    batch = batch._replace(
        obs=obs, action_mask=one, actions=only, log_probs=jnp.zeros_like(log_probs), values=values
    )
    _, info = module.ppo_loss(
        params, network, replace(args, norm_adv=False), batch, jnp.ones_like(values), values
    )
    assert abs(float(info["entropy"])) < 1e-6 and abs(float(info["approx_kl"])) < 1e-6


def test_mappo_critic_reads_every_agent_and_actor_reads_its_own_and_its_id():
    import mappo

    _, env, network, params, obs, mask = network_inputs(mappo)
    apply = jax.jit(network.apply)
    logits, values = apply(params, obs, mask)
    for j in range(env.num_agents):
        changed = obs.at[:, j].add(1.0)
        logits_j, values_j = apply(params, changed, mask)
        assert np.abs(values_j - values).min() > 1e-5, f"the critic ignores agent {j}'s observation"
        others = np.arange(env.num_agents) != j
        np.testing.assert_array_equal(logits_j[:, others], logits[:, others])  # each actor: its own obs
        assert np.abs(logits_j[:, j] - logits[:, j])[np.asarray(mask[:, j])].max() > 1e-5
    # every agent seeing the same observation still acts as itself: the one-hot id
    same = jnp.broadcast_to(obs[:, :1], obs.shape)
    logits, _ = apply(params, same, jnp.ones_like(mask))
    for i in range(1, env.num_agents):
        assert np.abs(logits[:, i] - logits[:, 0]).min() > 1e-5, f"agents 0 and {i} act alike: no agent id"
