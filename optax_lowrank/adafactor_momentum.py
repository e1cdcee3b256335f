"""AdaMeM: Adafactor with momentum kept only in a low-rank subspace.

Vyas, Morwani and Kakade 2024, "AdaMeM: Memory Efficient Momentum for
Adafactor" (WANT workshop at ICML 2024, openreview.net/forum?id=fZqMVTz7K5).
For a projected leaf seen as ``G ∈ R^{m×n}`` with ``m ≤ n`` (otherwise the
transpose) and an orthonormal ``P ∈ R^{m×r}`` (top-``r`` left singular vectors
of a gradient, re-made every ``T`` steps), one step (Alg. 1, ``t`` from 1)::

    R_t = Pᵀ G_t                                  (r×n)  projected gradient
    S_t = G_t − P R_t = (I − P Pᵀ) G_t            (m×n)  residual
    M_t = β1 M_{t−1} + (1 − β1) R_t               (r×n)  low-rank momentum
    N_1 = P · clip(AF(M̂_t))                       (m×n)  M̂_t = M_t / (1 − β1^t)
    N_2 = clip(OS(S_t))                           (m×n)
    u_t = N_1 + δ · N_2

``AF`` is Adafactor's factored preconditioner (Shazeer and Stern 2018,
arXiv:1804.04235) with row sums ``a_t`` ``(r,)`` and column sums ``b_t``
``(n,)`` of ``R_t ∘ R_t`` (``statistics="gradient"``, the default; or of
``M̂_t ∘ M̂_t``), ``AF(M̂) = M̂ / (√(a bᵀ / 1ᵀa / (1 − β2^t)) + ε)``.  ``OS`` is
one-sided Adafactor on the residual: one vector ``c_t`` ``(n,)`` of its column
sums of squares, ``OS(S) = S / (√(c_t / m / (1 − β2^t)) + ε)``.  ``clip`` is
Adafactor's update clipping ``x / max(1, RMS(x)/d)``, applied to each part.
``N_1`` lies in ``span(P)`` and ``N_2`` in its complement, so
``⟨N_1, N_2⟩ = 0`` (Claim 3.1; :func:`adamem_parts` returns both parts).
Leaves that are not projected get plain Adafactor without momentum.

Memory of a projected leaf whose matrix view is ``m×n`` (projected dimension
``p``, the other ``q``, ``r = min(rank, m, n)``): ``P`` ``(p, r)``, ``mu``
``r·q``, ``nu_row``/``nu_col`` ``r + q``, ``nu_res`` ``q``: ``(p + q)·r + r + 2q``
floats, about ``(m + n)·r``, against Adam's ``2·m·n``.
:func:`adamem_state_bytes` counts it exactly.  Where the paper is silent (whose
statistics Alg. 3 uses, clipping, the side of the residual statistic, residuals
at round-off level, bias correction, refresh) and what was measured:
``docs/api/adamem.md``.
"""

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import bases as bases_lib
from optax_lowrank import leaves as leaves_lib
from optax_lowrank import projections as proj
from optax_lowrank.bases import Basis, project, project_back
from optax_lowrank.leaves import LeafPlan, map_plans

# No ``from __future__ import annotations`` here: optax's checks (e.g. whether
# ``learning_rate`` is annotated ``optax.ScalarOrSchedule``) read the
# annotations as objects.

Array = jax.Array
Statistics = Literal["gradient", "momentum"]

__all__ = [
    "AdaMeMParts",
    "ScaleByAdaMeMState",
    "adamem",
    "adamem_parts",
    "adamem_state_bytes",
    "residual_tolerance",
    "scale_by_adamem",
]

_STATISTICS = ("gradient", "momentum")


