"""Tests for optax_lowrank.quantized_merge: single merges into a quantized base.

A stochastic merge is unbiased, a nearest one keeps the kept weight within its
documented grid, small updates accumulate in the residual, and a merge given
the basis of ``Λ`` does not count the residual's part in it twice.  Training
through many merges is tested in ``test_quantized_training.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lowrank as olr
from optax_lowrank import adapters
from optax_lowrank import quantization as q
from optax_lowrank import quantized_merge as qm

DEFAULT = qm.DEFAULT_MERGE_RULE


def _random_base(seed, shape, fmt, rule, block_size):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return x, qm.quantize_base_array(x, fmt, block_size, rule)


def _kept(qb):
  """The kept weight (codes + residual) of a QuantizedBase, in its shape."""
  return np.asarray(qm._kept_blocks(qb)).ravel()[: qb.size].reshape(qb.shape)


def gap_of(fmt):
  return 1.0 if fmt == "int8" else float(np.max(np.diff(q.NF4_LEVELS.astype(np.float64))))


def _gap_bound(qb):
  """Per element: the largest level gap of the format in its block's units.

  int8 levels are ``c · s_b`` (gap ``s_b``); nf4 levels ``ℓ · s_b`` with the
  largest gap of the NF4 table.
  """
  gap = gap_of(qb.format)
  scales = np.repeat(np.asarray(qb.scales, np.float64), qb.block_size)[: qb.size]
  return (gap * scales).reshape(qb.shape)


def _nearest_values(kept, qb):
  """Values of the nearest levels of ``kept`` on ``qb``'s block scales (NumPy)."""
  scales = np.repeat(np.asarray(qb.scales, np.float64), qb.block_size)[: qb.size]
  levels = q.format_levels(qb.format).astype(np.float64)
  if qb.format == "int8":
    levels = levels * 127.0
  y = kept.ravel() / np.where(scales > 0, scales, 1.0)
  best = levels[np.argmin(np.abs(y[:, None] - levels[None, :]), axis=1)]
  return (best * scales).reshape(qb.shape)


@settings(max_examples=6)  # each new (format, bits, shape, block) compiles 4 programs
@given(
    fmt=st.sampled_from(qm.MERGE_FORMATS),
    bits=st.sampled_from([0, 2, 4, 8]),
    shape=st.sampled_from([(5, 7), (4, 3, 10)]),
    block_size=st.sampled_from([7, 64]),
    seed=st.integers(0, 2**16),
)
def test_encoding_codes_are_nearest_and_kept_weight_within_grid(fmt, bits, shape, block_size,
                                                               seed):
  rule = qm.MergeRule("nearest", "keep", bits)
  x, qb = _random_base(seed, shape, fmt, rule, block_size)
  # The forward pass sees the nearest levels of x on the block scales (for b = 0
  # exactly what plain quantization gives; with a residual the scales are a
  # little larger, so that each block's extreme element is a kept point).
  deq = np.asarray(q.dequantize(qb))
  np.testing.assert_allclose(deq, _nearest_values(x, qb), rtol=0, atol=1e-6)
  if bits == 0:
    np.testing.assert_array_equal(deq, q.dequantize(q.quantize(x, fmt, block_size)))
  # The kept weight is within 2^-(b+1) of a gap of x (1/2 a gap without residual).
  err = np.abs(_kept(qb) - x)
  # (slack: float32 round-off, 1e-5 of the block absmax, as in test_quantization)
  absmax = _gap_bound(qb) * (127.0 if fmt == "int8" else 1.0 / gap_of(fmt))
  assert np.all(err <= _gap_bound(qb) * 2.0 ** -(bits + 1) + 1e-5 * absmax)
  # Bytes: codes, scales and b bits per (padded) element.
  padded = qb.n_blocks * block_size
  codes = padded if fmt == "int8" else math.ceil(padded / 2)
  assert q.nbytes(qb) == codes + 4 * qb.n_blocks + math.ceil(padded * bits / 8)
  # A merge of a zero update changes nothing (kept scales, nearest rounding).
  again = qm.merge_update(qb, q.dequantize(qb))
  np.testing.assert_array_equal(again.codes, qb.codes)
  np.testing.assert_array_equal(_kept(again), _kept(qb))


