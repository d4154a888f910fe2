"""Selective scan: the input-dependent linear recurrence at the heart of Mamba (Gu & Dao, 2023), in pure JAX.

Channel-last shapes: x, delta (b, l, d); A (d, n); B, C (b, l, n); D (d,); state h (b, d, n). Per token t:

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * B_t) * x_t
    y_t = C_t . h_t + D * x_t                      (dot product over the n state channels)

This is the math of Mamba's `selective_scan_ref`; delta must already be positive (softplus and any bias
belong to the caller), A negative, and the z gate is applied outside. Three evaluations of the same math:

- `selective_scan(..., mode="parallel")`: `jax.lax.associative_scan` over l, O(log l) sequential depth;
- `selective_scan(..., mode="sequential")`: `jax.lax.scan` over l, one token at a time, with a hand-written
  backward pass (see `_scan_bwd`);
- `selective_scan_step`: one token with a carried state, for auto-regressive decoding.

Shapes are validated while tracing (they are static), so the checks cost nothing under jit.
"""

import jax
import jax.numpy as jnp


def _fmt(items):
    """('2', 'n') -> '(2, n)'; a single item keeps Python's trailing comma: '(2,)'."""
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _expect(fn, name, arr, want, letters):
    """Raise ValueError unless arr.shape matches want, a tuple of sizes where None means any size."""
    shape, letters = arr.shape, letters.split()
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        expected = _fmt([c if w is None else str(w) for w, c in zip(want, letters)])
        if expected != _fmt(letters):  # show the sizes and what they stand for
            expected += f" = {_fmt(letters)}"
        raise ValueError(f"{fn}: {name} has shape {shape}, expected {expected}")


def _discretize(x, delta, A, B):
    """Zero-order-hold A and Euler B, as in Mamba. Works per token (b, d) or per sequence (b, l, d).

    Returns decay exp(delta * A) and input (delta * x) * B, both (..., d, n). Shared by every mode so
    that they evaluate the same expressions in the same order.
    """
    decay = jnp.exp(delta[..., None] * A)  # (..., d, n)
    drive = (delta * x)[..., None] * B[..., None, :]  # (..., d, n)
    return decay, drive


def _read_out(h, x, C, D):
    """y = C . h + D * x for h (..., d, n), x (..., d), C (..., n) -> y (..., d)."""
    return jnp.einsum("...dn,...n->...d", h, C) + D * x


def selective_scan_step(h, x_t, delta_t, A, B_t, C_t, D):
    """Advance the recurrence by one token.

    Args: h (b, d, n) state after the previous token; x_t, delta_t (b, d); A (d, n); B_t, C_t (b, n); D (d,).
    Returns: (h, y_t): the new state (b, d, n) and the output y_t (b, d).
    """
    fn = "selective_scan_step"
    h, x_t, delta_t, A, B_t, C_t, D = map(jnp.asarray, (h, x_t, delta_t, A, B_t, C_t, D))  # NumPy in -> jax
    _expect(fn, "x_t", x_t, (None, None), "b d")
    b, d = x_t.shape
    _expect(fn, "A", A, (d, None), "d n")
    n = A.shape[1]
    for name, arr, want, letters in [
        ("h", h, (b, d, n), "b d n"),
        ("delta_t", delta_t, (b, d), "b d"),
        ("B_t", B_t, (b, n), "b n"),
        ("C_t", C_t, (b, n), "b n"),
        ("D", D, (d,), "d"),
    ]:
        _expect(fn, name, arr, want, letters)
    decay, drive = _discretize(x_t, delta_t, A, B_t)  # (b, d, n) each
    h = decay * h + drive  # (b, d, n)
    return h, _read_out(h, x_t, C_t, D)


