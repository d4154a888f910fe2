"""Tests of selective_scan.py against a float64 NumPy loop, across modes, directions, splits, jit/vmap/grad."""

import functools
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selective_scan import selective_scan, selective_scan_step

MODES = ("parallel", "sequential")


def reference(x, delta, A, B, C, D, h0=None, reverse=False):
    """The recurrence written out token by token in float64 NumPy. Returns (y (b, l, d), h_last (b, d, n))."""
    x, delta, A, B, C, D = (np.asarray(v, np.float64) for v in (x, delta, A, B, C, D))
    b, l, d = x.shape
    h = np.zeros((b, d, A.shape[1])) if h0 is None else np.asarray(h0, np.float64).copy()
    y = np.zeros((b, l, d))
    for t in reversed(range(l)) if reverse else range(l):
        for i in range(b):
            for c in range(d):
                h[i, c] = np.exp(delta[i, t, c] * A[c]) * h[i, c] + delta[i, t, c] * B[i, t] * x[i, t, c]
                y[i, t, c] = C[i, t] @ h[i, c] + D[c] * x[i, t, c]
    return y, h


def make_inputs(seed, b, l, d, n, with_h0=True):
    """Realistic float32 inputs: delta in Mamba's init range, A = -exp(randn), D around 1."""
    rng = np.random.default_rng(seed)
    inputs = {
        "x": rng.standard_normal((b, l, d)),
        "delta": np.exp(rng.uniform(np.log(1e-3), np.log(0.5), (b, l, d))),
        "A": -np.exp(rng.standard_normal((d, n))),
        "B": rng.standard_normal((b, l, n)),
        "C": rng.standard_normal((b, l, n)),
        "D": 1.0 + 0.1 * rng.standard_normal(d),
    }
    h0 = rng.standard_normal((b, d, n)) if with_h0 else None
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    return inputs, None if h0 is None else jnp.asarray(h0, jnp.float32)


@functools.cache  # one jitted function per (mode, reverse): tests with equal shapes share compilations
def scan(mode, reverse=False):
    """A jitted selective_scan returning (y, h_last) for a fixed mode and direction."""
    return jax.jit(
        lambda h0, **kw: selective_scan(**kw, h0=h0, mode=mode, reverse=reverse, return_state=True)
    )


