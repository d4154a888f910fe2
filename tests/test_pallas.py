"""The "pallas" mode of selective_scan.py without a GPU: its kernel runs in Pallas' interpreter and must equal the
sequential mode (forward, every gradient, reverse, return_state, jit, vmap, inside MAM, bfloat16 inputs with a
float32 state); its Triton path is lowered for CUDA, so a lowering break shows on a CPU. Shapes are small and
compilations few: interpret mode is slow to compile (a few seconds per function)."""

import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_selective_scan import close, make_inputs

import mam_ppo
from selective_scan import selective_scan

NAMES = ("x", "delta", "A", "B", "C", "D", "h0")


@functools.cache
def grads_and_outputs(mode, reverse, chunk=8, block_d=32):
    """jit(grad) of a loss that weights every output (y and h_last) w.r.t. all 7 inputs; also returns y, h."""

    def loss(weights, *inputs):
        y, h = selective_scan(
            *inputs[:6],
            h0=inputs[6],
            reverse=reverse,
            mode=mode,
            return_state=True,
            chunk=chunk,
            block_d=block_d,
        )
        return jnp.sum(weights[0] * y) + jnp.sum(weights[1] * h), (y, h)

    return jax.jit(jax.grad(loss, argnums=tuple(range(1, 8)), has_aux=True))


def random_case(seed, b, l, d, n):
    """-> (weights for y and h_last, the 7 inputs in NAMES order)."""
    inputs, h0 = make_inputs(seed, b, l, d, n)
    rng = np.random.default_rng(seed + 100)
    weights = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, l, d), (b, d, n)))
    return weights, [inputs[k] for k in NAMES[:-1]] + [h0]


def assert_matches_sequential(got, want, inputs):
    (grads, (y, h)), (grads_want, (y_want, h_want)) = got, want
    close(y, y_want)
    close(h, h_want)
    for name, g, g_want, value in zip(NAMES, grads, grads_want, inputs):
        assert g.shape == value.shape and g.dtype == value.dtype, name
        assert np.abs(g_want).max() > 0, name  # a zero gradient would compare equal to anything
        close(g, g_want, tol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "b, l, d, n, chunk, block_d",
    [
        (2, 7, 5, 3, 4, 2),  # l = 7 not a multiple of the chunk; d over 3 blocks (5 -> 6); n padded 3 -> 4
        (2, 3, 6, 4, 8, 4),  # l smaller than the chunk; d over 2 blocks (padded 6 -> 8)
        (3, 1, 3, 2, 4, 4),  # a single token
    ],
)
def test_forward_and_all_gradients_equal_the_sequential_mode(b, l, d, n, chunk, block_d, reverse):
    weights, inputs = random_case(l, b, l, d, n)
    got = grads_and_outputs("pallas", reverse, chunk, block_d)(weights, *inputs)
    want = grads_and_outputs("sequential", reverse)(weights, *inputs)
    assert_matches_sequential(got, want, inputs)


def test_bfloat16_inputs_keep_a_float32_state():
    # bf16 in, bf16 out, but the state and every sum in float32: then each output and gradient is the float32
    # result rounded once to bf16, so it lies within one bf16 rounding (2^-8 relative) of the sequential mode
    # run in float32 on the same values. A state carried in bf16 would round at each of the 64 tokens.
    b, l, d, n = 2, 64, 6, 3  # 8 chunks of 8; d over 2 blocks (padded 6 -> 8); n padded 3 -> 4
    weights, inputs = random_case(11, b, l, d, n)
    low = [v.astype(jnp.bfloat16) for v in inputs]
    exact = [v.astype(jnp.float32) for v in low]  # the same values in float32
    weights = tuple(w.astype(jnp.bfloat16).astype(jnp.float32) for w in weights)  # exact cotangents in bf16
    grads, (y, h) = grads_and_outputs("pallas", False, 8, 4)(weights, *low)
    grads_want, (y_want, h_want) = grads_and_outputs("sequential", False)(weights, *exact)
    forward_only = jax.jit(
        lambda *a: selective_scan(*a[:6], h0=a[6], mode="pallas", return_state=True, block_d=4)
    )
    for got, want in zip(forward_only(*low), (y, h)):  # the kernel without saved states: the same numbers
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for name, got, want, value in zip(
        ("y", "h_last") + NAMES, (y, h, *grads), (y_want, h_want, *grads_want), [y, h] + low
    ):
        assert got.dtype == jnp.bfloat16 and got.shape == value.shape, name
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.abs(want).max() > 0, name
        err = np.abs(got - want) / (np.abs(want) + 1e-5 * np.abs(want).max())
        assert err.max() <= 2**-8, (name, err.max())