# The sequential mode runs in its own layout and with a hand-written backward pass (jax.custom_vjp), as
# Mamba's fused kernel does. Both choices were timed on XLA:CPU (jax 0.10, benchmarks/scan.py):
# - Autodiff of a lax.scan stores three (l, b, d, n) tensors (the state before each token, its decay, the state
#   after) and runs the per-token reductions as slow library fusions: its backward cost ~6.5x the forward. Here
#   the forward keeps only the state before each token; one reverse scan rebuilds each token's decay and state
#   and carries g = dL/dh. Per token t, with G = g + dy_t C_t (y_t also reads h_t):
#     dC_t = sum_d dy_t h_t      dB_t = sum_d G (delta_t x_t)      dx_t = delta_t (G . B_t) + D dy_t
#     ddelta_t = sum_n G h_{t-1} decay_t A + x_t (G . B_t)         dA = sum_{t,b} G h_{t-1} decay_t delta_t
#     dD = sum_{t,b} dy_t x_t    and g for token t-1 is G decay_t (after token 0 it is dh0).
#   Contractions that keep the batch axis are einsums (dot_general); the sums over b stay multiply + sum.
# - The state is kept as (b, n, d) inside the scan, d last, so every elementwise op and every sum over n works
#   on whole rows of d channels: 20-30% faster than (b, d, n). h0 and h_last keep the public (b, d, n).
# tests/test_selective_scan.py checks every gradient against jax's autodiff of a plain loop.
def _token(h, x_t, delta_t, A_t, B_t):
    """One token in the scan's layout: h (b, n, d), A_t = A.T (n, d) -> decay_t, h_t, both (b, n, d)."""
    decay = jnp.exp(delta_t[:, None, :] * A_t)
    return decay, decay * h + B_t[:, :, None] * (delta_t * x_t)[:, None, :]


def _scan_forward(h0, x, delta, B, C, A, D, keep_states=False):
    """Time-major x, delta (l, b, d), B, C (l, b, n); h0 (b, d, n).
    -> ((y (l, b, d), h_last (b, d, n)), the states before each token (l, b, n, d) or None)."""

    def body(h, token):
        x_t, delta_t, B_t, C_t = token  # (b, d), (b, d), (b, n), (b, n)
        _, h_t = _token(h, x_t, delta_t, A.T, B_t)
        y_t = jnp.einsum("bnd,bn->bd", h_t, C_t) + D * x_t
        return h_t, (y_t, h if keep_states else None)

    h_last, (y, h_before) = jax.lax.scan(body, jnp.swapaxes(h0, 1, 2), (x, delta, B, C))
    return (y, jnp.swapaxes(h_last, 1, 2)), h_before


@jax.custom_vjp
def _scan(h0, x, delta, B, C, A, D):
    return _scan_forward(h0, x, delta, B, C, A, D)[0]  # no gradient wanted: no states kept


def _scan_fwd(h0, x, delta, B, C, A, D):
    out, h_before = _scan_forward(h0, x, delta, B, C, A, D, keep_states=True)
    return out, (h_before, x, delta, B, C, A, D)


