"""Complete optimizers, learning rate included, in the style of ``optax.adamw``.

Each recipe is :func:`~optax_lowrank.low_rank` around an inner optimizer
followed by ``−η``, then decoupled weight decay on the full weights:

    u = −η · (α · Sᵀ inner(S g) + λ_wd · W)

``−η`` is applied in the small space (it is the last element of the inner
chain), which saves a pass over every full-size update; the state is
``(low_rank state, weight-decay state)``.

Weight decay here acts on the full weights (the "gradient view" of paper 000,
App. B); ``olr.adapters`` documents the adapter-view alternative.
"""

# No ``from __future__ import annotations``: the signatures carry the real
# ``optax.ScalarOrSchedule`` object, which tools (optax's own test suite among
# them) compare against to learn that ``learning_rate`` takes a schedule.
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import projections as proj
from optax_lowrank.low_rank import low_rank
from optax_lowrank.woodbury import woodbury_precondition

__all__ = ["galore", "flora", "natural_galore", "adam_in_subspace"]


def adam_in_subspace(
    learning_rate: optax.ScalarOrSchedule,
    projection: proj.Projection,
    refresh_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    on_refresh: str = "keep",
    where: Any = None,
    seed: int = 0,
    reshape: Any = None,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose moments live in the space of ``projection``; the recipes' common core.

  Args:
    learning_rate: a float or an optax schedule.
    projection: any projection spec.
    refresh_every, on_refresh, where, seed, reshape: as for ``olr.low_rank``.
    scale: ``α`` on the back-projected update of projected leaves.
    b1, b2, eps: Adam's hyper-parameters (optax's bias-corrected form:
      ``m̂/(√v̂ + eps)``).
    weight_decay: decoupled weight decay on the full weights.
    mask: which leaves weight decay applies to (as in ``optax.adamw``).
  """
  return _low_rank_recipe(
      _scale_by_adam(b1, b2, eps), projection, learning_rate, weight_decay, mask,
      refresh_every=refresh_every, on_refresh=on_refresh, scale=scale, where=where, seed=seed,
      reshape=reshape,
  )


def _scale_by_adam(
    b1: float | jax.Array, b2: float | jax.Array, eps: float | jax.Array
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with Python-float hyper-parameters made arrays at update.

  A Python ``b2`` enters optax's arithmetic in two precisions: ``1 − b2`` is
  computed in float64 by Python, ``b2ᵗ`` in float32 by JAX, so float32
  moments and their bias correction disagree by ``~1e-5`` relative.  Made
  float32 arrays (the coefficients' dtype; float64 for float64 params), both are
  float32, exactly as under ``optax.inject_hyperparams`` — so the plain and the
  injected recipe give the same updates to round-off.  Updates and moments keep
  their dtypes (a bfloat16 leaf's moments are updated in float32 and stored
  in bfloat16).
  """
  init_fn = optax.scale_by_adam(b1=b1, b2=b2, eps=eps).init

  def update_fn(updates, state, params=None):
    dtype = jnp.promote_types(optax.tree.dtype(updates, "highest"), jnp.float32)
    as_array = lambda x: jnp.asarray(x, dtype) if isinstance(x, (int, float)) else x
    tx = optax.scale_by_adam(b1=as_array(b1), b2=as_array(b2), eps=as_array(eps))
    new_updates, new_state = tx.update(updates, state, params)
    like = lambda new, old: jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)
    return like(new_updates, updates), like(new_state, state)

  return optax.GradientTransformation(init_fn, update_fn)


