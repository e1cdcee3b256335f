"""Tests for optax_lowrank.quantization (block-wise int8 / NF4 / dynamic codes)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optax_lowrank import quantization as q

ALL_FORMATS = q.FORMATS
# Slack for float32 arithmetic in x / s and s * level, relative to the block absmax.
REL_SLACK = 1e-5


def _blocks64(x: np.ndarray, block_size: int) -> np.ndarray:
    """float64[n_blocks, block_size] zero-padded view, as the module defines it."""
    flat = np.asarray(x, np.float64).ravel()
    n_blocks = -(-flat.size // block_size)
    return np.pad(flat, (0, n_blocks * block_size - flat.size)).reshape(n_blocks, block_size)


def _sample(seed: int, shape: tuple[int, ...], scale: float, fmt: str) -> np.ndarray:
    """Heavy-tailed float32 data: normal times a log-uniform factor over 3 decades."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 0, shape) * scale
    if fmt == "dynamic8_unsigned":
        x = np.abs(x)
    return x.astype(np.float32)


def _check_error_bounds(x: np.ndarray, fmt: str, block_size: int) -> float:
    """Asserts the documented bounds; returns the worst |x - x̂| / block absmax."""
    qa = q.quantize(x, fmt, block_size)
    xhat = np.asarray(q.dequantize(qa))
    assert xhat.shape == x.shape and xhat.dtype == x.dtype
    if x.size == 0:
        return 0.0
    xb, xhb = _blocks64(x, block_size), _blocks64(xhat, block_size)
    absmax = np.max(np.abs(xb), axis=1, keepdims=True)
    err = np.abs(xb - xhb)
    # 1) Worst-case bound of the format: half the largest level gap times the absmax.
    factor = q.max_abs_error_factor(fmt)
    assert np.all(err <= (factor + REL_SLACK) * absmax), fmt
    # 2) Nearest rounding: no level of the block is closer to x than the chosen one.
    scales = np.asarray(qa.scales, np.float64)[:, None]
    levels = q.format_levels(fmt).astype(np.float64)
    if fmt == "int8":
        levels = levels * 127.0
    best = np.min(np.abs(xb[..., None] - scales[..., None] * levels), axis=-1)
    assert np.all(err <= best + REL_SLACK * absmax), fmt
    return float(np.max(err / np.where(absmax > 0, absmax, 1.0)))


