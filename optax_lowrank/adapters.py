"""The dual path: train only ``Λ`` in the linear adapter ``Θ = Θ0 + SᵀΛ``.

Torroba-Hennigen, Lang, Guo and Kim 2025 (arXiv:2502.13811, Theorem 1): for
a linear map ``S`` on a leaf, training the full-size weight with gradient map
``g ↦ Sᵀ inner(S g)`` and training only the coefficients ``Λ`` of
``Θ0 + SᵀΛ`` with ``inner`` give the same weights at every step, because
``∂L/∂Λ = S ∂L/∂Θ`` (chain rule).  Kronecker maps give ``W0 + Lᵀ Λ Rᵀ``
(Prop. 2, MoRA / LoRA-XS), one-sided maps give one-sided LoRA
``W0 + Pᵀ Λ`` / ``W0 + Λ Qᵀ`` with the other factor frozen (Cor. 3/4: GaLore ==
one-sided LoRA), and a refresh of the basis is ``merge``: fold ``SᵀΛ`` into
``W0``, take a new ``S``, restart from ``Λ = 0`` (ReLoRA with a frozen side).

Leaves that are not projected carry a full-size ``Λ`` with ``S = I``
(``Θ = Θ0 + Λ``), so every parameter the gradient path trains is trained here
too, and ``Λ`` is all zeros after ``zeros`` and ``merge``.

The bases come from the very same code as the gradient path
(:mod:`optax_lowrank.leaves`, :mod:`optax_lowrank.bases`): with equal
``projection``, ``seed``, ``where`` (and ``reshape``) and the same refresh
points, ``olr.low_rank`` and this module use identical bases for every leaf.
Use :func:`optimizer` to build the adapter-path twin of a ``low_rank`` chain
and :mod:`optax_lowrank.testing` to check the equivalence on your own model.

Memory: ``Λ`` and its optimizer state are coefficient-sized; the frozen base
``Θ0`` is full-size (and can be quantized, see ``olr.quantization`` and
``olr.quantized_merge``); no
full-size gradient of a projected leaf is needed if the forward pass is
written through the factors (``olr.nnx.LowRankLinear``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import bases as bases_lib
from optax_lowrank import leaves as leaves_lib
from optax_lowrank import projections as proj
from optax_lowrank import quantization, quantized_merge
from optax_lowrank import refresh as refresh_lib
from optax_lowrank import refresh_schedule as schedule_lib
from optax_lowrank.bases import project_back
from optax_lowrank.leaves import is_plan, map_plans

__all__ = [
    "Adapter",
    "init",
    "zeros",
    "materialize",
    "merge",
    "bases",
    "refresh_state",
    "decay_base",
    "optimizer",
    "projected_mask",
    "inner_params",
    "quantize_base",
]


@jax.tree_util.register_pytree_node_class
class Adapter:
  """A frozen base, the bases of its projected leaves, and how to rebuild them.

  Attributes:
    base: the frozen weights ``Θ0`` (a tree like the params).
    stored_bases: a tree like the params: the stored
      :class:`~optax_lowrank.bases.Basis` of projected leaves whose spec is
      stored, ``None`` elsewhere (random sketches are rebuilt from the key).
    key: uint32 ``(2,)`` base PRNG key (from ``seed``).
    refresh_index: int32 ``()``, number of merges so far.
    plans: static: the :class:`~optax_lowrank.leaves.LeafPlan` tree (which
      leaves are projected, how, by which spec).

  ``Adapter`` is a pytree (``plans`` is static), so it can be an argument of
  jitted functions and be checkpointed.
  """

  __slots__ = ("base", "stored_bases", "key", "refresh_index", "plans")

  def __init__(self, base, stored_bases, key, refresh_index, plans):
    self.base = base
    self.stored_bases = stored_bases
    self.key = key
    self.refresh_index = refresh_index
    self.plans = plans

  def tree_flatten(self):
    plan_leaves, plan_def = jax.tree.flatten(self.plans, is_leaf=is_plan)
    children = (self.base, self.stored_bases, self.key, self.refresh_index)
    return children, (tuple(plan_leaves), plan_def)

  @classmethod
  def tree_unflatten(cls, aux, children):
    plan_leaves, plan_def = aux
    return cls(*children, jax.tree.unflatten(plan_def, list(plan_leaves)))

  @property
  def projection(self) -> proj.Projection | None:
    """The projection spec this adapter was built with."""
    for p in jax.tree.leaves(self.plans, is_leaf=is_plan):
      if p.projected:
        return p.spec
    return None

  def __repr__(self) -> str:
    n = sum(p.projected for p in jax.tree.leaves(self.plans, is_leaf=is_plan))
    return f"Adapter(projection={self.projection}, projected_leaves={n}, " \
           f"refresh_index={self.refresh_index})"


def _check_spec(adapter: Adapter, projection: proj.Projection | None) -> None:
  if projection is not None and adapter.projection is not None and (
      projection != adapter.projection
  ):
    raise ValueError(
        f"this adapter was built with {adapter.projection}, not {projection}"
    )


def init(
    params: Any,
    projection: proj.Projection,
    seed: int = 0,
    where: Any = None,
    grads: Any = None,
    *,
    reshape: Any = None,
) -> Adapter:
  """Freeze ``params`` as ``Θ0`` and make the first basis of every projected leaf.

  Args:
    params: the weights to adapt (becomes ``Θ0``).
    projection: a spec such as ``olr.svd(128)``; same meaning as in ``low_rank``.
    seed: as in ``low_rank``: random bases depend on ``(seed, refresh, leaf)``.
    where: as in ``low_rank``.
    grads: the full gradient at ``params``; required for bases made from the
      gradient (SVD, randomized SVD, two-sided SVD, Tucker), ignored otherwise.
    reshape: as in ``low_rank``.

  Returns:
    An :class:`Adapter` at refresh index 0.

  Raises:
    ValueError: naming the leaf, if ``grads`` is needed and missing, or if
      ``where``/``reshape`` do not fit the params.
  """
  plans = leaves_lib.plan(params, projection, where, reshape)  # axis names read before unwrap
  params = leaves_lib.unwrap_variables(params)
  grads = leaves_lib.unwrap_variables(grads)
  key = jax.random.PRNGKey(seed)
  refresh_index = jnp.zeros([], jnp.int32)
  _require_grads(plans, grads, "init")
  stored = leaves_lib.make_bases(plans, key, refresh_index, grads, stored=True)
  return Adapter(params, stored, key, refresh_index, plans)


def _require_grads(plans, grads, fn: str) -> None:
  if grads is not None:
    return
  for p in jax.tree.leaves(plans, is_leaf=is_plan):
    if p.projected and p.spec.needs_grad:
      raise ValueError(
          f"leaf '{p.path}' of shape {p.shape}: {p.spec} is made from the gradient, so "
          f"adapters.{fn} needs `grads` (the full gradient at the current weights)"
      )


def bases(adapter: Adapter) -> Any:
  """Every projected leaf's current basis (random ones rebuilt from the key)."""
  return leaves_lib.current_bases(
      adapter.plans, adapter.stored_bases, adapter.key, adapter.refresh_index
  )


