"""MAPPO: multi-agent PPO with a shared actor and a centralised critic, on Jumanji's multi-agent envs.

Yu et al. 2022, "The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games" (arXiv 2103.01955).
Every agent acts with the same MLP over its own observation plus a one-hot agent id; one critic reads the
global state (all agents' observations) and predicts the team's return. The baseline of Multi-Agent Mamba
(Daniel et al. 2024, arXiv 2410.19382) next to mat_ppo.py and mam_ppo.py.

    python mappo.py --env-id lbf-8x8-2p-2f-coop --total-timesteps 300000
    python mappo.py --help
"""

import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (seed k of --num-seeds K uses seed + k)"""
    num_seeds: int = 1
    """number of independent seeds trained in parallel in one process (vmap)"""
    num_devices: int = 0
    """number of devices per process that the envs are split over (0: all local devices); params are replicated"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "multi-agent-mamba"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the model (params + args) into the `runs/{run_name}` folder"""
    load_model: Optional[str] = None
    """path of a saved model (its model.msgpack or its run folder): evaluate it without training"""

    # Algorithm specific arguments
    env_id: str = "rware-tiny-2ag"
    """the id of the environment (an alias from the table in README.md or a raw Jumanji id)"""
    num_agents: Optional[int] = None
    """override the environment's number of agents (the grid grows when it must)"""
    total_timesteps: int = 1_000_000
    """total environment steps of the experiment (per seed)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 16
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 2
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    eval_episodes: int = 32
    """number of evaluation episodes (run in parallel) at the end of training"""
    eval_greedy: bool = True
    """evaluate with greedy (argmax) actions; --no-eval-greedy samples from the policy as training does"""
    eval_every: int = 0
    """also evaluate every this many iterations (0: only at the end)"""

    # Network
    hidden_dim: int = 128
    """width of the two hidden layers of the actor and of the critic"""


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------
# alias -> (family, generator kwargs, time limit); the raw ids carry Jumanji 1.1.2's defaults.
def _rware(rows, agents, queue):
    kw = dict(shelf_rows=rows, shelf_columns=3, column_height=8, num_agents=agents, sensor_range=1)
    return ("rware", dict(kw, request_queue_size=queue), 500)


def _lbf(grid, fov, agents, food, coop=False):
    kw = dict(grid_size=grid, fov=fov, num_agents=agents, num_food=food, max_agent_level=2, force_coop=coop)
    return ("lbf", kw, 100)


def _con(grid, agents, time_limit=None):
    return ("connector", dict(grid_size=grid, num_agents=agents), time_limit or grid * grid)


ENVS = {
    "rware-tiny-2ag": _rware(1, 2, 2),
    "rware-tiny-4ag": _rware(1, 4, 4),
    "rware-tiny-4ag-easy": _rware(1, 4, 8),
    "rware-small-4ag": _rware(2, 4, 4),
    "lbf-2s-8x8-2p-2f-coop": _lbf(8, 2, 2, 2, coop=True),
    "lbf-8x8-2p-2f-coop": _lbf(8, 8, 2, 2, coop=True),
    "lbf-2s-10x10-3p-3f": _lbf(10, 2, 3, 3),
    "lbf-10x10-3p-3f": _lbf(10, 10, 3, 3),
    "lbf-15x15-3p-5f": _lbf(15, 15, 3, 5),
    "lbf-15x15-4p-3f": _lbf(15, 15, 4, 3),
    "lbf-15x15-4p-5f": _lbf(15, 15, 4, 5),
    "con-5x5x3a": _con(5, 3),
    "con-7x7x5a": _con(7, 5),
    "con-10x10x10a": _con(10, 10),
    "con-15x15x23a": _con(15, 23),
    "RobotWarehouse-v0": _rware(2, 4, 8),
    "LevelBasedForaging-v0": _lbf(8, 8, 2, 2, coop=True),
    "Connector-v3": _con(10, 10, time_limit=50),
}
SUCCESS_KEY = {"rware": None, "lbf": "percent_eaten", "connector": "ratio_connections"}


class EnvError(ValueError):
    """A bad --env-id / --num-agents: reported as one line before anything is compiled."""


def env_config(env_id, num_agents=None):
    """(family, generator kwargs, time limit) for env_id, resized to num_agents. Pure Python, no JAX."""
    if env_id not in ENVS:
        raise EnvError(f"unknown --env-id {env_id!r}; choose one of: {', '.join(ENVS)}")
    family, kw, time_limit = ENVS[env_id]
    kw = dict(kw)
    if num_agents is None or num_agents == kw["num_agents"]:
        return family, kw, time_limit
    if num_agents < 1:
        raise EnvError(f"--num-agents must be a positive number of agents (got {num_agents})")
    kw["num_agents"] = num_agents
    if (
        family == "rware"
    ):  # agents spawn on any cell: keep >= 3 cells per agent, alternately widen and lengthen
        while ((kw["column_height"] + 1) * kw["shelf_rows"] + 2) * (
            3 * kw["shelf_columns"] + 1
        ) < 3 * num_agents:
            if kw["shelf_columns"] <= 3 * kw["shelf_rows"]:
                kw["shelf_columns"] += 2  # Jumanji wants an odd number of shelf columns
            else:
                kw["shelf_rows"] += 1
    elif family == "lbf":  # crowded grids let the generator drop agents on food: >= 5 cells per entity
        full_view = kw["fov"] == kw["grid_size"]
        while kw["grid_size"] ** 2 < 5 * (num_agents + kw["num_food"]):
            kw["grid_size"] += 1
        kw["fov"] = kw["grid_size"] if full_view else kw["fov"]
    else:  # Connector silently drops agents that do not fit: keep G^2 >= 5N, the time limit scales with G^2
        grid = kw["grid_size"]
        while kw["grid_size"] ** 2 < 5 * num_agents:
            kw["grid_size"] += 1
        time_limit = time_limit * kw["grid_size"] ** 2 // grid**2
    return family, kw, time_limit


class Env(NamedTuple):
    """A Jumanji multi-agent env seen the same way for every family (all methods are pure and jittable)."""

    env: object
    family: str
    num_agents: int
    obs_dim: int
    action_dim: int
    time_limit: int

    def observe(self, observation):
        """Per-agent float observation (N, obs_dim)."""
        if self.family != "connector":
            return observation.agents_view.astype(jnp.float32)
        # Connector-v3 shares one (G, G) grid where agent i's path / position / target read 3i+1 / 3i+2 / 3i+3:
        # agent i sees six planes: its own path / position / target, then everybody else's.
        grid = observation.grid  # (G, G)
        owner, kind = (grid - 1) // 3, (grid - 1) % 3
        own = owner[None] == jnp.arange(self.num_agents)[:, None, None]  # (N, G, G)
        planes = [
            (grid > 0) & (kind == k) & (own if mine else ~own) for mine in (True, False) for k in range(3)
        ]
        return jnp.stack(planes, -1).reshape(self.num_agents, -1).astype(jnp.float32)  # (N, 6 G^2)

    def reset(self, key):
        state, ts = self.env.reset(key)
        return state, self.observe(ts.observation), ts.observation.action_mask

    def step(self, state, actions):
        """-> state, obs (N, O), action mask (N, A), team reward, terminated, truncated, success figure."""
        state, ts = self.env.step(state, actions)
        # Every family ends at its time limit with step_count == time_limit: that is a truncation (bootstrap),
        # also for RWARE, which reports discount 0 there. Anything else that ends an episode is a termination.
        truncated = ts.last() & (ts.observation.step_count >= self.time_limit)
        terminated = ts.last() & ~truncated
        key = SUCCESS_KEY[self.family]
        success = ts.extras[key].astype(jnp.float32) if key else jnp.float32(jnp.nan)
        reward = jnp.sum(ts.reward)  # team reward: RWARE's is a scalar, LBF and Connector give one per agent
        return (
            state,
            self.observe(ts.observation),
            ts.observation.action_mask,
            reward,
            terminated,
            truncated,
            success,
        )


def make_env(env_id, num_agents=None):
    import jumanji  # here, not at the top: importing it starts XLA, which jax.distributed.initialize() must precede

    family, kw, time_limit = env_config(env_id, num_agents)
    if family == "rware":
        from jumanji.environments.routing.robot_warehouse.generator import RandomGenerator

        env = jumanji.environments.RobotWarehouse(generator=RandomGenerator(**kw), time_limit=time_limit)
    elif family == "lbf":
        from jumanji.environments.routing.lbf.generator import RandomGenerator

        env = jumanji.environments.LevelBasedForaging(generator=RandomGenerator(**kw), time_limit=time_limit)
    else:
        from jumanji.environments.routing.connector.generator import RandomWalkGenerator

        env = jumanji.environments.Connector(generator=RandomWalkGenerator(**kw), time_limit=time_limit)
    n, a = env.action_spec.shape[0], int(env.action_spec.num_values[0])
    obs_dim = 6 * kw["grid_size"] ** 2 if family == "connector" else env.observation_spec.agents_view.shape[1]
    return Env(env, family, n, obs_dim, a, time_limit)


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------
class MAPPOConfig(NamedTuple):
    """The network's hyperparameters, named as the Args fields (the flags) they come from."""

    hidden_dim: int


