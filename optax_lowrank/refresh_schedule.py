"""When each matrix refreshes: fixed, staggered or lazy per-matrix refresh schedules.

``olr.low_rank(..., refresh_every=T)`` re-makes every basis on the same steps
(``count % T == 0``, the ``"fixed"`` schedule of GaLore).  On a model with
many matrices that step is one long spike: every decomposition of the model
runs in it.  The schedules here spread or thin out that work, matrix by
matrix (each matrix of a stacked leaf on its own), under one compilation:

* ``"staggered"``: matrix ``j`` refreshes on the steps with
  ``(count + o_j) % T == 0``.  The offsets ``o_j ∈ [0, T)`` are assigned once,
  from static shapes, by balancing the estimated refresh FLOPs of every offset
  (largest matrices first, each to the least loaded offset), so each step does
  about ``1/T`` of today's refresh work and the total work is unchanged.
* ``"lazy"`` (:func:`lazy`): staggered, and each matrix has its own interval
  ``T_j ∈ {T, 2T, 4T, …, max_every}`` (int32 in the state), due when
  ``(count + o_j) % T_j == 0``.  Because ``T_j`` is a power-of-two multiple of
  ``T`` the matrices due on a step are a subset of those the staggered
  schedule refreshes then: the worst step is never worse than staggered's.

The lazy rule reads what the refresh computes anyway: the overlap of the old
and new subspaces of matrix ``j``, ``ρ = Σ_i ‖U_iᵒˡᵈᵀ U_iⁿᵉʷ‖²_F / Σ_i r_i`` (the
mean squared cosine of the principal angles).  Two things make the raw ``ρ``
a poor switch on minibatch gradients: its floor is not 0 but the overlap of
two random subspaces, ``c = Σ_i r_i²/n_i / Σ_i r_i`` (``r/n``: 0.25 at a
quarter of the width), and one refresh's value is noisy.  So the schedule
scores each matrix by the chance-corrected overlap ``κ = (ρ − c) / (1 − c)``
(0 for a subspace no better than random, 1 for an unmoved one), smoothed over
its refreshes, ``s ← β·s + (1 − β)·κ`` from ``s = 0`` (``β = smoothing``,
0.5: about the last three refreshes; starting from 0 a single lucky value
cannot double an interval), and after each refresh of the matrix doubles
``T_j`` when ``s ≥ grow_above`` (default 0.4) and halves it when
``s < shrink_below`` (default 0.2), within ``[T, max_every]``.

The defaults come from the overlaps real training produces (``python -m
benchmarks.refresh_time --overlaps``: the small example Llama, scanned, 4
layers × 7 kernels, rank 32 of width 128 so ``c = 0.25``, ``T = 50``, 400
steps, staggered).  With SVD bases the mean ``ρ`` of a kernel is 0.31-0.50
over the first 100 steps, while the subspaces still move, and 0.56-0.74,
0.61-0.79, 0.61-0.80 over the next three hundred; from step 150 on the mean
``κ`` per kernel is 0.49-0.72 and 97 % of single values are ``≥ 0.4``
(tracked bases: ``ρ`` 0.36-0.53, then up to 0.88; ``κ`` 0.56-0.80, all
``≥ 0.4``).  Early on the drift shows: bases 10 steps apart overlap more
(``ρ`` 0.46-0.73 over steps 10-60) than 50 apart.  The old rule (raw ``ρ ≥
0.9``) never held in training; ``s ≥ 0.4`` holds for every block kernel once
the early phase is over and for none during it; random gradients give ``κ ≈
0``.  A tracked basis (:func:`~optax_lowrank.projections.subspace_iteration`,
one warm-started step) measures its own movement, which under strong
isotropic noise stays small even when the signal's subspace jumps: it then
lengthens its interval where an SVD would shrink it.

Q-GaLore (Zhang et al. 2024, arXiv 2407.08296) is the peer rule: at every
refresh it still runs the SVD, compares the first singular vector with the
previous one (cosine), and when the mean of the last five cosines reaches 0.4
doubles the layer's interval, which never shrinks.  ``lazy`` uses the whole
subspace's overlap instead: the first singular vector of a flat spectrum
swaps with the next one while the subspace stays (in the run above, from
step 150, its cosine averages 0.23-0.60 per kernel and single values range
over 0.02-0.94: Q-GaLore's rule would grow about three kernels of seven),
and a tracked basis (``olr.subspace_iteration``) only turns towards the
singular vectors one QR step per refresh, so its first column need not be one
yet.  It also shrinks again and bounds the interval.

Every matrix gets its first basis at step 0 whatever its offset.  The refresh
index that keys random parts of a basis (a randomized SVD's sketch) counts
the steps on which some matrix refreshed; the adapter path's ``merge`` counts
its calls the same way, so with :func:`due` both paths merge the same
matrices on the same steps with the same keys (see ``olr.adapters.merge``'s
``due``).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowrank import projections as proj
from optax_lowrank.leaves import LeafPlan, is_plan, map_plans

__all__ = [
    "Schedule",
    "ScheduleState",
    "SCHEDULES",
    "advance",
    "as_schedule",
    "chance_overlap",
    "due",
    "init",
    "lazy",
    "make_bases",
    "offsets",
    "zero_due",
    "overlaps",
    "stability",
    "staggered",
]

SCHEDULES = ("fixed", "staggered", "lazy")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A refresh schedule (frozen, hashable).

  Attributes:
    kind: ``"fixed"``, ``"staggered"`` or ``"lazy"``.
    max_every: lazy only: the longest interval in steps, rounded down to
      ``refresh_every · 2^k``; ``None`` means ``8 · refresh_every``.
    grow_above: lazy only: a smoothed chance-corrected overlap ``s ≥`` this
      doubles the interval (see the module).
    shrink_below: lazy only: ``s <`` this halves it (never below
      ``refresh_every``).
    smoothing: lazy only: ``β`` of ``s ← β·s + (1 − β)·κ``, in ``[0, 1)``
      (0: the latest refresh alone).
  """

  kind: str = "fixed"
  max_every: int | None = None
  grow_above: float = 0.4
  shrink_below: float = 0.2
  smoothing: float = 0.5

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"`refresh_schedule` must be one of {SCHEDULES}, got {self.kind!r}")
    if self.max_every is not None and (
        isinstance(self.max_every, bool) or not isinstance(self.max_every, int)
        or self.max_every < 1):
      raise ValueError(f"`max_every` must be an int >= 1 or None, got {self.max_every!r}")
    if not 0.0 <= self.shrink_below <= self.grow_above <= 1.0:
      raise ValueError(
          "lazy refresh needs 0 <= shrink_below <= grow_above <= 1, got "
          f"shrink_below={self.shrink_below!r}, grow_above={self.grow_above!r}")
    if not 0.0 <= self.smoothing < 1.0:
      raise ValueError(f"lazy refresh needs 0 <= smoothing < 1, got {self.smoothing!r}")

  def longest(self, refresh_every: int) -> int:
    """The longest interval: ``refresh_every · 2^k ≤ max_every`` (lazy), else ``refresh_every``."""
    if self.kind != "lazy":
      return refresh_every
    cap = 8 * refresh_every if self.max_every is None else self.max_every
    every = refresh_every
    while every * 2 <= cap:
      every *= 2
    return every


