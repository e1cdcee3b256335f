"""Full-rank updates from low-rank statistics: other ways back to full size.

``olr.low_rank`` normally maps the inner optimizer's step back with the
transpose of the projection, ``u = α·Sᵀ Δ``, so a projected leaf only ever
moves inside the current subspace.  The rules here use the small step ``Δ``
(the inner optimizer's output on the coefficients ``C = S g``) only as a
*measurement* of how much the optimizer rescales the gradient, and apply that
rescaling to something full-rank.  For one matrix ``G ∈ R^{m×n}`` projected on
the left (``C = P G``, ``P ∈ R^{r×m}``; the right side is the same with rows
and columns exchanged), a *channel* is a column ``j`` of ``G`` — an axis the
projection does not touch — and the scaling factors are

    channel-wise:  s_j = ‖Δ[:, j]‖ / ‖C[:, j]‖        (one factor per channel)
    tensor-wise:   s   = ‖Δ‖_F / ‖C‖_F                 (one factor per matrix)

(``0`` where the coefficients are all zero).  Two rules use them:

* :func:`scaled_gradient` (APOLLO, Zhu et al. 2025, "APOLLO: SGD-like Memory,
  AdamW-level Performance", arXiv 2412.05270): the update is the raw gradient
  rescaled, ``U = α·G·diag(s)`` (or ``α·s·G``).  With a random projection
  (``olr.gaussian``) nothing but the inner statistics on ``r×n`` coefficients
  is stored; with rank 1 and tensor-wise scaling this is APOLLO-Mini.
* :func:`scaled_residual` (Fira, Chen et al. 2024, "Fira: Can We Achieve
  Full-rank Training of LLMs Under Low-rank Constraint?", arXiv 2410.01623):
  the ordinary low-rank step plus the part of the gradient outside the
  subspace, rescaled, ``U = α·Pᵀ Δ + φ ∘ (G − Pᵀ C)`` with ``φ = s``.

Both may be followed by the *norm-growth limiter* of the two papers: with
``X_t`` the limited term (the scaled gradient ``G·diag(s)`` for APOLLO, the
scaled residual for Fira) and ``γ = limit``,

    if ‖X_t‖ > γ·‖X_{t−1}‖:   X_t ← X_t · γ‖X_{t−1}‖ / ‖X_t‖

(never at the first step).  It keeps one float per matrix, the norm of the
last limited term, in :attr:`optax_lowrank.LowRankState.limiter`.

``α`` is ``low_rank``'s ``scale``; the factors are measured on the unscaled
``Δ``.  It multiplies APOLLO's whole update (the paper's gradient scale
factor) and only Fira's low-rank term, as in GaLore (Fira's reference code
does the same).  The learning rate must come *after* ``low_rank`` (as in
:func:`optax_lowrank.apollo`): inside the inner chain its sign would be lost
in the norms, and a warm-up would look like norm growth to the limiter.

Cost per ordinary step and matrix: the projection ``P G`` (``2·m·n·r`` FLOPs)
and two elementwise passes over ``G`` (channel norms, then the scaled update);
no back-projection GEMM for :func:`scaled_gradient`, one (of ``Δ − φ∘C``) for
:func:`scaled_residual`, whose residual norm is computed from the
coefficients and the factors' Gram matrices, without forming ``G − Pᵀ C``.
Stacked leaves (``reshape=(batch, rows, cols)``) get their own factors and
limiter per matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowrank import bases as bases_lib
from optax_lowrank.leaves import LeafPlan, map_plans

__all__ = ["FullRankRule", "GRANULARITIES", "scaled_gradient", "scaled_residual"]

GRANULARITIES = ("channel", "tensor")


@dataclasses.dataclass(frozen=True)
class FullRankRule:
  """How :func:`~optax_lowrank.low_rank` maps a projected leaf's step back to full size.

  Made by :func:`scaled_gradient` or :func:`scaled_residual`; pass it as
  ``low_rank(..., full_rank=rule)``.

  Attributes:
    residual: ``False``: rescale the raw gradient (APOLLO); ``True``: the
      low-rank step plus the rescaled residual (Fira).
    granularity: ``"channel"`` (one factor per channel, needs a one-sided
      projection) or ``"tensor"`` (one per matrix, any projection).
    limit: ``γ > 1`` of the norm-growth limiter, or ``None`` for none (may be
      an array, e.g. under ``optax.inject_hyperparams``).
  """

  residual: bool
  granularity: str = "channel"
  limit: float | jax.Array | None = 1.01

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(
          f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}"
      )
    limit = self.limit
    if limit is not None and not isinstance(limit, jax.Array):
      if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 1:
        raise ValueError(f"`limit` must be a float > 1 or None, got {limit!r}")

  # -- per leaf --------------------------------------------------------------

  def check(self, plan: LeafPlan) -> None:
    """Raises if the rule cannot serve this projected leaf (channel-wise needs a free axis)."""
    if self.granularity == "channel" and None not in plan.spec.axis_ranks(plan.view_shape):
      raise ValueError(
          f"leaf '{plan.path}' of shape {plan.shape}: `full_rank` with granularity='channel' "
          f"needs a one-sided projection (an axis the projection leaves alone), but "
          f"{plan.spec} projects every axis; use granularity='tensor'"
      )

  def init_leaf(self, plan: LeafPlan) -> jax.Array | None:
    """The limiter's memory of one projected leaf: zeros, one per matrix (``None``: no limiter)."""
    if self.limit is None:
      return None
    return jnp.zeros(plan.batch_shape, plan.basis_dtype)

  def apply(self, plan: LeafPlan, basis: bases_lib.Basis, g: jax.Array, c: jax.Array,
            u: jax.Array, last: jax.Array | None,
            scale: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array | None]:
    """The full-size update of one projected leaf and the limiter's new memory.

    Args:
      plan: the leaf's plan.
      basis: its current basis.
      g: the gradient (leaf shape and dtype).
      c: the coefficients ``project(basis, g)``.
      u: the inner optimizer's step ``Δ`` on ``c``.
      last: the norm of the previous limited term per matrix (``batch_shape``),
        or ``None`` without a limiter.
      scale: ``α`` (see the module docstring).

    Returns:
      ``(update, last)``: the update in ``g``'s shape and dtype, and the norm of
      this step's limited term.
    """
    nb = len(plan.batch_shape)
    ranks = plan.spec.axis_ranks(plan.view_shape)
    view_axes = tuple(range(nb, nb + len(ranks)))
    if self.granularity == "channel":
      reduced = tuple(nb + i for i, r in enumerate(ranks) if r is not None)
    else:
      reduced = view_axes
    dtype = c.dtype
    u = u.astype(dtype)
    sum_sq = lambda x, axes: jnp.sum(jnp.square(x), axis=axes, keepdims=True)
    norm_c = jnp.sqrt(sum_sq(c, reduced))
    positive = norm_c > 0
    s = jnp.where(positive, jnp.sqrt(sum_sq(u, reduced)) / jnp.where(positive, norm_c, 1), 0)
    gv = bases_lib.to_view(basis, g)
    # ‖s∘G‖² from the channel sums of squares (s is constant over `reduced`).
    scaled_g_sq = jnp.sum(jnp.square(s) * sum_sq(gv.astype(dtype), reduced), axis=view_axes)
    if not self.residual:
      factor, new_last = _limit(jnp.sqrt(scaled_g_sq), last, self.limit)
      out = gv * (scale * _expand(factor, s.ndim) * s)
      return bases_lib.from_view(basis, out).astype(g.dtype), _like(new_last, last)
    # Fira: S = φ∘(G − Pᵀ C) = φ∘G − Pᵀ(φ∘C), since φ acts on the free axes only;
    # ‖S‖² = ‖φ∘G‖² − 2‖φ∘C‖² + ‖Pᵀ(φ∘C)‖²  (⟨φ∘G, Pᵀx⟩ = ⟨φ∘C, x⟩ as C = P G).
    x = s * c
    x_sq = jnp.sum(jnp.square(x), axis=view_axes)
    residual_sq = scaled_g_sq - 2 * x_sq + _back_sq_norm(basis, x)
    factor, new_last = _limit(jnp.sqrt(jnp.maximum(residual_sq, 0)), last, self.limit)
    f = _expand(factor, s.ndim)
    low = bases_lib.project_back(basis, scale * u - f * x)
    out = low + bases_lib.from_view(basis, gv * (f * s))
    return out.astype(g.dtype), _like(new_last, last)


