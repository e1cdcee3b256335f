"""Projection specs: shapes, ranks, sides, scaling, subspace accuracy, bad input."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowrank as olr
from optax_lowrank import leaves, projections

ONE_SIDED = {
    "svd": olr.svd,
    "randomized_svd": olr.randomized_svd,
    "gaussian": olr.gaussian,
    "rademacher": olr.rademacher,
    "semi_orthogonal": olr.semi_orthogonal,
    "subspace_iteration": olr.subspace_iteration,
}


def _basis(spec, shape, grad=None, refresh=0, seed=0, dtype=jnp.float64):
  params = {"w": jax.ShapeDtypeStruct(shape, dtype)}
  # Selected explicitly, so that a clamped rank that saves nothing is still projected.
  (p,) = jax.tree.leaves(leaves.plan(params, spec, where=True), is_leaf=leaves.is_plan)
  if grad is None:
    grad = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
  return p, p.make_basis(jax.random.PRNGKey(seed), jnp.asarray(refresh), grad)


@given(
    name=st.sampled_from(sorted(ONE_SIDED)),
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    rank=st.integers(1, 30),
    side=st.sampled_from(["auto", "left", "right"]),
)
def test_one_sided_shapes_sides_and_clamping(name, m, n, rank, side):
  p, b = _basis(ONE_SIDED[name](rank, side=side), (m, n))
  resolved = side if side != "auto" else ("right" if m >= n else "left")
  r = min(rank, m, n)
  if resolved == "left":
    assert b.factors[1] is None and b.factors[0].shape == (m, r)
    assert p.coefficient_shape == (r, n)
  else:
    assert b.factors[0] is None and b.factors[1].shape == (n, r)
    assert p.coefficient_shape == (m, r)
  g = jnp.ones((m, n))
  assert olr.project(b, g).shape == p.coefficient_shape
  assert olr.project_back(b, olr.project(b, g)).shape == (m, n)


def test_auto_side_follows_reference_galore():
  # galore-torch: shape[0] >= shape[1] -> right projector (G Q); else left (P G).
  assert _basis(olr.svd(2), (12, 8))[0].coefficient_shape == (12, 2)
  assert _basis(olr.svd(2), (8, 8))[0].coefficient_shape == (8, 2)
  assert _basis(olr.svd(2), (6, 10))[0].coefficient_shape == (2, 10)


@pytest.mark.parametrize("name", ["svd", "randomized_svd", "semi_orthogonal",
                                  "subspace_iteration"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_orthonormal_specs_have_orthonormal_factors(name, side):
  _, b = _basis(ONE_SIDED[name](5, side=side), (20, 16))
  u = b.factors[0] if side == "left" else b.factors[1]
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("name", ["gaussian", "rademacher"])
def test_sketches_are_isotropic_in_expectation(name):
  # E[SᵀS] = I: average U Uᵀ over many keys. Each entry of the average has
  # standard deviation ~ sqrt(2/(K r)); with K=400, r=8 that is 0.025, so 0.15 is
  # a 6-sigma bound on the largest of 144 entries.
  spec = ONE_SIDED[name](8, side="left")
  mats = [np.asarray(_basis(spec, (12, 30), refresh=k)[1].factors[0]) for k in range(400)]
  mean = np.mean([u @ u.T for u in mats], axis=0)
  np.testing.assert_allclose(mean, np.eye(12), atol=0.15)
  if name == "rademacher":
    np.testing.assert_allclose(np.abs(mats[0]), 1 / np.sqrt(8))


def test_random_bases_are_a_function_of_seed_refresh_and_leaf():
  spec = olr.gaussian(4)
  a = _basis(spec, (10, 6), refresh=3, seed=1)[1].factors[1]
  b = _basis(spec, (10, 6), refresh=3, seed=1)[1].factors[1]
  c = _basis(spec, (10, 6), refresh=4, seed=1)[1].factors[1]
  d = _basis(spec, (10, 6), refresh=3, seed=2)[1].factors[1]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)


def _principal_cos2(u, v):
  s = np.linalg.svd(np.asarray(u).T @ np.asarray(v), compute_uv=False)
  return s**2


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_spans_the_top_singular_subspace(side):
  rng = np.random.default_rng(1)
  g = rng.normal(size=(30, 20))
  _, b = _basis(olr.svd(4, side=side), g.shape, jnp.asarray(g))
  u, _, vt = np.linalg.svd(g)
  exact = u[:, :4] if side == "left" else vt[:4].T
  mine = b.factors[0] if side == "left" else b.factors[1]
  np.testing.assert_allclose(_principal_cos2(exact, mine), 1.0, atol=1e-10)


def test_randomized_svd_recovers_low_rank_plus_noise_subspace():
  rng = np.random.default_rng(2)
  m, n, r = 200, 120, 8
  u = np.linalg.qr(rng.normal(size=(m, r)))[0]
  v = np.linalg.qr(rng.normal(size=(n, r)))[0]
  g = u @ np.diag(np.geomspace(100, 10, r)) @ v.T + 0.1 * rng.normal(size=(m, n))
  _, b = _basis(olr.randomized_svd(r, side="left"), (m, n), jnp.asarray(g))
  exact = np.linalg.svd(g)[0][:, :r]
  assert _principal_cos2(exact, b.factors[0]).mean() >= 0.99


@pytest.mark.parametrize("spec", [olr.svd(3), olr.randomized_svd(3), olr.two_sided(2, 2, "svd"),
                                  olr.tucker(2), olr.semi_orthogonal(3),
                                  olr.subspace_iteration(3)])
def test_zero_gradient_at_refresh_gives_finite_basis(spec):
  _, b = _basis(spec, (9, 7), jnp.zeros((9, 7)))
  for f in b.factors:
    if f is not None:
      assert np.isfinite(np.asarray(f)).all()


def test_tracking_keeps_its_basis_on_a_zero_gradient():
  p, b = _basis(olr.subspace_iteration(3), (9, 7))
  new = p.spec.track(p.view_shape, jax.random.PRNGKey(0), jnp.zeros((9, 7)), b.factors,
                     p.basis_dtype)
  np.testing.assert_array_equal(new[1], b.factors[1])


def test_two_sided_and_tucker_and_dense_shapes():
  p, b = _basis(olr.two_sided(3, 2), (10, 7))
  assert p.coefficient_shape == (3, 2) and b.factors[0].shape == (10, 3)
  p, b = _basis(olr.tucker((2, 3, 4)), (5, 6, 7))
  assert p.coefficient_shape == (2, 3, 4)
  p, b = _basis(olr.tucker(9), (5, 6, 7))  # clamped per mode
  assert p.coefficient_shape == (5, 6, 7)
  p, b = _basis(olr.tucker(9), (2, 3, 40))  # mode 3 unfolding has rank <= 6
  assert p.coefficient_shape == (2, 3, 6)
  p, b = _basis(olr.dense(11), (4, 5))
  assert p.coefficient_shape == (11,) and b.factors[0].shape == (20, 11)


def test_stored_flags():
  assert olr.svd(2).stored and olr.randomized_svd(2).stored and olr.semi_orthogonal(2).stored
  assert not olr.gaussian(2).stored and not olr.rademacher(2).stored
  assert olr.two_sided(2, 2, "svd").stored and not olr.two_sided(2, 2).stored
  assert olr.tucker(2).stored and not olr.dense(3).stored
  assert olr.subspace_iteration(2).stored and olr.subspace_iteration(2).tracks
  assert not olr.svd(2).tracks


def test_specs_are_hashable_and_comparable():
  assert olr.svd(4) == olr.svd(4) and hash(olr.svd(4)) == hash(olr.svd(4))
  assert olr.svd(4) != olr.svd(4, side="left")
  assert olr.gaussian(4) != olr.rademacher(4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: olr.svd(0), "rank"),
        (lambda: olr.svd(-3), "rank"),
        (lambda: olr.svd(2.5), "rank"),
        (lambda: olr.gaussian(4, side="top"), "side"),
        (lambda: olr.two_sided(2, 0), "right_rank"),
        (lambda: olr.two_sided(2, 2, kind="qr"), "kind"),
        (lambda: olr.tucker(()), "ranks"),
        (lambda: olr.tucker((2, 0)), "ranks"),
        (lambda: olr.dense(0), "rank"),
        (lambda: olr.randomized_svd(4, oversample=-1), "oversample"),
        (lambda: olr.randomized_svd(4, power_iters=-1), "power_iters"),
        (lambda: olr.subspace_iteration(4, iters=0), "iters"),
        (lambda: olr.subspace_iteration(4, oversample=-1), "oversample"),
        (lambda: olr.subspace_iteration(0), "rank"),
    ],
)
def test_bad_specs_fail_at_construction(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_tucker_ranks_of_wrong_length_name_the_leaf():
  with pytest.raises(ValueError, match=r"leaf 'k' of shape \(3, 4, 5\).*ranks"):
    leaves.plan({"k": jnp.ones((3, 4, 5))}, olr.tucker((2, 2)))


def test_basis_dtype_is_at_least_float32():
  assert projections.basis_dtype(jnp.bfloat16) == jnp.float32
  assert projections.basis_dtype(jnp.float16) == jnp.float32
  assert projections.basis_dtype(jnp.float64) == jnp.float64


@pytest.mark.tpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_bf16_stack_refresh_holds_no_float32_stack_on_a_bf16_native_compiler(monkeypatch):
  # Projection.refreshed casts each matrix inside the lax.map.  XLA:CPU widens
  # the map's bf16 dynamic-slice and hoists a float32 copy of the whole stack
  # out of the loop (docs/scale.md, GaLore's refresh buffer by buffer); the
  # TPU compiler (deviceless) must hold no such copy for the refresh and the
  # projection after it: its temporaries stay below the bf16 stack's bytes
  # (an f32 copy would be twice them).
  from jax.experimental import topologies

  # no TPU here: skip libtpu's probe of workers and metadata (as test_tpu does)
  for name, value in (("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                      ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    monkeypatch.setenv(name, os.environ.get(name, value))
  shape, spec = (8, 256, 512), olr.svd(8)
  device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]

  def refresh(g):
    b = spec.refreshed(shape, shape[1:], None, jax.random.PRNGKey(0), g, jnp.float32, shape[:1])[0]
    return olr.bases.project(b, g)

  with jax.enable_x64(False), jax.default_device(device):
    compiled = jax.jit(refresh).lower(jax.ShapeDtypeStruct(shape, jnp.bfloat16)).compile()
  assert "f32[8,256,512]" not in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < math.prod(shape) * 2