class ScaleByAdaMeMState(NamedTuple):
  """State of :func:`scale_by_adamem`; every field but ``count`` is shaped like the params.

  For a projected leaf with matrix view ``m×n``, projected dimension ``p``, other
  dimension ``q`` and rank ``r`` (coefficients ``(r, q)`` for a left projection,
  ``(q, r)`` for a right one):

  Attributes:
    count: int32 ``()``, steps taken; a new projector is made when
      ``count % refresh_every == 0``.
    bases: projected leaves: a :class:`~optax_lowrank.bases.Basis` holding the
      one projector factor ``P`` (``(p, r)``, float32/64); ``None`` elsewhere.
    mu: projected leaves: the low-rank momentum ``M`` (coefficient-shaped,
      ``mu_dtype``); ``None`` elsewhere (no momentum outside the subspace).
    nu_row: projected leaves: Alg. 3's row statistic (of ``R = PᵀG``, or of
      ``M̂`` with ``statistics="momentum"``; first axis of the coefficients);
      other leaves: Adafactor's row statistic of the gradient
      (``shape[:-1]``), or its full second moment (``shape``) for < 2 axes.
    nu_col: projected leaves: Alg. 3's column statistic (second axis of the
      coefficients); other leaves with ≥ 2 axes: Adafactor's column statistic
      (``shape[:-2] + shape[-1:]``); ``None`` for < 2 axes.
    nu_res: projected leaves: Alg. 4's one-sided statistic of the residual,
      ``(q,)``; ``None`` elsewhere.
  """

  count: Array
  bases: Any
  mu: Any
  nu_row: Any
  nu_col: Any
  nu_res: Any


class AdaMeMParts(NamedTuple):
  """One AdaMeM step on one projected leaf, split as in Alg. 1 l.11.

  Attributes:
    low_rank: ``N_1 = P · clip(AF(M̂_t))``, leaf-shaped, in the projector's dtype.
    residual: ``N_2 = clip(OS((I − PPᵀ) G_t))``, leaf-shaped, same dtype.
    mu, nu_row, nu_col, nu_res: the leaf's new statistics (dtypes of the inputs).
  """

  low_rank: Array
  residual: Array
  mu: Array
  nu_row: Array
  nu_col: Array
  nu_res: Array


# ----------------------------------------------------------------------------
# Pure per-leaf mathematics.  Every function here works on one leaf (one
# matrix); nothing depends on a leading axis, so they can be vmapped.


def residual_tolerance(dtype) -> float:
  """Relative squared norm below which a residual column counts as zero: ``√ε(dtype)``.

  A column ``j`` of the residual ``S = (I − PPᵀ)G`` with
  ``‖S_j‖² ≤ tol · ‖G_j‖²`` is set to zero (float32: ``tol ≈ 3.5e-4``, a
  residual under 1.9% of the column's norm; float64: ``≈ 1.5e-8``).  ``dtype``
  is the projector's (float32 for bfloat16/float16/float32 leaves).
  """
  return float(jnp.finfo(dtype).eps) ** 0.5


def _factored_ema(nu_row: Array, nu_col: Array, x: Array, b2) -> tuple[Array, Array]:
  """EMAs of the row and column sums of ``x²`` over its last two axes (Alg. 3 l.2–3)."""
  sq = jnp.square(x)
  return (
      b2 * nu_row + (1 - b2) * jnp.sum(sq, axis=-1),
      b2 * nu_col + (1 - b2) * jnp.sum(sq, axis=-2),
  )


def _factored_scale(x: Array, nu_row: Array, nu_col: Array, correction, eps) -> Array:
  """``x / (√V̂ + ε)`` with ``V̂ = a bᵀ / (1ᵀa) / correction`` (Alg. 3 l.4)."""
  total = jnp.sum(nu_row, axis=-1, keepdims=True)
  # An all-zero row statistic means x has been 0 everywhere: V̂ = 0, output 0.
  total = jnp.where(total > 0, total, jnp.ones_like(total))
  v = nu_row[..., :, None] * nu_col[..., None, :] / total[..., None]
  return x / (jnp.sqrt(v / correction) + eps)


