"""Merges into a quantized frozen base that keep small updates (error feedback).

The adapter path merges ``W0 ← W0 + SᵀΛ`` at every refresh.  With ``W0``
stored block-quantized (:mod:`optax_lowrank.quantization`), a merge has to put
the sum back on the format's grid, and round-to-nearest sends every element
whose update is below half a grid step back to its old code: late in training,
when the updates are small, the base stops moving.

A :class:`QuantizedBase` is a :class:`QuantizedArray` (the codes and scales
the forward pass dequantizes) plus ``b`` bits per element of rounding residual
and a :class:`MergeRule`; :func:`merge_update` adds the update to the *kept*
weight (codes plus residual) and encodes the sum again, so updates below half a
level gap accumulate in the residual until a code moves (error feedback, as in
the 1-bit SGD of Seide, Fu, Droppo, Li and Yu 2014, Interspeech).  The kept
weight is then within ``2^{-b-1}`` of a level gap of the exact sum instead of
``1/2``.  Given the basis ``S`` of ``Λ``, a merge also removes from the update
the part of the residual inside the span of ``Sᵀ`` (the optimizer has already
answered it).  Formats ``"int8"`` and ``"nf4"``.

Memory: :func:`optax_lowrank.quantization.nbytes` of the format plus
``ceil(n_blocks * block_size * b / 8)`` bytes of residual (``b = 4`` by
default: half a byte per weight); :func:`drop_residual` gives the plain
quantization back once training is over.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowrank import bases as bases_lib
from optax_lowrank import hashing
from optax_lowrank import quantization_levels as levels_lib
from optax_lowrank.hashing import mix_seed
from optax_lowrank.quantization import (
  QuantizedArray,
  _blocks,
  _check_block_size,
  _is_quantized,
  _pack_bits,
  _pack_nibbles,
  _quantize_selected,
  _unpack_bits,
  _unpack_nibbles,
  dequantize,
  requantize_like,
)

__all__ = [
  "DEFAULT_MERGE_RULE",
  "MERGE_FORMATS",
  "MergeRule",
  "QuantizedBase",
  "drop_residual",
  "merge_tree",
  "merge_update",
  "quantize_base_array",
  "quantize_base_tree",
]

MERGE_FORMATS: tuple[str, ...] = ("int8", "nf4")
_MERGE_ROUNDINGS = ("nearest", "stochastic")
_MERGE_SCALES = ("keep", "fresh")
_FEEDBACK_BITS = (0, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class MergeRule:
  """How a merge writes ``W0 + SᵀΛ`` back into a quantized base.

  Work in *rank units*: the position ``ρ`` of ``x / s_b`` in the format's
  sorted level table (an integer at each level, linear in between; for
  ``"int8"`` simply ``x / s_b + 127``).  The base stores an integer code
  ``c`` per element (the level the forward pass uses, :func:`dequantize`)
  and, with ``feedback_bits = b > 0``, a residual ``j ∈ [0, 2^b)`` that
  places the *kept* weight at rank ``c − 1/2 + (j + 1/2) / 2^b``: one of the
  midpoints of ``2^b`` equal parts of the cell of ``c``.  A merge adds the
  update to the kept weight, rounds its rank to the nearest such point (or
  stochastically to one of the two around it), and stores its code and
  residual; rounded to nearest, ``c`` is then the nearest level of the kept
  weight.  So updates smaller than half a level gap accumulate in ``j`` until
  the code moves (error feedback), and the kept weight is within
  ``2^{-b-1}`` rank units of the exact sum instead of ``1/2``.  Stochastic
  rounding is unbiased except within ``2^{-b-1}`` rank units of the ends of
  the table (a block's absmax), where only inner points exist.

  Attributes:
    rounding: ``"nearest"`` or ``"stochastic"`` (unbiased: ``E[ρ̂] = ρ``,
      keyed from the seed of the merge; needs ``seed`` in :func:`merge_update`).
    scales: ``"keep"``: a block keeps its scale across merges unless a value
      outgrows it (then that block's scale is derived again from its new
      values); ``"fresh"``: every merge derives each block's scale from its
      new values, as :func:`quantize` does from the absmax (a changed scale
      moves the whole grid of the block and re-rounds every element in it; the
      residual keeps that re-rounding within ``2^{-b-1}`` rank units).
    feedback_bits: bits per element of the carried residual, ``0`` (none),
      ``2``, ``4`` or ``8``; memory ``b / 8`` bytes per element on top of the
      codes and scales.

  A merge given the basis of ``Λ`` also removes the part of the residual
  that lies in that subspace (see :func:`merge_update`); without that, error
  feedback barely helps.

  The default, ``MergeRule()`` = :data:`DEFAULT_MERGE_RULE` (nearest, fresh
  scales, 4 residual bits), ends at the loss floor of both formats on the
  drift problem of ``benchmarks/quantized_merge.py`` (0.86x INT8, 0.95x NF4;
  re-quantizing without a residual: 2.9x and 3.7x); 8 bits come 2-4% closer
  for twice the residual memory.  See the how-to "Training on a quantized
  base" for the table.
  """

  rounding: str = "nearest"
  scales: str = "fresh"
  feedback_bits: int = 4

  def __post_init__(self):
    if self.rounding not in _MERGE_ROUNDINGS:
      raise ValueError(f"MergeRule: `rounding` must be one of {_MERGE_ROUNDINGS}, "
                       f"got {self.rounding!r}.")
    if self.scales not in _MERGE_SCALES:
      raise ValueError(f"MergeRule: `scales` must be one of {_MERGE_SCALES}, "
                       f"got {self.scales!r}.")
    if isinstance(self.feedback_bits, bool) or self.feedback_bits not in _FEEDBACK_BITS:
      raise ValueError(f"MergeRule: `feedback_bits` must be one of {_FEEDBACK_BITS}, "
                       f"got {self.feedback_bits!r}.")


#: The rule ``olr.adapters.quantize_base`` uses unless told otherwise: 4-bit
#: error feedback, nearest rounding, fresh scales (``MergeRule()``).
DEFAULT_MERGE_RULE = MergeRule(rounding="nearest", scales="fresh", feedback_bits=4)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["codes", "scales", "residual"],
  meta_fields=["shape", "dtype", "format", "block_size", "rule"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedBase(QuantizedArray):
  """A :class:`QuantizedArray` that merges follow a :class:`MergeRule` into.

  :func:`dequantize` reads it as a plain :class:`QuantizedArray` (codes and
  scales only).  Build it with :func:`quantize_base_array` (or
  ``olr.adapters.quantize_base``) and update it with :func:`merge_update`.

  Attributes:
    residual: uint8 packed residuals ``j`` (see :class:`MergeRule`), ``8 / b``
      per byte (the ``i``-th of a byte in bits ``i·b .. i·b + b − 1``), over
      the zero-padded ``n_blocks * block_size`` elements; ``None`` when
      ``rule.feedback_bits == 0``.
    rule: static :class:`MergeRule`.
  """

  residual: jax.Array | None = None
  rule: MergeRule = MergeRule()

  def _bits_per_element(self) -> dict[str, int]:
    bits = super()._bits_per_element()
    if self.rule.feedback_bits:
      bits["residual"] = self.rule.feedback_bits
    return bits


def _check_merge_format(format: str) -> None:
  if format not in MERGE_FORMATS:
    raise ValueError(f"merge rules support the formats {MERGE_FORMATS}, got {format!r}.")



def _end_values(format: str, bits: int) -> tuple[float, float]:
  """Values (block units) of the lowest and highest kept points of a format.

  The kept points nearest the ends of the level table lie ``2^{-b-1}`` rank
  units inside it (see :class:`MergeRule`).
  """
  levels = levels_lib.levels_f64(format) * (127.0 if format == "int8" else 1.0)
  inset = 0.5 / 2**bits if bits else 0.0
  ranks = np.arange(levels.size)
  return (float(np.interp(inset, ranks, levels)),
          float(np.interp(levels.size - 1 - inset, ranks, levels)))


def _absmax_unit(blocks: jax.Array, format: str, bits: int) -> jax.Array:
  """float32[n_blocks] block scales that put the block's extreme on an end point.

  The larger of ``max(x) / top`` and ``max(−x) / |bottom|`` (``top``,
  ``bottom`` the outermost kept points): the element that sets the scale is a
  kept point exactly, and every other element lies between the end points, so
  re-deriving the scale at a merge neither shrinks nor grows it step by step.
  With ``bits = 0`` this is :func:`quantize`'s absmax scale.
  """
  bottom, top = _end_values(format, bits)
  high = jnp.max(jnp.maximum(blocks, 0.0), axis=1) / top
  low = jnp.max(jnp.maximum(-blocks, 0.0), axis=1) / -bottom
  return jnp.maximum(high, low)


def _encode(blocks, unit, format, block_size, shape, dtype, rule, seed,
            offset=0) -> QuantizedBase:
  """Rounds ``blocks`` (float32[n_blocks, block_size]) on the grid of ``unit``."""
  y = (blocks / jnp.where(unit > 0, unit, 1.0)[:, None]).ravel()
  if format != "int8":
    y = jnp.clip(y, -1.0, 1.0)
  n_levels = levels_lib.levels_f64(format).size
  grid = 2**rule.feedback_bits
  # Kept ranks are the points c - 1/2 + (j + 1/2) / grid, j < grid: the
  # midpoints of grid equal parts of the cell [c - 1/2, c + 1/2) of code c.
  # With t = (rank + 1/2)·grid − 1/2 they are the integers, and c = t // grid,
  # j = t mod grid; a nearest kept rank therefore always has the nearest code.
  t = (levels_lib.rank(y, format) + 0.5) * grid - 0.5
  if rule.rounding == "nearest":
    t = jnp.round(t)
  else:
    below = jnp.floor(t)
    t = below + (hashing.uniform(seed, t.size, offset) < t - below)
  # Only points inside the table: a value at the block absmax keeps a point
  # 1/(2·grid) inside it (so it never outgrows a kept scale).
  lo, hi = (grid // 2, (n_levels - 1) * grid + grid // 2 - 1) if grid > 1 else (0, n_levels - 1)
  t = jnp.clip(t, lo, hi).astype(jnp.int32)
  codes = t // grid
  if format == "int8":
    packed = (codes - 127).astype(jnp.int8)
  else:
    packed = _pack_nibbles(codes.astype(jnp.uint8), zero_code=7)
  residual = None
  if rule.feedback_bits:
    residual = _pack_bits(t - codes * grid, rule.feedback_bits)
  return QuantizedBase(codes=packed, scales=unit.astype(jnp.float32), shape=shape,
                       dtype=np.dtype(dtype), format=format, block_size=block_size,
                       residual=residual, rule=rule)


def _kept_blocks(q: QuantizedBase) -> jax.Array:
  """float32[n_blocks, block_size]: the weight a merge starts from (codes + residual)."""
  padded = q.n_blocks * q.block_size
  if q.format == "int8":
    rank = q.codes.astype(jnp.float32) + 127.0
  else:
    rank = _unpack_nibbles(q.codes)[:padded].astype(jnp.float32)
  if q.rule.feedback_bits:
    grid = 2**q.rule.feedback_bits
    j = _unpack_bits(q.residual, q.rule.feedback_bits, padded).astype(jnp.float32)
    rank = rank - 0.5 + (j + 0.5) / grid
  values = levels_lib.level_value(rank, q.format).reshape(q.n_blocks, q.block_size)
  return values * q.scales[:, None]


def quantize_base_array(
  x: jax.typing.ArrayLike,
  format: str = "int8",
  block_size: int = 256,
  rule: MergeRule = DEFAULT_MERGE_RULE,
  *,
  seed: jax.typing.ArrayLike | None = None,
) -> QuantizedBase:
  """Quantizes a frozen base for merges that follow ``rule``.

  Codes are the nearest levels; with ``feedback_bits = b > 0`` the residual
  keeps the rounding error, so the kept weight is ``x`` to within ``2^{-b-1}``
  of a level gap, and the block scales are those of :func:`quantize` enlarged
  by a factor ``1 + O(2^{-b-1} gap)`` so that each block's extreme element is
  a kept point (``b = 0``: exactly :func:`quantize`'s).

  Args:
    x: floating-point array.
    format: ``"int8"`` or ``"nf4"``.
    block_size: elements per block.
    rule: a :class:`MergeRule`.
    seed: ``None`` rounds this first encoding to the nearest grid point
      whatever ``rule.rounding`` says; a seed rounds it by ``rule``.

  Returns:
    A :class:`QuantizedBase`.
  """
  levels_lib.check_format(format)
  _check_merge_format(format)
  _check_block_size(block_size)
  if not isinstance(rule, MergeRule):
    raise TypeError(f"`rule` must be a MergeRule, got {rule!r}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`x` must be a real floating-point array, got dtype {x.dtype}.")
  first = rule if seed is not None else dataclasses.replace(rule, rounding="nearest")
  encoded = _quantize_base(x, format, int(block_size), first, _merge_seed(first, seed))
  return dataclasses.replace(encoded, rule=rule)



def quantize_base_tree(
  tree: Any,
  format: str = "int8",
  block_size: int = 256,
  where: Any | Callable[[Any], Any] | None = None,
  rule: MergeRule = DEFAULT_MERGE_RULE,
) -> Any:
  """:func:`quantize_base_array` on the leaves of a pytree that ``where`` selects.

  ``where`` (and the checks: floating point, finite values, naming the leaf
  path and shape) as in :func:`optax_lowrank.quantization.quantize_tree`; the
  selected leaves become :class:`QuantizedBase` leaves following ``rule``.
  """
  levels_lib.check_format(format)
  _check_merge_format(format)
  _check_block_size(block_size)
  return _quantize_selected(
    tree, where, lambda x: quantize_base_array(x, format, block_size, rule), "quantize_base_tree")


def _merge_seed(rule: MergeRule, seed: Any) -> jax.Array | None:
  if rule.rounding != "stochastic":
    return None
  if seed is None:
    raise ValueError("a MergeRule with rounding='stochastic' needs a `seed`.")
  return mix_seed(seed)


@functools.partial(jax.jit, static_argnames=("format", "block_size", "rule"))
def _quantize_base(x, format, block_size, rule, seed) -> QuantizedBase:
  blocks = _blocks(x, block_size)
  unit = _absmax_unit(blocks, format, rule.feedback_bits)
  return _encode(blocks, unit, format, block_size, tuple(x.shape), x.dtype, rule, seed)


def merge_update(
  q: QuantizedArray,
  merged: jax.typing.ArrayLike,
  *,
  seed: jax.typing.ArrayLike | None = None,
  basis: Any = None,
  element_offset: jax.typing.ArrayLike = 0,
) -> QuantizedArray:
  """Writes a merged weight ``merged = dequantize(q) + Δ`` back into ``q``.

  For a :class:`QuantizedBase`, ``Δ = merged − dequantize(q)`` (float32) is
  added to the kept weight (codes plus residual) and the sum is encoded by
  ``q.rule`` (see :class:`MergeRule`).  A plain :class:`QuantizedArray` is
  re-quantized from ``merged`` (:func:`requantize_like`: fresh scales,
  nearest rounding, no residual; ``seed`` is ignored).

  Args:
    q: the current base leaf.
    merged: the merged weight, shape ``q.shape``.
    seed: integer or key, used (and required) by stochastic rounding; give
      every merge and leaf its own (``olr.adapters.merge`` uses
      ``mix_seed(key, refresh_index, leaf_index)``), so that a resumed run
      rounds exactly as the original.
    basis: the :class:`~optax_lowrank.bases.Basis` ``S`` that ``Λ`` lived in
      since the last merge, or ``None``.  With a residual ``r`` (the kept
      weight minus the codes), the merge adds ``Δ − P_S r`` instead of ``Δ``,
      ``P_S`` the orthogonal projection onto the span of ``Sᵀ``: the forward
      pass ran on the codes, so the optimizer has already answered the part
      ``P_S r`` of the rounding error inside ``Δ``, and counting it again in the
      residual would make the kept weight absorb the rounding error instead of
      approaching the optimum (the codes would then dither between two levels
      around it).  ``olr.adapters.merge`` passes the current basis.
    element_offset: the index of ``q``'s first element in the leaf ``seed``
      belongs to, when ``q`` is one slice of it (one layer of a stacked
      leaf, merged layer by layer): stochastic rounding draws element ``i``'s
      dither from ``(seed, element_offset + i)``, so a leaf rounds the same
      whether merged whole or slice by slice.

  Returns:
    The new leaf, of the type, format, block size and dtype of ``q``.
  """
  if not isinstance(q, QuantizedBase):
    return requantize_like(q, merged)
  merged = jnp.asarray(merged)
  if tuple(merged.shape) != q.shape:
    raise ValueError(f"`merged` must have the shape of `q`, {q.shape}; got {tuple(merged.shape)}.")
  if not q.rule.feedback_bits:
    basis = None
  return _merge_update(q, merged, _merge_seed(q.rule, seed), basis, element_offset)


def _span_projection(basis: bases_lib.Basis, x: jax.Array) -> jax.Array:
  """``P_S x``: the orthogonal projection of ``x`` onto the span of ``Sᵀ`` (float32).

  Every factor ``U`` (``n × r``) of the basis is replaced by
  ``U (UᵀU)⁻¹``; projecting with those and mapping back with ``U`` gives the
  least-squares fit of ``x`` by ``Sᵀ C`` (exact for the mode products of
  :mod:`optax_lowrank.bases`, whose span is the tensor product of the factors').
  """

  def dual(u):
    if u is None:
      return None
    u = u.astype(jnp.float32)
    gram = jnp.swapaxes(u, -1, -2) @ u
    return jnp.swapaxes(jnp.linalg.solve(gram, jnp.swapaxes(u, -1, -2)), -1, -2)

  factors = [None if u is None else u.astype(jnp.float32) for u in basis.factors]
  s = bases_lib.Basis(factors, basis.shape, basis.view_shape, basis.perm, basis.batch_shape)
  d = bases_lib.Basis([dual(u) for u in basis.factors], basis.shape, basis.view_shape,
                      basis.perm, basis.batch_shape)
  return bases_lib.project_back(s, bases_lib.project(d, x.astype(jnp.float32)))


@jax.jit
def _merge_update(q: QuantizedBase, merged: jax.Array, seed: jax.Array | None,
                  basis: Any, offset: jax.Array) -> QuantizedBase:
  codes = dequantize(q).astype(jnp.float32)
  kept = _kept_blocks(q)
  delta = merged.astype(jnp.float32) - codes
  if basis is not None:
    residual = (kept - _blocks(codes, q.block_size)).ravel()[: q.size].reshape(q.shape)
    delta = delta - _span_projection(basis, residual)
  new = kept + _blocks(delta, q.block_size)
  unit = _absmax_unit(new, q.format, q.rule.feedback_bits)
  if q.rule.scales == "keep":
    # (a margin of float32 round-off: a kept extreme re-derives its own scale)
    unit = jnp.where(unit > q.scales * (1 + 1e-6), unit, q.scales)
  return _encode(new, unit, q.format, q.block_size, q.shape, q.dtype, q.rule, seed, offset)


def merge_tree(
  base: Any, merged: Any, *, seed: jax.typing.ArrayLike | None = None, bases: Any = None
) -> Any:
  """:func:`merge_update` on every quantized leaf of ``base``; other leaves take ``merged``.

  Leaf ``i`` (in flattening order among the quantized leaves) rounds with
  ``mix_seed(seed, i)``, so leaves never share their rounding noise.
  ``bases``: ``None`` or a tree like ``base`` holding each quantized leaf's
  current :class:`~optax_lowrank.bases.Basis` (``None`` where it has none).
  """
  is_q = _is_quantized
  base_leaves, treedef = jax.tree.flatten(base, is_leaf=is_q)
  merged_leaves = treedef.flatten_up_to(merged)
  basis_leaves = [None] * len(base_leaves) if bases is None else treedef.flatten_up_to(bases)
  out, index = [], 0
  for old, new, basis in zip(base_leaves, merged_leaves, basis_leaves):
    if is_q(old):
      leaf_seed = None if seed is None else mix_seed(seed, index)
      out.append(merge_update(old, new, seed=leaf_seed, basis=basis))
      index += 1
    else:
      out.append(new)
  return jax.tree.unflatten(treedef, out)


def drop_residual(tree: Any) -> Any:
  """Replaces every :class:`QuantizedBase` in ``tree`` by a plain :class:`QuantizedArray`.

  The same codes and scales (what :func:`dequantize` reads) without the
  residual and the rule: the base to keep once training is over (no more
  merges), at the format's own size.
  """

  def one(x):
    if isinstance(x, QuantizedBase):
      return QuantizedArray(codes=x.codes, scales=x.scales, shape=x.shape, dtype=x.dtype,
                            format=x.format, block_size=x.block_size)
    return x

  return jax.tree.map(one, tree, is_leaf=_is_quantized)

