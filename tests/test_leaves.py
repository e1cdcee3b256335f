"""Which leaves are projected and how they are seen (``optax_lowrank.leaves``).

optax's dimension numbers equal our rule forms, the default never projects a
leaf where projection saves nothing and never mixes layers, and bad input fails
early with the leaf path, its shape and the argument named.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

import optax_lowrank as olr
from optax_lowrank import leaves

Muon, GaLore = MuonDimensionNumbers, GaLoreDimensionNumbers


SVD4 = olr.svd(4)


def _views(params, spec=SVD4, **kw):
  """``(batch_shape, view_shape, perm)`` of every leaf, ``None`` where not projected."""
  plans = leaves.plan(params, spec, **kw)
  return jax.tree.map(lambda p: (p.batch_shape, p.view_shape, p.perm) if p.projected else None,
                      plans, is_leaf=leaves.is_plan)


def _mu_shapes(tx, params):
  return jax.tree.map(jnp.shape, optax.tree.get(tx.init(params), "mu"))


STACK = {"qkv": jnp.zeros((3, 16, 2, 8)), "up": jnp.zeros((3, 16, 32)),
         "out": jnp.zeros((2, 8, 3, 16)), "w": jnp.zeros((16, 24))}


@pytest.mark.parametrize("dims, ours, shape", [
    (Muon(1, 2), ((0,), (1,), (2,)), (3, 16, 24)),
    (Muon(1, 2), ((0, 3), (1,), (2,)), (3, 16, 24, 2)),  # every axis not named is a batch axis
    (Muon(reduction_axis=(1,), output_axis=(2, 3)), ((0,), (1,), (2, 3)), (3, 16, 2, 12)),
    (Muon(2, 0), ((1,), (2,), (0,)), (8, 16, 24)),
    (Muon(-2, -1), ((0,), (1,), (2,)), (3, 16, 24)),
    (GaLore(0, (1, 2)), ((0,), (1, 2)), (16, 2, 12)),
    (GaLore((0, 1), 2), 2, (16, 2, 12)),
])
def test_optax_dimension_numbers_are_our_triple_and_pair(dims, ours, shape):
  leaf = {"k": jnp.zeros(shape)}
  want = _views(leaf, reshape=ours)
  assert want["k"] is not None
  assert _views(leaf, reshape=dims) == want
  # pytrees of them, optax's callable (params -> tree) and ours agree too
  assert _views(leaf, reshape={"k": dims}) == want
  assert _views(leaf, reshape=lambda p: jax.tree.map(lambda _: dims, p)) == want
  assert _views(leaf, reshape=lambda path, x: dims) == want


def test_a_pytree_of_dimension_numbers_with_none_leaves():
  dims = {"qkv": Muon(1, (2, 3)), "up": Muon(1, 2), "out": Muon((0, 1), 3), "w": None}
  views = _views(STACK, reshape=dims)
  assert views["qkv"] == ((3,), (16, 16), None)
  assert views["up"] == ((3,), (16, 32), None)
  assert views["out"] == ((3,), (16, 16), (2, 0, 1, 3))
  assert views["w"] == ((), (16, 24), None)  # 2-D: the default
  with pytest.raises(ValueError, match="structure of the params"):
    _views(STACK, reshape={"qkv": Muon(1, 2)})


def test_dimension_numbers_give_the_same_updates_as_the_triple():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 10), jnp.float64)
  g = jax.random.normal(jax.random.PRNGKey(1), (3, 12, 10), jnp.float64)
  outs = []
  for rule in (((0,), (1,), (2,)), Muon(1, 2)):
    tx = olr.galore(1e-2, rank=4, reshape=rule)
    state = tx.init({"w": w})
    outs.append(jax.jit(tx.update)({"w": g}, state, {"w": w})[0]["w"])
  np.testing.assert_array_equal(outs[0], outs[1])


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


def test_the_issue_tree_projects_each_kernel_per_layer_and_no_bias():
  for layers in (4, 16):  # 16 > rank: the bias would be a 16 x 64 matrix without the rule
    params = {"blocks": {"bias": jnp.zeros((layers, 64)), "kernel": jnp.zeros((layers, 64, 64))},
              "embed": jnp.zeros((100, 64))}
    state = olr.galore(1e-2, rank=8, reshape=olr.stacked()).init(params)
    bases = state[0].bases
    assert bases["blocks"]["bias"] is None
    assert bases["blocks"]["kernel"].batch_shape == (layers,)
    assert bases["blocks"]["kernel"].factors[1].shape == (layers, 64, 8)
    assert bases["embed"].batch_shape == ()  # not stacked: an ordinary matrix
    with_under = olr.galore(1e-2, rank=8, reshape=olr.stacked(under="blocks")).init(params)
    assert str(jax.tree.map(jnp.shape, with_under)) == str(jax.tree.map(jnp.shape, state))


@pytest.mark.parametrize("shape, layer_axis, rule", [
    ((3, 16, 32), 0, ((0,), (1,), (2,))),
    ((3, 16, 2, 8), 0, ((0,), (1,), (2, 3))),     # (L, embed, heads, head_dim)
    ((3, 2, 8, 16), 0, ((0,), (1, 2), (3,))),     # (L, heads, head_dim, embed)
    ((16, 3, 32), 1, ((1,), (0,), (2,))),         # MaxText: (embed, layers, mlp)
    ((16, 3, 2, 8), 1, ((1,), (0,), (2, 3))),     # MaxText attention (embed, layers, heads, hd)
    ((2, 8, 3, 16), -2, ((2,), (0, 1), (3,))),    # (heads, head_dim, layers, embed)
    ((3, 16), 0, leaves.NO_MATRIX),               # a stacked bias
])
def test_stacked_rule_with_the_layer_axis_anywhere(shape, layer_axis, rule):
  assert olr.stacked(layer_axis, under="x")(("x", "k"), jnp.zeros(shape)) == rule
  assert olr.stacked(layer_axis, under="x")(("y", "k"), jnp.zeros(shape)) is None


def test_a_stack_of_vectors_selected_by_where_fails_naming_it():
  with pytest.raises(ValueError, match=r"leaf 'b' of shape \(3, 16\).*stack of vectors"):
    leaves.plan({"b": jnp.zeros((3, 16))}, olr.svd(2), where=True,
                reshape=olr.stacked(under="b"))


def test_stacked_layer_axis_out_of_range_names_the_leaf():
  with pytest.raises(ValueError, match=r"leaf 'k' of shape \(3, 4, 5\).*axis 3 is out of range"):
    leaves.plan({"k": jnp.zeros((3, 4, 5))}, olr.svd(2), reshape=olr.stacked(3))
  with pytest.raises(TypeError, match="layer_axis"):
    olr.stacked(1.5)


def test_a_3d_leaf_without_a_rule_mentions_the_triple_and_the_stacked_rule():
  with pytest.raises(ValueError) as e:
    leaves.plan({"k": jnp.zeros((3, 4, 5))}, olr.svd(2), where=True)
  msg = str(e.value)
  assert "leaf 'k' of shape (3, 4, 5)" in msg and "`where`" in msg
  assert "(batch_axes, row_axes, col_axes)" in msg and "olr.stacked(layer_axis=0)" in msg
  assert "MuonDimensionNumbers" in msg


def test_an_axis_out_of_range_reads_as_such():
  with pytest.raises(ValueError, match=re.escape(
      "leaf 'k' of shape (3, 4, 5): `reshape` axis 5 is out of range for a 3-axis leaf")):
    leaves.plan({"k": jnp.zeros((3, 4, 5))}, olr.svd(2), reshape=((0,), (1,), (5,)))
  with pytest.raises(ValueError, match="axis -4 is out of range for a 3-axis leaf"):
    leaves.plan({"k": jnp.zeros((3, 4, 5))}, olr.svd(2), reshape=Muon(-4, 1))


def test_negative_axes_count_from_the_end_like_numpy():
  params = {"k": jnp.zeros((3, 4, 5))}
  assert _views(params, reshape=((0,), (-2,), (-1,))) == _views(params, reshape=((0,), (1,), (2,)))
  assert _views(params, reshape=((-1,), (0,), (1,))) == _views(params, reshape=((2,), (0,), (1,)))
  # an axis named twice once normalized is an error, not silently the last axis
  with pytest.raises(ValueError, match=r"leaf 'k' of shape \(3, 4, 5\).*exactly one"):
    _views(params, reshape=((0,), (2,), (-1,)))


def test_galore_dimension_numbers_must_name_every_axis():
  with pytest.raises(ValueError, match="MuonDimensionNumbers"):
    _views({"k": jnp.zeros((3, 4, 5))}, reshape=GaLore(1, 2))


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


def test_axis_names_seen_at_init_hold_for_plain_arrays_at_update():
  """``nnx.Optimizer`` gives ``init`` Variables (names) but ``update`` plain arrays, and
  ``inject_hyperparams`` rebuilds the transformation each step: the plan stays init's."""
  from flax import nnx

  variables = {"k": nnx.Param(jnp.zeros((3, 8, 6)), out_sharding=("layers", "a", "b"),
                              eager_sharding=False),
               "b": nnx.Param(jnp.zeros((3, 6)))}   # unnamed, beside the stack: 3 vectors
  tx = optax.inject_hyperparams(olr.galore, static_args=("rank",))(learning_rate=1e-2, rank=2)
  state = tx.init(variables)
  plain = leaves.unwrap_variables(variables)
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, plain), state, plain)
  mu = optax.tree.get(state, "mu")
  assert mu["k"].shape == (3, 8, 2) and mu["b"].shape == (3, 6)
