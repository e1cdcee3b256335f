"""Block-wise quantization of arrays and pytrees, in pure JAX.

An array ``x`` with ``n = x.size`` elements is flattened, zero-padded to
``n_blocks * block_size`` elements with ``n_blocks = ceil(n / block_size)``, and
cut into ``n_blocks`` contiguous blocks. Every block ``b`` gets one float32 scale
``s_b`` and every element one small integer code ``c_i``; the reconstruction is

.. math::

  \\hat{x}_i = s_{b(i)} \\cdot \\ell(c_i),

where ``ell`` maps a code to a level in ``[-1, 1]``. The scale is derived from
the block absolute maximum ``a_b = max_{i in b} |x_i|`` so that the largest
element of each block is represented exactly and small blocks keep their own
resolution (block-wise quantization; Dettmers et al. 2022).

Formats
-------
``"int8"``
  Linear absmax code: ``s_b = a_b / 127``, ``c_i = round(x_i / s_b)`` stored as
  int8 in ``[-127, 127]``, ``ell(c) = c``. Per-element error
  ``|x_i - x̂_i| <= s_b / 2 = a_b / 254``. 1 byte per element.
``"nf4"``
  NormalFloat-4 (Dettmers et al. 2023, QLoRA): ``s_b = a_b`` and each
  ``x_i / a_b`` is rounded to the nearest of the 16 levels in :data:`NF4_LEVELS`.
  Two 4-bit codes are packed into one uint8 byte (low nibble first), so storage
  is 4 bits per element. Per-element error
  ``<= a_b * max_gap / 2 = 0.1519 * a_b`` where ``max_gap = 1 - 0.69619``.
``"dynamic8"``
  Signed 8-bit dynamic tree code (Dettmers 2016; Dettmers et al. 2022), used by
  :mod:`optax_lowrank.eight_bit` for Adam's first moment. ``s_b = a_b``; levels
  are ``0`` and ``±10^{-e} (0.1 + 0.9 j / 2^{6-e})`` for ``e = 0..6`` and
  ``j = 1..2^{6-e}`` (255 levels, smallest non-zero magnitude ``1e-6``). The
  number of leading zero bits of the 7-bit magnitude is the decimal exponent
  ``e``, the first one bit is the indicator, and the remaining ``6 - e`` bits
  are a linear fraction, so resolution is spent where values are large
  relative to the block maximum while tiny values are still representable.
  Per-element error ``<= a_b * 0.9 / 128``. 1 byte per element.
``"dynamic8_unsigned"``
  The same construction for non-negative data with the sign bit reused as an
  extra fraction bit: ``0`` and ``10^{-e} (0.1 + 0.9 j / 2^{7-e})`` for
  ``e = 0..7`` (256 levels, smallest non-zero ``1e-7``). Negative inputs are
  mapped to zero. Per-element error ``<= a_b * 0.9 / 256``. 1 byte per element.

Elements are rounded to the nearest level by default, so the error of an element
is at most half the gap between the two levels that bracket ``x_i / s_b``, times
``s_b`` (the bounds above are the worst case over the level table). Passing a
``seed`` to :func:`quantize` selects unbiased stochastic rounding instead (error
below one full gap, ``E[x̂] = x``). Zero is a level of every format, so exact
zeros (and all-zero blocks, whose scale is 0) stay exactly zero either way.

Memory
------
``nbytes(q) = codes bytes + 4 * n_blocks`` with codes bytes
``n_blocks * block_size`` for the 8-bit formats and
``ceil(n_blocks * block_size / 2)`` for ``"nf4"``. The zero padding of the last
block is stored (it is at most ``block_size - 1`` elements) and stripped again by
:func:`dequantize`.

The level tables are in :mod:`optax_lowrank.quantization_levels` and the
stochastic rounding noise comes from :mod:`optax_lowrank.hashing` (both
re-exported here).  A frozen base that merges write into, with a few residual
bits per element and a merge rule (the adapter path), is
:class:`optax_lowrank.quantized_merge.QuantizedBase`, a :class:`QuantizedArray`.

All functions trace under :func:`jax.jit`; ``format`` and ``block_size`` are
static Python values. Non-finite inputs are not checked by :func:`quantize`
(a NaN or inf poisons the scale of its block, and the whole block dequantizes to
NaN/inf); :func:`quantize_tree` checks concrete inputs eagerly and raises.

References:
  Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016.
  https://arxiv.org/abs/1511.04561
  Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise
  Quantization", ICLR 2022. https://arxiv.org/abs/2110.02861
  Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of
  Quantized LLMs", NeurIPS 2023. https://arxiv.org/abs/2305.14314
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowrank import hashing
from optax_lowrank import quantization_levels as levels_lib
from optax_lowrank.hashing import mix_seed
from optax_lowrank.quantization_levels import (
  DYNAMIC8_LEVELS,
  DYNAMIC8_UNSIGNED_LEVELS,
  FORMATS,
  NF4_LEVELS,
  format_levels,
  max_abs_error_factor,
  nf4_levels_from_definition,
)

__all__ = [
  "DYNAMIC8_LEVELS",
  "DYNAMIC8_UNSIGNED_LEVELS",
  "FORMATS",
  "NF4_LEVELS",
  "QuantizedArray",
  "dequantize",
  "dequantize_tree",
  "format_levels",
  "join_layers",
  "layer_slices",
  "max_abs_error_factor",
  "mix_seed",
  "nbytes",
  "nf4_levels_from_definition",
  "quantize",
  "quantize_tree",
  "quantized_nbytes",
  "quantized_zeros",
  "requantize_like",
  "splits_into_layers",
  "tie",
]

_check_format = levels_lib.check_format

def _check_block_size(block_size: Any) -> None:
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
  if block_size <= 0:
    raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["codes", "scales"],
  meta_fields=["shape", "dtype", "format", "block_size"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray:
  """A block-wise quantized array (a pytree; only ``codes``/``scales`` are leaves).

  Attributes:
    codes: flat integer codes. ``"int8"``: int8[n_blocks * block_size];
      ``"nf4"``: uint8[ceil(n_blocks * block_size / 2)], two codes per byte,
      element ``2i`` in the low nibble of byte ``i``; ``"dynamic8"`` and
      ``"dynamic8_unsigned"``: uint8[n_blocks * block_size], indices into the
      sorted level table.
    scales: float32[n_blocks], the per-block multiplier ``s_b`` (``a_b / 127``
      for ``"int8"``, ``a_b`` for the codebook formats).
    shape: static shape of the original array.
    dtype: static dtype of the original array (restored by :func:`dequantize`).
    format: static format name, one of :data:`FORMATS`.
    block_size: static number of elements per block.
  """

  codes: jax.Array
  scales: jax.Array
  shape: tuple[int, ...]
  dtype: np.dtype
  format: str
  block_size: int

  @property
  def size(self) -> int:
    """Number of elements of the original array."""
    return math.prod(self.shape)

  @property
  def n_blocks(self) -> int:
    """Number of blocks, ``ceil(size / block_size)``."""
    return -(-self.size // self.block_size)

  @property
  def nbytes(self) -> int:
    """Exact bytes held by ``codes`` and ``scales``."""
    return nbytes(self)


  def _bits_per_element(self) -> dict[str, int]:
    """Bits per (padded) element of each element-wise packed array field."""
    return {"codes": 4 if self.format == "nf4" else 8}


def quantized_zeros(
  shape: tuple[int, ...],
  format: str = "int8",
  block_size: int = 256,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> QuantizedArray:
  """The :class:`QuantizedArray` of ``zeros(shape, dtype)``, built without quantizing.

  Equal to ``quantize(jnp.zeros(shape, dtype), format, block_size)`` (zero scales,
  every code the code of level 0) but cheaper: no reduction or rounding is traced,
  which keeps optimizer ``init`` functions light.
  """
  _check_format(format)
  _check_block_size(block_size)
  shape = tuple(int(d) for d in shape)
  n_blocks = -(-math.prod(shape) // block_size)
  padded = n_blocks * block_size
  if format == "int8":
    codes = jnp.zeros((padded,), jnp.int8)
  else:
    zero_code = int(np.flatnonzero(levels_lib.levels_f64(format) == 0)[0])
    if format == "nf4":
      codes = jnp.full((-(-padded // 2),), zero_code | (zero_code << 4), jnp.uint8)
    else:
      codes = jnp.full((padded,), zero_code, jnp.uint8)
  return QuantizedArray(
    codes=codes,
    scales=jnp.zeros((n_blocks,), jnp.float32),
    shape=shape,
    dtype=np.dtype(dtype),
    format=format,
    block_size=int(block_size),
  )


def quantized_nbytes(size: int, format: str = "int8", block_size: int = 256) -> int:
  """Analytic bytes of ``quantize(x, format, block_size)`` for ``x.size == size``.

  ``n_blocks = ceil(size / block_size)``; codes take ``n_blocks * block_size``
  bytes (``ceil(n_blocks * block_size / 2)`` for ``"nf4"``) and scales
  ``4 * n_blocks`` bytes.
  """
  _check_format(format)
  _check_block_size(block_size)
  n_blocks = -(-int(size) // int(block_size))
  padded = n_blocks * int(block_size)
  code_bytes = -(-padded // 2) if format == "nf4" else padded
  return code_bytes + 4 * n_blocks


def nbytes(tree: Any) -> int:
  """Exact bytes of all array leaves of ``tree`` (e.g. a :class:`QuantizedArray`).

  For a :class:`QuantizedArray` this is the bytes of its codes plus its scales;
  for any pytree (such as an optimizer state) the sum over its array leaves.
  """
  return sum(
    math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
  )


def quantize(
  x: jax.typing.ArrayLike,
  format: str = "int8",
  block_size: int = 256,
  *,
  seed: jax.typing.ArrayLike | None = None,
) -> QuantizedArray:
  """Quantizes a floating-point array block-wise.

  With ``seed=None`` each normalized element ``y = x / s_b`` is rounded to the
  nearest level (error at most half the gap between the two levels around ``y``).
  With a ``seed`` it is rounded stochastically: to the level just above ``y``
  with probability ``(y - lo) / (hi - lo)`` and to the one just below otherwise,
  so ``E[x̂] = x`` (unbiased) and the error is below the full gap ``hi - lo``.
  Unbiased rounding matters when a quantized quantity is updated by small
  increments, e.g. an exponential moving average with decay close to 1, where
  nearest rounding would discard every increment smaller than half a gap.

  The rounding noise is :func:`optax_lowrank.hashing.uniform`: a counter-based
  integer hash that costs a few integer ops per element and fuses with the
  rounding (nothing is materialized), where :mod:`jax.random` bits cost tens of
  times more on CPU.  Use a different seed at every call (e.g. ``mix_seed(run_seed, step, leaf)``).

  Args:
    x: array of any shape and floating dtype. It is flattened (row-major) and the
      last block is zero-padded when ``block_size`` does not divide ``x.size``.
    format: ``"int8"``, ``"nf4"``, ``"dynamic8"`` or ``"dynamic8_unsigned"`` (see
      the module docstring for levels and error bounds).
    block_size: elements per block (positive int; any value, it need not divide
      ``x.size`` nor be even).
    seed: ``None`` for round-to-nearest, or an integer scalar (Python int or
      integer array, may be traced) or a :mod:`jax.random` key, which selects
      stochastic rounding; see :func:`mix_seed`.

  Returns:
    A :class:`QuantizedArray`; :func:`dequantize` inverts it up to the format's
    rounding error.

  Raises:
    ValueError: unknown ``format`` or non-positive ``block_size``.
    TypeError: ``x`` is not a real floating-point array.
  """
  _check_format(format)
  _check_block_size(block_size)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`x` must be a real floating-point array, got dtype {x.dtype}.")
  return _quantize(x, format, int(block_size), None if seed is None else mix_seed(seed))


def requantize_like(
  like: QuantizedArray, x: jax.typing.ArrayLike, *, seed: jax.typing.ArrayLike | None = None
) -> QuantizedArray:
  """Quantizes ``x`` in the format, block size and dtype of ``like``.

  For writing an updated array back into an existing quantized slot (e.g. a
  merged frozen base): ``dequantize`` of the result has ``like``'s shape and dtype.

  Raises:
    ValueError: ``x`` does not have ``like.shape``.
  """
  x = jnp.asarray(x)
  if tuple(x.shape) != like.shape:
    raise ValueError(f"`x` must have the shape of `like`, {like.shape}; got {tuple(x.shape)}.")
  return quantize(x.astype(like.dtype), like.format, like.block_size, seed=seed)



def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """float32[n_blocks, block_size] view of ``x``, zero-padded at the end."""
  n = x.size
  n_blocks = -(-n // block_size)
  flat = jnp.ravel(x).astype(jnp.float32)
  flat = jnp.pad(flat, (0, n_blocks * block_size - n))
  return flat.reshape(n_blocks, block_size)


@functools.partial(jax.jit, static_argnames=("format", "block_size"))
def _quantize(x: jax.Array, format: str, block_size: int, seed: jax.Array | None) -> QuantizedArray:
  blocks = _blocks(x, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [n_blocks]
  unit = absmax / 127.0 if format == "int8" else absmax
  y = (blocks / jnp.where(unit > 0, unit, 1.0)[:, None]).ravel()
  if format != "int8":
    y = jnp.clip(y, -1.0, 1.0)
  rank = levels_lib.rank(y, format)
  if seed is None:
    rank = jnp.round(rank)
  else:
    below = jnp.floor(rank)
    rank = below + (hashing.uniform(seed, rank.size) < rank - below)
  n_levels = levels_lib.levels_f64(format).size
  rank = jnp.clip(rank, 0, n_levels - 1)
  if format == "int8":
    codes = (rank - 127.0).astype(jnp.int8)
  else:
    codes = rank.astype(jnp.uint8)
    if format == "nf4":
      codes = _pack_nibbles(codes, zero_code=7)
  return QuantizedArray(
    codes=codes,
    scales=unit.astype(jnp.float32),
    shape=tuple(x.shape),
    dtype=np.dtype(x.dtype),
    format=format,
    block_size=block_size,
  )


def _pack_nibbles(codes: jax.Array, zero_code: int) -> jax.Array:
  """uint8[m] with values < 16 -> uint8[ceil(m/2)], element 2i in the low nibble.

  An odd last element is paired with ``zero_code`` (the code of 0).
  """
  if codes.size % 2:
    codes = jnp.concatenate([codes, jnp.full((1,), zero_code, jnp.uint8)])
  return _pack_bits(codes, 4)


def _unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`_pack_nibbles` (keeps the odd pad code, if any)."""
  return _unpack_bits(packed, 4, 2 * packed.size)


