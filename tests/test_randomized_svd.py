"""``olr.randomized_svd``: accuracy of the defaults, dtypes, determinism, bad input.

Accuracy is measured as in ``benchmarks/refresh_accuracy.py``: the squared
cosines of the principal angles between the randomized basis and the exact
top-``rank`` singular subspace of the same side.  The test matrices have a
planted spectrum gap after the rank, the regime the defaults were chosen for.
Speed is measured by the benchmark, never asserted here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lowrank as olr
from optax_lowrank import leaves, projections


def _planted(rng, m, n, r, gap, dtype=np.float32):
  """Rank-``r`` signal (singular values 10 → 2) plus noise whose top singular value is 2/gap."""
  u = np.linalg.qr(rng.normal(size=(m, r)))[0]
  v = np.linalg.qr(rng.normal(size=(n, r)))[0]
  sigma = 2.0 / (gap * (np.sqrt(m) + np.sqrt(n)))
  g = (u * np.geomspace(10.0, 2.0, r)) @ v.T + sigma * rng.normal(size=(m, n))
  return g.astype(dtype)


def _basis(spec, g, seed=0):
  """The factor ``spec`` builds at refresh 0 from gradient ``g``, and its side."""
  params = {"w": jax.ShapeDtypeStruct(g.shape, g.dtype)}
  (p,) = jax.tree.leaves(leaves.plan(params, spec), is_leaf=leaves.is_plan)
  make = jax.jit(lambda x: p.make_basis(jax.random.PRNGKey(seed), jnp.asarray(0), x).factors)
  left, right = make(jnp.asarray(g))
  return (left, "left") if left is not None else (right, "right")


def _exact(g, r, side):
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return u[:, :r] if side == "left" else vt[:r].T


def _cos2(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.svd(a.T @ b, compute_uv=False) ** 2


def test_defaults():
  spec = olr.randomized_svd(8)
  assert (spec.oversample, spec.power_iters) == (16, 2)


@settings(max_examples=10)
@given(
    m=st.integers(32, 80),
    n=st.integers(32, 80),
    rank=st.integers(1, 8),
    side=st.sampled_from(["auto", "left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_defaults_recover_a_planted_subspace(m, n, rank, side, seed):
  # rank + oversample < min(m, n): the range finder does not see the whole space.
  g = _planted(np.random.default_rng(seed), m, n, rank, gap=3.0)
  factor, resolved = _basis(olr.randomized_svd(rank, side=side), g)
  assert factor.dtype == jnp.float32
  assert factor.shape == ((m if resolved == "left" else n), rank)
  assert _cos2(_exact(g, rank, resolved), factor).mean() >= 0.99


@pytest.mark.parametrize(
    "shape, rank, side",
    [((96, 264), 16, "auto"), ((264, 96), 16, "auto"), ((128, 128), 16, "left"),
     ((64, 300), 12, "right")],
)
def test_defaults_on_a_small_gap(shape, rank, side):
  # A gap of 1.5 after the rank, as in the benchmark's low-rank + noise gradient.
  g = _planted(np.random.default_rng(1), *shape, rank, gap=1.5)
  factor, resolved = _basis(olr.randomized_svd(rank, side=side), g)
  cos2 = _cos2(_exact(g, rank, resolved), factor)
  assert cos2.mean() >= 0.99
  np.testing.assert_allclose(np.asarray(factor, np.float64).T @ np.asarray(factor, np.float64),
                             np.eye(rank), atol=1e-5)


def test_oversampling_to_the_full_dimension_is_exact():
  # k = min(rank + oversample, m, n) = n: a sketch would span all of range(G), so the
  # exact SVD is used and the key does not matter.
  g = np.random.default_rng(3).normal(size=(10, 7)).astype(np.float32)
  spec = olr.randomized_svd(3, side="left", oversample=16, power_iters=0)
  factor, side = _basis(spec, g)
  np.testing.assert_allclose(_cos2(_exact(g, 3, side), factor), 1.0, atol=1e-4)
  other, _ = _basis(spec, g, seed=1)
  np.testing.assert_array_equal(np.asarray(factor), np.asarray(other))


def test_bf16_leaf_is_decomposed_in_float32():
  g32 = _planted(np.random.default_rng(4), 40, 96, 4, gap=3.0)
  g16 = jnp.asarray(g32, jnp.bfloat16)
  factor, side = _basis(olr.randomized_svd(4), g16)
  assert factor.dtype == jnp.float32
  # The basis is that of the bf16 gradient, computed in float32.
  exact = _exact(np.asarray(g16.astype(jnp.float32)), 4, side)
  assert _cos2(exact, factor).mean() >= 0.99
  # Through the combinator: float32 basis in the state, bf16 updates out.
  params = {"w": jnp.zeros((40, 96), jnp.bfloat16)}
  tx = olr.low_rank(optax.scale_by_adam(), olr.randomized_svd(4), refresh_every=5)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)({"w": g16}, state, params)
  assert updates["w"].dtype == jnp.bfloat16
  (stored,) = [f for f in state.bases["w"].factors if f is not None]
  assert stored.dtype == jnp.float32
  assert _cos2(exact, stored).mean() >= 0.99


def test_deterministic_for_a_key():
  g = _planted(np.random.default_rng(5), 30, 50, 3, gap=3.0)
  spec = olr.randomized_svd(3)
  a, _ = _basis(spec, g, seed=7)
  b, _ = _basis(spec, g, seed=7)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c, _ = _basis(spec, g, seed=8)
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  # Same subspace all the same.
  assert _cos2(a, c).mean() >= 0.99
  # And the same under jit as eagerly.
  key = jax.random.PRNGKey(7)
  direct = jax.jit(lambda x: projections.randomized_range(x, 3, key, 16, 2))(jnp.asarray(g))
  eager = projections.randomized_range(jnp.asarray(g), 3, key, 16, 2)
  np.testing.assert_allclose(np.asarray(direct), np.asarray(eager), atol=1e-5)


@pytest.mark.parametrize("name", ["oversample", "power_iters"])
@pytest.mark.parametrize("value", [-1, -5, 1.5, True, "2"])
def test_bad_oversample_and_power_iters(name, value):
  with pytest.raises(ValueError, match=name):
    olr.randomized_svd(4, **{name: value})


def test_zero_oversample_and_power_iters_are_allowed():
  g = _planted(np.random.default_rng(6), 20, 30, 2, gap=3.0)
  factor, _ = _basis(olr.randomized_svd(2, oversample=0, power_iters=0), g)
  assert factor.shape == (20, 2) and np.all(np.isfinite(np.asarray(factor)))