def test_under_vmap():
    # an extra leading axis over the custom_vjp and the pallas_call == one call per slice
    cases = [random_case(40 + i, 2, 5, 3, 2) for i in range(2)]
    weights = cases[0][0]
    stacked = [jnp.stack([c[1][k] for c in cases]) for k in range(7)]
    batched = jax.jit(jax.vmap(grads_and_outputs("pallas", False, 2, 2), in_axes=(None,) + (0,) * 7))
    grads, (y, h) = batched(weights, *stacked)
    for i, (_, inputs) in enumerate(cases):
        got = ([g[i] for g in grads], (y[i], h[i]))
        assert_matches_sequential(got, grads_and_outputs("sequential", False)(weights, *inputs), inputs)


def test_mam_loss_and_parameter_gradients_equal_the_sequential_mode():
    # MAM's Mixer passes mode=cfg.scan_mode to selective_scan: four scans (encoder forward and backward, the
    # decoder's self and cross mixers), y only and no h0, so the h_last cotangent is zero
    env = SimpleNamespace(num_agents=6, obs_dim=7, action_dim=4)
    sizes = dict(n_block=1, n_embd=8, d_state=4, d_conv=4, expand=2, dt_rank=2)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    obs = jax.random.normal(keys[0], (3, env.num_agents, env.obs_dim))
    mask = jnp.ones((3, env.num_agents, env.action_dim), bool)
    actions = jax.random.randint(keys[1], (3, env.num_agents), 0, env.action_dim)
    networks = {
        mode: mam_ppo.MultiAgentMamba(env.action_dim, mam_ppo.MambaConfig(**sizes, scan_mode=mode))
        for mode in ("sequential", "pallas")
    }
    params = mam_ppo.init_params(networks["sequential"], keys[2], env)  # the mode has no parameters
    results = {}
    for mode, network in networks.items():

        def loss(params, network=network):  # as benchmarks/scaling.py's training measure
            logits, values = network.apply(params, obs, mask, actions)
            log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], axis=-1)
            return jnp.sum(log_probs) + jnp.sum(values)

        results[mode] = jax.jit(jax.value_and_grad(loss))(params)
    (value, grads), (value_want, grads_want) = results["pallas"], results["sequential"]
    close(value, value_want)
    paths = jax.tree_util.tree_flatten_with_path(grads_want)[0]
    assert len(paths) > 20
    for (path, g_want), g in zip(paths, jax.tree.leaves(grads)):
        assert np.abs(g_want).max() > 0, jax.tree_util.keystr(path)
        close(g, g_want, tol=1e-4)


def export_for_cuda(fn, *shapes):
    """jax.export of jit(fn) for CUDA on this GPU-less machine -> the lowered module's text. Triton's custom call
    is allowed explicitly. An abstract GPU device is set where jax has the API (jax 0.11 needs one to lower a
    Triton call without a GPU; 0.10 accepts it)."""
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    run = lambda: export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*shapes)
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice") or not hasattr(sharding, "use_abstract_mesh"):
        return run().mlir_module()
    gpu = sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = sharding.AbstractMesh((1,), ("x",), axis_types=(sharding.AxisType.Explicit,), abstract_device=gpu)
    with sharding.use_abstract_mesh(mesh):
        return run().mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_path_lowers_for_cuda(dtype):
    # MAM's scan width (d_inner = 2 * 64, d_state 8); l = 44 not a multiple of the chunk
    b, l, d, n = 2, 44, 128, 8
    sizes = [(b, l, d), (b, l, d), (d, n), (b, l, n), (b, l, n), (d,), (b, d, n)]
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in sizes]

    def forward(x, delta, A, B, C, D, h0):
        return selective_scan(x, delta, A, B, C, D, h0=h0, mode="pallas", interpret=False, return_state=True)

    def backward(*inputs):
        return jax.grad(lambda *a: sum(jnp.sum(v) for v in forward(*a)), argnums=tuple(range(7)))(*inputs)

    both = ["selective_scan_fwd", "selective_scan_bwd"]  # a gradient runs the forward kernel, then its own
    for fn, kernels in ((forward, both[:1]), (backward, both)):
        text = export_for_cuda(fn, *shapes)
        assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == len(kernels), fn.__name__
        assert all(f'name = "{name}"' in text for name in kernels), fn.__name__


def test_bad_kernel_settings_raise():
    inputs, _ = make_inputs(0, 2, 4, 5, 3, with_h0=False)
    for settings in (dict(block_d=3), dict(chunk=0), dict(num_warps=0)):
        with pytest.raises(ValueError, match="block_d must be a power of two"):
            selective_scan(**inputs, mode="pallas", **settings)


def test_gpu_check_fits_its_budget_by_compile_count():
    # benchmarks/gpu_check.py's estimate of its GPU run, and its dry run: the same rows making the same compiles,
    # which the dry run counts, so an all-ok dry run confirms the count the estimate rests on
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    full, dry = gpu_check.plan(gpu_check.FULL), gpu_check.plan(gpu_check.DRY)
    assert [(row.table, row.cost) for row in full] == [(row.table, row.cost) for row in dry]
    assert gpu_check.estimate(full)["total_min"] <= gpu_check.BUDGET_MIN
    assert [row.table for row in full][:3] == ["check"] * 3  # the check first
