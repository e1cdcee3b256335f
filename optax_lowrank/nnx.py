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
    adapter = olr.nnx.merge(model, adapter)     # every refresh_every steps
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from optax_lowrank import adapters as adapters_lib
from optax_lowrank import quantization
from optax_lowrank.leaves import is_plan, map_plans

__all__ = ["Frozen", "LowRankLinear", "to_low_rank", "merge", "optimizer", "lam_mask"]


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

  def __call__(self, x: jax.Array) -> jax.Array:
    base = self.base.get_value()
    if isinstance(base, quantization.QuantizedArray):
      y = _dequantized_matmul(x, base)
    else:
      y = x @ base.astype(x.dtype)
    lam = self.lam.get_value()
    t = x.astype(jnp.promote_types(x.dtype, lam.dtype))
    if self.left is not None:
      t = t @ self.left.get_value()
    t = t @ lam
    if self.right is not None:
      t = t @ self.right.get_value().T
    y = y + t.astype(y.dtype)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(y.dtype)
    return y


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
    left, right = basis.factors
    bias = None if module.bias is None else module.bias.get_value()
    lam = jnp.zeros(plan.coefficient_shape, plan.coefficient_dtype)
    _set_child(model, path, LowRankLinear(base, left, right, lam, bias, path=plan.path))
    converted += 1
  if not converted:
    raise ValueError("the adapter projects no nnx.Linear kernel of this model")
  return model


def _layers(model: nnx.Module) -> dict[str, LowRankLinear]:
  return {m.path: m for _, m in nnx.iter_modules(model) if isinstance(m, LowRankLinear)}


def merge(model: nnx.Module, adapter: adapters_lib.Adapter, grads: Any = None
          ) -> adapters_lib.Adapter:
  """Refresh every :class:`LowRankLinear`: ``W0 ← W0 + SᵀΛ``, next basis, ``Λ ← 0``.

  Args:
    model: a model converted by :func:`to_low_rank` with this adapter.
    adapter: the adapter of the current refresh.
    grads: full gradients at the current weights (a tree like the params the
      adapter was built on); needed only for bases made from the gradient.

  Returns:
    The next adapter; the model's layers are updated in place.
  """
  layers = _layers(model)
  lam = map_plans(
      lambda p: layers[p.path].lam.get_value() if p.path in layers
      else jnp.zeros(p.coefficient_shape, p.coefficient_dtype),
      adapter.plans,
  )
  base = map_plans(lambda p, w: layers[p.path].base.get_value() if p.path in layers else w,
                   adapter.plans, adapter.base)
  current = adapters_lib.Adapter(base, adapter.stored_bases, adapter.key, adapter.refresh_index,
                                 adapter.plans)
  new, lam0 = adapters_lib.merge(current, lam, grads)
  fresh = adapters_lib.bases(new)

  def write(p, w0, b, z):
    if p.path in layers:
      layer = layers[p.path]
      layer.base.set_value(w0)
      left, right = b.factors
      if layer.left is not None:
        layer.left.set_value(left)
      if layer.right is not None:
        layer.right.set_value(right)
      layer.lam.set_value(z)

  map_plans(write, new.plans, new.base, fresh, lam0)
  return new


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
