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

Merges
------
The adapter path's frozen base is written to at every merge (``W0 + SᵀΛ``).
:class:`QuantizedBase` adds to a :class:`QuantizedArray` a few bits per
element of rounding residual and a :class:`MergeRule`, and
:func:`merge_update` writes a merged weight back so that updates smaller than
half a level gap are not lost (error feedback); ``"int8"`` and ``"nf4"``.

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
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "DYNAMIC8_LEVELS",
  "DYNAMIC8_UNSIGNED_LEVELS",
  "DEFAULT_MERGE_RULE",
  "FORMATS",
  "MERGE_FORMATS",
  "MergeRule",
  "NF4_LEVELS",
  "QuantizedArray",
  "QuantizedBase",
  "dequantize",
  "dequantize_tree",
  "drop_residual",
  "format_levels",
  "max_abs_error_factor",
  "merge_tree",
  "merge_update",
  "mix_seed",
  "nbytes",
  "nf4_levels_from_definition",
  "quantize",
  "quantize_base_array",
  "quantize_tree",
  "quantized_nbytes",
  "quantized_zeros",
  "requantize_like",
  "tie",
]

FORMATS: tuple[str, ...] = ("int8", "nf4", "dynamic8", "dynamic8_unsigned")

# The 16 NormalFloat-4 levels as published with QLoRA (Dettmers et al. 2023,
# Appendix E), in increasing order. They are quantiles of N(0, 1) rescaled to
# [-1, 1] with an exact zero: with delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2,
# the 8 positive levels are Phi^{-1}(p) for 8 equispaced p in (0.5, delta] and
# the 7 negative levels are -Phi^{-1}(p) for 7 equispaced p in (0.5, delta];
# all are divided by Phi^{-1}(delta). `nf4_levels_from_definition` recomputes
# them from this definition (they agree to 2e-7, the float32 rounding).
_NF4_LEVELS_F64 = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ]
)


def nf4_levels_from_definition() -> np.ndarray:
  """Recomputes the 16 NF4 levels from their quantile definition.

  Uses the exact normal quantile function of the standard library
  (:class:`statistics.NormalDist`); see the comment on :data:`NF4_LEVELS`.

  Returns:
    float64[16], sorted increasingly, from -1 to 1 with an exact 0.
  """
  ppf = statistics.NormalDist().inv_cdf
  delta = 0.5 * ((1.0 - 1.0 / 30.0) + (1.0 - 1.0 / 32.0))
  positive = [ppf(p) for p in np.linspace(0.5, delta, 9)[1:]]
  negative = [-ppf(p) for p in np.linspace(0.5, delta, 8)[1:]]
  return np.sort(np.array(negative + [0.0] + positive)) / ppf(delta)


def _dynamic_tree_levels(magnitude_bits: int, signed: bool) -> np.ndarray:
  """Sorted float64 levels of a dynamic tree code with ``magnitude_bits`` bits.

  A magnitude code with ``e`` leading zero bits (``e < magnitude_bits``)
  followed by the indicator bit leaves ``k = magnitude_bits - 1 - e`` fraction
  bits; it encodes ``10^{-e} * (0.1 + 0.9 * j / 2^k)`` for ``j = 1..2^k``, i.e.
  the decade ``(10^{-e-1}, 10^{-e}]`` split into ``2^k`` equal steps with its top
  included (so the block maximum maps to exactly 1). The all-zero code is 0.
  """
  decades = [
    10.0 ** (-e) * (0.1 + 0.9 * np.arange(1, 2**k + 1) / 2**k)
    for e, k in ((e, magnitude_bits - 1 - e) for e in range(magnitude_bits))
  ]
  magnitudes = np.concatenate(decades)
  parts = [-magnitudes, np.zeros(1), magnitudes] if signed else [np.zeros(1), magnitudes]
  return np.sort(np.concatenate(parts))


