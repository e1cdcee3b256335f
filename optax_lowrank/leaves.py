"""Which leaves are projected, how each is viewed, and how its basis is made.

This module is the one place both paths (``olr.low_rank`` and ``olr.adapters``)
decide, from static shapes only, what happens to every leaf of a parameter
tree: :func:`plan` gives a :class:`LeafPlan` per leaf, and the helpers below
map over plan trees (bases, coefficient zeros, frozen leaves, gradient checks).
How a leaf with more than two axes is seen is parsed in
:mod:`optax_lowrank.reshape_rules`; Flax wrappers and their axis names are read
in :mod:`optax_lowrank.axis_metadata`.  Errors are raised here, in Python,
naming the leaf path, its shape and the offending argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import axis_metadata
from optax_lowrank import projections as proj
from optax_lowrank import reshape_rules as rules_lib
from optax_lowrank.axis_metadata import (  # noqa: F401  (re-exported: olr.leaves.X)
  flat_axis_names,
  layout_key,
  recalled_axis_names,
  rewrap_like,
  unwrap_variables,
)
from optax_lowrank.bases import Basis
from optax_lowrank.reshape_rules import (  # noqa: F401  (re-exported: olr.leaves.X)
  LAYER_AXIS_NAMES,
  NO_MATRIX,
  ReshapeRule,
  Stacked,
  stack_rule,
  stacked,
)

Array = jax.Array

# Re-exported (``plan``'s argument ``axis_names`` is the list of names it reads).
axis_names = axis_metadata.axis_names


def path_names(path) -> tuple[str, ...]:
  """A key path as a tuple of strings: ``('layers', '0', 'kernel')``."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  return tuple(names)


def field_names(path) -> set[str]:
  """The attribute and dict-key names along a key path (e.g. ``{'mu', 'w'}``).

  Used to recognise what a statistic in an optimizer state is by the field it
  sits under (Adam's ``nu``, a ``LowRankState``'s ``bases``...).
  """
  return {k.name if isinstance(k, jax.tree_util.GetAttrKey) else str(k.key)
          for k in path
          if isinstance(k, (jax.tree_util.GetAttrKey, jax.tree_util.DictKey))}


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """What happens to one leaf (all static).

  Attributes:
    path: the leaf's path, ``'/'``-joined, for messages.
    index: position of the leaf in the flattened parameter tree; the basis key
      of the leaf is derived from it.
    shape, dtype: the leaf's.
    spec: the projection spec, or ``None`` when the leaf is not projected.
    view_shape, perm, batch_shape: how the leaf is seen by the spec (see
      ``bases.Basis``); ``batch_shape`` is ``()`` except for stacked leaves.
  """

  path: str
  index: int
  shape: tuple[int, ...]
  dtype: Any
  spec: proj.Projection | None = None
  view_shape: tuple[int, ...] = ()
  perm: tuple[int, ...] | None = None
  batch_shape: tuple[int, ...] = ()

  @property
  def projected(self) -> bool:
    return self.spec is not None

  @property
  def frozen(self) -> bool:
    """A non-float leaf (an integer counter, a ``float0`` gradient): never trained.

    ``olr.low_rank`` hides it from the inner optimizer (``optax.MaskedNode``, as
    ``optax.masked`` does) and returns a zero update for it.
    """
    return not jnp.issubdtype(self.dtype, jnp.inexact)

  @property
  def basis_dtype(self):
    return proj.basis_dtype(self.dtype)

  @property
  def coefficient_shape(self) -> tuple[int, ...]:
    if self.spec is None:
      return self.shape
    return self.batch_shape + proj.coefficient_shape(self.spec, self.view_shape)

  @property
  def coefficient_dtype(self):
    return self.basis_dtype if self.spec is not None else self.dtype

  @property
  def stored(self) -> bool:
    return self.spec is not None and self.spec.stored

  def grad_view(self, g: Array) -> Array:
    """The gradient in the spec's view, in its own dtype (refresh only).

    The spec casts it to the basis dtype one matrix at a time (see
    ``Projection.basis``), so no float32 copy of a whole low-precision stack
    is made.
    """
    if self.perm is not None:
      g = jnp.transpose(g, self.perm)
    return g.reshape(self.batch_shape + self.view_shape)

  def make_basis(self, base_key: Array, refresh_index: Array, grad: Array | None) -> Basis:
    """The leaf's basis for a refresh: from the gradient (SVD-like) or the key."""
    key = proj.leaf_key(base_key, refresh_index, self.index)
    view = None
    if self.spec.needs_grad:
      if grad is None:
        raise ValueError(
            f"leaf '{self.path}' of shape {self.shape}: the projection {self.spec} is made "
            "from the gradient, so `grads` must be given"
        )
      view = self.grad_view(grad)
    return self.spec.basis(self.shape, self.view_shape, self.perm, key, view, self.basis_dtype,
                           self.batch_shape)

  def zero_basis(self) -> Basis:
    """A placeholder basis of the right shapes (zeros), for ``init``."""
    ranks = self.spec.axis_ranks(self.view_shape)
    factors = [
        None if r is None else jnp.zeros(self.batch_shape + (n, r), self.basis_dtype)
        for n, r in zip(self.view_shape, ranks)
    ]
    return Basis(factors, self.shape, self.view_shape, self.perm, self.batch_shape)


