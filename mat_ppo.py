"""MAT: the Multi-Agent Transformer trained with PPO, on Jumanji's multi-agent envs and SMAX.

Wen et al. 2022, "Multi-Agent Reinforcement Learning is a Sequence Modeling Problem" (arXiv 2205.14953).
An encoder (self-attention over the agents) turns the observations into one representation and one value per
agent; a decoder picks the agents' actions one after another, agent i attending to the actions of agents < i
(masked self-attention) and to the encoded observations (masked cross-attention). Training decodes all agents
at once (teacher forcing); acting decodes them one by one inside lax.scan with a KV cache (`--decode cache`)
or by re-running the whole decoder for every agent as the paper does (`--decode recompute`).
The baseline of Multi-Agent Mamba (Daniel et al. 2024, arXiv 2410.19382): `diff mat_ppo.py mam_ppo.py` shows
the network and nothing else.

    python mat_ppo.py --env-id lbf-8x8-2p-2f-coop --total-timesteps 300000
    python mat_ppo.py --help

From Python, `mat_ppo.train(mat_ppo.Args(env_id="lbf-8x8-2p-2f-coop"))` returns the run's summary (summary.json);
RunError says why a run cannot go on. Top-down: Args, the network, PPO, the Env it needs; below the fold, the
plumbing (devices and seeds, command line and saved state, the Jumanji and SMAX envs, the run folder, main).
"""

import csv
import errno
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple, Optional, Protocol

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

# Shapes in the comments: K seeds, T rollout steps (num_steps), B envs (num_envs), M minibatch size
# (T * B / num_minibatches), N agents, O observation features per agent, A actions per agent.


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
    resume: Optional[str] = None
    """a run folder (runs/{run_name}): continue that run from its last checkpoint, with its flags"""
    checkpoint_every: int = 50
    """write the whole training state to the run folder every this many iterations (0: never)"""

    # Algorithm specific arguments
    env_id: str = "rware-tiny-2ag"
    """the id of the environment (an alias from the table in README.md or a raw Jumanji id)"""
    num_agents: Optional[int] = None
    """override the environment's number of agents (the grid grows when it must; SMAX: smacv2 only, N vs N)"""
    total_timesteps: int = 1_000_000
    """total environment steps of the experiment (per seed)"""
    learning_rate: float = 5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 16
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over the run (off: constant, as in the paper's code)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 2
    """the number of mini-batches"""
    update_epochs: int = 5
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 5.0
    """the maximum norm for the gradient clipping"""
    agent_ids: bool = True
    """append a one-hot agent id to every agent's observation, as the paper's code does (not on Connector, whose
    observation already tells the agents apart)"""
    shuffle_agents: bool = True
    """permute the agents of the training batch, one random order per PPO epoch, as the paper's code does (acting
    keeps the env's order)"""
    eval_episodes: int = 32
    """number of evaluation episodes (run in parallel) at the end of training"""
    eval_greedy: bool = False
    """evaluate with greedy (argmax) actions; by default actions are sampled as in training (Mava's evaluator)"""
    eval_every: int = 0
    """also evaluate every this many iterations (0: only at the end)"""
    final_eval_episodes: int = 0
    """number of episodes of the final evaluation (0: --eval-episodes)"""
    absolute_metric: bool = False
    """keep each seed's params of its best evaluation (periodic or final) and re-evaluate them at the end with 10x
    --eval-episodes: marl-eval's absolute metric (summary.json's absolute/*)"""
    capture_video: bool = False
    """record one evaluation episode at each evaluation (runs/{run_name}/videos/iter_{k}.gif; wandb with --track)"""

    # Network
    n_block: int = 1
    """number of encoder blocks and of decoder blocks"""
    n_embd: int = 64
    """width of the token embeddings"""
    n_head: int = 1
    """number of attention heads"""
    decode: Literal["cache", "recompute"] = "cache"
    """acting: decode agent by agent with a KV cache, or re-run the whole decoder per agent (the paper's)"""


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------
# Multi-Agent Transformer (Wen et al. 2022). Shapes as at the top, and D = n_embd.
# Training decodes all agents at once (teacher forcing, causal masks); `act` decodes one agent at a time inside
# lax.scan, either with a KV cache (O(N) per agent) or by re-running the whole decoder (the paper's, O(N^2)).
class TransformerConfig(NamedTuple):
    """The network's hyperparameters, named as the Args fields (the flags) they come from. Hashable, so it can
    be a linen field shared by every block."""

    n_block: int
    n_embd: int
    n_head: int
    decode: str  # how `act` decodes: "cache" (KV cache) or "recompute" (the paper's)


def dense(features, gain, use_bias=True):
    # MAT's init: orthogonal weights, zero biases; gain sqrt(2) before a GELU, 0.01 on residual-branch outputs
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.orthogonal(gain))


# Flax's default GELU, the tanh approximation, as in Mava's MAT and the authors' MAM (the paper's code)
gelu = nn.gelu


def mlp(n_embd):  # the blocks' feed-forward: 1x width, as in MAT (not GPT's 4x)
    return nn.Sequential([dense(n_embd, np.sqrt(2)), gelu, dense(n_embd, 0.01)])


def head(n_embd, out_dim, gain):  # value / policy head, one per agent
    return nn.Sequential([dense(n_embd, np.sqrt(2)), gelu, nn.LayerNorm(), dense(out_dim, gain)])


def shifted_tokens(actions, action_dim):
    # agent i's decoder input is agent i-1's action as a one-hot over A+1 slots; slot 0 = start token (agent 0)
    prev = jnp.pad(actions[:, :-1] + 1, ((0, 0), (1, 0)))  # (B, N), 0 for agent 0
    return jax.nn.one_hot(prev, action_dim + 1)  # (B, N, A+1)


def cache_write(cache, new, i):  # cache (B, N, D), new (B, 1, D): store agent i's key or value
    return jax.lax.dynamic_update_slice_in_dim(cache, new, i, axis=1)