def dense(features, scale=np.sqrt(2)):
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(scale), bias_init=nn.initializers.zeros)


class MAPPONetwork(nn.Module):
    """Shared actor over (own observation, one-hot agent id) and a centralised critic over all observations."""

    action_dim: int
    cfg: MAPPOConfig

    @nn.compact
    def __call__(self, obs, action_mask):  # obs (B, N, O), action_mask (B, N, A)
        b, n, _ = obs.shape
        hidden = self.cfg.hidden_dim
        ids = jnp.broadcast_to(jnp.eye(n), (b, n, n))  # one-hot agent id: one set of weights, N roles
        x = jnp.concatenate([obs, ids], -1)  # (B, N, O + N)
        x = nn.relu(dense(hidden)(x))
        x = nn.relu(dense(hidden)(x))
        logits = dense(self.action_dim, 0.01)(x)  # (B, N, A)
        logits = jnp.where(action_mask, logits, -1e9)  # illegal actions get probability 0 (finite: no NaN)
        v = obs.reshape(b, n * obs.shape[-1])  # global state (B, N * O)
        v = nn.relu(dense(hidden)(v))
        v = nn.relu(dense(hidden)(v))
        values = dense(1, 1.0)(v)[:, 0]  # (B,) one value for the team
        return logits, values