def _clip_factor(sum_sq: Array, size: int, threshold) -> Array | float:
  """Adafactor's clipping factor ``1 / max(1, RMS/d)``, RMS from a sum of ``size`` squares."""
  if threshold is None:
    return 1.0
  rms = jnp.sqrt(sum_sq / size)
  return 1 / jnp.maximum(1.0, rms / jnp.asarray(threshold, rms.dtype))


def _clip(x: Array, threshold) -> Array:
  """``x / max(1, RMS(x)/d)`` over the whole array (one leaf)."""
  if threshold is None:
    return x
  return x * _clip_factor(jnp.sum(jnp.square(x)), x.size, threshold)


class _LowRankPart(NamedTuple):
  """What both forms of the step share (see :func:`_low_rank_part`)."""

  axis: int          # the projected axis of the 2-D view
  p: int             # the projected dimension
  full_rank: bool    # r == p: I − PPᵀ = 0 exactly
  grad_view: Array   # G_t in the view, projector dtype
  coeffs: Array      # R_t = Pᵀ G_t
  scaled: Array      # clip(AF(M̂_t)), coefficient-shaped
  c2: Array          # 1 − β2^t
  mu: Array
  nu_row: Array
  nu_col: Array


def _low_rank_part(
    basis, grad, mu, nu_row, nu_col, count, b1, b2, eps, statistics, clip_threshold
) -> _LowRankPart:
  """Alg. 1 l.6 and l.8–9 up to the last product with ``P``: one GEMM."""
  axes = [i for i, f in enumerate(basis.factors) if f is not None]
  if len(basis.factors) != 2 or len(axes) != 1:
    raise ValueError(
        f"AdaMeM needs a one-sided matrix basis (one factor on a 2-D view); got {basis!r}"
    )
  axis = axes[0]
  factor = basis.factors[axis]
  dtype = factor.dtype
  tf = (jnp.asarray(count, jnp.int32) + 1).astype(dtype)
  c1 = 1 - jnp.asarray(b1, dtype) ** tf
  c2 = 1 - jnp.asarray(b2, dtype) ** tf

  g = bases_lib.to_view(basis, grad.astype(dtype))
  coeffs = project(basis, grad.astype(dtype))                     # R_t
  new_mu = b1 * mu.astype(dtype) + (1 - b1) * coeffs              # M_t
  mu_hat = new_mu / c1
  source = coeffs if statistics == "gradient" else mu_hat
  new_row, new_col = _factored_ema(nu_row.astype(dtype), nu_col.astype(dtype), source, b2)
  scaled = _clip(_factored_scale(mu_hat, new_row, new_col, c2, eps), clip_threshold)
  p, r = factor.shape
  return _LowRankPart(axis, p, r == p, g, coeffs, scaled, c2, new_mu, new_row, new_col)


def _residual_scale(part: _LowRankPart, nu_res: Array, sq_norms: Array, grad_sq_norms: Array,
                    b2, eps, clip_threshold):
  """Alg. 4 with the round-off guard and the clipping, from the residual's column norms.

  Returns the new one-sided statistic and the per-column factor
  ``clip · 1/(√V̂ + ε)`` (0 on columns whose residual counts as zero), shaped
  to broadcast against the view.
  """
  keep = sq_norms > residual_tolerance(part.c2.dtype) * grad_sq_norms
  sq_norms = jnp.where(keep, sq_norms, 0)
  new_res = b2 * nu_res.astype(part.c2.dtype) + (1 - b2) * sq_norms
  inv = jnp.where(keep, 1 / (jnp.sqrt(new_res / (part.p * part.c2)) + eps), 0)
  q = sq_norms.shape[-1]
  inv = inv * _clip_factor(jnp.sum(sq_norms * jnp.square(inv)), part.p * q, clip_threshold)
  return new_res, jnp.expand_dims(inv, part.axis)


