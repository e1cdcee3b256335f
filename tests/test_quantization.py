"""Tests for optax_lowrank.quantization (block-wise int8 / NF4 / dynamic codes).

XLA compiles one program per (shape, format, block size), which dominates the run
time on CPU, so most tests share the shape ``SHAPE`` (833 elements: not a multiple
of any block size used here).
"""

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
SHAPE = (17, 49)
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
  # 1) Worst-case bound of the format: half the largest level gap times the absmax
  #    (int8: absmax / 254; nf4: 0.1519 absmax; dynamic8(_unsigned): 0.9/128(256)).
  factor = q.max_abs_error_factor(fmt)
  assert np.all(err <= (factor + REL_SLACK) * absmax), fmt
  # 2) Nearest rounding: no level of the block is closer to x than the chosen one.
  levels = q.format_levels(fmt).astype(np.float64)
  best = np.min(np.abs(xb[..., None] - absmax[..., None] * levels), axis=-1)
  assert np.all(err <= best + REL_SLACK * absmax), fmt
  return float(np.max(err / np.where(absmax > 0, absmax, 1.0)))


@settings(max_examples=15, deadline=None)
@given(
  fmt=st.sampled_from(ALL_FORMATS),
  shape=st.lists(st.integers(0, 11), min_size=0, max_size=3).map(tuple),
  block_size=st.sampled_from([1, 7, 64]),
  log_scale=st.floats(-4.0, 3.0),
  seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_within_documented_bounds(fmt, shape, block_size, log_scale, seed):
  x = _sample(seed, shape, 10.0**log_scale, fmt)
  _check_error_bounds(x, fmt, block_size)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_worst_case_error_over_scales(fmt):
  # 3 blocks of 256 plus a partial block of 65; scales 1e-4 .. 1e3 reuse one program.
  worst = max(
    _check_error_bounds(_sample(s + 4, SHAPE, 10.0**s, fmt), fmt, 256) for s in (-4, 0, 3)
  )
  # The bound is tight: heavy-tailed data fill the largest gap, so the worst error
  # is close to it.
  assert 0.5 * q.max_abs_error_factor(fmt) < worst <= q.max_abs_error_factor(fmt) + REL_SLACK


def test_codes_are_nearest_levels_including_ties_and_extremes():
  """The O(1) rank formula agrees with a brute-force search over the table."""
  rng = np.random.default_rng(0)
  for fmt in ALL_FORMATS:
    levels = q.format_levels(fmt).astype(np.float64)
    mids = (levels[1:] + levels[:-1]) / 2
    y = np.concatenate(
      [[1.0], levels, mids * (1 + 1e-6), mids * (1 - 1e-6), rng.uniform(-1, 1, 300)]
    )
    y = np.concatenate([y, np.sign(y[:300]) * 10.0 ** rng.uniform(-9, 0, 300)])
    y = np.abs(y) if fmt == "dynamic8_unsigned" else y
    y = np.resize(y, 4096).astype(np.float32)  # one block, absmax exactly 1
    xhat = np.asarray(q.dequantize(q.quantize(y, fmt, 4096)), np.float64)
    best = np.min(np.abs(y[:, None] - levels[None, :]), axis=1)
    # Exact up to near-ties: float32 rank arithmetic resolves ties to ~5e-7.
    np.testing.assert_allclose(np.abs(xhat - y), best, atol=5e-7, rtol=0, err_msg=fmt)


@pytest.mark.parametrize("block_size", [64, 63])
def test_nf4_packs_two_codes_per_byte(block_size):
  x = _sample(1, SHAPE, 1.0, "nf4")
  n = x.size
  qa = q.quantize(x, "nf4", block_size)
  n_blocks = math.ceil(n / block_size)
  padded = n_blocks * block_size
  assert qa.codes.dtype == jnp.uint8 and qa.codes.shape == (math.ceil(padded / 2),)
  assert qa.scales.dtype == jnp.float32 and qa.scales.shape == (n_blocks,)
  # Storage: 4 bits per element (incl. the zero padding of the last block) + scales.
  assert q.nbytes(qa) == qa.nbytes == math.ceil(padded / 2) + 4 * n_blocks
  assert (q.nbytes(qa) - 4 * n_blocks) * 8 < 4 * (n + block_size) + 8
  # Both nibbles carry codes: unpacking gives the nearest-level code of each element.
  packed = np.asarray(qa.codes)
  codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).ravel()[:n]
  xb = _blocks64(x, block_size).ravel()[:n]
  scales = np.repeat(np.asarray(qa.scales, np.float64), block_size)[:n]
  nearest = np.argmin(np.abs(xb[:, None] / scales[:, None] - q.NF4_LEVELS[None, :]), axis=1)
  assert np.mean(codes == nearest) > 0.999  # up to float ties
  assert len(np.unique(packed >> 4)) > 8 and len(np.unique(packed & 0x0F)) > 8


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_nbytes_matches_formula(fmt):
  for size, block_size in [(0, 8), (1, 256), (255, 256), (256, 256), (257, 256), (1001, 3)]:
    n_blocks = -(-size // block_size)
    code_bytes = n_blocks * block_size
    if fmt == "nf4":
      code_bytes = -(-code_bytes // 2)
    expected = code_bytes + 4 * n_blocks
    # Abstract evaluation: exact shapes and dtypes without compiling.
    qa = jax.eval_shape(lambda x, b=block_size: q.quantize(x, fmt, b), jnp.ones(size))
    assert q.nbytes(qa) == expected == q.quantized_nbytes(size, fmt, block_size)
  assert q.nbytes(q.quantize(jnp.ones(257), fmt, 256)) == q.quantized_nbytes(257, fmt, 256)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_exact_zeros_stay_zero(fmt):
  x = _sample(2, SHAPE, 5.0, fmt).ravel()
  x[::3] = 0.0
  x[256:512] = 0.0  # an all-zero block: scale 0
  x = x.reshape(SHAPE)
  for seed in (None, 7):  # nearest and stochastic rounding
    qa = q.quantize(x, fmt, 256, seed=seed)
    xhat = np.asarray(q.dequantize(qa))
    assert np.all(xhat[x == 0] == 0.0) and float(qa.scales[1]) == 0.0
  zeros = q.quantize(np.zeros(SHAPE, np.float32), fmt, 256)
  assert np.all(np.asarray(q.dequantize(zeros)) == 0)
  # quantized_zeros builds the same thing without quantizing.
  built = q.quantized_zeros(SHAPE, fmt, 256)
  assert jax.tree.structure(built) == jax.tree.structure(zeros)
  jax.tree.map(np.testing.assert_array_equal, built, zeros)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_padding_is_zero_and_removed(fmt):
  x = _sample(3, SHAPE, 2.0, fmt)  # 833 = 3 * 256 + 65: 191 padding elements
  qa = q.quantize(x, fmt, 256)
  assert qa.n_blocks == 4 and qa.size == 833 and qa.shape == SHAPE
  assert q.dequantize(qa).shape == SHAPE
  # The padding encodes zero, so it does not affect the last block's scale.
  tail_absmax = float(np.max(np.abs(x.ravel()[768:])))
  unit = tail_absmax / 127.0 if fmt == "int8" else tail_absmax
  assert float(qa.scales[3]) == pytest.approx(unit, rel=1e-6)
  codes = np.asarray(qa.codes)
  if fmt == "nf4":
    codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).ravel()
  pad_codes = codes[833:1024]
  zero_code = 0 if fmt == "int8" else int(np.flatnonzero(q.format_levels(fmt) == 0)[0])
  assert np.all(pad_codes == zero_code)


def test_dtype_and_shape_restored():
  for dtype in (jnp.bfloat16, jnp.float16):
    x = jnp.asarray(_sample(1, SHAPE, 1.0, "nf4"), dtype)
    xhat = q.dequantize(q.quantize(x, "nf4", 256))
    assert xhat.dtype == dtype and xhat.shape == SHAPE
  scalar = q.dequantize(q.quantize(jnp.float32(-2.5), "int8"))
  assert scalar.shape == () and float(scalar) == -2.5


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_stochastic_rounding_is_unbiased(fmt):
  x = _sample(4, (256,), 1.0, fmt)
  x /= np.max(np.abs(x))  # block absmax 1, so the levels are the grid
  x[0] = 1.0 if fmt == "dynamic8_unsigned" else -1.0
  seeds = jnp.arange(2000, dtype=jnp.uint32)
  samples = jax.jit(jax.vmap(lambda s: q.dequantize(q.quantize(x, fmt, 256, seed=s))))(seeds)
  samples = np.asarray(samples, np.float64)
  gap = np.max(np.diff(q.format_levels(fmt).astype(np.float64)))
  # Each draw is one of the two levels bracketing x: error below one full gap.
  assert np.all(np.abs(samples - x) <= gap * (1 + REL_SLACK))
  # The mean converges to x: standard error <= gap / (2 sqrt(n)); allow 5 of them.
  tol = 5 * gap / (2 * np.sqrt(len(seeds))) + 1e-7
  np.testing.assert_allclose(samples.mean(0), x, atol=tol, rtol=0)
  # Nearest rounding is deterministic and biased for some elements by more than that.
  nearest = np.asarray(q.dequantize(q.quantize(x, fmt, 256)), np.float64)
  assert np.max(np.abs(nearest - x)) > tol


def test_stochastic_rounding_takes_a_key_and_the_seed_changes_the_rounding():
  key = jax.random.key(1)
  x = _sample(7, (512,), 1.0, "int8")
  codes = [np.asarray(q.quantize(x, "int8", 256, seed=s).codes) for s in (key, 1, 2)]
  assert np.mean(codes[1] != codes[2]) > 0.2 and np.mean(codes[0] != codes[1]) > 0.2


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
  with pytest.raises(ValueError, match=match):
    q.quantized_nbytes(10, **kwargs)


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
  x = _sample(6, SHAPE, 1.0, "int8")
  tree = {"w": x, "layers": (x * 2, x[0]), "step": jnp.array(7, jnp.int32)}
  qt = q.quantize_tree(tree, "int8", 256)
  assert isinstance(qt["w"], q.QuantizedArray) and isinstance(qt["layers"][1], q.QuantizedArray)
  assert qt["step"] is tree["step"]  # non-float leaves pass through by default
  back = q.dequantize_tree(qt)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
    bound = q.max_abs_error_factor("int8") * float(jnp.max(jnp.abs(b))) * (1 + REL_SLACK)
    assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) <= bound
  # `where` as a pytree of bools and as a callable returning one.
  mask = {"w": True, "layers": (False, False), "step": False}
  only_w = q.quantize_tree(tree, "int8", 256, where=mask)
  assert isinstance(only_w["w"], q.QuantizedArray)
  assert not isinstance(only_w["layers"][0], q.QuantizedArray)
  same = q.quantize_tree(tree, "int8", 256, where=lambda t: mask)
  assert jax.tree.structure(same) == jax.tree.structure(only_w)
  with pytest.raises(TypeError, match=r"\['step'\]"):
    q.quantize_tree(tree, "int8", where={"w": True, "layers": (True, True), "step": True})
  with pytest.raises(ValueError, match="`where`"):
    q.quantize_tree(tree, "int8", where={"w": True})
  # Only selected leaves are checked for non-finite values.
  q.quantize_tree({"a": np.array([np.nan]), "b": x}, "int8", 256, where={"a": False, "b": True})