def act(network, params, obs, action_mask, key, greedy=False):
    """Every agent samples from its own masked categorical. -> actions (B, N), log-probs (B, N), values (B,)."""
    logits, values = network.apply(params, obs, action_mask)
    actions = jnp.argmax(logits, -1) if greedy else jax.random.categorical(key, logits)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], -1)[..., 0]
    return actions.astype(jnp.int32), log_probs, values


def get_value(network, params, obs, action_mask):
    return network.apply(params, obs, action_mask)[1]


def init_params(network, key, env):
    obs = jnp.zeros((1, env.num_agents, env.obs_dim))
    return network.init(key, obs, jnp.ones((1, env.num_agents, env.action_dim), bool))


def build_network(args, env):  # args: the flags, or a saved model's
    return MAPPONetwork(env.action_dim, MAPPOConfig(**{f: getattr(args, f) for f in MAPPOConfig._fields}))


NETWORK_ARGS = MAPPOConfig._fields  # the Args fields that shape the network: a saved model brings its own


# ----------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array  # (B, N, O)
    action_mask: jax.Array  # (B, N, A)
    actions: jax.Array  # (B, N)
    log_probs: jax.Array  # (B, N)
    values: jax.Array  # value of obs: (B,) for one team value, (B, N) for one per agent
    rewards: jax.Array  # (B,)
    terminated: jax.Array  # (B,)
    truncated: jax.Array  # (B,)
    final_values: jax.Array  # value of the true last observation, used where truncated (like values)


class Runner(NamedTuple):
    train_state: TrainState
    env_state: object  # Jumanji states, batched (B,)
    obs: jax.Array  # (B, N, O)
    action_mask: jax.Array  # (B, N, A)
    ep_return: jax.Array  # (B,) return of the running episode
    ep_length: jax.Array  # (B,)
    resets: jax.Array  # (B,) episodes finished by each env: rotates through the pool of start states
    key: jax.Array