def adamem_parts(
    basis: Basis,
    grad: Array,
    mu: Array,
    nu_row: Array,
    nu_col: Array,
    nu_res: Array,
    count: Array | int,
    *,
    b1: float | Array = 0.9,
    b2: float | Array = 0.95,
    eps: float | Array = 1e-8,
    statistics: Statistics = "gradient",
    clip_threshold: float | Array | None = 1.0,
) -> AdaMeMParts:
  """Both preconditioned directions of one AdaMeM step on one projected leaf.

  This is the step as the paper writes it, with the residual ``S_t`` formed
  explicitly (three GEMMs); :func:`scale_by_adamem` computes the same sum
  ``low_rank + δ·residual`` with two (see :func:`_adamem_update`).

  Args:
    basis: a one-sided basis with orthonormal factor ``P`` (``(p, r)``), as kept
      in :class:`ScaleByAdaMeMState` ``.bases``.
    grad: the leaf's gradient ``G_t`` (leaf-shaped).
    mu, nu_row, nu_col, nu_res: the leaf's statistics before the step (shapes as
      in :class:`ScaleByAdaMeMState`).
    count: steps taken before this one (``t − 1``; bias corrections use ``t``).
    b1, b2, eps, statistics, clip_threshold: as for :func:`scale_by_adamem`.

  Returns:
    :class:`AdaMeMParts`: ``low_rank = P·clip(AF(M̂_t))`` and
    ``residual = clip(OS((I − PPᵀ) G_t))`` (their Frobenius inner product is 0,
    Claim 3.1), and the new statistics.  The step itself is
    ``low_rank + δ·residual``.
  """
  part = _low_rank_part(basis, grad, mu, nu_row, nu_col, count, b1, b2, eps, statistics,
                        clip_threshold)
  if part.full_rank:
    # I − PPᵀ = 0 exactly; do not amplify round-off.
    s_view = jnp.zeros_like(part.grad_view)
  else:                                                                   # S_t
    s_view = part.grad_view - bases_lib.to_view(basis, project_back(basis, part.coeffs))
  new_res, inv = _residual_scale(
      part, nu_res, jnp.sum(jnp.square(s_view), axis=part.axis),
      jnp.sum(jnp.square(part.grad_view), axis=part.axis), b2, eps, clip_threshold,
  )
  return AdaMeMParts(
      low_rank=project_back(basis, part.scaled),
      residual=bases_lib.from_view(basis, s_view * inv),
      mu=part.mu.astype(mu.dtype),
      nu_row=part.nu_row.astype(nu_row.dtype),
      nu_col=part.nu_col.astype(nu_col.dtype),
      nu_res=new_res.astype(nu_res.dtype),
  )


def _adamem_update(basis, grad, mu, nu_row, nu_col, nu_res, count, *, b1, b2, eps, delta,
                   statistics="gradient", clip_threshold=1.0):
  """``low_rank + δ·residual`` of :func:`adamem_parts` with two GEMMs instead of three.

  With ``D = diag(clip · 1/(√V̂_res + ε))`` on the non-projected axis and ``P``
  orthonormal, ``N_2 = (G − P R) D = G D − P (R D)``, so::

      u = P · (clip(AF(M̂_t)) − δ · R D) + δ · G D

  and the residual's column norms are ``‖S_j‖² = ‖G_j‖² − ‖R_j‖²``: ``S_t`` is
  never formed.  Where that difference is below
  ``residual_tolerance · ‖G_j‖²`` (round-off territory) ``D_j = 0``, so
  ``G_j D_j − P R_j D_j`` is exactly 0 instead of amplified cancellation
  error.  Returns the update (view dtype of the projector, leaf-shaped) and
  the new ``(mu, nu_row, nu_col, nu_res)``.
  """
  part = _low_rank_part(basis, grad, mu, nu_row, nu_col, count, b1, b2, eps, statistics,
                        clip_threshold)
  stats = (part.mu.astype(mu.dtype), part.nu_row.astype(nu_row.dtype),
           part.nu_col.astype(nu_col.dtype))
  if part.full_rank:
    zeros = jnp.zeros_like(nu_res, part.c2.dtype)
    new_res = b2 * nu_res.astype(part.c2.dtype) + (1 - b2) * zeros
    return project_back(basis, part.scaled), (*stats, new_res.astype(nu_res.dtype))
  grad_sq = jnp.sum(jnp.square(part.grad_view), axis=part.axis)
  sq = grad_sq - jnp.sum(jnp.square(part.coeffs), axis=part.axis)
  new_res, inv = _residual_scale(part, nu_res, sq, grad_sq, b2, eps, clip_threshold)
  small = part.scaled - delta * (part.coeffs * inv)
  update = bases_lib.to_view(basis, project_back(basis, small)) + delta * (part.grad_view * inv)
  return bases_lib.from_view(basis, update), (*stats, new_res.astype(nu_res.dtype))