def scaled_gradient(granularity: str = "channel", limit: float | None = 1.01) -> FullRankRule:
  """APOLLO's way back: the raw gradient rescaled by factors measured in the small space.

  ``U = α·G·diag(s)`` with ``s_j = ‖Δ[:, j]‖ / ‖C[:, j]‖`` per channel (the
  axis the projection leaves alone), or ``U = α·s·G`` with ``s = ‖Δ‖/‖C‖``
  (``granularity="tensor"``, APOLLO-Mini), the norm-growth limiter on
  ``G·diag(s)``.  Zhu et al. 2025, arXiv 2412.05270, Alg. 1.

  Args:
    granularity: ``"channel"`` or ``"tensor"``.
    limit: ``γ`` of the norm-growth limiter (the paper's ``1.01``), or ``None``.
  """
  return FullRankRule(residual=False, granularity=granularity, limit=limit)


def scaled_residual(granularity: str = "channel", limit: float | None = 1.01) -> FullRankRule:
  """Fira's way back: the low-rank step plus the rescaled residual outside the subspace.

  ``U = α·Pᵀ Δ + S`` with ``S = φ∘(G − Pᵀ C)``, ``φ_j = ‖Δ[:, j]‖ / ‖C[:, j]‖``
  per channel (or one ``φ = ‖Δ‖/‖C‖`` per matrix), the norm-growth limiter
  applied to ``S``.  Chen et al. 2024, arXiv 2410.01623, §3 (norm-based
  scaling, norm-growth limiter).

  Args:
    granularity: ``"channel"`` (Fira's column-wise factors) or ``"tensor"``.
    limit: ``γ`` of the norm-growth limiter (the paper's ``1.01``), or ``None``.
  """
  return FullRankRule(residual=True, granularity=granularity, limit=limit)