def test_requantize_like():
  x = _sample(8, SHAPE, 1.0, "nf4")
  old = q.quantize(jnp.asarray(x, jnp.bfloat16), "nf4", 256)
  new = q.requantize_like(old, x * 3.0)
  assert (new.format, new.block_size, new.shape, new.dtype) == ("nf4", 256, SHAPE, old.dtype)
  assert q.dequantize(new).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(new.scales), 3.0 * np.asarray(old.scales), rtol=1e-2)
  with pytest.raises(ValueError, match="shape"):
    q.requantize_like(old, x[:3])


def test_jit():
  x = _sample(5, SHAPE, 3.0, "nf4")
  traces = []

  @jax.jit
  def round_trip(x):
    traces.append(None)
    return q.dequantize(q.quantize(x, "nf4", 256))

  np.testing.assert_array_equal(round_trip(x), q.dequantize(q.quantize(x, "nf4", 256)))
  round_trip(x + 1.0)
  assert len(traces) == 1
  # QuantizedArray crosses the jit boundary as a pytree with static metadata.
  qa = jax.jit(lambda x: q.quantize(x, "nf4", 256))(x)
  assert isinstance(qa, q.QuantizedArray) and qa.format == "nf4" and qa.shape == SHAPE
  np.testing.assert_array_equal(jax.jit(q.dequantize)(qa), q.dequantize(qa))
  # Trees under jit: values are abstract, so the eager finiteness check is skipped.
  out = jax.jit(lambda t: q.dequantize_tree(q.quantize_tree(t, "nf4", 256)))({"a": x})
  np.testing.assert_array_equal(out["a"], q.dequantize(qa))


