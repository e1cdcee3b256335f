"""The low_rank combinator: maths, refresh, policies, state, where/reshape, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.extend.core import jaxprs_in_params

import optax_lowrank as olr
from optax_lowrank import bases as bases_lib
from optax_lowrank import leaves

PARAMS = {
    "tall": jnp.zeros((12, 8)),
    "wide": jnp.zeros((6, 10)),
    "bias": jnp.zeros((10,)),
}


def grad_stream(params, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
          for _ in range(steps)]


def run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs, states = [], []
  for g in grads:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    outs.append(u)
    states.append(state)
  return params, outs, states, step


def test_sgd_inner_is_projected_gradient_descent():
  # With inner = identity, the update is α · Sᵀ S g, with S from the state.
  tx = olr.low_rank(optax.identity(), olr.svd(3), refresh_every=4, scale=0.5)
  grads = grad_stream(PARAMS, 6)
  _, outs, states, _ = run(tx, PARAMS, grads)
  for g, u, s in zip(grads, outs, states):
    q = np.asarray(s.bases["tall"].factors[1])  # right side for 12x8
    np.testing.assert_allclose(u["tall"], 0.5 * np.asarray(g["tall"]) @ q @ q.T, atol=1e-12)
    p = np.asarray(s.bases["wide"].factors[0])  # left side for 6x10
    np.testing.assert_allclose(u["wide"], 0.5 * p @ p.T @ np.asarray(g["wide"]), atol=1e-12)
    np.testing.assert_allclose(u["bias"], g["bias"])  # not projected, no scale


def test_adam_inner_matches_a_numpy_galore_reference():
  # GaLore Algorithm 1 written out in NumPy on the bases the state holds.
  b1, b2, eps, scale = 0.9, 0.999, 1e-8, 0.25
  tx = olr.low_rank(optax.scale_by_adam(b1, b2, eps), olr.svd(3), refresh_every=3, scale=scale)
  grads = grad_stream(PARAMS, 7, seed=1)
  _, outs, states, _ = run(tx, PARAMS, grads)
  m = np.zeros((12, 3))
  v = np.zeros((12, 3))
  for t, (g, u, s) in enumerate(zip(grads, outs, states), start=1):
    q = np.asarray(s.bases["tall"].factors[1])
    c = np.asarray(g["tall"]) @ q
    m = b1 * m + (1 - b1) * c
    v = b2 * v + (1 - b2) * c * c
    step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(u["tall"], scale * step @ q.T, rtol=1e-10, atol=1e-12)


def test_bases_change_only_on_refresh_steps_and_come_from_that_steps_gradient():
  tx = olr.low_rank(optax.scale_by_adam(), olr.svd(2), refresh_every=3)
  grads = grad_stream(PARAMS, 7, seed=2)
  _, _, states, _ = run(tx, PARAMS, grads)
  qs = [np.asarray(s.bases["tall"].factors[1]) for s in states]
  for t in range(7):
    if t % 3 == 0:
      exact = np.linalg.svd(np.asarray(grads[t]["tall"]))[2][:2].T
      np.testing.assert_allclose(np.abs(exact.T @ qs[t]), np.eye(2), atol=1e-10)
    else:
      np.testing.assert_array_equal(qs[t], qs[t - 1])


DECOMPOSITIONS = {"svd", "qr", "geqrf", "householder_product", "eigh"}


def decomposition_sites(jaxpr, inside_cond=False, out=None):
  """For every decomposition primitive in a jaxpr: whether it sits inside a cond."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in DECOMPOSITIONS:
      out.append(inside_cond)
    for sub in jaxprs_in_params(eqn.params):
      decomposition_sites(sub, inside_cond or eqn.primitive.name == "cond", out)
  return out


@pytest.mark.parametrize("spec", [olr.svd(2), olr.randomized_svd(2), olr.semi_orthogonal(2),
                                  olr.two_sided(2, 2, "svd"), olr.tucker(2)])
def test_decompositions_run_only_inside_the_refresh_cond(spec):
  params = {"w": jnp.zeros((12, 8)), "k": jnp.zeros((3, 4, 5))}
  where = None if isinstance(spec, type(olr.tucker(2))) else {"w": True, "k": False}
  tx = olr.low_rank(optax.scale_by_adam(), spec, where=where)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state).jaxpr
  sites = decomposition_sites(jaxpr)
  assert sites, "expected a decomposition in the update"
  assert all(sites), "a decomposition runs outside lax.cond"