def staggered() -> Schedule:
  """Each matrix refreshes every ``refresh_every`` steps, on its own offset (see the module)."""
  return Schedule("staggered")


def lazy(max_every: int | None = None, grow_above: float = 0.4,
         shrink_below: float = 0.2, smoothing: float = 0.5) -> Schedule:
  """Staggered, with a per-matrix interval that adapts to how much its subspace moves.

  After each refresh of a matrix its score ``s ← β·s + (1 − β)·κ`` (from
  ``s = 0``) takes in the chance-corrected overlap ``κ = (ρ − c)/(1 − c)`` of
  its old and new subspaces (``ρ = Σ‖U_oldᵀ U_new‖²_F / Σr``; ``c``, the
  overlap of random subspaces, ``r/n`` for one factor); ``s ≥ grow_above``
  doubles its interval, ``s < shrink_below`` halves it.  The defaults are
  measured, see :mod:`optax_lowrank.refresh_schedule`.

  Args:
    max_every: the longest interval (steps); rounded down to
      ``refresh_every · 2^k``; default ``8 · refresh_every``.  The shortest is
      ``refresh_every``.
    grow_above: the score at or above which a matrix's interval doubles.
    shrink_below: the score below which it halves.
    smoothing: ``β``, the weight of the past refreshes in the score.
  """
  return Schedule("lazy", max_every, grow_above, shrink_below, smoothing)


