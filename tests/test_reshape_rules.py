"""``reshape=`` rules (``optax_lowrank.reshape_rules``).

optax's dimension numbers equal our rule forms, ``olr.stacked`` finds the layer
axis anywhere and never mixes layers, and a rule that does not fit a leaf fails
early with the leaf path, its shape and the rule named.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

import optax_lowrank as olr
from optax_lowrank import leaves, reshape_rules

Muon, GaLore = MuonDimensionNumbers, GaLoreDimensionNumbers


SVD4 = olr.svd(4)


def _views(params, spec=SVD4, **kw):
  """``(batch_shape, view_shape, perm)`` of every leaf, ``None`` where not projected."""
  plans = leaves.plan(params, spec, **kw)
  return jax.tree.map(lambda p: (p.batch_shape, p.view_shape, p.perm) if p.projected else None,
                      plans, is_leaf=leaves.is_plan)


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


def test_stacked_layer_axis_out_of_range_names_the_leaf():
  with pytest.raises(ValueError, match=r"leaf 'k' of shape \(3, 4, 5\).*axis 3 is out of range"):
    leaves.plan({"k": jnp.zeros((3, 4, 5))}, olr.svd(2), reshape=olr.stacked(3))
  with pytest.raises(TypeError, match="layer_axis"):
    olr.stacked(1.5)


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


def test_the_names_leaves_exported_are_the_rule_modules():
  assert leaves.NO_MATRIX is reshape_rules.NO_MATRIX and leaves.stacked is olr.stacked
  assert leaves.stack_rule((3, 4, 5), (0,)) == ((0,), (1,), (2,))


@pytest.mark.parametrize("rule, view_kind, want", [
    (((0,), (1,), (2, 3)), "matrix", ((3,), (4, 30), None)),
    (((0,), (1,), (2, 3)), "tensor", ((3,), (4, 5, 6), None)),
    (((0,), (1,), (2, 3)), "vector", ((3,), (120,), None)),
    (((2,), (0,), (1, 3)), "matrix", ((5,), (3, 24), (2, 0, 1, 3))),
    (1, "matrix", ((), (3, 120), None)),
])
def test_normalize_gives_batch_view_and_permutation(rule, view_kind, want):
  assert reshape_rules.normalize(rule, (3, 4, 5, 6), "k", view_kind) == want