def _resolve_where(where, params, paths_and_leaves):
  """Per-leaf booleans (None means 'use the default rule')."""
  n = len(paths_and_leaves)
  if where is None:
    return [None] * n
  if callable(where) and not isinstance(where, (bool, jax.Array)):
    return [bool(where(path, leaf)) for path, leaf in paths_and_leaves]
  if isinstance(where, bool):
    return [where] * n
  params_def = jax.tree.structure(params)
  where_def = jax.tree.structure(where)
  if where_def != params_def:
    raise ValueError(
        "`where` must be a callable (path, leaf) -> bool or a pytree of bools with the "
        f"structure of the params; got structure\n  {where_def}\nfor params\n  {params_def}"
    )
  return [bool(x) for x in jax.tree.leaves(where)]


def _saves_memory(spec: proj.Projection, view: tuple[int, ...]) -> bool:
  """Whether the coefficients of one matrix (tensor, vector) are smaller than it."""
  return math.prod(proj.coefficient_shape(spec, view)) < math.prod(view)


_MORE_AXES_HINT = (
    "give a `reshape` rule: an int split or (row_axes, col_axes) for one matrix, "
    "(batch_axes, row_axes, col_axes) or optax.contrib.MuonDimensionNumbers for a stack of "
    "matrices (the layers of a scanned model: `reshape=olr.stacked(layer_axis=0)`)"
)