def compute_gae(values, next_values, rewards, terminated, truncated, gamma, gae_lambda):
    """GAE over time (axis 0). next_values[t] is the value of the state after step t: the next obs in the
    rollout, or the true final obs where the episode was truncated. terminated cuts the bootstrap, any episode
    end cuts the recursion. values may have an agent axis after (T, B): rewards and flags then broadcast."""
    extra = (1,) * (values.ndim - rewards.ndim)
    rewards, terminated, truncated = (x.reshape(x.shape + extra) for x in (rewards, terminated, truncated))
    deltas = rewards + gamma * next_values * (1.0 - terminated) - values
    not_done = 1.0 - jnp.maximum(terminated, truncated)

    def backward(adv_next, x):
        delta, nd = x
        adv = delta + gamma * gae_lambda * nd * adv_next
        return adv, adv

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]), (deltas, not_done), reverse=True)
    return advantages, advantages + values


def make_update_step(args, env, network, tx, mesh=None):
    """The whole PPO iteration (rollout, GAE, epochs x minibatches) as one pure function of the runner state.
    With a device mesh, every minibatch is split over its devices: each computes the gradient of its share and
    XLA averages them (an all-reduce), so the replicated params stay identical on every device."""
    B, T, M = args.num_envs, args.num_steps, args.num_envs * args.num_steps // args.num_minibatches

    def split(x, spec):  # pin an axis to the mesh's "data" axis (nothing to do on one device)
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def env_step(carry, _):
        runner, pool = carry
        obs_t, mask_t = runner.obs, runner.action_mask
        key, act_key = jax.random.split(runner.key)
        params = runner.train_state.params
        actions, log_probs, values = act(network, params, runner.obs, runner.action_mask, act_key)
        state, obs, mask, reward, term, trunc, success = jax.vmap(env.step)(runner.env_state, actions)
        final_values = get_value(network, params, obs, mask)  # bootstraps truncated episodes
        # Auto-reset from a pool of fresh start states made once per rollout: Jumanji's AutoResetWrapper would
        # compute a reset for every env on every step under vmap, which costs more than the step itself.
        done = term | trunc
        pick = (jnp.arange(B) + runner.resets) % B
        fresh = jax.tree.map(lambda x: x[pick], pool)

        def where_done(new, old):
            return jnp.where(done.reshape((B,) + (1,) * (old.ndim - 1)), new, old)

        state, obs, mask = jax.tree.map(where_done, fresh, (state, obs, mask))
        ep_return, ep_length = runner.ep_return + reward, runner.ep_length + 1
        episode = dict(done=done, ret=ep_return, length=ep_length, success=success)
        runner = runner._replace(
            env_state=state,
            obs=obs,
            action_mask=mask,
            ep_return=jnp.where(done, 0.0, ep_return),
            ep_length=jnp.where(done, 0, ep_length),
            resets=runner.resets + done,
            key=key,
        )
        f32 = jnp.float32
        transition = Transition(
            obs_t,
            mask_t,
            actions,
            log_probs,
            values,
            reward,
            term.astype(f32),
            trunc.astype(f32),
            final_values,
        )
        return (runner, pool), (transition, episode)

    def loss_fn(params, batch, advantages, returns):
        logits, values = network.apply(params, batch.obs, batch.action_mask)
        log_probs = jax.nn.log_softmax(logits)  # (M, N, A)
        new_log_probs = jnp.take_along_axis(log_probs, batch.actions[..., None], -1)[..., 0]  # (M, N)
        log_ratio = new_log_probs - batch.log_probs
        ratio = jnp.exp(log_ratio)
        if args.norm_adv:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        advantages = advantages.reshape(advantages.shape + (1,) * (ratio.ndim - advantages.ndim))
        pg_loss = jnp.maximum(
            -advantages * ratio, -advantages * jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
        ).mean()
        if args.clip_vloss:
            v_clipped = batch.values + jnp.clip(values - batch.values, -args.clip_coef, args.clip_coef)
            v_loss = 0.5 * jnp.maximum((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
        else:
            v_loss = 0.5 * ((values - returns) ** 2).mean()
        entropy = -(jnp.exp(log_probs) * log_probs).sum(-1).mean()
        loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = (jnp.abs(ratio - 1) > args.clip_coef).mean()
        return loss, dict(
            policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, approx_kl=approx_kl, clipfrac=clipfrac
        )

    def update_minibatch(train_state, minibatch):
        batch, advantages, returns = minibatch
        grads, info = jax.grad(loss_fn, has_aux=True)(train_state.params, batch, advantages, returns)
        return train_state.apply_gradients(grads=grads), info

    def update_epoch(carry, _):
        train_state, data, key = carry
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, B * T)
        minibatches = jax.tree.map(
            lambda x: split(
                x.reshape((B * T,) + x.shape[2:])[perm].reshape((-1, M) + x.shape[2:]), P(None, "data")
            ),
            data,
        )  # (num_minibatches, M, ...), M split over the devices
        train_state, info = jax.lax.scan(update_minibatch, train_state, minibatches)
        return (train_state, data, key), info

    def update_step(runner):
        key, pool_key, perm_key = jax.random.split(runner.key, 3)
        pool = jax.vmap(env.reset)(jax.random.split(pool_key, B))  # fresh start states for this rollout
        pool = jax.tree.map(lambda x: split(x, P("data")), pool)  # each device resets its own envs
        (runner, _), (traj, episodes) = jax.lax.scan(env_step, (runner._replace(key=key), pool), None, T)
        params = runner.train_state.params
        last_values = get_value(network, params, runner.obs, runner.action_mask)
        next_values = jnp.concatenate([traj.values[1:], last_values[None]])
        next_values = jnp.where(
            traj.truncated.reshape(traj.truncated.shape + (1,) * (traj.values.ndim - 2)) > 0,
            traj.final_values,
            next_values,
        )
        advantages, returns = compute_gae(
            traj.values,
            next_values,
            traj.rewards,
            traj.terminated,
            traj.truncated,
            args.gamma,
            args.gae_lambda,
        )
        (train_state, _, _), info = jax.lax.scan(
            update_epoch,
            (runner.train_state, (traj, advantages, returns), perm_key),
            None,
            args.update_epochs,
        )
        done = episodes["done"]
        n_done = done.sum()

        def finished_mean(x):  # mean over the episodes that ended in this rollout (NaN if none did)
            return jnp.where(n_done > 0, (x * done).sum() / jnp.maximum(n_done, 1), jnp.nan)

        metrics = {f"losses/{k}": v.mean() for k, v in info.items()}
        metrics["charts/episodic_return"] = finished_mean(episodes["ret"])
        metrics["charts/episodic_length"] = finished_mean(episodes["length"])
        metrics["charts/success"] = finished_mean(episodes["success"])
        metrics["charts/episodes"] = n_done
        return runner._replace(train_state=train_state), metrics

    return update_step


def make_evaluate(args, env, network):
    """Greedy (or sampled) actions in args.eval_episodes fresh envs, side by side until each ends an episode."""

    def evaluate(params, key):
        reset_key, act_key = jax.random.split(key)
        state, obs, mask = jax.vmap(env.reset)(jax.random.split(reset_key, args.eval_episodes))
        zeros = jnp.zeros(args.eval_episodes)

        def step(carry, t):
            state, obs, mask, alive, ret, length, success = carry
            key_t = jax.random.fold_in(act_key, t)  # only used when sampling
            actions, _, _ = act(network, params, obs, mask, key_t, greedy=args.eval_greedy)
            state, obs, mask, reward, term, trunc, succ = jax.vmap(env.step)(state, actions)
            ret, length = ret + reward * alive, length + alive
            success = jnp.where(alive, succ, success)
            return (state, obs, mask, alive & ~(term | trunc), ret, length, success), None

        carry = (state, obs, mask, jnp.ones(args.eval_episodes, bool), zeros, zeros, zeros)
        (_, _, _, _, ret, length, success), _ = jax.lax.scan(step, carry, jnp.arange(env.time_limit))
        return {
            "eval/episodic_return": ret.mean(),
            "eval/episodic_length": length.mean(),
            "eval/success": success.mean(),
        }

    return evaluate


def make_init_runner(args, env, network, tx):
    def init_runner(key):
        key, net_key, env_key = jax.random.split(key, 3)
        train_state = TrainState.create(
            apply_fn=network.apply, params=init_params(network, net_key, env), tx=tx
        )
        state, obs, mask = jax.vmap(env.reset)(jax.random.split(env_key, args.num_envs))
        zeros = jnp.zeros(args.num_envs)
        int_zeros = zeros.astype(jnp.int32)
        return Runner(train_state, state, obs, mask, zeros, int_zeros, int_zeros, key)

    return init_runner


def make_mesh(args):
    """A 1-D mesh over --num-devices devices of every process (host); the env batch is split along "data"."""
    n = args.num_devices or jax.local_device_count()
    hosts = [[d for d in jax.devices() if d.process_index == p][:n] for p in range(jax.process_count())]
    return Mesh(np.array(sum(hosts, [])), ("data",))


def runner_shardings(mesh):
    """Runner fields (K seeds, B envs, ...) live split over the devices on B; train state and key replicated."""
    split, replicated = NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P())
    return Runner(*(replicated if f in ("train_state", "key") else split for f in Runner._fields))


