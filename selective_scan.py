"""Selective scan: the input-dependent linear recurrence at the heart of Mamba (Gu & Dao, 2023), in pure JAX.

Channel-last shapes: x, delta (b, l, d); A (d, n); B, C (b, l, n); D (d,); state h (b, d, n). Per token t:

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * B_t) * x_t
    y_t = C_t . h_t + D * x_t                      (dot product over the n state channels)

This is the math of Mamba's `selective_scan_ref`; delta must already be positive (softplus and any bias
belong to the caller), A negative, and the z gate is applied outside. Four evaluations of the same math, in
the order this file defines them:

- `selective_scan(..., mode="parallel")`: `jax.lax.associative_scan` over l, O(log l) sequential depth;
- `selective_scan(..., mode="sequential")`: `jax.lax.scan` over l, one token at a time, with a hand-written
  backward pass (`_scan_bwd`);
- `selective_scan_step`: one token with a carried state, for auto-regressive decoding;
- `selective_scan(..., mode="pallas")`: one fused Pallas kernel (Triton backend) per pass that keeps the state
  in registers, forward and hand-written backward (`_fused`); for GPUs. On a CPU it runs in Pallas'
  interpreter, slowly: that is for tests.

Shapes are validated while tracing (they are static), so the checks cost nothing under jit.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


# ----------------------------------------------------------------------------------------------------------
# The selective scan, and its parallel form
# ----------------------------------------------------------------------------------------------------------
def selective_scan(
    x, delta, A, B, C, D, *, h0=None, reverse=False, mode="parallel", return_state=False,
    interpret=None, block_d=32, chunk=8, num_warps=4,
):  # fmt: skip
    """Run the selective scan over a whole sequence.

    Args:
      x, delta: (b, l, d) input and positive step size. A: (d, n), negative. B, C: (b, l, n). D: (d,).
      h0: optional (b, d, n) state before the first processed token; zeros if None.
      reverse: scan from token l-1 down to token 0 (same as flipping the inputs along l, scanning, and
        flipping y back); the returned state is then the one after token 0.
      mode: "parallel" (associative scan), "sequential" (lax.scan) or "pallas" (the fused kernel). Same
        results up to float rounding.
      return_state: also return the state after the last processed token.
      interpret, block_d, chunk, num_warps: the "pallas" mode's settings (the others ignore them). interpret
        runs the kernel in Pallas' interpreter (default: on where the default backend is a CPU; False forces
        Triton); block_d channels per program (a power of two), chunk tokens per loop step (and per saved
        state: the backward holds chunk + 1 states in registers, so a larger chunk spills them), num_warps
        Triton warps per program. The kernel carries the state in float32 (or wider) whatever the inputs'
        dtype; y and h_last come back in the inputs' dtype.
    Returns: y (b, l, d), or (y, h_last) with h_last (b, d, n) when return_state is True.
    """
    fn = "selective_scan"
    if mode not in ("parallel", "sequential", "pallas"):
        raise ValueError(f"{fn}: mode must be 'parallel', 'sequential' or 'pallas', got {mode!r}")
    if block_d < 1 or block_d & (block_d - 1) or chunk < 1 or num_warps < 1:
        raise ValueError(f"{fn}: block_d must be a power of two and chunk, num_warps positive")
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
    if mode == "parallel":
        y, h_last = _parallel_scan(x, delta, A, B, C, D, h0)
    elif mode == "sequential":
        y, h_last = _sequential_scan(x, delta, A, B, C, D, h0)
    else:
        y, h_last = _pallas_scan(x, delta, A, B, C, D, h0, chunk, block_d, num_warps, interpret)
    if reverse:
        y = jnp.flip(y, axis=1)
    return (y, h_last) if return_state else y


def _parallel_scan(x, delta, A, B, C, D, h0):
    """Every token's state at once with jax.lax.associative_scan. -> y (b, l, d), h_last (b, d, n).

    Token t maps the state h -> decay_t * h + drive_t; the scan composes these maps along l, so the state after
    token t is the composition of maps 0..t applied to h0.
    """
    decay, drive = _discretize(x, delta, A, B)  # (b, l, d, n) each
    if h0 is not None:  # fold h0 into token 0: its state is decay_0 * h0 + drive_0, as in the step
        drive = drive.at[:, 0].add(decay[:, 0] * h0)
    _, h = jax.lax.associative_scan(_compose, (decay, drive), axis=1)  # (b, l, d, n)
    return _read_out(h, x, C, D), h[:, -1]


def _compose(earlier, later):
    """h -> a1*h + b1, then h -> a2*h + b2, is h -> (a1*a2)*h + (a2*b1 + b2).

    Products of decays in (0, 1] stay accurate in float32, unlike a cumulative sum of logs.
    """
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _discretize(x, delta, A, B):
    """Zero-order-hold A and Euler B, as in Mamba. Works per token (b, d) or per sequence (b, l, d).

    Returns decay exp(delta * A) and input (delta * x) * B, both (..., d, n). Shared by the parallel form and
    the step, so that they evaluate the same expressions in the same order.
    """
    decay = jnp.exp(delta[..., None] * A)  # (..., d, n)
    drive = (delta * x)[..., None] * B[..., None, :]  # (..., d, n)
    return decay, drive


def _read_out(h, x, C, D):
    """y = C . h + D * x for h (..., d, n), x (..., d), C (..., n) -> y (..., d)."""
    return jnp.einsum("...dn,...n->...d", h, C) + D * x


# ----------------------------------------------------------------------------------------------------------
# The sequential form, and one step for decoding
# ----------------------------------------------------------------------------------------------------------
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


# The sequential form runs in its own layout and with a hand-written backward pass (jax.custom_vjp, next
# section), as Mamba's fused kernel does. The state is kept as (b, n, d) inside the scan, d last, so that every
# elementwise op and every sum over n works on whole rows of d channels, which XLA:CPU runs faster than (b, d, n).
# h0 and h_last keep the public (b, d, n).
def _sequential_scan(x, delta, A, B, C, D, h0):
    """lax.scan over the tokens. -> y (b, l, d), h_last (b, d, n)."""
    (b, _, d), n = x.shape, A.shape[1]
    # one dtype for every input: lax.scan needs one carry dtype, custom_vjp cotangents match their inputs
    dtype = jnp.result_type(x, delta, A, B, C, D)
    h0 = jnp.zeros((b, d, n), dtype) if h0 is None else h0
    # lax.scan walks the leading axis, so move l to the front: (l, b, ...)
    tokens = (jnp.swapaxes(v, 0, 1).astype(dtype) for v in (x, delta, B, C))
    y, h_last = _scan(h0.astype(dtype), *tokens, A.astype(dtype), D.astype(dtype))  # y: (l, b, d)
    return jnp.swapaxes(y, 0, 1), h_last  # (b, l, d)


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


# ----------------------------------------------------------------------------------------------------------
# The sequential form's hand-written backward pass
# ----------------------------------------------------------------------------------------------------------
# Autodiff of a lax.scan would store three (l, b, d, n) tensors (the state before each token, its decay, the
# state after) and run the per-token reductions as slow library fusions (benchmarks/scan.py times it against
# this pass). Here the forward keeps only the state before each token; one reverse scan rebuilds each token's
# decay and state and carries g = dL/dh. Per token t, with G = g + dy_t C_t (y_t also reads h_t):
#   dC_t = sum_d dy_t h_t      dB_t = sum_d G (delta_t x_t)      dx_t = delta_t (G . B_t) + D dy_t
#   ddelta_t = sum_n G h_{t-1} decay_t A + x_t (G . B_t)         dA = sum_{t,b} G h_{t-1} decay_t delta_t
#   dD = sum_{t,b} dy_t x_t    and g for token t-1 is G decay_t (after token 0 it is dh0).
# Contractions that keep the batch axis are einsums (dot_general); the sums over b stay multiply + sum.
# tests/test_selective_scan.py checks every gradient against jax's autodiff of a plain loop.
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


# ----------------------------------------------------------------------------------------------------------
# The fused kernel (mode "pallas"): forward and hand-written backward
# ----------------------------------------------------------------------------------------------------------
# One fused kernel per pass (Pallas, Triton backend), as in Mamba's CUDA kernel. The grid is (batch row, block
# of block_d channels); each program walks all tokens of its row with its (n, block_d) state in registers,
# `chunk` tokens per loop step (unrolled), reading x, delta, B, C once. The state is (n, d) as in the
# sequential form; n is padded to a power of two (Triton's tensor sizes), d to a multiple of block_d, and l to a
# multiple of chunk with delta = 0 (decay 1, input 0), which leaves the real tokens untouched.
# - Precision: the state, A, D and every sum are carried in float32 (or wider) whatever the dtype of x, delta,
#   B, C: a bfloat16 state would round at every token. Loads are cast up; y, dx, ddelta are stored in the
#   inputs' dtype, and dB, dC are summed in float32 before they are cast down.
# - Forward: writes y token by token; when gradients are wanted it also saves the state before every chunk.
# - Backward: walks the chunks in reverse, rebuilds a chunk's states from its saved one, then steps back through
#   its tokens with the formulas of `_scan_bwd`, carrying g = dL/dh. It writes dx and ddelta directly, and
#   partials that are summed outside (no two programs write one place): dB, dC per block of channels, dA, dD
#   per batch row.
# interpret=True runs the same kernel in Pallas' interpreter: that is how the CPU tests check it.
class _Fused(NamedTuple):  # static settings of one fused call (hashable: custom_vjp's nondiff argument)
    chunk: int
    block_d: int
    num_warps: int
    interpret: bool


def _pallas_scan(x, delta, A, B, C, D, h0, chunk, block_d, num_warps, interpret):
    """Pad to the kernel's sizes, run it, cut the padding off. -> y (b, l, d), h_last (b, d, n)."""
    (b, l, d), n = x.shape, A.shape[1]
    dtype = jnp.result_type(x, delta, A, B, C, D)  # of the sequences, y and h_last
    state = jnp.promote_types(dtype, jnp.float32)  # of the state, A, D and the sums
    chunk, block_d = min(chunk, l), min(block_d, _pow2(d))  # no more padding than needed
    lp, dp, np_ = -(-l // chunk) * chunk, -(-d // block_d) * block_d, _pow2(n)
    pad = lambda v, to, *widths: jnp.pad(v.astype(to), widths)  # zeros: delta = 0 on padded tokens
    x, delta = (pad(v, dtype, (0, 0), (0, lp - l), (0, dp - d)) for v in (x, delta))
    B, C = (pad(v, dtype, (0, 0), (0, lp - l), (0, np_ - n)) for v in (B, C))
    h0 = jnp.zeros((b, n, d), state) if h0 is None else jnp.swapaxes(h0, 1, 2)
    h0 = pad(h0, state, (0, 0), (0, np_ - n), (0, dp - d))
    A, D = pad(A.T, state, (0, np_ - n), (0, dp - d)), pad(D, state, (0, dp - d))
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    y, h_last = _fused(_Fused(chunk, block_d, num_warps, interpret), h0, x, delta, B, C, A, D)
    return y[:, :l, :d], jnp.swapaxes(h_last[:, :n, :d], 1, 2).astype(dtype)


def _pow2(size):
    """The smallest power of two >= size."""
    return 1 << (size - 1).bit_length()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, h0, x, delta, B, C, A, D):
    """Padded inputs in the kernel's layout: h0 (b, n, d), x, delta (b, l, d), B, C (b, l, n), A (n, d), D (d,).
    Without a gradient the forward saves no states."""
    return tuple(_fused_forward(cfg, False, h0, x, delta, B, C, A, D))