class Attention(nn.Module):
    cfg: TransformerConfig

    def setup(self):
        D = self.cfg.n_embd
        assert D % self.cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = [dense(D, 0.01) for _ in range(4)]

    def kv(self, x):  # (B, L, D) -> keys, values (B, L, D); split out so decoding can cache them
        return self.k_proj(x), self.v_proj(x)

    def attend(self, x_q, k, v, mask=None):  # x_q (B, Lq, D); k, v (B, Lk, D); mask (Lq, Lk), True = seen
        B, Lq, D = x_q.shape
        H = self.cfg.n_head
        q = self.q_proj(x_q).reshape(B, Lq, H, D // H)  # (B, Lq, H, hs)
        k, v = k.reshape(B, -1, H, D // H), v.reshape(B, -1, H, D // H)  # (B, Lk, H, hs)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)  # (B, H, Lq, Lk)
        if mask is not None:
            att = jnp.where(mask, att, jnp.finfo(att.dtype).min)  # softmax weight exactly 0: no leak
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v)  # (B, Lq, H, hs)
        return self.out_proj(y.reshape(B, Lq, D))  # (B, Lq, D)

    def __call__(self, x_q, x_kv, mask=None):
        return self.attend(x_q, *self.kv(x_kv), mask)


class EncodeBlock(nn.Module):
    cfg: TransformerConfig

    def setup(self):
        self.attn, self.mlp = Attention(self.cfg), mlp(self.cfg.n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(), nn.LayerNorm()

    def __call__(self, x):  # (B, N, D); unmasked: every agent sees every agent's observation
        x = self.ln1(x + self.attn(x, x))
        return self.ln2(x + self.mlp(x))


class DecodeBlock(nn.Module):
    cfg: TransformerConfig

    def setup(self):
        self.self_attn, self.cross_attn = Attention(self.cfg), Attention(self.cfg)
        self.mlp = mlp(self.cfg.n_embd)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(), nn.LayerNorm(), nn.LayerNorm()

    def __call__(self, x, rep):  # teacher forcing, all agents at once: x action stream, rep obs rep (B, N, D)
        N = x.shape[1]
        causal = jnp.tril(jnp.ones((N, N), bool))  # query i sees keys j <= i
        x = self.ln1(x + self.self_attn(x, x, causal))
        x = self.ln2(rep + self.cross_attn(rep, x, causal))  # query = obs rep, keys/values = action stream
        return self.ln3(x + self.mlp(x))

    def step(self, x, rep, i, cache):  # agent i only: x, rep (B, 1, D); cache = 4 x (B, N, D), filled for < i
        k_s, v_s, k_c, v_c = cache  # keys/values of the self-attention and of the cross-attention
        seen = jnp.arange(k_s.shape[1])[None] <= i  # (1, N): positions 0..i (i is written just below)
        k, v = self.self_attn.kv(x)
        k_s, v_s = cache_write(k_s, k, i), cache_write(v_s, v, i)
        x = self.ln1(x + self.self_attn.attend(x, k_s, v_s, seen))
        k, v = self.cross_attn.kv(x)
        k_c, v_c = cache_write(k_c, k, i), cache_write(v_c, v, i)
        x = self.ln2(rep + self.cross_attn.attend(rep, k_c, v_c, seen))
        return self.ln3(x + self.mlp(x)), (k_s, v_s, k_c, v_c)


class MultiAgentTransformer(nn.Module):
    action_dim: int
    cfg: TransformerConfig

    def setup(self):
        cfg, D = self.cfg, self.cfg.n_embd
        if cfg.decode not in ("cache", "recompute"):
            raise ValueError(f"decode must be 'cache' or 'recompute', got {cfg.decode!r}")
        self.obs_embed = nn.Sequential([nn.LayerNorm(), dense(D, np.sqrt(2)), gelu])
        self.enc_ln = nn.LayerNorm()
        self.enc_blocks = [EncodeBlock(cfg) for _ in range(cfg.n_block)]
        self.value_head = head(D, 1, gain=0.01)  # 0.01 on both heads, as MAT
        self.action_embed = nn.Sequential([dense(D, np.sqrt(2), use_bias=False), gelu])
        self.dec_ln = nn.LayerNorm()
        self.dec_blocks = [DecodeBlock(cfg) for _ in range(cfg.n_block)]
        self.policy_head = head(D, self.action_dim, gain=0.01)

    def __call__(self, obs, action_mask, actions):  # training: teacher forcing on the taken actions
        values, rep = self.encode(obs)
        return self.decode_parallel(rep, actions, action_mask), values  # (B, N, A), (B, N)

    def encode(self, obs):  # obs (B, N, O) -> values (B, N), rep (B, N, D)
        x = self.enc_ln(self.obs_embed(obs))
        for block in self.enc_blocks:
            x = block(x)
        return self.value_head(x)[..., 0], x

    def decode_parallel(self, rep, actions, action_mask):  # logits of every agent given the actions before it
        x = self.dec_ln(self.action_embed(shifted_tokens(actions, self.action_dim)))  # (B, N, D)
        for block in self.dec_blocks:
            x = block(x, rep)
        # illegal actions get -1e9, not -inf: finite keeps the entropy NaN-free
        return jnp.where(action_mask, self.policy_head(x), -1e9)  # (B, N, A)

    def decode_step(self, rep, actions, action_mask, i, cache):  # agent i's logits (B, A), updated KV cache
        def at_i(x):  # agent i's slice, kept as an axis of size 1
            return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)

        x = self.dec_ln(self.action_embed(at_i(shifted_tokens(actions, self.action_dim))))  # (B, 1, D)
        rep_i, new_cache = at_i(rep), []  # (B, 1, D)
        for block, block_cache in zip(self.dec_blocks, cache):
            x, block_cache = block.step(x, rep_i, i, block_cache)
            new_cache.append(block_cache)
        return jnp.where(at_i(action_mask), self.policy_head(x), -1e9)[:, 0], new_cache


def act_with_logits(network, params, obs, action_mask, key, greedy=False):
    """`act`, also returning the logits (B, N, A) each agent's action was drawn from."""
    values, rep = network.apply(params, obs, method="encode")  # the encoder runs once: (B, N), (B, N, D)
    B, N, D = rep.shape
    decode = network.cfg.decode

    def step(carry, xs):  # decode agent i given the actions of agents < i
        actions, cache = carry
        i, key_i = xs
        if decode == "cache":  # O(N): attend over the cached keys/values of agents <= i
            logits_i, cache = network.apply(params, rep, actions, action_mask, i, cache, method="decode_step")
        else:  # O(N^2), the paper's: rerun the teacher-forced decoder; slots >= i cannot reach agent i (causal)
            logits_i = network.apply(params, rep, actions, action_mask, method="decode_parallel")[:, i]
        action = jnp.argmax(logits_i, -1) if greedy else jax.random.categorical(key_i, logits_i)  # (B,)
        return (actions.at[:, i].set(action.astype(jnp.int32)), cache), logits_i

    # per decoder block: (k_self, v_self, k_cross, v_cross), each (B, N, D), row i written when agent i decodes
    cache = [(jnp.zeros((B, N, D)),) * 4 for _ in range(network.cfg.n_block)] if decode == "cache" else None
    carry = (jnp.zeros((B, N), jnp.int32), cache)  # actions so far (B, N): slots >= i are not read yet
    (actions, _), logits = jax.lax.scan(step, carry, (jnp.arange(N), jax.random.split(key, N)))
    logits = logits.swapaxes(0, 1)  # (N, B, A) -> (B, N, A)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], axis=-1)[..., 0]
    return actions, log_probs, values, logits


def act(network, params, obs, action_mask, key, greedy=False):
    """Auto-regressive acting: actions (B, N) int32, their log-probs (B, N) and the values (B, N)."""
    actions, log_probs, values, _ = act_with_logits(network, params, obs, action_mask, key, greedy)
    return actions, log_probs, values


def get_value(network, params, obs, action_mask):
    return network.apply(params, obs, method="encode")[0]  # (B, N): the encoder alone gives the values


def init_params(network, key, env):
    obs = jnp.zeros((1, env.num_agents, env.obs_dim))
    mask = jnp.ones((1, env.num_agents, env.action_dim), bool)
    return network.init(key, obs, mask, jnp.zeros((1, env.num_agents), jnp.int32))


def build_network(args, env):  # args: the flags, or a saved model's
    cfg = TransformerConfig(**{f: getattr(args, f) for f in TransformerConfig._fields})
    return MultiAgentTransformer(env.action_dim, cfg)


# the Args fields that shape the network: a saved model brings its own
NETWORK_ARGS = TransformerConfig._fields


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
    terminated: jax.Array  # (B,) bool
    truncated: jax.Array  # (B,) bool
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


def no_split(tree, axis):
    """The `split` of the functions below when the caller gives none: nothing is split over devices. A caller's
    split(tree, axis) places that axis of every leaf (the envs of the pool of start states, the samples of each
    minibatch) over its devices; each device then computes its share and XLA averages the gradients."""
    return tree


def make_update_step(args, env, network, split=no_split):
    """The whole PPO iteration as one pure function of the runner state (env: see Env below)."""

    def update_step(runner):
        key, pool_key, perm_key = jax.random.split(runner.key, 3)
        # 1. rollout: T steps of the B envs with the current policy
        runner, traj, metrics = rollout(args, env, network, runner._replace(key=key), pool_key, split)
        # 2. advantages: GAE, bootstrapped from the value after the last step and at truncations
        last_values = get_value(network, runner.train_state.params, runner.obs, runner.action_mask)
        advantages, returns = compute_gae(traj, last_values, args.gamma, args.gae_lambda)
        # 3. update: update_epochs x num_minibatches gradient steps on the PPO loss
        data = (traj, advantages, returns)
        train_state, info = ppo_update(args, network, runner.train_state, data, perm_key, split)
        metrics.update({f"losses/{k}": v.mean() for k, v in info.items()})
        # whether every param is still finite: the caller stops a run whose params are not
        finite = [jnp.isfinite(x).all() for x in jax.tree.leaves(train_state.params)]
        metrics["params_finite"] = jnp.stack(finite).all()
        return runner._replace(train_state=train_state), metrics

    return update_step


def rollout(args, env, network, runner, pool_key, split=no_split):
    """T steps of the B envs with the current policy. -> the runner after them, the Transitions (T, B, ...),
    and the means over the episodes that ended in the rollout (NaN if none did)."""
    B = args.num_envs
    # Auto-reset from a pool of fresh start states made once per rollout: Jumanji's AutoResetWrapper would
    # compute a reset for every env on every step under vmap, which costs more than the step itself.
    pool = split(jax.vmap(env.reset)(jax.random.split(pool_key, B)), 0)

    def env_step(runner, _):
        obs_t, mask_t = runner.obs, runner.action_mask
        key, act_key = jax.random.split(runner.key)
        params = runner.train_state.params
        actions, log_probs, values = act(network, params, obs_t, mask_t, act_key)
        state, obs, mask, reward, term, trunc, success = jax.vmap(env.step)(runner.env_state, actions)
        # the value of the true final observation: compute_gae bootstraps from it where trunc
        final_values = get_value(network, params, obs, mask)
        transition = Transition(obs_t, mask_t, actions, log_probs, values, reward, term, trunc, final_values)
        # an env whose episode ended starts over from the next unused state of the pool
        done = term | trunc
        pick = (jnp.arange(B) + runner.resets) % B
        where_done = lambda new, old: jnp.where(done.reshape((B,) + (1,) * (old.ndim - 1)), new[pick], old)
        state, obs, mask = jax.tree.map(where_done, pool, (state, obs, mask))
        ep_return, ep_length = runner.ep_return + reward, runner.ep_length + 1
        episode = dict(episodic_return=ep_return, episodic_length=ep_length, success=success)
        ep_return, ep_length = jnp.where(done, 0.0, ep_return), jnp.where(done, 0, ep_length)
        runner = Runner(runner.train_state, state, obs, mask, ep_return, ep_length, runner.resets + done, key)
        return runner, (transition, done, episode)

    runner, (traj, done, episodes) = jax.lax.scan(env_step, runner, None, args.num_steps)
    n_done = done.sum()
    finished_mean = lambda x: jnp.where(n_done > 0, (x * done).sum() / jnp.maximum(n_done, 1), jnp.nan)
    metrics = {f"charts/{name}": finished_mean(x) for name, x in episodes.items()}
    return runner, traj, {**metrics, "charts/episodes": n_done}


def compute_gae(traj, last_values, gamma, gae_lambda):
    """Advantages and returns of a rollout (T, B), or (T, B, N) with one value per agent. Step t bootstraps from
    the value of the observation after it: values[t + 1] inside the rollout, last_values after its last step,
    and final_values[t] (the true final observation's: the env has reset) where step t truncated the episode.
    A termination bootstraps nothing; any episode end stops the recursion."""
    values = traj.values
    # rewards and flags (T, B) broadcast over the agent axis of values, if there is one
    extra = (1,) * (values.ndim - traj.rewards.ndim)
    per_env = (traj.rewards, traj.terminated, traj.truncated)
    rewards, terminated, truncated = (x.reshape(x.shape + extra) for x in per_env)
    next_values = jnp.concatenate([values[1:], last_values[None]])
    next_values = jnp.where(truncated, traj.final_values, next_values)
    deltas = rewards + gamma * next_values * (1.0 - terminated) - values
    not_done = 1.0 - (terminated | truncated)

    def backward(next_advantage, step):
        delta, not_done_t = step
        advantage = delta + gamma * gae_lambda * not_done_t * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]), (deltas, not_done), reverse=True)
    return advantages, advantages + values


