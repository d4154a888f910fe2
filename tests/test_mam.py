"""mam_ppo.py's network: recurrent acting == the parallel pass, causality, CrossMamba, the init recipe, the conv.

Small sizes, two blocks, expand 2 (d_inner != n_embd) and params perturbed away from init: at init the
logits head (orthogonal 0.01) makes every policy nearly uniform and the small initial Δ makes agents interact
only weakly, which would let wrong decoding pass. Compiling dominates the run time, so every test reuses the
parameters of one network (sub-module tests take their parameters from it) and post-processes in numpy.
"""

import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mam_ppo as mam_network
from mam_ppo import (
    BiMamba,
    DecodeBlock,
    Mamba,
    MambaConfig,
    Mixer,
    MultiAgentMamba,
    act,
    init_cache,
)

B, N, O, A = 3, 6, 7, 4
CFG = MambaConfig(n_block=2, n_embd=32, d_state=8, d_conv=4, expand=2, dt_rank=4, scan_mode="sequential")
MODES = ["sequential", "parallel"]


def to_np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def perturb(params, seed, scale=0.3):
    """Move every parameter away from its init (numpy noise: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32), params
    )


def make_batch(seed, n=N, batch=B):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((batch, n, O), np.float32)
    mask = rng.random((batch, n, A)) < 0.6
    mask[..., 0] |= ~mask.any(-1)  # at least one legal action per agent
    return obs, mask, rng.integers(0, A, (batch, n), np.int32)


def bump(arr, j, noise):
    """arr with token j (axis 1) moved by noise."""
    arr = np.array(arr)
    arr[:, j] += noise
    return arr


def chosen_log_prob(logits, actions):
    m = logits.max(-1, keepdims=True)
    log_probs = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, actions[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def setup():
    net = MultiAgentMamba(A, CFG)
    obs, mask, actions = make_batch(0)
    assert (~mask).any()
    params = to_np(jax.jit(net.init)(jax.random.PRNGKey(1), obs, mask, actions))
    # noise 0.15, not more: BiMamba feeds its forward output un-normalised into the second pass (as the
    # authors' code does), so activations grow with the square of the weights; 0.3 overflowed to inf/NaN
    return net, {"init": params, "perturbed": perturb(params, 2, scale=0.15)}, (obs, mask, actions)


@pytest.fixture(scope="module")
def fns(setup):
    """Jitted once, shared. They trace with the network's scan_mode; the sub-module tests cover both modes
    (the mode enters the network only through Mixer)."""
    net = setup[0]

    def jit(f, **kw):
        g = jax.jit(f, **kw)
        return lambda *a, **k: to_np(g(*a, **k))

    return {
        "act": jit(partial(act, net), static_argnames="greedy"),
        "apply": jit(net.apply),
        "encode": jit(partial(net.apply, method=net.encode)),
        "decode": jit(partial(net.apply, method=net.decode)),
    }


def test_act_matches_teacher_forced_pass(setup, fns):
    net, all_params, (obs, mask, _) = setup
    for which, params in all_params.items():
        for greedy in [False, True]:
            actions, log_probs, values = fns["act"](params, obs, mask, jax.random.PRNGKey(3), greedy=greedy)
            assert actions.shape == log_probs.shape == values.shape == (B, N) and actions.dtype == np.int32
            logits, values_tf = fns["apply"](params, obs, mask, actions)
            assert logits.shape == (B, N, A) and values_tf.shape == (B, N)
            np.testing.assert_array_equal(logits[~mask], -1e9)
            msg = f"{which} params, greedy={greedy}"
            np.testing.assert_allclose(
                log_probs, chosen_log_prob(logits, actions), rtol=1e-5, atol=1e-5, err_msg=msg
            )
            np.testing.assert_allclose(values, values_tf, rtol=1e-5, atol=1e-5, err_msg=msg)
            if greedy:
                np.testing.assert_array_equal(actions, logits.argmax(-1))


def test_act_samples_agent_i_with_key_i(setup, fns):
    """Agent i's action is jax.random.categorical(split(key, N)[i], its logits): each agent samples with a key of
    its own, so a change that drew every agent's noise from one key (or moved it out of the loop wrongly) fails."""
    net, params, (obs, mask, _) = setup
    key = jax.random.PRNGKey(5)
    actions, _, _ = fns["act"](params["perturbed"], obs, mask, key)
    logits, _ = fns["apply"](params["perturbed"], obs, mask, actions)
    keys = jax.random.split(key, N)
    want = [jax.random.categorical(keys[i], logits[:, i]) for i in range(N)]
    np.testing.assert_array_equal(actions, np.stack(want, 1))