def over_seeds(f):
    """f vmapped over the leading seed axis of its arguments. A single seed skips vmap: a batch axis of size 1
    doubled MAM's update time on XLA:CPU (jax 0.10.2)."""

    def run(*xs):
        if jax.tree.leaves(xs)[0].shape[0] > 1:
            return jax.vmap(f)(*xs)
        return jax.tree.map(lambda y: y[None], f(*jax.tree.map(lambda x: x[0], xs)))

    return run


def init_runners(args, env, network, tx, keys):
    """One runner per seed, stacked on a leading seed axis. The seeds are initialised one after another because
    jit(vmap(init)) of MAT's many orthogonal inits deadlocks XLA:CPU (jax 0.10.2; found with --num-seeds 2)."""
    init_runner = jax.jit(make_init_runner(args, env, network, tx))
    return jax.tree.map(lambda *x: jnp.stack(x), *[init_runner(key) for key in keys])


# ----------------------------------------------------------------------------------------------------------
# Command line, checkpoints, logging
# ----------------------------------------------------------------------------------------------------------
def fail(message):
    """Bad input: one line on stderr and exit code 2, before anything is compiled or written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    positive = ["num_envs", "num_steps", "num_minibatches", "update_epochs", "num_seeds", "eval_episodes"]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.eval_every < 0:
        fail(f"--eval-every must be 0 (only at the end) or more (got {args.eval_every})")
    if not (args.learning_rate > 0 and 0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail("--learning-rate must be > 0 and --gamma, --gae-lambda within [0, 1]")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        fail(
            f"num_envs * num_steps = {batch_size} is not divisible by --num-minibatches {args.num_minibatches}"
        )
    if args.load_model is None and args.total_timesteps < batch_size:
        fail(
            f"--total-timesteps {args.total_timesteps} is below one batch (num_envs * num_steps = {batch_size})"
        )
    try:
        env_config(args.env_id, args.num_agents)
    except EnvError as e:
        fail(str(e))
    local = jax.local_device_count()
    if not 0 <= args.num_devices <= local:
        fail(
            f"--num-devices must be within [0, {local}] (0: all {local} local devices; got {args.num_devices})"
        )
    devices = (args.num_devices or local) * jax.process_count()
    if args.num_envs % devices:
        fail(f"--num-envs {args.num_envs} is not divisible by the {devices} devices it is split over")


def read_checkpoint(path):
    """-> (saved args dict, raw params state dict) of a saved model; fails with one line if unreadable."""
    model_path = os.path.join(path, "model.msgpack") if os.path.isdir(path) else path
    args_path = os.path.join(os.path.dirname(model_path), "args.json")
    if not os.path.isfile(model_path):
        fail(f"--load-model: no such model file {model_path}")
    try:
        with open(args_path) as f:
            saved_args = json.load(f)
        with open(model_path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # any unreadable file: say which, no traceback
        fail(f"--load-model: cannot read {model_path} / {args_path}: {type(e).__name__}: {e}")
    return saved_args, state


def load_params(network, env, state):
    """Params (with their leading seed axis) from a checkpoint's state dict, checked against the network."""
    try:
        num_seeds = jax.tree.leaves(state)[0].shape[0]
        template = jax.eval_shape(
            jax.vmap(lambda k: init_params(network, k, env)),
            jax.random.split(jax.random.PRNGKey(0), num_seeds),
        )
        params = flax.serialization.from_state_dict(template, state)
        bad = [
            jax.tree_util.keystr(p)
            for p, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(template)), jax.tree.leaves(params))
            if a.shape != b.shape
        ]
    except Exception as e:
        fail(f"--load-model: the saved params do not fit this network ({type(e).__name__}: {e})")
    if bad:
        fail(f"--load-model: the saved params do not fit this network (shapes differ at {', '.join(bad)})")
    return jax.tree.map(jnp.asarray, params)


