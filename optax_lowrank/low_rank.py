"""``low_rank``: run any optax transformation in a small projected space.

For every projected leaf ``W ∈ R^{m×n}`` with gradient ``G`` and basis ``S``:

    c_t = S_t · vec(G_t)                 (project: r-sized coefficients)
    Δ_t, ξ_t = inner(c_t, ξ_{t-1})       (any optax transformation, small state)
    u_t = α · unvec(S_tᵀ Δ_t)            (project back, scaled)

Leaves that are not projected (biases, norms, anything ``where`` leaves out)
go through the same ``inner`` at full size, in the same inner state.  The basis
is re-made every ``refresh_every`` steps (the first at step 0) inside a
``lax.cond``, so decompositions run only on refresh steps; ``on_refresh``
decides what happens to the inner statistics then (see
:mod:`optax_lowrank.refresh`).

References: Zhao et al. 2024, GaLore, arXiv:2403.03507, Alg. 1; Hao, Cao and
Mou 2024, Flora, arXiv:2402.03293; Torroba-Hennigen, Lang, Guo and Kim 2025,
arXiv:2502.13811 (the gradient map ``S`` and the adapter ``Θ0 + SᵀΛ`` give the
same trajectory, see ``olr.adapters``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import full_rank as full_rank_lib
from optax_lowrank import leaves as leaves_lib
from optax_lowrank import projections as proj
from optax_lowrank import refresh as refresh_lib
from optax_lowrank import refresh_schedule as schedule_lib
from optax_lowrank.bases import project, project_back
from optax_lowrank.leaves import map_plans

__all__ = ["LowRankState", "low_rank"]


class LowRankState(NamedTuple):
  """State of :func:`low_rank`.

  Attributes:
    count: int32 ``()``, the number of updates taken; a refresh happens when
      ``count % refresh_every == 0``.
    key: uint32 ``(2,)``, the base PRNG key of random bases (from ``seed``); a
      leaf's key at refresh ``k`` is ``fold_in(fold_in(key, k), leaf_index)``.
    bases: a tree shaped like the params holding the stored
      :class:`~optax_lowrank.bases.Basis` of every projected leaf whose spec is
      stored (SVD, randomized SVD, semi-orthogonal, two-sided SVD, Tucker) and
      ``None`` elsewhere: random sketches are rebuilt from ``key`` each step.
    inner_state: the inner transformation's state over the coefficient tree
      (coefficient-shaped at projected leaves, full-size elsewhere).
    coefficients: with ``track_coefficients=True``, the adapter-view ``Λ`` of
      every projected leaf (``None`` at others): the sum of the back-projected
      steps ``α·Δ`` in the small space since the last refresh, zeroed at every
      refresh exactly as ``olr.adapters.merge`` zeroes ``Λ``; otherwise ``None``.
    limiter: with a ``full_rank`` rule that limits norm growth, the norm of the
      last limited update of every projected matrix (``batch_shape``, in the
      basis dtype, per leaf; ``None`` at others; see
      :mod:`optax_lowrank.full_rank`); otherwise ``None``.
    schedule: with a staggered or lazy ``refresh_schedule``, the per-matrix
      :class:`~optax_lowrank.refresh_schedule.ScheduleState`; otherwise ``None``.
  """

  count: jax.Array
  key: jax.Array
  bases: Any
  inner_state: optax.OptState
  coefficients: Any = None
  limiter: Any = None
  schedule: Any = None


def low_rank(
    inner: optax.GradientTransformation,
    projection: proj.Projection,
    refresh_every: int = 200,
    on_refresh: str = "keep",
    scale: float | jax.Array = 1.0,
    where: Any = None,
    seed: int = 0,
    *,
    reshape: leaves_lib.ReshapeRule | Callable[..., Any] | None = None,
    track_coefficients: bool = False,
    unprojected: optax.GradientTransformation | None = None,
    full_rank: full_rank_lib.FullRankRule | None = None,
    refresh_schedule: str | schedule_lib.Schedule = "fixed",
) -> optax.GradientTransformationExtraArgs:
  """Run ``inner`` on projected gradients and map its updates back.

  Args:
    inner: any optax transformation, applied to the coefficient tree (the
      params' structure, with each projected leaf replaced by its coefficients).
      Extra keyword arguments of ``update`` are forwarded to it.  As ``params``
      it sees the weights at unprojected leaves and, at projected leaves, the
      adapter-view coefficients ``Λ`` with ``track_coefficients=True`` or zeros
      of the coefficients' shape otherwise (enough for transformations that
      only read shapes, such as Adafactor).  So decoupled weight decay belongs
      *outside* ``low_rank`` in the chain (it then decays the full weights), or
      inside with ``track_coefficients=True`` (it then decays ``Λ``).
    projection: a spec such as ``olr.svd(128)`` or ``olr.gaussian(64)``.
    refresh_every: steps between new bases; the first basis is made at step 0.
    on_refresh: ``"keep"`` (GaLore), ``"reset"`` (ReLoRA) or ``"transport"``
      (statistics carried into the new basis), see :mod:`optax_lowrank.refresh`.
    scale: ``α``, multiplies the back-projected updates of projected leaves only
      (GaLore's scale; may be a traced hyper-parameter).
    where: which leaves to project: ``None`` (every 2-D leaf for matrix specs,
      every leaf with ≥ 2 axes for ``tucker``/``dense``, and the leaves a
      ``reshape`` rule or the params' ``"layers"`` axis names make matrices,
      except where projection saves nothing: a leaf whose clamped rank reaches
      its smaller dimension gets ``inner`` at full size, unscaled), a pytree of
      bools like the params, or a callable ``(path: tuple[str, ...], leaf) ->
      bool``; a leaf selected explicitly is projected even where that saves
      nothing.  Non-float leaves are never trained (zero update).
    seed: random bases are a deterministic function of ``(seed, refresh index,
      leaf index)``; the gradient path and ``olr.adapters`` agree on it.
    reshape: how leaves with more than two axes are seen as matrices, e.g.
      ``1`` for an attention kernel ``(embed, heads, head_dim)`` →
      ``(embed, heads·head_dim)``; an int split, ``(row_axes, col_axes)``, a
      triple ``(batch_axes, row_axes, col_axes)`` for *stacked* leaves (the
      ``(layers, in, out)`` kernels of a scanned model with
      ``((0,), (1,), (2,))``: every index of the batch axes is its own matrix
      with its own basis, coefficients and inner statistics, as if it were a
      separate leaf), optax's ``MuonDimensionNumbers`` (the triple, axes not
      named being batch axes) and ``GaLoreDimensionNumbers`` (the pair), a
      pytree of rules shaped like the params, a callable ``(path, leaf) ->
      rule | None``, or ``olr.stacked(layer_axis)`` for a model's stacked
      layers (see :func:`optax_lowrank.leaves.plan`).  See the how-tos
      "Scanned and stacked layers" and "Use it with your model".
    track_coefficients: keep the adapter-view coefficients ``Λ`` (see
      :class:`LowRankState`) and pass them to ``inner`` as its ``params``.
      Weight decay *inside* ``inner`` (``optax.add_decayed_weights``) then
      decays ``Λ``, exactly as training the adapter ``Θ0 + SᵀΛ`` with AdamW
      would (Torroba-Hennigen et al. 2025, arXiv:2502.13811, App. B); decay
      *outside* ``low_rank`` in the chain decays the full weights instead.
      Costs one more coefficient-sized buffer per projected leaf.
    unprojected: optional transformation for the leaves that are not
      projected, instead of ``inner`` (GaLore's "parameter groups"): e.g. a
      gradient-history preconditioner only in the small space and plain Adam on
      biases and norms.  Both states then live in an
      ``optax.multi_transform`` state with labels ``"projected"`` /
      ``"unprojected"``.
    full_rank: how a projected leaf's step comes back to full size, instead
      of ``α·Sᵀ Δ``: a rule of :mod:`optax_lowrank.full_rank` such as
      ``scaled_gradient()`` (APOLLO: the gradient rescaled channel- or
      tensor-wise by ``‖Δ‖/‖S g‖``) or ``scaled_residual()`` (Fira: ``α·Sᵀ Δ``
      plus the rescaled residual), with its norm-growth limiter.  Put the
      learning rate after ``low_rank`` then (see the module).
    refresh_schedule: ``"fixed"`` (every matrix on ``count % refresh_every ==
      0``), ``"staggered"`` (each matrix, each matrix of a stack too, on its own
      offset, so a step does about ``1/refresh_every`` of the decompositions) or
      ``"lazy"`` / ``olr.refresh_schedule.lazy(max_every, ...)`` (staggered,
      with a per-matrix interval that doubles while its subspace is stable
      and halves when it moves); see :mod:`optax_lowrank.refresh_schedule`.
      Staggered and lazy schedules need a stored basis (SVD family,
      ``subspace_iteration``, ``semi_orthogonal``, Tucker) and an int
      ``refresh_every``.

  Returns:
    A ``GradientTransformationExtraArgs``; its state is :class:`LowRankState`.

  Memory (per projected ``m×n`` leaf, one-sided rank ``r``, right side):
  inner state on ``m·r`` coefficients (Adam: ``2·m·r`` floats) plus ``n·r``
  floats for a stored basis, nothing for ``gaussian``/``rademacher``; a stack
  of ``L`` matrices costs ``L`` times that.

  Raises:
    ValueError: at construction, for a bad ``refresh_every`` or ``on_refresh``,
      ``track_coefficients`` with a ``full_rank`` rule, or a staggered or lazy
      schedule without a stored basis and an int ``refresh_every``; at
      ``init``, for a ``where`` or ``reshape`` that does not fit the params or a
      leaf that cannot be projected (naming the leaf and the argument); at
      ``update``, for gradients that do not fit the params or the state.
    TypeError: at construction, when ``projection`` is not a projection spec or
      ``seed`` is not an int.

  ``init`` and ``update`` close over the checked arguments, as optax's
  transformations do; the steps of ``update`` (which matrices refresh, the
  refresh, the way back to full size) are named helpers of this module, so the
  function is long only by its arguments' documentation.
  """
  full_rank, schedule = _check_arguments(projection, refresh_every, on_refresh, seed, full_rank,
                                         track_coefficients, refresh_schedule)
  tracks = projection.tracks
  inner = optax.with_extra_args_support(inner)
  if unprojected is not None:
    groups = {"projected": inner, "unprojected": optax.with_extra_args_support(unprojected)}

  def make_plans(tree, params=None):  # axis names: see leaves.recalled_axis_names
    names = leaves_lib.recalled_axis_names(tree, params)
    return leaves_lib.plan(tree, projection, where, reshape, axis_names=names)

  def inner_for(plans):
    if unprojected is None:
      return inner
    labels = map_plans(lambda p: "projected" if p.projected else "unprojected", plans)
    return optax.multi_transform(groups, labels)

  def init_fn(params):
    plans = make_plans(params)
    params = leaves_lib.unwrap_variables(params)
    return LowRankState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(seed),
        bases=leaves_lib.zero_bases(plans),
        inner_state=inner_for(plans).init(leaves_lib.inner_zeros(plans, params)),
        coefficients=_projected_zeros(plans) if track_coefficients else None,
        limiter=full_rank_lib.init(full_rank, plans),
        schedule=schedule_lib.init(schedule, plans, refresh_every),
    )

  def update_fn(updates, state, params=None, **extra_args):
    updates_in = updates
    updates = leaves_lib.unwrap_variables(updates)
    params_in, params = params, leaves_lib.unwrap_variables(params)
    leaves_lib.check_updates(updates, state.bases, params)
    plans = make_plans(updates_in, params_in)
    inner_tx = inner_for(plans)
    count = state.count
    refresh_index = count // refresh_every
    due, key_index, is_refresh = _refresh_points(schedule, plans, refresh_every, count,
                                                 state.schedule)

    def refresh(operand):
      stored, inner_state, coefficients, sched = operand
      if track_coefficients:  # merge: Λ is folded into the weights and restarts at 0
        coefficients = schedule_lib.zero_due(plans, coefficients, due)
      if due is None and not tracks:
        new_stored = leaves_lib.make_bases(plans, state.key, refresh_index, updates, stored=True)
        overlap = None
      else:  # only due matrices are decomposed; tracking specs start from the old basis
        new_stored, overlap = schedule_lib.make_bases(plans, state.key, key_index, updates,
                                                      previous=stored, due_tree=due)
      # Even "keep" clears gradient histories (see optax_lowrank.refresh).
      old = leaves_lib.current_bases(plans, stored, state.key, refresh_index - 1)
      new = leaves_lib.current_bases(plans, new_stored, state.key, refresh_index)
      inner_state = jax.lax.cond(
          count > 0,
          lambda s: refresh_lib.apply_policy(on_refresh, inner_tx, s, plans, old, new, due),
          lambda s: s,
          inner_state,
      )
      sched = schedule_lib.advance(schedule, plans, refresh_every, sched, count, due, overlap)
      return new_stored, inner_state, coefficients, sched

    stored, inner_state, coefficients, sched = jax.lax.cond(
        is_refresh, refresh, lambda operand: operand,
        (state.bases, state.inner_state, state.coefficients, state.schedule),
    )
    bases = leaves_lib.current_bases(plans, stored, state.key, refresh_index)
    coeffs = map_plans(
        lambda p, g, b: project(b, g) if p.projected else g, plans, updates, bases
    )
    coeffs = leaves_lib.mask_frozen(plans, coeffs)  # non-float leaves: not the inner's
    inner_params = None if params is None else inner_params_of(plans, params, coefficients)
    inner_updates, inner_state = inner_tx.update(coeffs, inner_state, inner_params,
                                                 **extra_args)
    new_updates, inner_updates, limiter = _to_full_size(
        full_rank, plans, updates, coeffs, inner_updates, scale, bases, state.limiter)
    new_updates = leaves_lib.zero_frozen(plans, updates, new_updates, params)
    if track_coefficients:
      coefficients = map_plans(
          lambda p, c, u: c + u.astype(c.dtype) if p.projected else None,
          plans, coefficients, inner_updates,
      )
    new_state = LowRankState(
        count=optax.safe_increment(count),
        key=state.key,
        bases=stored,
        inner_state=inner_state,
        coefficients=coefficients,
        limiter=limiter,
        schedule=sched,
    )
    return leaves_lib.rewrap_like(updates_in, new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_arguments(projection, refresh_every, on_refresh, seed, full_rank, track_coefficients,
                     refresh_schedule):
  """The checks of :func:`low_rank`'s arguments; returns ``(full_rank, schedule)``, checked."""
  if not isinstance(projection, proj.Projection):
    raise TypeError(
        f"`projection` must be a projection spec such as olr.svd(128), got {projection!r}"
    )
  # Python values are checked here; arrays (e.g. from optax.inject_hyperparams)
  # are accepted as they are.
  if not isinstance(refresh_every, jax.Array) and (
      isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1
  ):
    raise ValueError(f"`refresh_every` must be an int >= 1, got {refresh_every!r}")
  refresh_lib.check_policy(on_refresh)
  if not isinstance(seed, jax.Array) and (isinstance(seed, bool) or not isinstance(seed, int)):
    raise TypeError(f"`seed` must be an int, got {seed!r}")
  full_rank = full_rank_lib.check_rule(full_rank)
  if full_rank is not None and track_coefficients:
    raise ValueError("`track_coefficients` keeps the adapter view Λ of updates Sᵀ Δ; with a "
                     "`full_rank` rule the updates leave the subspace, so there is none")
  schedule = schedule_lib.as_schedule(refresh_schedule)
  if schedule.kind != "fixed" and (isinstance(refresh_every, jax.Array) or not projection.stored):
    raise ValueError(
        f"`refresh_schedule={schedule.kind!r}` needs a stored basis and an int `refresh_every`; "
        f"got {projection} (a sketch rebuilt from the key has no decomposition to spread) "
        f"and refresh_every={refresh_every!r}")
  return full_rank, schedule


def _refresh_points(schedule, plans, refresh_every, count, schedule_state):
  """``(due, key_index, is_refresh)`` of step ``count``.

  The fixed schedule refreshes every matrix on ``count % refresh_every == 0``
  (``due`` is ``None``; keys count refreshes); the others give each matrix its
  own steps (``due``: bools per matrix; keys count the steps with a refresh).
  """
  if schedule.kind == "fixed":
    return None, count // refresh_every, count % refresh_every == 0
  due = schedule_lib.due(schedule, plans, refresh_every, count, schedule_state)
  return due, schedule_state.refreshes, schedule_lib.any_due(due)


def _to_full_size(full_rank, plans, updates, coeffs, steps, scale, bases, limiter):
  """The inner steps ``Δ`` back at full size: ``(updates, α·Δ, limiter)``.

  ``α`` applies to projected leaves only, in the small space (``Sᵀ`` is
  linear); a ``full_rank`` rule measures the unscaled ``Δ`` against the
  coefficients it came from and applies ``α`` itself.
  """
  scaled = map_plans(lambda p, u: scale * u if p.projected else u, plans, steps)
  if full_rank is None:
    back = map_plans(
        lambda p, g, u, b: project_back(b, u).astype(g.dtype) if p.projected else u,
        plans, updates, scaled, bases,
    )
    return back, scaled, limiter
  back, limiter = full_rank_lib.back_to_full(
      full_rank, plans, updates, coeffs, steps, scale, bases, limiter)
  return back, scaled, limiter


def _projected_zeros(plans: Any) -> Any:
  return map_plans(
      lambda p: jnp.zeros(p.coefficient_shape, p.coefficient_dtype) if p.projected else None,
      plans,
  )


def inner_params_of(plans: Any, params: Any, coefficients: Any | None) -> Any:
  """What the inner transformation sees as ``params`` (see :func:`low_rank`).

  The weights at unprojected leaves; at projected leaves ``Λ`` when tracked,
  else zeros shaped like the coefficients.  ``olr.adapters.inner_params``
  builds the same tree on the adapter path.
  """
  if coefficients is None:
    coefficients = _projected_zeros(plans)
  return map_plans(lambda p, w, c: c if p.projected else (optax.MaskedNode() if p.frozen else w),
                   plans, params, coefficients)