def plan(
    params: Any,
    spec: proj.Projection,
    where: Any = None,
    reshape: ReshapeRule | Callable[..., ReshapeRule | None] | Any | None = None,
    axis_names: Sequence[tuple | None] | None = None,
) -> Any:
  """A tree of :class:`LeafPlan` with the structure of ``params`` (unwrapped).

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``), possibly holding
      NNX ``Variable`` or linen metadata boxes; only shapes, dtypes and axis
      names are read.
    spec: the projection spec.
    where: ``None`` (the default below), a bool, a pytree of bools shaped like
      ``params``, or a callable ``(path: tuple[str, ...], leaf) -> bool``.  A
      leaf selected explicitly is projected even where that saves nothing.
    reshape: how a leaf with more than two axes is seen: an int split or
      ``(row_axes, col_axes)`` (matrix specs), ``(batch_axes, row_axes,
      col_axes)`` (every spec) for a stacked leaf whose batch axes index
      separate matrices, each with its own basis, or optax's
      ``GaLoreDimensionNumbers`` (the pair) and ``MuonDimensionNumbers`` (the
      triple, axes not named being batch axes); one rule for every leaf with
      more than two axes, a pytree of rules shaped like the params (``None``:
      no rule), a callable ``(path, leaf) -> rule | None`` (which may also
      return a rule for 2-D leaves, or :data:`NO_MATRIX`), optax's callable
      ``params -> pytree of rules``, or :func:`stacked`.
    axis_names: the axis names of every leaf in flattening order (see
      :func:`flat_axis_names`), instead of those ``params`` carries.

  The default (``where=None``): a leaf is projected when the spec can see it
  (matrix specs: a 2-D leaf, or a leaf with a rule; ``tucker`` and ``dense``:
  ≥ 2 axes) **and the projection saves memory**: a leaf whose clamped rank
  reaches its smaller dimension (coefficients as large as the leaf) gets the
  inner optimizer at full size, unscaled.  Where the params carry axis names
  (linen ``nn.with_logical_partitioning`` under ``nn.scan``, NNX
  ``nnx.with_partitioning`` under ``nnx.vmap``/``nnx.scan``, each with the
  partition name ``"layers"``), an axis named ``"layers"`` is a batch axis, as
  with ``reshape=olr.stacked("layers")``; unnamed leaves beside those with the
  same layer count are stacks too (so a ``(layers, d)`` bias is never an
  ``layers × d`` matrix).  Non-float leaves (integer counters, ``float0``
  gradients) are never projected and never trained.

  Raises:
    ValueError: a ``where``/``reshape`` that does not fit a leaf (the message
      names the leaf path, its shape and the argument).
    TypeError: a spec that is not a projection, or a selected non-float leaf.
  """
  if not isinstance(spec, proj.Projection):
    raise TypeError(
        f"`projection` must be a projection spec such as olr.svd(128), got {spec!r}"
    )
  if axis_names is None:
    axis_names = flat_axis_names(params)
  params = unwrap_variables(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths_and_leaves = [(path_names(p), leaf) for p, leaf in flat]
  if axis_names is None or len(axis_names) != len(flat):
    axis_names = [None] * len(flat)
  chosen = _resolve_where(where, params, paths_and_leaves)
  rules = rules_lib.resolve(reshape, params, paths_and_leaves, axis_names)
  plans = [
      _plan_leaf(spec, LeafPlan("/".join(names) or "<root>", index, tuple(leaf.shape),
                                leaf.dtype), pick, rule)
      for index, ((names, leaf), pick, rule) in enumerate(zip(paths_and_leaves, chosen, rules))
  ]
  return jax.tree.unflatten(treedef, plans)


def _plan_leaf(spec: proj.Projection, leaf: LeafPlan, pick: bool | None, rule) -> LeafPlan:
  """One leaf's plan: ``leaf`` (not projected) or ``leaf`` with the spec and its view.

  ``pick`` is ``where``'s choice for the leaf (``None``: the default of
  :func:`plan`), ``rule`` its ``reshape`` rule (``None``: none).
  """
  explicit = pick is not None
  where = f"leaf '{leaf.path}' of shape {leaf.shape}"
  if rule is NO_MATRIX:
    if pick:
      raise ValueError(
          f"{where} is selected by `where` but `reshape` makes it a stack of vectors (one per "
          "layer), which no projection reduces"
      )
    return leaf
  seen = _spec_view(spec, leaf, rule)
  if not explicit:
    pick = seen is not None and len(leaf.shape) >= 2
  elif pick and seen is None:
    raise ValueError(f"{where} is selected by `where` but {_unseen_reason(spec, leaf.shape)}")
  if not pick:
    return leaf
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    if explicit:
      raise TypeError(f"{where} has non-float dtype {leaf.dtype}")
    return leaf
  batch_shape, view, perm = seen
  if 0 in view or 0 in batch_shape:
    return leaf
  try:  # raises (with the leaf named) for e.g. tucker ranks of the wrong length
    spec.axis_ranks(view)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if not explicit and not _saves_memory(spec, view):
    return leaf
  return dataclasses.replace(leaf, spec=spec, view_shape=view, perm=perm,
                             batch_shape=batch_shape)


def _spec_view(spec: proj.Projection, leaf: LeafPlan, rule):
  """``(batch_shape, view_shape, perm)`` of the leaf as ``spec`` sees it, ``None`` if it cannot.

  Matrix specs see a 2-D leaf, or a leaf of ≥ 2 axes through its rule; tucker
  sees a leaf of ≥ 2 axes as it is; dense sees any leaf as one vector.  Only
  rules with batch axes apply to tucker and dense (an int split or a pair says
  how to see a leaf as a matrix).  A rule that does not fit the leaf raises,
  whether or not the leaf is selected.
  """
  shape, ndim = leaf.shape, len(leaf.shape)
  if rule is not None and spec.view != "matrix" and not rules_lib.has_batch_axes(rule):
    rule = None
  if rule is not None and (spec.view != "matrix" or ndim >= 2):
    return rules_lib.normalize(rule, shape, leaf.path, spec.view)
  if spec.view == "vector":
    return (), (math.prod(shape),), None
  if ndim == 2 or (spec.view == "tensor" and ndim > 2):
    return (), shape, None
  return None


def _unseen_reason(spec: proj.Projection, shape: tuple[int, ...]) -> str:
  if spec.view == "tensor":
    return "tucker needs ≥ 2 axes"
  if len(shape) > 2:
    return f"has more than two axes; {_MORE_AXES_HINT}"
  return f"has {len(shape)} axes and cannot be projected by a matrix projection"


def is_plan(x) -> bool:
  return isinstance(x, LeafPlan)


def map_plans(f: Callable[..., Any], plans: Any, *trees: Any) -> Any:
  """``jax.tree.map`` over a plan tree and trees that have it as a prefix."""
  return jax.tree.map(f, plans, *trees, is_leaf=is_plan)


def make_bases(plans: Any, base_key: Array, refresh_index: Array, grads: Any, stored: bool):
  """Bases of every projected leaf whose ``stored`` flag matches (``None`` elsewhere)."""

  def one(p: LeafPlan, g):
    if not p.projected or p.stored != stored:
      return None
    return p.make_basis(base_key, refresh_index, g)

  if grads is None:
    return map_plans(lambda p: one(p, None), plans)
  return map_plans(one, plans, grads)


def zero_bases(plans: Any) -> Any:
  """Placeholder stored bases for ``init`` (zeros; replaced at the first refresh)."""
  return map_plans(lambda p: p.zero_basis() if p.stored else None, plans)


def current_bases(plans: Any, stored_bases: Any, base_key: Array, refresh_index: Array) -> Any:
  """Every projected leaf's basis now: stored ones as kept, random ones rebuilt from the key."""

  def one(p: LeafPlan, b):
    if not p.projected:
      return None
    if p.stored:
      return b
    return p.make_basis(base_key, refresh_index, None)

  return map_plans(one, plans, stored_bases)


def coefficient_zeros(plans: Any, params: Any | None = None) -> Any:
  """Zeros shaped like the coefficients (projected) or like the leaf (others).

  When ``params`` is given, non-projected leaves are taken from it instead.
  """
  if params is None:
    return map_plans(lambda p: jnp.zeros(p.coefficient_shape, p.coefficient_dtype), plans)
  return map_plans(
      lambda p, x: jnp.zeros(p.coefficient_shape, p.coefficient_dtype) if p.projected else x,
      plans,
      params,
  )


def inner_zeros(plans: Any, params: Any | None = None) -> Any:
  """The tree the inner optimizer is initialised on: :func:`coefficient_zeros`,
  with ``optax.MaskedNode()`` at frozen (non-float) leaves."""
  masked = optax.MaskedNode()
  if params is None:
    return map_plans(
        lambda p: masked if p.frozen else jnp.zeros(p.coefficient_shape, p.coefficient_dtype),
        plans)
  return map_plans(
      lambda p, x: masked if p.frozen else (
          jnp.zeros(p.coefficient_shape, p.coefficient_dtype) if p.projected else x),
      plans, params)


def mask_frozen(plans: Any, tree: Any) -> Any:
  """``tree`` with ``optax.MaskedNode()`` at frozen leaves (what the inner optimizer sees)."""
  return map_plans(lambda p, x: optax.MaskedNode() if p.frozen else x, plans, tree)


def zero_frozen(plans: Any, updates: Any, new_updates: Any, params: Any | None = None) -> Any:
  """``new_updates`` with zeros at frozen leaves: like the param when ``params`` are given
  (so ``optax.apply_updates`` adds an integer 0 to an integer leaf), else like the gradient."""
  def one(p, g, u, w=None):
    if not p.frozen:
      return u
    like = g if w is None else w
    if like.dtype == jax.dtypes.float0:
      return like
    return jnp.zeros(jnp.shape(like), like.dtype)

  if params is None:
    return map_plans(one, plans, updates, new_updates)
  return map_plans(one, plans, updates, new_updates, params)


def check_updates(updates: Any, bases: Any, params: Any | None = None) -> None:
  """Gradients that do not fit the state (or the params) fail here, naming the leaf.

  Args:
    updates: the gradients, unwrapped.
    bases: the state's stored bases (``None`` or a :class:`Basis` per leaf of
      the params ``init`` saw).
    params: the params given to ``update``, unwrapped, or ``None``.

  Raises:
    ValueError: the gradients' tree differs from the params' (at ``init``, or
      the ``params`` given), or a gradient leaf has another shape than its
      param (a transposed gradient).
  """
  is_leaf = lambda x: x is None or isinstance(x, Basis)
  flat_bases, bases_def = jax.tree.flatten(bases, is_leaf=is_leaf)
  flat, updates_def = jax.tree_util.tree_flatten_with_path(updates)
  if updates_def != bases_def:
    raise ValueError(
        "`updates` (the gradients) must have the structure of the params given to `init`; "
        f"got\n  {updates_def}\nexpected\n  {bases_def}"
    )
  flat_params = [None] * len(flat)
  if params is not None:
    params_leaves, params_def = jax.tree.flatten(params)
    if params_def != updates_def:
      raise ValueError(
          "`params` must have the structure of `updates` (the gradients); got params\n  "
          f"{params_def}\nfor updates\n  {updates_def}"
      )
    flat_params = params_leaves
  for (path, g), b, w in zip(flat, flat_bases, flat_params):
    name = "/".join(path_names(path)) or "<root>"
    shape = tuple(jnp.shape(g))
    if w is not None and tuple(jnp.shape(w)) != shape:
      raise ValueError(
          f"leaf '{name}': the gradient (`updates`) has shape {shape} but the param has shape "
          f"{tuple(jnp.shape(w))}"
      )
    if b is not None and tuple(b.shape) != shape:
      raise ValueError(
          f"leaf '{name}': the gradient (`updates`) has shape {shape} but the state was made "
          f"by `init` for a param of shape {tuple(b.shape)}"
      )