def zeros(adapter: Adapter) -> Any:
  """The trainable ``Λ``, all zeros: coefficient-shaped at projected leaves.

  Non-projected leaves get a full-size zero delta (``S = I``).  Coefficients
  are float32 for low-precision leaves (as in the gradient path).
  """
  return leaves_lib.coefficient_zeros(adapter.plans)


def _check_lam(adapter: Adapter, lam: Any) -> None:
  plan_def = jax.tree.structure(adapter.plans, is_leaf=is_plan)
  lam_def = jax.tree.structure(lam)
  if lam_def != plan_def:
    raise ValueError(
        f"Λ does not match the adapter: got structure\n  {lam_def}\nexpected\n  {plan_def}"
    )

  def check(p, x):
    if tuple(x.shape) != p.coefficient_shape:
      raise ValueError(
          f"leaf '{p.path}' of shape {p.shape}: Λ has shape {tuple(x.shape)}, expected "
          f"{p.coefficient_shape} for {p.spec or 'an unprojected leaf'}"
      )

  map_plans(check, adapter.plans, lam)


def materialize(adapter: Adapter, lam: Any, projection: proj.Projection | None = None) -> Any:
  """The effective weights ``Θ0 + SᵀΛ`` (in the base's dtypes).

  Args:
    adapter: from :func:`init` or :func:`merge`.
    lam: a tree like :func:`zeros` returns.
    projection: optional; if given, it must be the spec the adapter was built
      with (guards against mixing adapters).

  Cost: one back-projection per projected leaf (``2·m·n·r`` FLOPs one-sided).
  Differentiating through it gives ``∂L/∂Λ = S ∂L/∂Θ``, but forms the
  full-size gradient of ``Θ``; ``olr.nnx.LowRankLinear`` avoids that.
  """
  _check_spec(adapter, projection)
  _check_lam(adapter, lam)
  current = bases(adapter)
  base = dequantized_base(adapter)

  def one(p, w0, x, b):
    delta = project_back(b, x) if p.projected else x
    return (w0 + delta.astype(w0.dtype)).astype(w0.dtype)

  return map_plans(one, adapter.plans, base, lam, current)