def _pack_bits(values: jax.Array, bits: int) -> jax.Array:
  """uint8[m] with values < 2^bits -> uint8[ceil(m * bits / 8)], low bits first."""
  per_byte = 8 // bits
  pad = -values.size % per_byte
  values = jnp.pad(values.astype(jnp.uint8), (0, pad)).reshape(-1, per_byte)
  out = values[:, 0]
  for j in range(1, per_byte):
    out = out | (values[:, j] << (j * bits))
  return out


def _unpack_bits(packed: jax.Array, bits: int, size: int) -> jax.Array:
  """Inverse of :func:`_pack_bits`: the first ``size`` values.

  Value ``i`` is byte ``i // (8 / bits)`` shifted right by ``bits·(i mod
  8/bits)``: an element-wise form with no ``(n, 8/bits)`` intermediate, which
  the TPU compiler pads to whole tiles (256 MiB of temporaries to unpack 1M
  NF4 weights on v5e, 0 in this form; measured with ``benchmarks/tpu.py``).
  """
  per_byte = 8 // bits
  mask = (1 << bits) - 1
  shift = (jnp.arange(per_byte * packed.size, dtype=jnp.uint8) % per_byte) * bits
  return ((jnp.repeat(packed, per_byte) >> shift) & mask)[:size]