def _adafactor_leaf(g: Array, nu_row: Array, nu_col: Array | None, count, b2, eps,
                    clip_threshold):
  """Adafactor without momentum, with update clipping, on a leaf that is not projected.

  Not ``optax.scale_by_factored_rms`` + ``optax.clip_by_block_rms``: optax's
  factored RMS decays with ``1 − (t+1)^−0.8`` without bias correction, adds its
  ε to ``g²`` and factors only dimensions ≥ 128, while AdaMeM's unprojected
  leaves use the same fixed ``β2``, bias correction and ε-outside-the-root as its
  projected ones (so that the two kinds of leaf take comparable steps).  The
  clipping is optax's formula; it is kept here because the projected parts
  compute it from a sum of squares without forming the update (``_clip_factor``).
  """
  dtype = nu_row.dtype
  c2 = 1 - jnp.asarray(b2, dtype) ** (jnp.asarray(count, jnp.int32) + 1).astype(dtype)
  x = g.astype(dtype)
  if nu_col is None:
    new_row = b2 * nu_row + (1 - b2) * jnp.square(x)
    return _clip(x / (jnp.sqrt(new_row / c2) + eps), clip_threshold), new_row, None
  new_row, new_col = _factored_ema(nu_row, nu_col, x, b2)
  u = _clip(_factored_scale(x, new_row, new_col, c2, eps), clip_threshold)
  return u, new_row, new_col


# ----------------------------------------------------------------------------
# Validation and memory.


def _check_unit_interval(name: str, value) -> None:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")


def _check_nonnegative(name: str, value) -> None:
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
    raise ValueError(f"`{name}` must be >= 0, got {value!r}")


def _check_options(statistics, clip_threshold) -> None:
  if statistics not in _STATISTICS:
    raise ValueError(f"`statistics` must be one of {_STATISTICS}, got {statistics!r}")
  if isinstance(clip_threshold, (int, float)) and not isinstance(clip_threshold, bool):
    if not clip_threshold > 0:
      raise ValueError(f"`clip_threshold` must be > 0 or None, got {clip_threshold!r}")


def _projected_axis(p: LeafPlan) -> int:
  ranks = p.spec.axis_ranks(p.view_shape)
  return 0 if ranks[0] is not None else 1


def _stat_dtype(p: LeafPlan):
  return proj.basis_dtype(p.dtype)


def _mu_dtype(p: LeafPlan, mu_dtype):
  return _stat_dtype(p) if mu_dtype is None else jnp.dtype(mu_dtype)


def _init_leaf(p: LeafPlan, mu_dtype) -> tuple[Any, Any, Any, Any]:
  """Zeros for ``(mu, nu_row, nu_col, nu_res)`` of one leaf."""
  sd = _stat_dtype(p)
  if p.projected:
    *batch, a, b = p.coefficient_shape  # batch: the matrices of a stacked leaf
    batch = tuple(batch)
    q = p.view_shape[1 - _projected_axis(p)]
    return (
        jnp.zeros(batch + (a, b), _mu_dtype(p, mu_dtype)),
        jnp.zeros(batch + (a,), sd),
        jnp.zeros(batch + (b,), sd),
        jnp.zeros(batch + (q,), sd),
    )
  shape = p.shape
  if len(shape) >= 2:
    return None, jnp.zeros(shape[:-1], sd), jnp.zeros(shape[:-2] + shape[-1:], sd), None
  return None, jnp.zeros(shape, sd), None, None


