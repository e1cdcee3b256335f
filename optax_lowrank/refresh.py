"""What a refresh does to the inner optimizer's state ("keep", "reset", "transport").

A refresh replaces the basis of every projected leaf, so the coordinates the
inner optimizer's statistics are expressed in change.  The policy decides what
to do with them; the same function serves the gradient path (inside
``olr.low_rank``) and the adapter path (``olr.adapters.refresh_state`` after a
merge), which is what keeps the two paths identical under every policy.

The inner state is opaque, so per-leaf statistics are found structurally: a
sub-tree of the inner state whose tree structure equals the parameter tree's
(e.g. Adam's ``mu`` and ``nu``, momentum's ``trace``, MultiSteps' accumulated
gradients) holds, at each projected position, a statistic of that leaf.

* ``"keep"`` (GaLore): leave every statistic as it is.
* ``"reset"`` (ReLoRA): set the projected leaves' statistics to their value in
  a freshly initialised inner state (zeros for moments).  Step counters and the
  statistics of non-projected leaves are kept.  With Adam this means the bias
  correction is already ~1 when the moments restart from zero, so the first
  steps after a reset are larger than Adam's usual ones (about 2× ten steps
  after a reset at step 100, growing with the count): pair "reset" with a
  learning-rate re-warm-up, as ReLoRA does.
* ``"transport"``: carry each statistic into the new basis with the per-axis
  least-squares change of coordinates ``T_i = pinv(U_i^new) U_i^old``
  (``U^newᵀ U^old`` for orthonormal bases), each row of it shrunk to unit
  Euclidean length where it is longer (``T̃_i = D_i^{-1/2} T_i`` with
  ``D_i = diag(max(1, ‖row‖²))``).  Statistics shaped like the coefficients
  are mapped linearly, ``c ×_i T̃_i``; second moments with the element-wise
  squared map ``c ×_i (T̃_i ∘ T̃_i)``, which keeps them non-negative.  What a
  statistic is comes from the state class that holds it (optax's
  ``ScaleByAdamState.nu`` is a second moment, ``ScaleByAdanState.v`` a first
  one; :func:`register_statistics` declares a class of one's own); only in a
  class nobody declared is it guessed from the field name (``nu``, ``v``,
  ``exp_avg_sq``... as second moments).  Statistics of another shape
  (Adafactor's factored row/column moments) cannot be mapped and are reset.

  Why the rows are shrunk: for orthonormal bases the rows of ``T`` already
  have length ≤ 1 (``T̃ = T``), so ``T∘T`` has row sums ≤ 1 and a second
  moment can only shrink or be redistributed.  For non-orthonormal bases
  (Flora's Gaussian sketches, above all at full rank, where ``T =
  U_new⁻¹ U_old``) rows of ``T`` can be long, and ``T∘T`` — exact only for
  uncorrelated coordinates — multiplies a second moment by its row sums at
  every refresh: with ``β2 = 0.999`` over 200 steps 82% of it survives to the
  next refresh, so it compounds without bound and the steps vanish.  With
  ``T̃`` every transported second moment is a sub-convex combination of the
  old ones (``max ν`` never grows through a refresh, whatever the pair of
  bases), and the first moment is scaled by the same row factors, so where
  ``|μ_j| ≤ √ν_j`` held before, ``|μ_i| ≤ √(r·ν_i)`` (Cauchy–Schwarz) holds
  after: Adam's first steps after a refresh stay bounded too.

Whatever the policy, gradient *histories* (declared with ``history=``, as
``olr.woodbury_precondition`` declares its ``history`` and ``gram``) are
cleared at a refresh: they are a curvature model built from gradients in the
old coordinates, and a cleared history degrades gracefully (its empty slots
count as zero columns).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import bases as bases_lib
from optax_lowrank.leaves import LeafPlan, field_names, inner_zeros, is_plan

POLICIES = ("keep", "reset", "transport")

# Guesses by field name, only for state classes nobody declared (register_statistics).
CLEARED_NAMES = frozenset({"history", "gram"})

SECOND_MOMENT_NAMES = frozenset(
    {"nu", "v", "nu_hat", "nu_max", "exp_avg_sq", "sum_of_squares", "acc", "v_row", "v_col",
     "grad_sqr", "grad_sum_sq", "second_moment", "e_g", "e_x", "n"}
)


# What each per-leaf field of a state class holds: "first" (mapped linearly),
# "second" (non-negative, mapped with T∘T) or "history" (cleared at a refresh).
_KINDS: dict[type, dict[str, str]] = {}


def register_statistics(
    state_type: type, *, second: tuple[str, ...] = (), history: tuple[str, ...] = ()
) -> None:
  """Declare what the fields of an optimizer-state class hold, for ``"transport"``.

  After this, a params-shaped statistic under field ``f`` of a ``state_type``
  instance is transported as a second moment if ``f in second``, cleared at
  every refresh if ``f in history``, and as a first moment (linearly)
  otherwise; no field name of the class is guessed any more.  optax's own
  state classes are declared by this module; declare a class of your own
  before its first refresh:

  ```python
  olr.refresh.register_statistics(MyState, second=("h",))   # MyState(m, h)
  ```

  Args:
    state_type: a NamedTuple class used as (part of) an inner optimizer's state.
    second: fields holding non-negative second-moment-like statistics.
    history: fields holding stored gradients (cleared, whatever the policy).
  """
  fields = getattr(state_type, "_fields", None)
  if not isinstance(state_type, type) or fields is None:
    raise TypeError(f"`state_type` must be a NamedTuple class, got {state_type!r}")
  kinds = {}
  for kind, names in (("second", second), ("history", history)):
    for name in names:
      if name not in fields:
        raise ValueError(f"{state_type.__name__} has no field {name!r} (fields: {fields})")
      kinds[name] = kind
  _KINDS[state_type] = {f: kinds.get(f, "first") for f in fields}


def _register_optax() -> None:
  contrib = optax.contrib
  for state_type, second in [
      (optax.ScaleByAdamState, ("nu",)),
      (optax.ScaleByAmsgradState, ("nu", "nu_max")),
      (optax.ScaleByBeliefState, ("nu",)),
      (optax.ScaleByRStdDevState, ("nu",)),
      (optax.ScaleByRmsState, ("nu",)),
      (optax.ScaleByRssState, ("sum_of_squares",)),
      (optax.ScaleByAdaDeltaState, ("e_g", "e_x")),
      (optax.ScaleByAdanState, ("n",)),  # m and v are first moments (v of differences)
      (optax.ScaleByNovogradState, ("nu",)),
      (optax.ScaleBySM3State, ("nu",)),
      (optax.ScaleByLionState, ()),
      (optax.FactoredState, ("v_row", "v_col", "v")),
      (optax.TraceState, ()),
      (optax.EmaState, ()),
      (optax.MultiStepsState, ()),
      (getattr(contrib, "DAdaptAdamWState", None), ("exp_avg_sq",)),
      (getattr(contrib, "ProdigyState", None), ("exp_avg_sq",)),
      (getattr(contrib, "MomoAdamState", None), ("exp_avg_sq",)),
      (getattr(contrib, "MadgradState", None), ("grad_sum_sq",)),
      (getattr(contrib, "ScaleByAdemamixState", None), ("nu",)),
      (getattr(contrib, "ScaleBySimplifiedAdEMAMixState", None), ("n",)),
      (getattr(contrib, "SophiaState", None), ("nu",)),
  ]:
    if state_type is not None:  # a class an older optax does not have
      register_statistics(state_type, second=second)


_register_optax()


def _declared_kinds(state: Any) -> dict[tuple, str]:
  """``{key path: kind}`` for every field of a declared state class inside ``state``."""
  out: dict[tuple, str] = {}

  def walk(node, path):
    children, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda c: c is not node)
    kinds = _KINDS.get(type(node))
    for key, child in children:
      child_path = (*path, *key)
      if kinds is not None and isinstance(key[0], jax.tree_util.GetAttrKey):
        out[child_path] = kinds.get(key[0].name, "first")
      if jax.tree_util.treedef_is_leaf(jax.tree.structure(child)):
        continue
      walk(child, child_path)

  walk(state, ())
  return out


def _kind(path: tuple, declared: dict[tuple, str]) -> str:
  """The declared kind of the nearest declared field above ``path``, else a guess by name."""
  for i in range(len(path), 0, -1):
    if path[:i] in declared:
      return declared[path[:i]]
  names = field_names(path)
  if names & CLEARED_NAMES:
    return "history"
  return "second" if names & SECOND_MOMENT_NAMES else "first"


def check_policy(on_refresh: str) -> str:
  if on_refresh not in POLICIES:
    raise ValueError(f"`on_refresh` must be one of {POLICIES}, got {on_refresh!r}")
  return on_refresh


def apply_policy(
    on_refresh: str,
    inner: optax.GradientTransformation,
    inner_state: optax.OptState,
    plans: Any,
    old_bases: Any,
    new_bases: Any,
    due: Any = None,
) -> optax.OptState:
  """The inner state after a refresh from ``old_bases`` to ``new_bases``.

  Args:
    on_refresh: ``"keep"``, ``"reset"`` or ``"transport"``.
    inner: the inner transformation (used to make a fresh state for "reset").
    inner_state: its state, over the coefficient tree.
    plans: the :class:`~optax_lowrank.leaves.LeafPlan` tree of the params.
    old_bases, new_bases: every projected leaf's basis before and after
      (``None`` at non-projected leaves).
    due: optional tree like the params of bools (``batch_shape`` at projected
      leaves, see :mod:`optax_lowrank.refresh_schedule`): only the statistics
      of due matrices change; those that are not coefficient-shaped change
      when any matrix of their leaf is due.
  """
  plan_leaves, plan_def = jax.tree.flatten(plans, is_leaf=is_plan)
  if not any(p.projected for p in plan_leaves):
    return inner_state
  dues = [None] * len(plan_leaves) if due is None else _aligned(plans, due)
  fresh = inner.init(inner_zeros(plans))  # MaskedNode at non-float leaves, as at init
  bare_leaf = plan_def.num_leaves == 1 and plan_def.num_nodes == 1

  if on_refresh == "transport":
    mats = [
        None if not p.projected else bounded_transport_matrices(o, n)
        for p, o, n in zip(
            plan_leaves,
            _aligned(plans, old_bases),
            _aligned(plans, new_bases),
        )
    ]

  declared = _declared_kinds(inner_state)
  # optax.masked / multi_transform put MaskedNode where a leaf is not theirs.
  is_masked = lambda n: isinstance(n, optax.MaskedNode)

  def is_params_like(x) -> bool:
    try:
      return jax.tree.structure(x, is_leaf=is_masked) == plan_def
    except Exception:  # noqa: BLE001 - any non-pytree object is simply not params-like
      return False

  def per_subtree(path, old_sub, fresh_sub):
    if not is_params_like(old_sub):
      return old_sub
    kind = _kind(tuple(path), declared)
    cleared = kind == "history"
    if on_refresh == "keep" and not cleared:
      return old_sub
    second = kind == "second"
    olds = jax.tree.leaves(old_sub, is_leaf=is_masked)
    freshes = jax.tree.leaves(fresh_sub, is_leaf=is_masked)
    out = []
    for i, (p, o, f) in enumerate(zip(plan_leaves, olds, freshes)):
      if is_masked(o):
        out.append(o)
        continue
      same_shape = tuple(o.shape) == tuple(p.coefficient_shape)
      if not p.projected or (bare_leaf and not same_shape):
        out.append(o)
      elif cleared or on_refresh == "reset" or not same_shape:
        out.append(_where_due(dues[i], f, o, same_shape))
      else:
        out.append(_where_due(dues[i], bases_lib.transport(mats[i], o, second_moment=second),
                              o, same_shape))
    return jax.tree.unflatten(plan_def, out)

  return jax.tree_util.tree_map_with_path(
      per_subtree, inner_state, fresh, is_leaf=is_params_like
  )


def bounded_transport_matrices(old: bases_lib.Basis, new: bases_lib.Basis) -> tuple:
  """Per-axis ``T̃_i``: ``pinv(U_i^new) U_i^old`` with rows longer than 1 scaled to length 1.

  The change of coordinates of :func:`optax_lowrank.bases.transport_matrices`,
  made safe to apply at every refresh (see the module docstring): with
  ``T̃_i ∘ T̃_i`` row-sub-stochastic, no statistic carried through any number
  of refreshes can compound.  Rows of length ≤ 1 — every row when both bases
  are orthonormal — are left as they are.
  """
  return tuple(
      None if t is None
      else t / jnp.sqrt(jnp.maximum(1.0, jnp.sum(jnp.square(t), axis=-1, keepdims=True)))
      for t in bases_lib.transport_matrices(old, new)
  )


def _where_due(due, new, old, per_matrix: bool):
  """``new`` for the due matrices of a leaf, ``old`` for the others."""
  if due is None:
    return new
  due = jnp.asarray(due)
  if not per_matrix:  # not coefficient-shaped: no axis to select matrices by
    return jnp.where(jnp.any(due), new, old)
  return jnp.where(due.reshape(due.shape + (1,) * (new.ndim - due.ndim)), new, old)


def _aligned(plans: Any, bases_tree: Any) -> list:
  """The basis (or None) of every leaf position, in flattening order."""
  out = []
  jax.tree.map(lambda p, b: out.append(b), plans, bases_tree, is_leaf=is_plan)
  return out


__all__ = ["POLICIES", "apply_policy", "bounded_transport_matrices", "check_policy", "LeafPlan"]