def test_feedback_accumulates_updates_below_half_a_gap():
  # Twenty int8 merges of 0.05..0.15 of a gap each, toward zero (so no block
  # outgrows its scale): nearest rounding without a residual never moves a
  # code; with one, the kept weight follows the sum and every code is the
  # nearest level of the kept weight.
  x, with_fb = _random_base(1, (16, 16), "int8", qm.MergeRule("nearest", "keep", 4), 64)
  without = qm.quantize_base_array(x, "int8", 64, qm.MergeRule("nearest", "keep", 0))
  gap = _gap_bound(with_fb)
  rng = np.random.default_rng(0)
  start, total = np.asarray(q.dequantize(with_fb)), np.zeros(x.shape)
  start_without, scales = np.asarray(q.dequantize(without)), np.asarray(with_fb.scales)
  for _ in range(20):
    step = (-np.sign(x) * rng.uniform(0.05, 0.15, x.shape) * gap).astype(np.float32)
    total += step
    with_fb = qm.merge_update(with_fb, q.dequantize(with_fb) + step)
    without = qm.merge_update(without, q.dequantize(without) + step)
  np.testing.assert_array_equal(q.dequantize(without), start_without)
  np.testing.assert_array_equal(with_fb.scales, scales)
  # Each merge rounds the kept weight to a grid of gap/16: at most gap/32 each.
  kept = _kept(with_fb)
  assert np.all(np.abs(kept - (x + total)) <= 20 * gap / 32 * (1 + 1e-4))
  np.testing.assert_allclose(q.dequantize(with_fb), _nearest_values(kept, with_fb),
                             rtol=0, atol=1e-6)
  assert np.mean(np.abs(np.asarray(q.dequantize(with_fb)) - start) > 0.5 * gap) > 0.9


@pytest.mark.parametrize("bits", [0, 4])
def test_stochastic_merge_is_unbiased(bits):
  """E[kept after merge] = kept + Δ, checked on 4096 seeds with a 5σ bound."""
  rule = qm.MergeRule("stochastic", "keep", bits)
  x, qb = _random_base(2, (8, 32), "int8", rule, 64)
  rng = np.random.default_rng(3)
  gap = _gap_bound(qb)
  # Updates of a fraction of a grid step, where nearest rounding is most biased;
  # toward zero near the block absmax, where the table ends (see MergeRule).
  grid_step = gap / 2**bits
  u = rng.uniform(-0.45, 0.45, x.shape)
  outer = np.abs(_kept(qb)) > 0.9 * np.repeat(np.asarray(qb.scales), 64).reshape(x.shape) * 127
  u = np.where(outer, -np.sign(x) * np.abs(u), u)
  delta = (u * grid_step).astype(np.float32)
  merged = q.dequantize(qb) + delta
  seeds = jnp.arange(4096, dtype=jnp.uint32)
  kept = jax.jit(jax.vmap(lambda s: qm._kept_blocks(qm.merge_update(qb, merged, seed=s))))(seeds)
  kept = np.asarray(kept, np.float64).reshape(len(seeds), -1)[:, : qb.size].reshape(
      (len(seeds),) + x.shape)
  expected = _kept(qb).astype(np.float64) + delta
  # One stochastic rounding between two grid points has variance <= step²/4.
  sigma = grid_step / 2 / np.sqrt(len(seeds))
  assert np.all(np.abs(kept.mean(0) - expected) <= 5 * sigma + 1e-7)
  # Not vacuous: nearest rounding of the same merge is off by |Δ| where |Δ| < step/2.
  nearest = qm.merge_update(dataclasses.replace(qb, rule=qm.MergeRule("nearest", "keep", bits)),
                           merged)
  assert np.mean(np.abs(_kept(nearest) - expected) > 5 * sigma) > 0.5
  # Deterministic in the seed.
  a, b = (qm.merge_update(qb, merged, seed=7) for _ in range(2))
  np.testing.assert_array_equal(a.codes, b.codes)
  with pytest.raises(ValueError, match="seed"):
    qm.merge_update(qb, merged)


def test_kept_scales_grow_only_where_a_value_outgrows_them():
  x, qb = _random_base(4, (4, 64), "int8", qm.MergeRule("nearest", "keep", 4), 64)  # a block a row
  bump = np.zeros(x.shape, np.float32)
  bump[2, 5] = 3.0 * float(np.max(np.abs(x)))  # only block 2 overflows
  new = qm.merge_update(qb, q.dequantize(qb) + bump)
  changed = np.asarray(new.scales) != np.asarray(qb.scales)
  np.testing.assert_array_equal(changed, [False, False, True, False])
  fresh = qm.merge_update(dataclasses.replace(qb, rule=qm.MergeRule("nearest", "fresh", 4)),
                         q.dequantize(qb) + 1e-3)
  assert np.any(np.asarray(fresh.scales) != np.asarray(qb.scales))


def test_drop_residual_keeps_what_the_forward_pass_reads():
  x, qb = _random_base(0, (4, 4), "nf4", DEFAULT, 8)
  tree = qm.drop_residual({"w": qb, "b": x})
  plain = tree["w"]
  assert type(plain) is q.QuantizedArray and tree["b"] is x
  np.testing.assert_array_equal(q.dequantize(plain), q.dequantize(qb))
  assert q.nbytes(plain) == q.nbytes(qb) - qb.residual.size  # 16 weights: 8 + 8 + 8 bytes


