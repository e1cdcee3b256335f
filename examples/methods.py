"""The optimizers compared by ``examples.train``: a registry of named training methods.

A :class:`Method` bundles what the training job needs to know about one way of
training the example Llama model:

* ``make_tx(learning_rate, steps, config)`` builds the optax transformation,
  learning-rate schedule included (linear warm-up, then cosine decay, for every
  method so that only the optimizer differs);
* ``learning_rate``: the default peak learning rate, tuned for the ``small``
  preset on the stdlib corpus (see :data:`LEARNING_RATES`);
* ``param_transform`` (optional): for methods that train something other than
  the weights themselves, e.g. the dual linear-adapter path ``Θ0 + SᵀΛ`` where
  only ``Λ`` is trained. The job then differentiates the loss with respect to
  the *trainable* tree, and builds the model's weights with
  ``param_transform.materialize(trainable, frozen)``.

Which leaves are projected: the 2-D kernels of the attention and feed-forward
projections inside the transformer blocks (paths such as
``('layers', '0', 'attention', 'wq', 'kernel')``). The token embedding, the
output head and the RMSNorm scales are trained at full size, as in the GaLore
reference setup.

Registered methods: ``adamw``, ``galore``, ``flora``, ``two_sided`` always;
``natural_galore``, ``adamem``, ``apollo``, ``apollo_mini``, ``fira`` and the
refresh variants ``galore_staggered``, ``galore_tracking``,
``galore_tracking2`` and ``galore_tracking_lazy`` when ``optax_lowrank`` provides them. Others
can be added with :func:`register`.

Example:
  >>> method = get("galore")
  >>> config = MethodConfig.for_model(LlamaConfig.preset("small"))
  >>> tx = method.make_tx(method.learning_rate, 120, config)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_lowrank as olr
from examples.llama import STACKED_RULE

__all__ = [
    "LEARNING_RATES",
    "Method",
    "MethodConfig",
    "ParamTransform",
    "REGISTRY",
    "cosine_schedule",
    "decay_mask",
    "get",
    "is_projected",
    "names",
    "register",
]

Params = Any
TxFactory = Callable[[float, int, "MethodConfig"], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Hyper-parameters shared by the methods (everything but the learning rate).

  Attributes:
    rank: rank of the projections (per side for ``two_sided``).
    refresh_every: steps between new bases ("resubspace" interval).
    scale: ``α`` on the back-projected update of projected leaves (GaLore's
      scale; the full-size leaves are not scaled).
    weight_decay: decoupled weight decay on the matrices (embedding, kernels,
      head), none on the norm scales; the same for every method.
    warmup_fraction: fraction of the steps spent in linear warm-up from 0.
    final_lr_fraction: the cosine decays to this fraction of the peak.
    b1, b2: Adam's moment decay rates of adamw, galore, flora and two_sided
      (natural_galore and adamem keep their recipes' own, as well as eps).
    seed: seed of random projections.
  """

  rank: int = 32
  refresh_every: int = 50
  scale: float = 0.25
  weight_decay: float = 0.01
  warmup_fraction: float = 0.1
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  seed: int = 0

  @classmethod
  def for_model(cls, model_config: Any, **overrides: Any) -> MethodConfig:
    """The default config for a model: rank a quarter of its width.

    Args:
      model_config: an ``examples.llama.LlamaConfig`` (only ``dim`` is read).
      **overrides: fields to replace.

    Returns:
      The config.
    """
    fields = {"rank": max(1, model_config.dim // 4)}
    fields.update(overrides)
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class ParamTransform:
  """Hooks for methods whose trainable tree is not the weights themselves.

  The train step of such a method is, with ``W = materialize(trainable, frozen)``:

  1. ``trainable, frozen, opt_state = before_update(trainable, frozen, opt_state,
     step, full_grad)`` if the hook is given;
  2. ``g = ∂ loss(materialize(trainable, frozen)) / ∂ trainable``;
  3. ``trainable ← trainable + tx.update(g, opt_state, trainable)``.

  Attributes:
    init: ``(params, config) -> (trainable, frozen)``; ``params`` is the freshly
      initialised weight tree. ``trainable`` is what the optimizer sees and
      updates; ``frozen`` is carried along in the train state (and
      checkpointed) and only changes in ``before_update``.
    materialize: ``(trainable, frozen) -> params``, the weights the model runs
      with (traced inside the jitted train step and the evaluation).
    before_update: optional ``(trainable, frozen, opt_state, step, full_grad) ->
      (trainable, frozen, opt_state)``, traced at the start of every step;
      ``step`` (int32) is the number of updates done so far and
      ``full_grad(params)`` the gradient of *this step's batch* loss with
      respect to full weights ``params`` (computed only where called, e.g. in
      the branch of a ``lax.cond`` taken on refresh steps). This is where an
      adapter merges ``Θ0 ← Θ0 + SᵀΛ`` and makes its next basis from the
      gradient at the merged weights — at the same step and from the same
      batch as ``olr.low_rank`` refreshes on the gradient path. A basis that is
      made from the gradient can be given a placeholder in ``init`` (e.g. from
      zero gradients) and made for real here at ``step == 0``.
  """

  init: Callable[[Params, MethodConfig], tuple[Any, Any]]
  materialize: Callable[[Any, Any], Params]
  before_update: Callable[..., tuple[Any, Any, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method of the comparison.

  Attributes:
    name: registry key, also the checkpoint sub-directory and the label in the
      results.
    make_tx: ``(learning_rate, steps, config) -> GradientTransformation``; the
      learning rate is the peak of the schedule built by :func:`cosine_schedule`.
    learning_rate: default peak learning rate.
    description: one line for ``--help`` and the results.
    param_transform: optional :class:`ParamTransform` (adapter-style methods).
  """

  name: str
  make_tx: TxFactory
  learning_rate: float
  description: str = ""
  param_transform: ParamTransform | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method, *, overwrite: bool = False) -> Method:
  """Adds a method to :data:`REGISTRY`.

  Args:
    method: the method.
    overwrite: replace an existing method of the same name instead of failing.

  Returns:
    The method, so that this can be used on a freshly built one.

  Raises:
    ValueError: if the name is taken and ``overwrite`` is false.
  """
  if method.name in REGISTRY and not overwrite:
    raise ValueError(f"method {method.name!r} is already registered")
  REGISTRY[method.name] = method
  return method


def names() -> list[str]:
  """Names of the registered methods, in registration order."""
  return list(REGISTRY)


def get(name: str) -> Method:
  """The registered method called ``name``.

  Raises:
    KeyError: with the valid names, if there is none.
  """
  try:
    return REGISTRY[name]
  except KeyError:
    raise KeyError(f"unknown method {name!r}; valid: {', '.join(names())}") from None


# ----------------------------------------------------------------------------
# Shared pieces.


def is_projected(path: tuple[str, ...], leaf: Any) -> bool:
  """The ``where`` rule: the kernels inside the transformer blocks.

  Args:
    path: the leaf's path, e.g. ``('layers', '0', 'ffn', 'w1', 'kernel')``, or
      ``('layers', 'ffn', 'w1', 'kernel')`` for the stacked ``(n_layers, in,
      out)`` kernels of a scanned model (seen as ``n_layers`` matrices through
      ``reshape=STACKED_RULE``, which every method passes).
    leaf: the leaf (an array or a ``ShapeDtypeStruct``).

  Returns:
    True for attention and feed-forward kernels; False for the embedding, the
    output head and the norm scales.
  """
  return (len(path) > 1 and path[0] == "layers" and path[-1] == "kernel"
          and leaf.ndim in (2, 3))


def decay_mask(params: Params) -> Any:
  """Weight-decay mask: every matrix (embedding, kernels, head), no vector (norm scales)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def cosine_schedule(learning_rate: float, steps: int, config: MethodConfig) -> optax.Schedule:
  """Linear warm-up from 0 to ``learning_rate``, then cosine decay over the rest.

  Args:
    learning_rate: the peak.
    steps: total number of updates of the run.
    config: gives ``warmup_fraction`` and ``final_lr_fraction``.

  Returns:
    An optax schedule.
  """
  steps = max(int(steps), 2)
  warmup = min(max(1, round(config.warmup_fraction * steps)), steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=learning_rate,
      warmup_steps=warmup,
      decay_steps=steps,
      end_value=learning_rate * config.final_lr_fraction,
  )


def _supported_kwargs(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
  """The subset of ``kwargs`` that ``fn`` accepts (recipes differ in their options)."""
  params = inspect.signature(fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return kwargs
  return {k: v for k, v in kwargs.items() if k in params}


# ----------------------------------------------------------------------------
# Factories.


def _adamw(learning_rate: float, steps: int, config: MethodConfig) -> optax.GradientTransformation:
  return optax.adamw(
      cosine_schedule(learning_rate, steps, config),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=decay_mask,
  )


def _galore(learning_rate: float, steps: int, config: MethodConfig) -> optax.GradientTransformation:
  return olr.galore(
      cosine_schedule(learning_rate, steps, config),
      rank=config.rank,
      refresh_every=config.refresh_every,
      scale=config.scale,
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      where=is_projected,
      reshape=STACKED_RULE,
      mask=decay_mask,
  )


def _flora(learning_rate: float, steps: int, config: MethodConfig) -> optax.GradientTransformation:
  return olr.flora(
      cosine_schedule(learning_rate, steps, config),
      rank=config.rank,
      refresh_every=config.refresh_every,
      scale=config.scale,
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      where=is_projected,
      reshape=STACKED_RULE,
      seed=config.seed,
      mask=decay_mask,
  )


def _two_sided(
    learning_rate: float, steps: int, config: MethodConfig
) -> optax.GradientTransformation:
  return optax.chain(
      olr.low_rank(
          optax.scale_by_adam(b1=config.b1, b2=config.b2),
          olr.two_sided(config.rank, config.rank),
          refresh_every=config.refresh_every,
          scale=config.scale,
          where=is_projected,
          reshape=STACKED_RULE,
          seed=config.seed,
      ),
      optax.add_decayed_weights(config.weight_decay, decay_mask),
      optax.scale_by_learning_rate(cosine_schedule(learning_rate, steps, config)),
  )


def _recipe_factory(recipe: Callable[..., optax.GradientTransformation]) -> TxFactory:
  """A factory for a package recipe whose exact options are not fixed here."""

  def make_tx(learning_rate: float, steps: int, config: MethodConfig):
    # Structural options only; the recipe keeps its own moment decays and eps.
    options = _supported_kwargs(
        recipe,
        rank=config.rank,
        refresh_every=config.refresh_every,
        scale=config.scale,
        weight_decay=config.weight_decay,
        where=is_projected,
        reshape=STACKED_RULE,
        mask=decay_mask,
        seed=config.seed,
    )
    return recipe(cosine_schedule(learning_rate, steps, config), **options)

  return make_tx


# Peak learning rates, from a one-seed sweep of the final validation loss
# (nats/byte) on the ``small`` preset, batch 8 × 128 bytes, 200 steps, 10%
# warm-up, cosine to 10%, rank 32, refresh every 50:
#
#   adamw           3e-4: 2.757   1e-3: 2.359   3e-3: 2.542   1e-2: 2.665
#   galore          3e-3: 2.304   1e-2: 2.127   3e-2: 1.995   1e-1: 2.242
#   flora           3e-3: 2.300   1e-2: 2.140   3e-2: 2.243
#   two_sided       3e-3: 2.325   1e-2: 2.232   3e-2: 2.163   1e-1: 2.778
#   natural_galore  3e-3: 2.271   1e-2: 2.076   3e-2: 2.139
#   adamem          1e-3: 2.146   2e-3: 2.067   3e-3: 2.120   5e-3: 2.349   1e-2: 2.480
#                   3e-2: 2.584   (issue 17: Alg. 3 statistics of the projected gradient,
#                   update clipping; before it, 3e-4: 2.488  1e-3: 2.272  3e-3: 2.456)
#
# galore, flora, two_sided and natural_galore multiply the block kernels'
# updates by ``scale`` = 0.25 (and see only a rank-32 slice of them) while the
# embedding, head and norms get the full rate, so their best peak is 10-30x
# AdamW's. AdaMeM has no such scale (its projected and residual parts together
# make a full-size update, each part normalised to RMS ~1): per unit of rate its
# kernel steps are ~2x AdamW's and ~10x GaLore's (update RMS / lr after 30 steps:
# 0.44, 0.21, 0.04), so it wants a rate near AdamW's. At 3e-3 and above AdamW
# stalls near 3.0 nats/byte for a long stretch of the run.
LEARNING_RATES: dict[str, float] = {
    "adamw": 1e-3,
    "galore": 3e-2,
    "flora": 1e-2,
    "two_sided": 3e-2,
    "natural_galore": 1e-2,
    "adamem": 2e-3,
    # full-rank updates from low-rank statistics (issue 25), from the same kind of
    # sweep at 200 steps (2026-12-01, final validation loss):
    #   apollo       1e-3: 2.439   3e-3: 2.263   1e-2: 2.239   3e-2: 2.305
    #   apollo_mini  1e-3: 2.420   3e-3: 2.313   1e-2: 2.410
    #   fira         1e-2: 2.100   3e-2: 2.061   (α on the low-rank term only; with
    #                α on both terms, before d811a0f: 1e-2 2.115, 3e-2 2.023, 1e-1 2.373)
    # (same day, same budget: adamw 1e-3 2.359, galore 3e-2 1.993, flora 1e-2 2.140);
    # apollo_mini at 600 steps (seed 0): 1e-3 2.052, 3e-3 1.804, 1e-2 1.766, 3e-2 2.094,
    # so its rate is the 600-step one (docs/results.md)
    "apollo": 1e-2,
    "apollo_mini": 1e-2,
    "fira": 3e-2,
    # the dual of Flora-with-"keep": same random subspaces, so flora's rate
    "adapter": 1e-2,
}

register(Method("adamw", _adamw, LEARNING_RATES["adamw"], "AdamW at full rank (optax.adamw)"))
register(
    Method(
        "galore", _galore, LEARNING_RATES["galore"],
        "GaLore-AdamW: Adam in the top-r singular subspace of the gradient (olr.galore)",
    )
)
register(
    Method(
        "flora", _flora, LEARNING_RATES["flora"],
        "Flora: Adam in a random Gaussian subspace re-drawn from a key (olr.flora)",
    )
)
register(
    Method(
        "two_sided", _two_sided, LEARNING_RATES["two_sided"],
        "Adam on L G R with Gaussian sketches on both sides (olr.two_sided)",
    )
)
if hasattr(olr, "natural_galore"):
  register(
      Method(
          "natural_galore", _recipe_factory(olr.natural_galore), LEARNING_RATES["natural_galore"],
          "GaLore with a Woodbury natural-gradient preconditioner (olr.natural_galore)",
      )
  )
if hasattr(olr, "adamem"):
  register(
      Method(
          "adamem", _recipe_factory(olr.adamem), LEARNING_RATES["adamem"],
          "AdaMeM: projected momentum plus Adafactor on the residual (olr.adamem)",
      )
  )

if hasattr(olr, "subspace_iteration"):

  def _refresh_variant(make_projection, schedule: str) -> TxFactory:
    """GaLore-AdamW with another refresh: its projection and refresh schedule (issue 26)."""

    def make_tx(learning_rate: float, steps: int, config: MethodConfig):
      return olr.adam_in_subspace(
          cosine_schedule(learning_rate, steps, config), make_projection(config.rank),
          refresh_every=config.refresh_every, scale=config.scale, b1=config.b1, b2=config.b2,
          weight_decay=config.weight_decay, where=is_projected, reshape=STACKED_RULE,
          mask=decay_mask, refresh_schedule=schedule)

    return make_tx

  for _name, _make, _schedule, _what in (
      ("galore_staggered", olr.svd, "staggered",
       "GaLore with each matrix refreshed on its own step (refresh_schedule='staggered')"),
      ("galore_tracking", olr.subspace_iteration, "staggered",
       "GaLore whose bases are tracked by subspace iteration, staggered (no SVD after step 0)"),
      ("galore_tracking_lazy", olr.subspace_iteration, "lazy",
       "GaLore, tracked bases, per-matrix intervals from the subspace overlap (lazy)"),
      ("galore_tracking2", lambda rank: olr.subspace_iteration(rank, iters=2), "staggered",
       "GaLore, tracked bases with two subspace-iteration steps per refresh, staggered"),
  ):
    register(Method(_name, _refresh_variant(_make, _schedule), LEARNING_RATES["galore"], _what))

if hasattr(olr, "apollo"):

  def _apollo(learning_rate: float, steps: int, config: MethodConfig):
    # The paper's α = 1 (not GaLore's scale): the update is the gradient itself, rescaled.
    return olr.apollo(
        cosine_schedule(learning_rate, steps, config), rank=config.rank,
        refresh_every=config.refresh_every, b1=config.b1, b2=config.b2,
        weight_decay=config.weight_decay, where=is_projected, reshape=STACKED_RULE,
        seed=config.seed, mask=decay_mask,
    )

  def _apollo_mini(learning_rate: float, steps: int, config: MethodConfig):
    # rank 1 and the paper's α = √128 whatever the config's rank and scale
    return olr.apollo_mini(
        cosine_schedule(learning_rate, steps, config), refresh_every=config.refresh_every,
        b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, where=is_projected,
        reshape=STACKED_RULE, seed=config.seed, mask=decay_mask,
    )

  def _fira(learning_rate: float, steps: int, config: MethodConfig):
    # GaLore's SVD subspace and scale (Fira's α = 0.25 too), plus the scaled residual
    return olr.fira(
        cosine_schedule(learning_rate, steps, config), rank=config.rank,
        refresh_every=config.refresh_every, scale=config.scale, b1=config.b1, b2=config.b2,
        weight_decay=config.weight_decay, where=is_projected, reshape=STACKED_RULE,
        mask=decay_mask,
    )

  register(Method(
      "apollo", _apollo, LEARNING_RATES["apollo"],
      "APOLLO: the gradient scaled channel-wise by Adam's ratio in a random subspace "
      "(olr.apollo)",
  ))
  register(Method(
      "apollo_mini", _apollo_mini, LEARNING_RATES["apollo_mini"],
      "APOLLO-Mini: rank-1 random subspace, one scaling factor per matrix (olr.apollo_mini)",
  ))
  register(Method(
      "fira", _fira, LEARNING_RATES["fira"],
      "Fira: GaLore plus the residual outside the subspace, scaled column-wise (olr.fira)",
  ))


# ----------------------------------------------------------------------------
# The adapter path: train only Λ in Θ0 + SᵀΛ (olr.adapters), the dual of
# olr.low_rank(adam, olr.gaussian(rank)) with the "keep" policy.


def _projected_mask(tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, x: is_projected(olr.leaves.path_names(path), x), tree
  )


def _adapter_tx(learning_rate: float, steps: int, config: MethodConfig):
  # olr.adapters.optimizer(adam, adapter, scale) with the mask taken from paths,
  # since the factory does not see the adapter; weight decay acts on Λ (the
  # adapter view of paper 000, App. B).
  return optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2),
      optax.masked(optax.scale(config.scale), _projected_mask),
      optax.add_decayed_weights(config.weight_decay, decay_mask),
      optax.scale_by_learning_rate(cosine_schedule(learning_rate, steps, config)),
  )


def _adapter_init(params, config: MethodConfig):
  adapter = olr.adapters.init(params, olr.gaussian(config.rank), seed=config.seed,
                              where=is_projected, reshape=STACKED_RULE)
  # refresh_every travels with the frozen state, so the traced hook can read it
  frozen = {"adapter": adapter, "refresh_every": jnp.asarray(config.refresh_every, jnp.int32)}
  return olr.adapters.zeros(adapter), frozen


def _adapter_materialize(lam, frozen):
  return olr.adapters.materialize(frozen["adapter"], lam)


def _adapter_before_update(lam, frozen, opt_state, step, full_grad):
  del full_grad  # random bases need no gradient
  refresh = (step > 0) & (step % frozen["refresh_every"] == 0)

  def merge(operand):
    lam, adapter = operand
    adapter, lam = olr.adapters.merge(adapter, lam)
    return lam, adapter

  lam, adapter = jax.lax.cond(refresh, merge, lambda operand: operand, (lam, frozen["adapter"]))
  # "keep": Adam's moments carry over the merge, as olr.low_rank's default
  return lam, dict(frozen, adapter=adapter), opt_state


register(
    Method(
        "adapter", _adapter_tx, LEARNING_RATES["adapter"],
        "the dual path: only Λ of Θ0 + SᵀΛ trained (Gaussian S), merged at every refresh",
        param_transform=ParamTransform(_adapter_init, _adapter_materialize,
                                       _adapter_before_update),
    )
)


# ----------------------------------------------------------------------------
# The adapter path on a quantized frozen base (INT8 or NF4, blocks of 64): the
# same method as ``adapter``, with Θ0 stored block-wise quantized and every
# merge written back by olr.quantized_merge.DEFAULT_MERGE_RULE (4-bit error
# feedback: the rounding residual is carried, so small updates accumulate
# until they move a code). See docs/how-to/quantized-base.md.

QUANTIZED_BLOCK_SIZE = 64


def _quantized_adapter_init(format: str):
  def init(params, config: MethodConfig):
    lam, frozen = _adapter_init(params, config)
    adapter = olr.adapters.quantize_base(frozen["adapter"], format, QUANTIZED_BLOCK_SIZE)
    return lam, dict(frozen, adapter=adapter)

  return init


for _format in ("int8", "nf4"):
  register(
      Method(
          f"adapter_{_format}", _adapter_tx, LEARNING_RATES["adapter"],
          f"the adapter path on a {_format.upper()}-quantized frozen base (blocks of "
          f"{QUANTIZED_BLOCK_SIZE}), merged with 4-bit error feedback",
          param_transform=ParamTransform(_quantized_adapter_init(_format),
                                         _adapter_materialize, _adapter_before_update),
      )
  )
del _format
