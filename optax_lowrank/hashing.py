"""Counter-based random numbers from an integer hash, for stochastic rounding.

Element ``i`` of a draw keyed by the uint32 ``seed`` is

.. math::

  u_i = \\lfloor H(H(i + c) \\oplus \\mathrm{seed}) / 2^8 \\rfloor \\cdot 2^{-24}
  \\in [0, 1),

with ``H`` the 32-bit finalizer of MurmurHash3 (an invertible integer mix with
full avalanche) and ``c = 0x9E3779B9``.  Nothing is stored and nothing is
split: a draw costs a few integer operations per element, fuses with what
consumes it, and any slice of a draw can be made on its own (``offset``).
:mod:`jax.random` bits cost tens of times more on CPU, which matters when every
element of every optimizer step is rounded (8-bit Adam, merges into a
quantized base).  Not for cryptography, nor a substitute for
:mod:`jax.random` where keys are cheap.

:func:`mix_seed` hashes several integers or keys (run seed, step, leaf...) into
one seed, so that each rounding has its own noise and a resumed run rounds
exactly as the original one.

Reference:
  Appleby, "MurmurHash3", 2011. https://github.com/aappleby/smhasher
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["fmix32", "mix_seed", "uniform"]

_GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio; keeps 0 away from H's fixed point


def fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer ``H``: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def mix_seed(*words: jax.typing.ArrayLike) -> jax.Array:
  """Hashes integers and/or :mod:`jax.random` keys into one uint32 seed.

  ``mix_seed(run_seed, step, leaf_index)`` gives a distinct, well-mixed seed per
  (run, step, leaf), e.g. for the stochastic rounding of
  :func:`optax_lowrank.quantization.quantize`. Works on Python ints (taken mod
  2^32) and (traced) integer scalars (cast to uint32); a key contributes all
  words of its key data, an integer array all its elements.

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
      h = fmix32(h ^ part.astype(jnp.uint32)) + jnp.uint32(_GOLDEN32)
  return h


def uniform(seed: jax.Array, n: int, offset: jax.typing.ArrayLike = 0) -> jax.Array:
  """float32[n] uniform in ``[0, 1)``: elements ``offset .. offset + n - 1`` of the draw ``seed``.

  ``uniform(seed, n, k)`` equals ``uniform(seed, k + n)[k:]``, so a leaf cut
  into slices draws the same numbers slice by slice as whole.
  """
  index = (jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(offset).astype(jnp.uint32)
           + jnp.uint32(_GOLDEN32))
  bits = fmix32(fmix32(index) ^ seed)
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