def adamem_state_bytes(
    params: Any,
    rank: int = 128,
    *,
    side: proj.Side = "auto",
    where: Any = None,
    reshape: Any = None,
    mu_dtype: Any | None = None,
) -> int:
  """Exact bytes of :func:`scale_by_adamem`'s state for ``params``, from shapes alone.

  Per projected leaf (matrix view ``m×n``, projected dimension ``p``, other
  dimension ``q``, ``r = min(rank, m, n)``)::

      p·r·b_u  +  q·r·b_µ  +  (r + 2q)·b_s

  per other leaf ``(size/s_{−1} + size/s_{−2})·b_s`` (≥ 2 axes) or
  ``size·b_s``, plus 4 bytes for the step counter (see the module docstring).
  Arguments as for :func:`scale_by_adamem`; ``params`` may hold
  ``jax.ShapeDtypeStruct`` leaves.
  """
  plans = leaves_lib.plan(params, proj.svd(rank, side), where, reshape)
  total = 4  # count: int32
  for p in jax.tree.leaves(plans, is_leaf=leaves_lib.is_plan):
    b_s = jnp.dtype(_stat_dtype(p)).itemsize
    if p.projected:
      axis = _projected_axis(p)
      pdim, qdim = p.view_shape[axis], p.view_shape[1 - axis]
      r = p.spec.axis_ranks(p.view_shape)[axis]
      b_mu = jnp.dtype(_mu_dtype(p, mu_dtype)).itemsize
      total += pdim * r * b_s + qdim * r * b_mu + (r + 2 * qdim) * b_s
    elif len(p.shape) >= 2:
      total += (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2] + p.shape[-1:])) * b_s
    else:
      total += math.prod(p.shape) * b_s
  return total


# ----------------------------------------------------------------------------
# The transformations.


