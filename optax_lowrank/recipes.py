"""Complete optimizers, learning rate included, in the style of ``optax.adamw``.

Each recipe is :func:`~optax_lowrank.low_rank` around an inner optimizer
followed by ``−η``, then decoupled weight decay on the full weights:

    u = −η · (α · Sᵀ inner(S g) + λ_wd · W)

``−η`` is applied in the small space (it is the last element of the inner
chain), which saves a pass over every full-size update; the state is
``(low_rank state, weight-decay state)``.

Weight decay here acts on the full weights (the "gradient view" of
Torroba-Hennigen et al. 2025, arXiv:2502.13811, App. B); ``olr.adapters``
documents the adapter-view alternative.

Two selections, each in the convention of what it configures: ``where``
chooses the leaves to project, as for ``olr.low_rank`` (a pytree of bools or a
callable ``(path, leaf) -> bool``); ``mask`` chooses the leaves weight decay
applies to, exactly as ``optax.adamw``'s ``mask`` (a pytree of bools or a
callable ``params -> pytree of bools``).
"""

# No ``from __future__ import annotations``: the signatures carry the real
# ``optax.ScalarOrSchedule`` object, which tools (optax's own test suite among
# them) compare against to learn that ``learning_rate`` takes a schedule.
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import eight_bit as eight_bit_lib
from optax_lowrank import full_rank as full_rank_lib
from optax_lowrank import projections as proj
from optax_lowrank.low_rank import low_rank
from optax_lowrank.woodbury import woodbury_precondition

__all__ = ["galore", "flora", "natural_galore", "adam_in_subspace", "apollo", "apollo_mini", "fira"]


def _static_int(name: str, value: Any, recipe: str) -> Any:
  """A shape-fixing argument (``rank``, ``history``) as given, or a clear error for an array.

  ``optax.inject_hyperparams`` turns every numeric argument into an array and
  rebuilds the transformation from the arrays at each ``update`` (traced under
  ``jax.jit``), so an argument that fixes the state's shapes cannot be one of
  them: it must be listed in ``static_args``.  Concrete arrays are rejected
  too, at ``init``, rather than accepted there only to fail at the first
  jitted step.
  """
  if isinstance(value, jax.Array):
    raise TypeError(
        f"`{name}` of olr.{recipe} fixes the shapes of the optimizer state, so it must be a "
        f"Python int, got {value!r}. Under optax.inject_hyperparams, which makes every "
        f"numeric argument an array, list it as static: "
        f"optax.inject_hyperparams(olr.{recipe}, static_args=({name!r},))(...)"
    )
  return value


