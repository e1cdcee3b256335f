"""Bases: the linear maps S of one leaf, and the pure functions that apply them.

Every projection in this library is a *mode product*.  A leaf ``W`` is first
seen through a fixed *view* (a 2-D matrix for the matrix projections, the raw
N-d tensor for Tucker, a vector for the dense map) and each axis ``i`` of the
view may carry a factor ``U_i ∈ R^{n_i × r_i}``:

* ``project``:       ``C = G ×_1 U_1ᵀ ×_2 U_2ᵀ …``   (axes without a factor stay)
* ``project_back``:  ``Δ = C ×_1 U_1 ×_2 U_2 …``     (the transpose map, Sᵀ)

So, with ``G ∈ R^{m×n}`` (Torroba-Hennigen, Lang, Guo and Kim 2025, arXiv:2502.13811,
§3):

* left one-sided (GaLore on the left, ``P = U_1ᵀ ∈ R^{r×m}``): ``C = P G``,
  back ``Pᵀ Δ``;
* right one-sided (``Q = U_2 ∈ R^{n×r}``): ``C = G Q``, back ``Δ Qᵀ``;
* two-sided Kronecker ``S = Rᵀ ⊗ L`` (``L = U_1ᵀ``, ``R = U_2``):
  ``C = L G R``, back ``Lᵀ Δ Rᵀ``;
* Tucker (Tucker 1966; the gradient projection of Natural GaLore, Das 2024,
  arXiv:2410.16029, §2.1.1): one factor per mode of an N-d tensor;
* dense (the same paper's Theorem 1 in full generality): the view is ``vec(W)`` (row-major) and
  the single factor is ``Sᵀ ∈ R^{mn×k}``.

The same :class:`Basis` object serves the gradient path (``olr.low_rank``) and
the adapter path (``olr.adapters``): both call :func:`project` /
:func:`project_back` from this module, so the two paths cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["Basis", "over_batch", "project", "project_back", "transport_matrices", "transport"]


@jax.tree_util.register_pytree_node_class
class Basis:
  """The linear map of one leaf: a view of the leaf and one factor per view axis.

  Attributes:
    factors: one entry per axis of the view; ``None`` (identity on that axis) or
      an array ``U_i`` of shape ``batch_shape + (n_i, r_i)``.
    shape: the leaf's own shape (static).
    perm: static axis permutation applied before reshaping the leaf to the view
      (batch axes first), or ``None`` when the leaf's axes are already in order.
    view_shape: static shape of the view of *one* matrix (or tensor, or vector).
    batch_shape: static; ``()`` for an ordinary leaf.  For a stacked leaf (the
      layers of a scanned model, ``(L, m, n)``) the sizes of its batch axes:
      the leaf is then ``prod(batch_shape)`` independent matrices, each with
      its own factors, and the leaf's view is ``batch_shape + view_shape``.

  ``Basis`` is a pytree whose children are the factor arrays; the shapes are
  static metadata, so a basis can live in an optimizer state under ``jax.jit``.
  """

  __slots__ = ("factors", "shape", "perm", "view_shape", "batch_shape")

  def __init__(
      self,
      factors: Sequence[Array | None],
      shape: tuple[int, ...],
      view_shape: tuple[int, ...],
      perm: tuple[int, ...] | None = None,
      batch_shape: tuple[int, ...] = (),
  ):
    self.factors = tuple(factors)
    self.shape = tuple(shape)
    self.view_shape = tuple(view_shape)
    self.perm = None if perm is None else tuple(perm)
    self.batch_shape = tuple(batch_shape)

  def tree_flatten(self):
    return (self.factors,), (self.shape, self.view_shape, self.perm, self.batch_shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    shape, view_shape, perm, batch_shape = aux
    return cls(children[0], shape, view_shape, perm, batch_shape)

  @property
  def coefficient_shape(self) -> tuple[int, ...]:
    """Shape of ``project(basis, g)``: ``r_i`` on factored axes, ``n_i`` elsewhere.

    Batch axes (stacked leaves) come first.
    """
    return self.batch_shape + tuple(
        n if f is None else f.shape[-1] for n, f in zip(self.view_shape, self.factors)
    )

  def __repr__(self) -> str:
    fs = ", ".join(
        repr(tuple(f.shape)) if hasattr(f, "shape") else repr(f) for f in self.factors
    )
    batch = f", batch={self.batch_shape}" if self.batch_shape else ""
    return f"Basis(shape={self.shape}{batch}, view={self.view_shape}, factors=({fs}))"


def over_batch(fn, batch_ndim: int):
  """``fn`` mapped over ``batch_ndim`` leading axes of all its arguments (nested vmap).

  A stacked leaf's matrices are handled by one batched operation (a batched
  GEMM in :func:`project`, a batched pseudo-inverse in
  :func:`transport_matrices`), not a Python loop over layers.  Decompositions
  at a refresh are not batched this way (see ``Projection.basis``).
  """
  for _ in range(batch_ndim):
    fn = jax.vmap(fn)
  return fn


def to_view(basis: Basis, x: Array) -> Array:
  """Reshape a leaf-shaped array to the basis' view (batch axes first)."""
  if x.shape != basis.shape:
    raise ValueError(
        f"array of shape {x.shape} does not match the basis, made for shape {basis.shape}"
    )
  if basis.perm is not None:
    x = jnp.transpose(x, basis.perm)
  return x.reshape(basis.batch_shape + basis.view_shape)