def as_schedule(schedule: str | Schedule) -> Schedule:
  """A :class:`Schedule` from its name or itself (``ValueError`` for anything else)."""
  if isinstance(schedule, Schedule):
    return schedule
  if isinstance(schedule, str):
    return Schedule(schedule)
  raise ValueError(
      f"`refresh_schedule` must be one of {SCHEDULES} or olr.refresh_schedule.lazy(...), "
      f"got {schedule!r}")


class ScheduleState(NamedTuple):
  """Per-matrix refresh bookkeeping of a staggered or lazy schedule.

  Attributes:
    refreshes: int32 ``()``: steps so far on which some matrix refreshed (the
      refresh index of the keys of random basis parts).
    interval: a tree like the params: int32 ``batch_shape`` at projected
      leaves (each matrix's interval in steps), ``None`` elsewhere.
    overlap: like ``interval``, float32: the overlap ``‖U_oldᵀ U_new‖²_F / r``
      measured at each matrix's latest refresh (0 before its second basis).
    score: like ``interval``, float32: lazy only, the smoothed chance-corrected
      overlap ``s`` of the interval rule (0 before the second basis); ``None``
      for a staggered schedule.
  """

  refreshes: jax.Array
  interval: Any
  overlap: Any
  score: Any = None


def _matrices(p: LeafPlan) -> int:
  return int(np.prod(p.batch_shape, dtype=np.int64)) if p.batch_shape else 1


def offsets(plans: Any, refresh_every: int) -> Any:
  """Static offsets ``o_j ∈ [0, refresh_every)`` of every matrix (int32 NumPy, ``batch_shape``).

  Longest-processing-time assignment: matrices in decreasing order of
  ``spec.refresh_flops`` (ties by leaf and matrix order), each to the offset with the
  least work so far (ties to the smallest offset).  A function of the static
  plans only, so both paths compute the same offsets.
  """
  plan_leaves, plan_def = jax.tree.flatten(plans, is_leaf=is_plan)
  jobs = []
  for leaf, p in enumerate(plan_leaves):
    if p.projected:
      cost = max(p.spec.refresh_flops(p.view_shape), 1)
      jobs.extend((-cost, leaf, b) for b in range(_matrices(p)))
  jobs.sort()
  heap = [(0, o) for o in range(refresh_every)]
  out = {leaf: np.zeros(_matrices(p), np.int32) for leaf, p in enumerate(plan_leaves)
         if p.projected}
  for neg_cost, leaf, b in jobs:
    load, o = heapq.heappop(heap)
    out[leaf][b] = o
    heapq.heappush(heap, (load - neg_cost, o))
  return jax.tree.unflatten(plan_def, [
      out[leaf].reshape(p.batch_shape) if p.projected else None
      for leaf, p in enumerate(plan_leaves)])


def init(schedule: Schedule, plans: Any, refresh_every: int) -> ScheduleState | None:
  """The schedule's state at step 0 (``None`` for ``"fixed"``)."""
  if schedule.kind == "fixed":
    return None
  interval = map_plans(
      lambda p: jnp.full(p.batch_shape, refresh_every, jnp.int32) if p.projected else None,
      plans)
  overlap = map_plans(
      lambda p: jnp.zeros(p.batch_shape, jnp.float32) if p.projected else None, plans)
  # A buffer of its own (not ``overlap``'s): a donated state must not hold one array twice.
  score = map_plans(
      lambda p: jnp.zeros(p.batch_shape, jnp.float32) if p.projected else None, plans
  ) if schedule.kind == "lazy" else None
  return ScheduleState(jnp.zeros([], jnp.int32), interval, overlap, score)