def dequantized_base(adapter: Adapter) -> Any:
  """``Θ0`` as arrays (dequantizing leaves stored in a quantized format)."""
  return map_plans(lambda p, w: dequantize_leaf(w), adapter.plans, adapter.base)


def dequantize_leaf(w: Any) -> jax.Array:
  """A base leaf as an array: dequantized if it is stored quantized."""
  if isinstance(w, quantization.QuantizedArray):
    return quantization.dequantize(w)
  return w


def merge(
    adapter: Adapter,
    lam: Any,
    grads: Any = None,
    projection: proj.Projection | None = None,
    *,
    due: Any = None,
) -> tuple[Adapter, Any]:
  """Refresh: ``Θ0 ← Θ0 + SᵀΛ``, make the next basis, ``Λ ← 0``.

  Args:
    adapter, lam: the current adapter and coefficients.
    grads: the full gradient at the merged weights; required for gradient-made
      bases (SVD family, Tucker), ignored otherwise.
    projection: optional guard, as in :func:`materialize`.
    due: which matrices to merge, for a staggered or lazy refresh schedule:
      ``olr.refresh_schedule.due(...)`` (bools, ``batch_shape`` per projected
      leaf), as ``low_rank(..., refresh_schedule=...)`` refreshes them; the
      other matrices keep their basis and their ``Λ``.  ``None``: all.
      Tracking specs (``olr.subspace_iteration``) start from the current basis.

  Returns:
    ``(new_adapter, zeros(new_adapter))``.  The inner optimizer state of ``Λ``
    is not touched here: apply the refresh policy with :func:`refresh_state`.
  """
  _check_spec(adapter, projection)
  grads = leaves_lib.unwrap_variables(grads)
  _require_grads(adapter.plans, grads, "merge")
  refresh_index = adapter.refresh_index + 1
  spec = adapter.projection
  if due is None and not (spec is not None and spec.tracks):
    folded = lam
    stored = leaves_lib.make_bases(adapter.plans, adapter.key, refresh_index, grads, stored=True)
    kept = None
  else:  # fold in and restart only the due matrices' Λ (see olr.refresh_schedule)
    def split(p, x, d):
      if not p.projected or d is None:
        return x, jnp.zeros_like(x)
      d = d.reshape(d.shape + (1,) * (x.ndim - d.ndim))
      return jnp.where(d, x, 0), jnp.where(d, 0, x)

    due_tree = due if due is not None else map_plans(lambda p: None, adapter.plans)
    pairs = map_plans(split, adapter.plans, lam, due_tree)
    folded = map_plans(lambda p, x: x[0], adapter.plans, pairs)
    kept = map_plans(lambda p, x: x[1], adapter.plans, pairs)
    stored, _ = schedule_lib.make_bases(adapter.plans, adapter.key, refresh_index, grads,
                                        previous=adapter.stored_bases, due_tree=due)
  new = Adapter(_merged_base(adapter, folded, refresh_index), stored, adapter.key,
                refresh_index, adapter.plans)
  return new, zeros(new) if kept is None else kept