def close(actual, expected, tol=1e-5):
    """Compare with a relative tolerance and an absolute one scaled by the size of the expected values."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max())
    )


def test_reference_and_modes_on_a_hand_computed_case():
    # decay = exp(1 * -ln 2) = 1/2, drive = B * x. Without h0: h = 2, 0.5*2 + 3*4 = 13; y = 1*2 + 0.5*2 = 3,
    # 2*13 + 0.5*4 = 28. With h0 = 4: h = 0.5*4 + 2 = 4, 0.5*4 + 12 = 14; y = 4 + 1 = 5, 2*14 + 2 = 30.
    args = {
        "x": np.array([[[2.0], [4.0]]]),
        "delta": np.ones((1, 2, 1)),
        "A": np.array([[-np.log(2.0)]]),
        "B": np.array([[[1.0], [3.0]]]),
        "C": np.array([[[1.0], [2.0]]]),
        "D": np.array([0.5]),
    }
    for h0, y_want, h_want in [(None, [3.0, 28.0], 13.0), (np.full((1, 1, 1), 4.0), [5.0, 30.0], 14.0)]:
        y, h = reference(**args, h0=h0)
        np.testing.assert_allclose(y.ravel(), y_want, rtol=1e-12)
        np.testing.assert_allclose(h.ravel(), [h_want], rtol=1e-12)
        for mode in MODES:
            y, h = scan(mode)(h0, **args)
            np.testing.assert_allclose(np.ravel(y), y_want, rtol=1e-6)
            np.testing.assert_allclose(np.ravel(h), [h_want], rtol=1e-6)
            y_only = selective_scan(**args, h0=h0, mode=mode)  # without return_state only y comes back
            np.testing.assert_allclose(np.ravel(y_only), y_want, rtol=1e-6)


@pytest.mark.parametrize(
    "b, l, d, n, with_h0",
    [(2, 1, 3, 2, False), (2, 1, 3, 2, True), (2, 7, 5, 4, False), (2, 7, 5, 4, True), (1, 257, 4, 3, True)],
)
def test_modes_match_float64_loop(b, l, d, n, with_h0):
    inputs, h0 = make_inputs(0, b, l, d, n, with_h0)
    y_ref, h_ref = reference(**inputs, h0=h0)
    for mode in MODES:
        y, h = scan(mode)(h0, **inputs)
        assert y.shape == (b, l, d) and h.shape == (b, d, n) and y.dtype == jnp.float32
        close(y, y_ref)
        close(h, h_ref)


@pytest.mark.parametrize("with_h0", [False, True])
def test_steps_reproduce_the_scan(with_h0):
    b, l, d, n = 2, 6, 5, 4
    inputs, h0 = make_inputs(1, b, l, d, n, with_h0)
    x, delta, A, B, C, D = (inputs[k] for k in ("x", "delta", "A", "B", "C", "D"))
    step = jax.jit(selective_scan_step)
    h = jnp.zeros((b, d, n)) if h0 is None else h0
    ys = []
    for t in range(l):
        h, y_t = step(h, x[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        assert y_t.shape == (b, d) and h.shape == (b, d, n)
        ys.append(y_t)
    y = jnp.stack(ys, axis=1)
    y_seq, h_seq = scan("sequential")(h0, **inputs)
    close(y, y_seq, tol=1e-6)  # the sequential mode is built from the same step
    close(h, h_seq, tol=1e-6)
    y_par, h_par = scan("parallel")(h0, **inputs)
    close(y, y_par)
    close(h, h_par)


@pytest.mark.parametrize("mode", MODES)
def test_reverse_equals_flipping(mode):
    inputs, h0 = make_inputs(2, 2, 9, 3, 4)
    y, h = scan(mode, reverse=True)(h0, **inputs)
    flipped = {k: jnp.flip(v, axis=1) if k in ("x", "delta", "B", "C") else v for k, v in inputs.items()}
    y_flip, h_flip = scan(mode)(h0, **flipped)
    close(y, jnp.flip(y_flip, axis=1), tol=1e-6)
    close(h, h_flip, tol=1e-6)
    y_ref, h_ref = reference(**inputs, h0=h0, reverse=True)
    close(y, y_ref)
    close(h, h_ref)
    assert not np.allclose(y, scan(mode)(h0, **inputs)[0], atol=1e-3)  # direction actually matters


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_initial_state_continues_a_split_sequence(mode, reverse):
    k = 4
    inputs, _ = make_inputs(3, 2, 11, 3, 4, with_h0=False)
    head = {key: v[:, :k] if v.ndim == 3 else v for key, v in inputs.items()}
    tail = {key: v[:, k:] if v.ndim == 3 else v for key, v in inputs.items()}
    run = scan(mode, reverse)
    y, h = run(None, **inputs)
    # forward: head then tail; reverse: the tail is processed first
    first, second = (tail, head) if reverse else (head, tail)
    y1, h1 = run(None, **first)
    y2, h2 = run(h1, **second)
    halves = (y2, y1) if reverse else (y1, y2)
    close(jnp.concatenate(halves, axis=1), y)
    close(h2, h)


def test_gradients_of_the_two_modes_agree():
    inputs, h0 = make_inputs(4, 2, 13, 3, 4)
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((2, 13, 3)), jnp.float32)

    def loss(args, mode):
        y, h = selective_scan(**args, mode=mode, return_state=True)
        return jnp.sum(weights * y) + jnp.sum(h**2)

    args = dict(inputs, h0=h0)
    grads = {mode: jax.jit(jax.grad(loss), static_argnums=1)(args, mode) for mode in MODES}
    for name, value in args.items():
        g_par, g_seq = grads["parallel"][name], grads["sequential"][name]
        assert g_par.shape == value.shape
        assert np.abs(g_seq).max() > 0, name
        close(g_par, g_seq, tol=1e-4)


def autodiff_loop(x, delta, A, B, C, D, h0, reverse=False):
    """The recurrence as a plain lax.scan in jnp, differentiated by jax itself: the reference for the
    sequential mode's hand-written backward pass. -> (y (b, l, d), h_last (b, d, n))."""

    def body(h, token):
        x_t, delta_t, B_t, C_t = token
        h = jnp.exp(delta_t[:, :, None] * A) * h + (delta_t * x_t)[:, :, None] * B_t[:, None, :]
        return h, (h * C_t[:, None, :]).sum(-1) + D * x_t

    tokens = tuple(jnp.swapaxes(v, 0, 1) for v in (x, delta, B, C))
    h, y = jax.lax.scan(body, h0, tokens, reverse=reverse)
    return jnp.swapaxes(y, 0, 1), h


