"""Tests of the MAT network section: acting vs training, causality, KV cache vs recompute, masks, compile cost."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mat_ppo import Args, MultiAgentTransformer, TransformerConfig, act, act_with_logits  # noqa: E402

# Compiling dominates the run time: tests share sizes, parameters and jitted functions (all cached below).
B, N, O, A = 16, 5, 7, 4
CONFIGS = {"default": {}, "deep": dict(n_block=2, n_embd=32, n_head=4)}  # several blocks and heads


def network_config(config="default", decode="cache"):
    """The script's default flags with these overrides, as build_network reads them."""
    args = replace(Args(), decode=decode, **CONFIGS[config])
    return TransformerConfig(**{f: getattr(args, f) for f in TransformerConfig._fields})


def make_inputs(seed, b, n):
    """Random observations and action masks with some illegal actions (at least one legal per agent)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((b, n, A)) < 0.5
    mask[np.arange(b)[:, None], np.arange(n), rng.integers(0, A, (b, n))] = True
    return jnp.asarray(rng.standard_normal((b, n, O)), jnp.float32), jnp.asarray(mask)


def random_params(network, seed, obs, mask):
    """Parameters with the structure of network.init, drawn with every weight O(1).

    MAT's init (gain 0.01 on every residual branch and on the logits) makes the logits depend on the other
    agents' actions only at the ~1e-6 level: a decoding bug would hide below any tolerance. O(1) weights give
    every path an O(1) effect, so the comparisons below can fail. (numpy draws: nothing to compile.)"""
    shapes = jax.eval_shape(network.init, jax.random.key(0), obs, mask, jnp.zeros(obs.shape[:2], jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        w = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0] if leaf.ndim == 2 else 4.0)
        return jnp.asarray(w + (path[-1].key == "scale"), jnp.float32)  # LayerNorm scales around 1

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def build(config="default", decode="cache"):
    """network, params, obs (B, N, O), action mask (B, N, A); the parameters do not depend on decode."""
    network = MultiAgentTransformer(A, network_config(config, decode))
    obs, mask = make_inputs(0, B, N)
    return network, random_params(network, 1, obs, mask), obs, mask


@functools.cache
def jitted(network, greedy):  # act, returning the logits too
    return jax.jit(functools.partial(act_with_logits, network, greedy=greedy))


@functools.cache
def jitted_apply(config):  # teacher forcing, which does not depend on the decode mode
    return jax.jit(MultiAgentTransformer(A, network_config(config)).apply)


def test_init_is_mats():
    """network.init per the interface: orthogonal kernels, zero biases; gains sqrt(2) before a GELU, 0.01 on
    the residual-branch outputs (attention, MLP) and both heads' last layers, as MAT."""
    network, _, obs, mask = build()
    params = network.init(jax.random.key(0), obs, mask, jnp.zeros((B, N), jnp.int32))["params"]
    flat = {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    assert "action_embed/layers_0/bias" not in flat
    for name, x in flat.items():
        if name.endswith("bias"):
            np.testing.assert_array_equal(x, 0.0, err_msg=name)
        if name.endswith("kernel"):
            small = "attn" in name or "mlp/layers_2" in name or "policy_head/layers_3" in name
            small = small or "value_head/layers_3" in name
            gain = 0.01 if small else np.sqrt(2)
            gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T  # orthogonal: gain^2 * identity
            np.testing.assert_allclose(gram, gain**2 * np.eye(len(gram)), atol=1e-5 * gain**2, err_msg=name)


def test_bad_decode_mode_is_an_error():
    _, _, obs, mask = build()
    with pytest.raises(ValueError, match="decode"):
        network = MultiAgentTransformer(A, network_config(decode="kv"))
        network.init(jax.random.key(0), obs, mask, jnp.zeros((B, N), int))


def chosen_log_probs(logits, actions):
    return jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], axis=-1)[..., 0]


CASES = [("default", decode, greedy) for decode in ["cache", "recompute"] for greedy in [False, True]]
CASES += [("deep", decode, False) for decode in ["cache", "recompute"]]  # sampled is enough there


@pytest.mark.parametrize(
    "config, decode, greedy", CASES, ids=lambda v: {True: "greedy", False: "sampled"}.get(v, v)
)
def test_act_matches_teacher_forcing(config, decode, greedy):
    network, params, obs, mask = build(config, decode)
    assert mask.any(-1).all() and not mask.all()
    actions, log_probs, values, _ = jitted(network, greedy)(params, obs, mask, jax.random.key(7))
    assert actions.shape == (B, N) and actions.dtype == jnp.int32
    assert log_probs.shape == values.shape == (B, N)
    logits, values_tf = jitted_apply(config)(params, obs, mask, actions)
    assert logits.shape == (B, N, A)
    np.testing.assert_allclose(log_probs, chosen_log_probs(logits, actions), atol=1e-5)
    np.testing.assert_allclose(values, values_tf, atol=1e-5)
    assert np.all(np.asarray(logits)[~np.asarray(mask)] == -1e9)


