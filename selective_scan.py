"""Selective scan: the input-dependent linear recurrence at the heart of Mamba (Gu & Dao, 2023), in pure JAX.

Channel-last shapes: x, delta (b, l, d); A (d, n); B, C (b, l, n); D (d,); state h (b, d, n). Per token t:

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * B_t) * x_t
    y_t = C_t . h_t + D * x_t                      (dot product over the n state channels)

This is the math of Mamba's `selective_scan_ref`; delta must already be positive (softplus and any bias
belong to the caller), A negative, and the z gate is applied outside. Three evaluations of the same math:

- `selective_scan(..., mode="parallel")`: `jax.lax.associative_scan` over l, O(log l) sequential depth;
- `selective_scan(..., mode="sequential")`: `jax.lax.scan` over l, one `selective_scan_step` per token;
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
        dtype = jnp.result_type(x, delta, A, B)  # lax.scan needs one carry dtype from start to end
        h0 = jnp.zeros((b, d, n), dtype) if h0 is None else h0.astype(dtype)

        def body(h, token):
            x_t, delta_t, B_t, C_t = token  # (b, d), (b, d), (b, n), (b, n)
            return selective_scan_step(h, x_t, delta_t, A, B_t, C_t, D)

        # lax.scan walks the leading axis, so move l to the front: (l, b, ...)
        tokens = tuple(jnp.swapaxes(v, 0, 1) for v in (x, delta, B, C))
        h_last, y = jax.lax.scan(body, h0, tokens)  # y: (l, b, d)
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
