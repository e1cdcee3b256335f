"""Which leaves are projected, how each is viewed, and how its basis is made.

This module is the one place both paths (``olr.low_rank`` and ``olr.adapters``)
decide, from static shapes only, what happens to every leaf of a parameter
tree.  Errors are raised here, in Python, naming the leaf path, its shape and
the offending argument.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowrank import projections as proj
from optax_lowrank.bases import Basis

Array = jax.Array

# A reshape rule: an int ``k`` (rows are the first ``k`` axes, columns the rest),
# a pair ``(row_axes, col_axes)`` or a triple ``(batch_axes, row_axes, col_axes)``
# that together list every axis once.  Batch axes index separate matrices (the
# layers of a scanned model).
ReshapeRule = (
    int
    | tuple[tuple[int, ...], tuple[int, ...]]
    | tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
)


def _is_variable(x) -> bool:
  from flax import nnx

  return isinstance(x, nnx.Variable)


def unwrap_variables(tree: Any) -> Any:
  """Replace Flax NNX ``Variable`` wrappers (``nnx.Param`` ...) by their values.

  ``nnx.state(model, nnx.Param)`` and ``nnx.Optimizer`` hand optax trees whose
  leaves sit inside ``Variable`` nodes.  Both paths plan and store their
  state on the plain arrays, so the state never holds a ``Basis`` inside a
  ``Param``, and paths seen by ``where`` do not end in ``'value'``.
  """
  if tree is None:
    return None
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree,
                      is_leaf=_is_variable)


def rewrap_like(like: Any, tree: Any) -> Any:
  """Give ``tree`` (plain arrays) the structure of ``like`` (which may hold Variables)."""
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(tree))


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


def _rule_axes(rule: ReshapeRule, shape: tuple[int, ...], path: str):
  """``(batch_axes, row_axes, col_axes)`` of a rule, checked against the leaf."""
  ndim = len(shape)
  where = f"leaf '{path}' of shape {shape}"
  if isinstance(rule, int) and not isinstance(rule, bool):
    if not 0 < rule < ndim:
      raise ValueError(f"{where}: `reshape` split {rule} must be in 1..{ndim - 1}")
    return (), tuple(range(rule)), tuple(range(rule, ndim))
  try:
    groups = tuple(tuple(operator.index(a) for a in group) for group in rule)
    if len(groups) not in (2, 3):
      raise ValueError
    if any(not -ndim <= a < ndim for g in groups for a in g):
      raise ValueError
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{where}: `reshape` rule must be an int, (row_axes, col_axes) or "
        f"(batch_axes, row_axes, col_axes) of axis indices, got {rule!r}"
    ) from e
  groups = tuple(tuple(a % ndim for a in g) for g in groups)
  batch, rows, cols = groups if len(groups) == 3 else ((),) + groups
  if sorted(batch + rows + cols) != list(range(ndim)) or not rows or not cols:
    names = "(batch_axes, row_axes, col_axes)" if len(groups) == 3 else "(row_axes, col_axes)"
    raise ValueError(
        f"{where}: `reshape` rule {rule!r} must put each of the {ndim} axes in exactly "
        f"one of {names}, with row and column axes non-empty"
    )
  return batch, rows, cols


def _normalize_rule(rule: ReshapeRule, shape: tuple[int, ...], path: str, view_kind: str):
  """``(batch_shape, view_shape, perm)`` of a leaf under a rule, for a spec's view kind.

  Matrix specs see ``rows × cols``; Tucker sees each row and column axis as its
  own mode (in the order given); dense sees their product as one vector.  Batch
  axes lead in every case.
  """
  batch, rows, cols = _rule_axes(rule, shape, path)
  size = lambda axes: math.prod(shape[a] for a in axes)
  if view_kind == "matrix":
    view = (size(rows), size(cols))
  elif view_kind == "tensor":
    view = tuple(shape[a] for a in rows + cols)
  else:
    view = (size(rows + cols),)
  perm = batch + rows + cols
  batch_shape = tuple(shape[a] for a in batch)
  return batch_shape, view, (None if perm == tuple(range(len(shape))) else perm)


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


def plan(
    params: Any,
    spec: proj.Projection,
    where: Any = None,
    reshape: ReshapeRule | Callable[..., ReshapeRule | None] | None = None,
) -> Any:
  """A tree of :class:`LeafPlan` with the structure of ``params``.

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``); only shapes and
      dtypes are read.
    spec: the projection spec.
    where: ``None`` (project every leaf the spec can take without a rule:
      matrices for matrix specs, leaves with ≥ 2 axes for ``tucker`` and
      ``dense``), a bool, a pytree of bools shaped like ``params``, or a callable
      ``(path: tuple[str, ...], leaf) -> bool``.
    reshape: how a leaf with more than two axes is seen: an int split or
      ``(row_axes, col_axes)`` (matrix specs), or ``(batch_axes, row_axes,
      col_axes)`` (every spec) for a stacked leaf whose batch axes index
      separate matrices, each with its own basis; one rule for all such leaves,
      or a callable ``(path, leaf) -> rule | None`` (which may also return a
      rule for 2-D leaves).

  Raises:
    ValueError: a ``where``/``reshape`` that does not fit a leaf (the message
      names the leaf path, its shape and the argument).
    TypeError: a spec that is not a projection, or a selected non-float leaf.
  """
  if not isinstance(spec, proj.Projection):
    raise TypeError(
        f"`projection` must be a projection spec such as olr.svd(128), got {spec!r}"
    )
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths_and_leaves = [(path_names(p), leaf) for p, leaf in flat]
  chosen = _resolve_where(where, params, paths_and_leaves)
  plans = []
  for index, ((names, leaf), pick) in enumerate(zip(paths_and_leaves, chosen)):
    path = "/".join(names) or "<root>"
    shape = tuple(leaf.shape)
    dtype = leaf.dtype
    base = LeafPlan(path, index, shape, dtype)
    ndim = len(shape)
    if callable(reshape):
      rule = reshape(names, leaf)
    else:  # one rule for every leaf with more than two axes
      rule = reshape if ndim > 2 else None
    batch_shape = ()
    if rule is not None and spec.view != "matrix" and not _is_triple(rule):
      rule = None  # int and pair rules only say how to see a leaf as a matrix
    if spec.view == "matrix":
      if ndim == 2 and rule is None:
        view, perm, ok = shape, None, True
      elif ndim >= 2 and rule is not None:
        batch_shape, view, perm = _normalize_rule(rule, shape, path, spec.view)
        ok = True
      else:
        view, perm, ok = None, None, False
      if pick is None:
        pick = ok
      elif pick and not ok:
        what = (
            "has more than two axes; give a `reshape` rule (an int split or "
            "(row_axes, col_axes))"
            if ndim > 2
            else f"has {ndim} axes and cannot be projected by a matrix projection"
        )
        raise ValueError(f"leaf '{path}' of shape {shape} is selected by `where` but {what}")
    elif rule is not None:  # a (batch, rows, cols) triple for tucker or dense
      batch_shape, view, perm = _normalize_rule(rule, shape, path, spec.view)
      if pick is None:
        pick = True
    elif spec.view == "tensor":
      view, perm = shape, None
      if pick is None:
        pick = ndim >= 2
      elif pick and ndim < 2:
        raise ValueError(
            f"leaf '{path}' of shape {shape} is selected by `where` but tucker needs ≥ 2 axes"
        )
    else:  # vector
      view, perm = (math.prod(shape),), None
      if pick is None:
        pick = ndim >= 2
    if pick:
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"leaf '{path}' of shape {shape} has non-float dtype {dtype}")
      if 0 in view or 0 in batch_shape:
        pick = False
    if pick:
      # Raises (with the leaf named) for e.g. tucker ranks of the wrong length.
      try:
        spec.axis_ranks(view)
      except ValueError as e:
        raise ValueError(f"leaf '{path}' of shape {shape}: {e}") from None
      plans.append(dataclasses.replace(base, spec=spec, view_shape=tuple(view), perm=perm,
                                       batch_shape=batch_shape))
    else:
      plans.append(base)
  return jax.tree.unflatten(treedef, plans)


def _is_triple(rule) -> bool:
  return isinstance(rule, (tuple, list)) and len(rule) == 3


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