def test_causality():
    _, params, obs, mask = build()
    apply = jitted_apply("default")
    actions = jax.random.randint(jax.random.key(1), (B, N), 0, A)
    logits, values = apply(params, obs, mask, actions)
    for j in range(N - 1):
        changed = actions.at[:, j].set((actions[:, j] + 1) % A)
        logits2, values2 = apply(params, obs, mask, changed)
        np.testing.assert_allclose(
            logits2[:, : j + 1], logits[:, : j + 1], atol=1e-6, err_msg=f"agent {j} leaks"
        )
        np.testing.assert_allclose(values2, values, atol=1e-6, err_msg="values must not depend on actions")
        diff = jnp.abs(logits2[:, j + 1] - logits[:, j + 1]).max(-1)  # (B,)
        assert diff.min() > 1e-3, f"agent {j + 1} ignores agent {j}'s action: {diff}"
    # the encoder is unmasked: the last agent's observation reaches agent 0's value and logits
    logits2, values2 = apply(params, obs.at[:, N - 1].set(-obs[:, N - 1]), mask, actions)
    assert jnp.abs(values2[:, 0] - values[:, 0]).min() > 1e-4
    assert jnp.abs(logits2[:, 0] - logits[:, 0]).max(-1).min() > 1e-4


@pytest.mark.parametrize("config", CONFIGS)
def test_kv_cache_matches_recompute(config):
    cached, params, obs, mask = build(config, "cache")
    recompute = build(config, "recompute")[0]
    for greedy, seed in [(False, 3), (False, 4)] + [(True, 5)] * (config == "default"):
        key = jax.random.key(seed)
        a1, lp1, v1, logits1 = jitted(cached, greedy)(params, obs, mask, key)
        a2, lp2, v2, logits2 = jitted(recompute, greedy)(params, obs, mask, key)
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_allclose(logits1, logits2, atol=1e-5)
        np.testing.assert_allclose(lp1, lp2, atol=1e-5)
        np.testing.assert_allclose(v1, v2, atol=1e-6)


@pytest.mark.parametrize("decode", ["cache", "recompute"])
def test_masks_and_greedy(decode):
    network, params, obs, mask = build(decode=decode)
    sample, argmax = jitted(network, False), jitted(network, True)
    draws = [sample(params, obs, mask, jax.random.key(s))[0] for s in range(3)]
    for actions in draws:
        assert jnp.take_along_axis(mask, actions[..., None], -1).all(), "sampled an illegal action"
    assert not (draws[0] == draws[1]).all(), "sampling ignores the key"
    # one legal action per agent: it must be the one taken
    only = jax.random.randint(jax.random.key(9), mask.shape[:2], 0, A)
    actions, log_probs, _, _ = sample(params, obs, jax.nn.one_hot(only, A, dtype=bool), jax.random.key(0))
    np.testing.assert_array_equal(actions, only)
    np.testing.assert_allclose(log_probs, 0.0, atol=1e-6)
    # greedy: independent of the key, and the argmax of the logits it acted on
    g1, _, _, logits = argmax(params, obs, mask, jax.random.key(1))
    g2 = argmax(params, obs, mask, jax.random.key(2))[0]
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(g1, jnp.argmax(logits, -1))


def test_act_returns_the_interface_outputs():
    """act -> (actions, their log-probs, values), checked against the teacher-forced pass, not against the
    function act is built on."""
    network, params, obs, mask = build()
    outputs = jax.jit(functools.partial(act, network, greedy=False))(params, obs, mask, jax.random.key(7))
    assert len(outputs) == 3
    actions, log_probs, values = outputs
    assert actions.shape == (B, N) and actions.dtype == jnp.int32
    assert jnp.take_along_axis(mask, actions[..., None], -1).all()
    logits, values_tf = jitted_apply("default")(params, obs, mask, actions)
    np.testing.assert_allclose(log_probs, chosen_log_probs(logits, actions), atol=1e-5)
    np.testing.assert_allclose(values, values_tf, atol=1e-5)


@pytest.mark.parametrize("decode", ["cache", "recompute"])
def test_act_is_a_scan_not_an_unrolled_loop(decode):
    network, params, _, _ = build("default", decode)  # parameter shapes do not depend on N
    key = jax.random.key(0)
    fn = functools.partial(act, network, greedy=False)

    def compile_seconds(n):  # a fresh shape: jax caches compilations by shape
        obs, mask = make_inputs(0, 2, n)
        t0 = time.perf_counter()
        jax.jit(fn).lower(params, obs, mask, key).compile()
        return time.perf_counter() - t0

    def n_eqns(n):  # top-level equations of the traced program: an unrolled loop would grow with n
        obs, mask = make_inputs(0, 2, n)
        return len(jax.make_jaxpr(fn)(params, obs, mask, key).jaxpr.eqns)

    assert n_eqns(4) == n_eqns(64)
    compile_seconds(3)  # warm-up: the first compile in a process pays one-off costs
    t4, t64 = compile_seconds(4), compile_seconds(64)
    print(f"\n[{decode}] act compile time: N=4 {t4:.2f} s, N=64 {t64:.2f} s")
    assert t64 < 4 * t4 + 2.0