shapes = st.lists(st.integers(0, 23), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(ALL_FORMATS),
    shape=shapes,
    block_size=st.sampled_from([1, 7, 64, 256]),
    log_scale=st.floats(-4.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_within_documented_bounds(fmt, shape, block_size, log_scale, seed):
    x = _sample(seed, shape, 10.0**log_scale, fmt)
    _check_error_bounds(x, fmt, block_size)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_worst_case_error_is_attained_but_not_exceeded(fmt, scale):
    # 3 blocks of 256 plus a partial block of 53: padding is exercised too.
    x = _sample(0, (17, 49), scale, fmt)
    worst = _check_error_bounds(x, fmt, 256)
    # The bound is tight: the data fill the largest gap, so the worst error is close to it.
    assert worst > 0.5 * q.max_abs_error_factor(fmt)


def test_documented_error_factors():
    assert q.max_abs_error_factor("int8") == pytest.approx(1 / 254, rel=1e-6)
    assert q.max_abs_error_factor("nf4") == pytest.approx((1 - 0.6961928) / 2, rel=1e-6)
    assert q.max_abs_error_factor("dynamic8") == pytest.approx(0.9 / 128, rel=1e-5)
    assert q.max_abs_error_factor("dynamic8_unsigned") == pytest.approx(0.9 / 256, rel=1e-5)


def test_nf4_levels_match_quantile_definition():
    derived = np.asarray(q.nf4_levels_from_definition())
    np.testing.assert_allclose(derived, q.NF4_LEVELS, atol=2e-6, rtol=0)
    assert q.NF4_LEVELS.shape == (16,) and q.NF4_LEVELS[7] == 0.0
    assert q.NF4_LEVELS[0] == -1.0 and q.NF4_LEVELS[-1] == 1.0


def test_dynamic_tree_levels():
    signed, unsigned = q.DYNAMIC8_LEVELS, q.DYNAMIC8_UNSIGNED_LEVELS
    assert signed.shape == (255,) and unsigned.shape == (256,)
    for levels in (signed, unsigned):
        assert np.all(np.diff(levels) > 0) and levels[-1] == 1.0 and 0.0 in levels
    np.testing.assert_array_equal(signed, -signed[::-1])
    assert np.min(signed[signed > 0]) == pytest.approx(1e-6)
    assert np.min(unsigned[unsigned > 0]) == pytest.approx(1e-7)


@pytest.mark.parametrize("block_size", [64, 63, 7, 1])
def test_nf4_packs_two_codes_per_byte(block_size):
    x = _sample(1, (10, 31), 1.0, "nf4")  # 310 elements
    qa = q.quantize(x, "nf4", block_size)
    n_blocks = math.ceil(310 / block_size)
    padded = n_blocks * block_size
    assert qa.codes.dtype == jnp.uint8
    assert qa.codes.shape == (math.ceil(padded / 2),)
    assert qa.scales.shape == (n_blocks,) and qa.scales.dtype == jnp.float32
    assert q.nbytes(qa) == math.ceil(padded / 2) + 4 * n_blocks
    assert q.nbytes(qa) == q.quantized_nbytes(310, "nf4", block_size) == qa.nbytes
    # 4 bits per element for the codes (up to the padding of one block).
    assert (q.nbytes(qa) - 4 * n_blocks) * 8 <= 4 * (310 + block_size)
    # Both nibbles are used: unpacking the bytes gives the nearest-level codes.
    lo, hi = np.asarray(qa.codes) & 0x0F, np.asarray(qa.codes) >> 4
    assert lo.max() <= 15 and hi.max() <= 15 and len(np.unique(hi)) > 1


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_nbytes_matches_formula(fmt):
    for size, block_size in [(0, 8), (1, 256), (255, 256), (256, 256), (257, 256), (1000, 3)]:
        x = jnp.ones((size,), jnp.float32)
        n_blocks = -(-size // block_size)
        code_bytes = n_blocks * block_size
        if fmt == "nf4":
            code_bytes = -(-code_bytes // 2)
        expected = code_bytes + 4 * n_blocks
        qa = q.quantize(x, fmt, block_size)
        assert q.nbytes(qa) == expected == q.quantized_nbytes(size, fmt, block_size)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_exact_zeros_stay_zero(fmt, stochastic):
    x = _sample(2, (600,), 5.0, fmt)
    x[::3] = 0.0
    x[256:512] = 0.0  # an all-zero block: scale 0
    key = jax.random.key(0) if stochastic else None
    qa = q.quantize(x, fmt, 256, key=key)
    xhat = np.asarray(q.dequantize(qa))
    assert np.all(xhat[x == 0] == 0.0)
    assert float(qa.scales[1]) == 0.0
    assert np.all(np.asarray(q.dequantize(q.quantize(np.zeros(5, np.float32), fmt, 4))) == 0)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_padding_is_zero_and_removed(fmt):
    x = _sample(3, (3, 5), 2.0, fmt)  # 15 elements, block 8 -> 1 padding element
    qa = q.quantize(x, fmt, 8)
    assert qa.n_blocks == 2 and qa.size == 15 and qa.shape == (3, 5)
    xhat = q.dequantize(qa)
    assert xhat.shape == (3, 5)
    # The padded element encodes zero, so it does not affect the last block's scale.
    assert float(qa.scales[1]) == pytest.approx(
        float(np.max(np.abs(x.ravel()[8:]))) / (127.0 if fmt == "int8" else 1.0), rel=1e-6
    )
    if fmt == "int8":
        assert int(qa.codes[15]) == 0
    elif fmt == "nf4":
        assert int(qa.codes[7]) >> 4 == 7  # element 15: high nibble of byte 7, level 0
    else:
        assert q.format_levels(fmt)[int(qa.codes[15])] == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_and_shape_restored(dtype):
    x = jax.random.normal(jax.random.key(1), (4, 3, 5), dtype)
    for fmt in ("int8", "nf4"):
        xhat = q.dequantize(q.quantize(x, fmt, 16))
        assert xhat.dtype == dtype and xhat.shape == x.shape
    scalar = q.dequantize(q.quantize(jnp.float32(-2.5), "int8"))
    assert scalar.shape == () and float(scalar) == -2.5


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_stochastic_rounding_is_unbiased(fmt):
    x = _sample(4, (64,), 1.0, fmt)
    x[0] = 1.0 if fmt == "dynamic8_unsigned" else -1.0  # fix the block absmax
    keys = jax.random.split(jax.random.key(0), 4000)
    samples = jax.vmap(lambda k: q.dequantize(q.quantize(x, fmt, 64, key=k)))(keys)
    samples = np.asarray(samples, np.float64)
    levels = q.format_levels(fmt).astype(np.float64)
    gap = np.max(np.diff(levels))
    # Each draw lies on one of the two levels bracketing x: error below one full gap.
    assert np.all(np.abs(samples - x) <= gap * 1.0 * (1 + REL_SLACK))
    # Mean converges to x: standard error <= gap / (2 sqrt(n)); allow 5 of them.
    tol = 5 * gap / (2 * np.sqrt(len(keys))) + 1e-7
    np.testing.assert_allclose(samples.mean(0), x, atol=tol, rtol=0)
    # Nearest rounding would be biased for some elements by far more than that.
    nearest = np.asarray(q.dequantize(q.quantize(x, fmt, 64)), np.float64)
    assert np.max(np.abs(nearest - x)) > tol


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "int4"}, "`format`"),
        ({"format": "NF4"}, "`format`"),
        ({"format": None}, "`format`"),
        ({"block_size": 0}, "`block_size`"),
        ({"block_size": -3}, "`block_size`"),
        ({"block_size": 2.5}, "`block_size`"),
        ({"block_size": True}, "`block_size`"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    x = jnp.ones((10,))
    with pytest.raises(ValueError, match=match):
        q.quantize(x, **kwargs)
    with pytest.raises(ValueError, match=match):
        q.quantize_tree({"a": x}, **kwargs)
    if "block_size" in kwargs:
        with pytest.raises(ValueError, match=match):
            q.quantized_nbytes(10, "int8", kwargs["block_size"])


def test_non_float_input_raises():
    with pytest.raises(TypeError, match="`x`"):
        q.quantize(jnp.arange(10), "int8")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_tree_non_finite_names_leaf_path_and_shape(bad):
    w = np.ones((3, 4), np.float32)
    w[1, 2] = bad
    tree = {"encoder": {"layers": [{"w": np.ones(5, np.float32)}, {"w": w}]}, "b": np.ones(2)}
    with pytest.raises(ValueError, match=r"\['encoder'\]\['layers'\]\[1\]\['w'\].*\(3, 4\)"):
        q.quantize_tree(tree, "nf4", 4)


def test_quantize_tree_round_trip_and_where():
    key = jax.random.key(2)
    tree = {
        "w": jax.random.normal(key, (33, 7)),
        "layers": (jax.random.normal(key, (5,)), jnp.float32(3.0)),
        "step": jnp.array(7, jnp.int32),
    }
    qt = q.quantize_tree(tree, "int8", 32)
    assert isinstance(qt["w"], q.QuantizedArray) and isinstance(qt["layers"][1], q.QuantizedArray)
    assert qt["step"] is tree["step"]  # non-float leaves pass through by default
    back = q.dequantize_tree(qt)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        bound = q.max_abs_error_factor("int8") * float(jnp.max(jnp.abs(b))) * (1 + REL_SLACK)
        assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) <= bound
    # `where` as a pytree and as a callable.
    mask = {"w": True, "layers": (False, False), "step": False}
    only_w = q.quantize_tree(tree, "nf4", 32, where=mask)
    assert isinstance(only_w["w"], q.QuantizedArray)
    assert not isinstance(only_w["layers"][0], q.QuantizedArray)
    same = q.quantize_tree(tree, "nf4", 32, where=lambda t: mask)
    assert jax.tree.structure(same) == jax.tree.structure(only_w)
    with pytest.raises(TypeError, match=r"\['step'\]"):
        q.quantize_tree(tree, "int8", where={"w": True, "layers": (True, True), "step": True})
    with pytest.raises(ValueError, match="`where`"):
        q.quantize_tree(tree, "int8", where={"w": True})
    # Non-finite values are only checked on concrete leaves, not selected ones.
    q.quantize_tree({"a": jnp.array([jnp.nan]), "b": jnp.ones(2)}, where={"a": False, "b": True})


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_jit(fmt):
    x = _sample(5, (9, 40), 3.0, fmt)
    traces = []

    @jax.jit
    def round_trip(x):
        traces.append(None)
        return q.dequantize(q.quantize(x, fmt, 64))

    np.testing.assert_array_equal(round_trip(x), q.dequantize(q.quantize(x, fmt, 64)))
    round_trip(x + 1.0)
    assert len(traces) == 1
    # QuantizedArray crosses the jit boundary as a pytree with static metadata.
    qa = jax.jit(lambda x: q.quantize(x, fmt, 64))(x)
    assert isinstance(qa, q.QuantizedArray) and qa.format == fmt and qa.shape == (9, 40)
    np.testing.assert_array_equal(jax.jit(q.dequantize)(qa), q.dequantize(qa))
    # Trees under jit: the eager finiteness check is skipped (values are abstract).
    tree = {"a": jnp.asarray(x)}
    out = jax.jit(lambda t: q.dequantize_tree(q.quantize_tree(t, fmt, 64)))(tree)
    np.testing.assert_array_equal(out["a"], q.dequantize(q.quantize(x, fmt, 64)))
