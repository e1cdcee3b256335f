"""The level tables of the block quantization formats, and positions in them.

A format codes ``y = x / s_b`` (``s_b`` the scale of the block of ``x``) as the
index of a level in a sorted table in ``[-1, 1]``: ``c / 127`` for ``"int8"``,
the 16 NormalFloat levels for ``"nf4"`` (:data:`NF4_LEVELS`, quantiles of
``N(0, 1)`` with an exact zero; Dettmers, Pagnoni, Holtzman and Zettlemoyer
2023, arXiv:2305.14314), and the dynamic tree codes, a decimal exponent and a
linear fraction per code, for ``"dynamic8"`` and ``"dynamic8_unsigned"``
(:data:`DYNAMIC8_LEVELS`, :data:`DYNAMIC8_UNSIGNED_LEVELS`; Dettmers 2016,
arXiv:1511.04561, and Dettmers, Lewis, Shleifer and Zettlemoyer 2022,
arXiv:2110.02861).  :mod:`optax_lowrank.quantization` documents each format's
error bound and storage.

Rounding works in *rank units*: :func:`rank` is the continuous position of
``y`` in the table (an integer at each level, linear in between), so rounding
the rank to the nearest integer rounds ``y`` to the nearest level, and rounding
it up with probability equal to its fractional part is unbiased in ``y``;
:func:`level_value` is its inverse.  Both are evaluated element-wise with a few
comparisons (no table search, no logarithm).
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "DYNAMIC8_LEVELS",
  "DYNAMIC8_UNSIGNED_LEVELS",
  "FORMATS",
  "NF4_LEVELS",
  "format_levels",
  "max_abs_error_factor",
  "nf4_levels_from_definition",
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


def check_format(format: Any) -> None:
  """Raises ``ValueError`` unless ``format`` is one of :data:`FORMATS`."""
  if not isinstance(format, str) or format not in FORMATS:
    raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")


def format_levels(format: str) -> np.ndarray:
  """Levels ``ell(c)`` of a format in units of the block absmax, sorted, float32.

  The code of an element is its index in this table (for ``"int8"`` the stored
  int8 is ``index - 127`` and the levels are ``c / 127``).
  """
  check_format(format)
  return _LEVELS_F64[format].astype(np.float32)


def levels_f64(format: str) -> np.ndarray:
  """The float64 table of :func:`format_levels` (for exact host-side arithmetic)."""
  check_format(format)
  return _LEVELS_F64[format]


def max_abs_error_factor(format: str) -> float:
  """Worst-case ``|x - x̂| / a_b`` (``a_b`` the block absmax) of a format.

  Half the largest gap between adjacent levels: ``1/254`` for ``"int8"``,
  ``0.1519`` for ``"nf4"``, ``0.9/128`` and ``0.9/256`` for the dynamic codes.
  """
  check_format(format)
  return float(np.max(np.diff(_LEVELS_F64[format]))) / 2.0


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


def rank(y: jax.Array, format: str) -> jax.Array:
  """Continuous rank of ``y = x / s_b`` (1-D) in the sorted level table of ``format``.

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


def level_value(rank: jax.Array, format: str) -> jax.Array:
  """Inverse of :func:`rank`: the value at a (fractional) rank, in block units."""
  if format == "int8":
    return rank - 127.0
  n = _LEVELS_F64[format].size
  return jnp.interp(rank, jnp.arange(n, dtype=jnp.float32), jnp.asarray(format_levels(format)))