def ppo_update(args, network, train_state, data, key, split=no_split):
    """update_epochs passes over the rollout's data (Transitions, advantages, returns; (T, B, ...) each), each
    in num_minibatches shuffled minibatches of M. -> the new train state, the loss parts of every minibatch."""
    batch_size = args.num_envs * args.num_steps
    M = batch_size // args.num_minibatches

    def update_minibatch(train_state, minibatch):
        grads, info = jax.grad(ppo_loss, has_aux=True)(train_state.params, network, args, *minibatch)
        return train_state.apply_gradients(grads=grads), info

    def update_epoch(carry, _):
        train_state, key = carry
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, batch_size)
        shuffle = lambda x: x.reshape((batch_size,) + x.shape[2:])[perm].reshape((-1, M) + x.shape[2:])
        minibatches = jax.tree.map(shuffle, data)  # (num_minibatches, M, ...)
        if args.shuffle_agents:  # one order of the agents per epoch for every per-agent tensor (M, N, ...)
            agents = jax.random.permutation(jax.random.fold_in(perm_key, 1), data[0].obs.shape[2])
            minibatches = jax.tree.map(lambda x: x[:, :, agents] if x.ndim > 2 else x, minibatches)
        minibatches = split(minibatches, 1)
        train_state, info = jax.lax.scan(update_minibatch, train_state, minibatches)
        return (train_state, key), info

    (train_state, _), info = jax.lax.scan(update_epoch, (train_state, key), None, args.update_epochs)
    return train_state, info