def _low_rank_recipe(
    inner: optax.GradientTransformation | list[optax.GradientTransformation],
    projection: proj.Projection,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Any,
    *,
    unprojected: optax.GradientTransformation | None = None,
    **low_rank_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``low_rank(inner)``, decoupled weight decay on the full weights, and ``−η``.

  The learning rate joins the inner optimizer (and ``unprojected``), so ``−η``
  multiplies the small coefficients before they are mapped back instead of the
  full-size update: one ``m×n`` pass less per leaf; the decay term ``−η·λ·W``
  is added after (and not at all when ``weight_decay == 0``).  The result is
  ``−η·(α·Sᵀ inner(S g) + λ·W)``, the same as scaling last, up to rounding.
  The state is ``(low_rank state, decay state)``; the inner state is
  ``(inner..., learning-rate state)``.
  """
  def with_lr(tx):  # a transformation or a list of them, chained flat
    parts = tx if isinstance(tx, list) else [tx]
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))

  return optax.chain(
      low_rank(
          with_lr(inner), projection,
          unprojected=None if unprojected is None else with_lr(unprojected),
          **low_rank_kwargs,
      ),
      _decay_times_learning_rate(weight_decay, learning_rate, mask),
  )


def _decay_times_learning_rate(
    weight_decay: float | jax.Array,
    learning_rate: optax.ScalarOrSchedule,
    mask: Any,
) -> optax.GradientTransformation:
  """Adds ``−η_t·λ·W`` (masked) to the updates, leaving the updates themselves unscaled.

  The state is ``(decay state, learning-rate state)`` whatever ``weight_decay``
  is: a Python ``0`` skips the work (and needs no ``params``) but keeps the
  structure, so the state is the same tree whether or not
  ``optax.inject_hyperparams`` turned ``weight_decay`` into an array.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)
  lr = optax.scale_by_learning_rate(learning_rate)
  skip = isinstance(weight_decay, (int, float)) and weight_decay == 0

  def init_fn(params):
    return (decay.init(params), lr.init(params))

  def update_fn(updates, state, params=None):
    if skip:  # advance the schedule's counter only: no leaves to scale
      return updates, (state[0], lr.update((), state[1])[1])
    if params is None:
      raise ValueError("weight_decay > 0 needs the params: call tx.update(grads, state, params)")
    zeros = jax.tree.map(jnp.zeros_like, updates)
    term, decay_state = decay.update(zeros, state[0], params)     # λ·W, masked
    term, lr_state = lr.update(term, state[1], params)            # −η_t·λ·W
    return jax.tree.map(lambda u, t: u + t.astype(u.dtype), updates, term), (decay_state, lr_state)

  return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    refresh_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    side: proj.Side = "auto",
    on_refresh: str = "keep",
    where: Any = None,
    reshape: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-AdamW (Zhao et al. 2024, paper 003, Algorithm 1).

  The top-``rank`` singular vectors of each projected gradient, re-made every
  ``refresh_every`` steps, carry Adam's moments: ``2·max(m,n)·r`` floats of
  moments plus ``min(m,n)·r`` of projector per ``m×n`` leaf, against ``2·m·n``
  for AdamW.  With the defaults (side ``"auto"``, ``scale=0.25``,
  ``eps=1e-6``) it follows galore-torch's ``GaLoreAdamW`` up to two documented
  differences: galore-torch adds ``eps`` to ``√v`` before bias correction
  (effective ``eps·√(1−β2^t)`` here), and decays the already-updated weight
  (a difference of order ``η²·λ_wd``).
  """
  return adam_in_subspace(
      learning_rate, proj.svd(rank, side), refresh_every, scale, b1, b2, eps, weight_decay,
      on_refresh, where, 0, reshape, mask,
  )


def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    refresh_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    kind: str = "gaussian",
    side: proj.Side = "auto",
    on_refresh: str = "transport",
    where: Any = None,
    seed: int = 0,
    reshape: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam in a random subspace re-drawn every ``refresh_every`` steps (Flora, Hao et al. 2024).

  The sketch (``kind``: ``"gaussian"`` or ``"rademacher"``) is rebuilt from a
  PRNG key on every step and never stored: the state is Adam's moments on the
  coefficients and one key.  At a refresh the moments are transported into the
  new sketch (``on_refresh="transport"``), as Flora does with its momentum.
  """
  if kind not in ("gaussian", "rademacher"):
    raise ValueError(f"`kind` must be 'gaussian' or 'rademacher', got {kind!r}")
  spec = proj.gaussian(rank, side) if kind == "gaussian" else proj.rademacher(rank, side)
  return adam_in_subspace(
      learning_rate, spec, refresh_every, scale, b1, b2, eps, weight_decay,
      on_refresh, where, seed, reshape, mask,
  )


def natural_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    history: int | None = None,
    damping: float = 1e-3,
    refresh_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    side: proj.Side = "auto",
    on_refresh: str = "keep",
    where: Any = None,
    reshape: Any = None,
    mask: Any = None,
    refine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Natural GaLore (Das 2024, paper 002, Alg. 1 with §2.2).

  In the GaLore subspace, each leaf's projected gradient ``g`` is first
  preconditioned by the inverse empirical Fisher of its last ``history``
  projected gradients, ``F⁻¹g`` with ``F = λI + GGᵀ`` (Woodbury identity, an
  ``s×s`` Cholesky solve; :func:`~optax_lowrank.woodbury_precondition`), then
  Adam runs on the result.  Leaves that are not projected get plain Adam.

  Memory per projected leaf: GaLore's plus ``history·k + history²`` floats for
  the history of ``k``-sized coefficients and its Gram matrix.  The history is
  cleared at every refresh (its coordinates change); Adam's moments follow
  ``on_refresh``.

  Time per ordinary step: GaLore's two GEMMs plus reading the history twice
  (the Gram row of the new gradient, then the solve): ``2·history·k`` floats,
  memory-bound for large leaves (1.20× GaLore's step on a Llama block, see
  the benchmarks page).  ``refine=True`` adds the refinement step of
  :func:`~optax_lowrank.woodbury_solve` (two more passes, ≈ 1.3×): more
  accurate when the stored gradients are nearly parallel and ``damping`` is
  tiny next to ``‖g‖²``.  The paper's solve has no refinement; without it the
  result is still checked to be a descent direction.

  ``history`` (``None``: 10, the paper's choice) fixes buffer shapes, so it is
  static.  ``None`` stays static under ``optax.inject_hyperparams``, which
  turns every other numeric default into an array; a value given explicitly
  there must be listed in ``static_args``.
  """
  history = 10 if history is None else history
  return _low_rank_recipe(
      [woodbury_precondition(history, damping, refine=refine, batch_ndim=_stacked_ndim),
       _scale_by_adam(b1, b2, eps)],
      proj.svd(rank, side), learning_rate, weight_decay, mask,
      unprojected=_scale_by_adam(b1, b2, eps),
      refresh_every=refresh_every, on_refresh=on_refresh, scale=scale, where=where,
      reshape=reshape,
  )


def _stacked_ndim(path: tuple[str, ...], coefficients: jax.Array) -> int:
  """Batch axes of a projected leaf's coefficients (matrix specs: all but the last two).

  Stacked leaves (``reshape=(batch_axes, row_axes, col_axes)``) then get one
  Woodbury history per matrix, as separate leaves would.
  """
  del path
  return coefficients.ndim - 2