def test_bad_rules_fail_early():
  with pytest.raises(ValueError, match="rounding"):
    qm.MergeRule(rounding="up")
  with pytest.raises(ValueError, match="scales"):
    qm.MergeRule(scales="grow")
  with pytest.raises(ValueError, match="feedback_bits"):
    qm.MergeRule(feedback_bits=3)
  with pytest.raises(ValueError, match="formats"):
    qm.quantize_base_array(jnp.ones((4, 4)), "dynamic8", 64)
  with pytest.raises(ValueError, match="formats"):
    qm.quantize_base_tree({"w": jnp.ones((4, 4))}, "dynamic8", rule=DEFAULT)
  with pytest.raises(TypeError, match="MergeRule"):
    qm.quantize_base_array(jnp.ones((4, 4)), "int8", 64, rule="nearest")
  _, qb = _random_base(0, (4, 4), "int8", DEFAULT, 8)
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    qm.merge_update(qb, jnp.ones((4, 5)))


def test_subspace_part_of_the_residual_is_not_counted_twice():
  # merge_update with a basis adds Δ − P_S r (r the residual, P_S the orthogonal
  # projection onto the span of Sᵀ).  With Δ = 0 the kept weight moves by
  # −P_S r + e, e the re-rounding to the kept grid (|e| <= gap/512 per element),
  # so S·moved = −S·r + S·e: the part of r that S sees is taken out.
  # (the W0 of the drift problem of test_quantized_training, seed 5)
  w0 = jnp.asarray((0.05 * np.random.default_rng(5).standard_normal((24, 16))).astype(np.float32))
  # 8 residual bits: the re-rounding e is 1/256 of a gap, far below r.
  adapter = adapters.quantize_base(adapters.init({"w": w0}, olr.gaussian(4)), "nf4", 64,
                                   rule=qm.MergeRule("nearest", "keep", 8))
  qb, basis = adapter.base["w"], adapters.bases(adapter)["w"]
  residual = jnp.asarray(_kept(qb) - np.asarray(q.dequantize(qb)), jnp.float32)
  new = qm.merge_update(qb, q.dequantize(qb), basis=basis)
  moved = jnp.asarray(_kept(new) - _kept(qb), jnp.float32)
  seen = olr.project(basis, residual)
  factor = np.asarray(basis.factors[1], np.float64)  # right sketch, 16 × 4
  e_norm = float(np.linalg.norm(_gap_bound(qb) / 512))
  bound = np.linalg.norm(factor, 2) * e_norm
  assert float(jnp.linalg.norm(olr.project(basis, moved) + seen)) <= bound * (1 + 1e-4)
  assert float(jnp.linalg.norm(seen)) > 3 * bound  # the check is not vacuous
  # Without the basis the residual stays: the kept weight does not move.
  np.testing.assert_array_equal(_kept(qm.merge_update(qb, q.dequantize(qb))), _kept(qb))


def test_quantize_base_tree_selects_leaves_as_quantize_tree():
  x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
  tree = {"w": x, "b": x[0], "step": np.int32(3)}
  out = qm.quantize_base_tree(tree, "nf4", 64, where={"w": True, "b": False, "step": False})
  assert isinstance(out["w"], qm.QuantizedBase) and out["w"].rule == DEFAULT
  assert out["b"] is tree["b"] and out["step"] is tree["step"]
  np.testing.assert_array_equal(q.dequantize(out["w"]),
                                q.dequantize(qm.quantize_base_array(x, "nf4", 64)))
  with pytest.raises(ValueError, match=r"quantize_base_tree: leaf \['w'\]"):
    qm.quantize_base_tree({"w": np.full((2, 2), np.nan, np.float32)}, "int8", 4)


@pytest.mark.parametrize(("per", "block_size", "bits", "splits"), [
    (12, 12, 2, True), (12, 6, 4, True), (3, 3, 0, True), (3, 3, 8, True),
    (3, 3, 2, False), (3, 3, 4, False), (12, 8, 4, False)])
def test_a_residual_splits_into_layers_only_at_whole_bytes(per, block_size, bits, splits):
  # 3 layers of `per` elements; e.g. 2-bit residuals of 3 elements are 6 bits,
  # not a whole byte, so layer 1's residual would start inside a byte.
  x = np.random.default_rng(1).standard_normal((3, per)).astype(np.float32)
  qb = qm.quantize_base_array(x, "int8", block_size, qm.MergeRule("nearest", "keep", bits))
  assert q.splits_into_layers(qb, 3) is splits
  if splits:
    stack = q.layer_slices(qb, 3, (per,))
    for i in range(3):
      one = jax.tree.map(lambda a, i=i: a[i], stack)
      alone = qm.quantize_base_array(x[i], "int8", block_size, qb.rule)
      np.testing.assert_array_equal(qm._kept_blocks(one), qm._kept_blocks(alone))
    back = q.join_layers(stack, qb.shape)
    assert type(back) is qm.QuantizedBase
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(qb), strict=True):
      np.testing.assert_array_equal(a, b)