def chance_overlap(plan: LeafPlan) -> float:
  """The overlap ``E ρ`` of two independent uniformly random subspaces of ``plan``'s factors.

  ``Σ_i r_i²/n_i / Σ_i r_i`` over the factored axes (``n_i`` the axis, ``r_i`` its
  rank in the coefficients): ``r/n`` for a one-sided basis.  1 when no axis is
  reduced.
  """
  coef = proj.coefficient_shape(plan.spec, plan.view_shape)
  pairs = [(n, r) for n, r in zip(plan.view_shape, coef) if r < n]
  if len(coef) != len(plan.view_shape) or not pairs:
    return 1.0
  return sum(r * r / n for n, r in pairs) / sum(r for _, r in pairs)


def stability(plan: LeafPlan, overlap: jax.Array) -> jax.Array:
  """The chance-corrected overlap ``κ = (ρ − c) / (1 − c)`` (``c``: :func:`chance_overlap`)."""
  c = chance_overlap(plan)
  if c >= 1.0:
    return jnp.ones_like(overlap)
  return (overlap - c) / (1.0 - c)


def due(schedule: Schedule, plans: Any, refresh_every: int, count: jax.Array,
        state: ScheduleState | None) -> Any:
  """Which matrices refresh on step ``count``: bools, ``batch_shape`` at projected leaves.

  Every matrix is due at step 0.  ``"fixed"``: all on ``count % refresh_every == 0``;
  ``"staggered"``: ``(count + o_j) % refresh_every == 0``; ``"lazy"``:
  ``(count + o_j) % interval_j == 0``.
  """
  count = jnp.asarray(count, jnp.int32)
  if schedule.kind == "fixed":
    return map_plans(
        lambda p: jnp.broadcast_to(count % refresh_every == 0, p.batch_shape)
        if p.projected else None, plans)
  offs = offsets(plans, refresh_every)
  intervals = state.interval if schedule.kind == "lazy" else map_plans(lambda p: None, plans)

  def one(p, o, every):
    if not p.projected:
      return None
    every = refresh_every if every is None else every
    return (count == 0) | ((count + jnp.asarray(o)) % every == 0)

  return map_plans(one, plans, offs, intervals)


def any_due(due_tree: Any) -> jax.Array:
  """Whether any matrix of the tree is due (a bool scalar)."""
  flags = [jnp.any(d) for d in jax.tree.leaves(due_tree)]
  return jnp.any(jnp.stack(flags)) if flags else jnp.zeros([], bool)


def zero_due(plans: Any, coefficients: Any, due_tree: Any) -> Any:
  """``Λ`` restarted at 0 for the due matrices (all of them when ``due_tree`` is ``None``)."""
  if due_tree is None:
    return jax.tree.map(jnp.zeros_like, coefficients)

  def one(p, c, d):
    if c is None or d is None:
      return c
    return jnp.where(d.reshape(d.shape + (1,) * (c.ndim - d.ndim)), jnp.zeros_like(c), c)

  return map_plans(one, plans, coefficients, due_tree)