def _merged_base(adapter: Adapter, lam: Any, refresh_index: jax.Array) -> Any:
  """``Θ0 + SᵀΛ`` written back into the base, leaf by leaf (and layer by layer).

  Float leaves keep their dtype; quantized leaves follow their merge rule
  (olr.quantized_merge.merge_update), which needs the basis Λ lived in;
  stochastic rounding is keyed by (seed, merge index, leaf), so a resumed run
  rounds exactly as the original one.  A stacked leaf (``(L, m, n)`` kernels
  of a scanned model, one matrix basis per layer) merges layer by layer
  (``jax.lax.fori_loop``, in place): one layer's float copy exists at a time, not the
  stack's.
  """
  seed = quantization.mix_seed(adapter.key, refresh_index)
  index = iter(range(1 << 30))  # quantized leaves in flattening order, as merge_tree

  def one(p, w, x, b):
    quantized = isinstance(w, quantization.QuantizedArray)
    leaf_seed = quantization.mix_seed(seed, next(index)) if quantized else None
    if _by_layer(p, w, b):
      return _merge_layers(p, w, x, b, leaf_seed)
    w0 = dequantize_leaf(w)
    merged = (w0 + (project_back(b, x) if p.projected else x).astype(w0.dtype)).astype(w0.dtype)
    if quantized:
      return quantized_merge.merge_update(w, merged, seed=leaf_seed, basis=b)
    return merged

  return map_plans(one, adapter.plans, adapter.base, lam, bases(adapter))


def _by_layer(p, w, b) -> bool:
  """A stacked leaf whose layers are matrices with their own basis (and whole blocks)."""
  if not (p.projected and p.batch_shape and b is not None and b.perm is None
          and tuple(p.shape) == tuple(p.batch_shape) + tuple(b.view_shape)):
    return False
  layers = math.prod(p.batch_shape)
  return (not isinstance(w, quantization.QuantizedArray)
          or quantization.splits_into_layers(w, layers))


def _merge_layers(p, w, x, b, leaf_seed):
  """:func:`_merged_base` of one stacked leaf, one layer per step of a ``fori_loop``."""
  nb, layers, view = len(p.batch_shape), math.prod(p.batch_shape), tuple(b.view_shape)
  per_layer = math.prod(view)
  factors = [None if u is None else u.reshape((layers, *u.shape[nb:])) for u in b.factors]
  lam = x.reshape((layers, *x.shape[nb:]))
  quantized = isinstance(w, quantization.QuantizedArray)
  stack = quantization.layer_slices(w, layers, view) if quantized else w.reshape(layers, *view)

  def layer(i, w_i, lam_i, factors_i):
    basis = bases_lib.Basis(factors_i, view, view)
    w0 = dequantize_leaf(w_i)
    merged = (w0 + project_back(basis, lam_i).astype(w0.dtype)).astype(w0.dtype)
    if not quantized:
      return merged
    offset = jnp.asarray(i).astype(jnp.uint32) * jnp.uint32(per_layer)
    return quantized_merge.merge_update(w_i, merged, seed=leaf_seed, basis=basis,
                                        element_offset=offset)

  at = lambda tree, i: jax.tree.map(lambda v: v[i], tree)
  if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((w, x, b))):
    # layer i read from and written back into the stack: in place when it is donated
    def body(i, stack):
      new = layer(i, at(stack, i), at(lam, i), at(factors, i))
      return jax.tree.map(lambda v, n: jax.lax.dynamic_update_index_in_dim(v, n, i, 0),
                          stack, new)

    out = jax.lax.fori_loop(0, layers, body, stack)
  else:  # eagerly, op by op as a whole-leaf merge runs (the same roundings), a layer at a time
    outs = [layer(i, at(stack, i), at(lam, i), at(factors, i)) for i in range(layers)]
    out = jax.tree.map(lambda *v: jnp.stack(v), *outs)
  return quantization.join_layers(out, tuple(p.shape)) if quantized else out.reshape(p.shape)


def refresh_state(
    on_refresh: str,
    inner: optax.GradientTransformation,
    inner_state: optax.OptState,
    old: Adapter,
    new: Adapter,
    *,
    due: Any = None,
) -> optax.OptState:
  """Apply a refresh policy (``"keep"``, ``"reset"``, ``"transport"``) after :func:`merge`.

  The same function ``olr.low_rank`` applies at its refreshes, so both paths
  treat the inner statistics identically.  ``due``: as given to :func:`merge`
  (only the due matrices' statistics change).
  """
  refresh_lib.check_policy(on_refresh)
  return refresh_lib.apply_policy(on_refresh, inner, inner_state, old.plans, bases(old),
                                  bases(new), due)


