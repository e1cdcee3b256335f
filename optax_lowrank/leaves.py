"""Which leaves are projected, how each is viewed, and how its basis is made.

This module is the one place both paths (``olr.low_rank`` and ``olr.adapters``)
decide, from static shapes only, what happens to every leaf of a parameter
tree.  Errors are raised here, in Python, naming the leaf path, its shape and
the offending argument.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

from optax_lowrank import projections as proj
from optax_lowrank.bases import Basis

Array = jax.Array

# A reshape rule: an int ``k`` (rows are the first ``k`` axes, columns the rest),
# a pair ``(row_axes, col_axes)`` or a triple ``(batch_axes, row_axes, col_axes)``
# that together list every axis once, or optax's dimension numbers
# (``GaLoreDimensionNumbers`` = the pair, ``MuonDimensionNumbers`` = the triple
# with the axes not named as batch axes).  Batch axes index separate matrices
# (the layers of a scanned model).  Negative axes count from the end, as in
# numpy and optax.
ReshapeRule = (
    int
    | tuple[tuple[int, ...], tuple[int, ...]]
    | tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    | GaLoreDimensionNumbers
    | MuonDimensionNumbers
)

# Logical axis names that mark the layer axis of a stacked leaf, when the
# params carry names (linen ``nn.with_logical_partitioning`` boxes, NNX
# ``Variable`` sharding metadata): MaxText's and Flax's convention.
LAYER_AXIS_NAMES = ("layers",)


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


def _flat_names(tree: Any, count: int) -> list:
  """Axis names of every leaf in flattening order (``None`` where unknown)."""
  names = [_names_of(x) for x in jax.tree.leaves(tree, is_leaf=_is_wrapper)]
  return names if len(names) == count else [None] * count


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


class _NoMatrix:
  """The rule of a stacked leaf that holds one vector per layer (a bias, a norm scale)."""

  _instance = None

  def __new__(cls):
    if cls._instance is None:
      cls._instance = super().__new__(cls)
    return cls._instance

  def __repr__(self) -> str:
    return "olr.leaves.NO_MATRIX"

  def __reduce__(self):
    return (_NoMatrix, ())


NO_MATRIX = _NoMatrix()
"""What a reshape callable returns for a leaf that is a stack of vectors, not of
matrices (a ``(layers, d)`` bias or norm scale): never projected by default, an
error if ``where`` selects it."""


def _is_dimension_numbers(x) -> bool:
  return isinstance(x, (GaLoreDimensionNumbers, MuonDimensionNumbers))


def _is_rule_value(x) -> bool:
  """A single rule (not a pytree of rules, not a callable)."""
  if x is NO_MATRIX or _is_dimension_numbers(x):
    return True
  if isinstance(x, int) and not isinstance(x, bool):
    return True
  # A tuple (not a list, which is a pytree of rules) of two or three axis groups.
  if isinstance(x, tuple) and len(x) in (2, 3) and not hasattr(x, "_fields"):
    try:
      for group in x:
        if hasattr(group, "_fields"):  # a tuple of dimension numbers is a pytree of rules
          return False
        if isinstance(group, (tuple, list)):
          [operator.index(a) for a in group]
        else:
          operator.index(group)
    except TypeError:
      return False
    return True
  return False


_RULE_FORMS = (
    "an int split, (row_axes, col_axes), (batch_axes, row_axes, col_axes), "
    "optax.contrib.GaLoreDimensionNumbers or optax.contrib.MuonDimensionNumbers"
)


def _axes(group, ndim: int, where: str, rule) -> tuple[int, ...]:
  """One axis group (an int or a sequence of ints), negative axes normalized like numpy."""
  try:
    if isinstance(group, bool):
      raise TypeError
    try:
      items = (operator.index(group),)
    except TypeError:
      items = tuple(operator.index(a) for a in group)
      if any(isinstance(a, bool) for a in group):
        raise TypeError from None
  except TypeError:
    raise ValueError(
        f"{where}: `reshape` rule must be {_RULE_FORMS} of axis indices, got {rule!r}"
    ) from None
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{where}: `reshape` axis {a} is out of range for a {ndim}-axis leaf (rule {rule!r})"
      )
  return tuple(a % ndim for a in items)


def _rule_axes(rule: ReshapeRule, shape: tuple[int, ...], path: str):
  """``(batch_axes, row_axes, col_axes)`` of a rule, checked against the leaf.

  Negative axes count from the end (``-1`` is the last axis), as in numpy and
  in optax's dimension numbers; an axis named twice, after that normalization,
  is an error.
  """
  ndim = len(shape)
  where = f"leaf '{path}' of shape {shape}"
  if isinstance(rule, int) and not isinstance(rule, bool):
    if not 0 < rule < ndim:
      raise ValueError(f"{where}: `reshape` split {rule} must be in 1..{ndim - 1}")
    return (), tuple(range(rule)), tuple(range(rule, ndim))
  if _is_dimension_numbers(rule):
    rows = _axes(rule.reduction_axis, ndim, where, rule)
    cols = _axes(rule.output_axis, ndim, where, rule)
    named = set(rows) | set(cols)
    overlap = set(rows) & set(cols)
    if isinstance(rule, GaLoreDimensionNumbers) and len(named) != ndim and not overlap:
      raise ValueError(
          f"{where}: `reshape` rule {rule!r} must name every one of the {ndim} axes; "
          "for a stack of matrices (axes not named are batch axes) use "
          "optax.contrib.MuonDimensionNumbers"
      )
    batch = tuple(a for a in range(ndim) if a not in named)
    groups = (batch, rows, cols)
    names = "(reduction_axis, output_axis)"
  else:
    if not isinstance(rule, (tuple, list)) or len(rule) not in (2, 3):
      raise ValueError(f"{where}: `reshape` rule must be {_RULE_FORMS}, got {rule!r}")
    groups = tuple(_axes(g, ndim, where, rule) for g in rule)
    names = "(batch_axes, row_axes, col_axes)" if len(groups) == 3 else "(row_axes, col_axes)"
    if len(groups) == 2:
      groups = ((),) + groups
  batch, rows, cols = groups
  if sorted(batch + rows + cols) != list(range(ndim)) or not rows or not cols:
    raise ValueError(
        f"{where}: `reshape` rule {rule!r} must put each of the {ndim} axes in exactly "
        f"one of {names}, with row and column axes non-empty (negative axes count "
        "from the end)"
    )
  return batch, rows, cols


def _has_batch_axes(rule) -> bool:
  """Rules that may say which axes index separate matrices (for every spec)."""
  return isinstance(rule, MuonDimensionNumbers) or (
      isinstance(rule, (tuple, list)) and not _is_dimension_numbers(rule) and len(rule) == 3
  )


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


def stack_rule(shape: Sequence[int], layer_axes: Sequence[int]) -> ReshapeRule | _NoMatrix:
  """The rule of a stacked leaf: ``layer_axes`` are batch axes, the rest one matrix each.

  The remaining axes, in their order, are split into rows and columns where
  the matrix is closest to square (``(embed, heads, head_dim)`` →
  ``embed × heads·head_dim``; ``(heads, head_dim, embed)`` →
  ``heads·head_dim × embed``); with one remaining axis the leaf is a stack of
  vectors (:data:`NO_MATRIX`).
  """
  ndim = len(shape)
  layer_axes = tuple(sorted({a % ndim for a in layer_axes}))
  rest = tuple(a for a in range(ndim) if a not in layer_axes)
  if len(rest) < 2:
    return NO_MATRIX
  log = lambda axes: math.log(max(1, math.prod(shape[a] for a in axes)))
  k = min(range(1, len(rest)), key=lambda k: abs(log(rest[:k]) - log(rest[k:])))
  return (layer_axes, rest[:k], rest[k:])


def _common_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
  prefix = paths[0]
  for p in paths[1:]:
    n = 0
    while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
      n += 1
    prefix = prefix[:n]
  return prefix


def _propagate(paths_and_leaves, rules, seeds) -> list:
  """Stack rules for leaves beside known stacks that have their layer axes' sizes.

  ``seeds``: ``(path, layer_axes)`` of the leaves known to be stacked.  A leaf
  without a rule, with ≥ 2 axes, under the deepest module holding every seed
  and with the seeds' layer sizes at the seeds' layer axes is a stack too (the
  unannotated biases and norms beside annotated kernels in a scanned module).
  """
  if not seeds:
    return rules
  prefix = _common_prefix([tuple(path[:-1]) for path, _ in seeds])
  by_path = dict(paths_and_leaves)
  signatures = {(axes, tuple(by_path[path].shape[a] for a in axes)) for path, axes in seeds}
  out = list(rules)
  for i, (path, leaf) in enumerate(paths_and_leaves):
    if out[i] is not None or jnp.ndim(leaf) < 2 or tuple(path[:len(prefix)]) != prefix:
      continue
    for axes, sizes in sorted(signatures):
      if max(axes) < leaf.ndim and tuple(leaf.shape[a] for a in axes) == sizes:
        out[i] = stack_rule(leaf.shape, axes)
        break
  return out


def _layer_axes_from_names(names, layer_names) -> tuple[int, ...]:
  if not names:
    return ()
  hit = lambda n: n in layer_names if isinstance(n, str) else (
      isinstance(n, tuple) and any(x in layer_names for x in n))
  return tuple(i for i, n in enumerate(names) if hit(n))


@dataclasses.dataclass(frozen=True)
class Stacked:
  """A ``reshape`` rule for the stacked (scanned, vmapped) layers of a model.

  Made by :func:`stacked`; see there.  Called as ``rule(path, leaf)`` it gives
  one leaf's rule (an int ``layer_axis`` only); :func:`plan` also applies it to
  the leaves beside the stacked kernels.
  """

  layer_axis: int | str = 0
  under: tuple[str, ...] | None = None

  def _in_scope(self, path) -> bool:
    return self.under is None or any(u in path for u in self.under)

  def _axes(self, path, leaf, names) -> tuple[int, ...]:
    ndim = jnp.ndim(leaf)
    if isinstance(self.layer_axis, str):
      return _layer_axes_from_names(names, (self.layer_axis,))
    if not -ndim <= self.layer_axis < ndim:
      raise ValueError(
          f"leaf '{'/'.join(path)}' of shape {tuple(leaf.shape)}: `reshape` "
          f"olr.stacked(layer_axis={self.layer_axis}): axis {self.layer_axis} is out of range "
          f"for a {ndim}-axis leaf"
      )
    return (self.layer_axis % ndim,)

  def __call__(self, path: tuple[str, ...], leaf: Any) -> ReshapeRule | _NoMatrix | None:
    path = tuple(path)
    ndim = jnp.ndim(leaf)
    if not self._in_scope(path) or ndim < 2 or (self.under is None and ndim < 3):
      return None
    axes = self._axes(path, leaf, None)
    return stack_rule(leaf.shape, axes) if axes else None

  def rules(self, paths_and_leaves, names) -> list:
    out, seeds = [], []
    for (path, leaf), nm in zip(paths_and_leaves, names):
      ndim = jnp.ndim(leaf)
      rule = None
      if self._in_scope(path) and ndim >= 2:
        if isinstance(self.layer_axis, str) or self.under is not None or ndim >= 3:
          axes = self._axes(path, leaf, nm)
          if axes:
            rule = stack_rule(leaf.shape, axes)
            seeds.append((path, axes))
      out.append(rule)
    return _propagate(paths_and_leaves, out, seeds)


def stacked(layer_axis: int | str = 0, *, under: str | Sequence[str] | None = None) -> Stacked:
  """The ``reshape`` rule of a model whose layers are stacked along an axis.

  Scanned and vmapped models (linen ``nn.scan``, ``nnx.vmap``/``nnx.scan``,
  Equinox ``filter_vmap``, MaxText's scanned layers) keep every parameter of
  their repeated block with a layer axis.  With this rule each index of that
  axis is its own matrix, with its own basis, coefficients and statistics:

  * a kernel with ≥ 3 axes: the layer axis is a batch axis and the other axes,
    in their order, are split into rows and columns where the matrix is
    closest to square: ``(L, in, out)`` → ``L`` matrices ``in × out``;
    ``(L, embed, heads, head_dim)`` → ``embed × heads·head_dim``;
    ``(heads, L, head_dim, embed)`` with ``layer_axis=1`` → ``heads·head_dim ×
    embed``.  Give a triple or ``MuonDimensionNumbers`` for another split;
  * a ``(L, d)`` bias or norm scale: ``L`` vectors, never projected (not an
    ``L × d`` matrix mixing the layers).

  Args:
    layer_axis: the layer axis: an index (negative counts from the end;
      MaxText's ``param_scan_axis=1`` layout is ``layer_axis=1``), or a logical
      axis name (``"layers"``) looked up in the names the params carry (see
      :func:`axis_names`).
    under: a key (or keys) of the path under which the stacked block lives
      (``"blocks"``, ``"layers"``).  Leaves elsewhere get the default
      treatment.  Without it, every leaf with ≥ 3 axes is a stacked kernel,
      and a 2-D leaf is a stack of vectors when it sits under the module that
      holds the stacked kernels and has their layer count at ``layer_axis``.

  Returns:
    A rule for ``reshape=`` of ``olr.low_rank``, every recipe and
    ``olr.adapters.init``.
  """
  if isinstance(layer_axis, bool) or not isinstance(layer_axis, (int, str)):
    raise TypeError(f"`layer_axis` must be an int or an axis name, got {layer_axis!r}")
  if isinstance(under, str):
    under = (under,)
  elif under is not None:
    under = tuple(under)
    if not all(isinstance(u, str) for u in under):
      raise TypeError(f"`under` must be a key name or a sequence of them, got {under!r}")
  return Stacked(layer_axis, under)


def _takes_params_tree(fn) -> bool:
  """optax's form of a dimension-numbers callable: ``fn(params) -> tree``."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  required = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
  has_varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
  return len(required) == 1 and not has_varargs


def _rules_from_tree(tree, params, what: str) -> list:
  is_leaf = lambda x: x is None or _is_rule_value(x)
  leaves, rules_def = jax.tree.flatten(tree, is_leaf=is_leaf)
  params_def = jax.tree.structure(params)
  if rules_def != params_def:
    raise ValueError(
        f"{what} must be a rule ({_RULE_FORMS}), a callable, or a pytree of rules (None "
        f"where there is none) with the structure of the params; got structure\n  "
        f"{rules_def}\nfor params\n  {params_def}"
    )
  return leaves


def _resolve_reshape(reshape, params, paths_and_leaves, names) -> list:
  """Per-leaf rules (``None``: none) from ``reshape`` and the params' axis names."""
  n = len(paths_and_leaves)
  if reshape is None:
    rules = [None] * n
  elif isinstance(reshape, Stacked):
    rules = reshape.rules(paths_and_leaves, names)
  elif _is_rule_value(reshape):  # one rule for every leaf with more than two axes
    rules = [reshape if jnp.ndim(leaf) > 2 else None for _, leaf in paths_and_leaves]
  elif callable(reshape):
    if _takes_params_tree(reshape):  # optax's form: params -> pytree of rules
      rules = _rules_from_tree(reshape(params), params, "the tree returned by `reshape`")
    else:
      rules = [reshape(path, leaf) for path, leaf in paths_and_leaves]
  else:
    rules = _rules_from_tree(reshape, params, "`reshape`")
  # The layer axis where the params name it, for leaves without a rule.
  seeds = []
  for i, ((path, leaf), nm) in enumerate(zip(paths_and_leaves, names)):
    axes = _layer_axes_from_names(nm, LAYER_AXIS_NAMES)
    if rules[i] is None and axes:
      rules[i] = stack_rule(leaf.shape, axes)
      seeds.append((path, axes))
  return _propagate(paths_and_leaves, rules, seeds)


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
  params_in = params
  params = unwrap_variables(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = _flat_names(params_in, len(flat)) if axis_names is None else list(axis_names)
  if len(names) != len(flat):
    names = [None] * len(flat)
  paths_and_leaves = [(path_names(p), leaf) for p, leaf in flat]
  chosen = _resolve_where(where, params, paths_and_leaves)
  rules = _resolve_reshape(reshape, params, paths_and_leaves, names)
  plans = []
  for index, ((names_, leaf), pick, rule) in enumerate(zip(paths_and_leaves, chosen, rules)):
    path = "/".join(names_) or "<root>"
    shape = tuple(leaf.shape)
    dtype = leaf.dtype
    base = LeafPlan(path, index, shape, dtype)
    ndim = len(shape)
    explicit = pick is not None
    batch_shape = ()
    if rule is NO_MATRIX:
      if pick:
        raise ValueError(
            f"leaf '{path}' of shape {shape} is selected by `where` but `reshape` makes it a "
            "stack of vectors (one per layer), which no projection reduces"
        )
      plans.append(base)
      continue
    if rule is not None and spec.view != "matrix" and not _has_batch_axes(rule):
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
            f"has more than two axes; {_MORE_AXES_HINT}"
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
        if not explicit:
          plans.append(base)
          continue
        raise TypeError(f"leaf '{path}' of shape {shape} has non-float dtype {dtype}")
      if 0 in view or 0 in batch_shape:
        pick = False
    if pick:
      # Raises (with the leaf named) for e.g. tucker ranks of the wrong length.
      try:
        spec.axis_ranks(view)
      except ValueError as e:
        raise ValueError(f"leaf '{path}' of shape {shape}: {e}") from None
      if not explicit and not _saves_memory(spec, tuple(view)):
        pick = False
    if pick:
      plans.append(dataclasses.replace(base, spec=spec, view_shape=tuple(view), perm=perm,
                                       batch_shape=batch_shape))
    else:
      plans.append(base)
  return jax.tree.unflatten(treedef, plans)


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
