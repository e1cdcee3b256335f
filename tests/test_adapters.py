"""The dual path and the duality theorem (paper 000), in float64.

Tolerance: both paths perform the same arithmetic up to association order
(``Sᵀ(Λ + Δ)`` vs ``SᵀΛ + SᵀΔ``), so they differ by round-off: a few ulps of
float64 (~1e-16) per operation, compounded over a dozen steps of O(1)
weights.  We measure ~1e-15 and assert 1e-10, which is still 9 orders of
magnitude below the size of a single update (~1e-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lowrank as olr
from optax_lowrank import adapters

TOL = 1e-10


def _mlp_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(6, 5))),
            "w2": jnp.asarray(rng.normal(size=(5, 3)) * 0.5),
            "b": jnp.zeros(3)}
  batches = [(jnp.asarray(rng.normal(size=(8, 6))), jnp.asarray(rng.normal(size=(8, 3))))
             for _ in range(4)]

  def loss(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"] - y) ** 2)

  return params, batches, loss


INNERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
    "adafactor": lambda: optax.adafactor(0.05, multiply_by_parameter_scale=False),
    "lion": lambda: optax.lion(0.01),
    "rmsprop": lambda: optax.rmsprop(0.01),
    # gradient-only too: its state is the last gradients (cleared at a refresh)
    "woodbury": lambda: optax.chain(olr.woodbury_precondition(3, 0.1), optax.sgd(0.05)),
}


def _check(result, params):
  assert result.max_deviation <= TOL, result.deviations
  # and the trajectory really moved: the check is not comparing two no-ops
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(result.gradient_params), jax.tree.leaves(params)))
  assert moved > 1e-3


SPECS = {"cor3-left-svd": olr.svd(2, side="left"), "cor4-right-svd": olr.svd(2, side="right"),
         "gaussian": olr.gaussian(2), "semi-orth": olr.semi_orthogonal(3, side="left")}


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_one_sided_duality_for_every_gradient_only_inner(inner):
  params, batches, loss = _mlp_problem()
  result = olr.testing.run_dual(loss, params, INNERS[inner](), SPECS["cor3-left-svd"],
                                batches=batches, steps=9, refresh_every=4, scale=0.5)
  _check(result, params)


@pytest.mark.parametrize("policy", ["keep", "reset", "transport"])
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_one_sided_duality_cor3_cor4_for_every_policy(policy, spec):
  params, batches, loss = _mlp_problem()
  result = olr.testing.run_dual(loss, params, INNERS["adam"](), SPECS[spec], batches=batches,
                                steps=9, refresh_every=4, on_refresh=policy, scale=0.5)
  _check(result, params)


@pytest.mark.parametrize("inner, kind", [("sgd", "gaussian"), ("adafactor", "svd"),
                                         ("adam", "svd")])
def test_two_sided_duality_prop2(inner, kind):
  params, batches, loss = _mlp_problem(1)
  result = olr.testing.run_dual(loss, params, INNERS[inner](), olr.two_sided(2, 3, kind),
                                batches=batches, steps=9, refresh_every=3, on_refresh="keep")
  _check(result, params)


@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_dense_duality_theorem1_on_vectors(inner):
  # Theorem 1 in full generality: a dense S on vec(W), here also on a vector leaf.
  rng = np.random.default_rng(2)
  params = {"v": jnp.asarray(rng.normal(size=(10,))), "m": jnp.asarray(rng.normal(size=(3, 4)))}
  target = jnp.asarray(rng.normal(size=(10,)))

  def loss(p):
    return jnp.sum((p["v"] - target) ** 2) + jnp.sum(jnp.sin(p["m"]) ** 2) + p["v"][:4] @ \
        p["m"][0]

  result = olr.testing.run_dual(loss, params, INNERS[inner](), olr.dense(4),
                                where=lambda path, x: True, steps=10, refresh_every=4,
                                on_refresh="reset")
  _check(result, params)


def test_tucker_duality_on_a_conv_kernel():
  rng = np.random.default_rng(3)
  params = {"k": jnp.asarray(rng.normal(size=(3, 4, 5)))}
  target = jnp.asarray(rng.normal(size=(3, 4, 5)))
  loss = lambda p: jnp.sum(jnp.tanh(p["k"] - target) ** 2)
  result = olr.testing.run_dual(loss, params, optax.adam(0.05), olr.tucker((2, 2, 3)), steps=8,
                                refresh_every=3, on_refresh="transport")
  _check(result, params)


@settings(max_examples=8)  # each example compiles both paths
@given(m=st.integers(2, 7), n=st.integers(2, 7), rank=st.integers(1, 4),
       side=st.sampled_from(["auto", "left", "right"]),
       kind=st.sampled_from(["svd", "gaussian", "rademacher", "semi_orthogonal"]),
       refresh=st.integers(1, 4), seed=st.integers(0, 100))
def test_duality_property(m, n, rank, side, kind, refresh, seed):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(m, n)))}
  a = jnp.asarray(rng.normal(size=(m, n)))
  loss = lambda p: jnp.sum(jnp.cos(p["w"] * a))
  spec = getattr(olr, kind)(rank, side=side)
  result = olr.testing.run_dual(loss, params, optax.adam(0.1), spec, steps=6,
                                refresh_every=refresh, seed=seed)
  assert result.max_deviation <= TOL


@pytest.mark.parametrize("view", ["gradient", "adapter"])
def test_weight_decay_conventions_that_match(view):
  params, batches, loss = _mlp_problem(4)
  result = olr.testing.run_dual(loss, params, optax.adam(0.05), olr.svd(2), batches=batches,
                                steps=9, refresh_every=4, decay=0.01, decay_view=view)
  _check(result, params)


@pytest.mark.parametrize("views", [("gradient", "adapter"), ("adapter", "gradient")])
def test_weight_decay_conventions_that_differ_and_by_how_much(views):
  # After the first step the paths differ by exactly decay·Θ0 (paper 000 eq. 14
  # with Λ0 = 0): the gradient view decays Θ0, the adapter view decays Λ = 0.
  params, batches, loss = _mlp_problem(5)
  decay = 0.01
  result = olr.testing.run_dual(loss, params, optax.adam(0.05), olr.svd(2), batches=batches,
                                steps=9, refresh_every=4, decay=decay, decay_view=views)
  expected = decay * max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(params))
  np.testing.assert_allclose(result.deviations[0], expected, rtol=1e-9)
  assert result.max_deviation > expected  # and it grows from there


def test_merge_folds_lambda_and_restarts_at_zero():
  params, batches, loss = _mlp_problem(6)
  grads = jax.grad(loss)(params, batches[0])
  adapter = adapters.init(params, olr.svd(2), grads=grads)
  lam = jax.tree.map(lambda x: jnp.ones_like(x), adapters.zeros(adapter))
  eff = adapters.materialize(adapter, lam)
  new, lam0 = adapters.merge(adapter, lam, grads)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(lam0))
  for a, b in zip(jax.tree.leaves(adapters.materialize(new, lam0)), jax.tree.leaves(eff)):
    np.testing.assert_allclose(a, b, atol=1e-14)
  assert int(new.refresh_index) == 1


def test_same_bases_as_the_gradient_path_at_every_refresh():
  params, batches, loss = _mlp_problem(7)
  spec = olr.gaussian(2)
  tx = olr.low_rank(optax.sgd(0.1), spec, refresh_every=2, seed=3)
  state = tx.init(params)
  adapter = adapters.init(params, spec, seed=3)
  lam = adapters.zeros(adapter)
  for t in range(6):
    if t and t % 2 == 0:
      adapter, lam = adapters.merge(adapter, lam)
    g = jax.grad(loss)(params, batches[0])
    _, state = tx.update(g, state)
    from optax_lowrank import leaves
    grad_bases = leaves.current_bases(leaves.plan(params, spec), state.bases, state.key,
                                      (state.count - 1) // 2)
    for a, b in zip(jax.tree.leaves(grad_bases), jax.tree.leaves(adapters.bases(adapter))):
      np.testing.assert_array_equal(a, b)


def test_adapter_is_a_pytree_that_jits():
  params, batches, loss = _mlp_problem(8)
  adapter = adapters.init(params, olr.gaussian(2))
  f = jax.jit(adapters.materialize)
  out = f(adapter, adapters.zeros(adapter))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  leaves_, treedef = jax.tree.flatten(adapter)
  assert jax.tree.unflatten(treedef, leaves_).projection == olr.gaussian(2)


def test_bad_input_names_the_leaf():
  params, batches, loss = _mlp_problem(9)
  with pytest.raises(ValueError, match=r"leaf 'w1' of shape \(6, 5\).*grads"):
    adapters.init(params, olr.svd(2))
  grads = jax.grad(loss)(params, batches[0])
  adapter = adapters.init(params, olr.svd(2), grads=grads)
  lam = adapters.zeros(adapter)
  with pytest.raises(ValueError, match=r"leaf 'w1' of shape \(6, 5\).*grads"):
    adapters.merge(adapter, lam)
  bad = dict(lam, w1=jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match=r"leaf 'w1' of shape \(6, 5\): Λ has shape \(2, 2\)"):
    adapters.materialize(adapter, bad)
  with pytest.raises(ValueError, match="does not match the adapter"):
    adapters.materialize(adapter, {"w1": lam["w1"]})
  with pytest.raises(ValueError, match="built with"):
    adapters.materialize(adapter, lam, projection=olr.gaussian(2))
  with pytest.raises(ValueError, match="built with"):
    adapters.merge(adapter, lam, grads, projection=olr.svd(3))


def test_gradient_accumulation_in_the_small_space_equals_the_large_batch_step():
  # low_rank(MultiSteps(inner, k)) accumulates r-sized coefficients; with
  # refresh_every counted in micro-steps (k × the large-batch period) it equals
  # large-batch training on the mean gradient (the map is linear).  Momentum SGD
  # keeps the comparison linear: Adam's m/√v would amplify the 1e-16 difference
  # between two ways of averaging into sign flips of near-zero coefficients.
  params, batches, loss = _mlp_problem(10)
  k, spec = 4, olr.gaussian(2)
  inner = lambda: optax.sgd(0.1, momentum=0.9)
  micro = olr.low_rank(optax.MultiSteps(inner(), k), spec, refresh_every=2 * k)
  large = olr.low_rank(inner(), spec, refresh_every=2)
  ws, s_micro = params, micro.init(params)
  wl, s_large = params, large.init(params)
  acc = s_micro.inner_state.acc_grads
  assert acc["w1"].shape == (6, 2) and acc["w2"].shape == (5, 2)  # coefficient-sized buffers
  for _ in range(5):
    gs = [jax.grad(loss)(ws, b) for b in batches]
    for g in gs:
      u, s_micro = micro.update(g, s_micro, ws)
      ws = optax.apply_updates(ws, u)
    mean = jax.tree.map(lambda *x: sum(x) / k, *[jax.grad(loss)(wl, b) for b in batches])
    u, s_large = large.update(mean, s_large, wl)
    wl = optax.apply_updates(wl, u)
  for a, b in zip(jax.tree.leaves(ws), jax.tree.leaves(wl)):
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_testing_helpers_reject_bad_arguments_and_detect_a_mismatch():
  params, batches, loss = _mlp_problem(11)
  with pytest.raises(ValueError, match="decay_view"):
    olr.testing.run_dual(loss, params, optax.sgd(0.1), olr.svd(2), batches=batches, steps=2,
                         decay_view="both")
  # AdamW-style decay applied differently on the two paths is caught
  with pytest.raises(AssertionError, match="differ by"):
    olr.testing.assert_dual(loss, params, optax.adam(0.05), olr.svd(2), batches=batches,
                            steps=3, decay=0.05, decay_view=("gradient", "adapter"))
  # Adafactor with parameter scaling reads its params. On both paths it sees the
  # same tree (Λ at projected leaves, the weights elsewhere: low_rank with
  # track_coefficients and adapters.inner_params), so even it stays dual.
  result = olr.testing.assert_dual(loss, params, optax.adafactor(0.05), olr.svd(2),
                                   batches=batches, steps=6, refresh_every=2, atol=TOL)
  assert result.max_deviation <= TOL


@pytest.mark.parametrize("fmt, bound", [("int8", 1 / 254), ("nf4", 0.1519)])
def test_quantized_base_materializes_within_the_format_bound_and_survives_merge(fmt, bound):
  # Bound: per element, |Θ0 − deq(q(Θ0))| ≤ factor · absmax of its block; with
  # one block per leaf here, the absmax is the leaf's max |Θ0|.
  rng = np.random.default_rng(12)
  params = {"w": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
  # rule=None: plain codes and scales (the default rule adds a residual, see
  # tests/test_quantized_training.py for its bytes)
  adapter = adapters.quantize_base(adapters.init(params, olr.gaussian(4)), fmt, block_size=256,
                                   rule=None)
  q = adapter.base["w"]
  assert isinstance(q, olr.quantization.QuantizedArray) and q.format == fmt
  assert not isinstance(adapter.base["b"], olr.quantization.QuantizedArray)  # trained leaf
  assert q.nbytes < params["w"].nbytes / (3 if fmt == "int8" else 6)
  lam = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), adapters.zeros(adapter))
  eff = adapters.materialize(adapter, lam)
  exact = params["w"] + olr.project_back(adapters.bases(adapter)["w"], lam["w"])
  err = float(jnp.max(jnp.abs(eff["w"] - exact)))
  assert err <= bound * float(jnp.max(jnp.abs(params["w"]))) * (1 + 1e-5)
  new, lam0 = adapters.merge(adapter, lam)
  assert isinstance(new.base["w"], olr.quantization.QuantizedArray)
  assert new.base["w"].format == fmt
  with pytest.raises(ValueError, match="unquantized"):
    adapters.decay_base(adapter, lam, 0.1)


def test_quantizing_a_non_finite_base_names_the_leaf():
  params = {"w": jnp.ones((8, 8), jnp.float32).at[0, 0].set(jnp.inf)}
  with pytest.raises(ValueError, match=r"w.*\(8, 8\)"):
    adapters.quantize_base(adapters.init(params, olr.gaussian(2)))