def inner_params(adapter: Adapter, lam: Any, track_coefficients: bool = True) -> Any:
  """The ``params`` the inner optimizer sees, as ``olr.low_rank`` gives them.

  ``Λ`` at projected leaves (zeros when ``track_coefficients`` is False) and the
  effective weight ``Θ0 + Λ`` at unprojected ones, so that weight-dependent
  transformations (weight decay) act identically on both paths.
  """
  eff = materialize(adapter, lam)
  return map_plans(
      lambda p, x, w: (x if track_coefficients else jnp.zeros_like(x)) if p.projected else w,
      adapter.plans, lam, eff,
  )


def projected_mask(adapter: Adapter) -> Any:
  """A tree of bools like ``Λ``: True at projected leaves."""
  return map_plans(lambda p: p.projected, adapter.plans)


def optimizer(
    inner: optax.GradientTransformation,
    adapter: Adapter,
    scale: float | jax.Array = 1.0,
) -> optax.GradientTransformation:
  """The adapter-path twin of ``olr.low_rank(inner, ..., scale=scale)``.

  ``inner`` followed by ``α = scale`` on the projected leaves' coefficients
  only (``low_rank`` applies ``α`` to projected leaves only).  Chain whatever
  followed ``low_rank`` (learning rate, ...) after it.
  """
  mask = projected_mask(adapter)
  return optax.chain(inner, optax.masked(optax.scale(scale), mask))


def quantize_base(
    adapter: Adapter,
    format: str = "int8",
    block_size: int = 256,
    rule: quantized_merge.MergeRule | None = quantized_merge.DEFAULT_MERGE_RULE,
) -> Adapter:
  """Store the frozen base of every projected leaf block-wise quantized.

  ``"int8"`` (absmax per block: error ≤ absmax/254 per element, almost free in
  Table 2 of Torroba-Hennigen et al. 2025, arXiv:2502.13811) or ``"nf4"`` (16
  NormalFloat levels, 4 bits per element: error ≤ 0.152·absmax, a visible
  penalty there).  ``materialize`` and
  ``olr.nnx.LowRankLinear`` dequantize on the fly; ``merge`` writes the
  merged base back by ``rule`` (a :class:`~optax_lowrank.quantized_merge.MergeRule`:
  how small updates survive the rounding; ``None`` stores plain
  :class:`~optax_lowrank.quantization.QuantizedArray` leaves that every merge
  re-quantizes from scratch); see the how-to "Training on a quantized base".
  Unprojected leaves stay as they are (they are trained).  A block size that
  does not divide a leaf pads its last block.

  Raises:
    ValueError: an unknown format, a block size ≤ 0, or non-finite values in a
      base leaf (naming the leaf path and shape).
  """
  where = projected_mask(adapter)
  if rule is None:
    base = quantization.quantize_tree(adapter.base, format, block_size, where=where)
  else:
    base = quantized_merge.quantize_base_tree(adapter.base, format, block_size, where=where,
                                              rule=rule)
  return Adapter(base, adapter.stored_bases, adapter.key, adapter.refresh_index, adapter.plans)


def decay_base(adapter: Adapter, lam: Any, rate: float | jax.Array) -> Adapter:
  """Gradient-view weight decay on the adapter path: ``Θ0 ← Θ0 − rate·(Θ0 + SᵀΛ)``.

  Decoupled weight decay of the full weights (``optax.add_decayed_weights``
  outside ``low_rank`` with learning rate ``η``: ``rate = η·λ_wd``) acts on the
  effective weight ``Θ = Θ0 + SᵀΛ``; on the adapter path it can only act on the
  frozen base.  Apply it with the *pre-update* ``Λ`` of the step, then apply
  the ``Λ`` update: the weights then match the gradient path exactly
  (Torroba-Hennigen et al. 2025, arXiv:2502.13811, App. B).
  """
  if _has_quantized(adapter.base):
    raise ValueError("decay_base needs an unquantized base (it rewrites Θ0 every step)")
  effective = materialize(adapter, lam)
  base = jax.tree.map(lambda w0, w: (w0 - rate * w).astype(w0.dtype), adapter.base, effective)
  return Adapter(base, adapter.stored_bases, adapter.key, adapter.refresh_index, adapter.plans)


def _has_quantized(tree: Any) -> bool:
  return any(isinstance(x, quantization.QuantizedArray)
             for x in jax.tree.leaves(tree,
                                      is_leaf=lambda x: isinstance(x, quantization.QuantizedArray)))
