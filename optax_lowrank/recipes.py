"""Complete optimizers, learning rate included, in the style of ``optax.adamw``.

Each recipe is an ``optax.chain`` of :func:`~optax_lowrank.low_rank` around an
inner optimizer, decoupled weight decay on the full weights, and the learning
rate:

    u = −η · (α · Sᵀ inner(S g) + λ_wd · W)

Weight decay here acts on the full weights (the "gradient view" of paper 000,
App. B); ``olr.adapters`` documents the adapter-view alternative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
  return _with_decay_and_learning_rate(
      low_rank(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), projection,
               refresh_every=refresh_every, on_refresh=on_refresh, scale=scale, where=where,
               seed=seed, reshape=reshape),
      learning_rate, weight_decay, mask,
  )


def _with_decay_and_learning_rate(
    tx: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Any,
) -> optax.GradientTransformationExtraArgs:
  """``tx``, then decoupled weight decay on the full weights, then ``−η``."""
  return optax.chain(
      tx,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


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
    history: int = 10,
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
  """
  return _with_decay_and_learning_rate(
      low_rank(
          optax.chain(woodbury_precondition(history, damping, refine=refine),
                      optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
          proj.svd(rank, side),
          refresh_every=refresh_every,
          on_refresh=on_refresh,
          scale=scale,
          where=where,
          reshape=reshape,
          unprojected=optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      ),
      learning_rate, weight_decay, mask,
  )