def tie(x: QuantizedArray | jax.Array, t: jax.Array) -> QuantizedArray | jax.Array:
  """``x`` with the same values, made data-dependent on the array ``t``.

  A zero is computed from one element of ``t`` (its sign bit shifted out of the
  word): exact for every value of ``t`` (NaN and inf included), but not a
  constant XLA folds.  It is OR'ed into the codes of a :class:`QuantizedArray`
  (and of an integer array) and added to a floating-point array.  What is
  computed from the result can then neither run before ``t`` exists nor be
  merged (CSE) with the same computation from ``x``: a way to bound how many
  dequantized or formed copies XLA keeps alive at once (the Flax low-rank layer
  ties its base weight and ``Λ`` to the layer's input and cotangent, 8-bit
  Adam each leaf's moments to the previous leaf's result).
  ``jax.lax.optimization_barrier`` is not enough for this: XLA on CPU expands
  the barriers before its last CSE pass.  Returns ``x`` itself if ``t`` is
  empty.
  """
  if t.size == 0:
    return x
  first = t.reshape(-1)[:1]
  bits = first.dtype.itemsize * 8
  word = jax.lax.bitcast_convert_type(first, jnp.dtype(f"uint{bits}"))
  zero = ((word >> (bits - 1)) >> 1)[0]
  if isinstance(x, QuantizedArray):
    return dataclasses.replace(x, codes=x.codes | zero.astype(x.codes.dtype))
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return x + zero.astype(x.dtype)
  return x | zero.astype(x.dtype)