def adam_in_subspace(
    learning_rate: optax.ScalarOrSchedule,
    projection: proj.Projection,
    *,
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
    refresh_schedule: Any = "fixed",
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose moments live in the space of ``projection``; the recipes' common core.

  Args:
    learning_rate: a float or an optax schedule.
    projection: any projection spec.
    refresh_every, on_refresh, where, seed, reshape, refresh_schedule: as for
      ``olr.low_rank``.
    scale: ``α`` on the back-projected update of projected leaves.
    b1, b2, eps: Adam's hyper-parameters (optax's bias-corrected form:
      ``m̂/(√v̂ + eps)``).
    weight_decay: decoupled weight decay on the full weights.
    mask: which leaves weight decay applies to (as in ``optax.adamw``).
  """
  return _low_rank_recipe(
      _scale_by_adam(b1, b2, eps), projection, learning_rate, weight_decay, mask,
      refresh_every=refresh_every, on_refresh=on_refresh, scale=scale, where=where, seed=seed,
      reshape=reshape, refresh_schedule=refresh_schedule,
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
  """GaLore-AdamW (Zhao et al. 2024, arXiv:2403.03507, Algorithm 1).

  The top-``rank`` singular vectors of each projected gradient, re-made every
  ``refresh_every`` steps, carry Adam's moments: ``2·max(m,n)·r`` floats of
  moments plus ``min(m,n)·r`` of projector per ``m×n`` leaf, against ``2·m·n``
  for AdamW.  With the defaults (side ``"auto"``, ``scale=0.25``,
  ``eps=1e-6``) it follows galore-torch's ``GaLoreAdamW`` up to two documented
  differences: galore-torch adds ``eps`` to ``√v`` before bias correction
  (effective ``eps·√(1−β2^t)`` here), and decays the already-updated weight
  (a difference of order ``η²·λ_wd``).
  """
  rank = _static_int("rank", rank, "galore")
  return adam_in_subspace(
      learning_rate, proj.svd(rank, side), refresh_every=refresh_every, scale=scale, b1=b1,
      b2=b2, eps=eps, weight_decay=weight_decay, on_refresh=on_refresh, where=where,
      reshape=reshape, mask=mask,
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
  """Flora: Adam in a random subspace re-drawn every ``refresh_every`` steps.

  Hao, Cao and Mou 2024, arXiv:2402.03293.  The sketch (``kind``:
  ``"gaussian"`` or ``"rademacher"``) is rebuilt from a PRNG key on every step
  and never stored: the state is Adam's moments on the coefficients and one
  key.  At a refresh the moments are transported into the new sketch
  (``on_refresh="transport"``), as Flora does with its momentum.
  """
  rank = _static_int("rank", rank, "flora")
  if kind not in ("gaussian", "rademacher"):
    raise ValueError(f"`kind` must be 'gaussian' or 'rademacher', got {kind!r}")
  spec = proj.gaussian(rank, side) if kind == "gaussian" else proj.rademacher(rank, side)
  return adam_in_subspace(
      learning_rate, spec, refresh_every=refresh_every, scale=scale, b1=b1, b2=b2, eps=eps,
      weight_decay=weight_decay, on_refresh=on_refresh, where=where, seed=seed,
      reshape=reshape, mask=mask,
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
  """Natural GaLore (Das 2024, arXiv:2410.16029, Alg. 1 with §2.2).

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
  memory-bound for large leaves (1.19× GaLore's step on a Llama block, see
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
  rank = _static_int("rank", rank, "natural_galore")
  history = 10 if history is None else _static_int("history", history, "natural_galore")
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


# -- full-rank updates from low-rank statistics (optax_lowrank.full_rank) --------


def _full_rank_recipe(
    rule: full_rank_lib.FullRankRule,
    projection: proj.Projection,
    learning_rate: optax.ScalarOrSchedule,
    b1: float, b2: float, eps: float, weight_decay: float, eight_bit: bool, mask: Any,
    **low_rank_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``low_rank(adam, full_rank=rule)``, then ``−η``, then decoupled weight decay.

  Unlike :func:`_low_rank_recipe`, the learning rate comes after ``low_rank``:
  the rule measures ``‖Δ‖/‖C‖`` and limits norm growth, and neither may see
  ``−η_t`` (its sign, or a warm-up that would read as growth).  The state is
  ``(low_rank state, learning-rate state, (decay state, learning-rate state))``.
  """
  inner = (eight_bit_lib.scale_by_adam_8bit(b1, b2, eps) if eight_bit
           else _scale_by_adam(b1, b2, eps))
  return optax.chain(
      low_rank(inner, projection, full_rank=rule, **low_rank_kwargs),
      optax.scale_by_learning_rate(learning_rate),
      _decay_times_learning_rate(weight_decay, learning_rate, mask),
  )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    refresh_every: int = 200,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    limit: float | None = 1.01,
    granularity: str = "channel",
    eight_bit: bool = False,
    kind: str = "gaussian",
    side: proj.Side = "auto",
    on_refresh: str = "keep",
    where: Any = None,
    seed: int = 0,
    reshape: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO: the full gradient, scaled channel-wise by what Adam does in a random sketch.

  Zhu et al. 2025, "APOLLO: SGD-like Memory, AdamW-level Performance",
  arXiv:2412.05270.

  Adam runs on the coefficients ``R = P G`` of a random sketch ``P ∈ R^{r×m}``
  (``kind``: ``"gaussian"``, entries ``N(0, 1/r)``, or ``"rademacher"``),
  rebuilt from ``seed`` and re-drawn every ``refresh_every`` steps, never
  stored.  Its step ``R̃`` only measures a per-channel scaling
  ``s_j = ‖R̃[:, j]‖/‖R[:, j]‖`` (a channel is a column of the larger
  dimension, the one the sketch keeps), and the update is the *full-rank*
  gradient rescaled, with the norm-growth limiter (``γ = limit``):

      U = α·G·diag(s),   U ← U·γ‖U_{t−1}‖/‖U‖ if ‖U‖ > γ‖U_{t−1}‖,
      W ← W − η_t·(U + λ_wd·W)

  (``granularity="tensor"``: one ``s = ‖R̃‖/‖R‖`` per matrix).  Leaves that
  are not projected get Adam at full size.  See
  :func:`optax_lowrank.full_rank.scaled_gradient`.

  Memory per projected ``m×n`` matrix: Adam's moments on ``r·max(m, n)``
  coefficients (Flora's at the same rank) plus one float for the limiter;
  ``eight_bit=True`` keeps the moments in :func:`~optax_lowrank.scale_by_adam_8bit`'s
  8-bit blocks instead.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank ``r`` of the sketch (the paper's APOLLO: 256; ``apollo_mini``
      is rank 1).
    refresh_every: steps between new sketches (the paper's ``T = 200``).
    scale: ``α`` on the updates of projected leaves (the paper: 1 for APOLLO).
    b1, b2, eps: Adam's, in optax's bias-corrected form.
    weight_decay: decoupled weight decay on the full weights.
    limit: ``γ`` of the norm-growth limiter (the paper's 1.01), ``None`` for none.
    granularity: ``"channel"`` or ``"tensor"``.
    eight_bit: Adam's moments in 8-bit blocks.
    kind, side: the sketch (see :func:`optax_lowrank.gaussian`).
    on_refresh, where, seed, reshape: as for :func:`optax_lowrank.low_rank`.
    mask: which leaves weight decay applies to.
  """
  if kind not in ("gaussian", "rademacher"):
    raise ValueError(f"`kind` must be 'gaussian' or 'rademacher', got {kind!r}")
  spec = proj.gaussian(rank, side) if kind == "gaussian" else proj.rademacher(rank, side)
  return _full_rank_recipe(
      full_rank_lib.scaled_gradient(granularity, limit), spec, learning_rate, b1, b2, eps,
      weight_decay, eight_bit, mask, refresh_every=refresh_every, on_refresh=on_refresh,
      scale=scale, where=where, seed=seed, reshape=reshape,
  )


APOLLO_MINI_SCALE = 128 ** 0.5


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    refresh_every: int = 200,
    scale: float = APOLLO_MINI_SCALE,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    limit: float | None = 1.01,
    eight_bit: bool = False,
    side: proj.Side = "auto",
    on_refresh: str = "keep",
    where: Any = None,
    seed: int = 0,
    reshape: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO-Mini (Zhu et al. 2025, arXiv:2412.05270): :func:`apollo` at rank 1, tensor-wise.

  One Gaussian row ``p ∈ R^{1×m}`` per matrix, Adam on ``p G`` (``max(m, n)``
  coefficients), one scaling factor ``s = ‖R̃‖/‖R‖`` per matrix, and
  ``U = α·s·G`` with the norm-growth limiter.  A rank-1 ratio underestimates
  the full one, so the paper scales the update by ``α = √128`` (the
  default).  State per projected matrix: ``2·max(m, n)`` floats of moments and
  one of the limiter, below SGD with momentum's ``m·n``.

  Args: as for :func:`apollo` (``rank`` is 1 and ``granularity`` ``"tensor"``).
  """
  return _full_rank_recipe(
      full_rank_lib.scaled_gradient("tensor", limit), proj.gaussian(1, side), learning_rate,
      b1, b2, eps, weight_decay, eight_bit, mask, refresh_every=refresh_every,
      on_refresh=on_refresh, scale=scale, where=where, seed=seed, reshape=reshape,
  )


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    refresh_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    limit: float | None = 1.01,
    granularity: str = "channel",
    eight_bit: bool = False,
    side: proj.Side = "auto",
    on_refresh: str = "keep",
    where: Any = None,
    reshape: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Fira: GaLore plus the scaled residual.

  Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint?", arXiv:2410.01623.

  GaLore's SVD projector ``P`` (refreshed every ``refresh_every`` steps) and
  Adam on ``R = Pᵀ G``, whose step ``ψ(R)`` is applied as in GaLore; the part
  of the gradient outside the subspace, ``G − P R``, is applied too, scaled
  column-wise by the ratio Adam gives in the subspace,
  ``φ_j = ‖ψ(R)[:, j]‖/‖R[:, j]‖``, with the norm-growth limiter on it:

      S = φ∘(G − P R),   S ← S·γ‖S_{t−1}‖/‖S‖ if ‖S‖ > γ‖S_{t−1}‖,
      W ← W − η_t·(α·P ψ(R) + S + λ_wd·W)

  (``α`` on the low-rank term only, as in GaLore and Fira's reference code,
  which subtracts ``α·P R`` for the residual where we follow the paper's
  ``G − P R``).  State per
  projected matrix: GaLore's (moments on ``r·max(m, n)`` coefficients and the
  ``min(m, n)×r`` projector) plus one float.  See
  :func:`optax_lowrank.full_rank.scaled_residual`.

  Args: as for :func:`galore`, plus ``limit``, ``granularity`` and
  ``eight_bit`` as for :func:`apollo`.
  """
  return _full_rank_recipe(
      full_rank_lib.scaled_residual(granularity, limit), proj.svd(rank, side), learning_rate,
      b1, b2, eps, weight_decay, eight_bit, mask, refresh_every=refresh_every,
      on_refresh=on_refresh, scale=scale, where=where, reshape=reshape,
  )