def from_view(basis: Basis, x: Array) -> Array:
  """Inverse of :func:`to_view`."""
  if basis.perm is None:
    return x.reshape(basis.shape)
  permuted = tuple(basis.shape[p] for p in basis.perm)
  return jnp.transpose(x.reshape(permuted), _inverse_perm(basis.perm))


def _inverse_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)


def _dot(a: Array, b: Array) -> Array:
  """Matrix product that accumulates low-precision inputs in float32.

  Mixed dtypes (a bf16 gradient and its float32 factor) meet in the dtype of
  the larger operand, so the full-size array is never copied to float32 (at
  LLaMA-7B shapes that copy of a stacked leaf is several GB); the small
  operand is rounded instead, and the product still accumulates in float32.
  """
  if a.dtype != b.dtype:
    dtype = a.dtype if a.size >= b.size else b.dtype
    a, b = a.astype(dtype), b.astype(dtype)
  acc = jnp.float32 if jnp.finfo(a.dtype).bits < 32 else None
  return jnp.matmul(a, b, preferred_element_type=acc)


def _mode_products(x: Array, factors: tuple[Array | None, ...], forward: bool) -> Array:
  """``x ×_i U_iᵀ`` (forward) or ``x ×_i U_i`` (backward) over the factored axes.

  Matrices and vectors use plain matrix products in the order with fewer
  FLOPs; higher-order views use ``einsum`` (which also picks a cheap order).
  """
  mats = [None if f is None else (f.T if forward else f) for f in factors]
  # mats[i] maps axis i: new_axis_i = mats[i] @ old_axis_i
  if x.ndim == 1:
    return x if mats[0] is None else _dot(mats[0], x)
  if x.ndim == 2:
    left, right = mats
    if left is None and right is None:
      return x
    if right is None:
      return _dot(left, x)
    if left is None:
      return _dot(x, right.T)
    m, n = x.shape
    # (L x) Rᵀ costs r_l·m·n + r_l·n·r_r; L (x Rᵀ) costs m·n·r_r + r_l·m·r_r.
    if left.shape[0] * n * (m + right.shape[0]) <= right.shape[0] * m * (n + left.shape[0]):
      return _dot(_dot(left, x), right.T)
    return _dot(left, _dot(x, right.T))
  letters = "abcdefghijklmnopqrstuvwxyz"
  in_sub = letters[: x.ndim]
  out_sub = list(in_sub)
  operands = [x]
  subs = [in_sub]
  for i, mat in enumerate(mats):
    if mat is None:
      continue
    new = letters[x.ndim + i].upper()
    subs.append(new + in_sub[i])
    operands.append(mat)
    out_sub[i] = new
  spec = ",".join(subs) + "->" + "".join(out_sub)
  dtype = jnp.result_type(*operands)
  acc = jnp.float32 if jnp.finfo(dtype).bits < 32 else None
  return jnp.einsum(spec, *[o.astype(dtype) for o in operands], preferred_element_type=acc)