_LEVELS_F64: dict[str, np.ndarray] = {
  "int8": np.arange(-127, 128) / 127.0,
  "nf4": _NF4_LEVELS_F64,
  "dynamic8": _dynamic_tree_levels(7, signed=True),  # 255 levels, 7 magnitude bits + sign
  "dynamic8_unsigned": _dynamic_tree_levels(8, signed=False),  # 256 levels
}

#: float32[16] NF4 levels (see the comment above ``_NF4_LEVELS_F64``).
NF4_LEVELS: np.ndarray = _NF4_LEVELS_F64.astype(np.float32)
#: float32[255] signed dynamic tree levels in [-1, 1].
DYNAMIC8_LEVELS: np.ndarray = _LEVELS_F64["dynamic8"].astype(np.float32)
#: float32[256] unsigned dynamic tree levels in [0, 1].
DYNAMIC8_UNSIGNED_LEVELS: np.ndarray = _LEVELS_F64["dynamic8_unsigned"].astype(np.float32)


def format_levels(format: str) -> np.ndarray:
  """Levels ``ell(c)`` of a format in units of the block absmax, sorted, float32.

  The code of an element is its index in this table (for ``"int8"`` the stored
  int8 is ``index - 127`` and the levels are ``c / 127``).
  """
  _check_format(format)
  return _LEVELS_F64[format].astype(np.float32)


def max_abs_error_factor(format: str) -> float:
  """Worst-case ``|x - x̂| / a_b`` (``a_b`` the block absmax) of a format.

  Half the largest gap between adjacent levels: ``1/254`` for ``"int8"``,
  ``0.1519`` for ``"nf4"``, ``0.9/128`` and ``0.9/256`` for the dynamic codes.
  """
  _check_format(format)
  return float(np.max(np.diff(_LEVELS_F64[format]))) / 2.0


def _check_format(format: Any) -> None:
  if not isinstance(format, str) or format not in FORMATS:
    raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")


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
    zero_code = int(np.flatnonzero(_LEVELS_F64[format] == 0)[0])
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

  The rounding noise of element ``i`` is ``u_i = H(H(i + c) xor seed) / 2^32``
  with ``H`` the MurmurHash3 32-bit finalizer (an invertible integer mix with
  full avalanche): a counter-based generator that costs a few integer ops per
  element, fuses with the rounding (nothing is materialized) and compiles to a
  handful of instructions, where :mod:`jax.random` bits cost tens of times more on
  CPU.
  Use a different seed at every call (e.g. ``mix_seed(run_seed, step, leaf)``).

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


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


_GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio; keeps 0 away from H's fixed point


def mix_seed(*words: jax.typing.ArrayLike) -> jax.Array:
  """Hashes integers and/or :mod:`jax.random` keys into one uint32 seed.

  ``mix_seed(run_seed, step, leaf_index)`` gives a distinct, well-mixed seed per
  (run, step, leaf) for :func:`quantize`'s stochastic rounding. Works on Python
  ints (taken mod 2^32) and (traced) integer scalars (cast to uint32); a key
  contributes all words of its key data, an integer array all its elements.

  Returns:
    uint32[] scalar.
  """
  h = jnp.uint32(_GOLDEN32)
  for word in words:
    word = jnp.uint32(word & 0xFFFFFFFF) if isinstance(word, int) else jnp.asarray(word)
    if jax.dtypes.issubdtype(word.dtype, jax.dtypes.prng_key):
      parts = list(jax.random.key_data(word).ravel())
    else:
      parts = list(word.astype(jnp.uint32).ravel())
    for part in parts:
      h = _fmix32(h ^ part.astype(jnp.uint32)) + jnp.uint32(_GOLDEN32)
  return h


