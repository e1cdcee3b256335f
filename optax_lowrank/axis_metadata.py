"""Parameter trees that carry Flax metadata: unwrap them, read their axis names.

``nnx.state(model, nnx.Param)`` and ``nnx.Optimizer`` hand optax trees whose
leaves sit inside NNX ``Variable`` nodes; linen params made with
``nn.with_logical_partitioning`` hold ``LogicallyPartitioned`` boxes.  Both
paths plan on the plain arrays (:func:`unwrap_variables`) after reading the
logical axis names the wrappers carry (:func:`axis_names`), which is how the
layer axis of a scanned model is found without a ``reshape`` rule
(:mod:`optax_lowrank.reshape_rules`).

flax is never imported here: a wrapper is recognised only if the user's
program has imported ``flax.nnx`` or ``flax.core.meta`` already (``sys.modules``),
so the core runs with jax and optax alone.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp


def _is_variable(x) -> bool:
  """An NNX ``Variable`` (none can exist unless flax.nnx was imported)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def _is_box(x) -> bool:
  """A linen metadata box (``nn.Partitioned``, ``nn.LogicallyPartitioned`` ...)."""
  meta = sys.modules.get("flax.core.meta")
  return meta is not None and isinstance(x, meta.AxisMetadata)


def _is_wrapper(x) -> bool:
  return _is_variable(x) or _is_box(x)


def _unwrap(x):
  if _is_variable(x):
    return x.get_value()
  if _is_box(x):
    return x.unbox()
  return x


def unwrap_variables(tree: Any) -> Any:
  """Replace NNX ``Variable`` wrappers and linen metadata boxes by their values.

  ``nnx.state(model, nnx.Param)`` and ``nnx.Optimizer`` hand optax trees whose
  leaves sit inside ``Variable`` nodes; linen params made with
  ``nn.with_logical_partitioning`` (and their gradients) hold
  ``LogicallyPartitioned`` boxes.  Both paths plan and store their state on the
  plain arrays, so the state never holds a ``Basis`` inside a ``Param``, and
  paths seen by ``where`` do not end in ``'value'``.  The axis names the
  wrappers carry are read first (:func:`axis_names`).
  """
  if tree is None:
    return None
  return jax.tree.map(_unwrap, tree, is_leaf=_is_wrapper)


def _names_of(x) -> tuple | None:
  if _is_variable(x):
    meta = x.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding_names")
  elif _is_box(x):
    names = getattr(x, "names", None)
  else:
    return None
  if names is None or isinstance(names, str):
    return None
  try:
    names = tuple(names)
  except TypeError:  # a NamedSharding or another non-sequence annotation
    return None
  return names if len(names) == len(jnp.shape(_unwrap(x))) else None


def flat_axis_names(tree: Any) -> tuple | None:
  """The axis names of every leaf of ``tree`` in flattening order, or ``None`` if it has none."""
  if tree is None:
    return None
  leaves = jax.tree.leaves(tree, is_leaf=_is_wrapper)
  names = tuple(_names_of(x) for x in leaves)
  return names if any(n is not None for n in names) else None


def layout_key(tree: Any) -> tuple:
  """Static identity of a tree's layout: its unwrapped structure and leaf shapes."""
  tree = unwrap_variables(tree)
  return jax.tree.structure(tree), tuple(tuple(jnp.shape(x)) for x in jax.tree.leaves(tree))


_NAMES_BY_LAYOUT: dict = {}


def recalled_axis_names(tree: Any, params: Any | None = None) -> tuple | None:
  """The axis names of ``tree`` (or of ``params``), or those last seen for its layout.

  ``nnx.Optimizer`` hands ``init`` the ``Param`` variables (names included)
  but ``update`` plain arrays, and ``optax.inject_hyperparams`` rebuilds the
  transformation at every update; so the names seen for a tree layout
  (structure and shapes) are remembered for the next tree of the same layout.
  Only this static metadata is kept, never arrays.
  """
  key = layout_key(tree)
  names = flat_axis_names(tree) or flat_axis_names(params) or _NAMES_BY_LAYOUT.get(key)
  if names:
    _NAMES_BY_LAYOUT[key] = names
  return names


def axis_names(tree: Any) -> Any:
  """The logical axis names of every leaf (a tuple, or ``None`` where unknown).

  Read from linen boxes (``nn.with_logical_partitioning``; ``nn.scan`` with
  ``metadata_params={nn.PARTITION_NAME: "layers"}`` inserts the layer axis'
  name) and from NNX ``Variable`` metadata (``nnx.with_partitioning`` /
  ``out_sharding``; ``nnx.vmap``/``nnx.scan`` with
  ``transform_metadata={nnx.PARTITION_NAME: "layers"}`` insert it).  The result
  has the structure of :func:`unwrap_variables` of ``tree``.
  """
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_wrapper)
  return jax.tree.unflatten(treedef, [_names_of(x) for x in leaves])


def rewrap_like(like: Any, tree: Any) -> Any:
  """Give ``tree`` (plain arrays) the structure of ``like`` (which may hold Variables)."""
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(tree))