# -- the tree-level hooks used by low_rank -------------------------------------


def check_rule(rule: Any) -> FullRankRule | None:
  """``rule`` if it is a :class:`FullRankRule` or ``None``; raises ``TypeError`` otherwise."""
  if rule is not None and not isinstance(rule, FullRankRule):
    raise TypeError(
        "`full_rank` must be None or a rule such as olr.full_rank.scaled_gradient(), "
        f"got {rule!r}"
    )
  return rule


def init(rule: FullRankRule | None, plans: Any) -> Any:
  """The limiter state of every projected leaf (``None`` elsewhere, or ``None`` in all)."""
  if rule is None:
    return None
  map_plans(lambda p: rule.check(p) if p.projected else None, plans)
  if rule.limit is None:
    return None
  return map_plans(lambda p: rule.init_leaf(p) if p.projected else None, plans)


def back_to_full(rule: FullRankRule, plans: Any, grads: Any, coeffs: Any, steps: Any,
                 scale: float | jax.Array, bases: Any, limiter: Any) -> tuple[Any, Any]:
  """``rule.apply`` at every projected leaf (``steps``: the unscaled ``Δ``);
  unprojected leaves keep their step."""
  map_plans(lambda p: rule.check(p) if p.projected else None, plans)
  if limiter is None:
    limiter = map_plans(lambda p: None, plans)
  pairs = map_plans(
      lambda p, g, c, u, b, last: (rule.apply(p, b, g, c, u, last, scale) if p.projected
                                   else (u, None)),
      plans, grads, coeffs, steps, bases, limiter,
  )
  updates = map_plans(lambda p, pair: pair[0], plans, pairs)
  new_limiter = None if rule.limit is None else map_plans(lambda p, pair: pair[1], plans, pairs)
  return updates, new_limiter


# -- helpers -------------------------------------------------------------------


def _limit(norm: jax.Array, last: jax.Array | None, limit) -> tuple[jax.Array, jax.Array]:
  """The limiter's factor (1 where the norm grew by at most ``limit``) and the limited norm."""
  if limit is None or last is None:
    return jnp.ones_like(norm), norm
  last = last.astype(norm.dtype)
  grew = (last > 0) & (norm > limit * last)
  factor = jnp.where(grew, limit * last / jnp.where(norm > 0, norm, 1), 1).astype(norm.dtype)
  return factor, norm * factor


def _expand(x: jax.Array, ndim: int) -> jax.Array:
  """Per-matrix values (batch shape) made broadcastable against batch + view arrays."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _like(new: jax.Array, last: jax.Array | None) -> jax.Array | None:
  return None if last is None else new.astype(last.dtype)


def _back_sq_norm(basis: bases_lib.Basis, x: jax.Array) -> jax.Array:
  """``‖project_back(basis, x)‖²`` per matrix, from the factors' ``r×r`` Gram matrices."""

  def one(x, factors):
    y = x
    for i, f in enumerate(factors):
      if f is not None:
        gram = f.T @ f
        y = jnp.moveaxis(jnp.tensordot(gram, y, axes=([1], [i])), 0, i)
    return jnp.sum(x * y.astype(x.dtype))

  return bases_lib.over_batch(one, len(basis.batch_shape))(x, basis.factors)