@jax.jit
def dequantize(q: QuantizedArray) -> jax.Array:
  """Reconstructs ``x̂`` (original shape and dtype) from a :class:`QuantizedArray`.

  ``x̂_i = scales[i // block_size] * ell(codes[i])``, computed in float32 and
  cast to ``q.dtype``; the zero padding of the last block is removed.
  """
  padded = q.n_blocks * q.block_size
  if q.format == "int8":
    values = q.codes.astype(jnp.float32)
  else:
    codes = _unpack_nibbles(q.codes)[:padded] if q.format == "nf4" else q.codes
    values = jnp.asarray(format_levels(q.format))[codes.astype(jnp.int32)]
  values = values.reshape(q.n_blocks, q.block_size) * q.scales[:, None]
  return values.ravel()[: q.size].reshape(q.shape).astype(q.dtype)


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)




def _resolve_where(tree: Any, where: Any) -> list[bool | None]:
  """Flattened mask aligned with ``tree``'s leaves; None means 'floating leaves'."""
  leaves, treedef = jax.tree.flatten(tree)
  if where is None:
    return [None] * len(leaves)
  mask = where(tree) if callable(where) else where
  mask_leaves, mask_def = jax.tree.flatten(mask)
  if mask_def != treedef:
    raise ValueError(
      "`where` must be a pytree of bools with the same structure as `tree` (or a "
      f"callable returning one); got structure {mask_def}, expected {treedef}."
    )
  return [bool(m) for m in mask_leaves]