def save_checkpoint(run_dir, args, params):
    tmp = os.path.join(run_dir, "model.msgpack.tmp")
    with open(tmp, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    os.replace(tmp, os.path.join(run_dir, "model.msgpack"))  # atomic: a crash never leaves half a model
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)


class Logger:
    """metrics.csv (deterministic numbers, one row per iteration and seed), timing.csv (SPS), optional wandb."""

    COLUMNS = ["iteration", "seed", "global_step", "charts/episodic_return", "charts/episodic_length",
               "charts/success", "charts/episodes", "charts/learning_rate", "losses/value_loss", "losses/policy_loss",
               "losses/entropy", "losses/approx_kl", "losses/clipfrac", "eval/episodic_return",
               "eval/episodic_length", "eval/success"]  # fmt: skip

    def __init__(self, run_dir, args, run_name):
        self.args, self.wandb = args, None
        self.metrics = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
        self.writer = csv.DictWriter(self.metrics, self.COLUMNS)
        self.writer.writeheader()
        self.timing = open(os.path.join(run_dir, "timing.csv"), "w", newline="")
        self.timing.write("iteration,global_step,SPS,seconds\n")
        if args.track:
            import wandb

            if not os.environ.get("WANDB_MODE") and not wandb.api.api_key:
                print("wandb: no login found, logging offline (sync later with `wandb sync`)")
                os.environ["WANDB_MODE"] = "offline"
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                                    name=run_name, dir=run_dir, save_code=True)  # fmt: skip

    def log(self, iteration, global_step, metrics, sps=None, seconds=None):
        """metrics: name -> array (num_seeds,). Writes one row per seed; wandb gets the mean and each seed."""
        for k in range(self.args.num_seeds):
            row = {name: float(v[k]) for name, v in metrics.items() if name in self.COLUMNS}
            self.writer.writerow(
                {"iteration": iteration, "seed": self.args.seed + k, "global_step": global_step, **row}
            )
        self.metrics.flush()
        if sps is not None:
            self.timing.write(f"{iteration},{global_step},{sps:.1f},{seconds:.2f}\n")
            self.timing.flush()
        if self.wandb is not None:
            data = {name: float(np.nanmean(v)) for name, v in metrics.items()}
            if self.args.num_seeds > 1:
                data.update(
                    {
                        f"seed{self.args.seed + k}/{n}": float(v[k])
                        for n, v in metrics.items()
                        for k in range(len(v))
                    }
                )
            if sps is not None:
                data["charts/SPS"] = sps
            self.wandb.log(data, step=global_step)

    def close(self):
        self.metrics.close()
        self.timing.close()
        if self.wandb is not None:
            self.wandb.finish()