def make_bases(plans: Any, base_key: jax.Array, refresh_index: jax.Array, grads: Any,
               previous: Any = None, due_tree: Any = None) -> tuple[Any, Any]:
  """New stored bases of the due matrices and their overlaps with the previous ones.

  Args:
    plans: the plan tree.
    base_key, refresh_index: the keys of random basis parts (as
      ``leaves.make_bases``).
    grads: the gradient tree (needed by gradient-made specs).
    previous: the current stored bases (tracking specs start from them;
      matrices that are not due keep them); ``None`` for first bases.
    due_tree: from :func:`due`, or ``None`` (every matrix).

  Returns:
    ``(stored, overlap)``: the stored bases (``None`` at leaves without one)
    and float32 ``batch_shape`` overlaps (1 for matrices not due; ``None``
    without ``previous``).
  """
  if grads is None:
    grads = map_plans(lambda p: None, plans)
  if previous is None:
    previous = map_plans(lambda p: None, plans)
  if due_tree is None:
    due_tree = map_plans(lambda p: None, plans)

  def one(p: LeafPlan, g, prev, d):
    if not p.stored:
      return None
    key = proj.leaf_key(base_key, refresh_index, p.index)
    if p.spec.needs_grad and g is None:
      raise ValueError(
          f"leaf '{p.path}' of shape {p.shape}: the projection {p.spec} is made "
          "from the gradient, so `grads` must be given")
    view = p.grad_view(g) if p.spec.needs_grad else None
    return p.spec.refreshed(p.shape, p.view_shape, p.perm, key, view, p.basis_dtype,
                            p.batch_shape, previous=prev, due=d)

  pairs = map_plans(one, plans, grads, previous, due_tree)
  stored = map_plans(lambda p, x: None if x is None else x[0], plans, pairs)
  overlap = map_plans(lambda p, x: None if x is None else x[1], plans, pairs)
  return stored, overlap


def overlaps(plans: Any, old_bases: Any, new_bases: Any) -> Any:
  """``‖U_oldᵀ U_new‖²_F / r`` of every matrix (float32, ``batch_shape``) from two basis trees.

  For the adapter path: the overlaps ``make_bases`` reports on the gradient path.
  """

  def one(p, old, new):
    if not p.stored:
      return None
    fn = proj.subspace_overlap
    for _ in p.batch_shape:
      fn = jax.vmap(fn)
    return fn(old.factors, new.factors)

  return map_plans(one, plans, old_bases, new_bases)


def advance(schedule: Schedule, plans: Any, refresh_every: int, state: ScheduleState | None,
            count: jax.Array, due_tree: Any, overlap: Any) -> ScheduleState | None:
  """The schedule's state after the refresh of step ``count`` (the due matrices).

  ``refreshes`` grows by one when any matrix was due.  Lazy: each due matrix
  (after step 0) updates its score ``s ← β·s + (1 − β)·κ`` (:func:`stability`),
  then doubles its interval when ``s ≥ grow_above`` (up to
  :meth:`Schedule.longest`) and halves it when ``s < shrink_below`` (down to
  ``refresh_every``).  Overlaps of due matrices are recorded.
  """
  if state is None:
    return None
  count = jnp.asarray(count, jnp.int32)
  if overlap is None:  # first bases (step 0): nothing to compare with
    overlap = map_plans(lambda p: jnp.zeros(p.batch_shape, jnp.float32) if p.projected else None,
                        plans)
  longest = schedule.longest(refresh_every)

  measured = lambda d: d & (count > 0)
  beta = schedule.smoothing

  def score(p, old, d, o):
    if not p.projected or old is None:
      return old
    new = beta * old + (1.0 - beta) * stability(p, o)
    return jnp.where(measured(d), new, old).astype(jnp.float32)

  lazy_ = schedule.kind == "lazy"
  scores = map_plans(score, plans, state.score, due_tree, overlap) if lazy_ else state.score

  def interval(p, every, d, s):
    if not p.projected or not lazy_:
      return every
    grow = jnp.minimum(every * 2, longest)
    shrink = jnp.maximum(every // 2, refresh_every)
    new = jnp.where(s >= schedule.grow_above, grow, jnp.where(s < schedule.shrink_below,
                                                                shrink, every))
    return jnp.where(measured(d), new, every).astype(jnp.int32)

  def recorded(p, old, d, o):
    if not p.projected:
      return old
    return jnp.where(measured(d), o, old).astype(jnp.float32)

  return ScheduleState(
      refreshes=state.refreshes + any_due(due_tree).astype(jnp.int32),
      interval=(map_plans(interval, plans, state.interval, due_tree, scores) if lazy_
                else state.interval),
      overlap=map_plans(recorded, plans, state.overlap, due_tree, overlap),
      score=scores,
  )