def _quantize_selected(tree: Any, where: Any, encode: Callable[[Any], Any], caller: str) -> Any:
  """``encode`` on the leaves ``where`` selects (see :func:`quantize_tree`), checked first."""
  mask = _resolve_where(tree, where)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)

  def convert(path_leaf: tuple[Any, Any], selected: bool | None) -> Any:
    path, leaf = path_leaf
    is_float = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    if selected is None:
      selected = is_float
    if not selected:
      return leaf
    name = jax.tree_util.keystr(path)
    shape = tuple(jnp.shape(leaf))
    if not is_float:
      raise TypeError(
        f"{caller}: leaf {name} with shape {shape} has non-floating dtype "
        f"{jnp.result_type(leaf)}; exclude it with `where`."
      )
    if not isinstance(leaf, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(leaf))):
      raise ValueError(
        f"{caller}: leaf {name} with shape {shape} contains non-finite "
        "values (NaN or inf); block-wise absmax quantization cannot represent them."
      )
    return encode(leaf)

  return jax.tree.unflatten(treedef, list(map(convert, path_leaves, mask)))


def quantize_tree(
  tree: Any,
  format: str = "int8",
  block_size: int = 256,
  where: Any | Callable[[Any], Any] | None = None,
) -> Any:
  """Quantizes the leaves of a pytree with :func:`quantize`.

  Args:
    tree: a pytree of arrays.
    format: see :func:`quantize`.
    block_size: see :func:`quantize`.
    where: which leaves to quantize. ``None`` quantizes every real floating-point
      leaf and passes other leaves (integers, bools, ...) through unchanged.
      Otherwise a pytree of bools with the structure of ``tree``, or a callable
      ``tree -> such a pytree`` (as ``mask`` in :func:`optax.masked`); selected
      leaves must be floating point.

  Returns:
    A pytree of the same structure in which each selected leaf is replaced by a
    :class:`QuantizedArray` (whose own leaves are ``codes`` and ``scales``).
    For leaves that merges write into, see
    :func:`optax_lowrank.quantized_merge.quantize_base_tree`.

  Raises:
    ValueError: bad ``format``/``block_size``/``where``, or a selected leaf with
      concrete values contains NaN or inf (the message names the leaf path and
      shape). Under :func:`jax.jit` values are abstract and this check is skipped.
    TypeError: a leaf selected by ``where`` is not floating point.
  """
  _check_format(format)
  _check_block_size(block_size)
  return _quantize_selected(tree, where, lambda x: quantize(x, format, block_size),
                            "quantize_tree")