@functools.cache
def hand_and_autodiff_grads(reverse):
    """Jitted gradients of one loss through the sequential mode and through autodiff_loop, w.r.t. all 7 inputs."""

    def loss(scan_fn, weights, *inputs):  # weights for y and for h_last: every output gets a cotangent
        y, h = scan_fn(*inputs)
        return jnp.sum(weights[0] * y) + jnp.sum(weights[1] * h)

    def sequential(x, delta, A, B, C, D, h0):
        return selective_scan(
            x, delta, A, B, C, D, h0=h0, reverse=reverse, mode="sequential", return_state=True
        )

    def loop(*inputs):
        return autodiff_loop(*inputs, reverse=reverse)

    argnums = tuple(range(1, 8))  # the 7 inputs, after weights
    return (
        jax.jit(jax.grad(functools.partial(loss, sequential), argnums)),
        jax.jit(jax.grad(functools.partial(loss, loop), argnums)),
    )


NAMES = ("x", "delta", "A", "B", "C", "D", "h0")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("b, l, d, n", [(2, 1, 3, 2), (3, 2, 1, 1), (3, 7, 5, 4), (2, 257, 4, 3)])
def test_hand_written_backward_matches_autodiff(b, l, d, n, reverse):
    inputs, h0 = make_inputs(10 + l, b, l, d, n)
    rng = np.random.default_rng(l)
    weights = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, l, d), (b, d, n)))
    args = [inputs[k] for k in NAMES[:-1]] + [h0]
    hand, auto = hand_and_autodiff_grads(reverse)
    for name, g_hand, g_auto, value in zip(NAMES, hand(weights, *args), auto(weights, *args), args):
        assert g_hand.shape == value.shape and g_hand.dtype == value.dtype, name
        assert np.abs(g_auto).max() > 0, name  # a zero gradient would compare equal to anything
        close(g_hand, g_auto, tol=2e-5)


def test_hand_written_backward_when_h_last_is_unused_and_h0_absent():
    # the usual call in MAM: y only, zero start; the cotangent of h_last is then zero
    inputs, _ = make_inputs(20, 2, 6, 3, 4, with_h0=False)
    args = [inputs[k] for k in NAMES[:-1]]
    weights = jnp.asarray(np.random.default_rng(21).standard_normal((2, 6, 3)), jnp.float32)
    h0 = jnp.zeros((2, 3, 4))
    hand = jax.grad(lambda *a: jnp.sum(weights * selective_scan(*a, mode="sequential")), tuple(range(6)))
    auto = jax.grad(lambda *a: jnp.sum(weights * autodiff_loop(*a, h0)[0]), tuple(range(6)))
    for name, g_hand, g_auto in zip(NAMES, jax.jit(hand)(*args), jax.jit(auto)(*args)):
        close(g_hand, g_auto, tol=2e-5)
        assert np.abs(g_hand).max() > 0, name


