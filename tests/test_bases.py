"""project / project_back / transport: the shared core of both paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowrank as olr
from optax_lowrank import bases, leaves

SPECS = [
    olr.svd(3, side="left"), olr.svd(3, side="right"), olr.randomized_svd(3),
    olr.gaussian(3), olr.rademacher(3, side="left"), olr.semi_orthogonal(3),
    olr.two_sided(2, 3), olr.two_sided(3, 2, kind="svd"), olr.tucker(2), olr.dense(5),
]


def _plan_and_basis(spec, shape, seed=0, reshape=None, where=True):
  # Selected explicitly: these tests are about the bases of every shape, including
  # those where the clamped rank reaches the full size (not projected by default).
  g = jnp.asarray(np.random.default_rng(seed).normal(size=shape))
  tree = leaves.plan({"w": g}, spec, where=where, reshape=reshape)
  (p,) = jax.tree.leaves(tree, is_leaf=leaves.is_plan)
  return p, p.make_basis(jax.random.PRNGKey(seed), jnp.asarray(0), g), g


@given(spec=st.sampled_from(SPECS), m=st.integers(2, 12), n=st.integers(2, 12),
       seed=st.integers(0, 1000))
def test_project_back_is_the_transpose_of_project(spec, m, n, seed):
  # <S g, c> == <g, Sᵀ c> for every spec: project_back is exactly the adjoint.
  p, b, g = _plan_and_basis(spec, (m, n), seed)
  c = jnp.asarray(np.random.default_rng(seed + 1).normal(size=p.coefficient_shape))
  lhs = jnp.vdot(olr.project(b, g), c)
  rhs = jnp.vdot(g, olr.project_back(b, c))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_one_sided_formulas():
  p, b, g = _plan_and_basis(olr.svd(2, side="left"), (5, 4))
  pm = b.factors[0].T  # P ∈ R^{r×m}
  np.testing.assert_allclose(olr.project(b, g), pm @ g, atol=1e-12)
  c = jnp.ones((2, 4))
  np.testing.assert_allclose(olr.project_back(b, c), pm.T @ c, atol=1e-12)
  p, b, g = _plan_and_basis(olr.svd(2, side="right"), (5, 4))
  q = b.factors[1]
  np.testing.assert_allclose(olr.project(b, g), g @ q, atol=1e-12)
  np.testing.assert_allclose(olr.project_back(b, jnp.ones((5, 2))), jnp.ones((5, 2)) @ q.T)


def test_two_sided_is_kronecker_map():
  # vec_r(L G R) = (L ⊗ Rᵀ) vec_r(G) with row-major vec.
  p, b, g = _plan_and_basis(olr.two_sided(2, 3), (5, 4))
  lm, r = b.factors[0].T, b.factors[1]
  s = np.kron(lm, r.T)
  np.testing.assert_allclose(olr.project(b, g).reshape(-1), s @ np.asarray(g).reshape(-1),
                             atol=1e-12)


def test_dense_is_a_matrix_on_vec():
  p, b, g = _plan_and_basis(olr.dense(7), (3, 4))
  s = np.asarray(b.factors[0]).T  # k × mn
  np.testing.assert_allclose(olr.project(b, g), s @ np.asarray(g).reshape(-1), atol=1e-12)


def test_tucker_round_trip_is_identity_on_exact_multilinear_rank():
  rng = np.random.default_rng(3)
  core = rng.normal(size=(2, 3, 2))
  us = [np.linalg.qr(rng.normal(size=(n, r)))[0] for n, r in [(6, 2), (7, 3), (5, 2)]]
  x = np.einsum("abc,Aa,Bb,Cc->ABC", core, *us)
  tree = leaves.plan({"k": jnp.asarray(x)}, olr.tucker((2, 3, 2)), where=True)
  (p,) = jax.tree.leaves(tree, is_leaf=leaves.is_plan)
  b = p.make_basis(jax.random.PRNGKey(0), jnp.asarray(0), jnp.asarray(x))
  np.testing.assert_allclose(olr.project_back(b, olr.project(b, jnp.asarray(x))), x, atol=1e-10)


def test_reshape_rule_views_a_3d_kernel_as_a_matrix():
  spec = olr.svd(2, side="left")
  for rule, view in [(1, (4, 15)), (((0, 2), (1,)), (20, 3))]:
    p, b, g = _plan_and_basis(spec, (4, 3, 5), reshape=rule)
    assert p.view_shape == view
    c = olr.project(b, g)
    back = olr.project_back(b, c)
    assert back.shape == (4, 3, 5)
    # the projector is idempotent: projecting the back-projection changes nothing
    np.testing.assert_allclose(olr.project(b, back), c, atol=1e-12)


def test_transport_moves_a_vector_into_the_new_span():
  # For orthonormal bases, U_new · transport(c) is the orthogonal projection of
  # U_old · c onto span(U_new).
  spec = olr.svd(3, side="left")
  _, old, _ = _plan_and_basis(spec, (8, 5), seed=1)
  _, new, _ = _plan_and_basis(spec, (8, 5), seed=2)
  c = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5)))
  moved = bases.transport(bases.transport_matrices(old, new), c)
  u_new = np.asarray(new.factors[0])
  full = np.asarray(olr.project_back(old, c))
  np.testing.assert_allclose(olr.project_back(new, moved), u_new @ u_new.T @ full, atol=1e-12)
  # identical bases: transport is the identity; second moments stay non-negative
  same = bases.transport(bases.transport_matrices(old, old), c)
  np.testing.assert_allclose(same, c, atol=1e-12)
  nu = bases.transport(bases.transport_matrices(old, new), jnp.abs(c), second_moment=True)
  assert (np.asarray(nu) >= 0).all()


def test_mismatched_shapes_raise():
  _, b, _ = _plan_and_basis(olr.svd(2), (5, 4))
  with pytest.raises(ValueError, match="does not match the basis"):
    olr.project(b, jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="do not match the basis"):
    olr.project_back(b, jnp.ones((3, 3)))


def test_low_precision_inputs_accumulate_in_float32():
  g = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.bfloat16)
  (p,) = jax.tree.leaves(leaves.plan({"w": g}, olr.svd(2), where=True), is_leaf=leaves.is_plan)
  b = p.make_basis(jax.random.PRNGKey(0), jnp.asarray(0), g)
  assert b.factors[1].dtype == jnp.float32
  c = olr.project(b, g)
  assert c.dtype == jnp.float32 and p.coefficient_dtype == jnp.float32


def test_factor_bytes():
  _, b, _ = _plan_and_basis(olr.svd(2), (6, 4))
  assert bases.factor_bytes(b) == 4 * 2 * 8
  assert bases.factor_bytes(None) == 0