@pytest.mark.parametrize("fmt", ["int8", "nf4", "dynamic8"])
@pytest.mark.parametrize(
  "t",
  [
    np.array([-0.0, 1.0], np.float32),
    np.array([np.nan], np.float32),
    np.array([-np.inf, 2.0]),
    np.array([-3], np.int8),
    np.ones((2, 3), jnp.bfloat16),
  ],
)
def test_tie_keeps_every_code_for_any_value_of_t(fmt, t):
  # tie only adds a data dependence: the codes must be bit-identical whatever
  # t holds (signs, NaN, inf, integer or 16-bit types), also under jit where
  # XLA could otherwise fold or reorder.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 300)), jnp.float32)
  qa = q.quantize(x, fmt, 128)
  t = jnp.asarray(t)
  for tied in (q.tie(qa, t), jax.jit(q.tie)(qa, t)):
    np.testing.assert_array_equal(tied.codes, qa.codes)
    np.testing.assert_array_equal(tied.scales, qa.scales)
    np.testing.assert_array_equal(q.dequantize(tied), q.dequantize(qa))


def test_tie_to_an_empty_array_returns_q_itself():
  qa = q.quantize(jnp.ones(10), "int8", 4)
  assert q.tie(qa, jnp.zeros((0, 3))) is qa