@pytest.mark.parametrize("spec", [olr.gaussian(3), olr.rademacher(3), olr.two_sided(2, 2),
                                  olr.dense(4)])
def test_random_sketches_store_no_projector(spec):
  params = {"w": jnp.zeros((12, 8)), "b": jnp.zeros(8)}
  tx = olr.low_rank(optax.scale_by_adam(), spec)
  state = tx.init(params)
  assert state.bases == {"w": None, "b": None}
  plan = leaves.plan(params, spec)
  coeff = int(np.prod(plan["w"].coefficient_shape))
  sizes = sorted(x.size for x in jax.tree.leaves(state.inner_state))
  # Adam: count + mu, nu over coefficients and the bias: nothing projector-sized.
  assert sizes == sorted([1, coeff, coeff, 8, 8])
  assert state.key.shape == (2,)


@given(m=st.integers(2, 20), n=st.integers(2, 20), rank=st.integers(1, 8),
       side=st.sampled_from(["auto", "left", "right"]))
def test_state_bytes_are_adam_on_coefficients_plus_one_projector(m, n, rank, side):
  params = {"w": jnp.zeros((m, n), jnp.float32)}
  # where=True: projected even where the clamped rank saves nothing (not the default)
  tx = olr.low_rank(optax.scale_by_adam(), olr.svd(rank, side), where=True)
  state = jax.eval_shape(tx.init, params)
  r = min(rank, m, n)
  right = side == "right" or (side == "auto" and m >= n)
  coeff = (m if right else n) * r
  proj = (n if right else m) * r
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  assert nbytes(state.inner_state) == 4 + 2 * 4 * coeff  # int32 count + mu + nu
  assert nbytes(state.bases) == 4 * proj  # exactly one projector
  assert nbytes(state) == 4 + 8 + 4 + 2 * 4 * coeff + 4 * proj  # + low_rank count, key


def test_reset_policy_zeroes_projected_moments_only():
  tx = olr.low_rank(optax.scale_by_adam(), olr.svd(2), refresh_every=3, on_refresh="reset")
  grads = grad_stream(PARAMS, 4, seed=3)
  state = tx.init(PARAMS)
  for g in grads[:3]:
    _, state = tx.update(g, state)
  before = state.inner_state
  _, after = tx.update(grads[3], state)
  mu = after.inner_state.mu
  # after the reset at step 3 the moments hold only this step's contribution
  c = olr.project(after.bases["tall"], grads[3]["tall"])
  np.testing.assert_allclose(mu["tall"], 0.1 * c, atol=1e-12)
  # the bias is not projected: its moments carry on
  np.testing.assert_allclose(mu["bias"], 0.9 * before.mu["bias"] + 0.1 * grads[3]["bias"])
  assert int(after.inner_state.count) == 4


def test_transport_policy_maps_moments_into_the_new_basis():
  tx = olr.low_rank(optax.scale_by_adam(), olr.svd(2), refresh_every=3, on_refresh="transport")
  grads = grad_stream(PARAMS, 4, seed=4)
  state = tx.init(PARAMS)
  for g in grads[:3]:
    _, state = tx.update(g, state)
  old_basis, old_mu, old_nu = state.bases["tall"], state.inner_state.mu["tall"], \
      state.inner_state.nu["tall"]
  _, after = tx.update(grads[3], state)
  new_basis = after.bases["tall"]
  t = bases_lib.transport_matrices(old_basis, new_basis)
  c = olr.project(new_basis, grads[3]["tall"])
  np.testing.assert_allclose(after.inner_state.mu["tall"],
                             0.9 * bases_lib.transport(t, old_mu) + 0.1 * c, atol=1e-12)
  np.testing.assert_allclose(
      after.inner_state.nu["tall"],
      0.999 * bases_lib.transport(t, old_nu, second_moment=True) + 0.001 * c * c, atol=1e-12)


def test_keep_policy_keeps_moments_across_refresh():
  tx = olr.low_rank(optax.scale_by_adam(), olr.gaussian(2), refresh_every=2)
  grads = grad_stream(PARAMS, 3, seed=5)
  state = tx.init(PARAMS)
  for g in grads[:2]:
    _, state = tx.update(g, state)
  _, after = tx.update(grads[2], state)
  b = leaves.current_bases(leaves.plan(PARAMS, olr.gaussian(2)), after.bases, after.key,
                           jnp.asarray(1))
  c = olr.project(b["tall"], grads[2]["tall"])
  np.testing.assert_allclose(after.inner_state.mu["tall"],
                             0.9 * state.inner_state.mu["tall"] + 0.1 * c, atol=1e-12)


