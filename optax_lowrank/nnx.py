"""The adapter path in Flax NNX: linear layers that train only ``Λ``.

:class:`LowRankLinear` computes ``y = x·W0 + x·(SᵀΛ)`` *through the factors*:

* left basis ``U`` (``W = W0 + U Λ``, ``Λ ∈ R^{r×n}``):   ``x·W0 + (x U) Λ``
* right basis ``V`` (``W = W0 + Λ Vᵀ``, ``Λ ∈ R^{m×r}``): ``x·W0 + (x Λ) Vᵀ``
* two-sided (``W = W0 + U Λ Vᵀ``):                       ``x·W0 + ((x U) Λ) Vᵀ``

``W0`` and the factors are frozen :class:`Frozen` variables (not
``nnx.Param``), so ``nnx.grad(..., wrt=nnx.Param)`` and
``nnx.Optimizer(..., wrt=nnx.Param)`` see only ``Λ`` (and whatever other
parameters the model has).  Back-propagation then gives
``dΛ = (x U)ᵀ (dy V)`` with ``O(tokens·(m + n)·r)`` work and never forms the
``m×n`` gradient of ``W`` — the memory advantage of the adapter path (paper
004, App. B: project activations instead of the dense gradient).

The bases come from an :class:`~optax_lowrank.adapters.Adapter` built on the
model's parameters, so they are the very bases ``olr.low_rank`` would use on
the same model with the same projection, seed and ``where``: training the
converted model with ``inner`` follows the gradient path's trajectory.

Workflow::

    params = nnx.state(model, nnx.Param)
    adapter = olr.adapters.init(params, olr.gaussian(8), where=...)
    olr.nnx.to_low_rank(model, adapter)          # swaps the projected nnx.Linear layers
    opt = nnx.Optimizer(model, olr.nnx.optimizer(optax.adam(1e-3), scale), wrt=nnx.Param)
    ...
    adapter = olr.nnx.refresh_adapter(model, adapter)   # every refresh_every steps

With a basis made from the gradient (``olr.svd``), the refresh needs the full
weight gradient, which training through the factors never forms:
``olr.nnx.refresh_adapter(model, adapter, grads=olr.nnx.full_weight_grad(loss_fn,
model, batch))``.  ``olr.nnx.merge`` is the former name of ``refresh_adapter``
(it clashes with ``flax.nnx.merge``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from optax_lowrank import adapters as adapters_lib
from optax_lowrank import leaves as leaves_lib
from optax_lowrank import quantization
from optax_lowrank.leaves import is_plan, map_plans

__all__ = ["Frozen", "LowRankLinear", "dense_weight", "full_weight_grad", "lam_mask", "merge",
           "optimizer", "refresh_adapter", "to_dense", "to_low_rank"]


class Frozen(nnx.Variable):
  """A non-trainable variable: the frozen base ``W0`` and the basis factors."""


class LowRankLinear(nnx.Module):
  """A linear layer ``x ↦ x·(W0 + SᵀΛ) + b`` evaluated through the factors.

  Attributes:
    base: :class:`Frozen` ``W0`` of shape ``(in, out)`` (may hold a quantized
      array, dequantized on the fly in the forward pass and again in the
      backward pass, so that no layer's float ``W0`` is kept in between).
    left: :class:`Frozen` ``U`` of shape ``(in, r_l)`` or ``None``.
    right: :class:`Frozen` ``V`` of shape ``(out, r_r)`` or ``None``.
    lam: ``nnx.Param`` ``Λ``, the only trainable weight of the layer.
    bias: ``nnx.Param`` of shape ``(out,)`` or ``None`` (trained as usual).
    path: the kernel's path in the adapter (to find it again at ``merge``).
  """

  def __init__(self, base, left, right, lam, bias=None, *, path: str = ""):
    self.base = Frozen(base)
    self.left = None if left is None else Frozen(left)
    self.right = None if right is None else Frozen(right)
    self.lam = nnx.Param(lam)
    self.bias = None if bias is None else nnx.Param(bias)
    self.path = path

  evaluation: str = "auto"
  """How the forward and backward passes are computed (a class default; set it
  on an instance to override): ``"factors"`` (``x·W0 + ((x U) Λ) Vᵀ``),
  ``"merged"`` (``x·(W0 + U Λ Vᵀ)`` with the sum formed on the fly in the
  forward pass and formed again in the backward pass, never kept; ``dΛ`` still
  from the factors, ``(x U)ᵀ (dy V)``) or ``"auto"``: whichever
  :meth:`flops` counts cheaper for the call's number of tokens."""

  def __call__(self, x: jax.Array) -> jax.Array:
    base = self.base.get_value()
    lam = self.lam.get_value()
    left = None if self.left is None else self.left.get_value()
    right = None if self.right is None else self.right.get_value()
    if self._merged(x, base, left, right):
      y = _merged_matmul(x, base, left, lam, right)
    else:
      if isinstance(base, quantization.QuantizedArray):
        y = _dequantized_matmul(x, base)
      else:
        y = x @ base.astype(x.dtype)
      t = x.astype(jnp.promote_types(x.dtype, lam.dtype))
      if left is not None:
        t = t @ left
      t = t @ lam
      if right is not None:
        t = t @ right.T
      y = y + t.astype(y.dtype)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(y.dtype)
    return y

  def _merged(self, x, base, left, right) -> bool:
    if self.evaluation not in ("auto", "factors", "merged"):
      raise ValueError(f"LowRankLinear '{self.path}': evaluation must be 'auto', 'factors' or "
                       f"'merged', got {self.evaluation!r}")
    if self.evaluation != "auto":
      return self.evaluation == "merged"
    m, n = base.shape[-2:]
    tokens = x.size // max(x.shape[-1], 1)
    cost = self.flops(tokens, m, n, None if left is None else left.shape[-1],
                      None if right is None else right.shape[-1])
    return cost["merged"] < cost["factors"]

  @staticmethod
  def flops(tokens: int, m: int, n: int, left_rank: int | None, right_rank: int | None
            ) -> dict[str, int]:
    """Multiply-add FLOPs (×2) of one forward + backward pass of the layer.

    For ``tokens`` rows of input, an ``m×n`` base and ranks ``r_l`` (left
    basis ``U``, ``m×r_l``) and ``r_r`` (right basis ``V``, ``n×r_r``), with
    ``Λ`` of shape ``a×b`` (``a = r_l`` or ``m``, ``b = r_r`` or ``n``):

    * ``"dense"`` (an ``nnx.Linear`` trained in full): ``6·T·m·n``;
    * ``"factors"``: ``4·T·m·n`` (``x·W0`` and ``dy·W0ᵀ``; no weight
      gradient) ``+ 4·T·m·r_l + 6·T·a·b + 4·T·r_r·n``;
    * ``"merged"``: ``4·T·m·n + 2·F`` (``F``: forming ``U Λ Vᵀ``, twice)
      ``+ 2·T·m·r_l + 2·T·n·r_r + 2·T·a·b`` (``dΛ = (x U)ᵀ (dy V)``).

    ``"merged"`` wins when tokens are many against ``m·n / (m + n)``
    (training batches of thousands of tokens on layers of a few hundred
    features); ``"factors"`` when tokens are few against the layer's size.
    """
    t = int(tokens)
    a = m if left_rank is None else left_rank
    b = n if right_rank is None else right_rank
    ul = 0 if left_rank is None else 2 * t * m * left_rank
    vr = 0 if right_rank is None else 2 * t * n * right_rank
    ab = 2 * t * a * b
    if left_rank is not None and right_rank is not None:
      form = 2 * m * left_rank * right_rank + 2 * m * right_rank * n
    else:
      form = 2 * m * n * (left_rank if left_rank is not None else right_rank or 0)
    base = 2 * t * m * n
    return {"dense": 3 * base, "factors": 2 * base + 2 * ul + 3 * ab + 2 * vr,
            "merged": 2 * base + 2 * form + ul + vr + ab}


def _matmul(x: jax.Array, q: quantization.QuantizedArray) -> jax.Array:
  return x @ quantization.dequantize(quantization.tie(q, x)).astype(x.dtype)


@jax.custom_vjp
def _dequantized_matmul(x: jax.Array, q: quantization.QuantizedArray) -> jax.Array:
  """``x @ dequantize(q)`` whose backward pass keeps ``q``, not the float ``W``.

  Plain autodiff saves the dequantized ``W`` of every layer as the residual of
  ``dx = dy·Wᵀ``, so the float weights of all layers are alive together from
  the forward to the backward pass, and a quantized base costs more memory at
  the peak than a float one.  Here the residual is ``q`` itself (an argument
  of the step, held anyway) and the backward dequantizes it again; each
  dequantization is tied to its layer's input (forward) or cotangent
  (backward) by :func:`~optax_lowrank.quantization.tie`, so only the weights of the layer being
  computed are materialised.  ``W0`` is frozen: it gets no cotangent.  As any
  ``custom_vjp``, this supports reverse-mode autodiff only (no ``jax.jvp``).
  """
  return _matmul(x, q)


def _dequantized_matmul_fwd(x, q):
  return _matmul(x, q), q


def _dequantized_matmul_bwd(q, dy):
  w = quantization.dequantize(quantization.tie(q, dy)).astype(dy.dtype)
  return dy @ w.T, None


_dequantized_matmul.defvjp(_dequantized_matmul_fwd, _dequantized_matmul_bwd)


def _delta(left, lam, right, dtype):
  """``U Λ Vᵀ`` (absent factors skipped) in ``dtype``."""
  d = lam.astype(dtype)
  if left is not None:
    d = left.astype(dtype) @ d
  if right is not None:
    d = d @ right.astype(dtype).T
  return d


def _weight(base, left, lam, right, dtype, tie_to):
  """``W0 + U Λ Vᵀ`` in ``dtype``, formed after ``tie_to`` exists (not shared)."""
  ct = jnp.promote_types(dtype, lam.dtype)
  lam = quantization.tie(lam, tie_to)  # Λ too: the weight is formed after tie_to exists
  if isinstance(base, quantization.QuantizedArray):
    base = quantization.dequantize(quantization.tie(base, tie_to))
  return (base.astype(ct) + _delta(left, lam, right, ct)).astype(dtype)


@jax.custom_vjp
def _merged_matmul(x, base, left, lam, right):
  """``x·(W0 + U Λ Vᵀ)`` whose backward pass forms the weight again, never keeps it.

  The residuals are the layer's input and its (frozen, maybe quantized) base,
  factors and ``Λ``: arguments of the step, held anyway.  The backward pass
  computes ``dx = dy·Wᵀ`` with ``W`` formed again and ``dΛ = (x U)ᵀ (dy V)``
  through the factors: no ``m×n`` gradient is needed for ``Λ``.  Cotangents
  of the frozen base and factors are computed from ``dW = xᵀ dy`` (correct if
  asked for; under ``jax.jit`` XLA removes them when the step does not use
  them); a quantized base gets none.  Reverse-mode only, as any
  ``custom_vjp``.
  """
  return x @ _weight(base, left, lam, right, x.dtype, x)


def _merged_matmul_fwd(x, base, left, lam, right):
  return _merged_matmul(x, base, left, lam, right), (x, base, left, lam, right)


def _merged_matmul_bwd(res, dy):
  x, base, left, lam, right = res
  dx = dy @ _weight(base, left, lam, right, dy.dtype, dy).T
  ct = jnp.promote_types(x.dtype, lam.dtype)
  a = x.astype(ct) if left is None else x.astype(ct) @ left.astype(ct)
  b = dy.astype(ct) if right is None else dy.astype(ct) @ right.astype(ct)
  rows = tuple(range(x.ndim - 1))
  dlam = jnp.tensordot(a, b, axes=(rows, rows)).astype(lam.dtype)
  dw = jnp.tensordot(x.astype(ct), dy.astype(ct), axes=(rows, rows))  # for frozen parts only
  dbase = None if isinstance(base, quantization.QuantizedArray) else dw.astype(base.dtype)
  dleft = dright = None
  if left is not None:
    dleft = (dw @ _delta(None, lam, right, ct).T).astype(left.dtype)
  if right is not None:
    dright = (dw.T @ _delta(left, lam, None, ct)).astype(right.dtype)
  return dx.astype(x.dtype), dbase, dleft, dlam, dright


_merged_matmul.defvjp(_merged_matmul_fwd, _merged_matmul_bwd)


def _kernel_paths(adapter: adapters_lib.Adapter) -> dict[str, Any]:
  """Projected leaves by module path (the kernel's path without 'kernel')."""
  out = {}
  for p in jax.tree.leaves(adapter.plans, is_leaf=is_plan):
    if not p.projected:
      continue
    parts = p.path.split("/")
    if parts[-1] != "kernel":
      continue
    out["/".join(parts[:-1])] = p
  return out


def _set_child(model: nnx.Module, path: tuple, new: Any) -> None:
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  last = path[-1]
  if isinstance(last, int):
    parent[last] = new
  else:
    setattr(parent, last, new)


def to_low_rank(model: nnx.Module, adapter: adapters_lib.Adapter) -> nnx.Module:
  """Replace (in place) every ``nnx.Linear`` whose kernel the adapter projects.

  Args:
    model: an NNX model; its parameters are the tree ``adapter`` was built on
      (``nnx.state(model, nnx.Param)``).
    adapter: from ``olr.adapters.init``; its projection must be a matrix
      projection (one-sided or two-sided) of 2-D kernels, or of the stacked
      ``(layers, in, out)`` kernels of a scanned model with the reshape rule
      ``((0,), (1,), (2,))``: the layer then holds stacked ``W0``, factors and
      ``Λ``, and ``nnx.scan`` hands each step one layer's slices.

  Returns:
    ``model`` (modified in place), for chaining.

  Raises:
    ValueError: if a projected kernel uses a reshape rule or a non-matrix spec,
      or if no layer was converted.
  """
  targets = _kernel_paths(adapter)
  current = adapters_lib.bases(adapter)
  by_path = {}
  map_plans(lambda p, b, w0: by_path.__setitem__(p.path, (b, w0)), adapter.plans, current,
            adapter.base)
  converted = 0
  for path, module in list(nnx.iter_modules(model)):
    key = "/".join(str(k) for k in path)
    if key not in targets or not isinstance(module, nnx.Linear):
      continue
    plan = targets[key]
    if (plan.spec.view != "matrix" or plan.perm is not None
        or len(plan.shape) != 2 + len(plan.batch_shape)):
      raise ValueError(
          f"leaf '{plan.path}' of shape {plan.shape}: LowRankLinear needs a matrix projection "
          "of a 2-D kernel, or of a stacked (layers, in, out) kernel with the rule "
          "((0,), (1,), (2,)); no other reshape rule"
      )
    basis, base = by_path[plan.path]  # the adapter's base: possibly quantized
    base = _layer_major(base, plan)
    left, right = basis.factors
    bias = None if module.bias is None else module.bias.get_value()
    lam = jnp.zeros(plan.coefficient_shape, plan.coefficient_dtype)
    _set_child(model, path, LowRankLinear(base, left, right, lam, bias, path=plan.path))
    converted += 1
  if not converted:
    raise ValueError("the adapter projects no nnx.Linear kernel of this model")
  return model


def _layer_major(base: Any, plan) -> Any:
  """A stacked leaf's quantized base with a leading layer axis on every array.

  ``olr.adapters.quantize_base`` stores a stacked ``(L, m, n)`` kernel as one
  flat block-wise code array.  When a layer's ``m·n`` elements fill whole
  blocks, the first ``1/L`` of every array (codes, scales, packed residuals)
  belongs to layer 0, the next to layer 1, and so on, so reshaping each array
  to ``(L, -1)`` and giving it the per-layer shape is exactly the per-layer
  quantization — which ``nnx.scan`` can then slice layer by layer.  Float
  bases need nothing (their leading axis is the layer axis already).
  """
  if not plan.batch_shape or not isinstance(base, quantization.QuantizedArray):
    return base
  if not quantization.splits_into_layers(base, math.prod(plan.batch_shape)):
    per_layer = math.prod(plan.shape) // math.prod(plan.batch_shape)
    raise ValueError(
        f"leaf '{plan.path}' of shape {plan.shape}: a stacked quantized base needs each "
        f"layer's {per_layer} elements to fill whole blocks of block_size {base.block_size}"
    )
  return quantization.layer_slices(base, plan.batch_shape, plan.shape[len(plan.batch_shape):])


def _flat(base: Any, plan) -> Any:
  """Inverse of :func:`_layer_major`: the adapter's flat storage of a stacked base."""
  if not plan.batch_shape or not isinstance(base, quantization.QuantizedArray):
    return base
  return quantization.join_layers(base, plan.shape)


def _layers(model: nnx.Module) -> dict[str, LowRankLinear]:
  return {m.path: m for _, m in nnx.iter_modules(model) if isinstance(m, LowRankLinear)}


def dense_weight(layer: LowRankLinear) -> jax.Array:
  """The layer's full weight ``W0 + U Λ Vᵀ`` (``(in, out)``, or ``(layers, in, out)``).

  A quantized ``W0`` is dequantized; the result has ``W0``'s float dtype.
  """
  base = layer.base.get_value()
  lam = layer.lam.get_value()
  if isinstance(base, quantization.QuantizedArray):
    dequantize = quantization.dequantize
    for _ in range(lam.ndim - 2):  # a stacked base is layer-major (see to_low_rank)
      dequantize = jax.vmap(dequantize)
    base = dequantize(base)
  ct = jnp.promote_types(base.dtype, lam.dtype)
  d = lam.astype(ct)
  if layer.left is not None:
    d = jnp.matmul(layer.left.get_value().astype(ct), d)
  if layer.right is not None:
    d = jnp.matmul(d, jnp.swapaxes(layer.right.get_value().astype(ct), -1, -2))
  return (base.astype(ct) + d).astype(base.dtype)


def to_dense(model: nnx.Module) -> nnx.Module:
  """A copy of a converted model with every :class:`LowRankLinear` an ``nnx.Linear`` again.

  Each kernel is the layer's :func:`dense_weight` (stacked kernels stay
  stacked), its bias the layer's; ``model`` itself is not changed.  Its
  ``nnx.state(copy, nnx.Param)`` has the structure of the params the adapter
  was built on, so the copy serves evaluation, export, and the full weight
  gradient an SVD refresh needs (:func:`full_weight_grad`).
  """
  dense = nnx.clone(model)
  for path, module in list(nnx.iter_modules(dense)):
    if not isinstance(module, LowRankLinear):
      continue
    w = dense_weight(module)
    bias = None if module.bias is None else module.bias.get_value()
    linear = nnx.Linear(w.shape[-2], w.shape[-1], use_bias=bias is not None,
                        dtype=None, param_dtype=w.dtype,
                        kernel_init=nnx.initializers.zeros_init(),
                        bias_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
    linear.kernel.set_value(w)
    if bias is not None:
      linear.bias.set_value(bias)
    _set_child(dense, path, linear)
  return dense


def full_weight_grad(loss_fn: Any, model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
  """``∂loss/∂W`` at the effective weights ``W = W0 + SᵀΛ`` of a converted model.

  ``nnx.grad(loss_fn)(model)`` of a converted model holds ``∂loss/∂Λ`` (the
  point of the adapter path: the full-size gradient is never formed).  A
  refresh with a basis made from the gradient (``olr.svd``,
  ``olr.randomized_svd``, two-sided SVD, Tucker) needs the full one, once per
  refresh: this computes it on :func:`to_dense` of the model, as
  ``nnx.grad(loss_fn)(dense, *args, **kwargs)``, in the structure of the
  params the adapter was built on, ready for
  ``olr.nnx.refresh_adapter(model, adapter, grads=...)``.  It costs one
  ordinary backward pass with full-size kernel gradients.
  """
  return nnx.grad(loss_fn)(to_dense(model), *args, **kwargs)


def refresh_adapter(model: nnx.Module, adapter: adapters_lib.Adapter, grads: Any = None
                    ) -> adapters_lib.Adapter:
  """Refresh every :class:`LowRankLinear`: ``W0 ← W0 + SᵀΛ``, next basis, ``Λ ← 0``.

  ``olr.adapters.merge`` for a converted model (also available as
  :func:`merge`, its former name, which ``from flax.nnx import merge``
  shadows or is shadowed by).

  Args:
    model: a model converted by :func:`to_low_rank` with this adapter.
    adapter: the adapter of the current refresh.
    grads: full gradients at the current weights (a tree like the params the
      adapter was built on: :func:`full_weight_grad`); needed only for bases
      made from the gradient.

  Returns:
    The next adapter; the model's layers are updated in place.

  Raises:
    ValueError: ``grads`` that are not a tree like the adapter's params (for
      example the gradient of the converted model, which holds ``Λ``).
  """
  if grads is not None:
    _check_full_grads(adapter, grads)
  layers = _layers(model)
  lam = map_plans(
      lambda p: layers[p.path].lam.get_value() if p.path in layers
      else jnp.zeros(p.coefficient_shape, p.coefficient_dtype),
      adapter.plans,
  )
  base = map_plans(
      lambda p, w: _flat(layers[p.path].base.get_value(), p) if p.path in layers else w,
      adapter.plans, adapter.base,
  )
  current = adapters_lib.Adapter(base, adapter.stored_bases, adapter.key, adapter.refresh_index,
                                 adapter.plans)
  new, lam0 = adapters_lib.merge(current, lam, grads)
  fresh = adapters_lib.bases(new)

  def write(p, w0, b, z):
    if p.path in layers:
      layer = layers[p.path]
      layer.base.set_value(_layer_major(w0, p))
      left, right = b.factors
      if layer.left is not None:
        layer.left.set_value(left)
      if layer.right is not None:
        layer.right.set_value(right)
      layer.lam.set_value(z)

  map_plans(write, new.plans, new.base, fresh, lam0)
  return new


merge = refresh_adapter
"""Alias of :func:`refresh_adapter` (its first name, kept for existing code)."""


def _check_full_grads(adapter: adapters_lib.Adapter, grads: Any) -> None:
  plan_leaves, plan_def = jax.tree.flatten(adapter.plans, is_leaf=is_plan)
  grads = leaves_lib.unwrap_variables(grads)
  grads_def = jax.tree.structure(grads)
  hint = ("`grads` must be the gradient of the full weights, a tree like the params the "
          "adapter was built on; the gradient of a converted model holds Λ instead of the "
          "kernels: use olr.nnx.full_weight_grad(loss_fn, model, ...)")
  if grads_def != plan_def:
    raise ValueError(f"{hint}; got structure\n  {grads_def}\nexpected\n  {plan_def}")
  for p, g in zip(plan_leaves, jax.tree.leaves(grads)):
    if tuple(jnp.shape(g)) != p.shape:
      raise ValueError(f"{hint}; leaf '{p.path}' has shape {tuple(jnp.shape(g))}, "
                       f"expected {p.shape}")


def lam_mask(tree: Any) -> Any:
  """Bools like ``tree`` (an NNX state): True at the ``lam`` of low-rank layers."""
  def is_lam(path, _):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if n != "value"]
    return bool(names) and names[-1] == "lam"

  return jax.tree_util.tree_map_with_path(is_lam, tree)


def optimizer(inner: optax.GradientTransformation, scale: float = 1.0
              ) -> optax.GradientTransformation:
  """``inner`` then ``α = scale`` on the ``Λ`` of low-rank layers only.

  The NNX twin of ``olr.low_rank(inner, ..., scale=scale)``: chain the
  learning rate and anything that followed ``low_rank`` after it.
  """
  return optax.chain(inner, optax.masked(optax.scale(scale), lam_mask))
