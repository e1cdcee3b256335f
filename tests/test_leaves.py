"""Which leaves are projected (``optax_lowrank.leaves``).

The default never projects a leaf where projection saves nothing, a leaf
selected by ``where`` that no projection can see fails naming it, and
gradients that do not fit the state fail early with the leaf path, its shape
and the argument named.  How rules are parsed: ``test_reshape_rules``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as olr
from optax_lowrank import leaves


def test_a_leaf_where_projection_saves_nothing_gets_inner_at_full_size_unscaled():
  params = {"small": jnp.zeros((4, 64)), "big": jnp.zeros((32, 64))}
  plans = leaves.plan(params, olr.svd(8))
  assert not plans["small"].projected  # clamped rank 4 = its smaller dimension
  assert plans["big"].projected
  g = {"small": jax.random.normal(jax.random.PRNGKey(0), (4, 64)),
       "big": jax.random.normal(jax.random.PRNGKey(1), (32, 64))}
  tx = olr.low_rank(optax.sgd(1.0), olr.svd(8), scale=0.25)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  np.testing.assert_array_equal(u["small"], -g["small"])  # SGD at full size, no α
  # an explicit selection still projects (and clamps)
  explicit = leaves.plan(params, olr.svd(8), where=True)
  assert explicit["small"].projected
  assert explicit["small"].coefficient_shape == (4, 64)  # rank clamped to 4, left side
  # the same for two-sided, tucker and dense specs
  assert not leaves.plan({"w": jnp.zeros((4, 4))}, olr.two_sided(4, 4))["w"].projected
  assert leaves.plan({"w": jnp.zeros((4, 6))}, olr.two_sided(4, 4))["w"].projected
  assert not leaves.plan({"w": jnp.zeros((3, 3))}, olr.tucker(4))["w"].projected
  assert leaves.plan({"w": jnp.zeros((3, 4))}, olr.tucker(4))["w"].projected  # 3x3 < 3x4
  assert not leaves.plan({"w": jnp.zeros((3, 4))}, olr.dense(12))["w"].projected


def test_a_stack_of_vectors_selected_by_where_fails_naming_it():
  with pytest.raises(ValueError, match=r"leaf 'b' of shape \(3, 16\).*stack of vectors"):
    leaves.plan({"b": jnp.zeros((3, 16))}, olr.svd(2), where=True,
                reshape=olr.stacked(under="b"))


def test_a_3d_leaf_without_a_rule_mentions_the_triple_and_the_stacked_rule():
  with pytest.raises(ValueError) as e:
    leaves.plan({"k": jnp.zeros((3, 4, 5))}, olr.svd(2), where=True)
  msg = str(e.value)
  assert "leaf 'k' of shape (3, 4, 5)" in msg and "`where`" in msg
  assert "(batch_axes, row_axes, col_axes)" in msg and "olr.stacked(layer_axis=0)" in msg
  assert "MuonDimensionNumbers" in msg


def test_grads_with_another_tree_fail_with_both_trees_named():
  params = {"a": jnp.zeros((8, 6)), "b": jnp.zeros((6,))}
  tx = olr.galore(1e-2, rank=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"`updates` \(the gradients\) must have the structure"):
    tx.update({"a": jnp.zeros((8, 6))}, state, params)
  with pytest.raises(ValueError, match=r"`params` must have the structure of `updates`"):
    tx.update(params, state, {"a": params["a"]})


@pytest.mark.parametrize("spec", [olr.svd(2), olr.gaussian(2)])
def test_a_transposed_gradient_fails_naming_the_leaf_and_both_shapes(spec):
  params = {"a": jnp.zeros((8, 6))}
  tx = olr.low_rank(optax.adam(1e-2), spec)
  state = tx.init(params)
  bad = {"a": jnp.zeros((6, 8))}
  with pytest.raises(ValueError, match=re.escape(
      "leaf 'a': the gradient (`updates`) has shape (6, 8) but the param has shape (8, 6)")):
    jax.jit(tx.update)(bad, state, params)
  if spec.stored:  # without params, the stored basis knows the shape
    with pytest.raises(ValueError, match=re.escape("state was made by `init` for a param of "
                                                   "shape (8, 6)")):
      tx.update(bad, state)


def test_inject_hyperparams_names_static_args_and_works_with_them():
  params = {"w": jnp.zeros((8, 6))}
  with pytest.raises(TypeError, match=r"`rank` of olr.galore.*static_args=\('rank',\)"):
    optax.inject_hyperparams(olr.galore)(learning_rate=1e-2, rank=2).init(params)
  tx = optax.inject_hyperparams(olr.galore, static_args=("rank",))(learning_rate=1e-2, rank=2)
  state = tx.init(params)
  u, state = jax.jit(tx.update)({"w": jnp.ones((8, 6))}, state, params)
  assert u["w"].shape == (8, 6)
  assert optax.tree.get(state, "mu")["w"].shape == (8, 2)
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(olr.natural_galore)(learning_rate=1e-2, rank=2, history=3).init(
        params)


def test_an_int_leaf_is_never_trained_and_never_reaches_adam():
  params = {"w": jnp.ones((8, 6)), "step": jnp.zeros((), jnp.int32),
            "ids": jnp.arange(4, dtype=jnp.int32)}
  loss = lambda p: jnp.sum(p["w"] ** 2) * (1 + p["step"]) + jnp.sum(p["ids"]) * 0
  grads = jax.grad(loss, allow_int=True)(params)
  assert grads["step"].dtype == jax.dtypes.float0
  cases = [olr.galore(1e-2, rank=2),
           olr.low_rank(optax.adam(1e-2), olr.gaussian(2), where=lambda path, leaf: path == ("w",),
                        on_refresh="reset", refresh_every=1),
           olr.galore(1e-2, rank=2, where={"w": True, "step": False, "ids": False})]
  for tx in cases:
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(2):  # through a refresh
      u, state = step(grads, state, params)
    assert u["step"].dtype == jnp.int32 and not jnp.any(u["ids"])  # zeros like the param
    assert float(jnp.max(jnp.abs(u["w"]))) > 0
    new = optax.apply_updates(params, u)
    assert new["step"].dtype == jnp.int32
    np.testing.assert_array_equal(new["ids"], params["ids"])
  # int gradients (not float0) get a zero update of their dtype
  tx = olr.galore(1e-2, rank=2)
  ints = {**grads, "step": jnp.ones((), jnp.int32), "ids": jnp.ones(4, jnp.int32)}
  u, _ = jax.jit(tx.update)(ints, tx.init(params), params)
  assert u["ids"].dtype == jnp.int32 and not jnp.any(u["ids"])
  # selecting it explicitly is an error naming it
  with pytest.raises(TypeError, match="leaf 'ids' of shape"):
    leaves.plan(params, olr.dense(2), where={"w": True, "step": False, "ids": True})


@pytest.mark.parametrize("spec, shape, reason", [
    (olr.svd(2), (5,), "has 1 axes and cannot be projected by a matrix projection"),
    (olr.svd(2), (), "has 0 axes and cannot be projected by a matrix projection"),
    (olr.tucker(2), (5,), "tucker needs ≥ 2 axes"),
])
def test_a_leaf_no_projection_sees_fails_when_selected(spec, shape, reason):
  with pytest.raises(ValueError, match=re.escape(
      f"leaf 'x' of shape {shape} is selected by `where` but {reason}")):
    leaves.plan({"x": jnp.zeros(shape)}, spec, where=True)
  assert not leaves.plan({"x": jnp.zeros(shape)}, spec)["x"].projected  # the default skips it


def test_dense_sees_any_leaf_as_one_vector_but_projects_vectors_only_when_selected():
  params = {"b": jnp.zeros((6,)), "w": jnp.zeros((4, 6))}
  plans = leaves.plan(params, olr.dense(3))
  assert not plans["b"].projected
  assert plans["w"].projected and plans["w"].view_shape == (24,)
  assert leaves.plan(params, olr.dense(3), where=True)["b"].view_shape == (6,)


def test_an_empty_leaf_is_never_projected():
  plans = leaves.plan({"e": jnp.zeros((0, 8)), "s": jnp.zeros((2, 0, 8))}, olr.svd(2), where=True,
                      reshape=((0,), (1,), (2,)))
  assert not plans["e"].projected and not plans["s"].projected