def test_decode_step_logits_match_full_pass(setup, fns):
    """The recurrent decoder (conv buffers + SSM states of every block) gives the teacher-forced logits."""
    net, params, (obs, mask, actions) = setup
    params = params["perturbed"]
    logits_tf, _ = fns["apply"](params, obs, mask, actions)
    _, rep = fns["encode"](params, obs)
    tokens = np.eye(A + 1, dtype=np.float32)[
        np.concatenate([np.zeros((B, 1), np.int32), actions[:, :-1] + 1], 1)
    ]
    cache, logits_rec = init_cache(net, B), []
    for i in range(N):  # a Python loop in the test only: act itself uses lax.scan
        logits_i, cache = fns["decode"](params, tokens[:, i], rep[:, i], cache)
        logits_rec.append(logits_i)
    logits_rec = np.where(mask, np.stack(logits_rec, 1), -1e9)
    assert logits_tf[mask].std() > 0.1  # the comparison is not between near-constant logits
    np.testing.assert_allclose(logits_rec, logits_tf, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_and_encoder_bidirectional(setup, fns):
    net, params, (obs, mask, actions) = setup
    apply = partial(fns["apply"], params["perturbed"])
    logits, values = apply(obs, mask, actions)

    def legal_change(new_actions, i):  # largest change of agent i's legal logits, per env
        return np.where(mask[:, i], np.abs(apply(obs, mask, new_actions)[0][:, i] - logits[:, i]), 0).max(-1)

    for i in range(N):
        later = actions.copy()
        later[:, i:] = (later[:, i:] + 1) % A  # agents >= i act differently
        np.testing.assert_allclose(apply(obs, mask, later)[0][:, : i + 1], logits[:, : i + 1], atol=1e-6)
        if i > 0:
            previous = actions.copy()
            previous[:, i - 1] = (previous[:, i - 1] + 1) % A
            assert (legal_change(previous, i) > 1e-3).all(), i
    # agent 0's action reaches the last agent through the SSM state alone (N - 1 > d_conv - 1)
    first = actions.copy()
    first[:, 0] = (first[:, 0] + 1) % A
    assert (legal_change(first, N - 1) > 1e-5).all()
    # bi-directional encoder: the first agent's value sees the last agent's observation and vice versa
    # (a non-constant change: the obs LayerNorm would cancel adding a constant)
    noise = np.random.default_rng(1).standard_normal((B, O), np.float32)
    assert (np.abs(apply(bump(obs, N - 1, noise), mask, actions)[1][:, 0] - values[:, 0]) > 1e-4).all()
    assert (np.abs(apply(bump(obs, 0, noise), mask, actions)[1][:, -1] - values[:, -1]) > 1e-4).all()


def test_wrappers_follow_the_authors_wiring(setup):
    """BiMamba: ONE mixer, forward, then backward over the forward output, multiplied; CrossMamba: residual on
    the action stream x, C read from RMSNorm(rep); both inside LN(x + ...). The decoder block then adds MAT's
    residuals: LN1(x + Mamba(x)), LN2(rep + CrossMamba(x, rep)), LN3(x + MLP(x))."""
    p = setup[1]["perturbed"]["params"]
    enc, dec = p["enc_blocks_0"]["mamba"], p["dec_blocks_0"]
    cross = dec["cross_mamba"]

    def both(x, rep):
        norm = lambda q, v: nn.RMSNorm().apply({"params": q}, v)  # noqa: E731
        ln = lambda q, v: nn.LayerNorm().apply({"params": q}, v)  # noqa: E731
        mixer = lambda q, v, r=None: Mixer(CFG, cross=r is not None).apply({"params": q}, v, r)[0]  # noqa: E731
        fwd = mixer(enc["mixer"], norm(enc["norm"], x))
        bwd = jnp.flip(mixer(enc["mixer"], jnp.flip(fwd, 1)), 1)
        want_bi = ln(enc["ln"], x + fwd * bwd)
        want_cross = ln(
            cross["ln"], x + mixer(cross["mixer"], norm(cross["norm"], x), norm(cross["norm_rep"], rep))
        )
        got_bi = BiMamba(CFG).apply({"params": enc}, x)
        got_cross = Mamba(CFG, cross=True).apply({"params": cross}, x, rep)[0]
        h = ln(dec["ln1"], x + Mamba(CFG).apply({"params": dec["self_mamba"]}, x)[0])
        h = ln(dec["ln2"], rep + Mamba(CFG, cross=True).apply({"params": cross}, h, rep)[0])
        want_block = ln(dec["ln3"], h + mam_network.mlp(CFG.n_embd).apply({"params": dec["mlp"]}, h))
        got_block = DecodeBlock(CFG).apply({"params": dec}, x, rep)[0]
        return (got_bi, got_cross, got_block), (want_bi, want_cross, want_block)

    x, rep = np.random.default_rng(6).standard_normal((2, B, N, CFG.n_embd), np.float32)
    for got, want in zip(*to_np(jax.jit(both)(x, rep))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_cross_mamba_reads_own_encoder_token_and_past_actions(setup, mode):
    params = {"params": setup[1]["perturbed"]["params"]["dec_blocks_0"]["cross_mamba"]}
    g = jax.jit(lambda x, rep: Mamba(CFG._replace(scan_mode=mode), cross=True).apply(params, x, rep)[0])
    f = lambda x, rep: np.asarray(g(x, rep))  # noqa: E731
    x, rep, noise = np.random.default_rng(4).standard_normal((3, B, N, CFG.n_embd), np.float32)
    y = f(x, rep)
    for j in range(N):
        rep_change = np.abs(f(x, bump(rep, j, noise[:, j])) - y).max(-1)  # (B, N)
        x_change = np.abs(f(bump(x, j, noise[:, j]), rep) - y).max(-1)
        for i in range(N):  # output i reads encoder token i only, and action-stream tokens <= i
            assert (rep_change[:, i] > 1e-4).all() if j == i else (rep_change[:, i] < 1e-6).all(), (i, j)
            assert (x_change[:, i] > 1e-5).all() if j <= i else (x_change[:, i] < 1e-6).all(), (i, j)


def test_init_recipe(setup):
    net, params, _ = setup
    mixers = []

    def collect(tree):
        if "A_log" in tree:
            mixers.append(tree)
        for sub in tree.values():
            if isinstance(sub, dict):
                collect(sub)

    collect(params["init"]["params"])
    assert len(mixers) == 3 * net.cfg.n_block  # encoder BiMamba (one parameter set), decoder self and cross
    e, s, r = CFG.expand * CFG.n_embd, CFG.d_state, CFG.dt_rank
    dts = []
    for m in mixers:
        np.testing.assert_allclose(
            -np.exp(m["A_log"]), -np.broadcast_to(np.arange(1, s + 1), (e, s)), rtol=1e-6
        )
        np.testing.assert_array_equal(m["D"], np.ones(e))
        dt = np.log1p(np.exp(m["dt_proj"]["bias"]))  # softplus
        assert dt.shape == (e,) and dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
        assert dt.min() < 3e-3 and dt.max() > 3e-2  # spread over the range, not a constant
        dts.append(dt)
        w = np.abs(m["dt_proj"]["kernel"])
        assert w.shape == (r, e) and w.max() <= r**-0.5 and w.max() > 0.9 * r**-0.5
        cross = "c_proj" in m  # CrossMamba: x_proj gives (Δ, B), c_proj(rep) gives C
        assert m["x_proj"]["kernel"].shape == (e, r + (1 if cross else 2) * s)
    assert sum("c_proj" in m for m in mixers) == net.cfg.n_block
    # log-uniform in [1e-3, 1e-1]: log10(dt) has mean -2 and std 2/sqrt(12) = 0.577
    log_dt = np.log10(np.concatenate(dts))
    assert abs(log_dt.mean() + 2) < 0.15 and abs(log_dt.std() - 0.577) < 0.1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cross", [False, True])
def test_mixer_conv_is_causal_and_step_matches_full(setup, mode, cross):
    mixer = Mixer(CFG._replace(scan_mode=mode), cross=cross)
    params = {
        "params": setup[1]["perturbed"]["params"]["dec_blocks_0"]["cross_mamba" if cross else "self_mamba"][
            "mixer"
        ]
    }
    u, rep, noise = np.random.default_rng(5).standard_normal((3, B, N, CFG.n_embd), np.float32)
    g = jax.jit(lambda p, u: mixer.apply(p, u, rep)[0])
    f = lambda p, u: np.asarray(g(p, u))  # noqa: E731
    # A -> -inf makes exp(Δ A) = 0: the SSM forgets at once, so agent t sees exactly its conv window
    forgetful = {"params": {**params["params"], "A_log": np.full_like(params["params"]["A_log"], 30.0)}}
    for p, window_only in [(params, False), (forgetful, True)]:
        y = f(p, u)
        for j in range(N):
            change = np.abs(f(p, bump(u, j, noise[:, j])) - y).max(-1)  # (B, N)
            for t in range(N):
                sees_j = j <= t and (not window_only or j > t - CFG.d_conv)
                assert (change[:, t] > 1e-5).all() if sees_j else (change[:, t] < 1e-6).all(), (
                    window_only,
                    j,
                    t,
                )
    # the one-agent step with its cache (conv buffer, SSM state) reproduces the full pass
    y = f(params, u)
    step = jax.jit(lambda u_t, rep_t, s: mixer.apply(params, u_t, rep_t, s))
    e = CFG.expand * CFG.n_embd
    cache = (np.zeros((B, CFG.d_conv - 1, e), np.float32), np.zeros((B, e, CFG.d_state), np.float32))
    for t in range(N):
        y_t, cache = step(u[:, t], rep[:, t], cache)
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-5, atol=1e-5)
    assert cache[0].shape == (B, CFG.d_conv - 1, e) and cache[1].shape == (B, e, CFG.d_state)


def test_act_compile_time_does_not_grow_with_agents(setup):
    net, params, _ = setup  # no parameter depends on N

    def compile_seconds(n):
        obs, mask, _ = make_batch(8, n=n)
        start = time.perf_counter()
        jax.jit(partial(act, net)).lower(params["init"], obs, mask, jax.random.PRNGKey(9)).compile()
        return time.perf_counter() - start

    t64, t4 = compile_seconds(64), compile_seconds(4)  # any first-use cost lands on N=64: conservative
    print(
        f"\njit(act) compile, n_block={net.cfg.n_block}, scan_mode={net.cfg.scan_mode}: N=4 {t4:.2f}s, N=64 {t64:.2f}s"
    )
    assert t64 < 3.0 * t4  # a Python loop over the agents would take ~16x


def test_actions_legal_and_greedy_deterministic(setup, fns):
    net, params, (obs, mask, _) = setup
    params, mask = params["perturbed"], mask.copy()
    mask[:, 2] = np.arange(A) == 1  # agent 2 has a single legal action
    sampled = [fns["act"](params, obs, mask, jax.random.PRNGKey(k))[0] for k in range(8)]
    for actions in sampled:
        assert np.take_along_axis(mask, actions[..., None], -1).all()
        np.testing.assert_array_equal(actions[:, 2], 1)
    assert len({tuple(a.ravel()) for a in sampled}) > 1  # sampling is not secretly greedy
    g1, lp1, _ = fns["act"](params, obs, mask, jax.random.PRNGKey(0), greedy=True)
    g2, lp2, _ = fns["act"](params, obs, mask, jax.random.PRNGKey(1), greedy=True)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(lp1, lp2)
    assert np.take_along_axis(mask, g1[..., None], -1).all()