def test_where_tree_callable_and_reshape():
  params = {"a": jnp.zeros((6, 4)), "b": jnp.zeros((6, 4)), "k": jnp.zeros((4, 2, 3))}
  tx = olr.low_rank(optax.identity(), olr.svd(2), where={"a": True, "b": False, "k": True},
                    reshape=1)
  state = tx.init(params)
  assert state.bases["b"] is None and state.bases["a"] is not None
  assert state.bases["k"].view_shape == (4, 6)
  tx2 = olr.low_rank(optax.identity(), olr.svd(2), where=lambda path, x: path[-1] == "b")
  state2 = tx2.init(params)
  assert state2.bases["a"] is None and state2.bases["b"] is not None and state2.bases["k"] is None
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state)
  assert u["k"].shape == (4, 2, 3)


def test_bad_input_fails_early_with_leaf_and_argument():
  with pytest.raises(ValueError, match="refresh_every"):
    olr.low_rank(optax.sgd(1.0), olr.svd(2), refresh_every=0)
  with pytest.raises(ValueError, match="on_refresh"):
    olr.low_rank(optax.sgd(1.0), olr.svd(2), on_refresh="forget")
  with pytest.raises(TypeError, match="projection"):
    olr.low_rank(optax.sgd(1.0), "svd")
  tx = olr.low_rank(optax.sgd(1.0), olr.svd(2), where={"tall": True})
  with pytest.raises(ValueError, match="where"):
    tx.init(PARAMS)
  tx = olr.low_rank(optax.sgd(1.0), olr.svd(2), where={"k": True})
  with pytest.raises(ValueError, match=r"leaf 'k' of shape \(4, 2, 3\).*reshape"):
    tx.init({"k": jnp.zeros((4, 2, 3))})
  tx = olr.low_rank(optax.sgd(1.0), olr.svd(2), reshape=((0,), (1,)))
  with pytest.raises(ValueError, match=r"leaf 'k' of shape \(4, 2, 3\).*reshape"):
    tx.init({"k": jnp.zeros((4, 2, 3))})
  tx = olr.low_rank(optax.sgd(1.0), olr.svd(2), where=lambda p, x: True)
  with pytest.raises(ValueError, match=r"leaf 'bias' of shape \(10,\)"):
    tx.init(PARAMS)


@pytest.mark.parametrize("spec, policy", [
    (olr.svd(3), "transport"), (olr.randomized_svd(3), "reset"), (olr.gaussian(3), "transport"),
    (olr.rademacher(3), "keep"), (olr.semi_orthogonal(3), "transport"),
    (olr.two_sided(2, 2), "reset"), (olr.two_sided(2, 2, "svd"), "transport"),
    (olr.dense(5), "transport"), (olr.tucker(2), "reset"),
])
def test_jit_compiles_once_and_zero_gradients_stay_finite(spec, policy):
  tx = olr.low_rank(optax.scale_by_adam(), spec, refresh_every=2, on_refresh=policy)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  grads = [zeros] + grad_stream(PARAMS, 4, seed=6) + [zeros, zeros]
  params, outs, states, step = run(tx, PARAMS, grads)
  assert step._cache_size() == 1
  for u in outs:
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_bfloat16_params_get_bfloat16_updates_and_float32_bases():
  params = {"w": jnp.zeros((12, 8), jnp.bfloat16), "b": jnp.zeros(8, jnp.bfloat16)}
  tx = olr.low_rank(optax.scale_by_adam(), olr.svd(2))
  state = tx.init(params)
  g = jax.tree.map(lambda x: jnp.ones_like(x) + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape),
                   params)
  u, state = jax.jit(tx.update)(g, state)
  assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.bfloat16
  assert state.bases["w"].factors[1].dtype == jnp.float32
  assert state.inner_state.mu["w"].dtype == jnp.float32


def test_extra_args_are_forwarded_to_inner():
  seen = {}

  def update(updates, state, params=None, *, value=None, **extra):
    seen["value"] = value
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = olr.low_rank(inner, olr.svd(2))
  state = tx.init(PARAMS)
  tx.update(grad_stream(PARAMS, 1)[0], state, PARAMS, value=3.0)
  assert seen["value"] == 3.0