def scale_by_adamem(
    rank: int = 128,
    refresh_every: int = 200,
    b1: float = 0.9,
    b2: float = 0.95,
    delta: float = 1.0,
    eps: float = 1e-8,
    *,
    statistics: Statistics = "gradient",
    clip_threshold: float | None = 1.0,
    side: proj.Side = "auto",
    where: Any = None,
    reshape: leaves_lib.ReshapeRule | Callable[..., Any] | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
  """AdaMeM's preconditioned direction (Vyas et al. 2024, Alg. 1), learning rate excluded.

  Per projected leaf (``G ∈ R^{m×n}``, ``m ≤ n`` shown; see the module
  docstring for every equation)::

      u = P · clip(AF(M̂_t))  +  δ · clip(OS((I − PPᵀ) G_t)),
      M_t = β1 M_{t−1} + (1 − β1) Pᵀ G_t

  with ``P`` the top-``rank`` left singular vectors of the gradient at the last
  refresh, ``AF`` Adafactor's factored preconditioner (Alg. 3) applied to the
  bias-corrected momentum, ``OS`` the one-sided Adafactor preconditioner
  (Alg. 4) on the residual and ``clip`` Adafactor's update clipping, on each
  part separately.  The two terms are orthogonal (Claim 3.1).  Leaves that are
  not projected get Adafactor without momentum, clipped the same way.

  Args:
    rank: ``r``, the momentum's rank; clamped to ``min(m, n)`` per leaf.  It
      fixes shapes, so under ``optax.inject_hyperparams`` pass it in
      ``static_args``.
    refresh_every: ``T``, steps between SVDs; the first is at step 0.  The SVD
      runs under ``jax.lax.cond``, only on refresh steps.  Momentum and
      statistics are kept across a refresh, as in the paper.
    b1: ``β1``, momentum decay (paper: 0.9).
    b2: ``β2``, decay of every second-moment statistic (paper: 0.95).
    delta: ``δ``, the paper's "relative step size": the weight of the
      momentum-free residual direction relative to the low-rank momentum
      direction (paper: 1; §5 sweeps 0.5 and 1).  ``δ = 0`` gives Adafactor with
      low-rank momentum (GaLore-style, no full-rank component); larger ``δ``
      moves more along the gradient outside the subspace.
    eps: ``ε`` added to every square root (paper §5: 1e-8).
    statistics: what Alg. 3's factored second moments accumulate:
      ``"gradient"`` (default), the squared projected gradient ``(PᵀG)²``, as
      the proof of Claim 3.1 and the Adafactor variant of GaLore do; or
      ``"momentum"``, the squared bias-corrected momentum ``M̂²``, Alg. 3 read
      literally (steps of about 1 per coordinate whatever the gradient noise;
      see the module docstring).
    clip_threshold: ``d`` of Adafactor's update clipping
      ``x / max(1, RMS(x)/d)``, applied to the low-rank coefficients
      ``AF(M̂_t)``, to the residual ``OS(S_t)`` and to every unprojected leaf's
      update, each separately; ``None`` disables it (the paper's Alg. 1).
    side: which side ``P`` spans: ``"auto"`` (the smaller dimension, as in the
      paper, which assumes ``m ≤ n`` and projects the left), ``"left"``,
      ``"right"``.
    where: which leaves to project, as for ``olr.low_rank`` (default: every
      2-D leaf).
    reshape: how leaves with more than two axes are seen as matrices, as for
      ``olr.low_rank``.
    mu_dtype: dtype of the momentum (default: float32, float64 for float64
      leaves).

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByAdaMeMState`;
    updates come back in each gradient's dtype.  The state's structure does
    not depend on the options (or on which of them ``optax.inject_hyperparams``
    injects).

  Memory: ``(p + q)·r + r + 2q`` floats per projected leaf, ≈ ``(m + n)·r``
  against ``2·m·n`` for Adam (exact bytes: :func:`adamem_state_bytes`).

  Raises:
    ValueError: at construction, for ``rank`` ≤ 0, ``refresh_every`` < 1,
      ``b1`` or ``b2`` outside [0, 1), ``delta`` or ``eps`` < 0,
      ``clip_threshold`` ≤ 0, an unknown ``statistics`` or ``side``; at
      ``init``, for a ``where``/``reshape`` that does not fit a leaf (naming
      the leaf path and shape).
    TypeError: an argument of the wrong type (e.g. a non-integer ``rank``).

  (Long because ``init`` and ``update`` are closures over the checked
  hyper-parameters, as in optax's own transformations; one matrix's step is a
  function of its own.)
  """
  spec = proj.svd(rank, side)
  # Python values are checked here; arrays (``optax.inject_hyperparams`` turns
  # ``refresh_every``, ``b1``, ... into arrays unless they are static) cannot be.
  if not isinstance(refresh_every, jax.Array) and (
      isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1
  ):
    raise ValueError(f"`refresh_every` must be an int >= 1, got {refresh_every!r}")
  _check_unit_interval("b1", b1)
  _check_unit_interval("b2", b2)
  _check_nonnegative("delta", delta)
  _check_nonnegative("eps", eps)
  _check_options(statistics, clip_threshold)
  # The SVD projector does not use randomness; the key only fills make_basis' signature.
  base_key = jax.random.PRNGKey(0)

  def make_plans(tree):
    return leaves_lib.plan(tree, spec, where, reshape)

  def init_fn(params):
    plans = make_plans(leaves_lib.unwrap_variables(params))
    fields = map_plans(lambda p: _init_leaf(p, mu_dtype), plans)
    return ScaleByAdaMeMState(
        jnp.zeros([], jnp.int32),
        leaves_lib.zero_bases(plans),
        *(map_plans(lambda p, f, i=i: f[i], plans, fields) for i in range(4)),
    )

  def update_fn(updates, state, params=None):
    del params
    updates_in = updates
    updates = leaves_lib.unwrap_variables(updates)
    plans = make_plans(updates)
    count = state.count

    def refresh(_):
      return leaves_lib.make_bases(
          plans, base_key, count // refresh_every, updates, stored=True
      )

    new_bases = jax.lax.cond(
        count % refresh_every == 0, refresh, lambda b: b, state.bases
    )

    def matrix(p: LeafPlan, g, factors, mu, nu_row, nu_col, nu_res):
      """One matrix in its view (a whole leaf, or one matrix of a stack)."""
      return _adamem_update(
          Basis(factors, p.view_shape, p.view_shape), g, mu, nu_row, nu_col, nu_res,
          count, b1=b1, b2=b2, eps=eps, delta=delta, statistics=statistics,
          clip_threshold=clip_threshold,
      )

    def leaf(p: LeafPlan, g, basis, mu, nu_row, nu_col, nu_res):
      if p.projected:
        # Stacked leaves: every matrix of the stack is its own AdaMeM problem,
        # solved as one batch (vmap over the batch axes of the view).
        step = lambda *a: matrix(p, *a)
        u, stats = bases_lib.over_batch(step, len(p.batch_shape))(
            bases_lib.to_view(basis, g), basis.factors, mu, nu_row, nu_col, nu_res
        )
        return (bases_lib.from_view(basis, u).astype(g.dtype), *stats)
      u, nu_row, nu_col = _adafactor_leaf(g, nu_row, nu_col, count, b2, eps, clip_threshold)
      return u.astype(g.dtype), None, nu_row, nu_col, None

    out = map_plans(
        leaf, plans, updates, new_bases, state.mu, state.nu_row, state.nu_col, state.nu_res
    )
    new_updates, mu, nu_row, nu_col, nu_res = (
        map_plans(lambda p, o, i=i: o[i], plans, out) for i in range(5)
    )
    return leaves_lib.rewrap_like(updates_in, new_updates), ScaleByAdaMeMState(
        optax.safe_increment(count), new_bases, mu, nu_row, nu_col, nu_res
    )

  return optax.GradientTransformation(init_fn, update_fn)


def adamem(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    refresh_every: int = 200,
    b1: float = 0.9,
    b2: float = 0.95,
    delta: float = 1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    statistics: Statistics = "gradient",
    clip_threshold: float | None = 1.0,
    side: proj.Side = "auto",
    where: Any = None,
    reshape: Any = None,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
  """AdaMeM with decoupled weight decay and a learning rate (Vyas et al. 2024, Alg. 1).

  ``W ← W − η · (N_1 + δ·N_2 + λ_wd · W)``: :func:`scale_by_adamem`, then
  ``optax.add_decayed_weights(weight_decay, mask)`` on the full weights, then
  ``optax.scale_by_learning_rate(learning_rate)``.  The defaults are the
  paper's runs: ``β1 = 0.9``, ``β2 = 0.95``, ``ε = 1e-8``, ``δ = 1`` (§5 also
  tries 0.5) and ``T = 200``, except weight decay: 0 here, as in every recipe
  of this library and in ``optax.adam``; the paper trains with
  ``weight_decay=0.01``, so pass it to reproduce its runs.

  AdaMeM's steps are normalised (RMS ≈ 1 per part, clipped there) and its
  residual part moves the full matrix, so at one learning rate it moves a
  projected kernel several times further than AdamW does, and much further
  than GaLore (which also scales by ``α``): sweep ``η`` for it rather than
  reusing another optimizer's (on the example Llama, ``examples/methods.py``
  records the sweep).

  Args:
    learning_rate: ``η``, a float or an optax schedule.
    rank, refresh_every, b1, b2, delta, eps: as for :func:`scale_by_adamem`.
    statistics, clip_threshold, side, where, reshape, mu_dtype: as for
      :func:`scale_by_adamem`.
    weight_decay: decoupled weight decay ``λ_wd`` on the full weights
      (default 0; the paper's runs: 0.01).
    mask: which leaves weight decay applies to (as in ``optax.adamw``).
  """
  return optax.chain(
      scale_by_adamem(
          rank, refresh_every, b1, b2, delta, eps,
          statistics=statistics, clip_threshold=clip_threshold,
          side=side, where=where, reshape=reshape, mu_dtype=mu_dtype,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