def dequantize_tree(tree: Any) -> Any:
  """Replaces every :class:`QuantizedArray` in ``tree`` by :func:`dequantize` of it."""
  return jax.tree.map(
    lambda x: dequantize(x) if _is_quantized(x) else x, tree, is_leaf=_is_quantized
  )


# ----------------------------------------------------------------------------
# One flat quantization of a stack of layers, seen layer by layer.


def array_fields(q: QuantizedArray) -> dict[str, jax.Array]:
  """The array fields of a quantized leaf (codes, scales, and a merge residual)."""
  return {f.name: getattr(q, f.name) for f in dataclasses.fields(q)
          if isinstance(getattr(q, f.name), jax.Array | jax.ShapeDtypeStruct)}


def splits_into_layers(q: QuantizedArray, layers: int) -> bool:
  """Whether ``q`` (a flat quantization of ``layers`` equal slices) splits slice by slice.

  True when every slice fills whole blocks and whole bytes of every packed
  array: then the first ``1/layers`` of every array (codes, scales, packed
  residual) belongs to slice 0, and so on.
  """
  per = q.size // layers if layers > 0 else 0
  return (layers > 0 and q.size == per * layers and per % q.block_size == 0
          and all(per * bits % 8 == 0 for bits in q._bits_per_element().values()))


def layer_slices(q: QuantizedArray, layers: int | tuple[int, ...],
                 shape: tuple[int, ...]) -> QuantizedArray:
  """``q``'s arrays as ``(*layers, -1)``: a leaf whose slice ``i`` is layer ``i`` of ``shape``.

  Needs :func:`splits_into_layers` (of ``prod(layers)`` slices); ``jax.lax.map``
  (or ``nnx.scan``) over the result hands each step one layer's quantization
  (exactly the per-layer one).
  """
  lead = (layers,) if isinstance(layers, int) else tuple(layers)
  return dataclasses.replace(q, shape=tuple(shape),
                             **{k: a.reshape(*lead, -1) for k, a in array_fields(q).items()})


def join_layers(q: QuantizedArray, shape: tuple[int, ...]) -> QuantizedArray:
  """Inverse of :func:`layer_slices`: one flat quantization of ``shape``."""
  return dataclasses.replace(q, shape=tuple(shape),
                             **{k: a.reshape(-1) for k, a in array_fields(q).items()})