def test_unprojected_group_and_history_cleared_at_every_refresh():
  # natural_galore: Woodbury + Adam on coefficients, plain Adam on the bias.
  tx = olr.natural_galore(0.01, rank=2, history=3, refresh_every=3)
  grads = grad_stream(PARAMS, 4, seed=8)
  state = tx.init(PARAMS)
  for g in grads[:3]:
    _, state = tx.update(g, state, PARAMS)
  groups = state[0].inner_state.inner_states
  wood = groups["projected"].inner_state[0]
  assert wood.history["tall"].shape == (3, 12 * 2)  # history of coefficients only
  assert isinstance(wood.history["bias"], optax.MaskedNode)
  assert float(jnp.abs(wood.history["tall"]).sum()) > 0
  mu_before = groups["projected"].inner_state[1].mu["tall"]
  _, after = tx.update(grads[3], state, PARAMS)  # step 3 refreshes
  wood = after[0].inner_state.inner_states["projected"].inner_state[0]
  # the history holds only this step's projected gradient (others were cleared)
  c = olr.project(after[0].bases["tall"], grads[3]["tall"]).reshape(-1)
  rows = np.asarray(wood.history["tall"])
  assert np.count_nonzero(np.abs(rows).sum(axis=1)) == 1
  np.testing.assert_allclose(rows[np.abs(rows).sum(axis=1) > 0][0], c, atol=1e-12)
  # ... while Adam's moments were kept ("keep"): β1·m + (1 − β1)·F⁻¹c, and with
  # the one-row history F = λI + ccᵀ gives F⁻¹c = c / (λ + ‖c‖²)
  mu_after = after[0].inner_state.inner_states["projected"].inner_state[1].mu["tall"]
  nat = (c / (1e-3 + c @ c)).reshape(12, 2)
  np.testing.assert_allclose(mu_after, 0.9 * mu_before + 0.1 * nat, rtol=1e-6, atol=1e-12)


def test_natural_galore_refine_flag_changes_only_the_last_digits_on_easy_data():
  # In float64 with λ = 1e-3 next to O(1) coefficients no damping floor bites
  # (τ = s·eps₆₄ ≈ 7e-16 ≪ λ/‖g‖²), so the refinement step only polishes the
  # solve: both settings agree to ~1e-12 relative.  The flag must reach the
  # preconditioner: the lean variant's jaxpr has fewer products (no H·y, dwᵀH
  # and small residual solve per dtype group).
  grads = grad_stream(PARAMS, 6, seed=3)
  outs = {}
  for refine in (True, False):
    tx = olr.natural_galore(0.01, rank=2, history=3, refresh_every=4, refine=refine)
    state, ups = tx.init(PARAMS), []
    for g in grads:
      u, state = tx.update(g, state, PARAMS)
      ups.append(u["tall"])
    outs[refine] = np.stack(ups)
    jaxpr = str(jax.make_jaxpr(tx.update)(grads[0], tx.init(PARAMS), PARAMS))
    outs[refine, "dots"] = jaxpr.count("dot_general")
  np.testing.assert_allclose(outs[False], outs[True], rtol=1e-10, atol=1e-14)
  assert outs[True, "dots"] > outs[False, "dots"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_recipes_apply_the_learning_rate_in_the_small_space_with_the_same_result(weight_decay):
  # The recipes multiply by −η before mapping back (one full-size pass less);
  # the textbook order chain(low_rank, add_decayed_weights, scale_by_lr) must
  # give the same updates.  float64: agreement to round-off (~1e-16 relative),
  # 1e-12 leaves margin.  A schedule checks that both counts advance together.
  schedule = optax.linear_schedule(0.1, 0.01, 5)
  params = jax.tree.map(lambda x: x + 0.5, PARAMS)
  grads = grad_stream(PARAMS, 6, seed=11)
  recipe = olr.galore(schedule, rank=2, refresh_every=3, weight_decay=weight_decay)
  textbook = optax.chain(
      olr.low_rank(optax.scale_by_adam(eps=1e-6), olr.svd(2), refresh_every=3, scale=0.25),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(schedule),
  )
  s1, s2 = recipe.init(params), textbook.init(params)
  for g in grads:
    u1, s1 = recipe.update(g, s1, params)
    u2, s2 = textbook.update(g, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-12, atol=1e-15)
  if weight_decay:
    with pytest.raises(ValueError, match="params"):
      recipe.update(grads[0], s1)