def test_hand_written_backward_under_vmap():
    # vmap of the custom_vjp over an extra leading axis == one gradient per slice
    stacked = [make_inputs(30 + i, 2, 5, 3, 4) for i in range(3)]
    batched = [jnp.stack([s[0][k] for s in stacked]) for k in NAMES[:-1]] + [
        jnp.stack([s[1] for s in stacked])
    ]
    weights = (jnp.ones((2, 5, 3)), jnp.ones((2, 3, 4)))
    hand, auto = hand_and_autodiff_grads(False)
    per_slice = jax.jit(jax.vmap(hand, in_axes=(None,) + (0,) * 7))(weights, *batched)
    for i, (inputs, h0) in enumerate(stacked):
        want = auto(weights, *[inputs[k] for k in NAMES[:-1]], h0)
        for g, g_want in zip(per_slice, want):
            close(g[i], g_want, tol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_an_extra_axis_matches_a_loop(mode):
    stacked = [make_inputs(6 + i, 2, 5, 3, 4) for i in range(3)]
    batched = {k: jnp.stack([s[0][k] for s in stacked]) for k in stacked[0][0]}
    h0s = jnp.stack([s[1] for s in stacked])
    fn = jax.jit(jax.vmap(lambda h0, kw: selective_scan(**kw, h0=h0, mode=mode)))
    y = fn(h0s, batched)
    assert y.shape == (3, 2, 5, 3)
    for i, (inputs, h0) in enumerate(stacked):
        close(y[i], scan(mode)(h0, **inputs)[0], tol=1e-6)


def test_step_under_vmap():
    inputs, h0 = make_inputs(9, 2, 1, 3, 4)
    x, delta, A, B, C, D = (inputs[k] for k in ("x", "delta", "A", "B", "C", "D"))
    # vmap over the batch axis: inside, each call sees a batch of one
    per_row = jax.vmap(
        lambda h, x_t, dt, B_t, C_t: selective_scan_step(
            h[None], x_t[None], dt[None], A, B_t[None], C_t[None], D
        )
    )
    h, y = per_row(h0, x[:, 0], delta[:, 0], B[:, 0], C[:, 0])
    h_want, y_want = selective_scan_step(h0, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D)
    close(h[:, 0], h_want, tol=1e-6)
    close(y[:, 0], y_want, tol=1e-6)


def test_error_message_format():
    inputs, _ = make_inputs(0, 2, 4, 5, 3, with_h0=False)
    inputs["B"] = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError) as err:
        selective_scan(**inputs)
    assert str(err.value) == "selective_scan: B has shape (2, 5, 3), expected (2, 4, 3) = (b, l, n)"


SCAN_BAD = {  # argument -> wrong shape, for b, l, d, n = 2, 4, 5, 3
    "x": (2, 4),
    "delta": (2, 4, 6),
    "A": (5,),
    "B": (2, 4, 2),
    "C": (1, 4, 3),
    "D": (4,),
    "h0": (2, 5, 4),
}


@pytest.mark.parametrize("name", sorted(SCAN_BAD))
@pytest.mark.parametrize("mode", MODES)
def test_bad_shapes_name_the_argument(name, mode):
    inputs, h0 = make_inputs(0, 2, 4, 5, 3)
    args = dict(inputs, h0=h0)
    args[name] = jnp.zeros(SCAN_BAD[name])
    with pytest.raises(
        ValueError, match=rf"^selective_scan: {name} has shape {re.escape(str(SCAN_BAD[name]))}"
    ):
        selective_scan(**args, mode=mode)


STEP_BAD = {
    "h": (2, 5, 4),
    "x_t": (2, 5, 1),
    "delta_t": (2, 6),
    "A": (4, 3),
    "B_t": (2, 4),
    "C_t": (3, 3),
    "D": (1,),
}


@pytest.mark.parametrize("name", sorted(STEP_BAD))
def test_step_bad_shapes_name_the_argument(name):
    inputs, h0 = make_inputs(0, 2, 1, 5, 3)
    x, delta, A, B, C, D = (inputs[k] for k in ("x", "delta", "A", "B", "C", "D"))
    args = {"h": h0, "x_t": x[:, 0], "delta_t": delta[:, 0], "A": A, "B_t": B[:, 0], "C_t": C[:, 0], "D": D}
    args[name] = jnp.zeros(STEP_BAD[name])
    with pytest.raises(ValueError, match=rf"^selective_scan_step: {name} has shape"):
        selective_scan_step(**args)


def test_unknown_mode_and_empty_sequence_raise():
    inputs, _ = make_inputs(0, 2, 4, 5, 3, with_h0=False)
    with pytest.raises(ValueError, match="mode"):
        selective_scan(**inputs, mode="chunked")
    empty = {k: v[:, :0] if v.ndim == 3 else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match="x has shape"):
        selective_scan(**empty)
