"""``reshape=`` rules: how a leaf with more than two axes is seen as matrices.

A rule is an int split, ``(row_axes, col_axes)``, ``(batch_axes, row_axes,
col_axes)`` or optax's ``GaLoreDimensionNumbers`` / ``MuonDimensionNumbers``;
given as one value, a pytree of values, optax's callable ``params -> tree`` or
ours ``(path, leaf) -> rule``.  This module parses every form into one rule per
leaf (:func:`resolve`), normalizes a rule to the leaf's ``(batch_shape,
view_shape, perm)`` (:func:`normalize`), and finds the layer axis of scanned
models: :func:`stacked`, and the logical axis name ``"layers"`` the params may
carry (:mod:`optax_lowrank.axis_metadata`), spread to the unannotated leaves
beside an annotated stack.  All of it is static (shapes only); errors name the
leaf path, its shape and the rule.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

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


def has_batch_axes(rule) -> bool:
  """Rules that may say which axes index separate matrices (for every spec)."""
  return isinstance(rule, MuonDimensionNumbers) or (
      isinstance(rule, (tuple, list)) and not _is_dimension_numbers(rule) and len(rule) == 3
  )


def normalize(rule: ReshapeRule, shape: tuple[int, ...], path: str, view_kind: str):
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
  one leaf's rule (an int ``layer_axis`` only); ``leaves.plan`` also applies it to
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
      :func:`optax_lowrank.axis_metadata.axis_names`).
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


def resolve(reshape: Any, params: Any, paths_and_leaves: Sequence[tuple[tuple[str, ...], Any]],
            names: Sequence[tuple | None]) -> list:
  """One rule per leaf (``None``: none), from ``reshape`` and the params' axis names.

  Args:
    reshape: any form ``leaves.plan`` accepts (``None``, one rule, a pytree of
      rules, either callable form, :func:`stacked`).
    params: the unwrapped params (for pytree and ``params -> tree`` forms).
    paths_and_leaves: ``(path_names, leaf)`` of every leaf, in flattening order.
    names: the logical axis names of every leaf (``None`` where unknown); an
      axis named in :data:`LAYER_AXIS_NAMES` makes a leaf without a rule a
      stack, and its unannotated neighbours with the same layer count too.

  Returns:
    A list of rules in flattening order: a rule value, :data:`NO_MATRIX` or
    ``None``.
  """
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