def fmt(values):
    """Mean of a (num_seeds,) array for the progress line; 'n/a' when no episode ended."""
    values = np.asarray(values, dtype=np.float64)
    return "n/a" if np.all(np.isnan(values)) else f"{np.nanmean(values):.3f}"


def init_distributed():
    """Multi-host: with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM, which
    JAX reads itself), join the other processes; jax.devices() then lists every host's devices."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            num, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            fail(
                "JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set too (integers)"
            )
        jax.distributed.initialize(num_processes=num, process_id=index)
    elif int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        jax.distributed.initialize()


def main(args):
    init_distributed()
    check_args(args)
    loaded = None
    if args.load_model is not None:
        saved_args, loaded = read_checkpoint(args.load_model)
        try:  # the saved model fixes the env and the network; the rest (seed, eval_episodes) comes from the flags
            args = replace(args, **{k: saved_args[k] for k in ("env_id", "num_agents", *NETWORK_ARGS)})
        except (KeyError, TypeError) as e:
            fail(f"--load-model: args.json lacks {e}")
        check_args(args)
    family, env_kwargs, _ = env_config(args.env_id, args.num_agents)
    if env_kwargs != ENVS[args.env_id][1]:
        changed = {k: v for k, v in env_kwargs.items() if ENVS[args.env_id][1][k] != v}
        print(f"{args.env_id} with {args.num_agents} agents: generator resized to {changed}")

    env = make_env(args.env_id, args.num_agents)
    network = build_network(args, env)
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    updates = num_iterations * args.update_epochs * args.num_minibatches
    lr = optax.linear_schedule(args.learning_rate, 0.0, updates) if args.anneal_lr else args.learning_rate
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(lr, eps=1e-5))
    keys = jax.vmap(jax.random.PRNGKey)(
        args.seed + jnp.arange(args.num_seeds)
    )  # seed k == a run with seed + k
    evaluate = jax.jit(over_seeds(make_evaluate(args, env, network)))

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if jax.process_count() > 1:  # every host logs the same numbers; keep their folders apart
        run_name += f"__p{jax.process_index()}"
    run_dir = os.path.join("runs", run_name)
    while os.path.exists(run_dir):
        run_dir += "_"
    os.makedirs(run_dir)
    logger = Logger(run_dir, args, run_name)
    print(
        f"run: {run_dir}  env: {args.env_id} ({env.num_agents} agents, obs {env.obs_dim}, actions {env.action_dim})"
    )

    if loaded is not None:  # evaluate a saved model (all its seeds), no training
        params = load_params(network, env, loaded)
        args = replace(args, num_seeds=jax.tree.leaves(params)[0].shape[0])
        logger.args = args
        eval_keys = jax.vmap(jax.random.PRNGKey)(args.seed + jnp.arange(args.num_seeds))
        results = jax.device_get(evaluate(params, eval_keys))
        print(
            f"eval/episodic_return={fmt(results['eval/episodic_return'])}  per seed: {results['eval/episodic_return']}"
        )
        logger.log(0, 0, results)
        logger.close()
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({k: np.asarray(v).tolist() for k, v in results.items()}, f, indent=2)
        return results

    mesh = make_mesh(args)
    shardings = runner_shardings(mesh)
    runners = jax.device_put(init_runners(args, env, network, tx, keys), shardings)
    update_step = over_seeds(make_update_step(args, env, network, tx, mesh))
    update = jax.jit(update_step, out_shardings=(shardings, NamedSharding(mesh, P())))
    t0 = time.time()
    update = update.lower(runners).compile()
    evaluate = evaluate.lower(runners.train_state.params, keys).compile()  # not inside the timed loop
    print(
        f"compiled the update step and evaluation in {time.time() - t0:.1f} s; {num_iterations} iterations of {batch_size} steps"
        f" on {mesh.size} device(s)"
    )

    start = time.time()
    for iteration in range(1, num_iterations + 1):
        runners, metrics = update(runners)
        metrics = jax.device_get(metrics)  # the one host sync per iteration: the numbers we log
        global_step = iteration * batch_size
        seconds = time.time() - start
        sps = args.num_seeds * global_step / seconds
        lr_now = lr(iteration * args.update_epochs * args.num_minibatches) if args.anneal_lr else lr
        metrics["charts/learning_rate"] = np.full(args.num_seeds, lr_now)
        line = f"iter {iteration}/{num_iterations} global_step={global_step} episodic_return={fmt(metrics['charts/episodic_return'])}"
        if args.eval_every and iteration % args.eval_every == 0 and iteration != num_iterations:
            eval_keys = jax.vmap(jax.random.PRNGKey)(
                args.seed + 1000 * iteration + jnp.arange(args.num_seeds)
            )
            metrics.update(jax.device_get(evaluate(runners.train_state.params, eval_keys)))
            line += f" eval/episodic_return={fmt(metrics['eval/episodic_return'])}"
        print(f"{line} SPS={sps:.0f}", flush=True)
        logger.log(iteration, global_step, metrics, sps, seconds)
        if args.save_model and (iteration % max(1, num_iterations // 10) == 0 or iteration == num_iterations):
            save_checkpoint(run_dir, args, runners.train_state.params)

    eval_keys = jax.vmap(jax.random.PRNGKey)(args.seed + 10**6 + jnp.arange(args.num_seeds))
    results = jax.device_get(evaluate(runners.train_state.params, eval_keys))
    logger.log(num_iterations, num_iterations * batch_size, results)
    logger.close()
    summary = {k: np.asarray(v).tolist() for k, v in results.items()}
    summary.update(global_step=num_iterations * batch_size, seconds=time.time() - start, SPS=sps)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:  # written last: marks a complete run
        json.dump(summary, f, indent=2)
    print(
        f"trained: episodic_return={fmt(metrics['charts/episodic_return'])} (sampled actions, last iteration), "
        f"eval/episodic_return={fmt(results['eval/episodic_return'])} ({'greedy' if args.eval_greedy else 'sampled'}, {args.eval_episodes} episodes per seed)"
    )
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