def ppo_loss(params, network, args, batch, advantages, returns):
    """PPO's clipped surrogate, clipped value loss and entropy bonus on a minibatch of M transitions;
    advantages and returns (M,) or (M, N) like batch.values. -> loss, its parts for the logs."""
    # teacher forcing: every agent's logits given the actions the agents before it took
    logits, values = network.apply(params, batch.obs, batch.action_mask, batch.actions)
    log_probs = jax.nn.log_softmax(logits)  # (M, N, A)
    new_log_probs = jnp.take_along_axis(log_probs, batch.actions[..., None], -1)[..., 0]  # (M, N)
    log_ratio = new_log_probs - batch.log_probs
    ratio = jnp.exp(log_ratio)
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    # a team advantage (M,) applies to every agent's ratio (M, N)
    advantages = advantages.reshape(advantages.shape + (1,) * (ratio.ndim - advantages.ndim))
    clipped_ratio = jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = jnp.maximum(-advantages * ratio, -advantages * clipped_ratio).mean()
    if args.clip_vloss:
        v_clipped = batch.values + jnp.clip(values - batch.values, -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * jnp.maximum((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((values - returns) ** 2).mean()
    entropy = -(jnp.exp(log_probs) * log_probs).sum(-1).mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()
    clipfrac = (jnp.abs(ratio - 1) > args.clip_coef).mean()
    info = dict(
        policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, approx_kl=approx_kl, clipfrac=clipfrac
    )
    return pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss, info


def make_optimizer(args, num_iterations):
    """Adam after global-norm clipping; with --anneal-lr the learning rate falls linearly to 0 over the run.
    -> the optimizer, and a function: iteration -> the learning rate after it (for the logs)."""
    updates_per_iteration = args.update_epochs * args.num_minibatches
    # the schedule spans the run's --total-timesteps: resuming with a longer one stretches what is left of it
    updates = num_iterations * updates_per_iteration
    lr = optax.linear_schedule(args.learning_rate, 0.0, updates) if args.anneal_lr else args.learning_rate
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(lr, eps=1e-5))
    return tx, lambda iteration: lr(iteration * updates_per_iteration) if args.anneal_lr else lr


def make_evaluate(args, env, network, record=None):
    """One episode in each of args.eval_episodes fresh envs, side by side, with sampled actions (--eval-greedy:
    argmax). -> the episodes' mean metrics; and, given record (a function of the envs' batched state), its value at
    the start and after every step, stacked (time_limit + 1, ...), with each episode's length; else None."""

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
            carry = (state, obs, mask, alive & ~(term | trunc), ret, length, success)
            return carry, None if record is None else record(state)

        carry = (state, obs, mask, jnp.ones(args.eval_episodes, bool), zeros, zeros, zeros)
        (_, _, _, _, ret, length, success), recorded = jax.lax.scan(step, carry, jnp.arange(env.time_limit))
        episodes = dict(episodic_return=ret, episodic_length=length, success=success)
        metrics = {f"eval/{name}": x.mean() for name, x in episodes.items()}
        if record is None:
            return metrics, None
        first_and_rest = lambda first, rest: jnp.concatenate([first[None], rest])
        return metrics, (jax.tree.map(first_and_rest, record(state), recorded), length)

    return evaluate


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------
class Env(Protocol):
    """What PPO needs of a cooperative multi-agent env: N agents, each observing O floats and choosing one of A
    actions, some of them illegal at times; one team reward. Every method is a pure, jittable function of an
    explicit state (PPO vmaps them over its envs); the env does not reset itself: PPO resets every finished episode
    from a pool of reset states, so that the observation after the last step of an episode is its true one.
    The scripts' Jumanji (RWARE, LBF, Connector) and SMAX envs are below the fold."""

    num_agents: int  # N
    obs_dim: int  # O
    action_dim: int  # A
    time_limit: int  # the most steps of an episode: an evaluation runs this many

    def reset(self, key):
        """-> state, observations (N, O) float32, action mask (N, A) bool (True: legal; at least one per agent)."""

    def step(self, state, actions):
        """actions (N,) int32, legal -> state, observations (N, O), action mask (N, A), team reward, terminated,
        truncated, success (scalars: float32, bool, bool, float32). Terminated: the episode ended for good (PPO
        bootstraps nothing); truncated: the time limit cut it (PPO bootstraps from the value of the returned
        observation); success: the env's own figure of the episode so far (NaN if it has none)."""


# ==========================================================================================================
# Below the fold: plumbing, the same in mappo.py, mat_ppo.py and mam_ppo.py (devices and seeds, command line and
# saved state, the Jumanji and SMAX envs, the run folder, main). Nothing below is needed to understand the algorithm.
# ==========================================================================================================


# ----------------------------------------------------------------------------------------------------------
# Devices and seeds
# ----------------------------------------------------------------------------------------------------------
def make_mesh(args):
    """A 1-D mesh over --num-devices devices of every process (host); the env batch is split along "data"."""
    n = args.num_devices or jax.local_device_count()
    hosts = [[d for d in jax.devices() if d.process_index == p][:n] for p in range(jax.process_count())]
    return Mesh(np.array(sum(hosts, [])), ("data",))


def split_over(mesh):
    """The update step's `split`: data parallelism. The given axis of every leaf is split over the mesh's devices;
    each computes the gradient of its share of a minibatch and XLA averages them (an all-reduce), so the
    replicated params stay identical on every device."""

    def split(tree, axis):
        sharding = NamedSharding(mesh, P(*[None] * axis, "data"))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

    return split


def runner_shardings(mesh):
    """Runner fields (K seeds, B envs, ...) live split over the devices on B; train state and key replicated."""
    over_envs, replicated = NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P())
    return Runner(*(replicated if f in ("train_state", "key") else over_envs for f in Runner._fields))


def over_seeds(f):
    """f vmapped over the leading seed axis of its arguments. A single seed skips vmap: a batch axis of size 1
    slows XLA:CPU down."""

    def run(*xs):
        if jax.tree.leaves(xs)[0].shape[0] > 1:
            return jax.vmap(f)(*xs)
        return jax.tree.map(lambda y: y[None], f(*jax.tree.map(lambda x: x[0], xs)))

    return run


FINAL_EVAL, ABSOLUTE_EVAL = 10**6, 2 * 10**6


def seed_keys(args, offset=0):
    """One PRNG key per seed (K,): seed k of --num-seeds K draws what a run with --seed seed+k draws. Each use has
    its own offset so that no two share a key stream: 0 trains, 1000 * i is the evaluation after iteration i,
    FINAL_EVAL the final evaluation (and a loaded model's: it reproduces the final evaluation of its run),
    ABSOLUTE_EVAL the re-evaluation of the best params (--absolute-metric)."""
    return jax.vmap(jax.random.PRNGKey)(args.seed + offset + jnp.arange(args.num_seeds))


def init_runners(args, env, network, tx, keys):
    """One runner per seed, stacked on a leading seed axis. The seeds are initialised one after another because
    jit(vmap(init)) of MAT's many orthogonal inits can hang XLA:CPU."""

    @jax.jit
    def init_runner(key):
        key, net_key, env_key = jax.random.split(key, 3)
        params = init_params(network, net_key, env)
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        state, obs, mask = jax.vmap(env.reset)(jax.random.split(env_key, args.num_envs))
        zeros = jnp.zeros(args.num_envs)
        int_zeros = zeros.astype(jnp.int32)
        return Runner(train_state, state, obs, mask, zeros, int_zeros, int_zeros, key)

    return jax.tree.map(lambda *x: jnp.stack(x), *[init_runner(key) for key in keys])


def runner_shapes(args, env, network, tx, shardings):
    """The runners' shapes, dtypes and shardings, computing nothing: to compile, check memory, read a checkpoint."""
    shapes = jax.eval_shape(lambda: init_runners(args, env, network, tx, seed_keys(args)))
    place = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(lambda s, tree: jax.tree.map(lambda x: place(x, s), tree), shardings, shapes)


# ----------------------------------------------------------------------------------------------------------
# Command line and saved state
# ----------------------------------------------------------------------------------------------------------
class RunError(Exception):
    """The run cannot go on: bad input or a missing or corrupt saved state (found before anything is compiled or
    written), too little memory or disk, or a run that stopped early (diverged, interrupted), which stopped.json
    in its folder describes and --resume continues. The command line prints `line` and exits with exit_code: 2
    for bad input, 1 for a run that failed on its way, 128 + the signal's number for an interruption."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code
        # the line the command line prints: an interruption asked for is no error
        self.line = message if exit_code > 128 else f"error: {message}"


def check_args(args):
    for name in ["num_envs", "num_steps", "num_minibatches", "update_epochs", "num_seeds", "eval_episodes"]:
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ["eval_every", "checkpoint_every", "final_eval_episodes"]:
        if getattr(args, name) < 0:
            raise RunError(f"--{name.replace('_', '-')} must be 0 (off) or more (got {getattr(args, name)})")
    if args.resume is not None and (args.load_model is not None or jax.process_count() > 1):
        raise RunError(
            "--resume continues a single-process training run: not with --load-model or several processes"
        )
    if not (args.learning_rate > 0 and 0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        raise RunError("--learning-rate must be > 0 and --gamma, --gae-lambda within [0, 1]")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        raise RunError(
            f"num_envs * num_steps = {batch} is not divisible by --num-minibatches {args.num_minibatches}"
        )
    if args.load_model is None and args.total_timesteps < batch:
        raise RunError(
            f"--total-timesteps {args.total_timesteps} is below one batch (num_envs * num_steps = {batch})"
        )
    env_config(args.env_id, args.num_agents)  # a bad --env-id or --num-agents
    local = jax.local_device_count()
    if not 0 <= args.num_devices <= local:
        raise RunError(
            f"--num-devices must be within [0, {local}] (0: all local devices; got {args.num_devices})"
        )
    devices = (args.num_devices or local) * jax.process_count()
    if args.num_envs % devices:
        raise RunError(
            f"--num-envs {args.num_envs} is not divisible by the {devices} devices it is split over"
        )


# runs saved before --agent-ids and --shuffle-agents existed ran without them
PROTOCOL_OFF = dict(agent_ids=False, shuffle_agents=False)


def saved_args(run_dir):
    """The flags of the run in run_dir (its args.json), for --resume and --load-model."""
    path = os.path.join(run_dir, "args.json")
    try:
        with open(path) as f:
            return Args(**{**PROTOCOL_OFF, **json.load(f)})
    except (OSError, ValueError, TypeError) as e:
        raise RunError(f"cannot read the run's flags from {path} ({type(e).__name__}: {e})") from e


def read_state(path, flag, key):
    """A .msgpack file this script wrote (nested dicts of arrays), which holds key; one line if unreadable."""
    try:
        with open(path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        if key not in state:
            raise KeyError(key)
        return state
    except Exception as e:  # missing or unreadable: say which, no traceback
        raise RunError(f"{flag}: cannot read {path} ({type(e).__name__}: {e})") from e


def load_model(args):
    """--load-model: args with the saved run's env and network (other flags stay), the params' state dict."""
    path = args.load_model
    model_path = os.path.join(path, "model.msgpack") if os.path.isdir(path) else path
    if not os.path.isfile(model_path):
        raise RunError(f"--load-model: no such model file {model_path}")
    saved = saved_args(os.path.dirname(model_path))
    args = replace(
        args, **{k: getattr(saved, k) for k in ("env_id", "num_agents", "agent_ids", *NETWORK_ARGS)}
    )
    check_args(args)  # again: the saved env and network replaced the flags'
    return args, read_state(model_path, "--load-model", "params")


def load_params(network, env, state):
    """Params (with their leading seed axis) from a saved model's state dict, checked against the network."""
    try:
        num_seeds = jax.tree.leaves(state)[0].shape[0]
        init = jax.vmap(lambda key: init_params(network, key, env))
        template = jax.eval_shape(init, jax.random.split(jax.random.PRNGKey(0), num_seeds))
        params = flax.serialization.from_state_dict(template, state)
        pairs = zip(jax.tree_util.tree_leaves_with_path(template), jax.tree.leaves(params))
        bad = [jax.tree_util.keystr(path) for (path, want), got in pairs if want.shape != got.shape]
    except Exception as e:
        raise RunError(
            f"--load-model: the saved params do not fit this network ({type(e).__name__}: {e})"
        ) from e
    if bad:
        raise RunError(
            f"--load-model: the saved params do not fit this network (shapes differ at {', '.join(bad)})"
        )
    return jax.tree.map(jnp.asarray, params)


# the flags a resumed run may change: none of them changes what it computes (more devices change float sums)
RESUME_MAY_CHANGE = ("exp_name", "track", "wandb_project_name", "wandb_entity", "save_model", "resume",
                     "checkpoint_every", "num_devices", "total_timesteps", "capture_video")  # fmt: skip


def read_resume(args):
    """--resume RUN_DIR: the run's flags must be the saved ones, but for RESUME_MAY_CHANGE; a longer
    --total-timesteps extends the run. -> the checkpoint (iteration, seconds, the runner's leaves)."""
    saved = saved_args(args.resume)
    changed = [f for f in vars(args) if f not in RESUME_MAY_CHANGE and getattr(args, f) != getattr(saved, f)]
    given = [f"--{f.replace('_', '-')} {getattr(args, f)} (run: {getattr(saved, f)})" for f in changed]
    if changed:
        raise RunError(f"--resume: these flags would change what the run computes: {', '.join(given)}")
    checkpoint = read_state(os.path.join(args.resume, "checkpoint.msgpack"), "--resume", "iteration")
    iteration, batch = int(checkpoint["iteration"]), args.num_envs * args.num_steps
    if args.total_timesteps // batch <= iteration:
        raise RunError(f"--resume: the run has done its {iteration} iterations ({iteration * batch} steps); to "
                       f"go on, give a larger --total-timesteps")  # fmt: skip
    return checkpoint


def restore_runners(checkpoint, shapes):
    """The runners of a checkpoint, placed on the devices as shapes (runner_shapes) says."""
    leaves = [checkpoint["leaves"][str(i)] for i in range(len(checkpoint["leaves"]))]
    want = jax.tree.leaves(shapes)
    if [(x.shape, x.dtype) for x in leaves] != [(w.shape, w.dtype) for w in want]:
        raise RunError("--resume: the checkpoint's arrays do not fit the runner state of this script")
    placed = [jax.device_put(x, w.sharding) for x, w in zip(leaves, want)]
    return jax.tree.unflatten(jax.tree.structure(shapes), placed)


# ----------------------------------------------------------------------------------------------------------
# Jumanji and SMAX envs
# ----------------------------------------------------------------------------------------------------------
# alias -> (family, generator kwargs, time limit); the raw ids carry Jumanji's defaults.
def _rware(rows, agents, queue):
    kw = dict(shelf_rows=rows, shelf_columns=3, column_height=8, num_agents=agents, sensor_range=1)
    return ("rware", dict(kw, request_queue_size=queue), 500)


def _lbf(grid, fov, agents, food, coop=False):
    kw = dict(grid_size=grid, fov=fov, num_agents=agents, num_food=food, max_agent_level=2, force_coop=coop)
    return ("lbf", kw, 100)


def _connector(grid, agents, time_limit=None):
    return ("connector", dict(grid_size=grid, num_agents=agents), time_limit or grid * grid)


# SMAX (JaxMARL's SMAC / SMACv2): scenario -> (allies, enemies), as jaxmarl's map_name_to_scenario has them
# (written out here: importing jaxmarl starts XLA, and env_config must not). smacv2_* draw unit types and start
# positions at random every episode. All end after jaxmarl's default 100 steps.
SMAX_SCENARIOS = {
    "3m": (3, 3), "8m": (8, 8), "25m": (25, 25), "2s3z": (5, 5), "3s5z": (8, 8), "5m_vs_6m": (5, 6),
    "10m_vs_11m": (10, 11), "27m_vs_30m": (27, 30), "3s5z_vs_3s6z": (8, 9), "3s_vs_5z": (3, 5),
    "6h_vs_8z": (6, 8), "smacv2_5_units": (5, 5), "smacv2_10_units": (10, 10), "smacv2_20_units": (20, 20),
}  # fmt: skip


def _smax(scenario):
    allies, enemies = SMAX_SCENARIOS[scenario]
    return ("smax", dict(scenario=scenario, num_agents=allies, num_enemies=enemies), 100)


ENVS = {
    "rware-tiny-2ag": _rware(1, 2, 2), "rware-tiny-4ag": _rware(1, 4, 4), "rware-tiny-4ag-easy": _rware(1, 4, 8),
    "rware-small-4ag": _rware(2, 4, 4),
    "lbf-2s-8x8-2p-2f-coop": _lbf(8, 2, 2, 2, coop=True), "lbf-8x8-2p-2f-coop": _lbf(8, 8, 2, 2, coop=True),
    "lbf-2s-10x10-3p-3f": _lbf(10, 2, 3, 3), "lbf-10x10-3p-3f": _lbf(10, 10, 3, 3),
    "lbf-15x15-3p-5f": _lbf(15, 15, 3, 5), "lbf-15x15-4p-3f": _lbf(15, 15, 4, 3),
    "lbf-15x15-4p-5f": _lbf(15, 15, 4, 5),
    "con-5x5x3a": _connector(5, 3), "con-7x7x5a": _connector(7, 5), "con-10x10x10a": _connector(10, 10),
    "con-15x15x23a": _connector(15, 23),
    "RobotWarehouse-v0": _rware(2, 4, 8), "LevelBasedForaging-v0": _lbf(8, 8, 2, 2, coop=True),
    "Connector-v3": _connector(10, 10, time_limit=50),
    **{f"smax-{scenario}": _smax(scenario) for scenario in SMAX_SCENARIOS},
}  # fmt: skip
SUCCESS_KEY = {"rware": None, "lbf": "percent_eaten", "connector": "ratio_connections"}


def env_config(env_id, num_agents=None):
    """(family, generator kwargs, time limit) for env_id, resized to num_agents. Pure Python, no JAX."""
    if env_id not in ENVS:
        raise RunError(f"unknown --env-id {env_id!r}; choose one of: {', '.join(ENVS)}")
    family, kw, time_limit = ENVS[env_id]
    kw = dict(kw)
    if num_agents is None or num_agents == kw["num_agents"]:
        return family, kw, time_limit
    if num_agents < 1:
        raise RunError(f"--num-agents must be a positive number of agents (got {num_agents})")
    kw["num_agents"] = num_agents
    if family == "rware":
        # agents spawn on any cell: keep >= 3 cells per agent, alternately widen and lengthen
        cells = lambda: ((kw["column_height"] + 1) * kw["shelf_rows"] + 2) * (3 * kw["shelf_columns"] + 1)
        while cells() < 3 * num_agents:
            if kw["shelf_columns"] <= 3 * kw["shelf_rows"]:
                kw["shelf_columns"] += 2  # Jumanji wants an odd number of shelf columns
            else:
                kw["shelf_rows"] += 1
    elif family == "smax":  # the smacv2 scenarios draw their units at random: N of them per side
        if not kw["scenario"].startswith("smacv2"):
            raise RunError(
                f"--num-agents: {env_id} is a fixed SMAC map ({kw['num_agents']} allies vs {kw['num_enemies']} "
                "enemies); only the smax-smacv2_* scenarios take another count (N vs N)"
            )
        kw["num_enemies"] = num_agents
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


def with_agent_ids(obs, agent_ids):
    """(N, O) -> (N, O + N), the one-hot agent id last, if agent_ids; else obs as it is."""
    return jnp.concatenate([obs, jnp.eye(obs.shape[0])], -1) if agent_ids else obs


class JumanjiEnv(NamedTuple):
    """A Jumanji env (RobotWarehouse, LevelBasedForaging, Connector) as the Env above: pure and jittable."""

    env: object
    family: str  # "rware", "lbf" or "connector"
    num_agents: int
    obs_dim: int
    action_dim: int
    time_limit: int
    agent_ids: bool  # whether observe appends the one-hot agent id

    def observe(self, observation):
        """Per-agent float observation (N, obs_dim), the one-hot agent id last if agent_ids."""
        if self.family != "connector":
            return with_agent_ids(observation.agents_view.astype(jnp.float32), self.agent_ids)
        # Connector-v3 shares one (G, G) grid where agent i's path / position / target read 3i+1 / 3i+2 / 3i+3:
        # agent i sees six planes: its own path / position / target, then everybody else's.
        grid = observation.grid  # (G, G)
        owner, kind = (grid - 1) // 3, (grid - 1) % 3
        own = owner[None] == jnp.arange(self.num_agents)[:, None, None]  # (N, G, G)
        planes = [(grid > 0) & (kind == k) & whose for whose in (own, ~own) for k in range(3)]
        obs = jnp.stack(planes, -1).reshape(self.num_agents, -1).astype(jnp.float32)  # (N, 6 G^2)
        return with_agent_ids(obs, self.agent_ids)

    def reset(self, key):
        state, ts = self.env.reset(key)
        return state, self.observe(ts.observation), ts.observation.action_mask

    def step(self, state, actions):
        state, ts = self.env.step(state, actions)
        obs = ts.observation
        # Every family ends at its time limit with step_count == time_limit: that is a truncation (bootstrap),
        # also for RWARE, which reports discount 0 there. Anything else that ends an episode is a termination.
        truncated = ts.last() & (obs.step_count >= self.time_limit)
        terminated = ts.last() & ~truncated
        key = SUCCESS_KEY[self.family]
        success = ts.extras[key].astype(jnp.float32) if key else jnp.float32(jnp.nan)
        reward = jnp.sum(ts.reward)  # team reward: RWARE's is a scalar, LBF and Connector give one per agent
        return state, self.observe(obs), obs.action_mask, reward, terminated, truncated, success

    def animate(self, states, path):
        """Host side: draws an episode (a list of unbatched states) into a GIF with the env's own renderer."""
        import matplotlib

        matplotlib.use("Agg")  # off-screen
        # 10 frames per second, 300 px wide: matplotlib's time grows with the pixels
        self.env.animate(states, interval=100).save(path, writer="pillow", dpi=30)


class SmaxEnv(NamedTuple):
    """JaxMARL's SMAX as the Env above: pure and jittable. A state is (key, JaxMARL state): SMAX's step draws
    random numbers, Env.step takes no key."""

    env: object
    num_agents: int  # the allies
    obs_dim: int
    action_dim: int
    time_limit: int
    agent_ids: bool  # whether observe appends the one-hot agent id

    def observe(self, observation):
        """One vector per ally (JaxMARL's "world_state" is not used), the one-hot agent id last if agent_ids."""
        obs = jnp.stack([observation[agent] for agent in self.env.agents]).astype(jnp.float32)
        return with_agent_ids(obs, self.agent_ids)

    def mask(self, state):
        masks = self.env.get_avail_actions(state)  # ally -> (A,) uint8; dead allies may only stop
        return jnp.stack([masks[agent] for agent in self.env.agents]).astype(bool)

    def reset(self, key):
        key, reset_key = jax.random.split(key)
        obs, state = self.env.reset(reset_key)
        return (key, state), self.observe(obs), self.mask(state)

    def step(self, state, actions):
        # step_env, not JaxMARL's step: that one computes a reset on every step (PPO's pool resets instead)
        key, step_key = jax.random.split(state[0])
        actions = dict(zip(self.env.agents, actions))
        obs, state, rewards, _, _ = self.env.step_env(step_key, state[1], actions)
        alive = state.state.unit_alive  # (allies + enemies,)
        allies_dead, enemies_dead = ~alive[: self.num_agents].any(), ~alive[self.num_agents :].any()
        # one side wiped out is a termination; the time limit otherwise ends the episode (a truncation). Counted
        # here: JaxMARL's own done tests the step count before it adds the step, one step late (101 steps).
        terminated = allies_dead | enemies_dead
        truncated = (state.state.step >= self.time_limit) & ~terminated
        won = enemies_dead & ~allies_dead  # as JaxMARL's win bonus: a draw is no win
        reward = rewards[self.env.agents[0]]  # every ally gets the same team reward: count it once
        mask = self.mask(state)
        return (key, state), self.observe(obs), mask, reward, terminated, truncated, won.astype(jnp.float32)

    def animate(self, states, path):
        """Host side: draws an episode (a list of unbatched states) into a GIF with JaxMARL's drawing of a state,
        once per env step (its visualiser also re-simulates and draws the world ticks between steps, eagerly:
        far slower)."""
        import matplotlib

        matplotlib.use("Agg")  # off-screen
        import matplotlib.pyplot as plt
        from matplotlib.animation import FuncAnimation

        fig, ax = plt.subplots(figsize=(6, 5))
        plt.close(fig)
        smax = [s.state for _, s in states]
        draw = lambda t: self.env.init_render(
            ax, (None, smax[t], dict(zip(self.env.all_agents, smax[t].prev_attack_actions))), 0, t
        )
        FuncAnimation(fig, draw, frames=len(states), interval=100).save(path, writer="pillow", dpi=50)


def make_env(env_id, num_agents=None, agent_ids=False):
    """The env of env_id with num_agents agents (a JumanjiEnv or a SmaxEnv); agent_ids appends a one-hot id to
    each agent's observation, except on Connector, whose observation already tells the agents apart (Mava's
    implicit_agent_id)."""
    family, kw, time_limit = env_config(env_id, num_agents)
    agent_ids = agent_ids and family != "connector"
    # jaxmarl and jumanji here, not at the top: importing them starts XLA, which jax.distributed.initialize()
    # must precede
    if family == "smax":
        import jaxmarl
        from jaxmarl.environments.smax import Scenario, map_name_to_scenario

        n = kw["num_agents"]
        scenario = map_name_to_scenario(kw["scenario"])
        if n != scenario.num_allies:  # smacv2 N vs N, as a Mava-based make_env defines smacv2_40..1280_units
            scenario = Scenario(jnp.zeros(2 * n, jnp.uint8), n, n, True, True)
        # Mava's SMAX settings (mava/configs/env/smax.yaml): the heuristic enemy attacks the closest unit
        env = jaxmarl.make("HeuristicEnemySMAX", scenario=scenario, max_steps=time_limit, see_enemy_actions=True,
                           walls_cause_death=True, attack_mode="closest")  # fmt: skip
        obs_dim, action_dim = env.observation_spaces["ally_0"].shape[0], env.action_spaces["ally_0"].n
        return SmaxEnv(env, n, obs_dim + n * agent_ids, action_dim, time_limit, agent_ids)
    from jumanji.environments import Connector, LevelBasedForaging, RobotWarehouse
    from jumanji.environments.routing.connector.generator import RandomWalkGenerator
    from jumanji.environments.routing.lbf.generator import RandomGenerator as LBFGenerator
    from jumanji.environments.routing.robot_warehouse.generator import RandomGenerator as RWAREGenerator

    env_class, generator = {
        "rware": (RobotWarehouse, RWAREGenerator),
        "lbf": (LevelBasedForaging, LBFGenerator),
        "connector": (Connector, RandomWalkGenerator),
    }[family]
    env = env_class(generator=generator(**kw), time_limit=time_limit)
    num_agents, action_dim = env.action_spec.shape[0], int(env.action_spec.num_values[0])
    obs_dim = 6 * kw["grid_size"] ** 2 if family == "connector" else env.observation_spec.agents_view.shape[1]
    return JumanjiEnv(
        env, family, num_agents, obs_dim + num_agents * agent_ids, action_dim, time_limit, agent_ids
    )


# ----------------------------------------------------------------------------------------------------------
# The run folder: metrics, checkpoints, videos, wandb, ways to stop
# ----------------------------------------------------------------------------------------------------------
def memory_hint(args):
    """What to change when the update step does not fit in memory."""
    agents = args.num_agents or "the env default"
    return (f"lower --num-envs ({args.num_envs}), --num-steps ({args.num_steps}) or --num-agents ({agents}), "
            f"or raise --num-minibatches ({args.num_minibatches})")  # fmt: skip


def check_memory(compiled, mesh, args):
    """Fail before the first update if the compiled update step (XLA's count of its arguments, outputs and
    scratch) needs more than the host RAM available on a CPU or the free memory of an accelerator. On a CPU the
    RESOURCE_EXHAUSTED fallback is not enough: Linux grants more than is free, then its OOM killer ends a process."""
    stats, device = compiled.memory_analysis(), jax.local_devices()[0]
    if stats is None:
        return
    memory = {} if device.platform == "cpu" else device.memory_stats() or {}
    if device.platform == "cpu" and os.path.exists("/proc/meminfo"):  # Linux
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        devices, what = mesh.size // jax.process_count(), "host RAM available"  # its CPU devices share it
    elif "bytes_limit" in memory:
        free, devices = memory["bytes_limit"] - memory.get("bytes_in_use", 0), 1
        what = f"free on {device.device_kind}"
    else:
        return
    need = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    need = devices * (need + stats.temp_size_in_bytes)
    if need > free:
        raise RunError(f"out of memory: the update step needs {need / 1e9:.1f} GB, {what}: {free / 1e9:.1f} GB; "
                       f"{memory_hint(args)}")  # fmt: skip


class StopSignal:
    """SIGINT (Ctrl-C) or SIGTERM (a cluster scheduler) asks the run to stop after the current iteration; a second
    one stops it at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum:
            self.restore()
            signal.raise_signal(signum)
        self.signum, name = signum, signal.Signals(signum).name
        print(f"{name}: stopping after this iteration (again: at once)", file=sys.stderr)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.restore()


def start_wandb(args, run_name, run_dir):
    """--track: a wandb run of the same name (resumed with the run); offline when wandb has no login."""
    import wandb

    if not os.environ.get("WANDB_MODE") and not wandb.api.api_key:
        print("wandb: no login found, logging offline (sync later with `wandb sync`)")
        os.environ["WANDB_MODE"] = "offline"
    return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                      name=run_name, id=run_name, resume="allow", dir=run_dir, save_code=True)  # fmt: skip


def make_run_dir(args, resume):
    """runs/{run_name}, new; or, resuming, the run's own folder, no longer complete or stopped. -> it, run_name."""
    if resume:
        for name in ("summary.json", "stopped.json"):
            if os.path.exists(os.path.join(args.resume, name)):
                os.remove(os.path.join(args.resume, name))
        return args.resume, os.path.basename(os.path.normpath(args.resume))
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if jax.process_count() > 1:  # every host logs the same numbers; keep their folders apart
        run_name += f"__p{jax.process_index()}"
    run_dir = os.path.join("runs", run_name)
    while os.path.exists(run_dir):
        run_dir += "_"
    os.makedirs(run_dir)
    return run_dir, run_name


class Run:
    """The run's folder runs/{run_name}/: args.json, metrics.csv (deterministic numbers, one row per iteration and
    seed), timing.csv (SPS), checkpoint.msgpack, the saved model, videos/, and, last, summary.json for a complete
    run or stopped.json for one that stopped early (interrupted, diverged, out of memory or disk); with --track,
    wandb. As a context manager, it turns a full disk or memory into a stopped run, and closes its files."""

    COLUMNS = ["iteration", "seed", "global_step", "charts/episodic_return", "charts/episodic_length",
               "charts/success", "charts/episodes", "charts/learning_rate", "losses/value_loss",
               "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
               "eval/episodic_return", "eval/episodic_length", "eval/success"]  # fmt: skip

    def __init__(self, args, env, checkpoint=None):
        self.args, self.env, self.videos = args, env, []  # videos: GIFs not yet sent to wandb
        self.checkpoint_iteration = checkpoint and int(checkpoint["iteration"])  # the last one written
        self.metrics = self.timing = self.wandb = None
        try:
            self.dir, run_name = make_run_dir(args, resume=checkpoint is not None)
            write_atomic(os.path.join(self.dir, "args.json"), json.dumps(asdict(args), indent=2).encode())
            self.metrics = self.open_csv("metrics.csv", ",".join(self.COLUMNS) + "\r\n")
            self.timing = self.open_csv("timing.csv", "iteration,global_step,SPS,seconds\n")
        except OSError as e:
            self.close()
            if e.errno not in DISK_FULL:
                raise
            raise RunError(f"{disk_full(args.resume or 'runs')}: no room for the run's files") from e
        self.writer = csv.DictWriter(self.metrics, self.COLUMNS)
        self.wandb = start_wandb(args, run_name, self.dir) if args.track else None
        sizes = f"{env.num_agents} agents, obs {env.obs_dim}, actions {env.action_dim}"
        resumed = f", resumed after iteration {self.checkpoint_iteration}" if checkpoint else ""
        print(f"run: {self.dir}  env: {args.env_id} ({sizes}){resumed}")

    def open_csv(self, name, header):
        """A new file with its header; resuming, the old one cut back to the checkpoint (later rows are redone)."""
        path, lines = os.path.join(self.dir, name), [header]
        if self.checkpoint_iteration is not None:
            with open(path, newline="") as f:
                lines = f.readlines()  # the first column is the iteration; a half-written last line goes
            keep = lambda line: line.endswith("\n") and int(line.split(",")[0]) <= self.checkpoint_iteration
            lines = lines[:1] + [line for line in lines[1:] if keep(line)]
        write_atomic(path, "".join(lines).encode())
        return open(path, "a", newline="")

    def log(self, iteration, global_step, metrics, sps=None, seconds=None):
        """metrics: name -> array (num_seeds,). Writes one row per seed; wandb gets the mean and each seed."""
        for k in range(self.args.num_seeds):
            row = {name: float(v[k]) for name, v in metrics.items() if name in self.COLUMNS}
            row.update(iteration=iteration, seed=self.args.seed + k, global_step=global_step)
            self.writer.writerow(row)
        self.metrics.flush()
        if sps is not None:
            self.timing.write(f"{iteration},{global_step},{sps:.1f},{seconds:.2f}\n")
            self.timing.flush()
        if self.wandb is not None:
            data = {name: float(np.nanmean(v)) for name, v in metrics.items()}
            if self.args.num_seeds > 1:
                for name, v in metrics.items():
                    data.update({f"seed{self.args.seed + k}/{name}": float(v[k]) for k in range(len(v))})
            if sps is not None:
                data["charts/SPS"] = sps
            if self.videos:  # the GIFs drawn since the last log
                from wandb import Video

                data["videos/eval"] = [
                    Video(g, caption=os.path.basename(g), format="gif") for g in self.videos
                ]
                self.videos = []
            self.wandb.log(data, step=global_step)

    def save(self, runners, iteration, seconds, stopping, best=None):
        """The one place that writes state: --save-model's params every tenth of the run; --checkpoint-every's whole
        training state (params, optimizer state, env states, episode counters, keys, and --absolute-metric's best
        params so far), and at the end or a stop."""
        args = self.args
        num_iterations = args.total_timesteps // (args.num_envs * args.num_steps)
        last = iteration == num_iterations
        if args.save_model and (iteration % max(1, num_iterations // 10) == 0 or last):
            params = flax.serialization.to_bytes(runners.train_state.params)
            write_atomic(os.path.join(self.dir, "model.msgpack"), params)
        every = args.checkpoint_every
        if every and (iteration % every == 0 or last or stopping) and jax.process_count() == 1:
            leaves = {str(i): x for i, x in enumerate(jax.device_get(jax.tree.leaves(runners)))}
            state = dict(iteration=iteration, seconds=seconds, leaves=leaves)
            if best is not None:
                state["best"] = best
            state = flax.serialization.msgpack_serialize(state)
            write_atomic(os.path.join(self.dir, "checkpoint.msgpack"), state)
            self.checkpoint_iteration = iteration

    def close(self):
        """Closes the run's files and wandb; again: nothing. log() flushes every row, so the only lines lost here
        are those a full disk refused already (a resume drops a half-written one)."""
        for f in (self.metrics, self.timing):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def end(self, results=None, **status):
        """The one place that ends a run: summary.json with the final results, or stopped.json with status for a
        run that stopped early (stop). Closes the run's files and wandb. -> what it wrote, as a dict."""
        self.close()
        if results is not None:
            status = {**{k: np.asarray(v).tolist() for k, v in results.items()}, **status}
        write_atomic(os.path.join(self.dir, "stopped.json" if results is None else "summary.json"),
                     json.dumps(status, indent=2).encode())  # fmt: skip
        return status

    def stop(self, message, exit_code, reason):
        """Ends a run that cannot go on; --resume goes on from its last checkpoint. stopped.json says why, if the
        disk takes it (--resume does not need it). -> the RunError to raise."""
        error = RunError(message, exit_code)
        try:
            self.end(None, message=error.line, checkpoint_iteration=self.checkpoint_iteration, reason=reason)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            error = RunError(f"{message}; the disk could not take stopped.json either", exit_code)
        return error

    def kept(self):
        """What a stopped run leaves to go on from."""
        last = self.checkpoint_iteration
        return f"kept the checkpoint of iteration {last}" if last else "no checkpoint was written"

    def stop_if_diverged(self, iteration, metrics):
        """A loss or param not finite stops the run before logging or checkpointing: the last checkpoint is finite."""
        checks = {name: np.isfinite(v) for name, v in metrics.items() if name.startswith("losses/")}
        for name, ok in {**checks, "params": metrics.pop("params_finite")}.items():
            if not np.all(ok):
                seed = self.args.seed + int(np.argmin(ok))
                message = f"diverged at iteration {iteration}: {name} of seed {seed} is not finite"
                raise self.stop(f"{message}; {self.kept()}", 1, "diverged")

    def fault(self, error):
        """A full disk, or XLA out of memory while running (the fallback of check_memory; XLA:CPU says so in an
        INTERNAL error), stops the run. -> the RunError to raise, or None for any other error."""
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            message = f"{disk_full(self.dir)}; {self.kept()}"
            if self.checkpoint_iteration:
                message += f"; free some space, then resume with: python {sys.argv[0]} --resume {self.dir}"
            return self.stop(message, 1, "disk full")
        if isinstance(error, jax.errors.JaxRuntimeError):
            if "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error):
                message = f"out of memory ({str(error).splitlines()[0][:200]}); {memory_hint(self.args)}"
                return self.stop(message, 1, "out of memory")
        return None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """Leaving the run, however: a full disk or out of memory stops it (fault); its files are closed."""
        fault = None if error is None else self.fault(error)
        self.close()
        if fault is not None:
            raise fault from error


def write_atomic(path, data):
    """Write a temporary file, then rename it: a crash leaves the old file or the new one, never half of one; a
    failed write (a full disk) leaves the old one and no temporary file."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; the user's disk quota spent


def disk_full(folder):
    """-> 'the disk of {folder} is full (its mount point: its free space)'."""
    disk = os.path.realpath(folder)
    while not os.path.ismount(disk):
        disk = os.path.dirname(disk)
    return f"the disk of {folder} is full ({disk}: {shutil.disk_usage(disk).free / 1e6:.1f} MB free)"


def format_mean(values):
    """Mean of a (num_seeds,) array for the progress line; 'n/a' when no episode ended."""
    values = np.asarray(values, dtype=np.float64)
    return "n/a" if np.all(np.isnan(values)) else f"{np.nanmean(values):.3f}"


# ----------------------------------------------------------------------------------------------------------
# Main: evaluate a saved model, or train
# ----------------------------------------------------------------------------------------------------------
def init_distributed():
    """Multi-host: with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM, which
    JAX reads itself), join the other processes; jax.devices() then lists every host's devices."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            num, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise RunError("JAX_COORDINATOR_ADDRESS is set: so must JAX_NUM_PROCESSES and JAX_PROCESS_ID be "
                           "(integers)") from e  # fmt: skip
        jax.distributed.initialize(num_processes=num, process_id=index)
    elif int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        jax.distributed.initialize()


def evaluate_and_record(args, evaluate, params, run, iteration, offset=None):
    """Evaluates every seed's params with keys of its own (seed_keys): the evaluation after iteration i, or, given
    an offset, the final one (FINAL_EVAL, which a loaded model uses too, so that it repeats the final evaluation of
    its run) or the absolute metric's (ABSOLUTE_EVAL).
    --capture-video: draws seed 0's first episode (record_video) into videos/iter_{iteration}.gif with the env's
    renderer (matplotlib: slow on long episodes)."""
    keys = seed_keys(args, 1000 * iteration if offset is None else offset)
    results, video = jax.device_get(evaluate(params, keys))
    if video is not None:
        states, lengths = jax.tree.map(lambda x: np.asarray(x[0]), video)  # seed 0, on the host
        frames = [jax.tree.map(lambda x: x[t], states) for t in range(int(lengths[0]) + 1)]
        os.makedirs(os.path.join(run.dir, "videos"), exist_ok=True)
        path = os.path.join(run.dir, "videos", f"iter_{iteration}.gif")
        try:
            run.env.animate(frames, path)
            run.videos.append(path)
        except Exception as e:  # a failed drawing loses one GIF, not the run
            print(f"warning: --capture-video could not draw {path}: {type(e).__name__}: {e}", file=sys.stderr)
    return results


def record_video(args):
    """make_evaluate's record for --capture-video: the states of the first env (its episode becomes the GIF)."""
    return (lambda state: jax.tree.map(lambda x: x[0], state)) if args.capture_video else None


def jit_evaluate(args, env, network, episodes):
    """The evaluation of `episodes` episodes per seed, every seed's at once, jitted."""
    evaluate = make_evaluate(replace(args, eval_episodes=episodes), env, network, record_video(args))
    return jax.jit(over_seeds(evaluate))


def final_episodes(args):
    return args.final_eval_episodes or args.eval_episodes


def compile_steps(args, env, network, tx, mesh):
    """The update step and the evaluations (periodic, final, absolute metric) compiled from shapes, before any
    state exists (and outside the timing)."""
    shardings = runner_shardings(mesh)
    shapes = runner_shapes(args, env, network, tx, shardings)
    update_step = over_seeds(make_update_step(args, env, network, split_over(mesh)))
    update = jax.jit(update_step, out_shardings=(shardings, NamedSharding(mesh, P())))
    t0 = time.time()
    update = update.lower(shapes).compile()
    check_memory(update, mesh, args)
    episodes = {args.eval_episodes, final_episodes(args)} | (
        {10 * args.eval_episodes} if args.absolute_metric else set()
    )
    params, keys = shapes.train_state.params, seed_keys(args)
    evaluate = {
        n: jit_evaluate(args, env, network, n).lower(params, keys).compile() for n in sorted(episodes)
    }
    batch_size = args.num_envs * args.num_steps
    iterations = args.total_timesteps // batch_size
    print(f"compiled the update step and evaluation in {time.time() - t0:.1f} s; {iterations} iterations of "
          f"{batch_size} steps on {mesh.size} device(s)")  # fmt: skip
    return update, evaluate, shapes


def keep_best(best, params, returns, iteration):
    """--absolute-metric: each seed's params of its best evaluation so far (the first on a tie), on the host.
    best: None or dict(returns (K,), iterations (K,), leaves {i: (K, ...)}), the form a checkpoint keeps."""
    leaves = jax.device_get(jax.tree.leaves(params))
    if best is None:
        return dict(returns=returns, iterations=np.full(len(returns), iteration),
                    leaves={str(i): x for i, x in enumerate(leaves)})  # fmt: skip
    better = returns > best["returns"]  # (K,)
    pick = lambda new, old: np.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return dict(returns=np.where(better, returns, best["returns"]),
                iterations=np.where(better, iteration, best["iterations"]),
                leaves={str(i): pick(x, best["leaves"][str(i)]) for i, x in enumerate(leaves)})  # fmt: skip


def make_env_and_network(args):
    """The env and the network of args (saying so when --num-agents resized the env's generator)."""
    env = make_env(args.env_id, args.num_agents, args.agent_ids)
    default_kwargs, env_kwargs = ENVS[args.env_id][1], env_config(args.env_id, args.num_agents)[1]
    if env_kwargs != default_kwargs:
        changed = {k: v for k, v in env_kwargs.items() if default_kwargs[k] != v}
        print(f"{args.env_id} with {args.num_agents} agents: generator resized to {changed}")
    try:
        return env, build_network(args, env)
    except ValueError as e:  # the network refuses these flags here
        raise RunError(str(e)) from e


def train(args):
    """What the command line does, from Python: trains from scratch, or from the last checkpoint of the run folder
    args.resume (args as that run's, but for RESUME_MAY_CHANGE), then evaluates (--absolute-metric: the best
    params too); or, with args.load_model, evaluates that saved model. Writes runs/{run_name}/ under the current
    folder and prints the progress. -> the run's summary, as summary.json holds it. Raises RunError when the run
    cannot go on: bad args, a missing or corrupt saved state, too little memory or disk, divergence, a signal."""
    check_args(args)
    if args.load_model is not None:
        return evaluate_model(args)
    checkpoint = read_resume(args) if args.resume is not None else None
    env, network = make_env_and_network(args)
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    tx, learning_rate = make_optimizer(args, num_iterations)
    mesh = make_mesh(args)
    update, evaluate, shapes = compile_steps(args, env, network, tx, mesh)
    with StopSignal() as stop, Run(args, env, checkpoint) as run:
        if checkpoint is None:
            runners, seconds, best = init_runners(args, env, network, tx, seed_keys(args)), 0.0, None
            runners = jax.device_put(runners, runner_shardings(mesh))
        else:
            runners, seconds = restore_runners(checkpoint, shapes), checkpoint["seconds"]
        best = checkpoint and checkpoint.get("best")  # --absolute-metric's best params so far
        start = time.time() - seconds  # a resumed run's SPS counts the time of its earlier parts
        for iteration in range((run.checkpoint_iteration or 0) + 1, num_iterations + 1):
            runners, metrics = update(runners)
            metrics = jax.device_get(metrics)  # the one host sync per iteration
            run.stop_if_diverged(iteration, metrics)
            global_step, seconds = iteration * batch_size, time.time() - start
            sps, last = args.num_seeds * global_step / seconds, iteration == num_iterations
            signum = stop.signum  # read once: save and stop agree
            metrics["charts/learning_rate"] = np.full(args.num_seeds, learning_rate(iteration))
            line = f"iter {iteration}/{num_iterations} global_step={global_step}"
            line += f" episodic_return={format_mean(metrics['charts/episodic_return'])}"
            if args.eval_every and iteration % args.eval_every == 0 and not last:
                params = runners.train_state.params
                metrics.update(
                    evaluate_and_record(args, evaluate[args.eval_episodes], params, run, iteration)
                )
                if args.absolute_metric:
                    best = keep_best(best, params, metrics["eval/episodic_return"], iteration)
                line += f" eval/episodic_return={format_mean(metrics['eval/episodic_return'])}"
            print(f"{line} SPS={sps:.0f}", flush=True)
            run.log(iteration, global_step, metrics, sps, seconds)
            run.save(runners, iteration, seconds, signum, best)
            if signum and not last:
                how = f"resume with: python {sys.argv[0]} --resume {run.dir}" if args.checkpoint_every else ""
                message = f"interrupted after iteration {iteration}; {how or 'no checkpoint (off)'}"
                raise run.stop(message, 128 + signum, "interrupted")
        params = runners.train_state.params
        final = evaluate[final_episodes(args)]
        results = evaluate_and_record(args, final, params, run, num_iterations, FINAL_EVAL)
        if args.absolute_metric:  # the best params, evaluated anew with 10x the episodes
            best = keep_best(best, params, results["eval/episodic_return"], num_iterations)
            leaves = [jnp.asarray(best["leaves"][str(i)]) for i in range(len(best["leaves"]))]
            best_params = jax.tree.unflatten(jax.tree.structure(params), leaves)
            again = evaluate[10 * args.eval_episodes]
            absolute = evaluate_and_record(args, again, best_params, run, num_iterations, ABSOLUTE_EVAL)
            results.update({k.replace("eval/", "absolute/"): v for k, v in absolute.items()})
            results["absolute/iteration"] = best["iterations"]
        run.log(num_iterations, num_iterations * batch_size, results)
        seconds = time.time() - start
        summary = run.end(results, global_step=num_iterations * batch_size, seconds=seconds, SPS=sps)
    trained = format_mean(metrics["charts/episodic_return"])
    evaluated = format_mean(results["eval/episodic_return"])
    how = f"{'greedy' if args.eval_greedy else 'sampled'}, {final_episodes(args)} episodes per seed"
    print(f"trained: episodic_return={trained} (sampled actions, last iteration), "
          f"eval/episodic_return={evaluated} ({how})")  # fmt: skip
    if args.absolute_metric:
        print(
            f"absolute metric: episodic_return={format_mean(results['absolute/episodic_return'])} (the best "
            f"params of each seed, {10 * args.eval_episodes} episodes; iterations {results['absolute/iteration']})"
        )
    return summary


def evaluate_model(args):
    """--load-model: every seed of the saved model, evaluated with its run's final-evaluation keys; no training.
    -> the summary of the new run folder."""
    args, state = load_model(args)
    env, network = make_env_and_network(args)
    params = load_params(network, env, state)
    args = replace(args, num_seeds=jax.tree.leaves(params)[0].shape[0])
    evaluate = jit_evaluate(args, env, network, final_episodes(args))
    with Run(args, env) as run:
        results = evaluate_and_record(args, evaluate, params, run, 0, FINAL_EVAL)
        returns = results["eval/episodic_return"]
        print(f"eval/episodic_return={format_mean(returns)}  per seed: {returns}")
        run.log(0, 0, results)
        return run.end(results)


def main():
    """The command line (--help): train. A run that cannot go on ends with one line on stderr and its exit code."""
    args = tyro.cli(Args)
    try:
        if args.resume is not None:  # its saved flags become the defaults: only the flags given again differ
            args = tyro.cli(Args, default=replace(saved_args(args.resume), resume=args.resume))
        init_distributed()
        train(args)
    except RunError as e:
        print(e.line, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
