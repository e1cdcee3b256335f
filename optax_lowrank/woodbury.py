"""Natural-gradient preconditioning from a short gradient history (Woodbury).

For one leaf with flattened gradient ``g ∈ R^k`` keep the last ``s`` gradients
as the columns of ``G ∈ R^{k×s}`` and precondition with the damped empirical
Fisher ``F = λ I_k + G Gᵀ`` (Natural GaLore: Das 2024, arXiv:2410.16029, §2.2):

    F⁻¹ g = (g − G (λ I_s + GᵀG)⁻¹ Gᵀ g) / λ            (Woodbury identity)

so only the small ``s × s`` system ``λ I_s + GᵀG`` is factorised (Cholesky).
Every update first *appends* the current gradient to a fixed-shape ring buffer
(overwriting the oldest slot) and then returns ``F⁻¹ g``; slots of a history
not yet full are zero columns, which leave ``F`` unchanged.

State per leaf (``k = leaf.size``): ``history`` ``(s, k)`` (row ``i`` is one
stored gradient) and ``gram`` ``(s, s)`` (``GᵀG``, updated one row per step),
in the leaf's dtype promoted to at least float32: ``s·k + s²`` values.  Time
``O(k·s)`` per step plus ``O(s³)`` for the factorisation; for large leaves the
step is bound by reading the history twice (four times with ``refine``).

In float32 the textbook formula fails long before ``F`` is singular (``λ``
below the rounding unit of ``GᵀG``); :func:`woodbury_solve` uses the
push-through form ``F⁻¹ g = G S⁻¹ e_j``, folds repeated gradients, equilibrates,
floors the damping at rounding level, refines once against the true operator
and checks a descent certificate, so the result is always finite and a descent
direction.  How and why: ``docs/api/woodbury.md``.

Inside ``olr.low_rank`` the leaves are coefficients in a basis; a refresh
clears ``history`` and ``gram`` (the gradients are in stale coordinates), under
every ``on_refresh`` policy.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from optax_lowrank import leaves as leaves_lib
from optax_lowrank import refresh as refresh_lib
from optax_lowrank.bases import over_batch

__all__ = [
    "WoodburyState",
    "woodbury_precondition",
    "woodbury_solve",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class WoodburyState(NamedTuple):
  """State of :func:`woodbury_precondition`.

  Attributes:
    count: int32 ``()``, updates taken so far.  The next gradient is written to
      slot ``count % s``, so the ring position needs no field of its own.
    history: a tree like the params; each leaf an ``(s, k)`` buffer (``k`` the
      leaf's size) whose rows are the last ``s`` flattened gradients, in the
      leaf's dtype promoted to at least float32.  Unused rows are zero.
    gram: a tree like the params; each leaf the ``(s, s)`` matrix of inner
      products of the history rows (``GᵀG``), kept up to date incrementally.
  """

  count: jax.Array
  history: Any
  gram: Any


# A refresh of olr.low_rank clears both: they hold gradients in the old coordinates.
refresh_lib.register_statistics(WoodburyState, history=("history", "gram"))


def _state_dtype(dtype) -> jnp.dtype:
  dt = jnp.promote_types(dtype, jnp.float32)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"woodbury_precondition supports real leaves only, got dtype {dtype}")
  return dt


def _check_history(history) -> int:
  if isinstance(history, bool):
    raise ValueError(f"`history` must be an int >= 1, got {history!r}")
  try:
    s = operator.index(history)
  except TypeError:
    if isinstance(history, jax.core.Tracer):
      raise ValueError(
          "`history` sets buffer shapes and must be a static Python int; with "
          "optax.inject_hyperparams pass static_args=('history',)"
      ) from None
    raise ValueError(f"`history` must be an int >= 1, got {history!r}") from None
  if s < 1:
    raise ValueError(f"`history` must be an int >= 1, got {history!r}")
  return int(s)


def _check_damping(damping) -> None:
  """Validates a concrete damping; a traced one (inject_hyperparams) is skipped."""
  if isinstance(damping, jax.core.Tracer):
    return
  try:
    arr = np.asarray(damping)
  except Exception:  # noqa: BLE001 - anything numpy cannot read is simply invalid
    raise ValueError(f"`damping` must be a positive number, got {damping!r}") from None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
    raise ValueError(f"`damping` must be a real scalar, got {damping!r}")
  value = float(arr)
  if not (math.isfinite(value) and value > 0.0):
    raise ValueError(f"`damping` must be finite and > 0, got {damping!r}")


def _floored_inverse(a: jax.Array, mu: jax.Array) -> jax.Array:
  """``(a + diag(max(τ − mu, 0)))⁻¹`` via Cholesky, for the first workable ``τ``.

  ``a`` is the equilibrated matrix with its unit diagonal (which already holds
  the exact relative damping ``mu``) and off-diagonal entries in ``[-1, 1]``.
  The floors ``τ = s·eps, √eps, 1, s`` are factorised together as one batched
  ``cho_factor`` and the first finite factor is used.  ``τ = s`` always
  factorises: the matrix is then strictly diagonally dominant.  The explicit
  inverse (one ``cho_solve`` with an identity
  right-hand side) serves both the solve and the refinement step; for an
  ``s×s`` system it costs nothing and keeps the compiled graph small.
  """
  s = a.shape[0]
  dt = a.dtype
  eps = float(jnp.finfo(dt).eps)
  taus = jnp.asarray([s * eps, math.sqrt(eps), 1.0, float(s)], dt)
  eye = jnp.eye(s, dtype=dt)
  bumps = jnp.maximum(taus[:, None] - mu[None, :], 0.0)
  factors = cho_factor(a[None] + bumps[:, :, None] * eye[None], lower=True)[0]
  finite = jnp.all(jnp.isfinite(factors), axis=(1, 2))
  factor = factors[jnp.argmax(finite)]  # first finite (index 0 if none, e.g. NaN input)
  return cho_solve((factor, True), eye)


def _push_through_small(gram, same, lam):
  """The ``s×s`` part of the push-through solve for one leaf.

  Returns ``(a_inv, w, scale, mu, e, out_scale)`` such that, with ``Ĝ`` the
  history rows scaled by ``scale``, ``F⁻¹ g = out_scale · Ĝ w`` (before
  refinement) and ``A = μ I + ĜᵀĜ`` is the equilibrated system, ``a_inv`` the
  inverse of its floored version and ``e`` the unit vector of the
  representative slot.
  """
  dt = gram.dtype
  s = gram.shape[0]
  idx = jnp.arange(s)
  j = jnp.argmax(same)  # first row equal to g: the representative column
  m = jnp.sum(same).astype(dt)
  omega = jnp.where(same, 0.0, 1.0).astype(dt)
  omega = jnp.where(idx == j, jnp.sqrt(m), omega)  # fold the m copies into one
  gram_w = gram * omega[:, None] * omega[None, :]
  delta2 = lam + jnp.maximum(jnp.diagonal(gram_w), 0.0)
  delta = jnp.sqrt(delta2)
  mu = lam / delta2
  scale = omega / delta  # row i of the history times scale_i is column i of Ĝ
  # |a_il| < 1 by Cauchy-Schwarz; the clip only guards against a rounded or
  # user-supplied Gram matrix that violates it
  a = jnp.clip(gram_w / (delta[:, None] * delta[None, :]), -1.0, 1.0)
  a = jnp.where(idx[:, None] == idx[None, :], 1.0, a).astype(dt)  # μ_i + ‖ĝ_i‖² = 1
  a_inv = _floored_inverse(a, mu)
  e = (idx == j).astype(dt)
  w = jnp.matmul(a_inv, e, precision=_HIGHEST)
  out_scale = 1.0 / (jnp.sum(e * delta) * jnp.sum(e * omega))
  return a_inv, w, scale, mu, e, out_scale


def _push_through(h, g, gram, same, lam, refine):
  """``F⁻¹ g`` for one leaf whose gradient ``g`` is a row of its history ``h``.

  ``h``: ``(s, k)``; ``g``: ``(k,)``; ``gram``: ``(s, s)``; ``same``: ``(s,)``,
  the rows equal to ``g``.  One product with ``h`` (the caller's Gram row is
  the other pass per step); two more with ``refine`` (the residual and the
  correction).
  """
  a_inv, w, scale, mu, e, out_scale = _push_through_small(gram, same, lam)
  y = jnp.matmul(scale * w, h, precision=_HIGHEST) * out_scale
  # Certificate: gᵀF⁻¹g ≥ ‖g‖²/λ_max(F) ≥ ‖g‖²/(λ + ‖G‖_F²) holds exactly.
  # The refined result is kept if it satisfies half of it and keeps at least
  # half of the unrefined gᵀy; otherwise the unrefined one if it satisfies it;
  # otherwise (rounding noise dominates: λ far below the float32 resolution of
  # ‖g‖² and near-duplicate gradients) the safe step g/(λ + ‖G‖_F²).
  safe = g / (lam + jnp.trace(gram))
  bound = jnp.vdot(g, g) / (lam + jnp.trace(gram))
  g_y = jnp.vdot(g, y)
  out = jnp.where(g_y >= 0.5 * bound, y, safe)
  if refine:
    # residual of (μ I + ĜᵀĜ) w = e with ĜᵀĜ applied through the vectors
    h_y = jnp.matmul(h, y, precision=_HIGHEST) / out_scale
    dw = jnp.matmul(a_inv, e - mu * w - scale * h_y, precision=_HIGHEST)
    refined = y + jnp.matmul(scale * dw, h, precision=_HIGHEST) * out_scale
    out = jnp.where(jnp.vdot(g, refined) >= 0.5 * jnp.maximum(g_y, bound), refined, out)
  return out


def _woodbury_form(h, g, gram, lam, same):
  """``F⁻¹ g`` for a general ``g`` (not a history row), ``(g − G S⁻¹ Gᵀ g)/λ``.

  No refinement here: for a general ``g`` the residual ``g − F y`` would be
  computed from terms of size ``‖G‖²‖y‖ ≫ ‖g‖`` and drowns in rounding when
  ``F`` is ill-conditioned (it made results worse in our float32 experiments).
  """
  del same
  dt = h.dtype
  idx = jnp.arange(h.shape[0])
  delta2 = lam + jnp.maximum(jnp.diagonal(gram), 0.0)
  delta = jnp.sqrt(delta2)
  mu = lam / delta2
  scale = 1.0 / delta
  a = jnp.clip(gram / (delta[:, None] * delta[None, :]), -1.0, 1.0)
  a = jnp.where(idx[:, None] == idx[None, :], 1.0, a).astype(dt)
  a_inv = _floored_inverse(a, mu)
  z = jnp.matmul(a_inv, scale * jnp.matmul(h, g, precision=_HIGHEST), precision=_HIGHEST)
  return (g - jnp.matmul(scale * z, h, precision=_HIGHEST)) / lam


def _rows_equal_to(h, g, row, old_diagonal, hit):
  """Which rows of the history ``h`` equal (``==``) ``g``, which sits in row ``hit``.

  The exact test reads the whole buffer, so it runs only when the Gram matrix
  says some other row is near ``g``: ``‖h_i − g‖² = G_ii − 2 h_i·g + g·g``
  from the stored diagonal and the new Gram row.  A row equal to ``g`` gives 0
  up to the rounding of three dot products of the same vectors (relative
  ``~log₂(k)·eps``); the gate ``≤ 10⁻²·‖g‖²`` is orders of magnitude wider, so
  no exact duplicate is missed, and gradients that close to each other are
  rare enough in training that the extra pass almost never runs.
  """
  g_norm2 = jnp.sum(jnp.where(hit, row, 0))
  dist2 = jnp.where(hit, 0, old_diagonal - 2 * row + g_norm2)
  near = jnp.any(~hit & (dist2 <= 1e-2 * g_norm2))
  return jax.lax.cond(
      near, lambda h, g: jnp.all(h == g[None, :], axis=1), lambda h, g: hit, h, g
  )


def woodbury_solve(
    history_matrix: jax.Array,
    g: jax.Array,
    damping: float | jax.Array,
    *,
    gram: jax.Array | None = None,
    refine: bool = True,
    g_in_history: bool | None = None,
) -> jax.Array:
  """``(λ I + G Gᵀ)⁻¹ g`` for one leaf, with ``Gᵀ = history_matrix``.

  Pure and jit/vmap-friendly.  When ``g`` equals (``==``) a row of the history,
  as it always does in :func:`woodbury_precondition` (append first, then
  solve), the accurate push-through form with duplicate folding is used;
  otherwise the Woodbury form.  Both factorise the equilibrated, floored
  ``s×s`` system by Cholesky; the push-through path then takes one refinement
  step (see the module docstring for why).

  Args:
    history_matrix: ``(s, k)``, one stored gradient per row (zero rows are
      empty slots).
    g: the gradient, any shape with ``k`` elements (flattened).
    damping: ``λ > 0``, a float or a JAX scalar (not validated here, so it may
      be traced).
    gram: optional ``(s, s)`` ``history_matrix @ history_matrix.T`` (e.g. kept
      incrementally); computed when omitted.
    refine: take the refinement step of the push-through path (default).
      Without it the solve makes one product with the buffer instead of three,
      at a loss of accuracy when the history is nearly rank-deficient and ``λ``
      is small next to ``‖g‖²``.
    g_in_history: ``None`` (default) tests whether ``g`` is a row of the
      history and picks the form inside a ``lax.cond``; ``True`` promises that
      it is (as in :func:`woodbury_precondition`, which appends first) and
      compiles only the push-through path (if no row equals ``g`` the result is
      meaningless); ``False`` always uses the Woodbury form.

  Returns:
    ``F⁻¹ g`` flattened, shape ``(k,)``, in the promoted dtype of the history,
    ``g`` and float32.
  """
  h = jnp.asarray(history_matrix)
  if h.ndim != 2:
    raise ValueError(f"`history_matrix` must be 2-D (s, k), got shape {h.shape}")
  g = jnp.asarray(g)
  dt = _state_dtype(jnp.promote_types(h.dtype, g.dtype))
  h = h.astype(dt)
  g = jnp.reshape(g, (-1,)).astype(dt)
  if g.shape[0] != h.shape[1]:
    raise ValueError(
        f"`g` has {g.shape[0]} elements but the history rows have {h.shape[1]}"
    )
  lam = jnp.asarray(damping).astype(dt)
  if gram is None:
    gram = jnp.matmul(h, h.T, precision=_HIGHEST)
  gram = jnp.asarray(gram).astype(dt)
  gram = 0.5 * (gram + gram.T)
  same = jnp.all(h == g[None, :], axis=1)

  def push(ops):
    h, g, gram, lam, same = ops
    return _push_through(h, g, gram, same, lam, refine)

  def general(ops):
    return _woodbury_form(*ops)

  ops = (h, g, gram, lam, same)
  if g_in_history is True:
    return push(ops)
  if g_in_history is False:
    return general(ops)
  return jax.lax.cond(jnp.any(same), push, general, ops)


def woodbury_precondition(
    history: int = 10,
    damping: float | jax.Array = 1e-3,
    *,
    refine: bool = True,
    batch_ndim: int | Callable[[tuple[str, ...], jax.Array], int] | None = None,
) -> optax.GradientTransformation:
  """Precondition each leaf by ``(λ I + G Gᵀ)⁻¹`` from its last ``s`` gradients.

  Every leaf is flattened to ``k`` values and handled independently: its
  gradient is first written into the leaf's ring buffer (slot ``count % s``,
  overwriting the oldest), then the update is ``F⁻¹ g`` with
  ``F = λ I_k + G Gᵀ``, ``G ∈ R^{k×s}`` the stored gradients (Natural GaLore,
  Das 2024, arXiv:2410.16029, §2.2), reshaped to the leaf's shape and cast to the
  gradient's dtype.  Works for full-size leaves of any shape and for the
  coefficient arrays of a low-rank combinator.  See the module docstring for
  the layout, the cost (``s·k + s²`` stored values and ``O(k·s)`` work per leaf
  and step) and the float32 safeguards.

  Args:
    history: ``s ≥ 1``, gradients kept per leaf (static; with
      ``optax.inject_hyperparams`` pass ``static_args=('history',)``).
    damping: ``λ > 0``; a float or a JAX scalar, so
      ``optax.inject_hyperparams(woodbury_precondition,
      static_args=('history',))(damping=...)`` can schedule it.  Validated only
      when it is a concrete number.
    refine: see :func:`woodbury_solve`.
    batch_ndim: leading axes of a leaf that index *separate* matrices (the
      layers of a stacked leaf, see ``reshape`` in ``olr.low_rank``): each
      gets its own history and Gram matrix, exactly as separate leaves would
      (``batch_shape + (s, k)`` and ``batch_shape + (s, s)``, ``k`` the size
      of one matrix).  An int for every leaf, or a callable
      ``(path, leaf) -> int``; ``None`` (0) by default, which also keeps it
      static under ``optax.inject_hyperparams``.  ``olr.natural_galore`` sets it from its
      coefficients, which are ``batch + 2``-dimensional.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`WoodburyState`.

  Raises:
    ValueError: ``history`` not an int ``≥ 1``; ``damping`` not a finite
      number ``> 0``.

  (Long because ``init`` and ``update`` are closures over ``history``,
  ``damping`` and ``batch_ndim``, as in optax's own transformations; the solve
  is :func:`woodbury_solve`.)
  """
  s = _check_history(history)
  _check_damping(damping)

  def batch_ndims(tree):
    if not callable(batch_ndim):
      return [batch_ndim or 0] * len(jax.tree.leaves(tree))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [int(batch_ndim(leaves_lib.path_names(p), x)) for p, x in flat]

  def init_fn(params):
    def zeros(path, p, b):
      p = jnp.asarray(p)
      if not (b == 0 or 0 < b < p.ndim):
        name = "/".join(leaves_lib.path_names(path)) or "<root>"
        raise ValueError(
            f"leaf '{name}' of shape {p.shape}: `batch_ndim` {b} must be 0 or leave at least "
            "one matrix axis"
        )
      batch, size = p.shape[:b], math.prod(p.shape[b:])
      dtype = _state_dtype(p.dtype)
      return jnp.zeros(batch + (s, size), dtype), jnp.zeros(batch + (s, s), dtype)

    flat_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    pairs = [zeros(path, p, b)
             for (path, p), b in zip(flat_with_path, batch_ndims(params))]
    return WoodburyState(
        count=jnp.zeros([], jnp.int32),
        history=jax.tree.unflatten(treedef, [h for h, _ in pairs]),
        gram=jax.tree.unflatten(treedef, [g for _, g in pairs]),
    )

  def one_matrix(u, h, gram, slot, hit):
    """Push ``u`` into its history ``h`` and return ``F⁻¹ u`` (one matrix)."""
    g = jnp.reshape(u, (-1,)).astype(h.dtype)
    h = jax.lax.dynamic_update_slice(h, g[None, :], (slot, jnp.zeros_like(slot)))
    row = jnp.matmul(h, g, precision=_HIGHEST)  # new row/column `slot` of GᵀG
    same = _rows_equal_to(h, g, row, jnp.diagonal(gram), hit)
    gram = jnp.where(hit[None, :], row[:, None], gram)
    gram = jnp.where(hit[:, None], row[None, :], gram)
    y = _push_through(h, g, gram, same, jnp.asarray(damping).astype(h.dtype), refine)
    return jnp.reshape(y, u.shape).astype(u.dtype), h, gram

  def update_fn(updates, state, params=None):
    del params
    slot = state.count % s
    hit = jnp.arange(s) == slot
    flat, treedef = jax.tree.flatten(updates)
    histories = treedef.flatten_up_to(state.history)
    grams = treedef.flatten_up_to(state.gram)
    new_histories, new_grams, out = [], [], []
    for u, h, gram, b in zip(flat, histories, grams, batch_ndims(updates), strict=True):
      # One leaf at a time, so that XLA can schedule a leaf's two passes over
      # its history back to back, while it is still in cache (batching the
      # small solves of all leaves puts every leaf's first pass before any
      # second one: about 5% slower on a Llama block).  A stacked leaf's
      # matrices are solved as one batch.
      step = lambda u, h, gram: one_matrix(u, h, gram, slot, hit)
      y, h, gram = over_batch(step, b)(jnp.asarray(u), h, gram)
      new_histories.append(h)
      new_grams.append(gram)
      out.append(y)
    new_state = WoodburyState(
        count=optax.safe_increment(state.count),
        history=jax.tree.unflatten(treedef, new_histories),
        gram=jax.tree.unflatten(treedef, new_grams),
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)
