"""Flax wrappers and their axis names (``optax_lowrank.axis_metadata``)."""

import jax
import jax.numpy as jnp
import optax

import optax_lowrank as olr
from optax_lowrank import axis_metadata, leaves


def test_linen_boxes_and_nnx_variables_unwrap_and_give_their_names():
  from flax import linen as nn
  from flax import nnx

  tree = {"k": nn.LogicallyPartitioned(jnp.zeros((3, 8, 6)), ("layers", "embed", "mlp")),
          "v": nnx.Param(jnp.zeros((8, 6)), out_sharding=("embed", "mlp"), eager_sharding=False),
          "b": jnp.zeros((6,))}
  plain = axis_metadata.unwrap_variables(tree)
  assert jax.tree.map(jnp.shape, plain) == {"k": (3, 8, 6), "v": (8, 6), "b": (6,)}
  assert axis_metadata.axis_names(tree) == {"k": ("layers", "embed", "mlp"),
                                            "v": ("embed", "mlp"), "b": None}
  assert axis_metadata.flat_axis_names(plain) is None
  # the layer axis named "layers" makes the kernel a stack of 3 matrices
  assert leaves.plan(tree, olr.svd(2))["k"].batch_shape == (3,)


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
