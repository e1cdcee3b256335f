"""The numerical kernels behind the specs (``optax_lowrank.subspaces``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optax_lowrank import projections, subspaces


def _orthonormal(key, n, r):
  return jnp.linalg.qr(jax.random.normal(key, (n, r), jnp.float64))[0]


def _planted(key, m, n, r, gap=10.0):
  """An ``m × n`` matrix whose top-``r`` column space is known (the returned ``u``)."""
  ku, kv, kn = jax.random.split(key, 3)
  u, v = _orthonormal(ku, m, r), _orthonormal(kv, n, r)
  return gap * u @ v.T + jax.random.normal(kn, (m, n), jnp.float64) / np.sqrt(n), u


def test_the_specs_module_reexports_the_kernels():
  for name in ("random_factor", "randomized_range", "tracked_range", "subspace_overlap",
               "svd_flops", "randomized_range_flops", "tracked_range_flops"):
    assert getattr(projections, name) is getattr(subspaces, name)


def test_semi_orthogonal_factor_is_orthonormal_and_a_function_of_the_key():
  key = jax.random.PRNGKey(3)
  u = subspaces.random_factor("semi_orthogonal", key, 12, 4, jnp.float64)
  np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-12)
  np.testing.assert_array_equal(u, subspaces.random_factor("semi_orthogonal", key, 12, 4,
                                                           jnp.float64))
  with pytest.raises(ValueError, match="unknown random kind"):
    subspaces.random_factor("uniform", key, 12, 4, jnp.float64)


def test_subspace_overlap_is_one_for_the_same_span_and_zero_for_orthogonal():
  q = _orthonormal(jax.random.PRNGKey(0), 10, 6)
  a, b = q[:, :3], q[:, 3:]
  rotation = _orthonormal(jax.random.PRNGKey(1), 3, 3)
  assert float(subspaces.subspace_overlap((a, None), (a @ rotation, None))) == pytest.approx(1.0)
  assert float(subspaces.subspace_overlap((None, a), (None, b))) == pytest.approx(0.0, abs=1e-12)


def test_tracked_range_moves_towards_the_top_subspace_and_keeps_coordinates():
  g, top = _planted(jax.random.PRNGKey(2), 30, 50, 4)
  start = _orthonormal(jax.random.PRNGKey(5), 30, 4)
  before = float(subspaces.subspace_overlap((start,), (top,)))
  after = float(subspaces.subspace_overlap((subspaces.tracked_range(g, start, 2, True),), (top,)))
  assert after > max(before, 0.99)
  # a basis that already spans the top subspace keeps its own coordinates when aligned
  u = subspaces.top_singular(g, 4, 4)[0]
  np.testing.assert_allclose(subspaces.tracked_range(g, u, 1, True), u, atol=1e-3)
  # a zero gradient leaves the basis as it is
  np.testing.assert_array_equal(subspaces.tracked_range(jnp.zeros_like(g), start, 1, True), start)


def test_randomized_range_spans_the_planted_subspace():
  g, top = _planted(jax.random.PRNGKey(4), 40, 60, 5)
  q = subspaces.randomized_range(g, 5, jax.random.PRNGKey(0), 8, 2)
  assert float(subspaces.subspace_overlap((q,), (top,))) > 0.99


def test_flop_counts():
  assert subspaces.svd_flops(100, 30) == subspaces.svd_flops(30, 100) == 6 * 100 * 900 + 20 * 27000
  assert subspaces.qr_flops(10, 3) == 4 * 10 * 9 - 36
  # a sketch as wide as the matrix falls back to the exact SVD, and so does its count
  assert subspaces.randomized_range_flops(40, 20, 8, 16, 2) == subspaces.svd_flops(40, 20)
  assert subspaces.randomized_range_flops(400, 200, 8, 8, 2) < subspaces.svd_flops(400, 200)
  assert subspaces.tracked_range_flops(64, 96, 8, 2, False) == 2 * (
      4 * 64 * 96 * 8 + subspaces.qr_flops(64, 8))


@settings(max_examples=20)
@given(signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=4, max_size=4),
       iters=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_tracked_range_follows_the_signs_of_its_start(signs, iters, seed):
  """Flipping a starting column flips that column of the result (the QR's signs are fixed).

  So a column that did not move stays where it was; a raw Householder QR picks its
  signs from the data instead and flips columns whenever the gradient's entries change sign.
  """
  g, _ = _planted(jax.random.PRNGKey(seed), 20, 30, 4)
  u = _orthonormal(jax.random.PRNGKey(seed + 1), 20, 4)
  d = jnp.asarray(signs)
  np.testing.assert_allclose(subspaces.tracked_range(g, u * d, iters, False),
                             subspaces.tracked_range(g, u, iters, False) * d, atol=1e-12)