def _fused_fwd(cfg, h0, x, delta, B, C, A, D):
    y, h_last, saved = _fused_forward(cfg, True, h0, x, delta, B, C, A, D)
    return (y, h_last), (x, delta, B, C, A, D, saved)


def _fused_bwd(cfg, residuals, cotangents):
    x, delta, B, C, A, D, saved = residuals
    (b, l, d), n = x.shape, A.shape[0]
    args = [(x, "seq"), (delta, "seq"), (B, "seq_n"), (C, "seq_n"), (A, "A"), (D, "D"), (saved, "saved")]
    args += [(cotangents[0], "seq"), (cotangents[1], "state")]
    state, part_n = A.dtype, ((b, d // cfg.block_d, l, n), A.dtype, "part_n")  # partials in the state's dtype
    outs = [((b, n, d), state, "state"), (x.shape, x.dtype, "seq"), (x.shape, delta.dtype, "seq")]
    outs += [part_n, part_n, ((b, n, d), state, "state"), ((b, d), state, "row_d")]
    grads = _fused_call(cfg, _fused_backward_kernel, "selective_scan_bwd", args, outs)
    dh0, dx, ddelta, dB, dC, dA, dD = grads
    return dh0, dx, ddelta, dB.sum(1).astype(B.dtype), dC.sum(1).astype(C.dtype), dA.sum(0), dD.sum(0)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _fused_forward(cfg, save, h0, x, delta, B, C, A, D):
    """-> [y (b, l, d), h_last (b, n, d)] + [the state before each chunk (b, l/chunk, n, d)] if save."""
    (b, l, d), n = x.shape, A.shape[0]
    args = [(h0, "state"), (x, "seq"), (delta, "seq"), (B, "seq_n"), (C, "seq_n"), (A, "A"), (D, "D")]
    outs = [(x.shape, x.dtype, "seq"), (h0.shape, h0.dtype, "state")]
    outs += [((b, l // cfg.chunk, n, d), h0.dtype, "saved")] * save
    return _fused_call(cfg, _fused_forward_kernel, "selective_scan_fwd", args, outs)


def _fused_forward_kernel(h0_ref, x_ref, delta_ref, B_ref, C_ref, A_ref, D_ref, y_ref, h_ref, *saved, chunk):
    """One program. Refs: h0, A, h (n, bd); x, delta, y (l, bd); B, C (l, n); D (bd,); saved (l/chunk, n, bd)."""
    A, D = A_ref[...], D_ref[...]  # in the state's dtype, as h0, h and saved
    load = lambda ref, t: ref[t].astype(A.dtype)

    def body(c, h):
        if saved:
            saved[0][c] = h  # the state before chunk c
        for k in range(chunk):
            t = c * chunk + k
            x_t, delta_t, B_t = load(x_ref, t), load(delta_ref, t), load(B_ref, t)  # (bd,), (bd,), (n,)
            h = jnp.exp(delta_t[None, :] * A) * h + B_t[:, None] * (delta_t * x_t)[None, :]
            y_t = jnp.sum(load(C_ref, t)[:, None] * h, axis=0) + D * x_t
            y_ref[t] = y_t.astype(y_ref.dtype)
        return h

    h_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0] // chunk, body, h0_ref[...])


def _fused_backward_kernel(
    x_ref, delta_ref, B_ref, C_ref, A_ref, D_ref, saved_ref, dy_ref, dh_ref,  # inputs, shaped as above
    dh0_ref, dx_ref, ddelta_ref, dB_ref, dC_ref, dA_ref, dD_ref,  # dB, dC, dA, dD: this program's partials
    *, chunk,
):  # fmt: skip
    A, D = A_ref[...], D_ref[...]  # in the state's dtype, as saved, dh, dh0 and the partials
    load = lambda ref, t: ref[t].astype(A.dtype)
    n_chunks = x_ref.shape[0] // chunk

    def body(i, carry):
        g, dA, dD = carry  # g = dL/dh after the chunk (n, bd); dA (n, bd); dD (bd,)
        c = n_chunks - 1 - i
        hs, tokens = [saved_ref[c]], []  # hs[k]: the state before token k of the chunk; hs[chunk]: after it
        for k in range(chunk):  # the forward's states, recomputed
            t = c * chunk + k
            x_t, delta_t, B_t = load(x_ref, t), load(delta_ref, t), load(B_ref, t)
            hs.append(jnp.exp(delta_t[None, :] * A) * hs[-1] + B_t[:, None] * (delta_t * x_t)[None, :])
            tokens.append((t, x_t, delta_t, B_t))
        for k in reversed(range(chunk)):  # decays are recomputed, not kept: fewer registers
            t, x_t, delta_t, B_t = tokens[k]
            decay, dy_t = jnp.exp(delta_t[None, :] * A), load(dy_ref, t)
            G = g + load(C_ref, t)[:, None] * dy_t[None, :]  # dL/dh_t: from the later tokens and from y_t
            dC_ref[t] = jnp.sum(hs[k + 1] * dy_t[None, :], axis=1)
            dB_ref[t] = jnp.sum(G * (delta_t * x_t)[None, :], axis=1)
            G_dot_B = jnp.sum(G * B_t[:, None], axis=0)  # (bd,)
            g = G * decay  # dL/dh_{t-1}
            g_h = g * hs[k]
            ddelta_ref[t] = (jnp.sum(g_h * A, axis=0) + x_t * G_dot_B).astype(ddelta_ref.dtype)
            dx_ref[t] = (delta_t * G_dot_B + D * dy_t).astype(dx_ref.dtype)
            dA, dD = dA + g_h * delta_t[None, :], dD + dy_t * x_t
        return g, dA, dD

    carry = (dh_ref[...], jnp.zeros(A.shape, A.dtype), jnp.zeros(D.shape, D.dtype))
    dh0_ref[...], dA_ref[...], dD_ref[...] = jax.lax.fori_loop(0, n_chunks, body, carry)


def _fused_call(cfg, kernel, name, args, outs):
    """pallas_call over the grid (batch row i, channel block j). args: (array, block kind); outs: (shape, dtype,
    block kind). Kinds: "seq" (b, l, d), "seq_n" (b, l, n), "state" (b, n, d), "A" (n, d), "D" (d,), "row_d"
    (b, d), "saved" (b, l/chunk, n, d) or "part_n" (b, d/block_d, l, n)."""
    bd = cfg.block_d
    blocks = {  # kind -> (block shape for an array shape s, grid point -> block index)
        "seq": (lambda s: (None, s[1], bd), lambda i, j: (i, 0, j)),
        "seq_n": (lambda s: (None, s[1], s[2]), lambda i, j: (i, 0, 0)),
        "state": (lambda s: (None, s[1], bd), lambda i, j: (i, 0, j)),
        "A": (lambda s: (s[0], bd), lambda i, j: (0, j)),
        "D": (lambda s: (bd,), lambda i, j: (j,)),
        "row_d": (lambda s: (None, bd), lambda i, j: (i, j)),
        "saved": (lambda s: (None, s[1], s[2], bd), lambda i, j: (i, 0, 0, j)),
        "part_n": (lambda s: (None, None, s[2], s[3]), lambda i, j: (i, j, 0, 0)),
    }
    spec = lambda shape, kind: pl.BlockSpec(blocks[kind][0](shape), blocks[kind][1])
    b, _, d = args[1][0].shape  # x in the forward kernel's arguments, delta in the backward's
    return pl.pallas_call(
        functools.partial(kernel, chunk=cfg.chunk),
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _ in outs],
        grid=(b, d // bd),
        in_specs=[spec(a.shape, kind) for a, kind in args],
        out_specs=[spec(shape, kind) for shape, _, kind in outs],
        # Triton's parameters also choose the backend: without them a GPU pallas_call may go to Mosaic GPU
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name=name,
    )(*(a for a, _ in args))


# ----------------------------------------------------------------------------------------------------------
# Shape checks
# ----------------------------------------------------------------------------------------------------------
def _expect(fn, name, arr, want, letters):
    """Raise ValueError unless arr.shape matches want, a tuple of sizes where None means any size."""
    shape, letters = arr.shape, letters.split()
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        expected = _fmt([c if w is None else str(w) for w, c in zip(want, letters)])
        if expected != _fmt(letters):  # show the sizes and what they stand for
            expected += f" = {_fmt(letters)}"
        raise ValueError(f"{fn}: {name} has shape {shape}, expected {expected}")


def _fmt(items):
    """('2', 'n') -> '(2, n)'; a single item keeps Python's trailing comma: '(2,)'."""
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