def _dither(seed: jax.Array, n: int, offset: jax.typing.ArrayLike = 0) -> jax.Array:
  """float32[n] uniform in [0, 1): 24 top bits of H(H(i + c) xor seed), ``i`` from ``offset``."""
  index = (jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(offset).astype(jnp.uint32)
           + jnp.uint32(_GOLDEN32))
  bits = _fmix32(_fmix32(index) ^ seed)
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """float32[n_blocks, block_size] view of ``x``, zero-padded at the end."""
  n = x.size
  n_blocks = -(-n // block_size)
  flat = jnp.ravel(x).astype(jnp.float32)
  flat = jnp.pad(flat, (0, n_blocks * block_size - n))
  return flat.reshape(n_blocks, block_size)


def _dynamic_rank(a: jax.Array, magnitude_bits: int) -> jax.Array:
  """Continuous rank of magnitudes ``a`` in [0, 1] among the dynamic tree levels.

  The returned ``r`` is an integer exactly at a level (0 for zero, ``2^K - 1``
  for 1, with ``K = magnitude_bits``) and linear in ``a`` between two adjacent
  levels. Decade ``e`` (``[10^{-e-1}, 10^{-e}]``, ``n_e = 2^{K-1-e}`` levels)
  has ``n_e - 1`` non-zero levels below it, hence
  ``r = n_e - 1 + n_e (a 10^e - 0.1) / 0.9``; below the smallest non-zero level
  ``10^{-(K-1)}`` the neighbours are 0 and that level, hence ``r = a 10^{K-1}``.
  The decade is found with ``K - 2`` comparisons and selects (no logarithm, no
  table search), which is ~15x faster on CPU than ``log10`` and powers.
  """
  pow10 = jnp.ones_like(a)
  n = jnp.full_like(a, 2.0 ** (magnitude_bits - 1))
  for e in range(1, magnitude_bits - 1):
    below = a < 10.0**-e
    pow10 = jnp.where(below, 10.0**e, pow10)
    n = jnp.where(below, 2.0 ** (magnitude_bits - 1 - e), n)
  in_decade = (n - 1) + (a * pow10 - 0.1) * (n / 0.9)
  smallest = 10.0 ** -(magnitude_bits - 1)
  return jnp.where(a < smallest, a * (1.0 / smallest), in_decade)


def _rank(y: jax.Array, format: str) -> jax.Array:
  """Continuous rank of ``y = x / s_b`` in the sorted level table of ``format``.

  (For ``"int8"``, ``y`` is in code units, ``s_b = a_b / 127``.)

  Integer at each level, linear between adjacent levels, so rounding the rank to
  the nearest integer rounds ``y`` to the nearest level, and rounding it up with
  probability equal to its fractional part is unbiased in ``y``.
  """
  if format == "int8":
    return y + 127.0
  if format == "nf4":
    table = jnp.asarray(NF4_LEVELS)
    upper = jnp.clip(jnp.sum(y[:, None] > table[None, :], axis=1), 1, 15)
    lo, hi = table[upper - 1], table[upper]
    return (upper - 1) + (y - lo) / (hi - lo)
  if format == "dynamic8":
    return 127.0 + jnp.sign(y) * _dynamic_rank(jnp.abs(y), 7)
  return _dynamic_rank(jnp.maximum(y, 0.0), 8)  # dynamic8_unsigned


@functools.partial(jax.jit, static_argnames=("format", "block_size"))
def _quantize(x: jax.Array, format: str, block_size: int, seed: jax.Array | None) -> QuantizedArray:
  blocks = _blocks(x, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [n_blocks]
  unit = absmax / 127.0 if format == "int8" else absmax
  y = (blocks / jnp.where(unit > 0, unit, 1.0)[:, None]).ravel()
  if format != "int8":
    y = jnp.clip(y, -1.0, 1.0)
  rank = _rank(y, format)
  if seed is None:
    rank = jnp.round(rank)
  else:
    below = jnp.floor(rank)
    rank = below + (_dither(seed, rank.size) < rank - below)
  n_levels = _LEVELS_F64[format].size
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


def tie(q: QuantizedArray, t: jax.Array) -> QuantizedArray:
  """``q`` with the same values, made data-dependent on the array ``t``.

  The codes are OR'ed with a zero computed from one element of ``t`` (its sign
  bit shifted out of the word): exact for every value of ``t`` (NaN and inf
  included), but not a constant XLA folds.  A dequantization of the result can
  then neither run before ``t`` exists nor be merged (CSE) with another
  dequantization of ``q``: a way to bound how many dequantized copies XLA
  keeps alive at once (the Flax low-rank layer ties its base weight to the
  layer's input and cotangent, 8-bit Adam each leaf's moments to the previous
  leaf's result).  ``jax.lax.optimization_barrier`` is not enough for this:
  XLA on CPU expands the barriers before its last CSE pass.  Returns ``q``
  itself if ``t`` is empty.
  """
  if t.size == 0:
    return q
  first = t.reshape(-1)[:1]
  bits = first.dtype.itemsize * 8
  word = jax.lax.bitcast_convert_type(first, jnp.dtype(f"uint{bits}"))
  zero = ((word >> (bits - 1)) >> 1).astype(q.codes.dtype)
  return dataclasses.replace(q, codes=q.codes | zero)


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


def quantize_tree(
  tree: Any,
  format: str = "int8",
  block_size: int = 256,
  where: Any | Callable[[Any], Any] | None = None,
  rule: MergeRule | None = None,
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
    rule: ``None`` for plain :class:`QuantizedArray` leaves, or a
      :class:`MergeRule` for :class:`QuantizedBase` leaves that merges write
      into (:func:`quantize_base_array`; formats ``"int8"`` and ``"nf4"``).

  Returns:
    A pytree of the same structure in which each selected leaf is replaced by a
    :class:`QuantizedArray` (whose own leaves are ``codes`` and ``scales``).

  Raises:
    ValueError: bad ``format``/``block_size``/``where``, or a selected leaf with
      concrete values contains NaN or inf (the message names the leaf path and
      shape). Under :func:`jax.jit` values are abstract and this check is skipped.
    TypeError: a leaf selected by ``where`` is not floating point.
  """
  _check_format(format)
  _check_block_size(block_size)
  if rule is not None:
    _check_merge_format(format)
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
        f"quantize_tree: leaf {name} with shape {shape} has non-floating dtype "
        f"{jnp.result_type(leaf)}; exclude it with `where`."
      )
    if not isinstance(leaf, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(leaf))):
      raise ValueError(
        f"quantize_tree: leaf {name} with shape {shape} contains non-finite "
        "values (NaN or inf); block-wise absmax quantization cannot represent them."
      )
    if rule is not None:
      return quantize_base_array(leaf, format, block_size, rule)
    return quantize(leaf, format, block_size)

  return jax.tree.unflatten(treedef, list(map(convert, path_leaves, mask)))


def dequantize_tree(tree: Any) -> Any:
  """Replaces every :class:`QuantizedArray` in ``tree`` by :func:`dequantize` of it."""
  return jax.tree.map(
    lambda x: dequantize(x) if _is_quantized(x) else x, tree, is_leaf=_is_quantized
  )


# ----------------------------------------------------------------------------
# Writing merges into a quantized frozen base.
#
# The adapter path merges ``W0 ← W0 + SᵀΛ`` at every refresh.  With ``W0``
# stored quantized, a merge has to put the sum back on the format's grid, and
# round-to-nearest sends every element whose update is below half a grid step
# back to its old code: late in training, when the updates are small, the base
# stops moving.  A :class:`MergeRule` says how a merge rounds; the rule travels
# with the base leaf (:class:`QuantizedBase`).

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


def _check_merge_format(format: str) -> None:
  if format not in MERGE_FORMATS:
    raise ValueError(f"merge rules support the formats {MERGE_FORMATS}, got {format!r}.")


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


def _level_value(rank: jax.Array, format: str) -> jax.Array:
  """Inverse of :func:`_rank`: the value at a (fractional) rank, in block units."""
  if format == "int8":
    return rank - 127.0
  n = _LEVELS_F64[format].size
  return jnp.interp(rank, jnp.arange(n, dtype=jnp.float32), jnp.asarray(format_levels(format)))


def _end_values(format: str, bits: int) -> tuple[float, float]:
  """Values (block units) of the lowest and highest kept points of a format.

  The kept points nearest the ends of the level table lie ``2^{-b-1}`` rank
  units inside it (see :class:`MergeRule`).
  """
  levels = _LEVELS_F64[format] * (127.0 if format == "int8" else 1.0)
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
  n_levels = _LEVELS_F64[format].size
  grid = 2**rule.feedback_bits
  # Kept ranks are the points c - 1/2 + (j + 1/2) / grid, j < grid: the
  # midpoints of grid equal parts of the cell [c - 1/2, c + 1/2) of code c.
  # With t = (rank + 1/2)·grid − 1/2 they are the integers, and c = t // grid,
  # j = t mod grid; a nearest kept rank therefore always has the nearest code.
  t = (_rank(y, format) + 0.5) * grid - 0.5
  if rule.rounding == "nearest":
    t = jnp.round(t)
  else:
    below = jnp.floor(t)
    t = below + (_dither(seed, t.size, offset) < t - below)
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
  values = _level_value(rank, q.format).reshape(q.n_blocks, q.block_size)
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
  _check_format(format)
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


def _span_projection(basis: Any, x: jax.Array) -> jax.Array:
  """``P_S x``: the orthogonal projection of ``x`` onto the span of ``Sᵀ`` (float32).

  Every factor ``U`` (``n × r``) of the basis is replaced by
  ``U (UᵀU)⁻¹``; projecting with those and mapping back with ``U`` gives the
  least-squares fit of ``x`` by ``Sᵀ C`` (exact for the mode products of
  :mod:`optax_lowrank.bases`, whose span is the tensor product of the factors').
  """
  from optax_lowrank import bases as bases_lib  # a module that imports nothing of ours

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


def array_fields(q: QuantizedArray) -> dict[str, jax.Array]:
  """The array fields of a quantized leaf (codes, scales, and a merge residual)."""
  return {f.name: getattr(q, f.name) for f in dataclasses.fields(q)
          if isinstance(getattr(q, f.name), jax.Array | jax.ShapeDtypeStruct)}


def splits_into_layers(q: QuantizedArray, layers: int) -> bool:
  """Whether ``q`` (a flat quantization of ``layers`` equal slices) splits slice by slice.

  True when every slice fills whole blocks: then the first ``1/layers`` of
  every array (codes, scales, packed residual) belongs to slice 0, and so on.
  """
  per = q.size // layers if layers else 0
  bits = getattr(q, "rule", None)
  bits = bits.feedback_bits if isinstance(q, QuantizedBase) and bits else 0
  return (layers > 0 and q.size == per * layers and per % q.block_size == 0
          and (per * bits) % 8 == 0)


def layer_slices(q: QuantizedArray, layers: int, shape: tuple[int, ...]) -> QuantizedArray:
  """``q``'s arrays as ``(layers, -1)``: a leaf whose slice ``i`` is layer ``i`` of shape ``shape``.

  Needs :func:`splits_into_layers`; ``jax.lax.map`` over the result hands each
  step one layer's quantization (exactly the per-layer one).
  """
  return dataclasses.replace(q, shape=tuple(shape),
                             **{k: a.reshape(layers, -1) for k, a in array_fields(q).items()})


def join_layers(q: QuantizedArray, shape: tuple[int, ...]) -> QuantizedArray:
  """Inverse of :func:`layer_slices`: one flat quantization of ``shape``."""
  return dataclasses.replace(q, shape=tuple(shape),
                             **{k: a.reshape(-1) for k, a in array_fields(q).items()})