def project(basis: Basis, g: Array) -> Array:
  """Coefficients ``c = S·vec(g)`` of one leaf in the basis' small space.

  Args:
    basis: a :class:`Basis` (from a projection spec, the optimizer state of
      ``olr.low_rank`` or an adapter).
    g: an array of the leaf's shape (a gradient, or a weight).

  Returns:
    An array of shape ``basis.coefficient_shape`` (``r×n`` for a left
    projection of an ``m×n`` leaf, ``m×r`` for a right one, ``r_l×r_r`` two-sided,
    ``r_1×…×r_N`` Tucker, ``(k,)`` dense; a stacked leaf's ``batch_shape`` in
    front), in ``g``'s dtype promoted to the basis dtype (low-precision inputs
    are accumulated and returned in float32).

  Cost: ``2·m·n·r`` FLOPs for a one-sided basis (per matrix of a stacked leaf,
  computed as one batched product).
  """
  fn = lambda x, fs: _mode_products(x, fs, forward=True)
  return over_batch(fn, len(basis.batch_shape))(to_view(basis, g), basis.factors)


def project_back(basis: Basis, c: Array) -> Array:
  """The transpose map ``Sᵀc``, reshaped to the leaf's shape.

  Args:
    basis: the basis ``c`` was computed with.
    c: coefficients of shape ``basis.coefficient_shape``.

  Returns:
    An array of the leaf's shape (dtype of ``c`` promoted with the basis).
  """
  if tuple(c.shape) != basis.coefficient_shape:
    raise ValueError(
        f"coefficients of shape {tuple(c.shape)} do not match the basis "
        f"(expected {basis.coefficient_shape} for a leaf of shape {basis.shape})"
    )
  fn = lambda x, fs: _mode_products(x, fs, forward=False)
  return from_view(basis, over_batch(fn, len(basis.batch_shape))(c, basis.factors))


def transport_matrices(old: Basis, new: Basis) -> tuple[Array | None, ...]:
  """Per-axis least-squares change of coordinates from ``old`` to ``new``.

  For a factored axis, ``T_i = pinv(U_i^new) U_i^old`` (``r_i × r_i``) is the
  matrix with ``U^new T ≈ U^old`` in least squares; for orthonormal factors it is
  the overlap ``U^newᵀ U^old``.  Cost ``O(n_i r_i²)``; it runs only at a refresh.
  Stacked leaves get one ``T_i`` per matrix, shaped ``batch_shape + (r_i, r_i)``.
  """

  def one(fo, fn):
    dtype = jnp.promote_types(fn.dtype, jnp.float32)
    return jnp.linalg.pinv(fn.astype(dtype)) @ fo.astype(dtype)

  one = over_batch(one, len(new.batch_shape))
  return tuple(None if fo is None else one(fo, fn) for fo, fn in zip(old.factors, new.factors))


def transport(mats: tuple[Array | None, ...], c: Array, *, second_moment: bool = False) -> Array:
  """Carry coefficients into a new basis: ``c ×_i T_i``.

  With ``second_moment=True`` each ``T_i`` is replaced by its element-wise
  square, which maps non-negative statistics (Adam's ``ν``) to non-negative
  statistics: the exact rule for a diagonal second moment under a permutation or
  sign flip of the basis, and a first-order heuristic otherwise.
  """
  if second_moment:
    mats = tuple(None if t is None else jnp.square(t) for t in mats)
  present = [t for t in mats if t is not None]
  # Stacked leaves: every T_i has the batch axes in front (see transport_matrices).
  batch_ndim = present[0].ndim - 2 if present else 0
  # _mode_products(forward=False) computes c ×_i M_i with M_i of shape (new, old).
  fn = lambda x, ms: _mode_products(x, ms, forward=False)
  out = over_batch(fn, batch_ndim)(c.astype(jnp.result_type(c.dtype, *present)), mats)
  return out.astype(c.dtype)


def factor_bytes(basis: Any) -> int:
  """Bytes held by the factors of a basis (0 for ``None``)."""
  if basis is None:
    return 0
  return sum(math.prod(f.shape) * f.dtype.itemsize for f in basis.factors if f is not None)