def test_tie_on_arrays_keeps_every_value():
  # Float arrays get an exact zero added, integer arrays one OR'ed in.
  t = jnp.asarray([np.nan, 1.0], jnp.float32)
  for x in (jnp.asarray([[1.5, -2.0], [np.inf, 0.25]], jnp.bfloat16), jnp.arange(-3, 3)):
    for tied in (q.tie(x, t), jax.jit(q.tie)(x, t)):
      assert tied.dtype == x.dtype and tied.shape == x.shape
      np.testing.assert_array_equal(tied, x)


@pytest.mark.parametrize(("fmt", "block_size", "splits"), [
    ("int8", 64, True), ("nf4", 64, True), ("int8", 100, False), ("nf4", 40, False)])
def test_layer_slices_are_the_per_layer_quantizations(fmt, block_size, splits):
  # 4 layers of 8 × 24 = 192 elements, quantized as one flat leaf.
  x = np.random.default_rng(0).standard_normal((4, 8, 24)).astype(np.float32)
  flat = q.quantize(x, fmt, block_size)
  assert q.splits_into_layers(flat, 4) is splits
  assert not q.splits_into_layers(flat, 5) and not q.splits_into_layers(flat, 0)
  if not splits:
    return
  stack = q.layer_slices(flat, 4, (8, 24))
  assert stack.codes.shape[0] == 4 and stack.shape == (8, 24)
  for i in range(4):
    one = jax.tree.map(lambda a, i=i: a[i], stack)
    np.testing.assert_array_equal(q.dequantize(one),
                                  q.dequantize(q.quantize(x[i], fmt, block_size)))
  two_axes = q.layer_slices(flat, (2, 2), (8, 24))
  assert two_axes.scales.shape == (2, 2, 192 // block_size)
  back = q.join_layers(stack, x.shape)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(flat), strict=True):
    np.testing.assert_array_equal(a, b)
  assert back.shape == flat.shape
