"""``olr.separability.check_separable``: the data-flow test of layer coupling, in isolation.

Each coupled transformation below routes one layer's gradient into another
layer's update through a different jaxpr construct (plain arithmetic, a
``scan`` carry, a ``while`` carry, a ``cond`` branch); each separable one keeps
the layers apart. Shapes only: nothing is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowrank as olr
from optax_lowrank import layerwise, separability

LAYER = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}


def _stateless(update):
  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda g, s, p=None: (update(g), s))


def _total(g):
  return sum(jnp.sum(x) for x in jax.tree.leaves(g))


def _through_scan(g):
  def body(carry, _):
    return carry + _total(g), None
  total, _ = jax.lax.scan(body, 0.0, None, length=3)
  return jax.tree.map(lambda x: x * total, g)


def _through_while(g):
  total = jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] + _total(g), c[1] + 1),
                             (0.0, 0))[0]
  return jax.tree.map(lambda x: x * total, g)


def _through_cond(g):
  return jax.tree.map(lambda x: jax.lax.cond(True, lambda: x * _total(g), lambda: x), g)


@pytest.mark.parametrize("tx", [
    optax.clip_by_global_norm(1.0),
    _stateless(lambda g: jax.tree.map(lambda x: x + _total(g), g)),
    _stateless(_through_scan),
    _stateless(_through_while),
    _stateless(_through_cond),
], ids=["clip_by_global_norm", "sum", "scan", "while", "cond"])
def test_a_coupling_is_refused_naming_both_leaves(tx):
  with pytest.raises(ValueError, match=r"not layer-separable: the update of layer leaf "
                                       r"\['(b|w)'\] \(\d+,?\d*\) depends on the gradient"):
    separability.check_separable(tx, LAYER)


@pytest.mark.parametrize("tx", [
    optax.adam(1e-2),
    optax.sgd(1e-2, momentum=0.9),
    optax.chain(optax.clip(1.0), optax.adamw(1e-2)),
    olr.low_rank(optax.scale_by_adam(), olr.svd(2), refresh_every=2),
    # 8-bit Adam ties each leaf's decoding to the previous leaf's codes through
    # an integer dependency: an ordering, not a coupling of the values.
    olr.low_rank(olr.adam_8bit(1e-2, chunk_size=64), olr.svd(2)),
    _stateless(lambda g: jax.tree.map(lambda x: x * jnp.sum(x), g)),   # within one leaf
], ids=["adam", "momentum", "clip_adamw", "low_rank", "low_rank_8bit", "per_leaf"])
def test_separable_transformations_pass(tx):
  assert separability.check_separable(tx, LAYER) is None


def test_a_coupling_through_a_non_differentiable_decision_is_not_seen():
  """As documented: only differentiable paths count (the step decides per layer)."""
  tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=3)
  assert separability.check_separable(tx, LAYER) is None


def test_layerwise_uses_this_check():
  assert layerwise.check_separable is separability.check_separable