def _scan_bwd(residuals, cotangents):
    h_before, x, delta, B, C, A, D = residuals
    dy, dh_last = cotangents  # (l, b, d), (b, d, n)

    def body(carry, token):
        g, dA = carry  # g = dL/dh_t (b, n, d) from the tokens after t and from h_last; dA (n, d)
        h_prev, x_t, delta_t, B_t, C_t, dy_t = token
        decay, h_t = _token(h_prev, x_t, delta_t, A.T, B_t)  # the forward's numbers, recomputed
        G = g + C_t[:, :, None] * dy_t[:, None, :]  # (b, n, d)
        dC_t = jnp.einsum("bnd,bd->bn", h_t, dy_t)
        dB_t = jnp.einsum("bnd,bd->bn", G, delta_t * x_t)
        G_dot_B = jnp.einsum("bnd,bn->bd", G, B_t)
        g = G * decay  # dL/dh_{t-1}
        g_h = g * h_prev  # dL/d(delta_t A), per state channel
        ddelta_t = (g_h * A.T).sum(1) + x_t * G_dot_B
        dA = dA + (g_h * delta_t[:, None, :]).sum(0)
        return (g, dA), (delta_t * G_dot_B, ddelta_t, dB_t, dC_t)

    carry = (jnp.swapaxes(dh_last, 1, 2), jnp.zeros_like(A.T))
    (dh0, dA), (dx, ddelta, dB, dC) = jax.lax.scan(body, carry, (h_before, x, delta, B, C, dy), reverse=True)
    return jnp.swapaxes(dh0, 1, 2), dx + D * dy, ddelta, dB, dC, dA.T, (dy * x).sum((0, 1))


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(x, delta, A, B, C, D, *, h0=None, reverse=False, mode="parallel", return_state=False):
    """Run the selective scan over a whole sequence.

    Args:
      x, delta: (b, l, d) input and positive step size. A: (d, n), negative. B, C: (b, l, n). D: (d,).
      h0: optional (b, d, n) state before the first processed token; zeros if None.
      reverse: scan from token l-1 down to token 0 (same as flipping the inputs along l, scanning, and
        flipping y back); the returned state is then the one after token 0.
      mode: "parallel" (associative scan) or "sequential" (lax.scan). Same results up to float rounding.
      return_state: also return the state after the last processed token.
    Returns: y (b, l, d), or (y, h_last) with h_last (b, d, n) when return_state is True.
    """
    fn = "selective_scan"
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"{fn}: mode must be 'parallel' or 'sequential', got {mode!r}")
    x, delta, A, B, C, D = map(jnp.asarray, (x, delta, A, B, C, D))  # NumPy in -> jax (.at, scans)
    h0 = None if h0 is None else jnp.asarray(h0)
    _expect(fn, "x", x, (None, None, None), "b l d")
    b, l, d = x.shape
    if l == 0:
        raise ValueError(f"{fn}: x has shape {x.shape}, expected at least one token (l >= 1)")
    _expect(fn, "A", A, (d, None), "d n")
    n = A.shape[1]
    for name, arr, want, letters in [
        ("delta", delta, (b, l, d), "b l d"),
        ("B", B, (b, l, n), "b l n"),
        ("C", C, (b, l, n), "b l n"),
        ("D", D, (d,), "d"),
    ] + ([] if h0 is None else [("h0", h0, (b, d, n), "b d n")]):
        _expect(fn, name, arr, want, letters)

    if reverse:  # flipping in and out keeps a single forward code path per mode
        x, delta, B, C = (jnp.flip(v, axis=1) for v in (x, delta, B, C))

    if mode == "sequential":
        # one dtype for every input: lax.scan needs one carry dtype, custom_vjp cotangents match their inputs
        dtype = jnp.result_type(x, delta, A, B, C, D)
        h0 = jnp.zeros((b, d, n), dtype) if h0 is None else h0
        # lax.scan walks the leading axis, so move l to the front: (l, b, ...)
        tokens = (jnp.swapaxes(v, 0, 1).astype(dtype) for v in (x, delta, B, C))
        y, h_last = _scan(h0.astype(dtype), *tokens, A.astype(dtype), D.astype(dtype))  # y: (l, b, d)
        y = jnp.swapaxes(y, 0, 1)  # (b, l, d)
    else:
        decay, drive = _discretize(x, delta, A, B)  # (b, l, d, n) each
        if h0 is not None:  # fold h0 into token 0: its state is decay_0 * h0 + drive_0, as in the step
            drive = drive.at[:, 0].add(decay[:, 0] * h0)

        def combine(earlier, later):
            # Composing h -> a1*h + b1 then h -> a2*h + b2 gives h -> (a1*a2)*h + (a2*b1 + b2). Products
            # of decays in (0, 1] stay accurate in float32, unlike a cumulative sum of logs.
            a1, b1 = earlier
            a2, b2 = later
            return a1 * a2, a2 * b1 + b2

        _, h = jax.lax.associative_scan(combine, (decay, drive), axis=1)  # (b, l, d, n)
        y = _read_out(h, x, C, D)  # (b, l, d)
        h_last = h[:, -1]  # (b, d, n)

    if reverse:
        y = jnp.flip(y, axis=1)
    return (y, h_last) if return_state else y
