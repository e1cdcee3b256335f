"""GaLore on the model kinds users bring (``examples/models``), with defaults or one argument.

On each kind (a linen ``nn.scan`` transformer with ``TrainState``, an NNX
``nnx.vmap``/``nnx.scan`` stack, an Equinox ``filter_vmap`` stack, a
MaxText-layout tree with the layer axis in the middle) every stacked kernel is
projected per layer, no ``(layers, d)`` leaf is projected, training lowers the
loss, and the adapter path plans the same leaves.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_lowrank as olr
from examples.models import equinox_vmap, linen_scan, maxtext_layout, nnx_scan
from optax_lowrank import adapters, leaves

RANK = 8


def _low_rank_state(opt_state) -> olr.LowRankState:
  (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s,
                                                                                  olr.LowRankState))
              if isinstance(s, olr.LowRankState)]
  return state


def _check_per_layer(bases, params, layers: int, layer_axis: int) -> None:
  """Every stacked kernel has one basis per layer; no 2-D leaf of a stack has one."""
  flat_b = jax.tree.leaves(bases, is_leaf=lambda x: x is None or isinstance(x, olr.Basis))
  flat_p = jax.tree_util.tree_flatten_with_path(leaves.unwrap_variables(params))[0]
  assert len(flat_b) == len(flat_p)
  stacked = 0
  for (path, w), b in zip(flat_p, flat_b):
    name = "/".join(leaves.path_names(path))
    if w.ndim >= 3 and path_tail(path) in ("kernel", "weight"):
      assert b is not None and b.batch_shape == (layers,), name
      assert b.perm is None if layer_axis == 0 else b.perm[0] == layer_axis, name
      stacked += 1
    elif w.ndim == 2 and w.shape[layer_axis] == layers and w.shape[1 - layer_axis] != 256:
      assert b is None, f"{name} {w.shape}: a stack of vectors was projected"
  assert stacked >= 2


def path_tail(path) -> str:
  return leaves.path_names(path)[-1]


def _decreases(losses) -> None:
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def _plans_agree(params, **kw) -> None:
  """The adapter path plans exactly the leaves (and stacks) the gradient path does."""
  a = adapters.init(params, olr.gaussian(RANK), **kw).plans
  b = leaves.plan(params, olr.gaussian(RANK), **kw)
  view = lambda p: (p.projected, p.batch_shape, p.view_shape, p.perm)
  assert jax.tree.map(view, a, is_leaf=leaves.is_plan) == jax.tree.map(view, b,
                                                                        is_leaf=leaves.is_plan)


def test_linen_scan_with_train_state_needs_no_argument():
  config = linen_scan.Config()
  state = linen_scan.create_state(olr.galore(1e-2, rank=RANK))
  _check_per_layer(_low_rank_state(state.opt_state).bases, state.params, config.layers, 0)
  tokens = linen_scan.batch(config)
  losses = []
  for _ in range(2):
    state, loss = linen_scan.train_step(state, tokens)
    losses.append(float(loss))
  _decreases(losses)
  _plans_agree(state.params)


def _expected_galore_bytes(params, layers: int) -> int:
  """GaLore's state from the shapes alone: per stacked matrix ``m×n`` (or 2-D leaf) with
  ``r = min(8, m, n)`` below ``min(m, n)``, Adam's two moments on ``max(m,n)·r``
  coefficients plus a ``min(m,n)·r`` projector; Adam at full size elsewhere; float32."""
  total = 0
  for w in jax.tree.leaves(leaves.unwrap_variables(params)):
    if w.ndim >= 3:  # (L, ...) kernels: the rest split where the matrix is closest to square
      rest = w.shape[1:]
      splits = [(int(np.prod(rest[:k])), int(np.prod(rest[k:]))) for k in range(1, len(rest))]
      m, n = min(splits, key=lambda mn: abs(np.log(mn[0]) - np.log(mn[1])))
      count = layers
    elif w.ndim == 2 and w.shape[0] != layers:
      (m, n), count = w.shape, 1
    else:
      total += 2 * 4 * int(np.prod(w.shape))
      continue
    r = min(RANK, m, n)
    if r == min(m, n):  # projection would save nothing: Adam at full size
      total += 2 * 4 * int(np.prod(w.shape))
    else:
      total += count * 4 * (2 * max(m, n) * r + min(m, n) * r)
  return total + 4 + 8 + 4  # low_rank's count and key, Adam's count


def test_linen_scanned_transformer_state_is_under_30_percent_of_adam():
  config = linen_scan.Config()
  params = linen_scan.abstract_params(config)
  galore = olr.memory.state_bytes(olr.galore(1e-2, rank=RANK), params).total
  adam = olr.memory.state_bytes(optax.adam(1e-2), params).total
  size = sum(int(np.prod(w.shape)) for w in jax.tree.leaves(params))
  assert adam == 2 * 4 * size + 4
  assert galore == _expected_galore_bytes(params, config.layers)
  assert galore <= 0.30 * adam, galore / adam


def test_nnx_scan_stack_needs_no_argument_and_its_adapter_refreshes_from_full_grads():
  model, optimizer = nnx_scan.make(olr.galore(1e-2, rank=RANK))
  params = nnx.state(model, nnx.Param)
  _check_per_layer(_low_rank_state(optimizer.opt_state).bases, params, 4, 0)
  x, y = nnx_scan.data()
  _decreases([float(nnx_scan.train_step(model, optimizer, x, y)) for _ in range(2)])
  _plans_agree(params)

  # The adapter path: an SVD basis needs the full weight gradient of the converted model.
  model = nnx_scan.Model(rngs=nnx.Rngs(0))
  loss_and_grad = nnx.jit(nnx.value_and_grad(nnx_scan.loss_fn))
  _, grads = loss_and_grad(model, x, y)
  adapter = adapters.init(nnx.state(model, nnx.Param), olr.svd(4), grads=grads)
  olr.nnx.to_low_rank(model, adapter)
  assert model.blocks.up.lam.shape == (4, 4, 64)   # one Λ per layer
  lam = jax.random.normal(jax.random.PRNGKey(3), (4, 4, 64), jnp.float32) * 0.1
  model.blocks.up.lam.set_value(lam)               # as if trained
  loss, lam_grads = loss_and_grad(model, x, y)
  with pytest.raises(ValueError, match="olr.nnx.full_weight_grad"):
    olr.nnx.refresh_adapter(model, adapter, grads=lam_grads)
  full = olr.nnx.full_weight_grad(nnx_scan.loss_fn, model, x, y)
  assert full["blocks"]["up"]["kernel"].shape == (4, 32, 64)
  adapter = olr.nnx.refresh_adapter(model, adapter, grads=full)
  assert olr.nnx.merge is olr.nnx.refresh_adapter
  assert not np.any(np.asarray(model.blocks.up.lam.get_value()))  # Λ = 0 after the merge
  # W0 + SᵀΛ was folded in: the same function (float32 weights: rounding of the sum)
  np.testing.assert_allclose(loss_and_grad(model, x, y)[0], loss, rtol=1e-5)


def test_equinox_filter_vmap_stack_with_the_stacked_rule():
  model = equinox_vmap.Model(key=jax.random.PRNGKey(0))
  tx = olr.galore(1e-2, rank=RANK, reshape=olr.stacked())
  params = eqx.filter(model, eqx.is_array)
  state = tx.init(params)
  _check_per_layer(state[0].bases, params, 4, 0)
  step = equinox_vmap.make_step(tx)
  x, y = equinox_vmap.data()
  losses = []
  for _ in range(2):
    model, state, loss = step(model, state, x, y)
    losses.append(float(loss))
  _decreases(losses)
  _plans_agree(params, reshape=olr.stacked())


def test_maxtext_layout_with_the_layer_axis_in_the_middle():
  params = maxtext_layout.init()
  rule = olr.stacked(layer_axis=1)
  tx = olr.galore(1e-2, rank=RANK, reshape=rule)
  state = tx.init(params)
  _check_per_layer(state[0].bases, params, maxtext_layout.LAYERS, 1)
  assert state[0].bases["decoder"]["layers"]["pre_self_attention_layer_norm"]["scale"] is None
  tokens = maxtext_layout.batch()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(maxtext_layout.loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(2):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  _decreases(losses)
  _plans_agree(params, reshape=rule)
  # optax's dimension numbers say the same as the rule (MaxText maps its scanned
  # params to Muon's dimension numbers with the layer axis as a batch axis)
  dims = jax.tree.map(lambda w: optax.contrib.MuonDimensionNumbers(0, 2) if w.ndim == 3 else None,
                      params)
  plans = leaves.plan(params, olr.svd(RANK), reshape=dims)
  assert plans["decoder"]["layers"]["mlp"]["wi"]["kernel"] == leaves.plan(
      params, olr.svd(RANK), reshape=rule)["decoder"]["layers"]["mlp"]["wi"]["kernel"]
